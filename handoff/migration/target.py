"""The target role: take over a guest that a running VMM hands to us (DESIGN.md section 4).

Before the source pauses we check its credentials, agree a protocol version, check that the
guest it describes is the one we were asked to run, map its memfds and build our VM and vCPUs
over them, and send our VM fd as escrow. After `Switchover` we move the encryption context
(sev, sev-es), set registers (plain, sev), restore devices, answer `Moved`, and resume only after
`Commit`, sending `Resumed` before any vCPU runs.

If the handoff fails after `Switchover`, the protocol's table decides (`conn.recovery()`): after
a refusal or a protocol error, ABORT; if the source is lost or silent, TAKEOVER, which we do only
when its process is really gone (a pidfd taken when it connected becomes readable); a source
that is alive but silent keeps the guest (it still holds our VM in escrow), and we step aside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time

import trio

from handoff import protocol
from handoff.errors import (
    AuthRefused,
    CredentialsRefused,
    HandoffError,
    HandoffTimeout,
    Incompatible,
    PeerFailed,
    Refused,
    TransportError,
)
from handoff.machine.config import GuestConfig
from handoff.machine.vmm import collector_paused
from handoff.migration import messages
from handoff.migration.host import PeerOpener, PeerProcess, PidfdProcess, VmmHost
from handoff.migration.peer import Peer, PeerGoneError
from handoff.migration.record import handoff_summary
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


async def _receive(
    app: VmmHost, chan: Channel, nursery: trio.Nursery, peer_process: PeerOpener
) -> bool:
    flags, vmm, rec = app.flags, app.vmm, app.record
    rec.begin("target")
    try:
        creds = chan.check_peer(flags.allowed_uids())
        if flags.token_fd is not None:
            _check_spawner(creds.pid)
    except CredentialsRefused as exc:
        log.error("%s", exc)
        conn = protocol.HandoffConnection(protocol.Role.TARGET, max_version=flags.max_protocol)
        with contextlib.suppress(Exception):
            await chan.send(conn.send(protocol.Refuse(code="credentials", reason=str(exc))))
        chan.close()
        return False
    rec.peer_pid = creds.pid
    pidfd = peer_process(creds.pid)  # the source's process (named so for the lines below)
    conn = protocol.HandoffConnection(protocol.Role.TARGET, max_version=flags.max_protocol)
    peer = Peer(chan, conn, flags.handoff_timeout)
    source_vm: int | None = None
    control_path = ""
    stream: socket.socket | None = None
    stream_peer: socket.socket | None = None
    t0 = t_prepared = t_moved = time.perf_counter()
    try:
        await peer.receive(protocol.Hello)
        await app.faults.point("target", "hello", peer)
        try:
            hello = messages.target_hello(conn, flags, app.token)
        except Incompatible as exc:
            await peer.refuse("version", str(exc))
            raise
        except AuthRefused as exc:
            await peer.refuse("auth", str(exc))
            raise
        await peer.send(hello)
        rec.protocol = conn.version or 0
        describe, fds = await peer.receive(protocol.Describe)
        rec.id = messages.handoff_id_of(describe) or rec.id  # one id on both sides
        await app.faults.point("target", "describe", peer)
        with fds:
            try:
                messages.check_token(conn, app.token, describe.proof)
            except AuthRefused as exc:
                await peer.refuse("auth", str(exc))
                raise
            theirs = messages.guest_config_of(describe)
            diffs = app.cfg.differences(theirs)
            layout = messages.slots_match(describe, app.cfg)
            if layout and not diffs:
                diffs = [layout]
            if diffs:
                reason = (
                    "guest-visible config must match: "
                    + "; ".join(diffs)
                    + "; the source keeps running"
                )
                await peer.refuse("incompatible", reason)
                raise Refused(reason)
            control_fd = fds.pop()
            try:
                problem = _check_control(control_fd) or (
                    None if describe.copy_memory else _check_memfds(fds, app.cfg)
                )
                if problem:
                    await peer.refuse("incompatible", problem + "; the source keeps running")
                    raise Refused(problem)
                t0 = time.perf_counter()
                if describe.copy_memory:
                    # The baseline: fresh memory of our own, filled from a stream later.
                    vmm.create_memory()
                    await vmm.prepare_incoming(list(vmm.memfds))
                    stream, stream_peer = socket.socketpair(
                        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                    )
                else:
                    await vmm.prepare_incoming(fds.take())
                # The vCPU tasks start now, parked: at the resume they only need waking.
                # Wait for them to park here: left to the scheduler, their first steps ran
                # when the target woke for Switchover, inside the blackout.
                vmm.start(nursery)
                await vmm.gate.pause()
                vmm.sev = messages.sev_cache_of(describe)
                control_path = describe.host_flags.get("control", "")
                rec.phase("prepare")
            except BaseException:
                os.close(control_fd)
                raise
        app.control_sock = socket.socket(fileno=control_fd)
        assert vmm.vm is not None
        restore_for_blackout()  # the source pauses the guest once it has Prepared
        # Sent without a trip through the scheduler, and awaited the same way below: the
        # source, woken by Prepared, takes this CPU at once, and whatever we had left to do
        # (a round of the event loop: 40 to 70 µs) ran after its Switchover, in the blackout.
        if stream_peer is not None:
            peer.send_now(protocol.Prepared(stream=True), [vmm.vm.fileno(), stream_peer.fileno()])
            stream_peer.close()
        else:
            peer.send_now(protocol.Prepared(), [vmm.vm.fileno()])
        t_prepared = time.perf_counter()
        await app.faults.point("target", "prepared", peer)
        # The source pauses now; its Switchover starts our part of the blackout.
        # The source pauses the guest as soon as it has Prepared: its Switchover comes within
        # a millisecond or so, and is awaited without a trip through the scheduler.
        switchover, fds = await peer.receive_fast(
            protocol.Switchover, timeout=flags.handoff_timeout
        )
        t_sw = time.perf_counter()
        requests0, messages0 = vmm.requests_made(), peer.messages - 1
        source_vm = fds.pop(0)
        assert conn.description is not None
        # Reads and closes the rest of the fds (the vCPU state memfd of protocol 3).
        regs, devices = messages.switchover_state(switchover, conn.description, fds)
        await app.faults.point("target", "switchover", peer)
        if stream is not None:
            copied = await vmm.receive_memory(stream)
            log.info("copied %d bytes of guest memory from the source", copied)
    except (HandoffError, OSError) as exc:
        # Nothing of the guest was touched: the source keeps (or resumes) it.
        log.error("handoff refused or failed before switchover: %s", exc)
        if not isinstance(exc, Refused | PeerGoneError):
            await peer.refuse("internal", f"{exc}; the source keeps running")
        _drop(app, peer, source_vm, pidfd)
        return False

    takeover = False
    moved = False
    try:
        await vmm.complete_incoming(source_vm, regs, devices)
        moved = True
        t_moved = time.perf_counter()
        rec.phase("move")
        # Moved, Commit and Resumed go without a trip through the scheduler (Peer.send_now,
        # receive_fast): nothing else here needs to run before the guest does.
        peer.send_now(protocol.Moved())
        await app.faults.point("target", "moved", peer)
        await peer.receive_fast(protocol.Commit)
        await app.faults.point("target", "commit", peer)
        rec.phase("commit")
    except (PeerGoneError, HandoffTimeout, PeerFailed, Refused, TransportError, OSError) as exc:
        # The protocol's table says what to do (conn.recovery()): ABORT after a refusal or a
        # protocol error (the source, alive, takes the guest back), TAKEOVER when the source is
        # gone or silent after Switchover, which this shell does only if its process is dead.
        if isinstance(exc, OSError) and not moved:
            # Our own step failed before we held the guest: refused, so the table says ABORT.
            await peer.refuse("internal", f"{exc}; the source keeps running")
        recovery = conn.recovery()
        if recovery is not protocol.Recovery.TAKEOVER:
            log.error("handoff failed after switchover (%s); the source keeps the guest", exc)
            _drop(app, peer, source_vm, pidfd)
            return False
        if not await _wait_source_dead(pidfd, 1.0):
            log.error(
                "source lost after switchover (%s) but still alive: it keeps the guest "
                "(our VM is in its escrow); stepping aside",
                exc,
            )
            _drop(app, peer, source_vm, pidfd)
            return False
        log.warning("source died after switchover (%s): taking over", exc)
        if not moved:
            try:
                await vmm.complete_incoming(source_vm, regs, devices)
            except OSError as exc2:
                log.error("takeover failed: %s", exc2)
                _drop(app, peer, source_vm, pidfd)
                return False
        takeover = True

    # Commit point passed (or the source is dead): this VMM owns the guest.
    if not takeover:
        try:
            peer.send_now(
                messages.resumed_message(
                    conn,
                    int((t_prepared - t0) * 1e9),
                    int((t_moved - t_sw) * 1e9),
                    int((time.perf_counter() - t_moved) * 1e9),
                )
            )
        except (HandoffError, OSError) as exc:
            # Resumed must come before the first KVM_RUN: a source that did not get it takes
            # the guest back. So run it only if the source is dead (then nobody else will).
            if not await _wait_source_dead(pidfd, 1.0):
                log.error(
                    "could not send Resumed (%s) and the source is alive: it takes the guest "
                    "back; stepping aside",
                    exc,
                )
                _drop(app, peer, source_vm, pidfd)
                return False
            log.warning("could not send Resumed (%s), but the source is dead: taking over", exc)
            takeover = True
        await app.faults.point("target", "resumed", peer)
    rec.requests_in_pause = vmm.requests_made() - requests0
    rec.messages_in_pause = peer.messages - messages0
    vmm.resume()
    rec.phase("resume")
    rec.downtime_ms = round((time.perf_counter() - t_sw) * 1e3, 3)
    # The bookkeeping below is not urgent. It waits until the guest has settled here (its
    # first exits served while the old VMM exits and the host's CPUs are busiest), then
    # runs in pieces with a checkpoint between them, so that a vCPU task whose KVM_RUN came
    # back issues the next one at once. Clients of the control socket wait in its backlog.
    await trio.sleep(SETTLE_SECONDS)
    app.adopt_control(control_path)
    await trio.lowlevel.checkpoint()
    app.start_control(nursery)
    await trio.lowlevel.checkpoint()
    rec.finish("completed", recovery="takeover" if takeover else "")
    handoff_summary(log, flags.name, rec)
    await trio.lowlevel.checkpoint()
    peer.close()
    with contextlib.suppress(OSError):
        os.close(source_vm)
    if pidfd is not None:
        pidfd.close()
    return True


SETTLE_SECONDS = 0.02
"""How long after the resume the new VMM leaves its bookkeeping (control socket, records,
runtime entry, READY=1) to the vCPU tasks' turn."""


def _drop(app: VmmHost, peer: Peer, source_vm: int | None, source: PeerProcess | None) -> None:
    peer.close()
    if source_vm is not None:
        with contextlib.suppress(OSError):
            os.close(source_vm)
    if source is not None:
        source.close()
    if app.control_sock is not None:
        app.control_sock.close()
        app.control_sock = None
    app.vmm.close()
