"""`handoff tls-certs` and `handoff.transport.pki`: a throwaway CA and host certificates that
mutual TLS accepts, keys 0600, the CA's key never written, and nothing overwritten."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from handoff.transport import tcp
from handoff.transport.pki import PkiError, make_pki
from handoff.transport.tcp import TlsFiles


def tls_certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handoff", "tls-certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_tls_certs_makes_a_pki_that_mutual_tls_accepts(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    proc = tls_certs("--out", str(out), "--host", "a=127.0.0.2", "--host", "b=127.0.0.3,b.test")
    assert proc.returncode == 0, proc.stderr
    assert "for trials" in proc.stdout and "--tls-key" in proc.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(os.listdir(out)) == ["a.crt", "a.key", "b.crt", "b.key", "handoff-trial-ca.pem"]
    for key in ("a.key", "b.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    assert not any("PRIVATE KEY" in (out / f).read_text() for f in ("handoff-trial-ca.pem",))
    ca = out / "handoff-trial-ca.pem"
    a = TlsFiles(cert=out / "a.crt", key=out / "a.key", ca=ca)
    b = TlsFiles(cert=out / "b.crt", key=out / "b.key", ca=ca)
    listener = await tcp.listen("tcp:127.0.0.3:0", b)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                accepted: list[tcp.Channel] = []

                async def accept() -> None:
                    accepted.append(await listener.accept())

                nursery.start_soon(accept)
                client = await tcp.connect(listener.address, a)
        await client.send(b"ping")
        assert await accepted[0].receive() == b"ping"
        assert "a" in accepted[0].peer_names
        await client.aclose()
        await accepted[0].aclose()
    finally:
        await listener.aclose()


def test_tls_certs_never_overwrites_and_refuses_bad_names(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert tls_certs("--out", str(out), "--host", "a=127.0.0.2").returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    again = tls_certs("--out", str(out), "--host", "a=127.0.0.2", "--host", "c=127.0.0.4")
    assert again.returncode == 2 and "not overwriting" in again.stderr, again.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing written
    for bad, said in (
        ("../x=127.0.0.2", "host name"),
        ("a=not_a_name", "neither an IP address nor a DNS name"),
        ("a", "NAME=ADDR"),
    ):
        proc = tls_certs("--out", str(tmp_path / "other"), "--host", bad)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    twice = tls_certs("--out", str(tmp_path / "other"), "--host", "a=1.2.3.4", "--host", "a=::1")
    assert twice.returncode == 2 and "given twice" in twice.stderr
    assert not (tmp_path / "other").exists()


def test_make_pki_exclusive_checks_every_file_before_writing_one(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text("someone's key")
    with pytest.raises(PkiError, match=r"b\.key"):
        make_pki(tmp_path, {"a": ["127.0.0.2"], "b": ["127.0.0.3"]}, exclusive=True)
    assert sorted(os.listdir(tmp_path)) == ["b.key"]
    assert (tmp_path / "b.key").read_text() == "someone's key"
