"""Cross-host SEV live migration end to end: two kvmstub daemons (two hosts, two SEV platforms
under one simulated AMD root), a source VMM and a target VMM (`handoff run --incoming
tcp:127.0.0.3:PORT`) with mutual TLS, and `handoff migrate` (or QMP `migrate`) between them.

Each test names the checklist items of reference/sev-live-migration.md section 6 it covers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.seriallog import SerialTail
from handoff.testing import KvmstubDaemon, VmmProcess, spawn_kvmstub_daemon
from handoff.testing.tls import make_pki
from handoff.transport.tcp import TlsFiles

SOURCE_HOST = "127.0.0.2"
TARGET_HOST = "127.0.0.3"
VCPUS = 2


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tls_flags(files: TlsFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


@pytest.fixture(scope="module")
def amd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("amd-root")
    root.chmod(0o700)
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_pki(
        tmp_path_factory.mktemp("pki"),
        {"source": [SOURCE_HOST], "target": [TARGET_HOST], "other": [TARGET_HOST]},
    )


class Host:
    """One simulated host: its kvmstub daemon (its SEV platform; `kvmstub_flags` go to its
    `kvmstub serve`) and its runtime directory."""

    def __init__(self, directory: Path, amd_root: Path, *kvmstub_flags: str) -> None:
        self.dir = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / "kvm").mkdir(mode=0o700, exist_ok=True)
        state = directory / "sev-state"
        state.mkdir(mode=0o700, exist_ok=True)
        # Started now, waited for by `ready`: the two hosts' daemons start side by side.
        self._pending: Callable[[], KvmstubDaemon] | None = spawn_kvmstub_daemon(
            directory / "kvm",
            "--state-dir",
            str(state),
            "--amd-root",
            str(amd_root),
            *kvmstub_flags,
        )
        self.kvm: KvmstubDaemon
        self.vmms: list[VmmProcess] = []

    def ready(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.kvm = pending()

    def vmm(self, name: str, *extra: str, mode: str = "sev") -> VmmProcess:
        vmm = VmmProcess(
            self.dir / name,
            self.kvm.socket,
            name="vm",
            mode=mode,
            vcpus=VCPUS,
            memory="16M",
            line_every=50,
            flip_every=10,
            extra=extra,
        )
        (self.dir / name).mkdir(exist_ok=True)
        self.vmms.append(vmm)
        return vmm

    def vm_states(self) -> list[str | None]:
        return [vm["firmware_state"] for vm in self.kvm.stats()["vms"]]

    def stop(self) -> None:
        for vmm in self.vmms:
            vmm.kill_all()
        try:
            self.ready()  # a daemon never waited for: its start ends first (or is killed)
        finally:
            if hasattr(self, "kvm"):
                self.kvm.stop()


@pytest.fixture
def hosts(tmp_path: Path, amd_root: Path) -> Iterator[tuple[Host, Host]]:
    made: list[Host] = []
    try:
        for name in ("host-a", "host-b"):
            made.append(Host(tmp_path / name, amd_root))
        for host in made:
            host.ready()
        yield made[0], made[1]
    finally:
        for host in made:
            with contextlib.suppress(AssertionError):
                host.stop()


def start_target(
    host: Host, pki: TlsFiles, name: str = "target", *extra: str
) -> tuple[VmmProcess, str]:
    port = free_port(TARGET_HOST)
    address = f"tcp:{TARGET_HOST}:{port}"
    target = host.vmm(name, "--incoming", address, *tls_flags(pki), *extra)
    target.start()
    return target, address


class StatePoller:
    """Samples a daemon's VMs' firmware states every few ms (what `kvmstub stats` shows)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for state in self.host.vm_states():
                    if state and (not self.seen or self.seen[-1] != state):
                        self.seen.append(state)
            except OSError:
                pass
            time.sleep(0.003)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return self.seen


def run_migrate(control: str, to: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "handoff",
            "migrate",
            "--control",
            control,
            "--to",
            to,
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, data, proc.stderr


async def wait_gone(vmm: VmmProcess, timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while vmm.alive_pids():
            await trio.sleep(0.02)
    assert not vmm.alive_pids(), vmm.log()


async def test_an_sev_guest_migrates_between_two_hosts_and_keeps_printing(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles]
) -> None:
    """e2e; checklist: the KVM layer (SEND/RECEIVE through the daemon), anti-cloning (the
    source SENT, its VMM gone, one RUNNING copy), shared-regions under churn (the guest flips
    a page every 10 steps throughout)."""
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(3)
    # The guest enabled migration (MSR_KVM_MIGRATION_CONTROL, filtered to the VMM).
    assert (await source.qmp("query-status"))["migration-allowed"] is True
    target, address = start_target(b, pki["target"])
    poller = StatePoller(a)
    try:
        code, result, err = await trio.to_thread.run_sync(run_migrate, source.control, address)
    finally:
        seen = poller.stop()
    assert code == 0, f"{result}\n{err}\nsource:\n{source.log()}\ntarget:\n{target.log()}"
    assert result["status"] == "completed"
    assert result["rounds"] >= 2 and result["private-pages"] > 0
    assert "round 1:" in err and "pages remaining" in err  # the progress line
    await wait_gone(source)
    assert seen[-1] == "SENT" and "SUPDATE" in seen, seen  # never RUNNING again after SUPDATE
    assert seen.index("SUPDATE") < seen.index("SENT")
    no_guest_left(a)  # the source's VMM ended, its VM with it
    assert b.vm_states() == ["RUNNING"]

    # One guest, one serial stream across the two hosts' logs: seq contiguous, no PANIC.
    combined = SerialTail()
    with trio.fail_after(20):
        while True:
            report = combined.read([*source.serial_logs, *target.serial_logs])
            last = report.last_seq()
            problems = report.problems(VCPUS)
            assert not report.panics, f"{report.panics}\n{target.log()}"
            if not problems and all(
                last.get(v, -1) >= result_seq + 3
                for v, result_seq in SerialTail().read(source.serial_logs).last_seq().items()
            ):
                break
            await trio.sleep(0.05)
    assert SerialTail().read(target.serial_logs).lines, "the target printed"
    status = await target.qmp("query-status")
    assert status["running"] and status["status"] == "running"
    assert status["migration-allowed"] is True  # carried: the guest wrote it once, at boot


def no_guest_left(host: Host, within: float = 5.0) -> None:
    """Nothing of a torn-down target: no VM, no firmware guest (DECOMMISSIONed), no ASID. The
    daemon learns of a closed fd when it reads the hangup: a moment after the process exits."""
    deadline = time.monotonic() + within
    while True:
        stats = host.kvm.stats()
        gone = stats["vms"] == [] and stats["firmware_guests"] == 0
        if gone and stats["asids"]["sev"].get("used", 0) == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


async def wait_exit(vmm: VmmProcess, timeout: float = 20) -> int:
    assert vmm.process is not None
    with trio.fail_after(timeout):
        while vmm.process.poll() is None:
            await trio.sleep(0.02)
    return vmm.process.returncode


async def migrate_qmp(source: VmmProcess, **args: Any) -> dict[str, Any]:
    """QMP migrate; the final MIGRATION event's data."""
    from handoff.qmp.client import QMPClient

    async with await QMPClient.connect(source.control) as qmp:
        await qmp.execute("migrate", args)
        while True:
            data = dict((await qmp.next_event("MIGRATION")).data)
            if data.get("status") in ("completed", "failed", "cancelled"):
                return data


@pytest.mark.parametrize(
    ("mode", "policy", "named"),
    [("sev-es", None, "SEV-ES"), ("sev", "0x8", "NOSEND")],
)
async def test_a_guest_that_cannot_migrate_is_refused_before_anything_is_sent(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], mode: str, policy: str | None, named: str
) -> None:
    """Checklist: policy gates (NOSEND: nothing sent); SEV-ES refused by name (no VMSA
    ioctls upstream)."""
    a, b = hosts
    extra = [*tls_flags(pki["source"]), *(["--policy", policy] if policy else [])]
    source = a.vmm("source", *extra, mode=mode)
    source.start()
    target, address = start_target(b, pki["target"])
    code, result, err = await trio.to_thread.run_sync(run_migrate, source.control, address)
    assert code == 1 and result["status"] == "refused", (result, err)
    assert named in result["error"] and "keeps running" in result["error"]
    if mode == "sev-es":
        assert "SEND_UPDATE_VMSA" in result["error"]
    assert b.kvm.stats()["vms"] == []  # the target never got a Describe
    assert "migration from" not in target.log()
    await source.wait_lines(2)
    assert source.report().problems(VCPUS) == []


async def test_a_tampered_packet_fails_receive_update_data_and_the_source_resumes(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    """Checklist: integrity (a flipped ciphertext bit -> RECEIVE_UPDATE_DATA BAD_MEASUREMENT,
    naming the page, here one in the middle of a batch), cancel resumes the source
    (SEND_CANCEL: RUNNING, untouched), the half-received target torn down with its ASID
    freed, and a new migration to another target then works."""
    from handoff.protocol import remote

    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    capture = tmp_path / "stream.bin"
    result = await migrate_qmp(
        source, uri=address, **{"x-tamper-page": 1, "x-record-frames": str(capture)}
    )
    assert result["status"] == "failed", result
    assert result["recovery"] == "cancel-and-resume"
    assert "RECEIVE_UPDATE_DATA" in result["error"] and "0xb" in result["error"], result
    messages = [remote.decode(f) for f in read_frames(capture)]
    # Pages 0 to VCPUS, the launch image and the journals, are private whatever the guest
    # did (its flip pages follow them): page 1 is in the middle of the first batch.
    first = next(m for m in messages if isinstance(m, remote.EncryptedPages))
    assert first.seq == 0 and len(first.gpas) >= 3
    assert f"the page at {first.gpas[1]:#x} failed" in result["error"], result
    assert await wait_exit(target) == 1  # it tore its copy down and gave up
    no_guest_left(b)
    assert a.vm_states() == ["RUNNING"]  # SEND_CANCEL: SUPDATE -> RUNNING
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == [], source.log()

    # Another target on the same host: the migration completes.
    again, address = start_target(b, pki["target"], "target2")
    code, result, err = await trio.to_thread.run_sync(run_migrate, source.control, address)
    assert code == 0 and result["status"] == "completed", (result, err, again.log())
    await wait_gone(source)
    assert b.vm_states() == ["RUNNING"]
    report = await _continuous(source, again)
    assert report.problems(VCPUS) == []


async def _continuous(source: VmmProcess, target: VmmProcess) -> Any:
    """Wait until the target printed 3 more lines per vCPU than the source did; the combined
    report (source's log then the target's)."""
    before = SerialTail().read(source.serial_logs).last_seq()
    with trio.fail_after(20):
        while True:
            report = SerialTail().read([*source.serial_logs, *target.serial_logs])
            last = report.last_seq()
            assert not report.panics, target.log()
            if all(last.get(v, -1) >= before.get(v, -1) + 3 for v in range(VCPUS)):
                return report
            await trio.sleep(0.05)


@pytest.mark.parametrize("how", ["migrate_cancel", "ctrl-c", "target-killed", "target-hung"])
async def test_a_migration_stopped_before_send_finish_leaves_the_guest_running_here(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], how: str
) -> None:
    """Checklist: cancel resumes the source (migrate_cancel, Ctrl-C of `handoff migrate`, a
    dead target, a hung one: the timeout): SEND_CANCEL, the guest runs on untouched; the
    half-received target torn down (ASID freed)."""
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]), "--handoff-timeout", "2")
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "handoff", "migrate", "--control", source.control,
            "--to", address, "--json", "--x-min-rounds", "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        with trio.fail_after(30):
            while "round 3:" not in (line := await trio.to_thread.run_sync(proc.stderr.readline)):
                assert line, "handoff migrate ended early"
        # The source streams its rounds without waiting for the target's RECEIVE_START (the
        # stream waits in the socket meanwhile), so the target may still be starting.
        with trio.fail_after(20):
            while not (a.vm_states() == ["SUPDATE"] and b.vm_states() == ["RUPDATE"]):
                await trio.sleep(0.02)
        if how == "migrate_cancel":
            await source.qmp("migrate_cancel")
        elif how == "ctrl-c":
            proc.send_signal(2)
        elif how == "target-killed":
            target.kill_all()
        else:
            assert target.process is not None
            target.process.send_signal(19)  # SIGSTOP: it holds the connection, reads nothing
        out, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        assert "round 3:" in line, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out)
    assert proc.returncode == 1
    cancelled = how in ("migrate_cancel", "ctrl-c")
    assert result["status"] == ("cancelled" if cancelled else "failed"), result
    assert result["recovery"] == "cancel-and-resume"
    if how == "target-hung":
        assert "took no data" in result["error"] or "did not answer" in result["error"]
        target.kill_all()  # its host's own business; the source resumed without it
        with trio.fail_after(10):
            while b.kvm.stats()["vms"]:
                await trio.sleep(0.05)
    elif how != "target-killed":
        assert await wait_exit(target) == 1
    no_guest_left(b)
    assert a.vm_states() == ["RUNNING"]
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == [], source.log()


# ---- the captured stream: confidentiality on the wire, and a replay ---------------------------


def _kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """SP 800-108 counter mode over HMAC-SHA256, written out here (reference 1.5), apart from
    the firmware's code: the stream must decrypt with the spec alone."""
    import hashlib
    import hmac

    out, i = b"", 1
    while len(out) < length:
        data = (
            i.to_bytes(4, "little") + label + b"\0" + context + (length * 8).to_bytes(4, "little")
        )
        out += hmac.new(key, data, hashlib.sha256).digest()
        i += 1
    return out[:length]


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def read_frames(path: Path) -> list[bytes]:
    data, frames, at = path.read_bytes(), [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        frames.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return frames


async def test_the_stream_carries_no_plaintext_private_page_or_key_and_a_replay_is_refused(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], amd_root: Path, tmp_path: Path
) -> None:
    """Checklist: confidentiality on the wire (no plaintext private page, TEK or TIK in the
    frames; the stream decrypts offline with the target's PDH private key alone, by the spec);
    anti-cloning (the session burnt: the same stream replayed to a second target on that
    host is refused before RECEIVE_START, while the firmware alone would take it)."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.asymmetric import ec

    from handoff.protocol import remote
    from handoff.transport import tcp
    from kvmstub.guest import GuestParams, build_launch_image
    from kvmstub.keystore import load_or_create_platform, load_or_create_root

    a, b = hosts
    sessions = str(b.dir / "sev-sessions")
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"], "target", "--sev-sessions", sessions)
    capture = tmp_path / "stream.bin"
    result = await migrate_qmp(source, uri=address, **{"x-record-frames": str(capture)})
    assert result["status"] == "completed", (result, target.log())
    frames = read_frames(capture)
    stream = capture.read_bytes()
    messages = [remote.decode(f) for f in frames]
    start = next(m for m in messages if isinstance(m, remote.SendStart))

    # The target platform's PDH private key (its keystore) and the source's PDH certificate.
    platform = load_or_create_platform(b.dir / "sev-state", load_or_create_root(amd_root))
    field = start.source_pdh[16 : 16 + 1028]
    x = int.from_bytes(field[4:76], "little")
    y = int.from_bytes(field[76:148], "little")
    peer = ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    shared = platform.keys.pdh.exchange(ec.ECDH(), peer)
    blob = start.session
    master = _kdf(shared, b"sev-master-secret", blob[0:16], 16)
    kek, kik = _kdf(master, b"sev-kek", b"", 16), _kdf(master, b"sev-kik", b"", 16)
    assert hmac.new(kik, blob[16:48], hashlib.sha256).digest() == blob[64:96]
    tek_tik = _aes_ctr(kek, blob[48:64], blob[16:48])
    tek, tik = tek_tik[:16], tek_tik[16:]

    plaintexts: dict[int, bytes] = {}
    packets = [p for m in messages if isinstance(m, remote.EncryptedPages) for p in m.packets()]
    for gpa, header, data in packets:
        iv, mac = header[4:20], header[20:52]
        signed = b"\x02" + header[0:4] + iv + (4096).to_bytes(4, "little") * 2 + data
        assert hmac.new(tik, signed, hashlib.sha256).digest() == mac
        plaintexts[gpa] = _aes_ctr(tek, iv, data)
    image = build_launch_image(GuestParams(vcpus=VCPUS, line_every=50, flip_every=10))
    assert plaintexts[0][: len(image)] == image  # the launch image, decrypted offline
    for secret in (tek, tik, master, kek, kik):
        assert secret not in stream
    for gpa, page in plaintexts.items():
        for at in range(0, 4096, 512):
            window = page[at : at + 32]
            if window.strip(b"\0"):
                assert window not in stream, f"plaintext of private page {gpa:#x} on the wire"

    # The same stream to a second target on the same host: refused at SendStart.
    second, address2 = start_target(b, pki["target"], "target2", "--sev-sessions", sessions)
    channel = await tcp.connect(address2, pki["source"])
    try:
        replay = iter(frames)
        await channel.send(next(replay))  # Hello
        assert isinstance(remote.decode(await channel.receive() or b""), remote.Hello)
        await channel.send(next(replay))  # Describe
        assert isinstance(remote.decode(await channel.receive() or b""), remote.PlatformChain)
        await channel.send(frames[[type(m) for m in messages].index(remote.SendStart)])
        with trio.fail_after(10):
            while (frame := await channel.receive()) is not None:
                assert not isinstance(remote.decode(frame), remote.Received)
    except Exception as exc:  # the target may reset the connection: that is a refusal too
        assert "reset" in str(exc) or "closed" in str(exc) or "abort" in str(exc), exc
    finally:
        channel.abort()
    assert await wait_exit(second) == 1
    assert "was received before" in second.log(), second.log()
    assert b.vm_states() == ["RUNNING"]  # only the first target's guest


@pytest.mark.parametrize("cut", ["after-received", "after-send-finish"])
async def test_a_target_in_doubt_holds_the_guest_until_the_source_decides(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], cut: str
) -> None:
    """The recovery table past Received: the connection breaks; the target holds the guest
    unrunnable (RUPDATE) and the source's decision arrives on a new connection (Resolve):
    before SEND_FINISH it cancelled and resumed, so the target tears down; after it, it is
    SENT, so the target finishes and runs. Either way exactly one copy runs."""
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    result = await migrate_qmp(source, uri=address, **{"x-break": cut})
    if cut == "after-received":
        assert result["status"] == "failed" and result["recovery"] == "cancel-and-resume"
        assert await wait_exit(target) == 1  # the held guest torn down on "cancel"
        assert "holding the received guest" in target.log()
        no_guest_left(b)
        assert a.vm_states() == ["RUNNING"]
        report = await source.wait_lines(3)
        assert report.problems(VCPUS) == [], source.log()
    else:
        assert result["status"] == "completed", (result, source.log(), target.log())
        await wait_gone(source)
        assert "holding the received guest" in target.log()
        assert b.vm_states() == ["RUNNING"]
        no_guest_left(a)
        report = await _continuous(source, target)
        assert report.problems(VCPUS) == []


async def test_sigterm_of_the_source_during_pre_copy_cancels_and_stops_the_guest_here(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles]
) -> None:
    """A stop before the commit point cancels the migration (SEND_CANCEL) and stops the guest
    where it runs, here; the target tears its half down. Nothing is left on either host."""
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    from handoff.qmp.client import QMPClient

    async with await QMPClient.connect(source.control) as qmp:
        await qmp.execute("migrate", {"uri": address, "x-min-rounds": 1000})
        while (await qmp.next_event("MIGRATION")).data.get("round", 0) < 3:
            pass
        assert source.process is not None
        source.process.terminate()
        with trio.fail_after(20):
            while True:
                data = dict((await qmp.next_event("MIGRATION")).data)
                if data.get("status") != "active":
                    break
    assert data["status"] == "cancelled" and data["recovery"] == "cancel-and-resume", data
    assert await wait_exit(source) == 0
    assert await wait_exit(target) == 1
    no_guest_left(a)
    no_guest_left(b)


async def test_a_target_under_another_amd_root_is_refused_by_send_start_for_a_sev_policy(
    tmp_path: Path, amd_root: Path, pki: dict[str, TlsFiles]
) -> None:
    """Checklist: a source told to send to an unvouched PDH with policy SEV refuses: the
    target's chain does not lead to this firmware's AMD root (INVALID_CERTIFICATE), nothing of
    the guest is sent, it keeps running here, and the target drops what it prepared."""
    foreign_root = tmp_path / "foreign-root"
    foreign_root.mkdir(mode=0o700)
    hosts = [Host(tmp_path / "host-a", amd_root)]
    try:
        hosts.append(Host(tmp_path / "host-c", foreign_root))
        for host in hosts:
            host.ready()
    except BaseException:
        for host in hosts:
            with contextlib.suppress(AssertionError):
                host.stop()
        raise
    a, c = hosts
    try:
        source = a.vmm("source", *tls_flags(pki["source"]), "--policy", "0x20")  # SEV
        source.start()
        await source.wait_lines(2)
        target, address = start_target(c, pki["target"], "target", "--policy", "0x20")
        result = await migrate_qmp(source, uri=address)
        assert result["status"] == "failed" and result["recovery"] == "nothing-to-do", result
        assert "SEND_START" in result["error"] and "0x6" in result["error"], result
        assert result["pages"] == 0
        assert await wait_exit(target) == 1
        no_guest_left(c)
        assert a.vm_states() == ["RUNNING"]
        report = await source.wait_lines(3)
        assert report.problems(VCPUS) == [], source.log()
    finally:
        a.stop()
        c.stop()


# ---- the owner's allow-list of target platforms ----------------------------------------------


def platform_of(host: Host) -> str:
    """The platform id `kvmstub stats --json` shows (the SHA-256 of the host's PDH)."""
    return str(host.kvm.stats()["platform"]["pdh_fingerprint"])


async def test_an_allow_list_of_target_platforms_refuses_others_before_send_start(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    """A target whose platform is not in every allow-list given (the VM's `run
    --target-platform`, the command's) is refused before SEND_START, naming the platform it saw:
    nothing sent, the guest runs on here, the target drops what it prepared. Listed in both
    (the command's from a file), the migration completes."""
    a, b = hosts
    b_id, a_id = platform_of(b), platform_of(a)
    source = a.vmm(
        "source",
        *tls_flags(pki["source"]),
        "--target-platform",
        b_id.upper(),
        "--target-platform",
        "ab" * 32,
    )
    source.start()
    await source.wait_lines(2)
    poller = StatePoller(a)
    target, address = start_target(b, pki["target"])
    try:
        code, result, err = await trio.to_thread.run_sync(
            run_migrate, source.control, address, "--target-platform", a_id
        )
    finally:
        seen = poller.stop()
    assert code == 1 and result["status"] == "failed", (result, err)
    assert result["recovery"] == "nothing-to-do" and result["pages"] == 0
    assert f"target's SEV platform {b_id} is not in the owner's allow-list" in result["error"]
    assert result["target-platform"] == b_id
    assert "SUPDATE" not in seen, seen  # SEND_START never ran
    assert await wait_exit(target) == 1
    no_guest_left(b)
    assert a.vm_states() == ["RUNNING"]
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == [], source.log()

    # Listed by the VM and by the command (a file, with a comment): it completes.
    listed = tmp_path / "platforms"
    listed.write_text(f"# host b\n{b_id}\n\n{a_id}  # host a\n")
    again, address = start_target(b, pki["target"], "target2")
    code, result, err = await trio.to_thread.run_sync(
        run_migrate, source.control, address, "--target-platforms", str(listed)
    )
    assert code == 0 and result["status"] == "completed", (result, err, again.log())
    assert result["target-platform"] == b_id
    await wait_gone(source)
    report = await _continuous(source, again)
    assert report.problems(VCPUS) == []


def _handoff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handoff", *args], capture_output=True, text=True, timeout=60
    )


async def test_a_malformed_target_platform_is_refused_before_anything_starts(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    """Malformed ids are refused with what an id is and where to find one: the migrate flag,
    a line of its file (named), the run flag, and QMP migrate's argument; the guest runs on."""
    a, _b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    to = f"tcp:{TARGET_HOST}:9"
    proc = _handoff("migrate", "--control", source.control, "--to", to, "--target-platform", "xyz")
    assert proc.returncode == 2 and "64 hex digits" in proc.stderr, proc.stderr
    bad = tmp_path / "platforms"
    bad.write_text(f"{'0' * 64}\nnot-an-id\n")
    proc = _handoff(
        "migrate", "--control", source.control, "--to", to, "--target-platforms", str(bad)
    )
    assert proc.returncode == 2 and "line 2" in proc.stderr and "64 hex digits" in proc.stderr
    bad.write_text("# nothing but a comment\n")
    proc = _handoff(
        "migrate", "--control", source.control, "--to", to, "--target-platforms", str(bad)
    )
    assert proc.returncode == 2 and "would allow any" in proc.stderr, proc.stderr
    proc = _handoff("run", "--name", "x", "--target-platform", "0" * 63)
    assert proc.returncode == 2 and "--target-platform" in proc.stderr, proc.stderr

    from handoff.qmp.client import QMPClient, QMPError

    async with await QMPClient.connect(source.control) as qmp:
        for value in (["0" * 64, "nope"], "0" * 64, [7]):
            with pytest.raises(QMPError, match="target-platforms"):
                await qmp.execute("migrate", {"uri": to, "target-platforms": value})
    assert a.vm_states() == ["RUNNING"]
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == []


# ---- a target whose source host is dead: the operator decides --------------------------------


def resolve(control: str, *flags: str) -> tuple[int, dict[str, Any], str]:
    proc = _handoff("resolve", "--control", control, "--json", *flags)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.mark.parametrize(
    ("dies", "decision"),
    [("kill-after-send-finish", "finish"), ("kill-after-received", "give-up")],
)
async def test_a_target_whose_source_died_in_doubt_is_finished_or_given_up_by_the_operator(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles], dies: str, decision: str
) -> None:
    """The source VMM is SIGKILLed at the in-doubt point (after Received; after SEND_FINISH,
    before Commit), as when its host loses power: no decision ever comes, and the target holds
    the guest unrunnable. The operator, having fenced the source host, tells the target: finish
    (the guest's seq goes on from where it stopped on the source) or give up (torn down, ASID
    freed). Nothing is decided without --source-fenced for a finish, or where nothing is held."""
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    code, result, err = await trio.to_thread.run_sync(resolve, target.control, "--give-up")
    assert code == 1 and "holds no received guest" in result["error"], (result, err)

    from handoff.qmp.client import QMPClient

    async with await QMPClient.connect(source.control) as qmp:
        await qmp.execute("migrate", {"uri": address, "x-break": dies})
    assert await wait_exit(source) == -9
    with trio.fail_after(20):
        while "holding the received guest" not in target.log():
            await trio.sleep(0.05)
    assert (await target.qmp("query-migrate"))["status"] == "held"
    status = await trio.to_thread.run_sync(_handoff, "status", "--control", target.control)
    assert "HELD here in doubt" in status.stdout and "--source-fenced" in status.stdout, status
    assert b.vm_states() == ["RUPDATE"]  # received whole, unrunnable
    no_guest_left(a)  # the source's VM died with its VMM

    if decision == "finish":
        # Another source is refused by the holder, which holds on.
        other = a.vmm("source2", *tls_flags(pki["source"]))
        other.start()
        await other.wait_lines(1)
        code, result, err = await trio.to_thread.run_sync(run_migrate, other.control, address)
        assert code == 1 and "holds a received guest" in result["error"], (result, err)
        assert b.vm_states() == ["RUPDATE"] and target.alive_pids()
        proc = _handoff("resolve", "--control", target.control, "--finish")
        assert proc.returncode == 2 and "--source-fenced" in proc.stderr, proc.stderr
        assert b.vm_states() == ["RUPDATE"]  # still held
        code, result, err = await trio.to_thread.run_sync(
            resolve, target.control, "--finish", "--source-fenced"
        )
        assert code == 0 and result["outcome"] == "running", (result, err, target.log())
        assert b.vm_states() == ["RUNNING"]
        report = await _continuous(source, target)
        assert report.problems(VCPUS) == [], target.log()
        status = await target.qmp("query-status")
        assert status["status"] == "running"
    else:
        code, result, err = await trio.to_thread.run_sync(resolve, target.control, "--give-up")
        assert code == 0 and result["outcome"] == "torn-down", (result, err, target.log())
        assert await wait_exit(target) == 1
        no_guest_left(b)


# --- auto-converge ------------------------------------------------------------------------------

# A link this slow (a test knob: each pre-copy round is stretched to this many pages a second)
# and a 1 ms downtime limit: the budget is under one page, so only a round in which the guest
# wrote nothing lets the migration stop. A guest that runs always writes its journal pages.
SLOW_LINK = ("--x-link-pages-per-s", "20", "--downtime-limit", "1")


async def test_a_guest_outrunning_the_link_converges_once_its_vcpus_are_throttled(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles]
) -> None:
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    code, result, err = await trio.to_thread.run_sync(
        run_migrate, source.control, address, *SLOW_LINK, "--cpu-throttle-increment", "20"
    )
    assert code == 0, f"{result}\n{err}\nsource:\n{source.log()}\ntarget:\n{target.log()}"
    assert result["status"] == "completed" and result["auto-converge"] is True
    throttle = result["throttle-per-round"]
    assert len(throttle) == result["rounds"] == len(result["pages-per-round"])
    assert result["rounds"] <= 30, result  # stopped before the round cap
    # Two rounds outran the link, then 20 %, 40 %, ... up to the cap (99 %), never down.
    assert throttle[:2] == [0, 0] and throttle[2] == 20, throttle
    assert throttle == sorted(throttle) and set(throttle) <= {0, 20, 40, 60, 80, 99}, throttle
    assert result["cpu-throttle-percentage"] == 0  # lifted once it ended
    assert "vCPUs throttled 20 %" in err  # the progress line
    await wait_gone(source)
    report = await _continuous(source, target)
    assert report.problems(VCPUS) == []


async def test_without_auto_converge_the_round_cap_ends_the_pre_copy(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles]
) -> None:
    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    target, address = start_target(b, pki["target"])
    code, result, err = await trio.to_thread.run_sync(
        run_migrate, source.control, address, *SLOW_LINK, "--no-auto-converge"
    )
    assert code == 0, f"{result}\n{err}\nsource:\n{source.log()}\ntarget:\n{target.log()}"
    assert result["auto-converge"] is False
    assert result["rounds"] == 31, result  # MAX_PRECOPY_ROUNDS, then the stop-and-copy
    assert set(result["throttle-per-round"]) == {0}
    assert "throttled" not in err
    await wait_gone(source)
    report = await _continuous(source, target)
    assert report.problems(VCPUS) == []


async def test_a_cancel_while_throttled_leaves_the_guest_here_at_full_speed(
    hosts: tuple[Host, Host], pki: dict[str, TlsFiles]
) -> None:
    from handoff.qmp.client import QMPClient

    a, b = hosts
    source = a.vmm("source", *tls_flags(pki["source"]))
    source.start()
    await source.wait_lines(2)
    _, address = start_target(b, pki["target"])
    args = {
        "uri": address,
        "downtime-limit": 1,
        "x-link-pages-per-s": 20,
        "x-min-rounds": 1000,
        "cpu-throttle-initial": 99,
    }
    async with await QMPClient.connect(source.control) as qmp:
        await qmp.execute("migrate", args)
        with trio.fail_after(60):
            while (await qmp.next_event("MIGRATION")).data.get("cpu-throttle-percentage") != 99:
                pass
        assert (await qmp.execute("query-migrate"))["cpu-throttle-percentage"] == 99
        await qmp.execute("migrate_cancel")
        with trio.fail_after(30):
            while (data := dict((await qmp.next_event("MIGRATION")).data))["status"] == "active":
                pass
        assert data["status"] == "cancelled" and data["recovery"] == "cancel-and-resume", data
        assert data["cpu-throttle-percentage"] == 0
        assert (await qmp.execute("query-migrate"))["cpu-throttle-percentage"] == 0
    no_guest_left(b)
    assert a.vm_states() == ["RUNNING"]
    report = await source.wait_lines(3)
    assert report.problems(VCPUS) == [], source.log()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"auto-converge": "yes"}, "'auto-converge' must be true or false"),
        ({"auto-converge": False, "max-cpu-throttle": 50}, "'max-cpu-throttle' sets"),
        ({"cpu-throttle-initial": 0}, "'cpu-throttle-initial' must be a whole percentage"),
        ({"cpu-throttle-increment": "10"}, "'cpu-throttle-increment' must be a whole"),
        ({"cpu-throttle-initial": 60, "max-cpu-throttle": 50}, "exceeds 'max-cpu-throttle'"),
    ],
)
def test_qmp_migrate_refuses_auto_converge_arguments_with_a_reason(
    args: dict[str, Any], error: str
) -> None:
    from handoff.process.app import App
    from handoff.qmp.server import QMPCommandError

    with pytest.raises(QMPCommandError, match=re.escape(error)):
        App._auto_converge_args(args)


def test_qmp_migrate_auto_converge_defaults_are_qemus() -> None:
    from handoff.process.app import App

    assert App._auto_converge_args({}) == {
        "auto_converge": True,
        "throttle_initial": 20,
        "throttle_increment": 10,
        "throttle_max": 99,
    }
    assert App._auto_converge_args({"auto-converge": False})["auto_converge"] is False


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        ([], {}),
        (["--no-auto-converge"], {"auto-converge": False}),
        (
            ["--cpu-throttle-initial", "30", "--cpu-throttle-increment", "5"],
            {"cpu-throttle-initial": 30, "cpu-throttle-increment": 5},
        ),
        (["--no-auto-converge", "--cpu-throttle-initial", "30"], "--cpu-throttle-initial sets"),
        (["--cpu-throttle-initial", "60", "--max-cpu-throttle", "50"], "exceeds --max-cpu"),
    ],
)
def test_handoff_migrate_flags_become_qmp_arguments_or_a_clear_error(
    flags: list[str], expect: dict[str, Any] | str
) -> None:
    from handoff.machine.config import ConfigError
    from handoff.process.flags import build_parser, migrate_args

    ns = build_parser().parse_args(["migrate", "vm", "--to", "tcp:127.0.0.3:1", *flags])
    if isinstance(expect, str):
        with pytest.raises(ConfigError, match=re.escape(expect)):
            migrate_args(ns)
    else:
        assert migrate_args(ns) == expect


@pytest.mark.parametrize("value", ["0", "100", "ten"])
def test_handoff_migrate_refuses_a_throttle_outside_1_to_99(value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "handoff", "migrate", "vm", "--to", "tcp:127.0.0.3:1",
         "--max-cpu-throttle", value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--max-cpu-throttle" in proc.stderr
    assert "1 to 99" in proc.stderr or "whole number" in proc.stderr
