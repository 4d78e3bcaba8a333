"""Building blocks for two-process handoff tests, without pytest; `handoff.testing.plugin`
serves them as fixtures.

As a pytest plugin (`handoff.testing.plugin`, registered under the `pytest11` entry point, so
installing handoff with its test extra is all it takes; async tests need pytest-trio) they are:

- `kvmstub_daemon`: a fresh `kvmstub serve` for the test (`KvmstubDaemon`: `.socket`,
  `.stats()`); stopped with SIGTERM afterwards, which must exit 0 and remove its socket.
  `@pytest.mark.kvmstub_args("--sev-es-asids", "1")` passes daemon flags.
  `kvmstub_factory(directory, *flags)` starts more; `kvmstub_dir` is a short private directory.
- `vmm_factory(**kwargs)`: start a VM (`VmmProcess`: mode, vcpus, memory, ...) on that daemon;
  every VMM of its chain is killed after the test.
- `upgrade(vmm, *sets, exec_argv=None, expect="completed")`: one handoff to a successor
  process, checked, with the old VMM gone afterwards; returns the HANDOFF result.
- `serial_check(vmm, more=3, max_pause_us=None)`: wait for more serial lines, then assert the
  guest is whole (every vCPU's seq contiguous from 0, no PANIC) and, if asked, that no pause
  the guest itself reported exceeded a bound; returns the `SerialReport`.

    async def test_my_upgrade_keeps_the_guest(vmm_factory, upgrade, serial_check):
        vm = vmm_factory(mode="sev-es", vcpus=2)
        for _ in range(3):
            await upgrade(vm)
        await serial_check(vm)

Without pytest, the same pieces work by hand:

    vmm = VmmProcess(tmp_path, kvm_socket, mode="sev-es", vcpus=2)
    vmm.start()
    result = await vmm.upgrade()
    assert result["status"] == "completed"
    await vmm.wait_lines()
    assert vmm.report().problems(vmm.vcpus) == []
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from handoff.hv.kvmstub import read_stats
from handoff.process import ops
from handoff.process.flags import strip_flags
from handoff.qmp.client import QMPClient
from handoff.seriallog import SerialReport, SerialTail
from handoff.system.procs import pid_alive
from handoff.transport.unix import OwnedFds, fds_of

PROGRAM = [sys.executable, "-m", "handoff"]
_UCRED = struct.Struct("iII")


class VmmProcess:
    """A VM run by a chain of `handoff run` processes, reached through one control socket."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        kvm_socket: str | os.PathLike[str],
        *,
        name: str = "vm",
        mode: str = "plain",
        vcpus: int = 2,
        memory: str = "64M",
        line_every: int = 100,
        flip_every: int = 25,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = Path(workdir)
        # The VM's runtime directory (its control socket and its `handoff list` entry); the
        # environment carries it to every successor.
        self.runtime_dir = self.dir / "run"
        self.env = {**os.environ, "HANDOFF_RUNTIME_DIR": str(self.runtime_dir), **(env or {})}
        self.kvm_socket = str(kvm_socket)
        self.name = name
        self.mode = mode
        self.vcpus = vcpus
        self.control = str(self.runtime_dir / f"{name}.qmp")
        self.serial_logs = [str(self.dir / f"{name}-serial-0.log")]
        self._tail = SerialTail()
        self.log_path = self.dir / f"{name}-vmm.log"
        self.argv = [
            *PROGRAM, "run", "--name", name, "--mode", mode, "--vcpus", str(vcpus),
            "--memory", memory, "--kvm", self.kvm_socket, "--control", self.control,
            "--serial-log", self.serial_logs[0], "--line-every", str(line_every),
            "--flip-every", str(flip_every), "--handoff-timeout", "15", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "ab") as log:
            # Its own session, as a VMM started by a service manager has (and as each
            # successor has): the scheduler shares the CPUs between sessions first.
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.pids.append(self.process.pid)
        wait_listening(self.control, self.process, timeout, "the VMM", self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    async def qmp(self, command: str, **args: Any) -> Any:
        async with await QMPClient.connect(self.control) as client:
            return await client.execute(command, args)

    async def pid(self) -> int:
        return int((await self.qmp("query-status"))["pid"])

    async def upgrade(
        self,
        sets: Sequence[str] = (),
        exec_argv: Sequence[str] | None = None,
        timeout: float = 60,
        *,
        copy_memory: bool = False,
    ) -> dict[str, Any]:
        for item in sets:
            if item.startswith("serial-log="):
                self.serial_logs.append(item.partition("=")[2])
        result = await ops.upgrade(
            self.control, sets, exec_argv, timeout=timeout, copy_memory=copy_memory
        )
        pid = int(result.get("successor-pid", 0))
        if pid:
            self.pids.append(pid)
        return result

    def start_target(self, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
        """An operator-started `handoff run --incoming` for this guest (same run flags, less
        the token file, plus `flags`), listening before any handoff begins."""
        path = str(self.dir / "in" / f"{self.name}.sock")
        argv = [*strip_flags(self.argv, ["--token-file"]), "--incoming", f"unix:{path}", *flags]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.pids.append(proc.pid)
        wait_listening(path, proc, 30, "the target", self.log)
        return proc, path

    async def hand_off_to(self, path: str) -> dict[str, Any]:
        """QMP `handoff` to a listening target; the final HANDOFF event's data."""
        async with await QMPClient.connect(self.control) as qmp:
            await qmp.execute("handoff", {"uri": f"unix:{path}"})
            while True:
                data = dict((await qmp.next_event("HANDOFF")).data)
                if data["status"] in ("completed", "failed"):
                    return data

    def report(self) -> SerialReport:
        return self._tail.read(self.serial_logs)

    async def wait_lines(self, more: int = 3, timeout: float = 20) -> SerialReport:
        """Wait until every vCPU printed `more` lines beyond what the log holds now."""
        before = self.report().last_seq()
        with trio.move_on_after(timeout):
            while True:
                report = self.report()
                last = report.last_seq()
                if all(last.get(v, -1) >= before.get(v, -1) + more for v in range(self.vcpus)):
                    return report
                if report.panics:
                    return report
                await trio.sleep(0.02)
        return self.report()

    async def settle(self, timeout: float = 10) -> list[int]:
        """Wait until at most one VMM of the chain is alive (old ones exit after a handoff)."""
        with trio.move_on_after(timeout):
            while len(self.alive_pids()) > 1:
                await trio.sleep(0.02)
        return self.alive_pids()

    def alive_pids(self) -> list[int]:
        return [p for p in self.pids if pid_alive(p)]

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp("quit")
        deadline = time.monotonic() + 10
        while self.alive_pids() and time.monotonic() < deadline:
            await trio.sleep(0.02)

    def kill_all(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(timeout=5)


_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags": the socket listens


def listening(path: str | os.PathLike[str]) -> bool:
    """Something listens on the AF_UNIX socket at `path`. Its file appears at bind(2), a
    moment before listen(2); a connect in between is refused, so a test that waits for the
    file must wait for this. Read from /proc/net/unix, without connecting: a handoff target
    would take a probe's connection for its peer."""
    want = os.path.abspath(path)
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.rstrip("\n").split(None, 7)  # the path may hold spaces
                if len(fields) >= 8 and fields[7] == want and int(fields[3], 16) & _SO_ACCEPTCON:
                    return True
    except OSError:
        return os.path.exists(want)
    return False


def wait_listening(
    path: str | os.PathLike[str],
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    log: Callable[[], str],
) -> None:
    """Until `proc` listens on `path`; RuntimeError (with its `log()`) if it exits or
    `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not listening(path):
        if proc.poll() is not None:
            failure = f"{what} exited with {proc.returncode} before it listened on {path}"
        elif time.monotonic() > deadline:
            failure = f"{what} did not listen on {path} within {timeout:g} s"
        else:
            time.sleep(0.01)
            continue
        raise RuntimeError(f"{failure}: {log()}")


class NotifySocket:
    """A stand-in for systemd's notify socket: bind it, put `env` into a VMM's environment
    (successors inherit it), and read back every sd_notify datagram with its sender's pid.

    Like systemd it closes every fd that arrives (so `BARRIER=1` completes at once).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.env = {"NOTIFY_SOCKET": self.path}
        self.messages: list[tuple[int, str]] = []  # (sender pid, datagram), in arrival order

    def _drain(self) -> None:
        space = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(16 * 4)
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, space)
            except BlockingIOError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            OwnedFds(fds_of(ancillary)).close()
            self.messages.append((pid, data.decode(errors="replace")))

    def from_pid(self, pid: int) -> list[str]:
        """The datagrams `pid` sent so far."""
        self._drain()
        return [text for sender, text in self.messages if sender == pid]

    async def wait_for(self, pid: int, datagram: str, timeout: float = 10) -> list[str]:
        """Wait until `pid` has sent `datagram` (exactly); return what `pid` sent so far."""
        with trio.fail_after(timeout):
            while datagram not in self.from_pid(pid):
                await trio.sleep(0.01)  # polls, so that `serve` may run meanwhile
        return self.from_pid(pid)

    async def serve(self) -> None:
        """Keep reading (run it in a nursery while VMMs may wait on a `BARRIER=1`)."""
        while True:
            self._drain()
            await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# -- the kvmstub daemon ---------------------------------------------------------------------------

_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0


class KvmstubDaemon:
    """A running `kvmstub serve` subprocess.

    Attributes:
        socket: the socket path to give `handoff.hv.kvmstub.open_kvmstub` (or `client.open_kvm`).
        pid: the daemon's pid.
        process: the subprocess.Popen.
        ready_line: what it printed when ready.
        log_path: its stderr.
    """

    def __init__(self, process: subprocess.Popen[str], socket: Path, ready_line: str) -> None:
        self.process = process
        self.pid = process.pid
        self.socket = socket
        self.ready_line = ready_line
        self.log_path = socket.parent / "kvmstub.log"

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics (`kvmstub stats --json`), read synchronously."""
        return read_stats(self.socket)

    def vm_ids(self) -> list[int]:
        """Ids of the VMs alive in the daemon."""
        return [vm["id"] for vm in self.stats()["vms"]]

    def open_fds(self) -> int:
        """How many fds the daemon process holds (for leak checks)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(_STOP_TIMEOUT)
            if self.process.stdout is not None:
                self.process.stdout.close()
            return status
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("kvmstub daemon did not stop on SIGTERM") from None

    def stop_and_check(self) -> None:
        """`stop`, and if it was running, assert it exited 0 and took its socket with it (a
        test's daemon must end cleanly: its log is in the message if not)."""
        was_running = self.alive()
        status = self.stop()
        if was_running:
            assert status == 0, f"kvmstub exited with {status}:\n{self.log()}"
            assert not self.socket.exists(), "kvmstub left its socket behind"


def write_oca_key(path: Path) -> Path:
    """An owner's OCA key file for `kvmstub serve --oca-key` (hosts given the same file share
    a DOMAIN): a fresh P-384 key in PKCS#8 PEM, mode 0600. Returns `path`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def start_kvmstub_daemon(directory: Path, *flags: str) -> KvmstubDaemon:
    """Run `python -m kvmstub.cli serve --socket <directory>/kvm.sock <flags>` and wait for
    its ready line."""
    return spawn_kvmstub_daemon(directory, *flags)()


def kvmstub_serve_refused(sock: Path, *flags: str) -> str:
    """Run `python -m kvmstub.cli serve --socket <sock> <flags>` expecting a refusal: it
    exits 1 before it listens (no socket left at `sock`). Returns what it printed on
    stderr, for the test to check the words."""
    out = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(sock), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert not sock.exists(), "kvmstub left a socket though it refused to serve"
    return out.stderr


def spawn_kvmstub_daemon(directory: Path, *flags: str) -> Callable[[], KvmstubDaemon]:
    """`start_kvmstub_daemon` in two halves: the process starts now, and the returned call
    waits for its ready line (killing it if it never comes). Several daemons spawned before
    any is waited for start side by side (a daemon's start is mostly the interpreter's)."""
    sock = directory / "kvm.sock"
    log = open(directory / "kvmstub.log", "w")  # noqa: SIM115 (the child owns it from here)
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(sock), *flags],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own CPU share (autogroup), as a system service has
        )
    return partial(_wait_ready, process, directory, sock)


def _wait_ready(process: subprocess.Popen[str], directory: Path, sock: Path) -> KvmstubDaemon:
    assert process.stdout is not None
    deadline = time.monotonic() + _READY_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                process.wait()
                raise AssertionError(f"kvmstub did not get ready in {_READY_TIMEOUT}s")
            line = process.stdout.readline()
            if line.startswith("kvmstub: ready "):
                return KvmstubDaemon(process, sock, line.strip())
            if not line:
                process.wait()
                text = (directory / "kvmstub.log").read_text(errors="replace")
                raise AssertionError(f"kvmstub exited with {process.returncode}:\n{text}")


async def upgrade_checked(
    vmm: VmmProcess,
    *sets: str,
    exec_argv: Sequence[str] | None = None,
    expect: str = "completed",
    timeout: float = 60,
) -> dict[str, Any]:
    """One handoff of `vmm` to a successor (`sets`: KEY=VALUE flag changes for it). Asserts the
    outcome is `expect` ("completed" or "failed"); after a completed one, waits until the old
    VMM has exited. Returns the final HANDOFF event's data plus "successor-pid"."""
    result = await vmm.upgrade(sets, exec_argv, timeout=timeout)
    assert result.get("status") == expect, f"handoff {result}; VMM log:\n{vmm.log()}"
    if expect == "completed":
        alive = await vmm.settle()
        assert alive == [result["successor-pid"]], f"VMMs still alive: {alive}\n{vmm.log()}"
    return result


async def serial_checked(
    vmm: VmmProcess, more: int = 3, max_pause_us: int | None = None, timeout: float = 20
) -> SerialReport:
    """Wait until every vCPU printed `more` lines beyond what its log holds now, then assert
    the guest is whole: every vCPU's seq contiguous from 0, no PANIC; with `max_pause_us`,
    also that no gap the guest reported (its own view of every pause) exceeded it."""
    report = await vmm.wait_lines(more, timeout)
    problems = report.problems(vmm.vcpus)
    assert problems == [], f"{problems}\nVMM log:\n{vmm.log()}"
    if max_pause_us is not None:
        worst = max((gap for lines in report.lines.values() for _, gap in lines), default=0)
        assert worst <= max_pause_us, f"the guest saw a pause of {worst} us"
    return report
