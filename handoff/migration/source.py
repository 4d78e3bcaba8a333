"""The source role: hand our running guest to a target VMM (DESIGN.md section 4).

The role is one step per protocol state (`SETUP_STEPS`, `BLACKOUT_STEPS`), each advancing the
conversation by one message; the protocol machine (`handoff.protocol.local`) says which state
it is in, so the steps cannot run out of order. Everything that does not need the guest paused
(connect, credentials, Hello, Describe, the target building its VM) happens while the guest
runs. The blackout is: park the vCPUs, read their state (plain, sev), snapshot devices, send
`Switchover` with our VM fd, wait for `Moved`, send `Commit`, wait for `Resumed`. The whole
blackout has one limit (--handoff-timeout): whatever stalls, the guest is taken back when it
has passed.

Failures: `recovery.recover_source` executes `conn.recovery()`, the protocol's table; this
module has no rule of its own.
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
    Incompatible,
    TransportError,
)
from handoff.hv import PeerVm, VcpuState
from handoff.hv.backends import KVMSTUB
from handoff.machine.vmm import collector_paused
from handoff.migration import messages
from handoff.migration.host import PeerOpener, PeerProcess, PidfdProcess, VmmHost
from handoff.migration.peer import Peer
from handoff.migration.record import handoff_summary
from handoff.migration.recovery import SourceFailure, recover_source, wait_exit
from handoff.system import notify
from handoff.system.sched import waking_without_preempting, yield_cpus
from handoff.transport.unix import Channel, PeerCredentials, connect

if TYPE_CHECKING:
    pass

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


@dataclass
class _Source:
    """One handoff as the source holds it, from connect to the end: what the steps share."""

    app: VmmHost
    path: str
    proc: subprocess.Popen[bytes] | None
    token: bytes | None
    copy_memory: bool
    peer_process: PeerOpener
    conn: protocol.HandoffConnection
    peer: Peer | None = None
    target: PeerProcess | None = None
    peer_pid: int = 0
    escrow: PeerVm | None = None  # the target's VM (Prepared)
    watch: int | None = None  # a dup of the connection: a late Resumed is read there
    states: list[VcpuState] | None = None  # what the pause read; the recovery loads it back
    stream: socket.socket | None = None  # the --copy-memory baseline's stream
    deadline: float = math.inf  # the blackout's end (time.monotonic)
    too_late: str = ""

    @property
    def live(self) -> Peer:
        assert self.peer is not None
        return self.peer

    async def reply(self, expect: type[M]) -> M:
        """The target's next message inside the blackout. It is first awaited without yielding
        to other tasks (Peer.receive_fast): each trip through the scheduler would lengthen the
        pause."""
        if self.copy_memory:
            return (await self.live.receive(expect))[0]
        try:
            return (await self.live.receive_fast(expect, self.deadline - time.monotonic()))[0]
        except HandoffTimeout:
            raise HandoffTimeout(self.too_late) from None


# ---- the steps: one per protocol state, each taking the conversation to the next ---------------


async def _connect_step(s: _Source) -> None:
    """START: connect, check who listens (before anything crosses), send Hello."""
    app, flags, rec = s.app, s.app.flags, s.app.record
    chan = await _connect(s.path, s.proc, flags.handoff_timeout)
    s.watch = os.dup(chan.fileno())  # to find a late Resumed even if `chan` is closed
    try:
        creds = chan.check_peer(flags.allowed_uids())
        if s.proc is not None:
            _check_successor(creds, s.proc, app.successor_pidfd, s.path)
    except CredentialsRefused as exc:
        # Told before anything else crosses (a Refuse carries no fd), then dropped.
        with contextlib.suppress(Exception):
            await Peer(chan, s.conn, flags.handoff_timeout).refuse("credentials", str(exc))
        chan.close()
        raise
    s.peer_pid = rec.peer_pid = creds.pid
    s.target = s.peer_process(creds.pid)
    s.peer = Peer(chan, s.conn, flags.handoff_timeout)
    rec.phase("connect")
    # The setup runs in this VMM's event loop while the guest runs, and its pieces take 100-300
    # us of CPU each: exits that came back meanwhile are served between them (each a stall of
    # its vCPU otherwise).
    await trio.lowlevel.checkpoint()
    await s.live.send(messages.source_hello(s.conn, flags, s.token))


async def _greeted_step(s: _Source) -> None:
    """HELLO: the target's Hello: the version it chose, its token proof."""
    hello, _ = await s.live.receive(protocol.Hello)
    try:
        messages.check_token(s.conn, s.token, hello.proof)
    except AuthRefused as exc:
        await s.live.refuse("auth", str(exc))
        raise
    version = s.conn.version or 1
    if s.app.flags.hypervisor != KVMSTUB and version < protocol.VCPU_STATES_VERSION:
        # Protocol 1 and 2 carry a vCPU as kvm_regs alone: all kvmstub's witness guest has.
        reason = (
            f"the target speaks handoff protocol {version} at most (an older release): a "
            f"guest on {s.app.flags.hypervisor} needs protocol {protocol.VCPU_STATES_VERSION}, "
            "which carries the whole vCPU state; the guest keeps running here"
        )
        await s.live.refuse("version", reason)
        raise Incompatible(reason)
    await s.app.faults.point("source", "hello", s.peer)
    s.app.record.protocol = s.conn.version or 0
    s.app.record.phase("hello")
    await trio.lowlevel.checkpoint()  # (see _connect_step)


async def _describe_step(s: _Source) -> None:
    """GREETED: Describe, with the memfds and the listening control socket."""
    app, vmm, rec = s.app, s.app.vmm, s.app.record
    assert app.control_sock is not None
    describe = messages.describe_from(
        vmm.cfg, app.flags, vmm.sev, vmm.measurement, messages.source_proof(s.conn, s.token),
        copy_memory=s.copy_memory, handoff_id=rec.id,
    )  # fmt: skip
    memfds = [] if s.copy_memory else vmm.memfds
    await s.live.send(describe, [*memfds, app.control_sock.fileno()])
    await app.faults.point("source", "describe", s.peer)
    app.emit("HANDOFF", {"id": rec.id, "status": "active"})


async def _prepared_step(s: _Source) -> None:
    """DESCRIBED: the target built its VM; its VM fd comes in escrow."""
    rec = s.app.record
    _prepared, fds = await s.live.receive(protocol.Prepared)
    got = fds.take()
    s.escrow = PeerVm(got[0])
    s.stream = socket.socket(fileno=got[1]) if s.copy_memory else None
    await s.app.faults.point("source", "prepared", s.peer)
    rec.phase("prepare")
    rec.setup_ms = round(sum(rec.phases.values()), 3)


async def _switchover_step(s: _Source) -> None:
    """PREPARED: pause the guest, read its state, send Switchover with our VM fd."""
    app, vmm, rec = s.app, s.app.vmm, s.app.record
    app.emit("HANDOFF", {"id": rec.id, "status": "device"})
    marks = rec.steps["source"] = {"kick": time.monotonic_ns()}
    await vmm.pause()  # (a pause cut short by the deadline is undone too: the rollback)
    marks["parked"] = time.monotonic_ns()
    rec.pause_seqs = dict(vmm.devices.serial.last_seq)
    await app.faults.point("source", "paused", s.peer)
    if vmm.cfg.mode != "sev-es":
        s.states = await vmm.get_all_states()
    marks["saved"] = time.monotonic_ns()
    devices = await vmm.snapshot_devices()
    marks["devices"] = time.monotonic_ns()
    rec.phase("pause")
    assert vmm.vm is not None
    switchover, states_fd = messages.switchover_from(
        devices,
        s.states,
        version=s.conn.version or 1,
        inline_max=app.flags.vcpu_states_inline_max,
    )
    marks["encoded"] = time.monotonic_ns()
    with states_fd:  # the vCPU state memfd (protocol 3, large states): sent, then closed
        s.live.send_now(switchover, [vmm.vm.fileno(), *states_fd])
    marks["sent"] = time.monotonic_ns()
    rec.steps["vcpus"] = [getattr(v, "times", None) for v in vmm.vcpus]
    rec.steps["vm"] = getattr(vmm.vm, "times", None)
    if s.stream is not None:
        await vmm.send_memory(s.stream)
        s.stream.close()
        s.stream = None
    await app.faults.point("source", "switchover", s.peer)


async def _moved_step(s: _Source) -> None:
    """SWITCHED_OVER: the target holds the guest, not running it."""
    await s.reply(protocol.Moved)
    s.app.record.steps["source"]["moved"] = time.monotonic_ns()
    await s.app.faults.point("source", "moved", s.peer)
    s.app.record.phase("switchover")


async def _commit_step(s: _Source) -> None:
    """MOVED: the commit point."""
    s.live.send_now(protocol.Commit())
    s.app.record.steps["source"]["commit"] = time.monotonic_ns()
    await s.app.faults.point("source", "commit", s.peer)
    s.app.record.phase("commit")


async def _resumed_step(s: _Source) -> None:
    """COMMITTED: the target sends Resumed before it lets a vCPU run."""
    with waking_without_preempting():
        await s.reply(protocol.Resumed)
    s.app.record.steps["source"]["resumed"] = time.monotonic_ns()


SETUP_STEPS: Final[dict[protocol.State, Callable[[_Source], Awaitable[None]]]] = {
    protocol.State.START: _connect_step,
    protocol.State.HELLO: _greeted_step,
    protocol.State.GREETED: _describe_step,
    protocol.State.DESCRIBED: _prepared_step,
}
"""The steps while the guest runs here, by the state the conversation is in."""

BLACKOUT_STEPS: Final[dict[protocol.State, Callable[[_Source], Awaitable[None]]]] = {
    protocol.State.PREPARED: _switchover_step,
    protocol.State.SWITCHED_OVER: _moved_step,
    protocol.State.MOVED: _commit_step,
    protocol.State.COMMITTED: _resumed_step,
}
"""The steps of the blackout, from the pause to the target's Resumed."""


async def _run_steps(
    s: _Source, steps: dict[protocol.State, Callable[[_Source], Awaitable[None]]]
) -> None:
    """Take the step for the conversation's state until it leaves `steps`; each step advances
    the conversation by one message (the protocol machine says where it went)."""
    while (step := steps.get(s.conn.state)) is not None:
        before = s.conn.state
        await step(s)
        assert s.conn.state is not before, f"{step.__name__} left the conversation in {before}"


async def _hand_off(
    app: VmmHost,
    path: str,
    proc: subprocess.Popen[bytes] | None,
    token: bytes | None,
    copy_memory: bool = False,
    peer_process: PeerOpener = PidfdProcess.open,
) -> bool:
    """Run one handoff as the source; return True when the target runs the guest."""
    flags, rec = app.flags, app.record
    workdir = rec.workdir  # the successor's private directory: begin() starts a fresh record
    rec.begin("source")
    rec.workdir = workdir
    app.emit("HANDOFF", {"id": rec.id, "status": "setup"})
    notify.notify("STATUS=handoff: connecting to the target")
    conn = protocol.HandoffConnection(protocol.Role.SOURCE, max_version=flags.max_protocol)
    s = _Source(app, path, proc, token, copy_memory, peer_process, conn)
    s.peer_pid = proc.pid if proc is not None else 0
    # Every exit through the event loop while we hand off: a vCPU thread serving exits needs
    # the interpreter, which the handoff's own steps hold for 0.1 to 0.3 ms at a time; the
    # guest's last lines before the pause waited for it (the pause as the guest saw it grew
    # by 0.2 to 0.3 ms at 1 vCPU). Through the loop they are served between the steps.
    app.vmm.exits_to_loop = True
    try:
        return await _hand_off_steps(s)
    finally:
        app.vmm.exits_to_loop = False


async def _hand_off_steps(s: _Source) -> bool:
    app, proc, conn = s.app, s.proc, s.conn
    try:
        await _setup(s)
        await _blackout(s)
    except (HandoffError, OSError, trio.TooSlowError) as exc:
        reason = str(exc) or type(exc).__name__
        if s.peer is not None:
            await s.peer.refuse("internal", reason)
        recovery = await recover_source(
            SourceFailure(app, conn, s.escrow, s.states, None, proc, s.peer_pid, s.watch, s.target)
        )
        if recovery == "committed":
            log.warning("%s; but the target had already resumed the guest: it keeps it", reason)
        else:
            if s.target is not None:
                s.target.close()
            return await _failed(s, reason, recovery)
    return await _completed(s)


async def _setup(s: _Source) -> None:
    """Connect .. Prepared, while the guest runs. It has a limit too (each wait for the target
    has one; this also bounds a stuck step of our own, which would hold the target's VM in
    escrow for ever), and a stop (SIGTERM) before the pause cancels it
    (App._stop_during_handoff)."""
    app = s.app
    setup_limit = SETUP_TIMEOUTS * app.flags.handoff_timeout
    with trio.move_on_after(setup_limit) as setup:
        app.setup_scope = setup
        if app.stop_requested:
            setup.cancel()
        await _run_steps(s, SETUP_STEPS)
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


async def _blackout(s: _Source) -> None:
    """The pause .. Resumed: the guest is paused from here until the target resumes it."""
    app, vmm, rec = s.app, s.app.vmm, s.app.record
    app.handoff_pausing = True  # from here a stop waits for the outcome (see App)
    if app.control is not None:
        app.control.stop_accepting()
    # Let vCPU tasks holding an exit issue their next KVM_RUN before the kick: a vCPU in
    # KVM_RUN runs until the kick stops it within a quantum, while one left waiting on this
    # task would stop early and lengthen the pause the guest sees.
    await trio.lowlevel.checkpoint()
    t_pause = time.perf_counter()
    requests0, messages0 = vmm.requests_made(), s.live.messages
    # One limit for the whole blackout, whatever step stalls (a hung target, or a stuck step
    # of our own): past it the failure rules take the guest back. Copying memory (the
    # --copy-memory baseline) takes as long as memory is large, so it has none.
    limit = math.inf if s.copy_memory else app.flags.handoff_timeout
    s.too_late = (
        f"the handoff did not finish within {limit:g} s of the pause "
        "(--handoff-timeout); taking the guest back"
    )
    s.deadline = time.monotonic() + limit
    # Events raised inside the blackout reach QMP clients when it ends (events_held).
    with app.events_held(), trio.move_on_after(limit) as blackout:
        await _run_steps(s, BLACKOUT_STEPS)
    if blackout.cancelled_caught:
        raise HandoffTimeout(s.too_late)
    rec.phase("resume")
    rec.downtime_ms = round((time.perf_counter() - t_pause) * 1e3, 3)
    rec.requests_in_pause = vmm.requests_made() - requests0
    rec.messages_in_pause = s.live.messages - messages0


async def _completed(s: _Source) -> bool:
    """The target runs the guest: tell who waits, then tear down."""
    app, flags, rec, vmm, peer_pid = s.app, s.app.flags, s.app.record, s.app.vmm, s.peer_pid
    rec.finish("completed")
    # From here this process only tears down. None of it is urgent, and all of it (about
    # 1.5 ms of CPU with the runtime entry) ran in the guest's first milliseconds on the
    # target, where on a small host the scheduler gave it a CPU even at nice 19 while
    # the kernel's vCPUs waited. So: asleep while the guest settles there; then what others
    # wait for ("completed" for the operator, MAINPID= for systemd) at our own priority; then
    # off the CPUs for the rest (the summary, the successor's directory, the runtime entry,
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
    target = s.target
    pidfd = target.pidfd() if target is not None else None
    if pidfd is not None:
        app.handed_to = (peer_pid, os.dup(pidfd))  # a stop from now on is passed on to it
    if target is not None:
        target.close()
    _close(s)
    if rec.workdir:
        # The target removes its socket once it has taken over; the directory is ours.
        shutil.rmtree(rec.workdir, ignore_errors=True)
    return True


SETTLE_SECONDS = 0.01
"""How long after Resumed the old VMM waits before its bookkeeping (the summary, the
"completed" event, MAINPID=, the successor's directory, the runtime entry). Shorter than the
new VMM's own settling (target.SETTLE_SECONDS), so that the two do not run together."""


async def _failed(s: _Source, reason: str, recovery: str) -> bool:
    app, rec = s.app, s.app.record
    rec.finish("failed", reason, recovery)
    handoff_summary(log, app.flags.name, rec)
    app.emit(
        "HANDOFF",
        {"id": rec.id, "status": "failed", "error-desc": reason, "recovery": recovery},
    )
    notify.notify(f"STATUS=handoff failed ({recovery}): guest running here")
    _close(s)
    if app.nursery is not None:
        # Reaping may take a moment; the VMM is free for the next command meanwhile.
        app.nursery.start_soon(_reap, s.proc, rec.workdir)
    return False


def _close(s: _Source) -> None:
    """Let go of everything the handoff held: the connection, the escrow, the stream."""
    if s.peer is not None:
        s.peer.close()
    if s.escrow is not None:
        s.escrow.close()
    if s.watch is not None:
        with contextlib.suppress(OSError):
            os.close(s.watch)
        s.watch = None
    if s.stream is not None:
        s.stream.close()
        s.stream = None


async def _reap(proc: subprocess.Popen[bytes] | None, workdir: str) -> None:
    """A failed successor must not linger: give it a moment to exit, then kill it."""
    if proc is not None and not await wait_exit(proc, 2.0):
        proc.kill()
        await wait_exit(proc, 2.0)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
