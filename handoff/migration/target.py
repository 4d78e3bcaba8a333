"""The target role: take over a guest that a running VMM hands to us (DESIGN.md section 4).

One step per protocol state (`STEPS`), each advancing the conversation by one message. Before
the source pauses we check its credentials, agree a protocol version, check that the guest it
describes is the one we were asked to run, map its memfds and build our VM and vCPUs over them,
and send our VM fd as escrow. After `Switchover` we move the encryption context (sev, sev-es),
answer `Moved`, load the vCPU states (plain, sev) and restore devices while `Moved` and `Commit`
cross, and resume only after `Commit`, sending `Resumed` before any vCPU runs.

Failures: `recovery.recover_target` executes `conn.recovery()`, the protocol's table: ABORT
after a refusal or a protocol error; TAKEOVER when the source is lost after `Switchover` (a
failed `Resumed` too: `HandoffConnection.undelivered`), done only once its process is really
gone (a pidfd taken when it connected turns readable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from handoff import protocol
from handoff.errors import (
    AuthRefused,
    CredentialsRefused,
    HandoffError,
    Incompatible,
    PeerFailed,
    Refused,
)
from handoff.hv import PeerVm, VcpuState
from handoff.machine.config import GuestConfig
from handoff.machine.devices import DeviceState
from handoff.machine.vmm import collector_paused
from handoff.migration import messages
from handoff.migration.host import PeerOpener, PeerProcess, PidfdProcess, VmmHost
from handoff.migration.peer import Peer, PeerGoneError
from handoff.migration.record import handoff_summary
from handoff.migration.recovery import recover_target
from handoff.migration.rehearsal import rehearse
from handoff.system.sched import restore_for_blackout
from handoff.transport.unix import (
    Channel,
    Listener,
    OwnedFds,
    listen,
)

log = logging.getLogger("handoff.target")

ACCEPT_TIMEOUT_FACTOR = 6  # how many handoff timeouts a fresh target waits for its source


async def take_over(
    app: VmmHost, path: str, nursery: trio.Nursery, peer_process: PeerOpener = PidfdProcess.open
) -> bool:
    """Wait on `path` for a source, take its guest, and leave it running; False if not.
    `peer_process` gives the source's process from its pid (a pidfd; a test running both
    roles in one process gives a fake)."""
    with collector_paused():  # no collector stall inside the blackout
        return await _take_over(app, path, nursery, peer_process)


async def _take_over(
    app: VmmHost, path: str, nursery: trio.Nursery, peer_process: PeerOpener
) -> bool:
    """Wait on `path` for a source, take its guest, and leave it running; False if not."""
    flags = app.flags
    listener = await listen(path)
    log.info("waiting for a handoff on %s", path)
    try:
        with trio.move_on_after(flags.handoff_timeout * ACCEPT_TIMEOUT_FACTOR) as scope:
            chan = await listener.accept()
        if scope.cancelled_caught:
            log.error(
                "no VMM handed a guest over within %g s; exiting",
                flags.handoff_timeout * ACCEPT_TIMEOUT_FACTOR,
            )
            return False
        async with trio.open_nursery() as refusals:
            refusals.start_soon(_refuse_others, listener, flags.max_protocol)
            try:
                ok = await _receive(app, chan, nursery, peer_process)
            finally:
                refusals.cancel_scope.cancel()
    finally:
        listener.close()
        _remove_private_dir(path, flags.token_file, spawned=flags.token_fd is not None)
    return ok


def _remove_private_dir(path: str, token_file: str | None, *, spawned: bool) -> None:
    """An upgrade's successor (`spawned`: its token came on an inherited fd) listens in a
    private directory of its own: once the listener is closed it is not needed, and a source
    that died cannot remove it. (An older release's old VMM put its one-time token in a file
    beside the socket instead.)"""
    directory = os.path.dirname(os.path.abspath(path))
    if token_file is not None and os.path.dirname(os.path.abspath(token_file)) == directory:
        with contextlib.suppress(OSError):
            os.unlink(token_file)
    elif not spawned:
        return  # an operator's own directory and token file: not ours to remove
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only if empty: nothing else is ever removed


def _ancestors() -> list[int]:
    """This process's parent, its parent, and so on (from /proc)."""
    out: list[int] = []
    pid = os.getppid()
    while pid > 1 and pid not in out:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _check_spawner(source_pid: int) -> None:
    """A successor spawned by an upgrade (its token came on an inherited fd) takes a guest
    only from the VMM that started it, an ancestor of ours (its child, or a wrapper's): a
    process of the same uid that read the token (from the pipe, through /proc, before we
    did) must not hand us a guest of its own."""
    if source_pid not in _ancestors():
        raise CredentialsRefused(
            f"source process {source_pid} did not start this VMM: a successor spawned by "
            "`handoff upgrade` takes a guest only from the VMM that started it",
            pid=source_pid,
        )


async def _refuse_others(listener: Listener, max_version: int) -> None:
    """One handoff at a time: a second source gets a clear refusal, not a hang."""
    while True:
        chan = await listener.accept()
        conn = protocol.HandoffConnection(protocol.Role.TARGET, max_version=max_version)
        with contextlib.suppress(Exception):
            data = conn.send(
                protocol.Refuse(
                    code="busy",
                    reason="this VMM is already taking over a guest; the source keeps running",
                )
            )
            with trio.move_on_after(1):
                await chan.send(data)
        chan.close()


async def _wait_source_dead(source: PeerProcess | None, timeout: float) -> bool:
    if source is None:
        return False
    return await source.wait_gone(timeout)


def _check_control(fd: int) -> str | None:
    """Describe's last fd must be the VM's listening QMP socket (we serve it after the resume)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return "Describe's last fd is not the listening control socket (not a socket at all)"
    probe = socket.socket(fileno=os.dup(fd))
    try:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        family = probe.family
    finally:
        probe.close()
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM or not listening:
        return "Describe's last fd is not the listening control socket (a Unix stream listener)"
    return None


def _check_memfds(fds: OwnedFds, cfg: GuestConfig) -> str | None:
    """Each slot's fd must be a regular file (a memfd) at least as long as the slot."""
    for fd, layout in zip(fds, cfg.slots(), strict=True):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"memory slot {layout.slot} did not come with a memfd"
        if st.st_size < layout.size:
            return (
                f"memory slot {layout.slot}'s memfd is {st.st_size} bytes, "
                f"smaller than the slot ({layout.size} bytes)"
            )
    return None


@dataclass
class _Target:
    """One handoff as the target holds it: what the steps share."""

    app: VmmHost
    nursery: trio.Nursery
    conn: protocol.HandoffConnection
    peer: Peer
    source: PeerProcess | None  # the source's process, as a takeover waits for it to be gone
    source_vm: PeerVm | None = None  # Switchover's first fd
    control_path: str = ""
    stream: socket.socket | None = None  # the --copy-memory baseline's stream
    states: list[VcpuState] | None = None
    devices: DeviceState | None = None
    has_context: bool = False  # Vmm.take_context done (sev, sev-es: the context moved here)
    moved: bool = False  # and the states loaded: this VMM holds the guest, not running it
    t0: float = 0.0
    t_prepared: float = 0.0
    t_switchover: float = 0.0
    t_moved: float = 0.0
    requests0: int = 0
    messages0: int = 0

    def __post_init__(self) -> None:
        self.t0 = self.t_prepared = self.t_switchover = self.t_moved = time.perf_counter()


# ---- the steps: one per protocol state, each taking the conversation to the next ---------------


async def _hello_step(t: _Target) -> None:
    """START: the source's Hello."""
    await t.peer.receive(protocol.Hello)
    await t.app.faults.point("target", "hello", t.peer)


async def _greet_step(t: _Target) -> None:
    """HELLO: our Hello, with the version we chose (or a refusal: no common version, token)."""
    try:
        hello = messages.target_hello(t.conn, t.app.flags, t.app.token)
    except Incompatible as exc:
        await t.peer.refuse("version", str(exc))
        raise
    except AuthRefused as exc:
        await t.peer.refuse("auth", str(exc))
        raise
    await t.peer.send(hello)
    t.app.record.protocol = t.conn.version or 0


async def _describe_step(t: _Target) -> None:
    """GREETED: Describe: check the guest is the one we were asked to run, then build our VM
    and vCPUs over its memfds (protocol step 3). Nothing of the guest is touched."""
    app, vmm, rec = t.app, t.app.vmm, t.app.record
    describe, fds = await t.peer.receive(protocol.Describe)
    rec.id = messages.handoff_id_of(describe) or rec.id  # one id on both sides
    await app.faults.point("target", "describe", t.peer)
    with fds:
        try:
            messages.check_token(t.conn, app.token, describe.proof)
        except AuthRefused as exc:
            await t.peer.refuse("auth", str(exc))
            raise
        diffs = app.cfg.differences(messages.guest_config_of(describe))
        theirs = messages.hypervisor_of(describe)
        if theirs != app.flags.hypervisor:
            diffs.append(
                f"the guest runs on {theirs} and this VMM on {app.flags.hypervisor} "
                "(--hypervisor): a guest cannot change kernels in a handoff"
            )
        layout = messages.slots_match(describe, app.cfg)
        if layout and not diffs:
            diffs = [layout]
        if diffs:
            reason = (
                "guest-visible config must match: "
                + "; ".join(diffs)
                + "; the source keeps running"
            )
            await t.peer.refuse("incompatible", reason)
            raise Refused(reason)
        control_fd = fds.pop()
        try:
            problem = _check_control(control_fd) or (
                None if describe.copy_memory else _check_memfds(fds, app.cfg)
            )
            if problem:
                await t.peer.refuse("incompatible", problem + "; the source keeps running")
                raise Refused(problem)
            t.t0 = time.perf_counter()
            if describe.copy_memory:
                # The baseline: fresh memory of our own, filled from a stream later.
                vmm.create_memory()
                await vmm.prepare_incoming(list(vmm.memfds))
            else:
                await vmm.prepare_incoming(fds.take())
            # The vCPU tasks start now, parked: at the resume they only need waking. Wait for
            # them to park here: left to the scheduler, their first steps ran when the target
            # woke for Switchover, inside the blackout.
            vmm.start(t.nursery)
            await vmm.gate.pause()
            if not describe.copy_memory:
                await rehearse(vmm, inline_max=app.flags.vcpu_states_inline_max, describe=describe)
            vmm.sev = messages.sev_cache_of(describe)
            t.control_path = describe.host_flags.get("control", "")
            rec.phase("prepare")
        except BaseException:
            os.close(control_fd)
            raise
    app.control_sock = socket.socket(fileno=control_fd)


async def _prepared_step(t: _Target) -> None:
    """DESCRIBED: Prepared, with our VM fd in escrow."""
    vmm = t.app.vmm
    assert vmm.vm is not None
    restore_for_blackout()  # the source pauses the guest once it has Prepared
    # Sent without a trip through the scheduler, and Switchover awaited the same way: the
    # source, woken by Prepared, takes this CPU at once, and whatever we had left to do (a
    # round of the event loop: 40 to 70 us) ran after its Switchover, in the blackout.
    assert t.conn.description is not None
    if t.conn.description.copy_memory:
        t.stream, stream_peer = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        with stream_peer:
            t.peer.send_now(protocol.Prepared(stream=True), [vmm.vm.fileno(), stream_peer.fileno()])
    else:
        t.peer.send_now(protocol.Prepared(), [vmm.vm.fileno()])
    t.t_prepared = time.perf_counter()
    await t.app.faults.point("target", "prepared", t.peer)


async def _switchover_step(t: _Target) -> None:
    """PREPARED: the source paused the guest; its Switchover starts our part of the blackout.
    It comes within a millisecond or so, and is awaited without a trip through the scheduler."""
    vmm = t.app.vmm
    switchover, fds = await t.peer.receive_fast(
        protocol.Switchover, timeout=t.app.flags.handoff_timeout
    )
    t.t_switchover = time.perf_counter()
    marks = t.app.record.steps["target"] = {"switchover": time.monotonic_ns()}
    t.requests0, t.messages0 = vmm.requests_made(), t.peer.messages - 1
    t.source_vm = PeerVm(fds.pop(0))
    assert t.conn.description is not None
    # Reads and closes the rest of the fds (the vCPU state memfd of protocol 3).
    states, devices = messages.switchover_state(switchover, t.conn.description, fds)
    assert vmm.hypervisor is not None
    try:  # refused now, while the source holds the guest, not when loading it
        for state in states or ():
            vmm.hypervisor.check_state(state)
    except ValueError as exc:  # StateMismatch too
        raise PeerFailed(f"switchover carried vCPU state this VMM cannot load: {exc}") from None
    t.states, t.devices = states, devices
    marks["decoded"] = time.monotonic_ns()
    await t.app.faults.point("target", "switchover", t.peer)
    if t.stream is not None:
        copied = await vmm.receive_memory(t.stream)
        log.info("copied %d bytes of guest memory from the source", copied)


async def _moved_step(t: _Target) -> None:
    """SWITCHED_OVER: take the guest's context (sev, sev-es: the move), answer Moved, then load
    the vCPU states and devices while Moved and Commit cross: the load needs nothing of them,
    and they need nothing of the load, since we resume only after Commit and only after the
    load. A load that fails after Moved is a target that failed before Resumed: the source
    takes the guest back, exact (the table's RESUME_OR_RECLAIM or, after Commit, RECLAIM).
    Moved, Commit and Resumed go without a trip through the scheduler (Peer.send_now,
    receive_fast): nothing else here needs to run before the guest does."""
    vmm, marks = t.app.vmm, t.app.record.steps["target"]
    assert t.source_vm is not None
    await vmm.take_context(t.source_vm)
    t.has_context = True
    t.peer.send_now(protocol.Moved())
    marks["moved"] = time.monotonic_ns()
    await _load_guest(t)
    marks["restored"] = time.monotonic_ns()
    t.app.record.phase("move")
    await t.app.faults.point("target", "moved", t.peer)


async def _commit_step(t: _Target) -> None:
    """MOVED: wait for the commit point."""
    await t.peer.receive_fast(protocol.Commit)
    t.app.record.steps["target"]["commit"] = time.monotonic_ns()
    await t.app.faults.point("target", "commit", t.peer)
    t.app.record.phase("commit")


async def _resumed_step(t: _Target) -> None:
    """COMMITTED: Resumed, before the first KVM_RUN (a source that did not get it takes the
    guest back: `HandoffConnection.undelivered` says what a failed send means)."""
    t.peer.send_now(
        messages.resumed_message(
            t.conn,
            int((t.t_prepared - t.t0) * 1e9),
            int((t.t_moved - t.t_switchover) * 1e9),
            int((time.perf_counter() - t.t_moved) * 1e9),
        )
    )
    rec, vmm = t.app.record, t.app.vmm
    rec.steps["target"]["resumed"] = time.monotonic_ns()
    # The backend adds each vCPU's first run to these once the resume has started it.
    rec.steps["vcpus"] = [getattr(v, "times", None) for v in vmm.vcpus]
    rec.steps["vm"] = getattr(vmm.vm, "times", None)
    await t.app.faults.point("target", "resumed", t.peer)


STEPS: Final[dict[protocol.State, Callable[[_Target], Awaitable[None]]]] = {
    protocol.State.START: _hello_step,
    protocol.State.HELLO: _greet_step,
    protocol.State.GREETED: _describe_step,
    protocol.State.DESCRIBED: _prepared_step,
    protocol.State.PREPARED: _switchover_step,
    protocol.State.SWITCHED_OVER: _moved_step,
    protocol.State.MOVED: _commit_step,
    protocol.State.COMMITTED: _resumed_step,
}
"""The target's steps, by the state the conversation is in."""


async def _take_guest(t: _Target) -> None:
    """Protocol step 7, whatever of it is left: the context, the vCPU states, the devices."""
    assert t.source_vm is not None
    if not t.has_context:
        await t.app.vmm.take_context(t.source_vm)
        t.has_context = True
    await _load_guest(t)


async def _load_guest(t: _Target) -> None:
    assert t.devices is not None
    await t.app.vmm.load_incoming(t.states, t.devices)
    t.moved = True
    t.t_moved = time.perf_counter()


async def _receive(
    app: VmmHost, chan: Channel, nursery: trio.Nursery, peer_process: PeerOpener
) -> bool:
    flags, vmm, rec = app.flags, app.vmm, app.record
    rec.begin("target")
    conn = protocol.HandoffConnection(protocol.Role.TARGET, max_version=flags.max_protocol)
    try:
        creds = chan.check_peer(flags.allowed_uids())
        if flags.token_fd is not None:
            _check_spawner(creds.pid)
    except CredentialsRefused as exc:
        log.error("%s", exc)
        with contextlib.suppress(Exception):
            await chan.send(conn.send(protocol.Refuse(code="credentials", reason=str(exc))))
        chan.close()
        return False
    rec.peer_pid = creds.pid
    t = _Target(
        app, nursery, conn, Peer(chan, conn, flags.handoff_timeout), peer_process(creds.pid)
    )
    try:
        while (step := STEPS.get(conn.state)) is not None:
            before = conn.state
            await step(t)
            assert conn.state is not before, f"{step.__name__} left the conversation in {before}"
        takeover = False
    except (HandoffError, OSError) as exc:
        if not await _recover(t, exc):
            _drop(t)
            return False
        takeover = True

    # Commit point passed (or the source is dead): this VMM owns the guest.
    rec.requests_in_pause = vmm.requests_made() - t.requests0
    rec.messages_in_pause = t.peer.messages - t.messages0
    vmm.resume()
    rec.phase("resume")
    rec.downtime_ms = round((time.perf_counter() - t.t_switchover) * 1e3, 3)
    # The bookkeeping below is not urgent. It waits until the guest has settled here (its
    # first exits served while the old VMM exits and the host's CPUs are busiest), then
    # runs in pieces with a checkpoint between them, so that a vCPU task whose KVM_RUN came
    # back issues the next one at once. Clients of the control socket wait in its backlog.
    await trio.sleep(SETTLE_SECONDS)
    app.adopt_control(t.control_path)
    await trio.lowlevel.checkpoint()
    app.start_control(nursery)
    await trio.lowlevel.checkpoint()
    rec.finish("completed", recovery="takeover" if takeover else "")
    handoff_summary(log, flags.name, rec)
    await trio.lowlevel.checkpoint()
    t.peer.close()
    if t.source_vm is not None:
        t.source_vm.close()
    if t.source is not None:
        t.source.close()
    return True


async def _recover(t: _Target, exc: HandoffError | OSError) -> bool:
    """A step failed: tell the source why where the failure is ours, then execute the protocol's
    table (`recovery.recover_target`). True when this VMM must run the guest now (a takeover
    from a source that is gone), False when it steps aside."""
    conn = t.conn
    switched = t.devices is not None  # a usable Switchover came: we can hold the guest
    if conn.state is protocol.State.DONE:
        # Our Resumed could not be sent: the source never learnt it (see `undelivered`).
        conn.undelivered()
    elif not isinstance(exc, Refused | PeerGoneError) and (
        not switched or (isinstance(exc, OSError) and not t.moved)
    ):
        # A failure of ours before we held the guest: refused, so the table says ABORT and the
        # source keeps (or takes back) the guest.
        await t.peer.refuse("internal", f"{exc}; the source keeps running")
    if not switched:
        log.error("handoff refused or failed before switchover: %s", exc)
        return False
    if conn.recovery() is not protocol.Recovery.TAKEOVER:
        log.error("handoff failed after switchover (%s); the source keeps the guest", exc)
        return False
    if not await recover_target(conn, t.source):
        log.error(
            "source lost after switchover (%s) but still alive: it keeps the guest (our VM is "
            "in its escrow, or its own VM was never touched); stepping aside",
            exc,
        )
        return False
    log.warning("source died after switchover (%s): taking over", exc)
    if not t.moved:
        try:
            await _take_guest(t)
        except OSError as exc2:
            log.error("takeover failed: %s", exc2)
            return False
    return True


SETTLE_SECONDS = 0.02
"""How long after the resume the new VMM leaves its bookkeeping (control socket, records,
runtime entry, READY=1) to the vCPU tasks' turn."""


def _drop(t: _Target) -> None:
    t.peer.close()
    if t.source_vm is not None:
        t.source_vm.close()
    if t.source is not None:
        t.source.close()
    if t.stream is not None:
        t.stream.close()
    app = t.app
    if app.control_sock is not None:
        app.control_sock.close()
        app.control_sock = None
    app.vmm.close()
