"""`handoff upgrade` against a hostile neighbour of the same uid, and a stop that comes in the
middle of one (issue 14, items 1 and 6, and parts of 9).

The hijack test runs kvmstub, the VMMs and the attacker as one ordinary uid (nobody, through
setpriv) with real processes, so it needs root to start them and is skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.qmp.client import QMPClient, QMPError
from handoff.testing import VmmProcess, pid_alive, start_kvmstub_daemon

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
needs_root = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="running the VMMs and the attacker as another uid needs root and setpriv",
)
# What nobody runs: the test's own modules, on an interpreter nobody may execute (a venv's
# interpreter may live under a home directory nobody cannot reach, and a VMM execs its own
# interpreter to start its successor).
NOBODY_ENV = {
    "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *(p for p in sys.path if "site-packages" in p)]
    ),
    "PYTHONDONTWRITEBYTECODE": "1",
}


def nobody_python() -> str:
    """An interpreter that nobody can run and that can start itself again as nobody."""
    probe = (
        "import subprocess, sys; "
        "subprocess.run([sys.executable, '-c', 'import handoff.process.app'], check=True)"
    )
    for candidate in (
        sys.executable,
        f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
    ):
        done = subprocess.run(
            [*AS_NOBODY, candidate, "-c", probe],
            env={**os.environ, **NOBODY_ENV}, capture_output=True, cwd="/",
        )  # fmt: skip
        if done.returncode == 0:
            return candidate
    pytest.skip("no Python interpreter that nobody may run with these modules")


# --- a raw QMP client: it talks to a VMM of another uid whatever checks the CLI's client adds --


class RawQMP:
    def __init__(self, path: str, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("the VMM closed the QMP connection")
        return dict(json.loads(line))

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(reply["error"].get("desc"))
            else:
                return reply.get("return")

    def next_handoff_event(self) -> dict[str, Any]:
        while True:
            event = self.events.pop(0) if self.events else self._read()
            if event.get("event") == "HANDOFF":
                return dict(event["data"])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def qmp(path: str, command: str, args: dict[str, Any] | None = None) -> Any:
    client = RawQMP(path)
    try:
        return client.execute(command, args)
    finally:
        client.close()


# --- the same-uid attacker ---------------------------------------------------------------------

# Runs as the VMMs' uid. It watches $TMPDIR for an upgrade's private directory, takes the
# successor's socket path for itself (before or after the successor listens there), steals the
# one-time token wherever it can be read (a file beside the socket, or the successor's inherited
# fd through /proc), and answers the old VMM as a target would. It watches until its stdin
# closes (or the time it is given runs out), answers what is still queued, and reports what
# reached it.
_ATTACKER = r"""
import json, os, re, secrets, select, socket, sys, time
from handoff import protocol

tmp, name, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
report = {"bound": [], "token": False, "connections": 0, "fds": 0, "got": [], "refusals": []}
listeners = {}

def steal(directory):
    try:
        with open(os.path.join(directory, "token"), "rb") as f:
            data = f.read().strip()
            if data:
                return data
    except OSError:
        pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(directory in a for a in argv):
            continue
        for i, a in enumerate(argv):
            if a.startswith("--token-fd"):
                fd = a.partition("=")[2] or argv[i + 1]
                try:
                    r = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
                    data = os.read(r, 4096).strip()
                    os.close(r)
                    if data:
                        return data
                except OSError:
                    pass
    return None

def serve(conn, directory):
    conn.settimeout(10)
    token = None
    for _ in range(200):
        token = steal(directory)
        if token:
            break
        time.sleep(0.005)
    report["token"] = report["token"] or token is not None
    data = conn.recv(1 << 16)
    if not data:
        return  # a probe (the successor checking whether its path is taken)
    report["connections"] += 1
    msg = protocol.decode(data)
    report["got"].append(type(msg).__name__)
    if isinstance(msg, protocol.Refuse):
        report["refusals"].append(msg.reason)
        return
    tc = protocol.HandoffConnection(protocol.Role.TARGET)
    tc.receive(data, 0)
    proof = protocol.token_proof(token, msg.nonce, protocol.Role.TARGET) if token else b""
    features = (protocol.TOKEN_FEATURE,) if token else ()
    conn.send(tc.send(tc.make_hello(vm_name=msg.vm_name, vm_uuid=msg.vm_uuid,
                                    nonce=secrets.token_bytes(32), features=features,
                                    proof=proof)))
    data, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(80 * 4))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for i in range(0, len(payload) - len(payload) % 4, 4):
                report["fds"] += 1
                os.close(int.from_bytes(payload[i:i + 4], sys.byteorder))
    if data:
        msg = protocol.decode(data)
        report["got"].append(type(msg).__name__)
        if isinstance(msg, protocol.Refuse):
            report["refusals"].append(msg.reason)

def answer(directory, s):
    try:
        conn, _ = s.accept()
    except (BlockingIOError, OSError):
        return False
    with conn:
        try:
            serve(conn, directory)
        except (OSError, protocol.ProtocolError) as exc:
            report["got"].append(f"error: {exc}")
    return True

print("watching", flush=True)
while time.monotonic() < until and not select.select([sys.stdin], [], [], 0)[0]:
    for entry in os.listdir(tmp):
        directory = os.path.join(tmp, entry)
        if not entry.startswith(f"handoff-{name}-") or directory in listeners:
            continue
        path = os.path.join(directory, "incoming.sock")
        try:
            os.unlink(path)
        except OSError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.bind(path)
            s.listen(16)
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        listeners[directory] = s
        report["bound"].append(path)
    for directory, s in list(listeners.items()):
        answer(directory, s)
    time.sleep(0.001)
for directory, s in list(listeners.items()):  # connections queued when the watch ended
    while answer(directory, s):
        pass
print(json.dumps(report), flush=True)
"""


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A short directory owned by nobody (mode 0700): its kvmstub, VMMs, sockets and $TMPDIR."""
    path = Path(tempfile.mkdtemp(prefix="hh-"))
    for sub in ("tmp",):
        (path / sub).mkdir(mode=0o700)
    for p in (path, path / "tmp"):
        os.chown(p, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_kvmstub_as_nobody(directory: Path, python: str) -> subprocess.Popen[str]:
    sock = directory / "kvm.sock"
    log = open(directory / "kvmstub.log", "w")  # noqa: SIM115 (the child owns it from here)
    with log:
        proc = subprocess.Popen(
            [*AS_NOBODY, python, "-m", "kvmstub.cli", "serve", "--socket", str(sock)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True, env={**os.environ, **NOBODY_ENV}, cwd="/",
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("kvmstub: ready"), (directory / "kvmstub.log").read_text()
    return proc


def vmm_as_nobody(directory: Path, python: str, **kwargs: Any) -> VmmProcess:
    env = {"TMPDIR": str(directory / "tmp"), **NOBODY_ENV}
    vmm = VmmProcess(directory, directory / "kvm.sock", env=env, **kwargs)
    assert vmm.argv[0] == sys.executable
    vmm.argv = [*AS_NOBODY, python, *vmm.argv[1:]]
    vmm.start()
    return vmm


@needs_root
async def test_a_same_uid_process_cannot_take_the_guest_during_an_upgrade(
    nobody_dir: Path,
) -> None:
    python = nobody_python()
    kvmstub = start_kvmstub_as_nobody(nobody_dir, python)
    vmm: VmmProcess | None = None
    attacker: subprocess.Popen[str] | None = None
    try:
        vmm = vmm_as_nobody(nobody_dir, python, name="web", mode="sev-es", vcpus=2)
        await vmm.wait_lines()
        old_pid = qmp(vmm.control, "query-status")["pid"]
        attacker = subprocess.Popen(
            [*AS_NOBODY, python, "-c", _ATTACKER, str(nobody_dir / "tmp"), "web", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **NOBODY_ENV}, cwd="/",
        )  # fmt: skip
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "watching"
        results = []
        for _ in range(3):
            client = RawQMP(vmm.control)
            try:
                started = client.execute("upgrade", {"set": []})
                vmm.pids.append(started["pid"])
                while (data := client.next_handoff_event())["status"] not in (
                    "completed",
                    "failed",
                ):
                    pass
            finally:
                client.close()
            results.append((started, data))
            await vmm.settle()
        # Closing its stdin ends the watch: the three upgrades are over.
        out, err = attacker.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        # The attacker was in place, and reached by the old VMM...
        assert report["bound"], (report, err)
        assert report["connections"] >= 1, (report, err, vmm.log())
        # ...but no fd ever crossed to it: it was refused before the Hello, by its pid.
        assert report["fds"] == 0, (report, vmm.log())
        assert "Describe" not in report["got"], report
        assert report["refusals"], report
        assert all("not the successor" in r for r in report["refusals"]), report
        for _started, data in results:
            if data["status"] == "failed":
                assert "not the successor" in data["error-desc"], data
                assert data.get("recovery", "none") == "none", data
        # The guest stays with the chain: the old VMM, or a successor it spawned itself.
        status = qmp(vmm.control, "query-status")
        spawned = {started["pid"] for started, _ in results}
        assert status["pid"] in spawned | {old_pid}
        assert status["status"] == "running"
        report_lines = await vmm.wait_lines()
        assert report_lines.problems(vmm.vcpus) == [], vmm.log()
        # With the attacker gone, the chain upgrades as ever; the result names the process
        # that took the guest, as the kernel saw it.
        client = RawQMP(vmm.control)
        try:
            started = client.execute("upgrade", {"set": []})
            vmm.pids.append(started["pid"])
            while (data := client.next_handoff_event())["status"] not in ("completed", "failed"):
                pass
        finally:
            client.close()
        assert data["status"] == "completed", (data, vmm.log())
        assert data["successor-pid"] == started["pid"] == qmp(vmm.control, "query-status")["pid"]
        assert (await vmm.wait_lines()).problems(vmm.vcpus) == []
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.communicate()
        if vmm is not None:
            vmm.kill_all()
        kvmstub.kill()
        kvmstub.communicate()


# --- a stop (SIGTERM) in the middle of an upgrade ------------------------------------------------


def live_vms(daemon: Any) -> list[dict[str, Any]]:
    return [vm for vm in daemon.stats()["vms"] if not vm["dead"] and vm["vcpus"]]


async def wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    """Until none of `pids` is alive; those still alive after `timeout`."""
    with trio.move_on_after(timeout):
        while any(pid_alive(p) for p in pids):
            await trio.sleep(0.02)
    return [p for p in pids if pid_alive(p)]


async def upgrade_with_sigterm_at(vmm: VmmProcess, fault: str, at: str) -> dict[str, Any]:
    """Upgrade `vmm` with the successor armed with `fault`; SIGTERM the old VMM when the
    HANDOFF event `at` arrives; the final event's data (with the successor's pid)."""
    old_pid = await vmm.pid()
    async with await QMPClient.connect(vmm.control) as client:
        started = await client.execute("upgrade", {"set": [f"x-fault={fault}"]})
        vmm.pids.append(started["pid"])
        while True:
            data = dict((await client.next_event("HANDOFF")).data)
            if data["status"] == at:
                os.kill(old_pid, signal.SIGTERM)
            if data["status"] in ("completed", "failed"):
                return {**data, "spawned": started["pid"], "old": old_pid}


async def test_sigterm_before_the_pause_cancels_the_upgrade_and_stops_the_guest_here(
    vmm_factory: Any, kvmstub_daemon: Any
) -> None:
    vmm = vmm_factory(mode="sev-es", vcpus=2)
    await vmm.wait_lines()
    # The successor stops answering once it has the guest's description: the setup waits.
    result = await upgrade_with_sigterm_at(vmm, "target:describe:hang", "active")
    assert result["status"] == "failed", result
    assert "SIGTERM" in result["error-desc"], result
    assert result.get("recovery", "none") == "none", result
    assert await wait_gone([result["old"], result["spawned"]]) == [], vmm.log()
    assert "SIGTERM during a handoff's setup: cancelling the handoff" in vmm.log()
    assert not os.path.exists(vmm.control)
    assert live_vms(kvmstub_daemon) == []


async def test_sigterm_after_the_pause_passes_the_stop_to_the_successor(
    vmm_factory: Any, kvmstub_daemon: Any
) -> None:
    vmm = vmm_factory(mode="sev-es", vcpus=2)
    await vmm.wait_lines()
    # The successor takes a second to answer Commit: the stop comes inside the blackout.
    result = await upgrade_with_sigterm_at(vmm, "target:commit:slow", "device")
    assert result["status"] == "completed", (result, vmm.log())
    assert result["successor-pid"] == result["spawned"]
    # The guest does not run on in the successor: it stops there, cleanly.
    assert await wait_gone([result["old"], result["spawned"]]) == [], vmm.log()
    log = vmm.log()
    assert f"passed the stop on to the successor (pid {result['spawned']})" in log
    assert not os.path.exists(vmm.control)
    assert live_vms(kvmstub_daemon) == []


# --- smaller holes (issue 14, item 9) ----------------------------------------------------------


def private_dirs(vmm: VmmProcess) -> list[str]:
    tmp = tempfile.gettempdir()
    return sorted(e for e in os.listdir(tmp) if e.startswith(f"handoff-{vmm.name}-"))


async def test_exec_of_a_missing_program_names_it_and_leaves_nothing_behind(
    vmm_factory: Any, tmp_path: Path
) -> None:
    vmm = vmm_factory(mode="plain", vcpus=1)
    await vmm.wait_lines()
    pid = await vmm.pid()
    before = private_dirs(vmm)
    missing = str(tmp_path / "no-such-handoff")
    for _ in range(2):
        with pytest.raises(QMPError, match=f"{missing}.*does not exist"):
            await vmm.qmp("upgrade", set=[], exec=[missing])
    assert private_dirs(vmm) == before
    # A relative program would resolve against the VMM's working directory: refused.
    with pytest.raises(QMPError, match="not an absolute path"):
        await vmm.qmp("upgrade", set=[], exec=["bin/handoff"])
    assert private_dirs(vmm) == before
    assert await vmm.pid() == pid


async def test_the_cli_resolves_a_relative_exec_against_the_callers_directory(
    vmm_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmm = vmm_factory(mode="plain", vcpus=1)
    await vmm.wait_lines()
    # A wrapper in the caller's directory that runs this program: found from there.
    here = tmp_path / "caller"
    here.mkdir()
    wrapper = here / "handoff-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m handoff "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.chdir(here)
    result = await vmm.upgrade([], ["./handoff-wrapper"])
    assert result["status"] == "completed", (result, vmm.log())
    assert f"starting successor: {wrapper} run" in vmm.log()


@pytest.fixture(scope="module")
def refusing_vmm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmProcess]:
    """One plain VMM (on a kvmstub of its own) for every refused `set` below: a refusal comes
    before anything is spawned and changes nothing, which each case asserts, so the cases may
    share it in any order."""
    directory = Path(tempfile.mkdtemp(prefix="kvmstub-"))
    try:
        daemon = start_kvmstub_daemon(directory)
        try:
            workdir = tmp_path_factory.mktemp("refusing")
            vmm = VmmProcess(workdir, daemon.socket, name="refusing", mode="plain", vcpus=1)
            try:
                vmm.start()
                yield vmm
            finally:
                vmm.kill_all()
        finally:
            daemon.stop_and_check()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("help=1", "help"),
        ("h=", "help"),
        ("incoming=", "--incoming is set by the upgrade itself"),
        ("incoming=unix:/tmp/x.sock", "--incoming is set by the upgrade itself"),
        ("token-file=", "--token-file is set by the upgrade itself"),
        ("token-file=/etc/passwd", "--token-file is set by the upgrade itself"),
        ("--token-fd=5", "--token-fd is set by the upgrade itself"),
        ("uuid=", "--uuid is set by the upgrade itself"),
        ("inc=unix:/tmp/x.sock", "--incoming is set by the upgrade itself"),
    ],
)
async def test_a_set_that_names_a_flag_the_upgrade_controls_is_refused_before_spawning(
    refusing_vmm: VmmProcess, item: str, says: str
) -> None:
    vmm = refusing_vmm
    await vmm.wait_lines()
    pid = await vmm.pid()
    before = private_dirs(vmm)
    with pytest.raises(QMPError, match=re.escape(says)):
        await vmm.qmp("upgrade", set=[item])
    assert "starting successor" not in vmm.log()
    assert "usage:" not in vmm.log()
    assert private_dirs(vmm) == before
    assert await vmm.pid() == pid


HANDOFF_LINE = re.compile(r"handoff (\w+) completed: .* role (source|target), protocol (\d)")


@pytest.mark.parametrize("protocol", [3, 2, 1])
async def test_source_and_target_log_one_id_for_one_handoff(
    vmm_factory: Any, protocol: int
) -> None:
    vmm = vmm_factory(mode="sev", vcpus=1)
    await vmm.wait_lines()
    result = await vmm.upgrade([f"max-protocol={protocol}"])
    assert result["status"] == "completed", vmm.log()
    await vmm.settle()
    ids = {role: (hid, int(p)) for hid, role, p in HANDOFF_LINE.findall(vmm.log())}
    assert ids["source"] == ids["target"] == (result["id"], protocol), vmm.log()
    handoff = await vmm.qmp("query-handoff")
    assert handoff["role"] == "target" and handoff["id"] == result["id"]


async def test_a_vmm_whose_kvmstub_died_says_so(vmm_factory: Any, kvmstub_daemon: Any) -> None:
    vmm = vmm_factory(mode="plain", vcpus=2)
    await vmm.wait_lines()
    kvmstub_daemon.process.kill()
    kvmstub_daemon.process.wait()
    assert await wait_gone(vmm.pids) == []
    log = vmm.log()
    assert "kvmstub" in log and "is gone" in log, log
    assert "another VMM holds it now" not in log


_TOKEN_HOLDER_SOURCE = r"""
import json, secrets, socket, sys, uuid
from handoff import protocol
path, token = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect(path)
conn = protocol.HandoffConnection(protocol.Role.SOURCE)
try:
    s.send(conn.send(conn.make_hello(vm_name="vm", vm_uuid=uuid.uuid4(),
                                      nonce=secrets.token_bytes(32),
                                      features=(protocol.TOKEN_FEATURE,))))
except BrokenPipeError:
    pass  # refused at once: the refusal still waits to be read
try:
    data = s.recv(1 << 16)
except ConnectionResetError:  # closed with our Hello unread: reported before its Refuse
    data = s.recv(1 << 16)
msg = protocol.decode(data)
print(json.dumps({"type": type(msg).__name__, "reason": getattr(msg, "reason", "")}))
"""


async def test_a_spawned_successor_takes_a_guest_only_from_the_vmm_that_started_it(
    tmp_path: Path, kvmstub_daemon: Any
) -> None:
    """Even with the token (read from its pipe through /proc, say), a process of the same uid
    that is not the successor's ancestor cannot hand it a guest of its own."""
    token = b"t" * 64
    read_end, write_end = os.pipe()
    os.write(write_end, token)
    os.close(write_end)
    directory = tmp_path / "in"
    directory.mkdir(mode=0o700)
    path = directory / "incoming.sock"
    log_path = tmp_path / "successor.log"
    with open(log_path, "wb") as log:
        successor = subprocess.Popen(
            [sys.executable, "-m", "handoff", "run", "--kvm", str(kvmstub_daemon.socket),
             "--control", str(tmp_path / "c.qmp"), "--memory", "64M", "--handoff-timeout", "3",
             "--incoming", f"unix:{path}", "--token-fd", str(read_end)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, pass_fds=(read_end,),
        )  # fmt: skip
    os.close(read_end)
    try:
        with trio.fail_after(30):
            while not path.exists():
                await trio.sleep(0.01)
        done = subprocess.run(
            [sys.executable, "-c", _TOKEN_HOLDER_SOURCE, str(path), token.decode()],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert seen["type"] == "Refuse", (seen, log_path.read_text())
        assert "did not start this VMM" in seen["reason"]
        assert successor.wait(30) == 1
    finally:
        successor.kill()
        successor.wait()
