"""Building blocks for two-process handoff tests: start a VMM, upgrade it, judge its guest.

    vmm = VmmProcess(tmp_path, kvm_socket, mode="sev-es", vcpus=2)
    vmm.start()
    result = await vmm.upgrade()
    assert result["status"] == "completed"
    await vmm.wait_lines()
    assert vmm.report().problems(vmm.vcpus) == []

Our own end-to-end tests use these; so can anyone who builds on handoff.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from .ops import upgrade
from .qmp_client import QMPClient
from .seriallog import SerialReport, read_logs

PROGRAM = [sys.executable, "-m", "handoff.cli"]
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
        self.log_path = self.dir / f"{name}-vmm.log"
        self.argv = [
            *PROGRAM, "run", "--name", name, "--mode", mode, "--vcpus", str(vcpus),
            "--memory", memory, "--kvm", self.kvm_socket, "--control", self.control,
            "--serial-log", self.serial_logs[0], "--line-every", str(line_every),
            "--flip-every", str(flip_every), "--handoff-timeout", "5", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env
            )
        self.pids.append(self.process.pid)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.control):
            if self.process.poll() is not None:
                raise RuntimeError(f"the VMM exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the VMM did not start within {timeout} s: {self.log()}")
            time.sleep(0.01)

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
        result = await upgrade(
            self.control, sets, exec_argv, timeout=timeout, copy_memory=copy_memory
        )
        pid = int(result.get("successor-pid", 0))
        if pid:
            self.pids.append(pid)
        return result

    def report(self) -> SerialReport:
        return read_logs(self.serial_logs)

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


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a dead child not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


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
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                    for fd in fds:
                        os.close(fd)
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
