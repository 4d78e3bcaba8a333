"""Guest policy DOMAIN through `handoff migrate` (reference sev-live-migration.md section 1.3,
checklist of section 6: "a source told to send to an unvouched PDH with policy SEV/DOMAIN
refuses"): the operator puts hosts A and B in one owner's domain by giving their kvmstub
daemons the same `--oca-key FILE`; host C owns itself. All three share one simulated AMD root,
so only the OCA tells them apart. The hosts, targets and helpers are test_migrate.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_migrate import (  # the cross-host harness: hosts, VMMs, `handoff migrate`
    SOURCE_HOST,
    TARGET_HOST,
    VCPUS,
    Host,
    StatePoller,
    _continuous,
    no_guest_left,
    run_migrate,
    start_target,
    tls_flags,
    wait_exit,
    wait_gone,
)

from handoff.testing import write_oca_key
from handoff.testing.tls import make_pki
from handoff.transport.tcp import TlsFiles

DOMAIN = "0x10"  # policy bit 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_pki(
        tmp_path_factory.mktemp("pki"), {"source": [SOURCE_HOST], "target": [TARGET_HOST]}
    )


@pytest.fixture
def domain_hosts(tmp_path: Path) -> Iterator[tuple[Host, Host, Host]]:
    """A and B given one owner's OCA key file, C with an OCA of its own; one AMD root."""
    oca = write_oca_key(tmp_path / "owner-oca.pem")
    root = tmp_path / "amd-root"
    root.mkdir(mode=0o700)
    made: list[Host] = []
    try:
        for name, flags in (
            ("host-a", ["--oca-key", str(oca)]),
            ("host-b", ["--oca-key", str(oca)]),
        ):
            made.append(Host(tmp_path / name, root, *flags))
        made.append(Host(tmp_path / "host-c", root))
        for host in made:
            host.ready()
        yield made[0], made[1], made[2]
    finally:
        for host in made:
            with contextlib.suppress(AssertionError):
                host.stop()


async def test_a_domain_guest_is_refused_toward_another_owner_and_migrates_within_its_own(
    domain_hosts: tuple[Host, Host, Host], pki: dict[str, TlsFiles]
) -> None:
    a, b, c = domain_hosts
    platform = {h: h.kvm.stats()["platform"] for h in (a, b, c)}
    assert platform[a]["oca_fingerprint"] == platform[b]["oca_fingerprint"]
    assert platform[c]["oca_fingerprint"] != platform[a]["oca_fingerprint"]
    source = a.vmm("source", *tls_flags(pki["source"]), "--policy", DOMAIN)
    source.start()
    await source.wait_lines(2)

    # Host C: its chain is AMD's (the shared root) but its OCA is not the guest's owner's.
    poller = StatePoller(a)
    stranger, address = start_target(c, pki["target"], "stranger", "--policy", DOMAIN)
    try:
        code, result, err = await trio.to_thread.run_sync(run_migrate, source.control, address)
    finally:
        seen = poller.stop()
    assert code == 1 and result["status"] == "failed", (result, err)
    assert result["recovery"] == "nothing-to-do" and result["pages"] == 0, result
    # SEND_START's firmware status, POLICY_FAILURE, surfaced from the EIO (reference 1.6).
    assert "SEND_START" in result["error"], result
    assert "firmware status 0x7" in result["error"], result
    assert "SUPDATE" not in seen, seen  # the guest never left RUNNING
    assert await wait_exit(stranger) == 1
    no_guest_left(c)
    assert a.vm_states() == ["RUNNING"]
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == [], source.log()

    # Host B, of the same owner: the migration completes and the guest goes on there.
    target, address = start_target(b, pki["target"], "target", "--policy", DOMAIN)
    code, result, err = await trio.to_thread.run_sync(run_migrate, source.control, address)
    assert code == 0 and result["status"] == "completed", (result, err, target.log())
    await wait_gone(source)
    report = await _continuous(source, target)
    assert report.problems(VCPUS) == []
    assert b.vm_states() == ["RUNNING"]
    no_guest_left(a)
