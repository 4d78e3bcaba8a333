"""The target of a cross-host SEV migration: the shell of `protocol.remote` for the VMM started
with `handoff run --incoming tcp:ADDR:PORT` (DESIGN section 8).

It listens with mutual TLS, answers the source's Hello and Describe (a guest whose visible
configuration differs from this VMM's flags is refused), hands out this platform's PDH chain,
records the session id durably before RECEIVE_START (a replayed stream is refused: the
firmware alone would receive it twice), then feeds every page frame the protocol machine
accepted to RECEIVE_UPDATE_DATA (private) or the memfd (shared). After `Finish` it says
`Received` and holds the guest, unrunnable, until `Commit`: then RECEIVE_FINISH, the registers
and devices, `Resumed`, and only then the vCPUs run.

What happens to the guest when the conversation ends early is the recovery table's row,
executed (`_recover`): drop, tear down (the VM closed: DECOMMISSION, its ASID freed), hold (wait
for the source's decision on a new connection), or finish and run. A held guest whose source
host is dead waits for the operator instead (`operator_resolve`, once the host is fenced):
finish and run, or give up; `remote.HELD_DECISIONS` decides both.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import trio

from handoff.errors import HandoffError, Refused
from handoff.hv import SevMigrationVm, VcpuState, batch_index, fw_error, migration_vm, sev_platform
from handoff.machine.devices import DeviceState
from handoff.machine.vmm import Vmm
from handoff.migration.groups import one_failure
from handoff.protocol import remote
from handoff.protocol.remote import (
    Cancel,
    CancelCode,
    Ending,
    PeerGone,
    Recovery,
    RemoteConnection,
    Role,
)
from handoff.transport import tcp

log = logging.getLogger("handoff.migrate")

#: How long the target waits for any one message of the source.
ANSWER_TIMEOUT = 30.0
#: How many lists of messages that arrived together are read ahead of RECEIVE_UPDATE_DATA.
READ_AHEAD = 8


class BurntSessions:
    """The sessions this host received (hex ids, one a line, in a 0600 file, fsync'ed before
    RECEIVE_START): a `Container[bytes]` for the protocol machine. Every target VMM of a host
    names the same file, so a stream replayed to another target on this host is refused."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids: set[bytes] = set()
        self.reload()

    def reload(self) -> None:
        try:
            with open(self.path, encoding="ascii") as f:
                for line in f:
                    try:
                        self._ids.add(bytes.fromhex(line.strip()))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass

    def __contains__(self, session: object) -> bool:
        self.reload()  # another target on this host may have burnt it meanwhile
        return session in self._ids

    def burn(self, session: bytes) -> None:
        """Record `session` durably (the caller calls RECEIVE_START only after this)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, session.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._ids.add(session)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._ids)


def guest_differences(vmm: Vmm, describe: remote.Describe) -> list[str]:
    """What the source's guest has that this VMM's flags do not (empty: compatible)."""
    cfg = vmm.cfg
    out = []
    for name, ours, theirs in (
        ("vCPUs", cfg.vcpus, describe.vcpus),
        ("memory", cfg.memory, describe.memory_bytes),
        ("mode", cfg.mode, describe.mode),
        ("policy", cfg.policy, describe.policy),
        ("line-every", cfg.line_every, describe.line_every),
        ("flip-every", cfg.flip_every, describe.flip_every),
    ):
        if ours != theirs:
            if name == "policy":
                out.append(f"policy: source {theirs:#x}, target {ours:#x}")
            else:
                out.append(f"{name}: source {theirs}, target {ours}")
    slots = tuple((s.slot, s.guest_phys_addr, s.size) for s in describe.slots)
    if slots != tuple((s.slot, s.guest_phys_addr, s.size) for s in cfg.slots()):
        out.append("memory slots differ")
    return out


class _Ended(Exception):
    """The conversation ended (the machine knows how); `_recover` reads its plan."""


class RemoteTarget:
    """Receive one guest on `listener`; `run()` is True once the guest runs here."""

    def __init__(
        self,
        vmm: Vmm,
        vm_name: str,
        vm_uuid: str,
        listener: tcp.Listener,
        burnt: BurntSessions,
        nursery: trio.Nursery,
        emit: Callable[[dict[str, Any]], None] = lambda data: None,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.vmm = vmm
        self.vm_name = vm_name
        self.vm_uuid = uuid.UUID(vm_uuid)
        self.listener = listener
        self.burnt = burnt
        self.nursery = nursery
        self.emit = emit
        self.answer_timeout = answer_timeout
        self.conn: RemoteConnection | None = None
        self.channel: tcp.Channel | None = None
        self.prepared = False
        self.held: RemoteConnection | None = None  # a session received whole, not committed
        self.devices: remote.DeviceState | None = None
        self.states: list[VcpuState] = []
        self.error = ""
        self.outcome = ""
        # The operator's decision for a held guest (`operator_resolve`), executed by `run`.
        self._operator: remote.OperatorDecision | None = None
        self._operator_done = trio.Event()
        self._operator_error = ""
        self._accepting: trio.CancelScope | None = None

    async def run(self) -> bool:
        """Accept sources until the guest runs here (True), or what was received was torn
        down or dropped (False; the process then exits)."""
        while True:
            if self._operator is not None:
                done = await self._operator_act(self._operator)
                if done is not None:
                    return done
            channel = None
            with trio.CancelScope() as self._accepting:
                try:
                    channel = await self.listener.accept()
                except HandoffError as exc:  # a peer that failed TLS never got a byte
                    log.warning("refused a connection: %s", exc)
            self._accepting = None
            if channel is None:
                continue
            self.channel = channel
            try:
                running = await self._serve(channel)
            finally:
                with trio.CancelScope(shield=True):
                    await channel.aclose()
                self.channel = None
            if running is not None:
                return running

    # ---- one connection -------------------------------------------------------------------

    async def _send(self, message: remote.Message) -> None:
        assert self.conn is not None and self.channel is not None
        await self.channel.send(self.conn.send(message))

    async def _receive(self) -> remote.Message:
        assert self.conn is not None and self.channel is not None
        try:
            with trio.fail_after(self.answer_timeout):
                frame = await self.channel.receive()
        except trio.TooSlowError:
            raise self._timed_out() from None
        return self._accept(frame)

    def _timed_out(self) -> _Ended:
        """The source sent nothing for `answer_timeout`: the machine gives up, and this ends
        the conversation."""
        assert self.conn is not None
        self.conn.give_up(Ending.TIMEOUT)
        return _Ended(f"the source sent nothing for {self.answer_timeout:g} s")

    async def _refuse(self, code: str, reason: str) -> None:
        conn = self.conn
        if conn is not None and conn.may_cancel():
            try:
                with trio.move_on_after(2):
                    await self._send(Cancel(code=code, reason=reason[:1000]))
            except (OSError, HandoffError, remote.ProtocolError):
                pass
        if conn is not None and conn.ended_in is None:
            conn.give_up(Ending.LOCAL_FAILURE)
        raise _Ended(reason)

    async def _serve(self, channel: tcp.Channel) -> bool | None:
        self.conn = conn = RemoteConnection(Role.TARGET, burnt_sessions=self.burnt)
        try:
            await self._converse(conn)
        except (_Ended, OSError, HandoffError, remote.ProtocolError) as exc:
            self.error = str(exc)
            log.warning("migration from %s ended: %s", channel, self.error)
        return await self._recover(conn)

    async def _converse(self, conn: RemoteConnection) -> None:
        vmm = self.vmm
        await self._receive()  # Hello
        refusal = conn.version_refusal()
        if refusal is not None:
            await self._refuse(refusal.code, refusal.reason)
        await self._send(conn.make_hello(vm_name=self.vm_name, vm_uuid=self.vm_uuid))
        first = await self._receive()
        if isinstance(first, remote.Resolve):
            await self._resolve(first)
            return
        assert isinstance(first, remote.Describe)
        if self.held is not None:
            await self._refuse(
                CancelCode.INCOMPATIBLE,
                "this target holds a received guest until its source decides; start another",
            )
        diff = guest_differences(vmm, first)
        if diff:
            await self._refuse(
                CancelCode.INCOMPATIBLE,
                "the target's guest-visible configuration differs (" + "; ".join(diff) + "); "
                "start the target with the source's flags; the source keeps running",
            )
        if not self.prepared:
            await vmm.prepare_incoming_sev()
            self.prepared = True
        assert vmm.vm is not None and vmm.hypervisor is not None
        vm = migration_vm(vmm.vm, vmm.hypervisor.name)
        platform = sev_platform(vmm.hypervisor)
        pdh, plat_certs = await platform.sev_pdh_cert_export()
        amd_certs = await platform.sev_amd_cert_chain()
        await self._send(remote.platform_chain(pdh, plat_certs, amd_certs))
        start = await self._receive()  # a burnt session is refused by the machine
        assert isinstance(start, remote.SendStart) and conn.session_id is not None
        self.burnt.burn(conn.session_id)
        try:
            await vm.sev_receive_start(start.source_pdh, start.session, start.policy)
        except OSError as exc:
            await self._refuse(CancelCode.FIRMWARE, f"RECEIVE_START failed: {_fw(exc)}")
        self.emit({"status": "active", "session": conn.session_id.hex()})
        await self._receive_stream(vm)
        await self._send(remote.Received(session=conn.session_id))
        self.held = conn
        commit = await self._receive()
        assert isinstance(commit, remote.Commit)
        await self._finish_and_run(conn)

    async def _receive_stream(self, vm: SevMigrationVm) -> None:
        """The rounds, the device state and the registers, up to `Finish`. A pipeline: one
        task reads and checks frames (the protocol machine refuses a reordered, repeated or
        retargeted page there, before the firmware sees it) while this one feeds the pages
        already accepted to RECEIVE_UPDATE_DATA, a batch of private pages (one frame)
        submitted together (one command per page, in order)."""
        vmm = self.vmm
        assert vmm.hypervisor is not None
        accepted_in, accepted = trio.open_memory_channel[list[remote.Message | BaseException]](
            READ_AHEAD
        )
        todo: collections.deque[remote.Message | BaseException] = collections.deque()
        async with one_failure(), trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stream, accepted_in)
            while True:
                if not todo:
                    try:
                        todo.extend(accepted.receive_nowait())
                    except trio.WouldBlock:
                        todo.extend(await accepted.receive())
                message = todo.popleft()
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, remote.EncryptedPages):
                    await self._receive_pages(vm, message)
                elif isinstance(message, remote.SharedPage):
                    vmm.write_page(message.gpa, message.data)
                elif isinstance(message, remote.DeviceState):
                    self.devices = message
                elif isinstance(message, remote.VcpuState):
                    wire = message.state
                    state = VcpuState(backend=wire.backend, version=wire.version, blob=wire.blob)
                    try:
                        vmm.hypervisor.check_state(state)
                    except ValueError as exc:
                        await self._refuse(CancelCode.INCOMPATIBLE, str(exc))
                    self.states.append(state)
                elif isinstance(message, remote.Finish):
                    return

    async def _read_stream(
        self, accepted: trio.MemorySendChannel[list[remote.Message | BaseException]]
    ) -> None:
        """The pipeline's first stage: the messages up to `Finish`, or what ended the
        conversation, in lists of those that arrived together. The source has
        `answer_timeout` for each read that has to wait (as `_receive`), measured by one
        deadline moved along rather than a cancel scope per read: the reads are many, one per
        TLS record."""
        assert self.conn is not None and self.channel is not None
        channel = self.channel
        async with accepted:
            with trio.CancelScope() as timer:
                while True:
                    messages: list[remote.Message | BaseException] = []
                    try:
                        timer.deadline = trio.current_time() + self.answer_timeout
                        frame = await channel.receive()
                        message = self._accept(frame)
                        messages.append(message)
                        while not isinstance(message, remote.Finish):
                            frame = channel.take_buffered()
                            if frame is None:
                                break
                            message = self._accept(frame)
                            messages.append(message)
                    except (_Ended, OSError, HandoffError, remote.ProtocolError) as exc:
                        messages.append(exc)
                        timer.deadline = math.inf
                        await accepted.send(messages)
                        return
                    try:
                        accepted.send_nowait(messages)  # the next read is the checkpoint
                    except trio.WouldBlock:
                        timer.deadline = math.inf  # not while the other stage catches up
                        await accepted.send(messages)
                    if isinstance(message, remote.Finish):
                        return
            # Only the timer ends the loop here: the source sent nothing in time.
            await accepted.send([self._timed_out()])

    def _accept(self, frame: bytes | None) -> remote.Message:
        """The machine's judgement of a frame of the source's (None: the end of the
        connection); the end and a Cancel raise `_Ended`."""
        assert self.conn is not None
        message = self.conn.receive(frame)
        if isinstance(message, PeerGone):
            raise _Ended(f"the source closed the connection in {message.lost_in.name}")
        if isinstance(message, Cancel):
            raise _Ended(f"the source cancelled: {message.reason} ({message.code})")
        return message

    async def _receive_pages(self, vm: SevMigrationVm, batch: remote.EncryptedPages) -> None:
        try:
            await vm.sev_receive_update_data_batch(batch.packets())
        except OSError as exc:
            index = batch_index(exc)
            gpa = batch.gpas[index if index is not None else 0]
            await self._refuse(
                CancelCode.FIRMWARE,
                f"RECEIVE_UPDATE_DATA of the page at {gpa:#x} failed: {_fw(exc)}; the target "
                "tears its copy down",
            )

    async def _finish_and_run(self, conn: RemoteConnection) -> None:
        """RECEIVE_FINISH, the registers and devices, `Resumed` (if the connection is still
        there), then the vCPUs run."""
        vmm = self.vmm
        assert vmm.vm is not None and vmm.hypervisor is not None and self.devices is not None
        assert conn.session_id is not None
        with trio.CancelScope(shield=True):
            await migration_vm(vmm.vm, vmm.hypervisor.name).sev_receive_finish()
            await vmm.set_all_states(self.states)
            blobs = self.devices.device_blobs
            partial = msgspec.msgpack.decode(
                blobs.get("serial-partial", b"\x90"), type=list[tuple[int, bytes]]
            )
            vmm.devices.restore(
                DeviceState(
                    doorbell_sums=DeviceState.sums_from_blob(blobs.get("doorbell", b"")),
                    shared_regions=[tuple(r) for r in conn.shared_regions],  # type: ignore[misc]
                    serial_partial=tuple(partial),
                )
            )
            if vmm.migration_allowed is not None:
                vmm.migration_allowed = blobs.get("migration-control", b"\0") == b"\1"
            self.held = None
            if conn is self.conn and conn.state is remote.State.COMMITTED:
                try:
                    await self._send(remote.Resumed(session=conn.session_id))
                except (OSError, HandoffError, remote.ProtocolError) as exc:
                    log.warning("could not send Resumed (%s); the guest runs here anyway", exc)
            vmm.start(self.nursery)
            vmm.resume()
        self.outcome = "running"
        log.info("the guest runs here (session %s)", conn.session_id.hex())

    async def _resolve(self, request: remote.Resolve) -> None:
        held = self.held
        mine = held is not None and held.session_id == request.session
        plan, outcome = remote.held_outcome(
            request.decision, Recovery.HOLD if mine else (Recovery.DONE if self.outcome else None)
        )
        if plan is Recovery.FINISH_AND_RUN and held is not None:
            await self._finish_and_run(held)
        elif plan is Recovery.TEAR_DOWN:
            self._tear_down()
        await self._send(remote.Resolution(session=request.session, outcome=outcome))

    # ---- the operator's decision for a held guest ------------------------------------------

    def _held_record(self) -> Recovery | None:
        if self.held is not None:
            return Recovery.HOLD
        return Recovery.DONE if self.outcome == "running" else None

    async def operator_resolve(self, decision: remote.OperatorDecision) -> str:
        """The operator's decision for the guest held in doubt (QMP migrate-resolve), to be
        given only once the source host is fenced: "finish" runs it here, "give-up" tears it
        down. Returns the outcome ("running" or "torn-down") once executed.

        Raises:
            Refused: nothing is held in doubt, or a source is connected right now (it may be
                delivering its own decision: try again in a moment).
        """
        try:
            remote.operator_outcome(decision, self._held_record())  # refused here if nothing
        except remote.LocalProtocolError as exc:
            raise Refused(str(exc)) from None
        if self.channel is not None or self._accepting is None or self._operator is not None:
            raise Refused(
                "a source is connected to this target right now (it may be delivering its own "
                "decision for the held guest); see the log and try again in a moment"
            )
        self._operator, self._operator_error = decision, ""
        self._operator_done = done = trio.Event()
        self._accepting.cancel()  # `run` executes it, between connections
        await done.wait()
        if self._operator_error:
            raise Refused(self._operator_error)
        return self.outcome

    async def _operator_act(self, decision: remote.OperatorDecision) -> bool | None:
        """Execute the operator's decision (in `run`, between connections): True once the
        guest runs here, False once it is torn down, None if it no longer applies."""
        self._operator = None
        try:
            plan = remote.operator_outcome(decision, self._held_record())
            held = self.held
            assert held is not None  # operator_outcome acts only on a held guest
            log.warning("operator's decision %r for the held guest: %s", decision, plan.why)
            if plan.recovery is Recovery.FINISH_AND_RUN:
                try:
                    await self._finish_and_run(held)
                except (HandoffError, OSError) as exc:
                    # Told to the operator (QMP's error) as well as where the source's commit
                    # would have reported it.
                    self._operator_error = f"the held guest could not be finished here: {exc}"
                    raise
                return True
            self._tear_down()
            return False
        except remote.LocalProtocolError as exc:  # a source decided meanwhile
            self._operator_error = str(exc)
            return None
        finally:
            self._operator_done.set()

    # ---- the recovery table, executed -----------------------------------------------------

    async def _recover(self, conn: RemoteConnection) -> bool | None:
        if self.outcome == "running":
            return True
        if conn.resolve_request is not None:  # a resolving connection: acted on in _resolve
            return None if self.held is not None else False
        if conn.ended_in is None:
            conn.give_up(Ending.LOCAL_FAILURE)
        plan = conn.recovery()
        log.warning("migration ended in %s: %s", conn.ended_in, plan.why)
        if plan.recovery is Recovery.DROP:
            if self.held is not None and self.held is not conn:
                # Another source, refused: what it prepared is nothing of the held guest's.
                return None
            if conn.state is remote.State.ERROR and conn.ended_in in (
                remote.State.START,
                remote.State.HELLO,
                remote.State.GREETED,
            ):
                return None  # a peer that never described a guest: keep listening
            self._tear_down()
            return False
        if plan.recovery is Recovery.TEAR_DOWN:
            self._tear_down()
            return False
        if plan.recovery is Recovery.HOLD:
            self.held = conn
            log.warning("holding the received guest unrunnable until its source decides")
            return None
        if plan.recovery is Recovery.FINISH_AND_RUN:
            await self._finish_and_run(conn)
            return True
        log.error("%s", plan.why)
        self._tear_down()
        return False

    def _tear_down(self) -> None:
        """DECOMMISSION the half-received guest: closing the VM frees its context and ASID."""
        vmm = self.vmm
        self.held = None
        for vcpu in vmm.vcpus:
            vcpu.close()
        vmm.vcpus = []
        if vmm.vm is not None:
            vmm.vm.close()
            vmm.vm = None
        vmm.status = "torn-down"
        self.outcome = "torn-down"


def _fw(exc: OSError) -> str:
    status = fw_error(exc)
    text = exc.strerror or str(exc)
    return f"{text} (firmware status {status:#x})" if status is not None else text
