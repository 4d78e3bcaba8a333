"""The source of a cross-host SEV migration: the shell of `protocol.remote` for the VMM that
runs the guest (DESIGN section 8, reference/sev-live-migration.md).

One `RemoteSource.run()` per `migrate` command. It drives the protocol machine over a mutual
TLS connection (`transport.tcp`) and calls the SEV firmware through `handoff.hv`:

1. Hello, Describe (the machine refuses an SEV-ES, NOSEND or plain guest before anything is
   sent: `NotMigratable`); the target answers with its platform chain, which is checked against
   the guest policy (`chain_refusal`) before SEND_START.
2. SEND_START towards that chain; `SendStart` carries the session and our PDH.
3. Pre-copy rounds while the guest runs: round 1 sends every populated page, each later round
   what the dirty log says was written since; the shared-region list is read *after* the dirty
   log (Sean Christopherson's rule, reference section 2) and a page whose status changed since
   it was sent goes again, written or not. Private pages go through SEND_UPDATE_DATA, shared
   ones in plaintext. Once what is left would take less than the downtime limit at the rate
   of the last round, the guest is paused and the rest goes in the stop-and-copy round.
4. Device state and the registers (readable for SEV), `Finish`; the target answers `Received`.
5. SEND_FINISH, the commit point, then `Commit`; from here this VMM never runs the guest again
   (the firmware would refuse it anyway: SENT). `Resumed` ends it.

Whatever ends the conversation early, what is done about the guest is the protocol's recovery
table, executed (`_recover`): no rules of its own here.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import trio

from handoff.errors import HandoffError
from handoff.hv import batch_done, fw_error, migration_vm, sev_platform
from handoff.machine.vmm import Vmm
from handoff.migration.groups import one_failure
from handoff.protocol import remote
from handoff.protocol.local import MAX_TEXT_LENGTH, VcpuStateWire
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

PAGE = remote.PAGE_SIZE
#: How long the source waits for any one answer of the target.
ANSWER_TIMEOUT = 30.0
#: Rounds before stop-and-copy whatever is left (a guest that dirties faster than we send).
MAX_PRECOPY_ROUNDS = 30
#: Pages per batch of the page stream: one submission of SEND_UPDATE_DATAs to the kernel
#: stand-in, one frame of private pages (`remote.EncryptedPages`, about 125 KiB; the protocol
#: takes at most `remote.MAX_BATCH_PAGES`) or one write of shared pages' frames. 30 packets are
#: what one kvmstub reply holds (a 128 KiB datagram): each batch costs a round trip to
#: kvmstub, a hand-over between the pipeline's stages and a TLS write, so the fewer the better.
BATCH_PAGES = 30
#: Batches fetched ahead of the one being written.
PIPELINE_BATCHES = 2
#: Attempts (one a second) to deliver Commit on a new connection after the first one broke.
COMMIT_ATTEMPTS = 10
#: Auto-converge, after QEMU's (migration/ram.c, migration_trigger_throttle and
#: mig_throttle_guest_down, with its defaults): once the guest dirtied more than
#: THROTTLE_TRIGGER of what a round sent in THROTTLE_ROUNDS rounds in a row, its vCPUs are
#: throttled by the initial percentage, then by one increment more after each further round
#: that still outran the rounds, up to the maximum. (QEMU waits two periods between steps: a
#: period of its can begin before the last step; each round here runs wholly under the
#: throttle set before it, so one round is a measure of it.)
THROTTLE_INITIAL = 20
THROTTLE_INCREMENT = 10
THROTTLE_MAX = 99
THROTTLE_TRIGGER = 0.5
THROTTLE_ROUNDS = 2


class MigrationFailed(HandoffError):
    """The migration did not complete; the message says where the guest runs now."""


@dataclass
class MigrateOptions:
    """What `migrate` was asked: where to, with which credentials and limits. The two `x_`
    fields are for tests: a page (by its sequence number) whose ciphertext is flipped in
    flight, inside its batch, the frames as sent (inside TLS) written to a file for the test
    to scan, and a floor on the pre-copy rounds (a migration long enough to be cancelled or
    broken in the middle)."""

    address: str
    tls: tcp.TlsFiles
    downtime_limit_ms: float = 300.0
    answer_timeout: float = ANSWER_TIMEOUT
    max_rounds: int = MAX_PRECOPY_ROUNDS
    #: The owner's allow-lists of target platform ids (the VM's `run --target-platform`, the
    #: command's): each non-empty one must name the target's PDH (`remote.platform_id`).
    target_platforms: tuple[tuple[str, ...], ...] = ()
    x_tamper_page: int | None = None
    x_record_frames: str | None = None
    auto_converge: bool = True
    throttle_initial: int = THROTTLE_INITIAL
    throttle_increment: int = THROTTLE_INCREMENT
    throttle_max: int = THROTTLE_MAX
    x_min_rounds: int = 0  # tests: keep pre-copying this many rounds, 50 ms apart
    # Tests: cut the connection "after-received" / "after-send-finish", or die there at once
    # ("kill-after-received" / "kill-after-send-finish": SIGKILL, as a host that lost power).
    x_break: str | None = None
    x_link_pages_per_s: float = 0.0  # tests: a pre-copy round sends no faster (a slow link)

    def __post_init__(self) -> None:
        problem = throttle_problem(
            self.throttle_initial, self.throttle_increment, self.throttle_max
        )
        if problem is not None:
            raise ValueError(problem)


def throttle_problem(
    initial: object, increment: object, maximum: object, *, spell: str = "'{}'"
) -> str | None:
    """What is wrong with auto-converge's settings, in words an operator can act on (None:
    nothing), naming each as `spell` formats it (QMP's 'name', or the command line's
    --name). Each is a whole percentage from 1 to 99 (QEMU's ranges), and the first step
    may not exceed the cap."""
    names = ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle")
    for name, value in zip(names, (initial, increment, maximum), strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 99:
            return f"{spell.format(name)} must be a whole percentage from 1 to 99, not {value!r}"
    assert isinstance(initial, int) and isinstance(maximum, int)
    if initial > maximum:
        return (
            f"{spell.format(names[0])} ({initial} %) exceeds {spell.format(names[2])} "
            f"({maximum} %): the first throttle may not pass the cap"
        )
    return None


def next_throttle(now: int, opts: MigrateOptions) -> int:
    """The throttle after one more trigger: the initial one, then one increment more, up to
    the cap."""
    if not now:
        return opts.throttle_initial
    return min(now + opts.throttle_increment, opts.throttle_max)


@dataclass
class MigrationResult:
    """What one migration did (the QMP event's and `--json`'s data)."""

    status: str = "setup"  # setup, active, device, completed, failed, cancelled
    target: str = ""
    rounds: int = 0
    pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    per_round: list[int] = field(default_factory=list)
    auto_converge: bool = True
    throttle: int = 0  # the guest's vCPU throttle now (percent); 0 once the migration ended
    throttle_per_round: list[int] = field(default_factory=list)  # in force during each round
    downtime_ms: float = 0.0
    total_ms: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    recovery: str = ""
    error: str = ""
    session: str = ""
    target_platform: str = ""  # the target's platform id (its PDH's), once its chain arrived

    def to_qmp(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "target": self.target,
            "rounds": self.rounds,
            "pages": self.pages,
            "private-pages": self.private_pages,
            "shared-pages": self.shared_pages,
            "pages-per-round": list(self.per_round),
            "auto-converge": self.auto_converge,
            "cpu-throttle-percentage": self.throttle,
            "throttle-per-round": list(self.throttle_per_round),
            "downtime-ms": round(self.downtime_ms, 3),
            "total-ms": round(self.total_ms, 3),
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "recovery": self.recovery,
            "error": self.error,
            "session": self.session,
            "target-platform": self.target_platform,
        }


def describe(vmm: Vmm) -> remote.Describe:
    """The guest as the source offers it (no memfd crosses hosts: the slots' shapes)."""
    cfg = vmm.cfg
    return remote.Describe(
        vcpus=cfg.vcpus,
        memory_bytes=sum(s.size for s in cfg.slots()),
        slots=tuple(
            remote.MemorySlot(slot=s.slot, guest_phys_addr=s.guest_phys_addr, size=s.size)
            for s in cfg.slots()
        ),
        mode=cfg.mode,
        policy=cfg.policy,
        line_every=cfg.line_every,
        flip_every=cfg.flip_every,
    )


def check_migratable(vmm: Vmm) -> None:
    """Refuse, before anything is sent, a guest that cannot migrate between hosts.

    Raises:
        MigrationFailed: names why (SEV-ES: no VMSA ioctls upstream; NOSEND; plain).
    """
    why = remote.migration_refusal(describe(vmm))
    if why is not None:
        raise MigrationFailed(why)
    _check_guest_allows(vmm)


def _check_guest_allows(vmm: Vmm) -> None:
    if vmm.migration_allowed is False:
        raise MigrationFailed(
            "the guest has not enabled migration: it wrote 0 to MSR_KVM_MIGRATION_CONTROL (it "
            "is still booting, or rebooting or going down), so its shared-region reports may "
            "be incomplete and a page could move with the wrong type; try again once it runs; "
            "the guest keeps running here"
        )


def shared_pages(regions: list[tuple[int, int]]) -> set[int]:
    return {gpa + i * PAGE for gpa, n in regions for i in range(n)}


def within_memory(
    regions: list[tuple[int, int]], memory: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The shared-region list (sorted (gpa, pages) runs) cut to the guest's memory slots
    (sorted [start, end) ranges), a run across two slots split at their border. KVM passes
    any MAP_GPA_RANGE that does not wrap, so a guest may declare ranges its memory does not
    have, up to 2^40 pages; like QEMU, which ignores shared conversions of unassigned ranges,
    a migration takes only what lies in memory: the pages it sends, and a list the target
    accepts (each run inside one slot)."""
    out: list[tuple[int, int]] = []
    for gpa, pages in regions:
        end = gpa + pages * PAGE
        for start, stop in memory:
            lo, hi = max(gpa, start), min(end, stop)
            if lo < hi:
                out.append((lo, (hi - lo) // PAGE))
    return out


def _shared_regions(vmm: Vmm) -> list[tuple[int, int]]:
    memory = [(s.guest_phys_addr, s.guest_phys_addr + s.size) for s in vmm.cfg.slots()]
    return within_memory(vmm.devices.shared.regions(), memory)


def pages_to_send(
    dirty: set[int], sent: set[int], sent_shared: set[int], shared_now: set[int]
) -> list[int]:
    """A round's pages: those written since they were sent, and those whose status (shared or
    private) changed since they were sent, whether or not they were written: a conversion
    makes the target read the page the other way (reference section 2, races 1 and 3)."""
    changed = {p for p in sent if (p in sent_shared) != (p in shared_now)}
    return sorted(dirty | changed)


class RemoteSource:
    """One migration of `vmm`'s guest to the target at `opts.address`.

    `emit(data)` is called with progress (the QMP MIGRATION event's data). `cancel()` (QMP
    migrate_cancel) stops it while the source may still cancel (until Commit).
    """

    def __init__(
        self,
        vmm: Vmm,
        vm_name: str,
        vm_uuid: str,
        opts: MigrateOptions,
        emit: Callable[[dict[str, Any]], None] = lambda data: None,
    ) -> None:
        self.vmm = vmm
        self.vm_name = vm_name
        self.vm_uuid = uuid.UUID(vm_uuid)
        self.opts = opts
        self.emit = emit
        self.result = MigrationResult(target=opts.address, auto_converge=opts.auto_converge)
        self.conn: RemoteConnection | None = None
        self.channel: tcp.Channel | None = None
        self._scope = trio.CancelScope()
        self._cancel_reason = ""
        self._paused = False
        self._paused_at = 0.0
        self._sent_start = False
        self._t0 = time.perf_counter()
        self._record: Any = None
        self._nursery: trio.Nursery | None = None
        self._peer_error = ""
        self._cancel_delivered = False
        self._inbox_in, self._inbox = trio.open_memory_channel[
            "remote.Message | PeerGone | BaseException"
        ](64)
        #: After SEND_FINISH: this VMM must never run the guest again.
        self.sent = False

    # ---- what the process calls ------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by the operator (migrate_cancel)") -> bool:
        """Stop the migration if it may still be cancelled; False once Commit was sent."""
        if self.sent or (self.conn is not None and not self.conn.may_cancel()):
            return False
        self._cancel_reason = reason
        self._scope.cancel()
        return True

    async def run(self) -> MigrationResult:
        """Migrate; return the result (status completed, or failed / cancelled with the
        recovery that was executed and where the guest runs)."""
        result = self.result
        if self.opts.x_record_frames:
            self._record = open(self.opts.x_record_frames, "wb")  # noqa: SIM115 (closed below)
        try:
            try:
                with self._scope:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await self._converse()
                        nursery.cancel_scope.cancel()  # the reader
            except BaseExceptionGroup as group:
                leaf = _leaf(group)
                if not isinstance(leaf, _FAILURES):
                    raise
                result.error = _describe_error(leaf)
            except _FAILURES as exc:
                result.error = _describe_error(exc)
            done = self.conn is not None and self.conn.state is remote.State.DONE
            if self._peer_error and not done and not self._cancel_reason:
                # The target's Cancel (or its end) is the cause; what failed here after it
                # (a frame the machine would no longer send) is only its echo.
                result.error = self._peer_error
            if self._scope.cancelled_caught and not result.error:
                result.error = self._cancel_reason or "cancelled"
            await self._recover()
        finally:
            # Whatever the outcome, the guest's vCPUs run at full speed again (a source that
            # migrated never runs them again anyway).
            self._throttle(0)
            if self._record is not None:
                self._record.close()
            if self.channel is not None:
                with trio.CancelScope(shield=True):
                    await self.channel.aclose()
        result.total_ms = (time.perf_counter() - self._t0) * 1e3
        self.emit(result.to_qmp())
        return result

    # ---- the conversation ------------------------------------------------------------------

    async def _send(self, message: remote.Message) -> None:
        assert self.conn is not None
        await self._send_frames([self.conn.send(message)])

    async def _send_frames(self, frames: list[bytes]) -> None:
        """Send frames the machine made (`conn.send`), in one write."""
        assert self.conn is not None and self.channel is not None
        if self._record is not None:
            self._record.write(b"".join(len(f).to_bytes(4, "big") + f for f in frames))
        # As fail_after, without its wrapping (a write per batch of pages).
        with trio.CancelScope(deadline=trio.current_time() + self.opts.answer_timeout) as timer:
            await self.channel.send_many(frames)
        if timer.cancelled_caught:
            # A target that stopped reading (hung, or its host): TCP's window stays shut.
            if self.conn.ended_in is None:
                self.conn.give_up(Ending.TIMEOUT)
            raise MigrationFailed(f"the target took no data for {self.opts.answer_timeout:g} s")

    async def _reader(self) -> None:
        """Reads the target's frames as they come, also while pages stream out: a target
        that cancels (a packet RECEIVE_UPDATE_DATA refused) or goes away stops the stream at
        once, instead of when the source next waits for an answer."""
        assert self.conn is not None and self.channel is not None
        while True:
            item: remote.Message | PeerGone | BaseException
            try:
                item = self.conn.receive(await self.channel.receive())
            except (OSError, HandoffError, remote.ProtocolError) as exc:
                if self.conn.ended_in is not None:
                    # We ended it (a send that timed out closed the channel): an echo of our
                    # failure, which the page pipeline may let us see before it unwinds.
                    return
                item = exc
            await self._inbox_in.send(item)
            if isinstance(item, Cancel | PeerGone | BaseException):
                if isinstance(item, Cancel):
                    self._peer_error = f"the target refused: {item.reason} ({item.code})"
                elif isinstance(item, PeerGone):
                    self._peer_error = f"the target closed the connection in {item.lost_in.name}"
                else:
                    self._peer_error = _describe_error(item)
                if not self.sent:  # after Commit the shielded wait reads it from the inbox
                    self._scope.cancel()
                return

    async def _receive(self) -> remote.Message:
        """The target's next message; a Cancel or the end of the connection raise."""
        assert self.conn is not None and self.channel is not None
        try:
            with trio.fail_after(self.opts.answer_timeout):
                message = await self._inbox.receive()
        except trio.TooSlowError:
            self.conn.give_up(Ending.TIMEOUT)
            raise MigrationFailed(
                f"the target did not answer within {self.opts.answer_timeout:g} s"
            ) from None
        if isinstance(message, BaseException):
            raise message
        if isinstance(message, PeerGone):
            raise MigrationFailed(f"the target closed the connection in {message.lost_in.name}")
        if isinstance(message, Cancel):
            raise MigrationFailed(f"the target refused: {message.reason} ({message.code})")
        return message

    async def _converse(self) -> None:
        vmm, result, opts = self.vmm, self.result, self.opts
        assert vmm.vm is not None and vmm.hypervisor is not None
        guest = describe(vmm)
        # NotMigratable (SEV-ES, NOSEND, plain) before a byte is sent.
        self.conn = conn = RemoteConnection(
            Role.SOURCE, guest=guest, allowed_platforms=opts.target_platforms
        )
        vm = migration_vm(vm=vmm.vm, backend=vmm.hypervisor.name)
        platform = sev_platform(vmm.hypervisor)
        t = time.perf_counter()
        self.channel = await tcp.connect(opts.address, opts.tls)
        assert self._nursery is not None
        self._nursery.start_soon(self._reader)
        await self._send(conn.make_hello(vm_name=self.vm_name, vm_uuid=self.vm_uuid))
        await self._receive()
        await self._send(guest)
        chain = await self._receive()
        assert isinstance(chain, remote.PlatformChain)
        result.target_platform = remote.platform_id(chain)
        refusal = conn.chain_refusal()  # the owner's allow-list, the policy: before SEND_START
        if refusal is not None:
            await self._send(refusal)
            raise MigrationFailed(refusal.reason)
        result.phases["connect"] = (time.perf_counter() - t) * 1e3
        result.status = "active"

        t = time.perf_counter()
        try:
            session, policy = await vm.sev_send_start(chain.pdh, chain.plat_certs, chain.amd_certs)
        except OSError as exc:
            await self._cancel_with(CancelCode.POLICY, f"SEND_START failed: {_fw(exc)}")
            raise MigrationFailed(
                f"SEND_START towards the target's chain failed: {_fw(exc)}; the guest keeps "
                "running here"
            ) from exc
        self._sent_start = True
        source_pdh, _ = await platform.sev_pdh_cert_export()
        await self._send(remote.SendStart(session=session, source_pdh=source_pdh, policy=policy))
        assert conn.session_id is not None
        result.session = conn.session_id.hex()
        result.phases["send-start"] = (time.perf_counter() - t) * 1e3

        await self._precopy_and_stop(vm)
        # Device state, the registers (SEV: readable), Finish.
        t = time.perf_counter()
        await self._send_devices()
        await self._send(remote.Finish(rounds=conn.rounds, pages=conn.pages))
        received = await self._receive()
        assert isinstance(received, remote.Received)
        if opts.x_break == "after-received":
            self._cut("after Received")
        if opts.x_break == "kill-after-received":
            _die()
        result.phases["finish"] = (time.perf_counter() - t) * 1e3

        # The commit point: SEND_FINISH first; if it fails we are still SUPDATE.
        t = time.perf_counter()
        with trio.CancelScope(shield=True):
            try:
                await vm.sev_send_finish()
            except OSError as exc:
                raise MigrationFailed(f"SEND_FINISH failed: {_fw(exc)}") from exc
            self.sent = True
            if opts.x_break == "kill-after-send-finish":
                _die()
            if opts.x_break == "after-send-finish":
                conn.send(remote.Commit(session=conn.session_id))  # committed, never delivered
                self._cut("after SEND_FINISH")
            await self._send(remote.Commit(session=conn.session_id))
            resumed = await self._receive()
            assert isinstance(resumed, remote.Resumed)
        result.phases["commit"] = (time.perf_counter() - t) * 1e3
        result.downtime_ms = (time.perf_counter() - self._paused_at) * 1e3

    async def _precopy_and_stop(self, vm: Any) -> None:
        vmm, conn, result, opts = self.vmm, self.conn, self.result, self.opts
        assert conn is not None
        t = time.perf_counter()
        await vmm.set_dirty_logging(True)
        await vmm.dirty_pages()  # nothing yet: logging starts now
        sent: set[int] = set()
        sent_shared: set[int] = set()
        todo: set[int] = set(vmm.populated_pages())
        rate = 0.0  # pages per second of the last round
        round_no = 0
        outrun = 0  # rounds in a row the guest dirtied more than THROTTLE_TRIGGER of them
        while True:
            _check_guest_allows(vmm)  # a guest going down blocks it again (reference 5.1)
            # `todo` holds what the dirty log said after the last round (`_peek_dirty`): one
            # KVM_GET_DIRTY_LOG per round (a 64 GiB slot's bitmap is 2 MiB).
            regions = _shared_regions(vmm)  # after the dirty log
            shared_now = shared_pages(regions)
            pages = pages_to_send(todo, sent, sent_shared, shared_now)
            budget = rate * opts.downtime_limit_ms / 1e3
            converged = len(pages) <= budget or round_no >= opts.max_rounds
            if round_no and round_no >= opts.x_min_rounds and converged:
                break
            if round_no and opts.auto_converge:
                # The rest does not fit the downtime limit yet: a guest that keeps dirtying
                # faster than the rounds send is slowed down, as QEMU's auto-converge does.
                outrun_now = len(todo) > result.per_round[-1] * THROTTLE_TRIGGER
                outrun = outrun + 1 if outrun_now and not converged else 0
                if outrun >= THROTTLE_ROUNDS:
                    self._throttle(next_throttle(vmm.throttle_percent, opts))
            if round_no and opts.x_min_rounds:
                await trio.sleep(0.05)
            round_no += 1
            t_round = time.perf_counter()
            await self._send(remote.Round(round=round_no, shared_regions=tuple(regions)))
            await self._send_pages(vm, pages, shared_now, sent, sent_shared)
            if opts.x_link_pages_per_s:
                await trio.sleep_until(
                    trio.current_time()
                    + len(pages) / opts.x_link_pages_per_s
                    - (time.perf_counter() - t_round)
                )
            await self._send(remote.RoundEnd(round=round_no, pages=len(pages)))
            todo = set()
            seconds = max(time.perf_counter() - t_round, 1e-6)
            rate = len(pages) / seconds if pages else rate or 1e6
            result.rounds, result.per_round = round_no, [*result.per_round, len(pages)]
            result.throttle_per_round.append(vmm.throttle_percent)
            left = len(await self._peek_dirty(todo))
            self.emit(
                {
                    **result.to_qmp(),
                    "status": "active",
                    "round": round_no,
                    "rate-pages-per-s": round(rate, 1),
                    "remaining-pages": left,
                    "eta-ms": round(left / rate * 1e3, 1) if rate else None,
                }
            )
        result.phases["precopy"] = (time.perf_counter() - t) * 1e3

        # Stop and copy.
        self._paused_at = time.perf_counter()
        await vmm.pause()
        self._paused = True
        result.status = "device"
        _check_guest_allows(vmm)
        todo |= set(await vmm.dirty_pages())
        regions = _shared_regions(vmm)
        shared_now = shared_pages(regions)
        pages = pages_to_send(todo, sent, sent_shared, shared_now)
        round_no += 1
        await self._send(remote.StopAndCopy(round=round_no, shared_regions=tuple(regions)))
        await self._send_pages(vm, pages, shared_now, sent, sent_shared)
        await self._send(remote.RoundEnd(round=round_no, pages=len(pages)))
        result.rounds, result.per_round = round_no, [*result.per_round, len(pages)]
        result.throttle_per_round.append(vmm.throttle_percent)
        result.phases["stop-and-copy"] = (time.perf_counter() - self._paused_at) * 1e3

    def _throttle(self, percent: int) -> None:
        """Set the guest's vCPU throttle and say so in the result."""
        self.vmm.set_throttle(percent)
        self.result.throttle = percent

    async def _peek_dirty(self, todo: set[int]) -> set[int]:
        """Read the dirty log into `todo` (for the next round) and return it."""
        todo |= set(await self.vmm.dirty_pages())
        return todo

    async def _send_pages(
        self, vm: Any, pages: list[int], shared_now: set[int], sent: set[int], sent_shared: set[int]
    ) -> None:
        """Send `pages` in order: private ones through SEND_UPDATE_DATA, shared ones in
        plaintext. A pipeline: the firmware's packets of the next batch are fetched (one
        SEND_UPDATE_DATA per page, submitted together) while the previous batch goes out, in
        one write: a batch of private pages as one frame (`EncryptedPages`: session, each
        page's address, the first page's sequence number), a shared page as a frame of its
        own, in the order of `pages`."""
        conn, result = self.conn, self.result
        assert conn is not None
        batches = _batches(pages, shared_now)
        ready_in, ready = trio.open_memory_channel[_Fetched](PIPELINE_BATCHES)
        async with one_failure(), trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch, vm, batches, ready_in)
            async for shared, gpas, items, failure in ready:
                frames: list[bytes] = []
                done = gpas[: len(items)]  # all, unless a SEND_UPDATE_DATA failed
                if shared:
                    for gpa, item in zip(done, items, strict=True):
                        assert isinstance(item, bytes)
                        frames.append(conn.send(conn.shared_page(gpa, item)))
                    sent_shared.update(done)
                    result.shared_pages += len(done)
                elif done:
                    packets = cast(list[tuple[bytes, bytes]], items)
                    tamper = self.opts.x_tamper_page  # a page's index in the session
                    if tamper is not None and 0 <= tamper - conn.pages < len(packets):
                        k = tamper - conn.pages  # a test's bit flipped, in that page's data
                        header, data = packets[k]
                        packets[k] = (header, bytes([data[0] ^ 1]) + data[1:])
                    frames.append(conn.send(conn.encrypted_pages(done, packets)))
                    sent_shared.difference_update(done)
                    result.private_pages += len(done)
                sent.update(done)
                if frames:
                    await self._send_frames(frames)
                    result.pages += len(done)
                if failure is not None:
                    raise failure

    async def _fetch(
        self,
        vm: Any,
        batches: list[tuple[bool, list[int]]],
        ready: trio.MemorySendChannel[_Fetched],
    ) -> None:
        """The pipeline's first stage: each batch's packets (or plaintext), in order; a
        SEND_UPDATE_DATA that fails ends it, after the packets made before it."""
        async with ready:
            for shared, gpas in batches:
                if shared:
                    plain = [self.vmm.read_page(gpa) for gpa in gpas]
                    await ready.send((shared, gpas, plain, None))
                    continue
                try:
                    packets = await vm.sev_send_update_data_batch(gpas)
                except OSError as exc:
                    await ready.send((shared, gpas, batch_done(exc), exc))
                    return
                await ready.send((shared, gpas, packets, None))

    async def _send_devices(self) -> None:
        vmm, conn = self.vmm, self.conn
        assert conn is not None
        snap = await vmm.snapshot_devices()
        if snap.vm_state is not None:
            raise MigrationFailed("this kernel keeps VM-wide state no SEV migration carries")
        partial = msgspec.msgpack.encode(list(snap.serial_partial))
        await self._send(
            remote.DeviceState(
                doorbell_sum=sum(snap.doorbell_sums) & 0xFFFF_FFFF,
                device_blobs={
                    "doorbell": snap.doorbell_blob(),
                    "serial-partial": partial,
                    # The guest's MSR_KVM_MIGRATION_CONTROL, kept by the VMM (it writes it once).
                    "migration-control": bytes([1 if vmm.migration_allowed else 0]),
                },
            )
        )
        for i, state in enumerate(await vmm.get_all_states()):
            await self._send(
                remote.VcpuState(
                    index=i,
                    state=VcpuStateWire(
                        backend=state.backend, version=state.version, blob=state.blob
                    ),
                )
            )

    def _cut(self, where: str) -> None:
        """A test's broken connection (x_break): reset, as a network failure would."""
        assert self.channel is not None
        self.channel.abort()
        raise MigrationFailed(f"the connection to the target broke {where} (x-break)")

    async def _cancel_with(self, code: str, reason: str) -> None:
        """Send Cancel if we still may (best effort: the connection may be gone)."""
        conn, channel = self.conn, self.channel
        if conn is None or channel is None or not conn.may_cancel():
            return
        try:
            with trio.fail_after(2), trio.CancelScope(shield=True):
                await self._send(Cancel(code=code, reason=reason[:MAX_TEXT_LENGTH]))
            self._cancel_delivered = True
        except (OSError, HandoffError, remote.ProtocolError, trio.TooSlowError):
            pass

    # ---- the recovery table, executed ------------------------------------------------------

    async def _recover(self) -> None:
        conn, result = self.conn, self.result
        if conn is None:  # refused before the machine existed (not migratable)
            result.status, result.recovery = "failed", Recovery.NOTHING_TO_DO.value
            return
        if conn.state is remote.State.DONE:
            result.status, result.recovery = "completed", Recovery.DONE.value
            await self._tear_down_sent()
            return
        code = CancelCode.OPERATOR if self._cancel_reason else CancelCode.INTERNAL
        await self._cancel_with(code, result.error or "the source gave up")
        if conn.ended_in is None:
            conn.give_up(Ending.LOCAL_FAILURE)
        plan = conn.recovery()
        result.recovery = plan.recovery.value
        log.warning("migration ended in %s: %s", conn.ended_in, plan.why)
        with trio.CancelScope(shield=True):
            if plan.recovery is Recovery.NOTHING_TO_DO:
                await self._resume_here()
            elif plan.recovery is Recovery.CANCEL_AND_RESUME:
                await self._cancel_and_resume()
            elif plan.recovery is Recovery.DELIVER_COMMIT:
                await self._deliver_commit()
            elif plan.recovery is Recovery.DONE:
                result.status = "completed"
                await self._tear_down_sent()

    async def _resume_here(self) -> None:
        vmm = self.vmm
        self._throttle(0)  # the guest runs on here at full speed
        if self._sent_start or self._paused:
            try:
                await vmm.set_dirty_logging(False)
            except OSError as exc:
                log.warning("could not turn the dirty log off: %s", exc)
        if self._paused:
            vmm.resume()
            self._paused = False
        self.result.status = "cancelled" if self._cancel_reason else "failed"

    async def _cancel_and_resume(self) -> None:
        vmm = self.vmm
        assert vmm.vm is not None and vmm.hypervisor is not None and not self.sent
        try:
            await migration_vm(vmm.vm, vmm.hypervisor.name).sev_send_cancel()
        except OSError as exc:  # leave the guest paused rather than guess
            self.result.status = "failed"
            self.result.error += f"; SEND_CANCEL failed ({_fw(exc)}): the guest stays paused"
            log.error("SEND_CANCEL failed: %s; the guest stays paused here", _fw(exc))
            return
        await self._resume_here()
        log.info("SEND_CANCEL done: the guest runs here again, untouched")
        conn = self.conn
        assert conn is not None
        in_doubt = conn.ended_in in (remote.State.FINISHED, remote.State.RECEIVED)
        if in_doubt and not self._cancel_delivered and conn.cancelled_by is not Role.TARGET:
            # The target may hold the guest (Received): tell it on a new connection.
            await self._resolve("cancel")

    async def _deliver_commit(self) -> None:
        """The source is SENT: only the target can run the guest; tell it Commit on a new
        connection (Resolve), a few times."""
        self.result.status = "failed"
        await self._resolve("commit")

    async def _resolve(self, decision: remote.Decision) -> None:
        """Deliver our decision for a session the target may hold, on a new connection."""
        conn, result = self.conn, self.result
        assert conn is not None and conn.session_id is not None
        for _ in range(COMMIT_ATTEMPTS):
            resolver = RemoteConnection.resolver(conn.session_id, decision)
            try:
                with trio.fail_after(self.opts.answer_timeout):
                    async with await tcp.connect(self.opts.address, self.opts.tls) as channel:
                        hello = resolver.make_hello(vm_name=self.vm_name, vm_uuid=self.vm_uuid)
                        await channel.send(resolver.send(hello))
                        resolver.receive(await channel.receive())
                        await channel.send(resolver.send(resolver.make_resolve()))
                        resolver.receive(await channel.receive())
            except (OSError, HandoffError, remote.ProtocolError, trio.TooSlowError) as exc:
                log.warning("could not deliver Commit yet: %s", _describe_error(exc))
                await trio.sleep(1)
                continue
            plan = resolver.recovery()
            log.info("the target answered our %r: %s", decision, plan.why)
            if decision == "cancel":
                return
            result.recovery = plan.recovery.value
            if plan.recovery is Recovery.DONE:
                result.status, result.error = "completed", ""
                await self._tear_down_sent()
            else:
                log.error("%s", plan.why)
                result.error = plan.why
            return
        log.error("%r could not be delivered: the target holds the guest unrunnable", decision)

    async def _tear_down_sent(self) -> None:
        """The guest runs on the target: the SENT VM here is only memory to free."""
        self.result.status = "completed"


_FAILURES = (OSError, HandoffError, remote.ProtocolError, trio.TooSlowError)

#: A batch of the page stream, fetched: shared or not, its addresses, the plaintext pages or
#: firmware packets (fewer than the addresses if a SEND_UPDATE_DATA failed), and that failure.
_Fetched = tuple[bool, list[int], list[bytes] | list[tuple[bytes, bytes]], OSError | None]


def _batches(pages: list[int], shared_now: set[int]) -> list[tuple[bool, list[int]]]:
    """`pages` cut, in order, into runs of shared or private pages of at most BATCH_PAGES."""
    out: list[tuple[bool, list[int]]] = []
    for gpa in pages:
        shared = gpa in shared_now
        if out and out[-1][0] is shared and len(out[-1][1]) < BATCH_PAGES:
            out[-1][1].append(gpa)
        else:
            out.append((shared, [gpa]))
    return out


def _die() -> None:
    """A test's dead source host (x_break kill-...): no decision, no goodbye."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _fw(exc: OSError) -> str:
    status = fw_error(exc)
    text = exc.strerror or str(exc)
    return f"{text} (firmware status {status:#x})" if status is not None else text


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and fw_error(exc) is not None:
        return _fw(exc)
    return str(exc) or type(exc).__name__
