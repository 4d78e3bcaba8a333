"""What the two roles of a handoff need of the VMM process that runs them.

`source` and `target` sit below the process layer (DESIGN section 7): they never import the
process's `App`, they are given this. `handoff.process.app.App` is the one implementation;
tests may give a smaller one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import trio

from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.vmm import Vmm
from handoff.migration.faults import Faults
from handoff.migration.record import HandoffRecord


class ControlGate(Protocol):
    """The VMM's QMP server, as a handoff sees it: closed to new clients during a handoff,
    opened again when the guest stays."""

    def stop_accepting(self) -> None: ...

    def start_accepting(self) -> None: ...


class VmmHost(Protocol):
    """The VMM process around one handoff: its guest, its flags, its control socket, its
    events, and what a signal asked of it meanwhile."""

    cfg: GuestConfig
    flags: HostFlags
    vmm: Vmm
    record: HandoffRecord
    faults: Faults
    token: bytes | None
    nursery: trio.Nursery | None

    # The control socket: the listening socket handed to a successor, where it is served.
    control_sock: socket.socket | None
    control_path: str
    control_file: tuple[int, int] | None

    @property
    def control(self) -> ControlGate | None: ...

    # A handoff under way, and a stop asked for meanwhile (a signal).
    setup_scope: trio.CancelScope | None
    handoff_pausing: bool
    stop_requested: bool
    stop_signal: str
    successor_pidfd: int | None
    handed_to: tuple[int, int] | None

    def emit(self, event: str, data: dict[str, Any], at: float | None = None) -> None:
        """A QMP event for every client."""
        ...

    def events_held(self, at_most: float = ...) -> AbstractContextManager[None]:
        """Events raised meanwhile are delivered when it ends (the blackout)."""
        ...

    def start_control(self, nursery: trio.Nursery) -> None:
        """Serve QMP on `control_sock` (a target, once it holds the guest)."""
        ...

    def adopt_control(self, have: str) -> None:
        """Serve the control socket received in a handoff; move it to our --control path if
        that names another one (never replacing anything)."""
        ...


class PeerProcess(Protocol):
    """The peer VMM's process, as a handoff acts on it: the source fences its target (freeze,
    thaw, kill, wait until frozen or gone), the target takes the guest over only from a source
    that is gone. `PidfdProcess` is the one for a real process; a test running both roles in
    one process gives each a fake whose kill() ends that role's task (what a crash does)."""

    pid: int

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def kill(self) -> None: ...

    async def wait_stopped(self, timeout: float) -> None:
        """Until every thread of it is stopped, or it is gone (at most `timeout` s)."""
        ...

    async def wait_gone(self, timeout: float) -> bool:
        """True once it is gone, False if it still runs after `timeout` s."""
        ...

    def pidfd(self) -> int | None:
        """Its pidfd, if it has one (a stop after a completed handoff is passed on there)."""
        ...

    def close(self) -> None: ...


class PidfdProcess:
    """A real peer process, held by a pidfd taken when it connected (its pid cannot be reused
    while we hold it)."""

    def __init__(self, pid: int, fd: int, *, owned: bool = True) -> None:
        self.pid = pid
        self._fd: int | None = fd
        self._owned = owned

    @classmethod
    def open(cls, pid: int) -> PidfdProcess | None:
        try:
            return cls(pid, os.pidfd_open(pid))
        except OSError:
            return None

    def _signal(self, sig: signal.Signals) -> None:
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self._fd, sig)

    def stop(self) -> None:
        self._signal(signal.SIGSTOP)

    def cont(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    async def wait_stopped(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while True:
                try:
                    states = []
                    for tid in os.listdir(f"/proc/{self.pid}/task"):
                        with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                            states.append(f.read().rpartition(")")[2].split()[0])
                except (OSError, IndexError):
                    return  # gone
                if all(state in "TtZX" for state in states):
                    return
                await trio.sleep(0.001)

    async def wait_gone(self, timeout: float) -> bool:
        if self._fd is None:
            return False
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self._fd)
            return True
        return False

    def pidfd(self) -> int | None:
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._owned:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None


PeerOpener = Callable[[int], PeerProcess | None]
"""How a role gets its peer's process from the pid SO_PEERCRED names (None: it cannot)."""


__all__ = ["ControlGate", "PeerOpener", "PeerProcess", "PidfdProcess", "VmmHost"]
