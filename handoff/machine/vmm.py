"""The VMM's machine: guest memory, the VM and its vCPUs on a hypervisor (`handoff.hv`), and
the vCPU loops.

A `Vmm` is built one of two ways: `launch()` boots a fresh guest (memfds, VM, launch
sequence), or `prepare_incoming()` + `complete_incoming()` take over a guest handed off by
another VMM (the same memfds; the encryption context moved by the kernel; registers and
device state from the switchover message). `pause()` parks every vCPU at a clean point: no
KVM_RUN in flight and no exit left half done, which is what a handoff needs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import trio

from handoff.hv import (
    EXIT_X86_WRMSR,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    ExitView,
    Hypervisor,
    MigrationControlVcpu,
    MigrationControlVm,
    PeerVm,
    Vcpu,
    VcpuState,
    Vm,
    abi,
    migration_vm,
    witness,
)
from handoff.hv.backends import open_hypervisor
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.devices import Devices, DeviceState

log = logging.getLogger("handoff.vmm")

_ZERO_BLOCK = bytes(64 * 1024)
_ZERO_CHUNK = bytes(4096)
_ZERO_LINE = bytes(64)

_CPUS = len(os.sched_getaffinity(0))
"""Exits are served on vCPU threads only where every vCPU can have a CPU: with more busy vCPUs
than CPUs the threads took the interpreter and the CPUs from each other (measured at 4 busy
vCPUs on 2 CPUs: no shorter ordinary gap, and 0.8 to 1.3 ms more pause as the guest saw it)."""

_THREAD_PORTS = frozenset(
    {witness.SERIAL_PORT, witness.DOORBELL_OUT_PORT, witness.DOORBELL_IN_PORT}
)  # the port I/O a vCPU's own thread may serve (`VcpuRunner._serve_on_thread`)

PAUSE_RETURN_WAIT_S = 0.002
"""How long a pause waits at most, after the kicks, for the vCPUs' runs to come back."""

RESUME_ENTRY_WAIT_S = 0.002
RESUME_ENTRY_WAIT_PER_VCPU_S = 0.0002
"""How long a resume waits at most for the vCPUs' KVM_RUNs to be issued (`Vcpu.wait_entered`):
`RESUME_ENTRY_WAIT_S`, or this much per vCPU started where that is longer. Each KVM_RUN thread
needs a CPU and the interpreter for a moment before its KVM_RUN; on a nested 2-CPU host a
thread's wake-up took 60 to 120 us, so 256 of them need 15 to 30 ms: with the event loop
going on after 2 ms, the last of them waited behind it (and behind the exits of the vCPUs
already running) for tens of milliseconds more."""

_EXIT_INTR = abi.EXIT_INTR
_EXIT_IO = abi.EXIT_IO
_EXIT_HYPERCALL = abi.EXIT_HYPERCALL
_EXIT_SHUTDOWN = abi.EXIT_SHUTDOWN


def bitmap_pages(bitmap: bytearray, npages: int, base: int) -> list[int]:
    """The guest addresses of the pages set in a slot's dirty bitmap (bit i = the page at
    base + i * 4096; bits past `npages` ignored). A sparse guest's log is nearly all zero:
    a zero 64 KiB block, 4 KiB chunk or 64-byte line is one comparison in C, and only the
    non-zero lines are decoded, as one 512-bit integer each."""
    pages: list[int] = []
    size = len(bitmap)
    block_size, chunk_size, line_size = len(_ZERO_BLOCK), len(_ZERO_CHUNK), len(_ZERO_LINE)
    for block in range(0, size, block_size):
        if bitmap.startswith(_ZERO_BLOCK, block):
            continue
        for chunk in range(block, min(block + block_size, size), chunk_size):
            if bitmap.startswith(_ZERO_CHUNK, chunk):
                continue
            for line in range(chunk, min(chunk + chunk_size, size), line_size):
                if bitmap.startswith(_ZERO_LINE, line):
                    continue
                bits = int.from_bytes(bitmap[line : line + line_size], "little")
                first = line * 8
                while bits:
                    low = bits & -bits
                    page = first + low.bit_length() - 1
                    if page >= npages:
                        break
                    pages.append(base + page * abi.PAGE_SIZE)
                    bits ^= low
    return pages


class CollectorPause:
    """What `collector_paused` yields: set `keep_off` to leave the collector off after it."""

    keep_off = False


@contextlib.contextmanager
def collector_paused() -> Iterator[CollectorPause]:
    """No cyclic garbage collection inside the blackout: a collection stalls the event loop
    for up to milliseconds. Reference counting still frees nearly everything meanwhile."""
    was = gc.isenabled()
    gc.disable()
    pause = CollectorPause()
    try:
        yield pause
    finally:
        if was and not pause.keep_off:
            gc.enable()


def freeze_startup_objects() -> None:
    """Objects alive after start-up live as long as the process: keep them out of the
    collector's scans, so later collections are short."""
    gc.collect()
    gc.freeze()


async def _each_vcpu(fn: Callable[[int], Awaitable[None]], count: int) -> None:
    """`fn(i)` for every vCPU at once; the first failure is raised as itself (an OSError or a
    ValueError the caller's failure rules know), not wrapped in an exception group."""
    errors: list[Exception] = []

    async def one(i: int) -> None:
        try:
            await fn(i)
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        for i in range(count):
            n.start_soon(one, i)
    if errors:
        raise errors[0]


def _wait_each(waits: list[Callable[[float], bool]], seconds: float) -> None:
    """Each of `waits(timeout)` in turn, all within `seconds` in all: a bound on waiting, not
    a check (the first that times out ends it)."""
    deadline = time.monotonic() + seconds
    for wait in waits:
        if not wait(deadline - time.monotonic()):
            return


class ContextLost(Exception):
    """The kernel refused KVM_RUN with EIO: this VM no longer holds the guest."""


class RunGate:
    """Lets the vCPU tasks run, or parks them all and reports when the last one is parked."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pause_requested = True
        self._resumed = trio.Event()
        self._parked = 0
        self._all_parked = trio.Event()
        self._pause_asked = trio.Event()
        self._pause_asked.set()
        if count == 0:
            self._all_parked.set()

    async def wait_pause_asked(self) -> None:
        """Returns once a pause is asked (at once while one is)."""
        await self._pause_asked.wait()

    async def park(self) -> None:
        resumed = self._resumed
        self._parked += 1
        if self._parked >= self.count:
            self._all_parked.set()
        await resumed.wait()

    def retire(self) -> None:
        """A vCPU task ended for good (guest shutdown, context lost): never wait for it."""
        self.count -= 1
        if self._parked >= self.count:
            self._all_parked.set()

    async def pause(self) -> None:
        if not self.pause_requested:
            self.pause_requested = True
            self._resumed = trio.Event()
            self._pause_asked.set()
        await self._all_parked.wait()

    def resume(self) -> None:
        self.pause_requested = False
        self._pause_asked = trio.Event()
        self._parked = 0
        self._all_parked = trio.Event()
        if self.count == 0:
            self._all_parked.set()
        self._resumed.set()


THROTTLE_TIMESLICE_S = 0.010
"""A throttled vCPU runs this long, then sleeps `percent / (100 - percent)` times as long
(QEMU's CPU_THROTTLE_TIMESLICE_NS): at 99 % it runs 10 ms a second. Every vCPU starts its
timeslice when the throttle is set, so they sleep together, as QEMU's throttle timer makes
them: a pre-copy round that falls in the sleep finds few pages dirtied."""


class VcpuRunner:
    """One vCPU's loop: KVM_RUN, serve the exit, hand the completion back with the next run."""

    def __init__(self, vmm: Vmm, index: int) -> None:
        self.vmm = vmm
        self.index = index
        self.pending = False  # an exit whose completion the kernel has not taken yet
        self.exits = 0
        self.parked = False  # waiting in the gate: `Vmm.resume` may start its KVM_RUN
        self._on_thread: Vcpu | None = None  # the vCPU whose thread serves our exits
        self.idle_s = 0.0  # the guest asked to idle this long before its next step
        self.awake_since = 0.0  # trio time this vCPU's throttle timeslice started
        self.throttle_sleep: trio.CancelScope | None = None  # while it sleeps for the throttle

    @property
    def vcpu(self) -> Vcpu:
        # Looked up each time: a reclaim swaps in the vCPUs of a fresh VM under parked tasks.
        return self.vmm.vcpus[self.index]

    async def settle(self) -> None:
        """Deliver a pending completion without running the guest (KVM's immediate_exit)."""
        if not self.pending:
            return
        try:
            await self.vcpu.run(immediate_exit=True)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise ContextLost(str(exc)) from exc
            if exc.errno != errno.EINTR:
                raise
        self.pending = False

    async def loop(self, gate: RunGate) -> None:
        try:
            while True:
                if self._on_thread is not self.vcpu:  # (a reclaim brings fresh vCPUs)
                    self._on_thread = self.vcpu
                    if self.vmm.cfg.vcpus <= _CPUS:
                        self.vcpu.serve_exits_on_thread(self._serve_on_thread)
                # A KVM_RUN that `Vmm.resume` started is taken first, even if a pause came
                # meanwhile: the kick ends it at once.
                if gate.pause_requested and not self.vcpu.run_in_flight:
                    await self.settle()
                    self.parked = True
                    try:
                        await gate.park()
                    finally:
                        self.parked = False
                    continue
                try:
                    exit_ = await self.vcpu.run()
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        raise ContextLost(str(exc)) from exc
                    if exc.errno != errno.EINTR:
                        raise
                    # Kicked before entering (immediate_exit in kvm_run): the pending
                    # completion was delivered and the guest did not run.
                    self.pending = False
                    continue
                self.pending = False
                if not self._serve(exit_):
                    return
                if self.idle_s:
                    # The guest waits for time to pass: the vCPU sleeps here, not in the
                    # kernel, and a pause (a handoff) does not wait for it to wake.
                    idle, self.idle_s = self.idle_s, 0.0
                    # Its exit completed now, not by the pause that may come meanwhile: an
                    # idle vCPU then holds nothing unfinished (as a real guest's halted vCPU,
                    # which waits inside KVM_RUN, holds nothing), and a pause of a mostly
                    # idle guest does not complete each vCPU's exit inside the blackout (a
                    # KVM_RUN each: 256 took 4 to 30 ms of it on a nested 2-CPU host).
                    await self.settle()
                    with trio.move_on_after(idle):
                        await gate.wait_pause_asked()
                if self.vmm.throttle_percent:
                    await self._throttle(gate)
        except ContextLost:
            log.error(
                "vCPU %d: KVM_RUN failed with EIO: this VM no longer holds the guest", self.index
            )
            self.vmm.context_lost.set()
        finally:
            gate.retire()

    async def _throttle(self, gate: RunGate) -> None:
        """Auto-converge's brake: once this vCPU ran a timeslice, it sleeps its share. A
        pause does not wait for the sleep, and a throttle lifted (`Vmm.set_throttle`) ends
        it at once."""
        percent = self.vmm.throttle_percent
        now = trio.current_time()
        if not 0 < percent < 100 or now - self.awake_since < THROTTLE_TIMESLICE_S:
            return
        sleep_s = THROTTLE_TIMESLICE_S * percent / (100 - percent)
        with trio.CancelScope(deadline=now + sleep_s) as scope:
            self.throttle_sleep = scope
            await gate.wait_pause_asked()
        self.throttle_sleep = None
        self.awake_since = trio.current_time()

    def _serve_on_thread(self, exit_: ExitView) -> bool:
        """Serve an exit on the backend's KVM_RUN thread (`Vcpu.serve_exits_on_thread`), which
        then runs the guest on at once: the guest's steady port I/O (serial, doorbell), unless
        a pause is asked or the vCPUs are throttled (the sleep is `loop`'s). Measured on the
        real KVM, each exit's trip to the event loop and back cost 0.2 to 0.4 ms of the
        guest's time, and a handoff's pause as the guest sees it holds one such trip.
        Anything else (idling, hypercalls, MSRs, shutdown) goes to `loop` as ever."""
        io = exit_.io
        if exit_.exit_reason != _EXIT_IO or io is None or io.port not in _THREAD_PORTS:
            return False
        if self.vmm.gate.pause_requested or self.vmm.throttle_percent or self.vmm.exits_to_loop:
            return False
        devices = self.vmm.devices
        data = devices.handle_io(self.index, io)
        if data is not None:
            self.vcpu.complete_io(data)
        self.exits += 1
        self._report_panic()
        return True

    def _report_panic(self) -> None:
        panic = self.vmm.devices.serial.panicked
        if panic and self.vmm.status != "guest-panicked":
            log.error("guest: %s", panic)

    def _serve(self, exit_: ExitView) -> bool:
        self.exits += 1
        reason = exit_.exit_reason
        if reason == _EXIT_INTR:
            return True
        if reason == _EXIT_IO and exit_.io is not None:
            io = exit_.io
            if io.port == witness.IDLE_PORT and io.direction == abi.IO_OUT:
                asked = int.from_bytes(io.data[:4], "little")
                self.idle_s = min(asked, witness.MAX_IDLE_US) / 1e6
                self.pending = True
                return True
            data = self.vmm.devices.handle_io(self.index, exit_.io)
            if data is not None:
                self.vcpu.complete_io(data)
            self.pending = True
            self._report_panic()
            return True
        if reason == _EXIT_HYPERCALL and exit_.hypercall is not None:
            hc = exit_.hypercall
            if hc.nr == abi.HC_MAP_GPA_RANGE:
                ret = self.vmm.devices.shared.map_gpa_range(hc.args[0], hc.args[1], hc.args[2])
            else:
                ret = -abi.ENOSYS
            self.vcpu.complete_hypercall(ret & abi.U64_MASK)
            self.pending = True
            return True
        if reason == EXIT_X86_WRMSR:
            return self._serve_wrmsr(exit_)
        if reason == _EXIT_SHUTDOWN:
            self.vmm.status = "guest-panicked" if self.vmm.devices.serial.panicked else "shutdown"
            log.error("vCPU %d: guest shut down (%s)", self.index, self.vmm.status)
            return False
        log.error("vCPU %d: unexpected exit reason %d; stopping this vCPU", self.index, reason)
        return False

    def _serve_wrmsr(self, exit_: ExitView) -> bool:
        """The guest wrote the MSR we filter: MSR_KVM_MIGRATION_CONTROL (any other: #GP)."""
        msr = getattr(exit_, "msr", None)
        known = msr is not None and msr.index == MSR_KVM_MIGRATION_CONTROL
        if msr is not None and known:
            self.vmm.set_migration_control(int(msr.data))
        vcpu: object = self.vcpu
        if isinstance(vcpu, MigrationControlVcpu):
            vcpu.complete_msr(0 if known else 1)
        self.pending = True
        return True


class Vmm:
    """A VM as one VMM process holds it, on one `Hypervisor`: the one `flags.hypervisor` names
    (opened by `open()`), or one given here (a test's in-process model)."""

    def __init__(
        self, cfg: GuestConfig, flags: HostFlags, hypervisor: Hypervisor | None = None
    ) -> None:
        self.cfg = cfg
        self.flags = flags
        self.hypervisor: Hypervisor | None = hypervisor
        self.exits_to_loop = False  # every exit to the event loop (`VcpuRunner._serve_on_thread`)
        self._owns_hypervisor = hypervisor is None
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.memfds: list[int] = []
        self.devices = Devices(flags.serial_log, cfg.vcpus)
        self.runners: list[VcpuRunner] = []
        self.gate = RunGate(0)
        self.status = "prelaunch"
        self.context_lost = trio.Event()
        # What GUEST_STATUS said at launch; after a move the kernel keeps no /dev/sev fd for
        # this VM (reference section 2), so query-sev answers from here.
        self.sev: dict[str, int] = {}
        self.measurement: bytes | None = None
        # MSR_KVM_MIGRATION_CONTROL as the guest last wrote it; None where this VMM did not
        # advertise it (a plain guest, a kernel without the MSR filter): no gate then.
        self.migration_allowed: bool | None = None
        # One KVM_GET_DIRTY_LOG buffer per logging slot, kept from round to round.
        self._dirty_bitmaps: dict[int, bytearray] = {}
        # Auto-converge: the share of time (percent) each vCPU sleeps; 0 runs at full speed.
        self.throttle_percent = 0

    # ----------------------------------------------------------------- building
    async def open(self) -> Hypervisor:
        """The hypervisor: the one given, else the one `flags.hypervisor` names (the real KVM,
        or kvmstub's daemon at `flags.kvm`), opened here."""
        if self.hypervisor is None:
            self.hypervisor = await open_hypervisor(
                self.flags.hypervisor, kvmstub_socket=self.flags.kvm
            )
        return self.hypervisor

    def create_memory(self) -> None:
        """One sparse memfd per slot; pages are allocated only where the guest writes."""
        for layout in self.cfg.slots():
            fd = os.memfd_create(
                f"handoff-{self.flags.name}-slot{layout.slot}",
                os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,
            )
            self.memfds.append(fd)
            os.ftruncate(fd, layout.size)
            # Sealed against shrinking, the kernel may map it: nobody can truncate guest memory
            # under a mapping (which would SIGBUS whoever touches it).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            if self.flags.prefault:
                os.posix_fallocate(fd, 0, layout.size)

    async def _create_vm(self, *, sev_init: bool) -> Vm:
        assert self.hypervisor is not None
        vm = await self.hypervisor.create_vm()
        try:
            if sev_init:
                await vm.sev_init(es=self.cfg.mode == "sev-es")
            for layout, fd in zip(self.cfg.slots(), self.memfds, strict=True):
                await vm.set_memory_region(layout.slot, layout.guest_phys_addr, layout.size, fd)
            await vm.enable_exit_hypercall()
        except BaseException:
            vm.close()
            raise
        return vm

    async def _create_vcpus(self, vm: Vm) -> list[Vcpu]:
        vcpus: list[Vcpu] = []
        try:
            for i in range(self.cfg.vcpus):
                vcpus.append(await vm.create_vcpu(i))
        except BaseException:
            for v in vcpus:
                v.close()
            raise
        return vcpus

    async def launch(self) -> None:
        """Boot a fresh guest: image into memory, then for SEV the whole launch sequence."""
        hypervisor = await self.open()
        self.create_memory()
        cfg = self.cfg
        image = hypervisor.witness_image(
            cfg.vcpus, cfg.line_every, cfg.flip_every, idle_us=self.flags.idle_us
        )
        os.pwrite(self.memfds[0], image, 0)
        sev = cfg.mode != "plain"
        self.vm = await self._create_vm(sev_init=sev)
        self.vcpus = await self._create_vcpus(self.vm)
        for i, vcpu in enumerate(self.vcpus):
            await vcpu.set_state(hypervisor.witness_initial_state(i))
        if sev:
            await self._offer_migration_control()
            launch = await self.vm.sev_launch(len(image), cfg.policy, es=cfg.mode == "sev-es")
            self.sev = dict(launch.status)
            self.measurement = launch.measurement
        self._make_runners()
        self.status = "paused"

    async def prepare_incoming(self, memfds: Sequence[int]) -> None:
        """Everything a handoff target can do before the source pauses (protocol step 3)."""
        await self.open()
        self.memfds = list(memfds)
        # MOVE needs a destination that is not SEV yet (reference section 1 step 5).
        self.vm = await self._create_vm(sev_init=False)
        self.vcpus = await self._create_vcpus(self.vm)
        if self.cfg.mode != "plain":
            # As at launch: the guest's writes of MSR_KVM_MIGRATION_CONTROL come to this VMM
            # (the filter and CPUID are the VM's and vCPUs', which a MOVE does not carry); the
            # value the guest last wrote comes with the devices.
            await self._offer_migration_control()
        self._make_runners()
        self.status = "inmigrate"

    async def complete_incoming(
        self, source_vm: PeerVm, states: Sequence[VcpuState] | None, devices: DeviceState
    ) -> None:
        """Protocol step 7: take the context, the vCPU states and the device state."""
        await self.take_context(source_vm)
        await self.load_incoming(states, devices)

    async def take_context(self, source_vm: PeerVm) -> None:
        """Protocol step 7's first half: move the encryption context out of the source's VM
        (sev, sev-es); nothing to do for a plain guest, whose source VM is never touched."""
        assert self.vm is not None and self.hypervisor is not None
        if self.cfg.mode != "plain":
            # The one request of the blackout whose answer nothing else here waits beside:
            # polled for when the kernel has a CPU apart (--blackout-poll-us), it is seen the
            # moment it comes instead of after this process is woken (about 0.1 ms a handoff
            # in paired runs on a 2-CPU virtual machine).
            with self.hypervisor.polling(self.flags.blackout_poll_us / 1e6):
                await self.vm.move_enc_context_from(source_vm)

    async def load_incoming(self, states: Sequence[VcpuState] | None, devices: DeviceState) -> None:
        """Protocol step 7's second half: the vCPU states (plain, sev) and the device state,
        into this VMM's own VM (after `take_context`)."""
        assert self.vm is not None
        if self.cfg.mode != "sev-es":
            if states is None or len(states) != len(self.vcpus):
                raise ValueError("switchover carried no registers for every vCPU")
            await self.set_all_states(states)
        if devices.vm_state is not None:
            # After every vCPU's (reference real-kvm.md section 2, step 9): PIT, interrupt
            # controllers, then the clock, advanced by the time the pause took.
            await self.vm.set_vm_state(devices.vm_state)
        self.devices.restore(devices)
        if self.migration_allowed is not None:
            # No value from the source (it did not gate migration, or an older release): the
            # guest never saw the MSR offered there, so no gate here either.
            self.migration_allowed = (
                None if devices.migration_control is None else bool(devices.migration_control)
            )

    def _make_runners(self) -> None:
        self.runners = [VcpuRunner(self, i) for i in range(len(self.vcpus))]
        self.gate = RunGate(len(self.runners))

    # ----------------------------------------------------------------- running
    def start(self, nursery: trio.Nursery) -> None:
        """Start the vCPU tasks, parked; `resume()` lets them run."""
        for runner in self.runners:
            nursery.start_soon(runner.loop, self.gate)

    async def pause(self) -> None:
        """Park every vCPU at a clean point. The kick (immediate_exit in each kvm_run page,
        a memory write) ends a slice in flight at its next guest step and turns KVM_RUNs
        still queued into mere completions, so the pause does not wait out whole slices."""
        for vcpu in self.vcpus:
            vcpu.kick()
        # Then wait, the interpreter released, for their runs to come back (bounded): a vCPU
        # thread serving an exit needs it to see the kick (`Vcpu.wait_returned`).
        _wait_each([vcpu.wait_returned for vcpu in self.vcpus], PAUSE_RETURN_WAIT_S)
        await self.gate.pause()
        if self.status == "running":
            self.status = "paused"

    def set_throttle(self, percent: int) -> None:
        """Throttle the vCPUs: each sleeps `percent` % of the time (in timeslices of
        `THROTTLE_TIMESLICE_S`), from now; 0 lifts it. A change wakes a vCPU asleep for
        the throttle at once (every timeslice starts again, together).

        Raises:
            ValueError: for a percentage outside 0..99.
        """
        if not 0 <= percent <= 99:
            raise ValueError(f"a vCPU throttle is 0 to 99 %, not {percent}")
        if percent == self.throttle_percent:
            return  # the vCPUs keep their timeslices
        log.info("vCPU throttle %d %%", percent)
        self.throttle_percent = percent
        now = trio.current_time()
        for runner in self.runners:
            runner.awake_since = now
            if runner.throttle_sleep is not None:
                runner.throttle_sleep.cancel()

    def resume(self) -> None:
        """Let the vCPUs run. The KVM_RUNs of the parked vCPU tasks are sent from here,
        back to back, before the tasks wake: the guest's vCPUs come back together instead
        of one task switch apart (about 20 us each on the pause's tail)."""
        for vcpu in self.vcpus:
            vcpu.unkick()
        started = [r.vcpu for r in self.runners if r.parked and r.vcpu.start_run()]
        # Then wait, the interpreter released, until those KVM_RUNs are issued (a moment each,
        # bounded): the event loop going on from here held the backend's KVM_RUN threads
        # back, waiting for the GIL, 0.15 to 0.4 ms of the pause on the real KVM.
        wait = max(RESUME_ENTRY_WAIT_S, RESUME_ENTRY_WAIT_PER_VCPU_S * len(started))
        _wait_each([vcpu.wait_entered for vcpu in started], wait)
        self.gate.resume()
        self.status = "running"

    async def snapshot_devices(self) -> DeviceState:
        """The devices' state and the VM's own kernel state, read with every vCPU parked."""
        assert self.vm is not None
        control = None if self.migration_allowed is None else int(self.migration_allowed)
        return self.devices.snapshot(await self.vm.get_vm_state(), control)

    async def get_all_states(self) -> list[VcpuState]:
        """Every vCPU's state, opaque (the backend's), in vCPU order: all at once where the
        backend can (`get_states`: the real KVM's, each vCPU on its own thread)."""
        batch = getattr(self.vm, "get_states", None)
        if batch is not None:
            states: list[VcpuState] = await batch(self.vcpus)
            return states
        out: list[VcpuState | None] = [None] * len(self.vcpus)

        async def one(i: int) -> None:
            out[i] = await self.vcpus[i].get_state()

        await _each_vcpu(one, len(self.vcpus))
        return [r for r in out if r is not None]

    async def set_all_states(self, states: Sequence[VcpuState]) -> None:
        if len(states) != len(self.vcpus):
            raise ValueError(f"{len(states)} vCPU states for {len(self.vcpus)} vCPUs")
        batch = getattr(self.vm, "set_states", None)
        if batch is not None:
            await batch(self.vcpus, list(states))
            return

        async def one(i: int) -> None:
            await self.vcpus[i].set_state(states[i])

        await _each_vcpu(one, len(self.vcpus))

    async def holds_context(self) -> bool:
        """Whether this VM may still run the guest: KVM_RUN with immediate_exit says EINTR
        (alive) or EIO (the context moved away and the VM is dead)."""
        if not self.vcpus:
            return False
        try:
            await self.vcpus[0].run(immediate_exit=True)
        except OSError as exc:
            return exc.errno != errno.EIO
        return True

    async def reclaim(self, escrow: PeerVm, states: Sequence[VcpuState] | None) -> None:
        """Move the guest back from the escrowed VM into a fresh VM of our own.

        Used when a handoff failed after the context moved: our old VM is dead (EIO), so a new
        one is built over the same memfds and the context comes back with the same MOVE.
        """
        old_vm, old_vcpus = self.vm, self.vcpus
        self.vm = await self._create_vm(sev_init=False)
        try:
            self.vcpus = await self._create_vcpus(self.vm)
            await self.vm.move_enc_context_from(escrow)
            if self.cfg.mode != "sev-es":
                assert states is not None
                await self.set_all_states(states)
        except BaseException:
            for v in self.vcpus if self.vcpus is not old_vcpus else []:
                v.close()
            self.vm.close()
            self.vm, self.vcpus = old_vm, old_vcpus
            raise
        for v in old_vcpus:
            v.close()
        if old_vm is not None:
            old_vm.close()
        for runner in self.runners:
            runner.pending = False

    async def send_memory(self, stream: socket.socket) -> int:
        """The copy baseline: stream every byte of guest memory (slot by slot), as a VMM
        without fd passing must. Runs in a thread: it is long, and the loop stays live."""
        fds = list(self.memfds)
        sizes = [layout.size for layout in self.cfg.slots()]

        def send() -> int:
            stream.setblocking(True)
            total = 0
            for fd, size in zip(fds, sizes, strict=True):
                offset = 0
                while offset < size:
                    n = os.sendfile(stream.fileno(), fd, offset, min(size - offset, 1 << 24))
                    if n == 0:
                        raise OSError(errno.EPIPE, "the target stopped reading guest memory")
                    offset += n
                total += size
            return total

        return await trio.to_thread.run_sync(send)

    async def receive_memory(self, stream: socket.socket) -> int:
        """The copy baseline's other end: fill our fresh memfds from the stream."""
        fds = list(self.memfds)
        sizes = [layout.size for layout in self.cfg.slots()]

        def receive() -> int:
            stream.setblocking(True)
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            total = 0
            for fd, size in zip(fds, sizes, strict=True):
                offset = 0
                while offset < size:
                    n = stream.recv_into(view[: min(len(buf), size - offset)])
                    if n == 0:
                        raise OSError(errno.EPIPE, "the source stopped sending guest memory")
                    os.pwrite(fd, view[:n], offset)
                    offset += n
                total += size
            return total

        return await trio.to_thread.run_sync(receive)

    # ----------------------------------------------------------------- cross-host migration
    # Page access for a migration between hosts (DESIGN section 8): the pages a sparse memfd
    # holds, the guest's dirty log, and the memfd's bytes of a page (ciphertext for a private
    # page, as on SEV hardware: only SEND_UPDATE_DATA may carry a private page out).

    async def prepare_incoming_sev(self) -> None:
        """A cross-host migration's target: fresh memfds, a VM that did KVM_SEV_INIT (which
        RECEIVE_START needs), its memory slots and vCPUs; nothing of the guest yet."""
        await self.open()
        self.create_memory()
        self.vm = await self._create_vm(sev_init=True)
        self.vcpus = await self._create_vcpus(self.vm)
        await self._offer_migration_control()  # the value itself comes with the devices
        self._make_runners()
        self.status = "inmigrate"

    async def _offer_migration_control(self) -> None:
        """Advertise MSR_KVM_MIGRATION_CONTROL and filter it to us, where the kernel can:
        migration is then refused until the guest writes 1 (and again once it writes 0)."""
        vm: object = self.vm
        vcpus: list[object] = list(self.vcpus)
        if not isinstance(vm, MigrationControlVm):
            return
        controls = [v for v in vcpus if isinstance(v, MigrationControlVcpu)]
        if len(controls) != len(vcpus):
            return
        await vm.filter_migration_control()
        for vcpu in controls:
            await vcpu.advertise_migration_control()
        self.migration_allowed = False

    def set_migration_control(self, value: int) -> None:
        allowed = bool(value & KVM_MIGRATION_READY)
        if allowed != self.migration_allowed:
            log.info("the guest %s migration", "allows" if allowed else "blocks")
        self.migration_allowed = allowed

    def _page_slot(self, gpa: int) -> tuple[int, int]:
        """(memfd, offset) of the page at `gpa`; ValueError outside guest memory."""
        for layout, fd in zip(self.cfg.slots(), self.memfds, strict=True):
            if layout.guest_phys_addr <= gpa < layout.guest_phys_addr + layout.size:
                return fd, gpa - layout.guest_phys_addr
        raise ValueError(f"guest address {gpa:#x} is outside guest memory")

    def read_page(self, gpa: int) -> bytes:
        """The memfd's bytes of one page (plaintext only for a shared page)."""
        fd, offset = self._page_slot(gpa)
        data = os.pread(fd, abi.PAGE_SIZE, offset)
        return data.ljust(abi.PAGE_SIZE, b"\0")

    def write_page(self, gpa: int, data: bytes) -> None:
        """Write one shared page's plaintext into its memfd (a migration target)."""
        if len(data) != abi.PAGE_SIZE:
            raise ValueError(f"a page is {abi.PAGE_SIZE} bytes, not {len(data)}")
        fd, offset = self._page_slot(gpa)
        os.pwrite(fd, data, offset)

    def populated_pages(self) -> list[int]:
        """The guest addresses of every page its memfds hold (SEEK_DATA/SEEK_HOLE): a sparse
        guest's first pre-copy round costs its populated memory, not its size."""
        pages: list[int] = []
        for layout, fd in zip(self.cfg.slots(), self.memfds, strict=True):
            offset = 0
            while offset < layout.size:
                try:
                    start = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # no data after offset
                    raise
                end = min(os.lseek(fd, start, os.SEEK_HOLE), layout.size)
                first = start - start % abi.PAGE_SIZE
                pages.extend(layout.guest_phys_addr + o for o in range(first, end, abi.PAGE_SIZE))
                offset = end
        return pages

    async def set_dirty_logging(self, on: bool) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on (or off) for every slot."""
        assert self.vm is not None and self.hypervisor is not None
        vm = migration_vm(self.vm, self.hypervisor.name)
        for layout, fd in zip(self.cfg.slots(), self.memfds, strict=True):
            await vm.set_dirty_logging(layout.slot, layout.guest_phys_addr, layout.size, fd, on=on)
        if not on:
            self._dirty_bitmaps.clear()

    async def dirty_pages(self) -> list[int]:
        """The pages the guest wrote since the last call: KVM_GET_DIRTY_LOG of every slot,
        each into a buffer kept from call to call (a 64 GiB slot's bitmap is 2 MiB; only
        its dirty runs cross from the kernel stand-in, and `bitmap_pages` skips its zeros)."""
        assert self.vm is not None and self.hypervisor is not None
        vm = migration_vm(self.vm, self.hypervisor.name)
        pages: list[int] = []
        for layout in self.cfg.slots():
            npages = layout.size // abi.PAGE_SIZE
            size = (npages + 63) // 64 * 8  # kvm_dirty_bitmap_bytes: whole 64-bit words
            bitmap = self._dirty_bitmaps.get(layout.slot)
            if bitmap is None or len(bitmap) != size:
                bitmap = self._dirty_bitmaps[layout.slot] = bytearray(size)
            await vm.get_dirty_log(layout.slot, bitmap)
            pages += bitmap_pages(bitmap, npages, layout.guest_phys_addr)
        return pages

    def requests_made(self) -> int:
        """Requests this process has made of the kernel so far (`Hypervisor.requests_made`)."""
        return 0 if self.hypervisor is None else self.hypervisor.requests_made()

    def memfd_inodes(self) -> list[int]:
        return [os.fstat(fd).st_ino for fd in self.memfds]

    def memfd_blocks(self) -> list[int]:
        return [os.fstat(fd).st_blocks for fd in self.memfds]

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for fd in self.memfds:
            os.close(fd)
        self.memfds = []
        if self.hypervisor is not None and self._owns_hypervisor:
            self.hypervisor.close()
            self.hypervisor = None
        self.devices.close()
