"""What the protocol's shell needs of a transport: one connection carrying whole datagrams,
each with the fds it declares, received already owned. `unix.Channel` is the one transport
today (SEQPACKET with SCM_RIGHTS); a transport without fd passing (TCP between hosts) carries
none and refuses a message that declares any.

`migration.peer.Peer` joins a protocol machine to any `Connection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Connection(Protocol):
    """One connection to the peer of a handoff.

    Every method raises `handoff.errors.TransportError` for a broken or closed connection.
    `receive*` return `(None, [])` at the peer's end of stream; the fds returned are the
    caller's, already received close-on-exec."""

    @property
    def closed(self) -> bool: ...

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """One datagram, with `fds` attached (the caller keeps its own)."""
        ...

    def send_now(self, data: bytes, fds: Sequence[int] = (), timeout: float = 1.0) -> None:
        """`send` without yielding to other tasks: the blackout's few small messages."""
        ...

    async def receive(self, max_fds: int, max_size: int = ...) -> tuple[bytes | None, list[int]]:
        """One datagram and at most `max_fds` fds (more is fatal for that message)."""
        ...

    def receive_now(
        self, max_fds: int, timeout: float, max_size: int = ...
    ) -> tuple[bytes | None, list[int]]:
        """`receive` without yielding to other tasks, for at most `timeout` seconds."""
        ...

    def close(self) -> None: ...
