"""What each side does about the guest when a handoff fails: the protocol's recovery table
(`handoff.protocol.local.recovery_for`, DESIGN.md section 4), executed. Neither role has a
rule of its own: `recover_source` and `recover_target` dispatch on `conn.recovery()`, one
function per `Recovery`, and the hypothesis properties of tests/handoff/test_protocol.py prove
that the table leaves the guest in exactly one VMM.

Source (the old VMM):
- NOTHING_TO_DO (before `Prepared`) and ROLLBACK (before `Switchover`): the guest never left;
  resume it if the handoff paused it.
- RESUME_OR_RECLAIM (after `Switchover`) and RECLAIM: first make sure the target can no longer
  act (SIGKILL through a pidfd taken when it connected, then wait for it to be gone), then
  resume our own VM if it still holds the context, else move the context back from the
  escrowed target VM into a fresh VM (reclaim).
- FENCE_THEN_RECLAIM (after `Commit`, the target not known to be gone): the target may have
  resumed the guest already, its `Resumed` crossing our failure. It is frozen (SIGSTOP) and
  what it had sent is handed to the machine (`conn.fenced`): with a `Resumed` the answer is
  DONE and the target, thawed, keeps the guest; else RECLAIM as above.
  Because the target sends `Resumed` before it lets a vCPU run, the state we snapshotted at the
  pause is exact whenever we get the guest back. This holds on a kernel without escrow too (the
  real /dev/kvm): there our own VM was never touched, and the probe finds it alive.

Target (the new VMM):
- ABORT: drop everything; the source, alive, keeps or takes back the guest.
- TAKEOVER: the source is lost after `Switchover`. Done only once the source's process is gone
  (its pidfd turns readable): a source that lives still holds the guest (our VM in its escrow,
  or its own untouched VM) and takes it back, so we step aside.
- DONE: the handoff completed.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from handoff import protocol
from handoff.hv import PeerVm, VcpuState
from handoff.migration.host import PeerProcess, PidfdProcess, VmmHost
from handoff.transport.unix import OwnedFds, fds_of

log = logging.getLogger("handoff.recovery")


# ---- source -----------------------------------------------------------------------------------


@dataclass
class SourceFailure:
    """What a source recovery acts on: this VMM, the connection (whose state says which
    recovery), what the target sent us (its VM fd in escrow) and its process."""

    app: VmmHost
    conn: protocol.HandoffConnection
    escrow: PeerVm | None  # the target's VM (Prepared); the caller closes it
    states: list[VcpuState] | None
    pidfd: int | None  # the target's, taken when it connected (or `target`)
    proc: subprocess.Popen[bytes] | None  # the target, if we started it
    pid: int
    watch: int | None  # a dup of the connection's socket: what the target sent is read there
    target: PeerProcess | None = None  # the target's process, as the fence acts on it

    def __post_init__(self) -> None:
        if self.target is None and self.pidfd is not None:
            self.target = PidfdProcess(self.pid, self.pidfd, owned=False)


async def recover_source(r: SourceFailure) -> str:
    """Execute the recovery of the protocol's table for the state the connection ended in
    (`conn.recovery()`). Returns the word for it that the record, the QMP event and the CLI
    show: "none", "rollback", "reclaim", or "committed" when the target turned out to run the
    guest already (then the handoff completed)."""
    return await SOURCE_RECOVERIES[r.conn.recovery()](r)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll a child without blocking the guest's event loop; True once it has exited."""
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.01)
        return True
    return False


async def _kill_target(r: SourceFailure) -> None:
    """Make sure the target can no longer act before we take the guest back: SIGKILL through
    its pidfd (a frozen target too), then wait for it to be gone."""
    if r.target is None:
        log.warning("target pid %d cannot be fenced (no pidfd); recovering anyway", r.pid)
        return
    r.target.kill()
    await r.target.wait_gone(5)
    if r.proc is not None:
        await wait_exit(r.proc, 1.0)


def _queued(watch: int | None) -> list[tuple[bytes | None, int]]:
    """Every datagram waiting unread on the connection (`watch`: a dup of its socket), as
    (bytes, fd count), ending with (None, 0) at EOF; any fds that came along are closed."""
    if watch is None:
        return []
    out: list[tuple[bytes | None, int]] = []
    sock = socket.socket(fileno=os.dup(watch))
    try:
        while True:
            try:
                data, ancdata, _flags, _ = sock.recvmsg(
                    protocol.MAX_MESSAGE_BYTES,
                    socket.CMSG_SPACE(253 * 4),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
            except OSError:
                return out  # EAGAIN: nothing more; or the connection is gone
            fds = fds_of(ancdata)
            OwnedFds(fds).close()
            nfds = len(fds)
            if not data:
                out.append((None, 0))
                return out
            out.append((data, nfds))
    finally:
        sock.close()


def _accept_again(app: VmmHost) -> None:
    if app.control is not None:
        app.control.start_accepting()


async def _nothing_to_do(r: SourceFailure) -> str:
    """Before `Prepared`: the guest was never paused; it keeps running here."""
    _accept_again(r.app)
    return "none"


async def _rollback(r: SourceFailure) -> str:
    """Before `Switchover`: the guest never left; resume it if the handoff paused it (a pause
    cut short by the deadline too). The escrow is dropped by the caller."""
    vmm = r.app.vmm
    _accept_again(r.app)
    if not vmm.gate.pause_requested:
        return "none"
    vmm.resume()
    return "rollback"


async def _resume_or_reclaim(r: SourceFailure) -> str:
    """After `Switchover`, before `Commit`: the target never ran the guest. Fence it, then
    resume our own VM if it still holds the context, else reclaim it from escrow."""
    await _kill_target(r)
    return await _take_back(r)


async def _fence_then_reclaim(r: SourceFailure) -> str:
    """After `Commit`, the target not known to be gone: it may have resumed the guest, its
    `Resumed` crossing our failure, and killing it then would kill the guest's only holder.
    Freeze it, hand what it had sent to the machine, and execute the answer: DONE (thaw it:
    the guest is its) or RECLAIM."""
    if r.target is not None:
        r.target.stop()
        await r.target.wait_stopped(5)
    answer = r.conn.fenced(_queued(r.watch))
    if answer is protocol.Recovery.DONE and r.target is not None:
        r.target.cont()
    return await SOURCE_RECOVERIES[answer](r)


async def _reclaim(r: SourceFailure) -> str:
    """After `Commit`, the target silent (gone, or frozen with no `Resumed` sent): the guest
    never ran on it. Fence it and take the guest back (from escrow when the context moved;
    a plain guest never left our VM, and the probe says so)."""
    await _kill_target(r)
    return await _take_back(r)


async def _done(r: SourceFailure) -> str:
    """The target sent `Resumed`: it runs the guest; the handoff completed."""
    return "committed"


async def _take_back(r: SourceFailure) -> str:
    vmm = r.app.vmm
    if await vmm.holds_context():
        recovery = "rollback"
    else:
        if r.escrow is None:
            raise RuntimeError("context moved but no escrow: cannot happen")
        await vmm.reclaim(r.escrow, r.states)
        recovery = "reclaim"
    _accept_again(r.app)
    vmm.resume()
    return recovery


SOURCE_RECOVERIES: Final[dict[protocol.Recovery, Callable[[SourceFailure], Awaitable[str]]]] = {
    protocol.Recovery.NOTHING_TO_DO: _nothing_to_do,
    protocol.Recovery.ROLLBACK: _rollback,
    protocol.Recovery.RESUME_OR_RECLAIM: _resume_or_reclaim,
    protocol.Recovery.FENCE_THEN_RECLAIM: _fence_then_reclaim,
    protocol.Recovery.RECLAIM: _reclaim,
    protocol.Recovery.DONE: _done,
}
"""One function per source recovery (`protocol.recovery_for`)."""


# ---- target -----------------------------------------------------------------------------------


async def recover_target(conn: protocol.HandoffConnection, source: PeerProcess | None) -> bool:
    """Execute the target's recovery for the state the connection ended in: True when this VMM
    must run the guest now (TAKEOVER from a source whose process is gone, or DONE), False when
    it steps aside (ABORT, or a source that still lives and so keeps the guest)."""
    recovery = conn.recovery()
    if recovery is protocol.Recovery.DONE:
        return True
    if recovery is protocol.Recovery.ABORT:
        return False
    assert recovery is protocol.Recovery.TAKEOVER, recovery
    return source is not None and await source.wait_gone(1.0)


TARGET_RECOVERIES: Final = frozenset(
    {protocol.Recovery.ABORT, protocol.Recovery.TAKEOVER, protocol.Recovery.DONE}
)
"""The target's recoveries, each handled by `recover_target`."""
