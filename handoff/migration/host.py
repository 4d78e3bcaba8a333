"""What the two roles of a handoff need of the VMM process that runs them.

`source` and `target` sit below the process layer (DESIGN section 7): they never import the
process's `App`, they are given this. `handoff.process.app.App` is the one implementation;
tests may give a smaller one.
"""

from __future__ import annotations

import socket
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


__all__ = ["ControlGate", "VmmHost"]
