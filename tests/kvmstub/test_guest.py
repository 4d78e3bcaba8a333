"""kvmstub.guest: the guest program, driven slice by slice the way KVM_RUN drives it, with a
small VMM (serial log, doorbell, shared-region list) written out here."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmstub import guest
from kvmstub.guest import (
    LINE_PATTERN,
    GuestParams,
    PageAccess,
    build_launch_image,
    complete,
    flip_pattern,
    initial_regs,
    required_memory,
    run_slice,
)
from kvmstub.memory import GuestMemory, xts_encrypt
from kvmstub.uapi import (
    DOORBELL_IN_PORT,
    DOORBELL_OUT_PORT,
    IDLE_PORT,
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_X86_WRMSR,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SIZE,
    SERIAL_PORT,
    U64_MASK,
    HypercallExit,
    IoExit,
    MsrExit,
    Regs,
    RunExit,
    kvm_cpuid_leaves,
)

VEK = bytes(range(1, 65))
STEP_NS = 1_000  # every clock() call advances the fake clock by 1 us
BUDGET_NS = 20_000  # so a slice runs about 20 steps


class FakeClock:
    """A monotonic clock that moves STEP_NS per reading, plus whatever pause a test adds."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        self.now += STEP_NS
        return self.now

    def pause(self, ns: int) -> None:
        self.now += ns


class FakeMemory:
    """PageAccess over a bytearray. Private pages are stored masked with a per-GPA key
    stream, so a page read through the wrong view is garbage, as on SEV."""

    def __init__(self, pages: int) -> None:
        self.buf = bytearray(pages * PAGE_SIZE)
        self.fail_reads_at: int | None = None

    @staticmethod
    def _mask(gpa: int) -> int:
        return int.from_bytes(flip_pattern(0xFFFF, gpa), "little")

    def _check(self, gpa: int) -> None:
        if gpa < 0 or gpa % PAGE_SIZE or gpa + PAGE_SIZE > len(self.buf):
            raise OSError(errno.EFAULT, "unbacked")

    def read_page(self, gpa: int, private: bool) -> bytes:
        self._check(gpa)
        if gpa == self.fail_reads_at:
            raise OSError(errno.EFAULT, "injected fault")
        data = bytes(self.buf[gpa : gpa + PAGE_SIZE])
        if private:
            data = (int.from_bytes(data, "little") ^ self._mask(gpa)).to_bytes(PAGE_SIZE, "little")
        return data

    def write_page(self, gpa: int, data: bytes, private: bool) -> None:
        self._check(gpa)
        if private:
            data = (int.from_bytes(data, "little") ^ self._mask(gpa)).to_bytes(PAGE_SIZE, "little")
        self.buf[gpa : gpa + PAGE_SIZE] = data


class RealMemory:
    """PageAccess over kvmstub.memory.GuestMemory with a VEK, as the model gives it."""

    def __init__(self, mem: GuestMemory, vek: bytes) -> None:
        self.mem = mem
        self.vek = vek

    def read_page(self, gpa: int, private: bool) -> bytes:
        return self.mem.read_page(gpa, self.vek if private else None)

    def write_page(self, gpa: int, data: bytes, private: bool) -> None:
        self.mem.write_page(gpa, data, self.vek if private else None)


class Vmm:
    """What a VMM does around KVM_RUN: completes the last exit, runs a slice, serves the
    exit (serial log, one doorbell sum per vCPU, shared-region list)."""

    def __init__(
        self,
        params: GuestParams,
        mem: PageAccess,
        *,
        clock: FakeClock | None = None,
        exit_hypercall: bool = True,
        hypercall_ret: int = 0,
        write_image: bool = True,
    ) -> None:
        self.params = params
        self.mem = mem
        self.clock = clock or FakeClock()
        self.exit_hypercall = exit_hypercall
        self.hypercall_ret = hypercall_ret
        n = params.vcpus
        self.regs = [initial_regs(i) for i in range(n)]
        self.pending: list[RunExit | None] = [None] * n
        self.in_data: list[bytes | None] = [None] * n
        self.sums = [0] * n
        self.serial: list[list[bytes]] = [[] for _ in range(n)]
        self.hypercalls: list[HypercallExit] = []
        self.shared: set[int] = set()
        self.steps = 0
        if write_image:
            mem.write_page(0, build_launch_image(params), True)

    def run(self, i: int) -> RunExit:
        regs = complete(self.regs[i], self.pending[i], self.in_data[i], self.hypercall_ret)
        regs, exit_, steps = run_slice(
            regs,
            self.mem,
            now_ns=self.clock(),
            budget_ns=BUDGET_NS,
            clock=self.clock,
            exit_hypercall=self.exit_hypercall,
        )
        self.regs[i], self.pending[i], self.in_data[i] = regs, exit_, None
        self.steps += steps
        io = exit_.io
        if exit_.exit_reason == KVM_EXIT_IO and io is not None:
            if io.direction == KVM_EXIT_IO_OUT and io.port == SERIAL_PORT:
                self.serial[i].append(io.data)
            elif io.direction == KVM_EXIT_IO_OUT and io.port == DOORBELL_OUT_PORT:
                self.sums[i] = (self.sums[i] + int.from_bytes(io.data, "little")) & 0xFFFFFFFF
            elif io.direction == KVM_EXIT_IO_IN and io.port == DOORBELL_IN_PORT:
                self.in_data[i] = self.sums[i].to_bytes(4, "little")
        hc = exit_.hypercall
        if exit_.exit_reason == KVM_EXIT_HYPERCALL and hc is not None:
            self.hypercalls.append(hc)
            if self.hypercall_ret == 0:
                gpa, _, attrs = hc.args[:3]
                if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED:
                    self.shared.discard(gpa)
                else:
                    self.shared.add(gpa)
        return exit_

    def run_all(self, rounds: int) -> None:
        for _ in range(rounds):
            for i in range(self.params.vcpus):
                self.run(i)

    def run_until_line(self, i: int, limit: int = 10_000) -> bytes:
        before = len(self.serial[i])
        for _ in range(limit):
            self.run(i)
            if len(self.serial[i]) > before:
                return self.serial[i][-1]
        raise AssertionError("no serial line")

    def lines(self, i: int) -> list[tuple[int, int, int]]:
        out = []
        for data in self.serial[i]:
            match = LINE_PATTERN.fullmatch(data)
            assert match, data
            vcpu, seq, gap = (int(g) for g in match.groups())
            out.append((vcpu, seq, gap))
        return out

    def panics(self) -> list[bytes]:
        return [d for lines in self.serial for d in lines if d.startswith(b"PANIC")]


def journal_gpa(i: int) -> int:
    return (1 + i) * PAGE_SIZE


def flip_gpa(params: GuestParams, i: int) -> int:
    return (1 + params.vcpus + i) * PAGE_SIZE


def fake_vmm(params: GuestParams, **kwargs: object) -> tuple[Vmm, FakeMemory]:
    mem = FakeMemory(required_memory(params) // PAGE_SIZE)
    return Vmm(params, mem, **kwargs), mem  # type: ignore[arg-type]


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    yield fd
    os.close(fd)


def real_memory(fd: int, size: int) -> GuestMemory:
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.set_region(0, 0, 0, size, fd, 0)
    return mem


# --- the launch image and boot -------------------------------------------------------------


def test_launch_image_is_one_page_and_memory_covers_image_journals_and_flip_pages() -> None:
    params = GuestParams(vcpus=3)
    assert len(build_launch_image(params)) == PAGE_SIZE
    assert required_memory(params) == 7 * PAGE_SIZE


@pytest.mark.parametrize(
    "params",
    [
        GuestParams(vcpus=0),
        GuestParams(vcpus=1, line_every=0),
        GuestParams(vcpus=1, flip_every=0),
        GuestParams(vcpus=1, idle_us=-1),
        GuestParams(vcpus=1, idle_us=1 << 32),  # more than the idle port's u32
    ],
)
def test_launch_image_refuses_params_the_guest_could_not_run(params: GuestParams) -> None:
    with pytest.raises(ValueError):
        build_launch_image(params)


def test_boot_writes_journal_genesis_and_private_flip_page() -> None:
    params = GuestParams(vcpus=2, line_every=1000, flip_every=1000)
    vmm, mem = fake_vmm(params)
    assert vmm.run(1).exit_reason == KVM_EXIT_INTR
    journal = mem.read_page(journal_gpa(1), True)
    assert journal.startswith(guest.JOURNAL_MAGIC)
    assert mem.read_page(flip_gpa(params, 1), True) == flip_pattern(1, 0)
    assert mem.read_page(flip_gpa(params, 1), False) != flip_pattern(1, 0)
    assert mem.read_page(journal_gpa(0), False) == bytes(PAGE_SIZE)  # vCPU 0 has not run


def test_image_with_wrong_magic_panics_image_then_shuts_down() -> None:
    params = GuestParams(vcpus=1)
    vmm, mem = fake_vmm(params, write_image=False)
    mem.write_page(0, b"NOTGUEST" + build_launch_image(params)[8:], True)
    exit_ = vmm.run(0)
    assert exit_.io == IoExit(KVM_EXIT_IO_OUT, SERIAL_PORT, 1, 12, b"PANIC image\n")
    assert vmm.run(0).exit_reason == KVM_EXIT_SHUTDOWN


def test_plaintext_image_in_a_private_guest_panics_image() -> None:
    params = GuestParams(vcpus=1)
    vmm, mem = fake_vmm(params, write_image=False)
    mem.write_page(0, build_launch_image(params), False)  # never encrypted at launch
    vmm.run(0)
    assert vmm.panics() == [b"PANIC image\n"]


def test_vcpu_index_beyond_the_images_vcpu_count_panics_image() -> None:
    params = GuestParams(vcpus=1)
    vmm, _ = fake_vmm(params)
    vmm.regs[0] = initial_regs(1)
    vmm.run(0)
    assert vmm.panics() == [b"PANIC image\n"]


# --- steps, lines, doorbell -----------------------------------------------------------------


def test_slice_ends_with_intr_once_the_budget_is_spent() -> None:
    vmm, _ = fake_vmm(GuestParams(vcpus=1, line_every=10_000, flip_every=10_000))
    vmm.run(0)  # boot
    before = vmm.steps
    assert vmm.run(0).exit_reason == KVM_EXIT_INTR
    ran = vmm.steps - before
    assert BUDGET_NS // STEP_NS - 2 <= ran <= BUDGET_NS // STEP_NS + 1


def test_seq_is_contiguous_per_vcpu_over_many_slices() -> None:
    params = GuestParams(vcpus=3, line_every=7, flip_every=5)
    vmm, _ = fake_vmm(params)
    vmm.run_all(600)
    assert vmm.panics() == []
    for i in range(3):
        lines = vmm.lines(i)
        assert len(lines) > 100
        assert [seq for _, seq, _ in lines] == list(range(len(lines)))
        assert {vcpu for vcpu, _, _ in lines} == {i}


def test_each_line_is_one_out_exit_then_doorbell_out_then_in() -> None:
    params = GuestParams(vcpus=1, line_every=5, flip_every=1000)
    vmm, _ = fake_vmm(params)
    for seq in range(4):
        while True:
            exit_ = vmm.run(0)
            if exit_.exit_reason == KVM_EXIT_IO:
                break
        line = f"vcpu=0 seq={seq} gap_us=".encode()
        assert exit_.io is not None
        assert (exit_.io.port, exit_.io.size, exit_.io.count) == (
            SERIAL_PORT,
            1,
            len(exit_.io.data),
        )
        assert exit_.io.data.startswith(line)
        assert LINE_PATTERN.fullmatch(exit_.io.data)
        assert vmm.run(0).io == IoExit(
            KVM_EXIT_IO_OUT, DOORBELL_OUT_PORT, 4, 1, seq.to_bytes(4, "little")
        )
        assert vmm.run(0).io == IoExit(KVM_EXIT_IO_IN, DOORBELL_IN_PORT, 4, 1)
    assert vmm.sums[0] == 0 + 1 + 2 + 3


def test_a_line_comes_every_line_every_steps() -> None:
    params = GuestParams(vcpus=1, line_every=13, flip_every=1000)
    vmm, _ = fake_vmm(params)
    for seq in range(5):
        vmm.run_until_line(0)
        assert vmm.regs[0].rcx == (seq + 1) * 13  # rcx: journal step


def test_gap_us_reports_the_largest_pause_between_steps_since_the_previous_line() -> None:
    params = GuestParams(vcpus=1, line_every=50, flip_every=1000)
    vmm, _ = fake_vmm(params)
    vmm.run_until_line(0)
    vmm.run(0)  # doorbell out
    vmm.run(0)  # doorbell in
    vmm.run(0)
    vmm.clock.pause(7_000_000)  # the VMM does not call KVM_RUN for 7 ms
    vmm.run_until_line(0)
    vmm.run_until_line(0)
    gaps = [gap for _, _, gap in vmm.lines(0)]
    assert 7_000 <= gaps[1] < 7_100
    assert gaps[0] < 100
    assert gaps[2] < 100


# --- idling -------------------------------------------------------------------------------


def test_with_idle_us_each_line_ends_with_an_idle_request_and_the_idle_is_no_gap() -> None:
    params = GuestParams(vcpus=1, line_every=5, flip_every=1000, idle_us=10_000)
    vmm, _ = fake_vmm(params)
    for seq in range(3):
        vmm.run_until_line(0)
        assert vmm.run(0).io == IoExit(
            KVM_EXIT_IO_OUT, DOORBELL_OUT_PORT, 4, 1, seq.to_bytes(4, "little")
        )
        assert vmm.run(0).io == IoExit(KVM_EXIT_IO_IN, DOORBELL_IN_PORT, 4, 1)
        # The doorbell's sum checked, the guest asks its VMM to idle it, as the real KVM's
        # x86 witness does; the VMM waits that long before the next KVM_RUN.
        idle = vmm.run(0)
        assert idle.io == IoExit(KVM_EXIT_IO_OUT, IDLE_PORT, 4, 1, (10_000).to_bytes(4, "little"))
        vmm.clock.pause(10_000_000 if seq != 1 else 13_000_000)  # 3 ms more than asked once
    vmm.run_until_line(0)
    gaps = [gap for _, _, gap in vmm.lines(0)]
    assert gaps[0] < 100 and gaps[1] < 100 and gaps[3] < 100
    assert 3_000 <= gaps[2] < 3_100  # only what the idle took beyond the time asked
    assert [seq for _, seq, _ in vmm.lines(0)] == [0, 1, 2, 3]
    assert not vmm.panics()


def test_an_uncompleted_idle_request_is_made_again_and_then_the_guest_goes_on() -> None:
    params = GuestParams(vcpus=1, line_every=5, flip_every=1000, idle_us=1)
    vmm, _ = fake_vmm(params)
    vmm.run_until_line(0)
    vmm.run(0)
    vmm.run(0)
    first = vmm.run(0)
    assert first.io is not None and first.io.port == IDLE_PORT
    vmm.pending[0] = None  # registers taken without the completing KVM_RUN
    assert vmm.run(0) == first
    vmm.run_until_line(0)
    assert [seq for _, seq, _ in vmm.lines(0)] == [0, 1]


def test_an_image_without_idle_us_keeps_the_guest_busy_as_before() -> None:
    # An image made before the idle field (zeros after the first four fields), as a guest
    # launched by an older VMM has in its page 0: no idle request, ever.
    params = GuestParams(vcpus=1, line_every=5, flip_every=3)
    vmm, mem = fake_vmm(params)
    old = guest._IMAGE.pack(guest.IMAGE_MAGIC, 1, 5, 3)
    mem.write_page(0, old.ljust(PAGE_SIZE, b"\0"), True)
    ports = []
    for _ in range(200):
        exit_ = vmm.run(0)
        if exit_.io is not None:
            ports.append(exit_.io.port)
    assert IDLE_PORT not in ports and SERIAL_PORT in ports
    assert not vmm.panics()


# --- memory corruption and lost device state -----------------------------------------------


def test_flipped_byte_in_journal_page_panics_journal() -> None:
    params = GuestParams(vcpus=2, line_every=7, flip_every=5)
    vmm, mem = fake_vmm(params)
    vmm.run_all(20)
    mem.buf[journal_gpa(1) + 2000] ^= 0x01
    vmm.run_all(5)
    assert vmm.panics() == [b"PANIC journal\n"]
    assert vmm.serial[1][-1] == b"PANIC journal\n"
    assert all(vmm.run(1).exit_reason == KVM_EXIT_SHUTDOWN for _ in range(3))
    assert vmm.run(0).exit_reason != KVM_EXIT_SHUTDOWN  # the other vCPU runs on


def test_rewound_journal_page_panics_journal() -> None:
    params = GuestParams(vcpus=1, line_every=1000, flip_every=1000)
    vmm, mem = fake_vmm(params)
    vmm.run(0)
    old = bytes(mem.buf[journal_gpa(0) : journal_gpa(0) + PAGE_SIZE])
    vmm.run(0)
    mem.buf[journal_gpa(0) : journal_gpa(0) + PAGE_SIZE] = old  # a stale copy of memory
    vmm.run(0)
    assert vmm.panics() == [b"PANIC journal\n"]


def test_wrong_doorbell_sum_panics_device() -> None:
    params = GuestParams(vcpus=1, line_every=5, flip_every=1000)
    vmm, _ = fake_vmm(params)
    vmm.run_all(30)
    assert vmm.panics() == []
    vmm.sums[0] += 1  # device state lost or corrupted
    vmm.run_all(30)
    assert vmm.panics() == [b"PANIC device\n"]
    assert vmm.run(0).exit_reason == KVM_EXIT_SHUTDOWN


def test_doorbell_in_data_of_wrong_length_is_truncated_or_zero_padded() -> None:
    params = GuestParams(vcpus=1, line_every=3, flip_every=1000)
    vmm, _ = fake_vmm(params)
    regs = initial_regs(0)
    in_exit = RunExit(KVM_EXIT_IO, io=IoExit(KVM_EXIT_IO_IN, DOORBELL_IN_PORT, 4, 1))
    regs = msgspec.structs.replace(regs, rip=guest.RIP_DOORBELL_IN)
    assert complete(regs, in_exit, b"\x05\x00\x00\x00\xff\xff", None).rax == 5
    assert complete(regs, in_exit, b"\x07", None).rax == 7
    assert complete(regs, in_exit, None, None).rax == 0
    # and the guest runs on with such data when the value is right
    vmm.run_until_line(0)
    vmm.run(0)
    vmm.run(0)  # IN exit: sum 0
    vmm.in_data[0] = b""
    vmm.run_all(20)
    assert vmm.panics() == []


def test_corrupted_flip_page_panics_memory() -> None:
    params = GuestParams(vcpus=1, line_every=1000, flip_every=30)  # a slice: ~20 steps
    vmm, mem = fake_vmm(params)
    while vmm.run(0).exit_reason != KVM_EXIT_HYPERCALL:
        pass
    assert vmm.run(0).exit_reason == KVM_EXIT_INTR  # converted: the page is shared now
    assert vmm.shared == {flip_gpa(params, 0)}
    mem.buf[flip_gpa(params, 0) + 17] ^= 0x80
    vmm.run_all(10)
    assert vmm.panics() == [b"PANIC memory\n"]


# --- page flips -----------------------------------------------------------------------------


def test_flip_page_is_plaintext_in_memfd_when_shared_and_ciphertext_when_private(
    memfd: int,
) -> None:
    params = GuestParams(vcpus=2, line_every=11, flip_every=3)
    gm = real_memory(memfd, required_memory(params))
    vmm = Vmm(params, RealMemory(gm, VEK))
    seen = {"shared": 0, "private": 0}
    for _ in range(200):
        for i in range(2):
            exit_ = vmm.run(i)
            if exit_.exit_reason == KVM_EXIT_HYPERCALL:
                continue  # the conversion completes with the next KVM_RUN
            gpa = flip_gpa(params, i)
            flips = vmm.regs[i].r14
            stored = os.pread(memfd, PAGE_SIZE, gpa)
            if gpa in vmm.shared:
                assert stored == flip_pattern(i, flips)
                seen["shared"] += 1
            else:
                assert stored == xts_encrypt(VEK, gpa, flip_pattern(i, flips))
                seen["private"] += 1
    assert vmm.panics() == []
    assert seen["shared"] > 20 and seen["private"] > 20
    assert vmm.hypercalls[0] == HypercallExit(
        KVM_HC_MAP_GPA_RANGE, (flip_gpa(params, 0), 1, 0, 0, 0, 0)
    )
    assert vmm.hypercalls[2].args[2] == KVM_MAP_GPA_RANGE_ENCRYPTED  # and back
    gm.close()


def test_flip_refused_by_the_vmm_leaves_the_page_private() -> None:
    params = GuestParams(vcpus=1, line_every=1000, flip_every=2)
    vmm, mem = fake_vmm(params, hypercall_ret=-KVM_EINVAL)
    vmm.run_all(50)
    assert len(vmm.hypercalls) > 10
    assert all(hc.args[2] == 0 for hc in vmm.hypercalls)  # still asking to share
    assert vmm.panics() == []
    assert mem.read_page(flip_gpa(params, 0), True) == flip_pattern(0, 0)


def test_without_exit_hypercall_the_guest_sees_enosys_and_keeps_its_page_private() -> None:
    params = GuestParams(vcpus=1, line_every=10_000, flip_every=1)
    vmm, mem = fake_vmm(params, exit_hypercall=False)
    for _ in range(20):
        assert vmm.run(0).exit_reason == KVM_EXIT_INTR
    assert vmm.hypercalls == []
    assert vmm.regs[0].rax == -KVM_ENOSYS & U64_MASK
    assert mem.read_page(flip_gpa(params, 0), True) == flip_pattern(0, 0)


# --- completion of exits ----------------------------------------------------------------------


def test_complete_without_a_pending_exit_changes_nothing() -> None:
    regs = msgspec.structs.replace(initial_regs(0), rip=guest.RIP_DOORBELL_IN)
    assert complete(regs, None, b"\1\2\3\4", 7) is regs


def test_completing_an_exit_twice_is_a_noop() -> None:
    params = GuestParams(vcpus=1, line_every=2, flip_every=1000)
    vmm, _ = fake_vmm(params)
    for _ in range(5):
        exit_ = vmm.run(0)
        once = complete(vmm.regs[0], exit_, b"\0\0\0\0", 0)
        assert complete(once, exit_, b"\0\0\0\0", 0) == once


def test_completion_of_a_different_exit_than_the_guest_waits_for_is_a_noop() -> None:
    regs = msgspec.structs.replace(initial_regs(0), rip=guest.RIP_DOORBELL_IN)
    serial = RunExit(KVM_EXIT_IO, io=IoExit(KVM_EXIT_IO_OUT, SERIAL_PORT, 1, 1, b"x"))
    hypercall = RunExit(KVM_EXIT_HYPERCALL, hypercall=HypercallExit(12, (0, 1, 0, 0, 0, 0)))
    assert complete(regs, serial, None, None) == regs
    assert complete(regs, hypercall, None, 0) == regs


def test_uncompleted_out_is_executed_again_like_an_unskipped_instruction() -> None:
    params = GuestParams(vcpus=1, line_every=4, flip_every=1000)
    vmm, _ = fake_vmm(params)
    line = vmm.run_until_line(0)
    regs = vmm.regs[0]
    again, exit_, steps = run_slice(
        regs,
        vmm.mem,
        now_ns=vmm.clock(),
        budget_ns=BUDGET_NS,
        clock=vmm.clock,
        exit_hypercall=True,
    )
    assert (exit_.io is not None and exit_.io.data, steps, again) == (line, 0, regs)


# --- moving the guest -------------------------------------------------------------------------


def test_registers_and_the_same_memfd_move_the_guest_to_another_vmm(memfd: int) -> None:
    params = GuestParams(vcpus=2, line_every=9, flip_every=4)
    source_mem = real_memory(memfd, required_memory(params))
    source = Vmm(params, RealMemory(source_mem, VEK))
    source.run_all(150)
    # the pause: complete pending exits (KVM_RUN with immediate_exit), then take everything
    regs = [complete(source.regs[i], source.pending[i], source.in_data[i], 0) for i in range(2)]
    target_mem = GuestMemory()
    target_mem.set_region(0, 0, 0, required_memory(params), memfd, 0)
    source_mem.close()
    target = Vmm(params, RealMemory(target_mem, VEK), clock=source.clock, write_image=False)
    target.regs, target.sums, target.shared = regs, list(source.sums), set(source.shared)
    source.clock.pause(3_000_000)  # 3 ms blackout
    target.run_all(150)
    assert source.panics() == target.panics() == []
    for i in range(2):
        seqs = [seq for _, seq, _ in source.lines(i) + target.lines(i)]
        assert seqs == list(range(len(seqs)))
        assert max(gap for _, _, gap in target.lines(i)) >= 3_000
    target_mem.close()


def test_guest_on_a_sparse_1tib_memfd_touches_only_its_own_pages(memfd: int) -> None:
    params = GuestParams(vcpus=4, line_every=5, flip_every=3)
    gm = real_memory(memfd, 1 << 40)
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    vmm = Vmm(params, RealMemory(gm, VEK))
    vmm.run_all(100)
    assert vmm.panics() == []
    assert os.fstat(memfd).st_blocks <= required_memory(params) // 512
    gm.close()


# --- faults and hostile input -----------------------------------------------------------------


def test_memory_fault_after_progress_ends_the_slice_and_keeps_state_consistent() -> None:
    params = GuestParams(vcpus=1, line_every=1000, flip_every=5)
    vmm, mem = fake_vmm(params)
    mem.fail_reads_at = flip_gpa(params, 0)
    before = vmm.steps
    exit_ = vmm.run(0)  # steps, then faults on the flip page
    assert exit_.exit_reason == KVM_EXIT_INTR and vmm.steps > before
    with pytest.raises(OSError) as info:
        vmm.run(0)  # the fault is met first now, with nothing done
    assert info.value.errno == errno.EFAULT
    mem.fail_reads_at = None
    vmm.run_all(100)
    assert vmm.panics() == []
    assert len(vmm.hypercalls) > 10


_u64 = st.one_of(
    st.integers(0, U64_MASK),
    st.integers(-(1 << 64), 1 << 66),
    st.sampled_from(
        [
            0,
            1,
            PAGE_SIZE,
            guest.RIP_RESET,
            guest.RIP_STEP,
            guest.RIP_LINE,
            guest.RIP_LINE_DONE,
            guest.RIP_DOORBELL_OUT,
            guest.RIP_DOORBELL_IN,
            guest.RIP_DOORBELL_CHECK,
            guest.RIP_FLIP,
            guest.RIP_VMCALL,
            guest.RIP_VMCALL_DONE,
            guest.RIP_PANIC,
            guest.RIP_HALT,
            guest.RIP_SHUTDOWN,
            guest.RIP_MIGRATION_READY,
            guest.RIP_MIGRATION_OFF,
        ]
    ),
)
_regs = st.builds(Regs, **{name: _u64 for name in Regs.__struct_fields__})
_pending = st.one_of(
    st.none(),
    st.builds(
        RunExit,
        st.sampled_from([KVM_EXIT_IO, KVM_EXIT_HYPERCALL, KVM_EXIT_INTR, KVM_EXIT_X86_WRMSR]),
        io=st.one_of(
            st.none(),
            st.builds(
                IoExit,
                st.integers(0, 1),
                st.sampled_from([SERIAL_PORT, DOORBELL_OUT_PORT, DOORBELL_IN_PORT]),
                st.integers(1, 4),
                st.integers(1, 4),
            ),
        ),
        hypercall=st.one_of(
            st.none(), st.builds(HypercallExit, st.just(12), st.just((0, 1, 0, 0, 0, 0)))
        ),
        msr=st.one_of(st.none(), st.builds(MsrExit, st.just(4), st.just(0x4B564D08))),
    ),
)


class FakeCpu:
    """guest.CpuAccess with the migration-control CPUID bit; WRMSR exits or is handled."""

    def __init__(self, exits: bool) -> None:
        self.exits = exits
        self.leaves = {e.function: (e.eax, e.ebx, e.ecx, e.edx) for e in kvm_cpuid_leaves(1 << 17)}

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        return self.leaves.get(function, (0, 0, 0, 0))

    def wrmsr(self, index: int, value: int) -> RunExit | bool:
        if self.exits:
            return RunExit(KVM_EXIT_X86_WRMSR, msr=MsrExit(4, index, value))
        return False

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int) -> RunExit | int:
        return RunExit(KVM_EXIT_HYPERCALL, hypercall=HypercallExit(nr, (a0, a1, a2, 0, 0, 0)))


@settings(max_examples=300, deadline=None)
@given(
    regs=_regs,
    pending=_pending,
    io_data=st.one_of(st.none(), st.binary(max_size=12)),
    ret=st.one_of(st.none(), st.integers(-(1 << 70), 1 << 70)),
    exit_hypercall=st.booleans(),
    cpu=st.sampled_from([None, FakeCpu(exits=True), FakeCpu(exits=False)]),
)
def test_hostile_registers_and_vmm_input_raise_nothing_but_oserror(
    regs: Regs,
    pending: RunExit | None,
    io_data: bytes | None,
    ret: int | None,
    exit_hypercall: bool,
    cpu: FakeCpu | None,
) -> None:
    params = GuestParams(vcpus=2, line_every=3, flip_every=2)
    mem = FakeMemory(required_memory(params) // PAGE_SIZE)
    mem.write_page(0, build_launch_image(params), True)
    clock = FakeClock()
    for _ in range(4):
        regs = complete(regs, pending, io_data, ret)
        try:
            regs, pending, _ = run_slice(
                regs,
                mem,
                now_ns=clock(),
                budget_ns=BUDGET_NS,
                clock=clock,
                exit_hypercall=exit_hypercall,
                cpu=cpu,
            )
        except OSError as e:
            assert e.errno == errno.EFAULT
            return
        assert all(0 <= getattr(regs, name) <= U64_MASK for name in Regs.__struct_fields__)
