"""One end of a handoff connection: the protocol machine and the channel, joined.

`send` encodes through the machine and attaches the message's fds; `receive` reads one
datagram, lets the machine judge it (order, fields, fd count), and hands back the message with
its fds already owned. Every wait has the configured timeout. Protocol errors, refusals and a
vanished peer come out as `HandoffError`s, so `source` and `target` can apply the failure
rules of DESIGN.md section 4 in one place each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import trio

from handoff import protocol
from handoff.errors import HandoffTimeout, PeerFailed, Refused, TransportError
from handoff.transport.base import Connection
from handoff.transport.unix import OwnedFds

log = logging.getLogger("handoff.peer")

M = TypeVar("M")
FAST_WAIT = 0.005
"""Seconds `receive_fast` waits without yielding: a reply inside the blackout comes within a
millisecond or two unless something is wrong."""
MAX_FDS = 72  # the largest message (Describe) carries <= 64 memfds + the control socket


class PeerGoneError(PeerFailed):
    """The peer closed the connection or died."""


class Peer:
    def __init__(self, chan: Connection, conn: protocol.HandoffConnection, timeout: float) -> None:
        self.chan = chan
        self.conn = conn
        self.timeout = timeout
        self.messages = 0  # sent and received: the regression guard counts them in the pause

    async def send(self, msg: protocol.Message, fds: Sequence[int] = ()) -> None:
        data = self.conn.send(msg)
        with trio.fail_after(self.timeout):
            await self.chan.send(data, fds)
        self.messages += 1

    async def refuse(self, code: str, reason: str) -> None:
        """Tell the peer why we stop, if the connection still allows it; never raises.

        Not once `Commit` crossed (nor after a refusal or a protocol error): the machine would
        take the attempt for a protocol error of ours, and the recovery is the same."""
        if not self.conn.may_refuse():
            return
        try:
            await self.send(protocol.Refuse(code=code, reason=reason))
        except Exception as exc:  # the peer may be gone already
            log.debug("could not send Refuse: %s", exc)

    async def receive(self, expect: type[M], timeout: float | None = None) -> tuple[M, OwnedFds]:
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                data, fds = await self.chan.receive(MAX_FDS)
        except trio.TooSlowError:
            raise self._timed_out(expect, timeout) from None
        return self._judge(expect, data, fds)

    def send_now(self, msg: protocol.Message, fds: Sequence[int] = ()) -> None:
        """`send` without yielding to other tasks: the blackout's critical path, where each
        trip through the scheduler lengthens the guest's pause (see Channel.send_now)."""
        data = self.conn.send(msg)
        self.chan.send_now(data, fds, self.timeout)
        self.messages += 1

    def receive_now(self, expect: type[M], timeout: float | None = None) -> tuple[M, OwnedFds]:
        """`receive` without yielding to other tasks: this thread waits in poll(2), at most
        `timeout` seconds (default: the peer timeout). Only for the blackout's replies, which
        come within milliseconds; nothing else of this process runs meanwhile."""
        try:
            data, fds = self.chan.receive_now(MAX_FDS, self.timeout if timeout is None else timeout)
        except trio.TooSlowError:
            raise self._timed_out(expect, timeout) from None
        return self._judge(expect, data, fds)

    async def receive_fast(
        self, expect: type[M], timeout: float | None = None
    ) -> tuple[M, OwnedFds]:
        """`receive` for the blackout's replies: first waits up to FAST_WAIT seconds without
        yielding (`receive_now`), where the reply comes when all is well, then, if it has not,
        as `receive` does, so that signals and QMP clients are served while a slow or hung
        peer runs out the rest of `timeout` (default: the peer timeout)."""
        total = self.timeout if timeout is None else timeout
        try:
            data, fds = self.chan.receive_now(MAX_FDS, min(total, FAST_WAIT))
        except trio.TooSlowError:
            try:
                return await self.receive(expect, max(0.0, total - FAST_WAIT))
            except HandoffTimeout:
                raise self._timed_out(expect, total) from None
        return self._judge(expect, data, fds)

    def _timed_out(self, expect: type, timeout: float | None) -> HandoffTimeout:
        waited = self.timeout if timeout is None else timeout
        return HandoffTimeout(
            f"the peer sent nothing for {waited:g} s while we waited for {expect.__name__}"
        )

    def _judge(self, expect: type[M], data: bytes | None, fds: list[int]) -> tuple[M, OwnedFds]:
        """Let the machine judge one datagram; the message and its fds, owned, if expected."""
        owned = OwnedFds(fds)
        self.messages += 1
        try:
            event = self.conn.receive(data, len(fds))
        except protocol.RemoteProtocolError as exc:
            owned.close()
            raise PeerFailed(f"the peer broke the handoff protocol: {exc}") from exc
        except BaseException:
            owned.close()
            raise
        if isinstance(event, protocol.PeerGone):
            owned.close()
            raise PeerGoneError(
                f"the peer closed the connection while we waited for {expect.__name__}"
            )
        if isinstance(event, protocol.Refuse):
            owned.close()
            raise Refused(f"the peer refused the handoff ({event.code}): {event.reason}")
        if not isinstance(event, expect):
            owned.close()
            raise PeerFailed(f"expected {expect.__name__}, the peer sent {type(event).__name__}")
        return event, owned

    def close(self) -> None:
        self.chan.close()


__all__ = ["Peer", "PeerGoneError", "TransportError"]
