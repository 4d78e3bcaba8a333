"""The /dev/kvm backend (handoff.hv.linux) running the real x86 witness guest.

A small driver here serves the guest's exits the way the VMM's machine does (serial lines per
vCPU, the doorbell's sums, idle requests), pauses by kicking every vCPU and finishing its
pending exit, and hands the guest to a second VM over the same memfd in this process: vCPU
states, then the VM's own state. The guest itself checks what a broken transfer would break
(seq, an XMM register, general registers, its memory journal, the TSC, the doorbell) and says
PANIC; the tests read its serial lines.

Skipped where /dev/kvm is missing or KVM_CREATE_VM fails.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest
import trio

from guestprog import x86
from handoff.hv import StateMismatch, VcpuState, abi, linux, witness
from handoff.hv.base import VmState
from handoff.hv.kvmstub import regs_state
from handoff.hv.linux import LinuxHypervisor, LinuxVcpu, LinuxVm, open_linux, unusable_reason
from handoff.hv.model import ModelHypervisor, ModelKernel

UNUSABLE = unusable_reason()
needs_kvm = pytest.mark.skipif(UNUSABLE is not None, reason=f"/dev/kvm: {UNUSABLE}")

MEMORY = 4 << 20
LINE_EVERY = 2000  # guest steps per line (each step is a few dozen instructions at CPL3)
LINE_RE = re.compile(rb"^vcpu=(\d+) seq=(\d+) gap_us=(\d+)$")


class Guest:
    """What the machine's devices keep for the witness: lines per vCPU (a line arrives in
    several OUTs, four bytes each), the doorbell's sums, and how each vCPU stopped."""

    def __init__(self, vcpus: int) -> None:
        self.partial = [b""] * vcpus
        self.lines: list[list[bytes]] = [[] for _ in range(vcpus)]
        self.sums = [0] * vcpus
        self.panics: list[bytes] = []
        self.stopped: dict[int, int] = {}  # vCPU -> the exit reason it stopped with
        self.idle_requests: list[int] = []
        self.sleep_on_idle = True

    def seqs(self, i: int) -> list[int]:
        out = []
        for line in self.lines[i]:
            m = LINE_RE.match(line)
            assert m is not None, line
            assert int(m.group(1)) == i
            out.append(int(m.group(2)))
        return out

    async def serve(self, i: int, vcpu: LinuxVcpu, exit_: linux.Exit) -> bool:
        """One exit; True if the vCPU's completion is pending, False if it needs none."""
        io = exit_.io
        assert exit_.exit_reason == abi.EXIT_IO and io is not None, exit_
        if io.direction == abi.IO_OUT and io.port == witness.SERIAL_PORT:
            *done, self.partial[i] = (self.partial[i] + io.data).split(b"\n")
            for line in done:
                (self.panics if line.startswith(b"PANIC") else self.lines[i]).append(line)
        elif io.direction == abi.IO_OUT and io.port == witness.DOORBELL_OUT_PORT:
            self.sums[i] = (self.sums[i] + int.from_bytes(io.data, "little")) & 0xFFFFFFFF
        elif io.direction == abi.IO_IN and io.port == witness.DOORBELL_IN_PORT:
            vcpu.complete_io(self.sums[i].to_bytes(4, "little"))
        elif io.direction == abi.IO_OUT and io.port == witness.IDLE_PORT:
            us = int.from_bytes(io.data, "little")
            self.idle_requests.append(us)
            if self.sleep_on_idle:
                await trio.sleep(us / 1e6)
        else:
            raise AssertionError(f"unexpected port I/O {linux.vars_of(io)}")
        return True


async def drive(
    guest: Guest, vcpus: Sequence[LinuxVcpu], *, lines: int, deadline: float = 60.0
) -> None:
    """Run every vCPU until each has printed `lines` more lines (or stopped), then pause them
    all: kick, and finish each pending exit with a run that does not enter the guest."""
    goal = [len(guest.lines[i]) + lines for i in range(len(vcpus))]
    pausing = False

    async def loop(i: int, vcpu: LinuxVcpu) -> None:
        pending = False
        while not pausing:
            try:
                exit_ = await vcpu.run()
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
                pending = False
                continue
            if exit_.exit_reason != abi.EXIT_IO:
                guest.stopped[i] = exit_.exit_reason
                return
            pending = await guest.serve(i, vcpu, exit_)
        if pending:
            with pytest.raises(OSError) as info:
                await vcpu.run(immediate_exit=True)
            assert info.value.errno == errno.EINTR

    def done() -> bool:
        return all(len(guest.lines[i]) >= goal[i] or i in guest.stopped for i in range(len(vcpus)))

    with trio.fail_after(deadline):
        async with trio.open_nursery() as nursery:
            for i, vcpu in enumerate(vcpus):
                nursery.start_soon(loop, i, vcpu)
            while not done():
                await trio.sleep(0.002)
            pausing = True
            for vcpu in vcpus:
                vcpu.kick()
    for vcpu in vcpus:
        vcpu.unkick()


def memfd() -> int:
    fd = os.memfd_create("hv-linux-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEMORY)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class Machine:
    """One VM over a memfd with its vCPUs (what one VMM process holds)."""

    def __init__(self, vm: LinuxVm, vcpus: list[LinuxVcpu]) -> None:
        self.vm = vm
        self.vcpus = vcpus

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()


async def build(hv: LinuxHypervisor, mem: int, vcpus: int) -> Machine:
    vm = await hv.create_vm()
    await vm.set_memory_region(0, 0, MEMORY, mem)
    await vm.enable_exit_hypercall()
    return Machine(vm, [await vm.create_vcpu(i) for i in range(vcpus)])


async def launch(
    hv: LinuxHypervisor, vcpus: int, *, line_every: int = LINE_EVERY, idle_us: int = 0
) -> tuple[int, Machine]:
    mem = memfd()
    os.pwrite(mem, hv.witness_image(vcpus, line_every, 0, idle_us=idle_us), 0)
    machine = await build(hv, mem, vcpus)
    for i, vcpu in enumerate(machine.vcpus):
        await vcpu.set_state(hv.witness_initial_state(i))
    return mem, machine


async def hand_off(
    hv: LinuxHypervisor, mem: int, source: Machine, *, drop: Sequence[str] = ()
) -> Machine:
    """Read every vCPU's state and the VM's, close the source, load them into a new VM."""
    target = await build(hv, mem, len(source.vcpus))  # before the pause, as a target does
    states = [await v.get_state() for v in source.vcpus]
    vm_state = await source.vm.get_vm_state()
    source.close()
    if drop:
        states = [linux.state_without(s, *drop) for s in states]
    for vcpu, state in zip(target.vcpus, states, strict=True):
        await vcpu.set_state(state)
    await target.vm.set_vm_state(vm_state)
    return target


@pytest.fixture
async def hv() -> AsyncIterator[LinuxHypervisor]:
    h = open_linux()
    try:
        yield h
    finally:
        h.close()


def assert_contiguous(guest: Guest, vcpus: int) -> None:
    assert guest.panics == []
    assert guest.stopped == {}
    for i in range(vcpus):
        assert guest.seqs(i) == list(range(len(guest.lines[i])))


@needs_kvm
@pytest.mark.parametrize("vcpus", [1, 4])
async def test_witness_prints_contiguous_lines_on_every_vcpu(
    hv: LinuxHypervisor, vcpus: int
) -> None:
    mem, machine = await launch(hv, vcpus)
    guest = Guest(vcpus)
    try:
        await drive(guest, machine.vcpus, lines=5)
    finally:
        machine.close()
        os.close(mem)
    assert_contiguous(guest, vcpus)
    assert all(len(guest.lines[i]) >= 5 for i in range(vcpus))
    # The doorbell added every seq the vCPU wrote a line for.
    for i in range(vcpus):
        n = len(guest.lines[i])
        assert guest.sums[i] in (n * (n - 1) // 2, n * (n + 1) // 2)


@needs_kvm
@pytest.mark.parametrize("vcpus", [1, 4])
async def test_handoff_to_a_new_vm_continues_every_seq(hv: LinuxHypervisor, vcpus: int) -> None:
    mem, machine = await launch(hv, vcpus)
    guest = Guest(vcpus)
    try:
        await drive(guest, machine.vcpus, lines=3)
        before = [len(guest.lines[i]) for i in range(vcpus)]
        for _ in range(3):  # three handoffs in a row, each to a fresh VM
            machine = await hand_off(hv, mem, machine)
            await drive(guest, machine.vcpus, lines=3)
    finally:
        machine.close()
        os.close(mem)
    assert_contiguous(guest, vcpus)
    for i in range(vcpus):
        assert len(guest.lines[i]) >= before[i] + 9


class Handover(msgspec.Struct):
    """What the test's source process sends its target with the memfd."""

    vcpus: int
    states: list[bytes]
    vm_state: bytes
    sums: list[int]
    partial: list[bytes]
    lines: int  # how many more lines each vCPU is to print


class Report(msgspec.Struct):
    lines: list[list[bytes]]
    panics: list[bytes]
    stopped: dict[int, int]


async def target_main(sock: socket.socket) -> None:
    """The target process: a VM of its own over the received memfd, the source's states."""
    msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
    (mem,) = fds
    handover = msgspec.msgpack.decode(msg, type=Handover)
    hv = open_linux()
    machine = await build(hv, mem, handover.vcpus)
    for vcpu, blob in zip(machine.vcpus, handover.states, strict=True):
        await vcpu.set_state(VcpuState(backend=linux.NAME, version=linux.STATE_VERSION, blob=blob))
    await machine.vm.set_vm_state(
        VmState(backend=linux.NAME, version=linux.STATE_VERSION, blob=handover.vm_state)
    )
    guest = Guest(handover.vcpus)
    guest.sums = list(handover.sums)
    guest.partial = list(handover.partial)
    try:
        await drive(guest, machine.vcpus, lines=handover.lines)
    finally:
        machine.close()
        os.close(mem)
        hv.close()
    report = Report(lines=guest.lines, panics=guest.panics, stopped=guest.stopped)
    sock.send(msgspec.msgpack.encode(report))


@needs_kvm
async def test_handoff_to_another_process_continues_every_seq(hv: LinuxHypervisor) -> None:
    vcpus = 2
    mem, machine = await launch(hv, vcpus)
    guest = Guest(vcpus)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child: subprocess.Popen[bytes] | None = None
    try:
        await drive(guest, machine.vcpus, lines=3)
        states = [(await v.get_state()).blob for v in machine.vcpus]
        vm_state = (await machine.vm.get_vm_state()).blob
        machine.close()  # the source never runs the guest again
        child = subprocess.Popen(
            [sys.executable, __file__, "target", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
        )
        theirs.close()
        handover = Handover(vcpus, states, vm_state, guest.sums, guest.partial, lines=4)
        socket.send_fds(ours, [msgspec.msgpack.encode(handover)], [mem])
        with trio.fail_after(60):
            msg = await trio.to_thread.run_sync(ours.recv, 1 << 22)
            assert await trio.to_thread.run_sync(child.wait) == 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        ours.close()
        theirs.close()
        os.close(mem)
    report = msgspec.msgpack.decode(msg, type=Report)
    assert report.panics == [] and report.stopped == {}
    for i in range(vcpus):
        guest.lines[i] += report.lines[i]
    assert_contiguous(guest, vcpus)
    assert all(len(report.lines[i]) >= 4 for i in range(vcpus))


@needs_kvm
async def test_handoff_without_xsave_makes_the_guest_panic(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 2)
    guest = Guest(2)
    try:
        await drive(guest, machine.vcpus, lines=3)
        machine = await hand_off(hv, mem, machine, drop=["xsave"])
        await drive(guest, machine.vcpus, lines=3)
    finally:
        machine.close()
        os.close(mem)
    # Each vCPU's XMM register came back zeroed: the guest saw it and stopped itself.
    assert guest.panics == [b"PANIC xmm", b"PANIC xmm"]
    assert set(guest.stopped) == {0, 1}
    assert set(guest.stopped.values()) == {abi.EXIT_SHUTDOWN}


@needs_kvm
async def test_a_rewound_journal_makes_the_guest_panic(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 1)
    guest = Guest(1)
    try:
        await drive(guest, machine.vcpus, lines=2)
        # The guest's journal page is zeroed under it (memory a handoff failed to keep).
        os.pwrite(mem, bytes(x86.PAGE_SIZE), x86.journal_gpa(0))
        await drive(guest, machine.vcpus, lines=2)
    finally:
        machine.close()
        os.close(mem)
    assert guest.panics == [b"PANIC journal"]
    assert guest.stopped == {0: abi.EXIT_SHUTDOWN}


@needs_kvm
async def test_a_lost_doorbell_sum_makes_the_guest_panic(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 1)
    guest = Guest(1)
    try:
        await drive(guest, machine.vcpus, lines=3)
        guest.sums[0] = 0  # the device state a successor failed to take
        await drive(guest, machine.vcpus, lines=2)
    finally:
        machine.close()
        os.close(mem)
    assert guest.panics == [b"PANIC device"]


@needs_kvm
async def test_idle_mode_asks_to_idle_after_every_line(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 1, line_every=10, idle_us=1500)
    guest = Guest(1)
    try:
        # Five lines: the fourth line's idle request comes after that line, and a drive that
        # stops at four lines may stop before it.
        await drive(guest, machine.vcpus, lines=5)
    finally:
        machine.close()
        os.close(mem)
    assert_contiguous(guest, 1)
    assert guest.idle_requests[:4] == [1500] * 4
    assert len(guest.idle_requests) >= len(guest.lines[0]) - 1


@needs_kvm
async def test_a_kicked_vcpu_leaves_a_long_guest_run_with_eintr(hv: LinuxHypervisor) -> None:
    # 2**32-1 steps before the first exit: minutes of guest time without a kick.
    mem, machine = await launch(hv, 1, line_every=(1 << 32) - 1)
    vcpu = machine.vcpus[0]
    try:
        for _ in range(3):
            assert vcpu.start_run()
            assert vcpu.run_in_flight
            assert not vcpu.start_run()
            with pytest.raises(OSError) as info:
                await vcpu.get_state()  # a running vCPU's state is not a state
            assert info.value.errno == errno.EBUSY
            await trio.sleep(0.02)
            vcpu.kick()
            with trio.fail_after(30), pytest.raises(OSError) as info:
                await vcpu.run()
            assert info.value.errno == errno.EINTR
            assert not vcpu.run_in_flight
            # Still kicked: the next run does not enter the guest.
            with pytest.raises(OSError) as info:
                await vcpu.run()
            assert info.value.errno == errno.EINTR
            vcpu.unkick()
    finally:
        machine.close()
        os.close(mem)


@needs_kvm
async def test_state_of_another_backend_or_cpu_is_refused(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 1)
    try:
        vcpu = machine.vcpus[0]
        from kvmstub import uapi

        with pytest.raises(StateMismatch, match="kvmstub"):
            await vcpu.set_state(regs_state(uapi.Regs()))
        with pytest.raises(StateMismatch, match="kvmstub"):
            await machine.vm.set_vm_state(VmState(backend="kvmstub", version=1, blob=b""))
        state = await vcpu.get_state()
        assert set(linux.state_sections(state)) >= {
            "cpuid_digest", "mp_state", "events", "regs", "sregs2", "xsave", "xcrs",
            "msrs", "debugregs", "lapic",
        }  # fmt: skip
        other = VcpuState(
            backend=state.backend,
            version=state.version,
            blob=state.blob.replace(vcpu.cpuid_digest, bytes(32)),
        )
        with pytest.raises(StateMismatch, match="CPUID"):
            await vcpu.set_state(other)
        with pytest.raises(ValueError, match="truncated"):
            await vcpu.set_state(VcpuState(backend="linux", version=1, blob=state.blob[:-3]))
    finally:
        machine.close()
        os.close(mem)


@needs_kvm
async def test_an_msr_the_vcpu_refuses_is_left_out_of_its_state(hv: LinuxHypervisor) -> None:
    bogus = 0x4B564DFF  # in KVM's paravirtual range, and no MSR there
    hv.msr_indices = [*hv.msr_indices[:5], bogus, *hv.msr_indices[5:]]
    mem, machine = await launch(hv, 1)
    guest = Guest(1)
    try:
        await drive(guest, machine.vcpus, lines=2)
        machine = await hand_off(hv, mem, machine)
        await drive(guest, machine.vcpus, lines=2)
    finally:
        machine.close()
        os.close(mem)
    assert bogus not in hv.msr_indices
    assert_contiguous(guest, 1)


@needs_kvm
def test_every_host_cpu_gives_a_vcpu_the_same_cpuid() -> None:
    # KVM_GET_SUPPORTED_CPUID reports the APIC ID of the CPU the caller runs on: two VMM
    # processes on two CPUs would refuse each other's vCPU state without the vCPU's own IDs.
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    allowed = os.sched_getaffinity(0)
    try:
        tables = set()
        for cpu in sorted(allowed):
            os.sched_setaffinity(0, {cpu})
            tables.add(linux.vcpu_cpuid(linux._supported_cpuid(kvm), 3))
    finally:
        os.sched_setaffinity(0, allowed)
        os.close(kvm)
    assert len(tables) == 1


@needs_kvm
async def test_sev_is_refused_with_enotty(hv: LinuxHypervisor) -> None:
    vm = await hv.create_vm()
    try:
        for call in (
            vm.sev_init(es=False),
            vm.sev_launch(4096, 0, es=False),
            vm.move_enc_context_from(vm.fileno()),
        ):
            with pytest.raises(OSError) as info:
                await call
            assert info.value.errno == errno.ENOTTY
            assert "plain guests only" in str(info.value)
    finally:
        vm.close()


@needs_kvm
async def test_closing_a_vcpu_in_kvm_run_ends_its_thread(hv: LinuxHypervisor) -> None:
    mem, machine = await launch(hv, 1, line_every=(1 << 32) - 1)
    vcpu = machine.vcpus[0]
    assert vcpu.start_run()
    await trio.sleep(0.01)
    thread = vcpu._thread
    assert thread is not None
    machine.close()
    os.close(mem)
    assert not thread.thread.is_alive()
    assert vcpu.fileno() == -1


def test_unusable_reason_names_a_missing_device(tmp_path: os.PathLike[str]) -> None:
    reason = unusable_reason(os.path.join(tmp_path, "kvm"))
    assert reason is not None and "does not exist" in reason


async def test_kvmstub_vms_keep_no_vm_state() -> None:
    kernel = ModelKernel()
    vm = await ModelHypervisor(kernel).create_vm()
    try:
        assert await vm.get_vm_state() is None
        with pytest.raises(StateMismatch, match="keep none"):
            await vm.set_vm_state(VmState(backend="linux", version=1, blob=b""))
    finally:
        vm.close()


@needs_kvm
async def test_measure_state_and_kick_costs(hv: LinuxHypervisor) -> None:
    """Prints what one vCPU's save and restore and a kick cost here (run with -s)."""
    mem, machine = await launch(hv, 1, line_every=(1 << 32) - 1)
    target = await build(hv, mem, 1)
    vcpu = machine.vcpus[0]
    try:
        saves, restores, kicks, vm_saves, vm_restores = [], [], [], [], []
        for _ in range(30):
            vcpu.start_run()
            await trio.sleep(0.002)
            t0 = time.perf_counter()
            vcpu.kick()
            with pytest.raises(OSError):
                await vcpu.run()
            kicks.append(time.perf_counter() - t0)
            vcpu.unkick()
            t0 = time.perf_counter()
            state = await vcpu.get_state()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vm_state = await machine.vm.get_vm_state()
            vm_saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await target.vcpus[0].set_state(state)
            restores.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await target.vm.set_vm_state(vm_state)
            vm_restores.append(time.perf_counter() - t0)
        us = {
            "kick -> run returns": kicks,
            "vCPU get_state": saves,
            "vCPU set_state": restores,
            "get_vm_state": vm_saves,
            "set_vm_state": vm_restores,
        }
        for name, xs in us.items():
            xs.sort()
            print(
                f"{name}: median {statistics.median(xs) * 1e6:.0f} us, "
                f"p90 {xs[int(len(xs) * 0.9)] * 1e6:.0f} us"
            )
        print(f"vCPU state blob: {len(state.blob)} bytes; VM state {len(vm_state.blob)} bytes")
    finally:
        target.close()
        machine.close()
        os.close(mem)
    assert kicks


if __name__ == "__main__" and sys.argv[1:2] == ["target"]:
    trio.run(target_main, socket.socket(fileno=int(sys.argv[2])))
