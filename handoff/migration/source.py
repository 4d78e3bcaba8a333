"""The source role: hand our running guest to a target VMM (DESIGN.md section 4).

Everything that does not need the guest paused (connect, credentials, Hello, Describe, the
target building its VM) happens while the guest runs. The blackout is: park the vCPUs, read
registers (plain, sev), snapshot devices, send `Switchover` with our VM fd, wait for `Moved`,
send `Commit`, wait for `Resumed`.

Failure rules: `_recover` executes `conn.recovery()`, the protocol's table (DESIGN.md section 4,
`handoff.protocol.local`), one function per `Recovery`:
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
- the whole blackout has one limit (--handoff-timeout): whatever stalls, the guest is taken
  back when it has passed.
  Because the target sends `Resumed` before it lets a vCPU run, the registers we snapshotted
  at the pause are exact whenever we get the guest back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from handoff import protocol
from handoff.errors import (
    AuthRefused,
    CredentialsRefused,
    HandoffError,
    HandoffTimeout,
    TransportError,
)
from handoff.hv import VcpuState
from handoff.machine.vmm import collector_paused
from handoff.migration import messages
from handoff.migration.host import PeerOpener, PeerProcess, PidfdProcess, VmmHost
from handoff.migration.peer import Peer
from handoff.migration.record import handoff_summary
from handoff.system import notify
from handoff.system.sched import waking_without_preempting, yield_cpus
from handoff.transport.unix import Channel, OwnedFds, PeerCredentials, connect, fds_of

if TYPE_CHECKING:
    from handoff.migration.record import HandoffRecord

log = logging.getLogger("handoff.source")

M = TypeVar("M")

SETUP_TIMEOUTS = 4  # the setup (connect .. Prepared) may take this many --handoff-timeouts


async def _connect(path: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> Channel:
    """Connect to the target's handoff socket, waiting for a just-spawned successor to listen.

    A spawned successor's socket is looked for every SUCCESSOR_POLL_S with one stat(2), and
    connected to once it is there. A failed connect cost this VMM's event loop about 100 us
    of CPU (each a stall of the guest's exits), and backing off up to 50 ms between tries
    kept the handoff waiting for up to 50 ms after the successor listened."""
    deadline = trio.current_time() + timeout
    delay = SUCCESSOR_POLL_S
    failure = "its socket did not appear"
    while True:
        if proc is not None and proc.poll() is not None:
            raise HandoffError(
                f"the successor exited with status {proc.returncode} before it listened; "
                "see its log. The guest keeps running here"
            )
        if proc is None or os.path.exists(path):
            try:
                return await connect(path)
            except (TransportError, OSError) as exc:
                failure = str(exc)
            if proc is None:
                delay = min(delay * 2, 0.05)  # an operator's target: back off
        if trio.current_time() > deadline:
            raise HandoffTimeout(
                f"no handoff target answered on {path} within {timeout:g} s ({failure}); "
                "the guest keeps running here"
            )
        await trio.sleep(delay)


SUCCESSOR_POLL_S = 0.002
"""How often the old VMM looks for its just-spawned successor's handoff socket."""


def _check_successor(
    creds: PeerCredentials, proc: subprocess.Popen[bytes], pidfd: int | None, path: str
) -> None:
    """Accept only the successor we spawned: the process listening on `path` must be that
    child (its pid, as SO_PEERCRED recorded at listen(2)), and the child must still be alive
    (its pidfd, taken before it could be reaped, is not readable), so that its pid cannot
    have been reused. Anything else is a process of the same uid that took the successor's
    socket path (it could not have the token: that went down a pipe to the child)."""
    peer_pid = creds.pid
    alive = pidfd is not None and not select.select([pidfd], [], [], 0)[0]
    if peer_pid == proc.pid and alive:
        return
    why = (
        f"pid {peer_pid}, not the successor this VMM started (pid {proc.pid})"
        if peer_pid != proc.pid
        else f"pid {peer_pid}, the successor this VMM started, but it has exited"
    )
    raise CredentialsRefused(
        f"the process listening on {path} is {why}: another process took the successor's "
        "socket path, so it is refused before any fd crosses; the guest keeps running here",
        pid=peer_pid,
        uid=creds.uid,
        gid=creds.gid,
    )


@dataclass
class _Recovering:
    """What a recovery acts on: this VMM, the connection (whose state says which recovery),
    what the target sent us (its VM fd in escrow) and its process."""

    app: VmmHost
    conn: protocol.HandoffConnection
    escrow: int | None
    regs: list[VcpuState] | None
    pidfd: int | None  # the target's, taken when it connected (or `target`)
    proc: subprocess.Popen[bytes] | None  # the target, if we started it
    pid: int
    watch: int | None  # a dup of the connection's socket: what the target sent is read there
    target: PeerProcess | None = None  # the target's process, as the fence acts on it

    def __post_init__(self) -> None:
        if self.target is None and self.pidfd is not None:
            self.target = PidfdProcess(self.pid, self.pidfd, owned=False)


async def _kill_target(r: _Recovering) -> None:
    """Make sure the target can no longer act before we take the guest back: SIGKILL through
    its pidfd (a frozen target too), then wait for it to be gone."""
    if r.target is None:
        log.warning("target pid %d cannot be fenced (no pidfd); recovering anyway", r.pid)
        return
    r.target.kill()
    await r.target.wait_gone(5)
    if r.proc is not None:
        await _wait_exit(r.proc, 1.0)


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


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll a child without blocking the guest's event loop; True once it has exited."""
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.01)
        return True
    return False


async def hand_off(
    app: VmmHost,
    path: str,
    proc: subprocess.Popen[bytes] | None,
    token: bytes | None,
    copy_memory: bool = False,
    peer_process: PeerOpener = PidfdProcess.open,
) -> bool:
    """Run one handoff as the source; return True when the target runs the guest.

    No collector stall inside the blackout: the cyclic collector is paused, and stays
    paused after a completed handoff (this process only lingers and exits then, and a
    collection would take a CPU from the guest's first milliseconds on the target).
    `peer_process` gives the target's process, as the fence acts on it, from its pid (a
    pidfd; a test running both roles in one process gives a fake)."""
    with collector_paused() as pause:
        pause.keep_off = await _hand_off(app, path, proc, token, copy_memory, peer_process)
        return pause.keep_off


async def _hand_off(
    app: VmmHost,
    path: str,
    proc: subprocess.Popen[bytes] | None,
    token: bytes | None,
    copy_memory: bool = False,
    peer_process: PeerOpener = PidfdProcess.open,
) -> bool:
    """Run one handoff as the source; return True when the target runs the guest."""
    vmm, flags, rec = app.vmm, app.flags, app.record
    workdir = rec.workdir  # the successor's private directory: begin() starts a fresh record
    rec.begin("source")
    rec.workdir = workdir
    app.emit("HANDOFF", {"id": rec.id, "status": "setup"})
    notify.notify("STATUS=handoff: connecting to the target")
    peer: Peer | None = None
    target: PeerProcess | None = None
    peer_pid = proc.pid if proc is not None else 0
    escrow: int | None = None
    watch: int | None = None
    regs = None
    stream: socket.socket | None = None
    t_pause = 0.0
    try:
        # The setup has a limit too (each wait for the target has one; this also bounds a
        # stuck step of our own, which would hold the target's VM in escrow for ever).
        setup_limit = SETUP_TIMEOUTS * flags.handoff_timeout
        with trio.move_on_after(setup_limit) as setup:
            # A stop (SIGTERM) before the pause cancels the setup (App._stop_during_handoff).
            app.setup_scope = setup
            if app.stop_requested:
                setup.cancel()
            chan = await _connect(path, proc, flags.handoff_timeout)
            watch = os.dup(chan.fileno())  # to find a late Resumed even if `chan` is closed
            conn = protocol.HandoffConnection(protocol.Role.SOURCE, max_version=flags.max_protocol)
            try:
                creds = chan.check_peer(flags.allowed_uids())
                if proc is not None:
                    _check_successor(creds, proc, app.successor_pidfd, path)
            except CredentialsRefused as exc:
                # Told before anything else crosses (a Refuse carries no fd), then dropped.
                with contextlib.suppress(Exception):
                    await Peer(chan, conn, flags.handoff_timeout).refuse("credentials", str(exc))
                chan.close()
                raise
            peer_pid = creds.pid
            rec.peer_pid = creds.pid
            target = peer_process(creds.pid)
            peer = Peer(chan, conn, flags.handoff_timeout)
            rec.phase("connect")
            # The setup runs in this VMM's event loop while the guest runs, and its pieces
            # take 100-300 us of CPU each: exits that came back meanwhile are served
            # between them (each a stall of its vCPU otherwise).
            await trio.lowlevel.checkpoint()

            await peer.send(messages.source_hello(conn, flags, token))
            hello, _ = await peer.receive(protocol.Hello)
            try:
                messages.check_token(conn, token, hello.proof)
            except AuthRefused as exc:
                await peer.refuse("auth", str(exc))
                raise
            await app.faults.point("source", "hello", peer)
            rec.protocol = conn.version or 0
            rec.phase("hello")
            await trio.lowlevel.checkpoint()  # (see above)

            assert app.control_sock is not None
            describe = messages.describe_from(
                vmm.cfg, flags, vmm.sev, vmm.measurement, messages.source_proof(conn, token),
                copy_memory=copy_memory, handoff_id=rec.id,
            )  # fmt: skip
            memfds = [] if copy_memory else vmm.memfds
            await peer.send(describe, [*memfds, app.control_sock.fileno()])
            await app.faults.point("source", "describe", peer)
            app.emit("HANDOFF", {"id": rec.id, "status": "active"})
            _prepared, fds = await peer.receive(protocol.Prepared)
            got = fds.take()
            escrow = got[0]
            stream = socket.socket(fileno=got[1]) if copy_memory else None
            await app.faults.point("source", "prepared", peer)
            rec.phase("prepare")
            rec.setup_ms = round(sum(rec.phases.values()), 3)
        app.setup_scope = None
        if setup.cancelled_caught and app.stop_requested:
            raise HandoffError(
                f"{app.stop_signal or 'a stop'} asked this VMM to stop before the guest was "
                "paused: the handoff is cancelled; the guest stays here and stops with this VMM"
            )
        if setup.cancelled_caught:
            raise HandoffTimeout(
                f"the handoff's setup did not finish within {setup_limit:g} s "
                f"({SETUP_TIMEOUTS} x --handoff-timeout); the guest keeps running here"
            )
        assert peer is not None
        app.handoff_pausing = True  # from here a stop waits for the outcome (see App)

        # ---- blackout: the guest is paused from here until the target resumes it.
        if app.control is not None:
            app.control.stop_accepting()
        # Let vCPU tasks holding an exit issue their next KVM_RUN before the kick: a vCPU in
        # KVM_RUN runs until the kick stops it within a quantum, while one left waiting on
        # this task would stop early and lengthen the pause the guest sees.
        await trio.lowlevel.checkpoint()
        t_pause = time.perf_counter()
        requests0, messages0 = vmm.requests_made(), peer.messages
        # One limit for the whole blackout, whatever step stalls (a hung target, or a stuck
        # step of our own): past it the failure rules take the guest back. Copying memory
        # (the --copy-memory baseline) takes as long as memory is large, so it has none.
        limit = math.inf if copy_memory else flags.handoff_timeout
        too_late = (
            f"the handoff did not finish within {limit:g} s of the pause "
            "(--handoff-timeout); taking the guest back"
        )
        deadline = time.monotonic() + limit

        async def reply(expect: type[M]) -> M:
            """The target's next message. Inside the blackout it is first awaited without
            yielding to other tasks (Peer.receive_fast): each trip through the scheduler would
            lengthen the pause."""
            if copy_memory:
                return (await peer.receive(expect))[0]
            try:
                return (await peer.receive_fast(expect, deadline - time.monotonic()))[0]
            except HandoffTimeout:
                raise HandoffTimeout(too_late) from None

        # Events raised inside the blackout reach QMP clients when it ends (events_held).
        with app.events_held(), trio.move_on_after(limit) as blackout:
            app.emit("HANDOFF", {"id": rec.id, "status": "device"})
            await vmm.pause()  # (a pause cut short by the deadline is undone too: _rollback)
            rec.pause_seqs = dict(vmm.devices.serial.last_seq)
            await app.faults.point("source", "paused", peer)
            if vmm.cfg.mode != "sev-es":
                regs = await vmm.get_all_states()
            devices = vmm.devices.snapshot()
            rec.phase("pause")
            assert vmm.vm is not None
            switchover, states_fd = messages.switchover_from(
                devices, regs, version=conn.version or 1, inline_max=flags.vcpu_states_inline_max
            )
            with states_fd:  # the vCPU state memfd (protocol 3, large states): sent, then closed
                peer.send_now(switchover, [vmm.vm.fileno(), *states_fd])
            if stream is not None:
                await vmm.send_memory(stream)
                stream.close()
                stream = None
            await app.faults.point("source", "switchover", peer)
            await reply(protocol.Moved)
            await app.faults.point("source", "moved", peer)
            rec.phase("switchover")
            peer.send_now(protocol.Commit())
            await app.faults.point("source", "commit", peer)
            rec.phase("commit")
            with waking_without_preempting():
                await reply(protocol.Resumed)
        if blackout.cancelled_caught:
            raise HandoffTimeout(too_late)
        rec.phase("resume")
        rec.downtime_ms = round((time.perf_counter() - t_pause) * 1e3, 3)
        rec.requests_in_pause = vmm.requests_made() - requests0
        rec.messages_in_pause = peer.messages - messages0
    except (HandoffError, OSError, trio.TooSlowError) as exc:
        reason = str(exc) or type(exc).__name__
        if peer is not None:
            await peer.refuse("internal", reason)
        conn = peer.conn if peer is not None else protocol.HandoffConnection(protocol.Role.SOURCE)
        recovery = await _recover(
            _Recovering(app, conn, escrow, regs, None, proc, peer_pid, watch, target)
        )
        if recovery == "committed":
            log.warning("%s; but the target had already resumed the guest: it keeps it", reason)
        else:
            if target is not None:
                target.close()
            return await _failed(app, rec, reason, recovery, peer, (escrow, watch), stream, proc)

    rec.finish("completed")
    # From here this process only tears down. None of it is urgent, and all of it (about
    # 1.5 ms of CPU with the runtime entry) ran in the guest's first milliseconds on the
    # target, where on a small host the scheduler gave it a CPU even at nice 19 while
    # kvmstub waited. So: asleep while the guest settles there; then what others wait for
    # ("completed" for the operator, MAINPID= for systemd) at our own priority; then off
    # the CPUs for the rest (the summary, the successor's directory, the runtime entry,
    # the linger and the exit: see App._run_handoff).
    with waking_without_preempting():
        await trio.sleep(SETTLE_SECONDS)
    # "successor-pid": the process that took the guest, as the kernel names the peer of the
    # connection (SO_PEERCRED), not merely the one we started.
    app.emit(
        "HANDOFF",
        {"id": rec.id, "status": "completed", **rec.to_qmp(), "successor-pid": peer_pid},
    )
    notify.notify(f"MAINPID={peer_pid}", "STATUS=handed off to the successor")
    vmm.status = "postmigrate"
    yield_cpus()
    await trio.lowlevel.checkpoint()
    handoff_summary(log, flags.name, rec)
    pidfd = target.pidfd() if target is not None else None
    if pidfd is not None:
        app.handed_to = (peer_pid, os.dup(pidfd))  # a stop from now on is passed on to it
    if target is not None:
        target.close()
    _close(peer, (escrow, watch))
    if rec.workdir:
        # The target removes its socket once it has taken over; the directory is ours.
        shutil.rmtree(rec.workdir, ignore_errors=True)
    return True


SETTLE_SECONDS = 0.01
"""How long after Resumed the old VMM waits before its bookkeeping (the summary, the
"completed" event, MAINPID=, the successor's directory, the runtime entry). Shorter than the
new VMM's own settling (target.SETTLE_SECONDS), so that the two do not run together."""


async def _failed(
    app: VmmHost,
    rec: HandoffRecord,
    reason: str,
    recovery: str,
    peer: Peer | None,
    fds: tuple[int | None, ...],
    stream: socket.socket | None,
    proc: subprocess.Popen[bytes] | None,
) -> bool:
    rec.finish("failed", reason, recovery)
    handoff_summary(log, app.flags.name, rec)
    app.emit(
        "HANDOFF",
        {"id": rec.id, "status": "failed", "error-desc": reason, "recovery": recovery},
    )
    notify.notify(f"STATUS=handoff failed ({recovery}): guest running here")
    _close(peer, fds)
    if stream is not None:
        stream.close()
    if app.nursery is not None:
        # Reaping may take a moment; the VMM is free for the next command meanwhile.
        app.nursery.start_soon(_reap, proc, rec.workdir)
    return False


async def _recover(r: _Recovering) -> str:
    """Execute the recovery of the protocol's table for the state the connection ended in
    (`conn.recovery()`). Returns the word for it that the record, the QMP event and the CLI
    show: "none", "rollback", "reclaim", or "committed" when the target turned out to run the
    guest already (then the handoff completed)."""
    return await _RECOVERIES[r.conn.recovery()](r)


def _accept_again(app: VmmHost) -> None:
    if app.control is not None:
        app.control.start_accepting()


async def _nothing_to_do(r: _Recovering) -> str:
    """Before `Prepared`: the guest was never paused; it keeps running here."""
    _accept_again(r.app)
    return "none"


async def _rollback(r: _Recovering) -> str:
    """Before `Switchover`: the guest never left; resume it if the handoff paused it (a pause
    cut short by the deadline too). The escrow is dropped by the caller."""
    vmm = r.app.vmm
    _accept_again(r.app)
    if not vmm.gate.pause_requested:
        return "none"
    vmm.resume()
    return "rollback"


async def _resume_or_reclaim(r: _Recovering) -> str:
    """After `Switchover`, before `Commit`: the target never ran the guest. Fence it, then
    resume our own VM if it still holds the context, else reclaim it from escrow."""
    await _kill_target(r)
    return await _take_back(r)


async def _fence_then_reclaim(r: _Recovering) -> str:
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
    return await _RECOVERIES[answer](r)


async def _reclaim(r: _Recovering) -> str:
    """After `Commit`, the target silent (gone, or frozen with no `Resumed` sent): the guest
    never ran on it. Fence it and take the guest back (from escrow when the context moved;
    a plain guest never left our VM, and the probe says so)."""
    await _kill_target(r)
    return await _take_back(r)


async def _done(r: _Recovering) -> str:
    """The target sent `Resumed`: it runs the guest; the handoff completed."""
    return "committed"


async def _take_back(r: _Recovering) -> str:
    vmm = r.app.vmm
    if await vmm.holds_context():
        recovery = "rollback"
    else:
        if r.escrow is None:
            raise RuntimeError("context moved but no escrow: cannot happen")
        await vmm.reclaim(r.escrow, r.regs)
        recovery = "reclaim"
    _accept_again(r.app)
    vmm.resume()
    return recovery


_RECOVERIES: Final[dict[protocol.Recovery, Callable[[_Recovering], Awaitable[str]]]] = {
    protocol.Recovery.NOTHING_TO_DO: _nothing_to_do,
    protocol.Recovery.ROLLBACK: _rollback,
    protocol.Recovery.RESUME_OR_RECLAIM: _resume_or_reclaim,
    protocol.Recovery.FENCE_THEN_RECLAIM: _fence_then_reclaim,
    protocol.Recovery.RECLAIM: _reclaim,
    protocol.Recovery.DONE: _done,
}
"""One function per source recovery (`protocol.recovery_for`)."""


def _close(peer: Peer | None, fds: tuple[int | None, ...]) -> None:
    if peer is not None:
        peer.close()
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


async def _reap(proc: subprocess.Popen[bytes] | None, workdir: str) -> None:
    """A failed successor must not linger: give it a moment to exit, then kill it."""
    if proc is not None and not await _wait_exit(proc, 2.0):
        proc.kill()
        await _wait_exit(proc, 2.0)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
