"""Page-encryption status and migration control in kvmstub (reference sev-live-migration.md
section 2): KVM_HC_MAP_GPA_RANGE's checks, MSR_KVM_MIGRATION_CONTROL through an MSR filter
(KVM_CAP_X86_USER_SPACE_MSR, KVM_X86_SET_MSR_FILTER, KVM_EXIT_X86_WRMSR), KVM_SET_CPUID2, and
the witness guest that enables migration at boot and clears it before it halts.

The kernel code followed is arch/x86/kvm/x86.c (____kvm_emulate_hypercall,
kvm_vm_ioctl_set_msr_filter, kvm_add_msr_filter, kvm_msr_allowed, kvm_emulate_wrmsr,
kvm_msr_user_space) and arch/x86/kvm/cpuid.c (kvm_vcpu_ioctl_set_cpuid2, kvm_set_cpuid).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmstub import client, guest, uapi
from kvmstub.model import Host, MsrFilter, Vm, emulate_hypercall, emulate_wrmsr
from kvmstub.uapi import (
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_X86_WRMSR,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_MSR_FILTER_DEFAULT_DENY,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SIZE,
    U64_MASK,
    MsrFilterRange,
)

KvmstubDaemon = Any  # tests/conftest.py's class

PID = 1000
OTHER = 2000
MAP_GPA = 1 << KVM_HC_MAP_GPA_RANGE
PARAMS = guest.GuestParams(vcpus=2, line_every=5, flip_every=10**6)
MIGRATION_CPUID = uapi.kvm_cpuid_leaves(
    1 << uapi.KVM_FEATURE_HC_MAP_GPA_RANGE | 1 << uapi.KVM_FEATURE_MIGRATION_CONTROL
)
# The filter a VMM installs to see the guest's writes of MSR_KVM_MIGRATION_CONTROL only.
MIGRATION_FILTER = [MsrFilterRange(KVM_MSR_FILTER_WRITE, 1, MSR_KVM_MIGRATION_CONTROL, bytes(8))]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


def make_host() -> Host:
    return Host(clock=FakeClock())


def expect_errno(err: int, call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == err, info.value


def u64(value: int) -> int:
    return value & U64_MASK


# --- KVM_HC_MAP_GPA_RANGE ---------------------------------------------------------------------


def vm_with_exit(host: Host | None = None) -> Vm:
    vm = (host or make_host()).create_vm(PID)
    vm.enable_cap(PID, uapi.KVM_CAP_EXIT_HYPERCALL, 0, [MAP_GPA])
    return vm


def test_map_gpa_range_exits_with_its_three_arguments() -> None:
    exit_ = emulate_hypercall(vm_with_exit(), KVM_HC_MAP_GPA_RANGE, 0x3000, 2, 0x10, 99)
    assert isinstance(exit_, uapi.RunExit) and exit_.exit_reason == KVM_EXIT_HYPERCALL
    assert exit_.hypercall == uapi.HypercallExit(KVM_HC_MAP_GPA_RANGE, (0x3000, 2, 0x10, 0, 0, 0))


@pytest.mark.parametrize(
    ("gpa", "npages"),
    [
        (0x3001, 1),  # !PAGE_ALIGNED(gpa)
        (0x3000, 0),  # !npages
        (0x1000, U64_MASK),  # gpa_to_gfn(gpa) + npages <= gpa_to_gfn(gpa): wraps to 0
        (0xFFFF_FFFF_FFFF_F000, (1 << 64) - (1 << 52) + 1),  # gfn + npages is 2**64: 0
    ],
)
def test_map_gpa_range_refuses_a_bad_range_with_kvm_einval(gpa: int, npages: int) -> None:
    # ____kvm_emulate_hypercall: if (!PAGE_ALIGNED(gpa) || !npages ||
    #     gpa_to_gfn(gpa) + npages <= gpa_to_gfn(gpa)) ret = -KVM_EINVAL;
    ret = emulate_hypercall(vm_with_exit(), KVM_HC_MAP_GPA_RANGE, gpa, npages, 0, 0)
    assert ret == u64(-uapi.KVM_EINVAL)


def test_map_gpa_range_only_refuses_a_wrap_not_a_range_past_the_guests_memory() -> None:
    # The check is on u64 arithmetic alone: pages past MAXPHYADDR, or past every memory
    # slot, are the VMM's to refuse.
    vm = vm_with_exit()
    assert isinstance(
        emulate_hypercall(vm, KVM_HC_MAP_GPA_RANGE, U64_MASK & ~0xFFF, 1, 0, 0), uapi.RunExit
    )
    far = emulate_hypercall(vm, KVM_HC_MAP_GPA_RANGE, U64_MASK & ~0xFFF, 1 << 12, 0, 0)
    assert isinstance(far, uapi.RunExit)


@pytest.mark.parametrize("attrs", [1 << 5, 2, U64_MASK])
def test_map_gpa_range_attributes_are_the_vmms_to_check(attrs: int) -> None:
    # KVM copies a2 into the exit unread; reserved bits and page sizes are userspace's.
    exit_ = emulate_hypercall(vm_with_exit(), KVM_HC_MAP_GPA_RANGE, 0, 1, attrs, 0)
    assert isinstance(exit_, uapi.RunExit) and exit_.hypercall is not None
    assert exit_.hypercall.args[2] == attrs


def test_without_the_exit_even_a_bad_range_is_kvm_enosys() -> None:
    # `ret = -KVM_ENOSYS; if (!user_exit_on_hypercall(...)) break;` comes before the checks.
    vm = make_host().create_vm(PID)
    assert emulate_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0x3001, 0, 0, 0) == u64(-uapi.KVM_ENOSYS)


def test_a_hypercall_from_user_mode_is_kvm_eperm_before_anything_else() -> None:
    # `if (cpl) { ret = -KVM_EPERM; goto out; }` precedes the switch on nr.
    ret = emulate_hypercall(vm_with_exit(), KVM_HC_MAP_GPA_RANGE, 0x3001, 0, 0, 0, cpl=3)
    assert ret == u64(-uapi.KVM_EPERM)


def test_other_hypercalls_are_kvm_enosys() -> None:
    assert emulate_hypercall(vm_with_exit(), 11, 0, 0, 0, 0) == u64(-uapi.KVM_ENOSYS)


def test_a_32_bit_caller_sees_its_arguments_and_return_value_truncated() -> None:
    # if (!op_64_bit) { nr &= 0xFFFFFFFF; a0 &= 0xFFFFFFFF; ... } and RAX gets (u32)ret.
    vm = vm_with_exit()
    exit_ = emulate_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 1 << 32 | 0x5000, 1, 0, 0, op_64_bit=False)
    assert isinstance(exit_, uapi.RunExit) and exit_.hypercall is not None
    assert exit_.hypercall.args[:3] == (0x5000, 1, 0) and exit_.hypercall.longmode == 0
    bad = emulate_hypercall(vm, KVM_HC_MAP_GPA_RANGE, 0x5001, 1, 0, 0, op_64_bit=False)
    assert bad == -uapi.KVM_EINVAL & 0xFFFFFFFF


# --- KVM_CAP_X86_USER_SPACE_MSR and KVM_X86_SET_MSR_FILTER ---------------------------------


def test_check_extension_offers_user_space_msr_and_the_filter() -> None:
    host = make_host()
    assert host.check_extension(uapi.KVM_CAP_X86_USER_SPACE_MSR) == 1
    assert host.check_extension(uapi.KVM_CAP_X86_MSR_FILTER) == 1


def test_user_space_msr_takes_only_the_three_reasons() -> None:
    # kvm_vm_ioctl_enable_cap: if (cap->args[0] & ~KVM_MSR_EXIT_REASON_VALID_MASK) -EINVAL
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [8]))
    assert vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [7]) == 0
    assert vm.user_space_msr_mask == 7


def _range(flags: int = KVM_MSR_FILTER_WRITE, nmsrs: int = 1, size: int = 8) -> MsrFilterRange:
    return MsrFilterRange(flags, nmsrs, MSR_KVM_MIGRATION_CONTROL, bytes(size))


@pytest.mark.parametrize(
    ("flags", "ranges", "err"),
    [
        (2, [], errno.EINVAL),  # filter->flags & ~KVM_MSR_FILTER_DEFAULT_DENY
        (KVM_MSR_FILTER_DEFAULT_DENY, [], errno.EINVAL),  # empty && !default_allow
        (KVM_MSR_FILTER_DEFAULT_DENY, [_range(nmsrs=0)], errno.EINVAL),  # still empty
        (0, [_range(flags=0)], errno.EINVAL),  # !user_range->flags
        (0, [_range(flags=4)], errno.EINVAL),  # flags & ~KVM_MSR_FILTER_RANGE_VALID_MASK
        (0, [_range(nmsrs=0x600 * 8 + 1, size=0x600)], errno.EINVAL),  # > MAX_BITMAP_SIZE
        (0, [_range(nmsrs=65, size=8)], errno.EFAULT),  # memdup_user of 16 bytes faults
        (0, [_range(flags=0), _range(size=0)], errno.EINVAL),  # ranges in order: first wins
        (0, [_range(size=0), _range(flags=0)], errno.EFAULT),
        (0, [_range()] * (uapi.KVM_MSR_FILTER_MAX_RANGES + 1), errno.EINVAL),
    ],
)
def test_set_msr_filter_errnos_in_the_kernels_order_keep_the_old_filter(
    flags: int, ranges: list[MsrFilterRange], err: int
) -> None:
    vm = make_host().create_vm(PID)
    vm.set_msr_filter(PID, 0, MIGRATION_FILTER)
    before = vm.msr_filter
    expect_errno(err, lambda: vm.set_msr_filter(PID, flags, ranges))
    assert vm.msr_filter is before


def test_set_msr_filter_of_another_process_is_eio() -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EIO, lambda: vm.set_msr_filter(OTHER, 2, []))


def test_a_filter_range_may_span_the_largest_bitmap_and_skips_empty_ranges() -> None:
    vm = make_host().create_vm(PID)
    vm.set_msr_filter(PID, 0, [_range(nmsrs=0), _range(nmsrs=0x600 * 8, size=0x600)])
    assert vm.msr_filter is not None and len(vm.msr_filter.ranges) == 1


def test_the_filter_decides_by_the_first_matching_range_and_never_filters_x2apic() -> None:
    # kvm_msr_allowed: x2APIC MSRs (0x800..0x8ff) are always allowed; the first range that
    # covers the index for this access type decides with its bit; else the default.
    allow_all = MsrFilterRange(KVM_MSR_FILTER_WRITE, 1, MSR_KVM_MIGRATION_CONTROL, b"\x01")
    deny = MsrFilterRange(KVM_MSR_FILTER_WRITE, 1, MSR_KVM_MIGRATION_CONTROL, b"\x00")
    f = MsrFilter(True, (deny, allow_all))
    assert not f.allowed(MSR_KVM_MIGRATION_CONTROL, KVM_MSR_FILTER_WRITE)
    assert f.allowed(MSR_KVM_MIGRATION_CONTROL, KVM_MSR_FILTER_READ)  # no range for reads
    assert MsrFilter(True, (allow_all, deny)).allowed(
        MSR_KVM_MIGRATION_CONTROL, KVM_MSR_FILTER_WRITE
    )
    x2apic = MsrFilterRange(KVM_MSR_FILTER_WRITE, 0x100, 0x800, bytes(32))
    assert MsrFilter(False, (x2apic,)).allowed(0x830, KVM_MSR_FILTER_WRITE)
    assert not MsrFilter(False, (x2apic,)).allowed(0x900, KVM_MSR_FILTER_WRITE)


def test_a_wrmsr_reaches_the_vmm_only_for_a_reason_it_asked_for() -> None:
    vm = make_host().create_vm(PID)
    # No filter, no user-space MSRs: KVM does not implement the MSR, the guest gets #GP.
    assert emulate_wrmsr(vm, MSR_KVM_MIGRATION_CONTROL, 1) is False
    # Unknown MSRs to userspace: an exit with reason UNKNOWN.
    vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [KVM_MSR_EXIT_REASON_UNKNOWN])
    unknown = emulate_wrmsr(vm, MSR_KVM_MIGRATION_CONTROL, 1)
    assert isinstance(unknown, uapi.RunExit)
    assert unknown.msr == uapi.MsrExit(KVM_MSR_EXIT_REASON_UNKNOWN, MSR_KVM_MIGRATION_CONTROL, 1)
    # Filtered, but only UNKNOWN asked for: kvm_msr_user_space declines, #GP.
    vm.set_msr_filter(PID, 0, MIGRATION_FILTER)
    assert emulate_wrmsr(vm, MSR_KVM_MIGRATION_CONTROL, 1) is False
    vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [KVM_MSR_EXIT_REASON_FILTER])
    filtered = emulate_wrmsr(vm, MSR_KVM_MIGRATION_CONTROL, 1)
    assert isinstance(filtered, uapi.RunExit) and filtered.exit_reason == KVM_EXIT_X86_WRMSR
    assert filtered.msr == uapi.MsrExit(KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL, 1)


# --- KVM_SET_CPUID2 ---------------------------------------------------------------------------


def test_set_cpuid2_refuses_too_many_entries_with_e2big() -> None:
    # kvm_vcpu_ioctl_set_cpuid2: if (cpuid->nent > KVM_MAX_CPUID_ENTRIES) return -E2BIG;
    vcpu = make_host().create_vm(PID).create_vcpu(PID, 0)
    entries = [uapi.CpuidEntry(i) for i in range(uapi.KVM_MAX_CPUID_ENTRIES + 1)]
    expect_errno(errno.E2BIG, lambda: vcpu.set_cpuid2(PID, entries))
    vcpu.set_cpuid2(PID, entries[:-1])


def test_cpuid_is_fixed_once_the_vcpu_has_run(memfd: int) -> None:
    # kvm_set_cpuid: after KVM_RUN only an identical table is accepted (kvm_cpuid_check_equal).
    vm = launch(make_host(), memfd, "plain")
    vcpu = vm.vcpus[0]
    vcpu.set_cpuid2(PID, [uapi.CpuidEntry(1, eax=1)])
    vcpu.set_cpuid2(PID, MIGRATION_CPUID)  # before the first run: any change
    vcpu.run(PID)
    vcpu.set_cpuid2(PID, MIGRATION_CPUID)
    expect_errno(errno.EINVAL, lambda: vcpu.set_cpuid2(PID, MIGRATION_CPUID[:1]))
    assert vcpu.cpuid(uapi.KVM_CPUID_FEATURES, 0)[0] >> uapi.KVM_FEATURE_MIGRATION_CONTROL & 1


# --- the witness guest ------------------------------------------------------------------------


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, guest.required_memory(PARAMS))
    yield fd
    os.close(fd)


def launch(
    host: Host, ram: int, mode: str, *, cpuid: bool = False, reasons: int | None = None
) -> Vm:
    """A VMM's launch of the witness guest (plain, sev or sev-es), with the migration CPUID
    bit on every vCPU if `cpuid`, and the MSR filter plus user-space exits for `reasons`."""
    vm = host.create_vm(PID)
    if mode != "plain":
        vm.sev_ioctl(PID, uapi.KVM_SEV_ES_INIT if mode == "sev-es" else uapi.KVM_SEV_INIT, None)
    size = guest.required_memory(PARAMS)
    vm.set_user_memory_region(PID, 0, 0, 0, size, ram, 0)
    vm.enable_cap(PID, uapi.KVM_CAP_EXIT_HYPERCALL, 0, [MAP_GPA])
    if reasons is not None:
        vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [reasons])
        vm.set_msr_filter(PID, 0, MIGRATION_FILTER)
    os.pwrite(ram, guest.build_launch_image(PARAMS), 0)
    for i in range(PARAMS.vcpus):
        vcpu = vm.create_vcpu(PID, i)
        vcpu.set_regs(PID, guest.initial_regs(i))
        if cpuid:
            vcpu.set_cpuid2(PID, MIGRATION_CPUID)
    if mode != "plain":
        policy = uapi.SEV_POLICY_ES if mode == "sev-es" else 0
        vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_START, {"policy": policy})
        vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": PAGE_SIZE})
        if mode == "sev-es":
            vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA, None)
        vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_MEASURE, {})
        vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_FINISH, None)
    return vm


class Driver:
    """A VMM's vCPU loop for the witness guest: serves serial, doorbell and hypercalls,
    records every exit; `wrong_sum` makes the doorbell lie once (PANIC device)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.exits: dict[int, list[uapi.RunExit]] = {i: [] for i in range(len(vm.vcpus))}
        self.serial: dict[int, list[bytes]] = {i: [] for i in range(len(vm.vcpus))}
        self.sums: dict[int, int] = {}
        self.pending: dict[int, dict[str, Any]] = {}
        self.wrong_sum = False
        self.msr_error = 0

    def run(self, index: int) -> uapi.RunExit:
        exit_ = self.vm.vcpus[index].run(PID, **self.pending.pop(index, {}))
        self.exits[index].append(exit_)
        io = exit_.io
        if io is not None and io.port == uapi.SERIAL_PORT:
            self.serial[index].append(io.data)
        elif io is not None and io.direction == uapi.KVM_EXIT_IO_OUT:
            self.sums[index] = (self.sums.get(index, 0) + int.from_bytes(io.data, "little")) % (
                1 << 32
            )
        elif io is not None:
            value = (self.sums.get(index, 0) + (1 if self.wrong_sum else 0)) % (1 << 32)
            self.wrong_sum = False
            self.pending[index] = {"io_data": value.to_bytes(4, "little")}
        elif exit_.exit_reason == KVM_EXIT_HYPERCALL:
            self.pending[index] = {"hypercall_ret": 0}
        elif exit_.exit_reason == KVM_EXIT_X86_WRMSR:
            self.pending[index] = {"msr_error": self.msr_error}
        return exit_

    def run_until_lines(self, index: int, lines: int) -> None:
        while len(self.serial[index]) < lines:
            self.run(index)

    def wrmsrs(self, index: int) -> list[uapi.MsrExit]:
        return [e.msr for e in self.exits[index] if e.msr is not None]


@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es"])
def test_without_the_cpuid_bit_the_guest_never_writes_the_msr(memfd: int, mode: str) -> None:
    # The VMM filters the MSR and asks for every exit reason, but sets no CPUID: the guest
    # (as Linux) does not know the MSR exists, and the VMM sees no new exit.
    vm = launch(make_host(), memfd, mode, reasons=uapi.KVM_MSR_EXIT_REASON_VALID_MASK)
    driver = Driver(vm)
    for i in range(PARAMS.vcpus):
        driver.run_until_lines(i, 3)
        assert driver.wrmsrs(i) == []


@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es"])
def test_the_guest_enables_migration_at_boot_from_vcpu_0(memfd: int, mode: str) -> None:
    vm = launch(make_host(), memfd, mode, cpuid=True, reasons=KVM_MSR_EXIT_REASON_FILTER)
    driver = Driver(vm)
    first = driver.run(0)  # boot: pages set up, then the WRMSR
    assert first.exit_reason == KVM_EXIT_X86_WRMSR
    assert first.msr == uapi.MsrExit(
        KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL, uapi.KVM_MIGRATION_READY
    )
    assert vm.vcpus[0].steps == 0  # the write comes before the first step
    driver.run_until_lines(0, 3)  # completed: the guest runs on
    driver.run_until_lines(1, 3)
    assert driver.wrmsrs(0) == [first.msr]
    assert driver.wrmsrs(1) == []  # only the boot vCPU enables migration
    assert [guest.LINE_PATTERN.fullmatch(line) is not None for line in driver.serial[0]] == [
        True
    ] * 3


def test_a_vmm_that_refuses_the_write_makes_it_gp_which_the_guest_survives(memfd: int) -> None:
    # msr.error != 0: complete_fast_msr_access injects #GP; the guest's wrmsr fixup (as in
    # Linux) ignores it.
    vm = launch(make_host(), memfd, "plain", cpuid=True, reasons=KVM_MSR_EXIT_REASON_FILTER)
    driver = Driver(vm)
    driver.msr_error = 1
    assert driver.run(0).exit_reason == KVM_EXIT_X86_WRMSR
    driver.run_until_lines(0, 3)
    assert len(driver.wrmsrs(0)) == 1


def test_with_the_bit_but_no_exit_asked_for_the_write_is_gp_and_silent(memfd: int) -> None:
    vm = launch(make_host(), memfd, "plain", cpuid=True)
    driver = Driver(vm)
    driver.run_until_lines(0, 3)
    assert driver.wrmsrs(0) == []


def test_unknown_msr_exits_reach_the_vmm_without_a_filter(memfd: int) -> None:
    vm = launch(make_host(), memfd, "plain", cpuid=True)
    vm.enable_cap(PID, uapi.KVM_CAP_X86_USER_SPACE_MSR, 0, [KVM_MSR_EXIT_REASON_UNKNOWN])
    exit_ = Driver(vm).run(0)
    assert exit_.msr == uapi.MsrExit(KVM_MSR_EXIT_REASON_UNKNOWN, MSR_KVM_MIGRATION_CONTROL, 1)


@pytest.mark.parametrize("mode", ["plain", "sev-es"])
def test_a_guest_that_shuts_down_clears_migration_control_first(memfd: int, mode: str) -> None:
    # Linux's kvm_guest_cpu_offline writes 0 on the way down; the witness guest does it
    # after its PANIC line, before it halts.
    vm = launch(make_host(), memfd, mode, cpuid=True, reasons=KVM_MSR_EXIT_REASON_FILTER)
    driver = Driver(vm)
    driver.run_until_lines(0, 1)
    driver.wrong_sum = True  # the next doorbell answer is wrong: PANIC device
    while not driver.serial[0][-1].startswith(b"PANIC"):
        driver.run(0)
    assert driver.serial[0][-1] == b"PANIC device\n"
    clear = driver.run(0)
    assert clear.msr == uapi.MsrExit(KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL, 0)
    assert driver.run(0).exit_reason == KVM_EXIT_SHUTDOWN
    assert driver.run(0).exit_reason == KVM_EXIT_SHUTDOWN
    assert [m.data for m in driver.wrmsrs(0)] == [1, 0]


def test_without_the_bit_a_panicking_guest_halts_as_before(memfd: int) -> None:
    vm = launch(make_host(), memfd, "plain", reasons=uapi.KVM_MSR_EXIT_REASON_VALID_MASK)
    driver = Driver(vm)
    driver.run_until_lines(0, 1)
    driver.wrong_sum = True
    while not driver.serial[0][-1].startswith(b"PANIC"):
        driver.run(0)
    assert driver.run(0).exit_reason == KVM_EXIT_SHUTDOWN


# --- through the daemon -----------------------------------------------------------------------


async def test_a_vmm_serves_the_migration_control_write_through_the_client(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    params = guest.GuestParams(vcpus=1, line_every=3, flip_every=10**6)
    ram = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(ram, guest.required_memory(params))
        os.pwrite(ram, guest.build_launch_image(params), 0)
        assert await kvm.check_extension(uapi.KVM_CAP_X86_USER_SPACE_MSR) == 1
        assert await kvm.check_extension(uapi.KVM_CAP_X86_MSR_FILTER) == 1
        vm = await kvm.create_vm()
        await vm.set_user_memory_region(0, 0, guest.required_memory(params), ram)
        await vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
        with pytest.raises(OSError) as info:
            await vm.set_msr_filter([], flags=KVM_MSR_FILTER_DEFAULT_DENY)
        assert info.value.errno == errno.EINVAL
        await vm.set_msr_filter(MIGRATION_FILTER)
        vcpu = await vm.create_vcpu(0)
        await vcpu.set_regs(guest.initial_regs(0))
        with pytest.raises(OSError) as info:
            await vcpu.set_cpuid2([uapi.CpuidEntry(i) for i in range(257)])
        assert info.value.errno == errno.E2BIG
        await vcpu.set_cpuid2(MIGRATION_CPUID)
        exit_ = await vcpu.run()
        assert exit_.exit_reason == KVM_EXIT_X86_WRMSR
        assert exit_.msr == uapi.MsrExit(KVM_MSR_EXIT_REASON_FILTER, MSR_KVM_MIGRATION_CONTROL, 1)
        vcpu.complete_msr(0)
        total = 0
        while True:  # the guest runs on to its first serial line
            exit_ = await vcpu.run()
            io = exit_.io
            assert exit_.exit_reason != KVM_EXIT_X86_WRMSR
            if io is not None and io.port == uapi.SERIAL_PORT:
                assert guest.LINE_PATTERN.fullmatch(io.data), io.data
                break
            if io is not None and io.port == uapi.DOORBELL_OUT_PORT:
                total += int.from_bytes(io.data, "little")
            elif io is not None:
                vcpu.complete_io(total.to_bytes(4, "little"))
        vcpu.close()
        vm.close()
    finally:
        os.close(ram)
    kvm.close()
