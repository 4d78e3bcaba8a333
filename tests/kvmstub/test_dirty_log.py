"""Dirty logging in kvmstub: KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG and
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, with the kernel's semantics and errnos.

The kernel code followed is virt/kvm/kvm_main.c: kvm_get_dirty_log_protect (GET),
kvm_clear_dirty_log_protect (CLEAR), kvm_prepare_memory_region (the bitmap across flag
changes), kvm_vm_ioctl_enable_cap_generic (the capability). The first part drives the model
directly; the last goes through a real daemon and the client, as a VMM does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmstub import client, daemon, guest, uapi, wire
from kvmstub.memory import GuestMemory, dirty_bitmap_bytes
from kvmstub.model import Host, Vm
from kvmstub.uapi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE

KvmstubDaemon = Any  # tests/conftest.py's class

PID = 1000
OTHER = 2000
LOG = KVM_MEM_LOG_DIRTY_PAGES
MANUAL = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = uapi.KVM_DIRTY_LOG_INITIALLY_SET
PARAMS = guest.GuestParams(vcpus=2, line_every=20, flip_every=10**6)  # no flips
FLIPPING = guest.GuestParams(vcpus=2, line_every=20, flip_every=7)
SLOT_PAGES = 200  # more than the guest uses, and not a multiple of 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, SLOT_PAGES * PAGE_SIZE)
    yield fd
    os.close(fd)


def expect_errno(err: int, call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == err, info.value


def dirty_pages(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}


def journal_pages(params: guest.GuestParams = PARAMS) -> set[int]:
    return {1 + i for i in range(params.vcpus)}


def flip_pages(params: guest.GuestParams = PARAMS) -> set[int]:
    return {1 + params.vcpus + i for i in range(params.vcpus)}


def plain_guest(
    host: Host,
    ram: int,
    *,
    flags: int = LOG,
    manual: int | None = None,
    params: guest.GuestParams = PARAMS,
) -> Vm:
    """A plain VM over `ram` (slot 0 at GPA 0) with the witness guest's image in it, written
    by the VMM through its memfd."""
    vm = host.create_vm(PID)
    if manual is not None:
        vm.enable_cap(PID, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [manual])
    vm.set_user_memory_region(PID, 0, flags, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)
    vm.enable_cap(PID, uapi.KVM_CAP_EXIT_HYPERCALL, 0, [1 << uapi.KVM_HC_MAP_GPA_RANGE])
    os.pwrite(ram, guest.build_launch_image(params), 0)
    for i in range(params.vcpus):
        vm.create_vcpu(PID, i).set_regs(PID, guest.initial_regs(i))
    return vm


_PENDING: dict[int, dict[str, Any]] = {}


def run_steps(vm: Vm, index: int, runs: int) -> list[uapi.RunExit]:
    """`runs` KVM_RUNs of vCPU `index`, serving its exits as a VMM would (hypercalls
    succeed; the doorbell answers what the guest expects, read back from its registers).
    The completion of the last exit waits for the vCPU's next run."""
    vcpu = vm.vcpus[index]
    exits = []
    for _ in range(runs):
        exit_ = vcpu.run(PID, **_PENDING.pop(id(vcpu), {}))
        exits.append(exit_)
        io = exit_.io
        if io is not None and io.direction == uapi.KVM_EXIT_IO_IN:
            regs = vcpu.get_regs(PID)  # rdi = sum so far, rsi = the seq it just sent
            value = (regs.rdi + regs.rsi) & 0xFFFFFFFF
            _PENDING[id(vcpu)] = {"io_data": value.to_bytes(4, "little")}
        elif exit_.exit_reason == uapi.KVM_EXIT_HYPERCALL:
            _PENDING[id(vcpu)] = {"hypercall_ret": 0}
        assert not (io is not None and io.data.startswith(b"PANIC")), io
    return exits


def step(vm: Vm, index: int) -> None:
    """Run vCPU `index` until its guest has taken steps (a run may only serve a device)."""
    vcpu = vm.vcpus[index]
    before = vcpu.steps
    while vcpu.steps == before:
        run_steps(vm, index, 1)


@pytest.fixture(autouse=True)
def _forget_pending() -> Iterator[None]:
    yield
    _PENDING.clear()


def make_host() -> Host:
    return Host(clock=FakeClock())


# --- what is logged ---------------------------------------------------------------------------


def test_guest_writes_show_in_the_dirty_log_and_get_clears_it(ram: int) -> None:
    host = make_host()
    vm = plain_guest(host, ram)
    first = vm.get_dirty_log(PID, 0)
    assert len(first) == dirty_bitmap_bytes(SLOT_PAGES) == 32  # ALIGN(200, 64) / 8
    assert dirty_pages(first) == set()  # the VMM wrote the image: not a guest write
    run_steps(vm, 0, 3)  # boot: vCPU 0's journal and flip page, then steps on its journal
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1, 1 + PARAMS.vcpus}
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set()  # read-and-clear
    run_steps(vm, 1, 3)
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {2, 2 + PARAMS.vcpus}
    step(vm, 0)  # a slice of steps: only the journal is written
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1}


def test_each_conversion_of_the_flip_page_dirties_it(ram: int) -> None:
    # The guest rewrites a page it converted (its old contents are lost at the announce,
    # reference sev-live-migration.md section 2): the page is dirty in the round of the
    # conversion, so a host reading the shared-regions list after the log sees it.
    host = make_host()
    vm = plain_guest(host, ram, params=FLIPPING)
    run_steps(vm, 0, 1)
    vm.get_dirty_log(PID, 0)
    flipped = 0
    for _ in range(200):
        exits = run_steps(vm, 0, 1)
        if exits[0].exit_reason == uapi.KVM_EXIT_HYPERCALL:
            run_steps(vm, 0, 1)  # completes it: the guest rewrites the page at once
            assert 1 + PARAMS.vcpus in dirty_pages(vm.get_dirty_log(PID, 0))
            flipped += 1
            if flipped == 3:
                break
    assert flipped == 3


def test_vmm_and_firmware_writes_are_not_logged(ram: int) -> None:
    # Only the guest's writes through its page tables are logged; LAUNCH_UPDATE_DATA's
    # in-place encryption and DBG_ENCRYPT are the firmware's, a memfd write is the VMM's.
    host = make_host()
    vm = host.create_vm(PID)
    vm.sev_ioctl(PID, uapi.KVM_SEV_INIT, {})
    vm.set_user_memory_region(PID, 0, LOG, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)
    vm.create_vcpu(PID, 0)
    vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_START, {"policy": 0})
    os.pwrite(ram, b"\x01" * PAGE_SIZE, 5 * PAGE_SIZE)
    vm.sev_ioctl(PID, uapi.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": 4 * PAGE_SIZE})
    vm.sev_ioctl(PID, uapi.KVM_SEV_DBG_ENCRYPT, {"dst_uaddr": 6 * PAGE_SIZE, "data": b"x" * 16})
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set()


def test_a_read_only_slot_may_log_and_never_gets_dirty(ram: int) -> None:
    host = make_host()
    vm = host.create_vm(PID)
    vm.set_user_memory_region(PID, 3, LOG | uapi.KVM_MEM_READONLY, 0x100000, 64 * PAGE_SIZE, ram, 0)
    assert vm.get_dirty_log(PID, 3) == bytes(8)


# --- the flag on an existing slot -------------------------------------------------------------


def test_logging_can_be_switched_on_and_off_on_a_live_slot(ram: int) -> None:
    # KVM_MR_FLAGS_ONLY: switching the flag on makes a clean bitmap, off frees it (GET is
    # ENOENT again), on again starts clean: nothing of the old log survives.
    host = make_host()
    vm = plain_guest(host, ram, flags=0)
    run_steps(vm, 0, 2)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(PID, 0))
    vm.set_user_memory_region(PID, 0, LOG, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set()
    step(vm, 0)
    vm.set_user_memory_region(PID, 0, LOG, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)  # no change
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1}
    step(vm, 0)
    vm.set_user_memory_region(PID, 0, 0, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(PID, 0))
    vm.set_user_memory_region(PID, 0, LOG, 0, SLOT_PAGES * PAGE_SIZE, ram, 0)
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set()


def test_moving_a_logging_slot_keeps_its_log(ram: int) -> None:
    host = make_host()
    vm = plain_guest(host, ram)
    run_steps(vm, 0, 1)
    vm.set_user_memory_region(PID, 0, LOG, 0x4000_0000, SLOT_PAGES * PAGE_SIZE, ram, 0)
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1, 1 + PARAMS.vcpus}


def test_a_deleted_slot_has_no_log(ram: int) -> None:
    host = make_host()
    vm = plain_guest(host, ram)
    vm.set_user_memory_region(PID, 0, 0, 0, 0, -1, 0)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(PID, 0))


# --- manual protection ------------------------------------------------------------------------


def test_check_extension_offers_both_manual_protect_options() -> None:
    # kvm_vm_ioctl_check_extension_generic: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ->
    # KVM_DIRTY_LOG_MANUAL_CAPS
    assert make_host().check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3


@pytest.mark.parametrize("options", [INITIALLY_SET, 1 << 2, MANUAL | 1 << 2])
def test_manual_protect_refuses_unknown_options_and_initially_set_alone(options: int) -> None:
    # kvm_vm_ioctl_enable_cap_generic: allowed_options is MANUAL_PROTECT_ENABLE, both caps
    # only when args[0] has MANUAL_PROTECT_ENABLE; anything else -EINVAL.
    vm = make_host().create_vm(PID)
    expect_errno(
        errno.EINVAL,
        lambda: vm.enable_cap(PID, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [options]),
    )
    expect_errno(
        errno.EINVAL,
        lambda: vm.enable_cap(PID, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, [MANUAL]),
    )
    assert vm.manual_dirty_log_protect == 0


def test_with_manual_protect_get_keeps_the_bits_until_clear(ram: int) -> None:
    host = make_host()
    vm = plain_guest(host, ram, manual=MANUAL)
    run_steps(vm, 0, 3)
    run_steps(vm, 1, 3)
    both = {1, 2, 1 + PARAMS.vcpus, 2 + PARAMS.vcpus}
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == both
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == both  # GET does not clear
    mask = bytearray(8)
    mask[0] = 1 << 1 | 1 << (1 + PARAMS.vcpus)  # vCPU 0's pages
    vm.clear_dirty_log(PID, 0, 0, 64, bytes(mask))
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {2, 2 + PARAMS.vcpus}
    step(vm, 0)  # written again after the clear: logged again
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1, 2, 2 + PARAMS.vcpus}
    vm.clear_dirty_log(PID, 0, 0, SLOT_PAGES, b"\xff" * 32)  # the whole slot
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set()


def test_initially_set_starts_every_new_log_full(ram: int) -> None:
    # kvm_prepare_memory_region: with MANUAL_PROTECT_ENABLE | INITIALLY_SET a new bitmap
    # is bitmap_set(0, npages): every page of the slot, and no bit past its end.
    host = make_host()
    vm = plain_guest(host, ram, manual=MANUAL | INITIALLY_SET)
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set(range(SLOT_PAGES))
    vm.clear_dirty_log(PID, 0, 64, 136, b"\xff" * 24)  # 64..199: to the end, unaligned
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == set(range(64))


def test_clear_without_manual_protect_clears_before_the_next_get(ram: int) -> None:
    # kvm_vm_ioctl has no manual-protect check for KVM_CLEAR_DIRTY_LOG.
    host = make_host()
    vm = plain_guest(host, ram)
    run_steps(vm, 0, 3)
    vm.clear_dirty_log(PID, 0, 0, 64, b"\x02" + bytes(7))  # page 1
    assert dirty_pages(vm.get_dirty_log(PID, 0)) == {1 + PARAMS.vcpus}


def test_clear_of_no_pages_changes_nothing(ram: int) -> None:
    host = make_host()
    vm = plain_guest(host, ram, manual=MANUAL | INITIALLY_SET)
    vm.clear_dirty_log(PID, 0, 64, 0, b"")
    assert len(dirty_pages(vm.get_dirty_log(PID, 0))) == SLOT_PAGES


# --- errnos -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "slot",
    [
        uapi.KVM_USER_MEM_SLOTS,  # id >= KVM_USER_MEM_SLOTS
        0xFFFF,
        1 << 16,  # address space 1: the stub has no SMM address space
    ],
)
def test_get_and_clear_refuse_a_bad_slot_id_with_einval(ram: int, slot: int) -> None:
    # kvm_get_dirty_log_protect / kvm_clear_dirty_log_protect:
    #   if (as_id >= KVM_ADDRESS_SPACE_NUM || id >= KVM_USER_MEM_SLOTS) return -EINVAL;
    vm = plain_guest(make_host(), ram)
    expect_errno(errno.EINVAL, lambda: vm.get_dirty_log(PID, slot))
    expect_errno(errno.EINVAL, lambda: vm.clear_dirty_log(PID, slot, 0, 64, bytes(8)))


def test_get_and_clear_say_enoent_for_no_slot_or_a_slot_without_logging(ram: int) -> None:
    # if (!memslot || !memslot->dirty_bitmap) return -ENOENT;
    host = make_host()
    empty = host.create_vm(PID)  # no slot at all
    expect_errno(errno.ENOENT, lambda: empty.get_dirty_log(PID, 0))
    expect_errno(errno.ENOENT, lambda: empty.clear_dirty_log(PID, 0, 0, 64, bytes(8)))
    vm = plain_guest(host, ram, flags=0)
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(PID, 0))
    expect_errno(errno.ENOENT, lambda: vm.clear_dirty_log(PID, 0, 0, 64, bytes(8)))
    expect_errno(errno.ENOENT, lambda: vm.get_dirty_log(PID, 7))


def test_clear_checks_first_page_alignment_before_the_slot(ram: int) -> None:
    # kvm_clear_dirty_log_protect: `if (log->first_page & 63) return -EINVAL;` comes before
    # the memslot lookup, so a misaligned clear of a missing slot is EINVAL, not ENOENT.
    vm = plain_guest(make_host(), ram)
    expect_errno(errno.EINVAL, lambda: vm.clear_dirty_log(PID, 9, 1, 64, bytes(8)))
    expect_errno(errno.EINVAL, lambda: vm.clear_dirty_log(PID, 0, 32, 64, bytes(8)))


@pytest.mark.parametrize(
    ("first_page", "num_pages"),
    [
        (256, 0),  # first_page > npages
        (0, SLOT_PAGES + 1),  # num_pages > npages - first_page
        (128, 73),  # past the end by one
        (0, 65),  # short of the end and not a multiple of 64
        (64, 100),
    ],
)
def test_clear_refuses_a_range_outside_the_slot_or_misaligned_short_of_its_end(
    ram: int, first_page: int, num_pages: int
) -> None:
    # if (log->first_page > memslot->npages ||
    #     log->num_pages > memslot->npages - log->first_page ||
    #     (log->num_pages < memslot->npages - log->first_page && (log->num_pages & 63)))
    #         return -EINVAL;
    vm = plain_guest(make_host(), ram)
    expect_errno(
        errno.EINVAL, lambda: vm.clear_dirty_log(PID, 0, first_page, num_pages, b"\xff" * 64)
    )


def test_clear_with_a_short_bitmap_is_efault_and_clears_nothing(ram: int) -> None:
    # n = ALIGN(log->num_pages, BITS_PER_LONG) / 8; copy_from_user(..., n) -> -EFAULT
    vm = plain_guest(make_host(), ram, manual=MANUAL | INITIALLY_SET)
    expect_errno(errno.EFAULT, lambda: vm.clear_dirty_log(PID, 0, 0, 128, b"\xff" * 15))
    assert len(dirty_pages(vm.get_dirty_log(PID, 0))) == SLOT_PAGES


def test_dirty_log_ioctls_of_another_process_are_eio(ram: int) -> None:
    # kvm_vm_ioctl: kvm->mm != current->mm -> -EIO, before anything else.
    vm = plain_guest(make_host(), ram)
    expect_errno(errno.EIO, lambda: vm.get_dirty_log(OTHER, 0))
    expect_errno(errno.EIO, lambda: vm.clear_dirty_log(OTHER, 0, 1, 64, b""))


# --- through the daemon -----------------------------------------------------------------------


async def _boot(kvm: client.Kvm, memfd: int) -> tuple[client.Vm, client.Vcpu]:
    params = guest.GuestParams(vcpus=1, line_every=10**6, flip_every=10**6)
    os.ftruncate(memfd, SLOT_PAGES * PAGE_SIZE)
    os.pwrite(memfd, guest.build_launch_image(params), 0)
    vm = await kvm.create_vm()
    vcpu = await vm.create_vcpu(0)
    await vcpu.set_regs(guest.initial_regs(0))
    return vm, vcpu


async def test_a_vmm_reads_and_clears_the_log_through_the_client(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        vm, vcpu = await _boot(kvm, memfd)
        assert await kvm.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
        await vm.set_user_memory_region(0, 0, SLOT_PAGES * PAGE_SIZE, memfd)
        with pytest.raises(OSError) as info:
            await vm.get_dirty_log(0)
        assert info.value.errno == errno.ENOENT
        await vm.set_user_memory_region(0, 0, SLOT_PAGES * PAGE_SIZE, memfd, flags=LOG)
        await vcpu.run()  # boot and a slice of steps
        bitmap = await vm.get_dirty_log(0)
        assert len(bitmap) == 32 and dirty_pages(bitmap) == {1, 2}
        os.pwrite(memfd, b"vmm" * 100, 10 * PAGE_SIZE)  # the VMM's own write
        assert dirty_pages(await vm.get_dirty_log(0)) == set()

        await vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL)
        await vcpu.run()
        assert dirty_pages(await vm.get_dirty_log(0)) == {1}
        assert dirty_pages(await vm.get_dirty_log(0)) == {1}
        await vm.clear_dirty_log(0, 0, 64, b"\x02" + bytes(7))
        assert dirty_pages(await vm.get_dirty_log(0)) == set()
        with pytest.raises(OSError) as info:
            await vm.clear_dirty_log(0, 1, 64, bytes(8))
        assert info.value.errno == errno.EINVAL
        vcpu.close()
        vm.close()
    finally:
        os.close(memfd)
    kvm.close()


async def test_a_large_log_crosses_whole_and_padded(kvmstub_daemon: KvmstubDaemon) -> None:
    # 4 GiB of sparse guest memory: a 128 KiB bitmap, bigger than a datagram; only its
    # dirty runs travel and the client writes the zeros around them. With INITIALLY_SET
    # the whole bitmap is ones and travels spilled in a memfd.
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    memfd = os.memfd_create("big", os.MFD_CLOEXEC)
    size = 4 << 30
    try:
        vm, vcpu = await _boot(kvm, memfd)
        os.ftruncate(memfd, size)
        await vm.set_user_memory_region(0, 0, size, memfd, flags=LOG)
        await vcpu.run()
        bitmap = await vm.get_dirty_log(0)
        assert len(bitmap) == size // PAGE_SIZE // 8 and dirty_pages(bitmap[:8]) == {1, 2}
        assert not any(bitmap[8:])
        await vm.set_user_memory_region(0, 0, 0, -1)
        await vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL | INITIALLY_SET)
        await vm.set_user_memory_region(0, 0, size, memfd, flags=LOG)
        assert await vm.get_dirty_log(0) == b"\xff" * (size // PAGE_SIZE // 8)
        vcpu.close()
        vm.close()
    finally:
        os.close(memfd)
    kvm.close()


def test_a_log_too_big_for_a_reply_is_refused_before_it_is_read() -> None:
    # kvmstub's own limit: one reply carries at most wire.MAX_SPILLED bytes of bitmap, so a
    # logging slot over 2 TiB gets ENOMEM from the daemon, before GET clears anything.
    fd = os.memfd_create("huge", os.MFD_CLOEXEC)
    try:
        size = (wire.MAX_SPILLED * 8 + 64 * 8) * PAGE_SIZE  # 2 TiB and a bit
        os.ftruncate(fd, size)
        vm = make_host().create_vm(PID)
        vm.set_user_memory_region(PID, 0, 0, 0, size, fd, 0)
        daemon._check_log_fits(vm, 0)  # not logging: nothing to say
        vm.set_user_memory_region(PID, 0, LOG, 0, size, fd, 0)
        expect_errno(errno.ENOMEM, lambda: daemon._check_log_fits(vm, 0))
        vm.set_user_memory_region(PID, 0, 0, 0, 0, -1, 0)
    finally:
        os.close(fd)


# --- a large sparse slot: the log costs what is dirty ------------------------------------------

BIG = 64 << 30  # a 64 GiB slot: a 2 MiB bitmap


@pytest.fixture
def big_memory() -> Iterator[tuple[GuestMemory, int]]:
    fd = os.memfd_create("big", os.MFD_CLOEXEC)
    os.ftruncate(fd, BIG)
    memory = GuestMemory()
    yield memory, fd
    memory.close()
    os.close(fd)


def test_a_sparse_log_is_read_as_its_dirty_runs_and_cleared(
    big_memory: tuple[GuestMemory, int],
) -> None:
    # The guest writes the first, a middle and the last page of a 64 GiB slot: the log
    # is the whole 2 MiB bitmap with exactly those bits, carried as three 8-byte runs.
    memory, fd = big_memory
    memory.set_region(0, LOG, 0, BIG, fd, 0)
    npages = BIG // PAGE_SIZE
    written = {0, npages // 2 + 5, npages - 1}
    for page in written:
        memory.write_guest_page(page * PAGE_SIZE, bytes(PAGE_SIZE), None)
    log = memory.get_dirty_log(0, manual_protect=False)
    assert log.size == dirty_bitmap_bytes(npages) == 2 << 20
    assert log.problem() is None
    assert [len(data) for _, data in log.runs] == [8, 8, 8]
    assert dirty_pages(log.to_bytes()) == written
    again = memory.get_dirty_log(0, manual_protect=False)  # read-and-clear
    assert again.runs == () and again.to_bytes() == bytes(2 << 20)


def test_runs_close_together_travel_as_one(big_memory: tuple[GuestMemory, int]) -> None:
    memory, fd = big_memory
    memory.set_region(0, LOG, 0, BIG, fd, 0)
    for page in (64, 3 * 64, 100 * 64):  # words 1 and 3 are 8 bytes apart, word 100 far
        memory.write_guest_page(page * PAGE_SIZE, bytes(PAGE_SIZE), None)
    log = memory.get_dirty_log(0, manual_protect=False)
    assert [(offset, len(data)) for offset, data in log.runs] == [(8, 24), (800, 8)]
    assert dirty_pages(log.to_bytes()) == {64, 3 * 64, 100 * 64}


def test_with_manual_protect_a_cleared_word_leaves_the_runs(
    big_memory: tuple[GuestMemory, int],
) -> None:
    memory, fd = big_memory
    memory.set_region(0, LOG, 0, BIG, fd, 0)
    for page in (1, 4096, 8192):
        memory.write_guest_page(page * PAGE_SIZE, bytes(PAGE_SIZE), None)
    assert dirty_pages(memory.get_dirty_log(0, manual_protect=True).to_bytes()) == {1, 4096, 8192}
    memory.clear_dirty_log(0, 4096, 64, b"\x01" + bytes(7))
    log = memory.get_dirty_log(0, manual_protect=True)
    assert dirty_pages(log.to_bytes()) == {1, 8192}
    assert len(log.runs) == 2


def test_an_initially_set_log_is_found_by_scanning_then_followed(ram: int) -> None:
    # INITIALLY_SET fills the bitmap without the guest: the first read scans it; once
    # cleared, the guest's next writes are all the log holds.
    memory = GuestMemory()
    try:
        memory.set_region(0, LOG, 0, SLOT_PAGES * PAGE_SIZE, ram, 0, dirty_initially_set=True)
        assert dirty_pages(memory.get_dirty_log(0, manual_protect=True).to_bytes()) == set(
            range(SLOT_PAGES)
        )
        memory.clear_dirty_log(0, 0, SLOT_PAGES, b"\xff" * 32)
        assert memory.get_dirty_log(0, manual_protect=True).runs == ()
        memory.write_guest_page(7 * PAGE_SIZE, bytes(PAGE_SIZE), None)
        assert dirty_pages(memory.get_dirty_log(0, manual_protect=True).to_bytes()) == {7}
    finally:
        memory.close()


async def test_the_log_is_written_whole_into_the_callers_buffer(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    # KVM_GET_DIRTY_LOG writes every byte of dirty_bitmap: what the buffer held before is
    # gone. A buffer too short gets what fits and EFAULT, and the log was read and
    # cleared all the same (kvm_get_dirty_log_protect clears before copy_to_user).
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        vm, vcpu = await _boot(kvm, memfd)
        await vm.set_user_memory_region(0, 0, SLOT_PAGES * PAGE_SIZE, memfd, flags=LOG)
        await vcpu.run()
        bitmap = bytearray(b"\xa5" * 32)
        assert await vm.get_dirty_log(0, bitmap) is None
        assert dirty_pages(bitmap) == {1, 2}
        await vcpu.run()
        short = bytearray(b"\xa5" * 31)
        with pytest.raises(OSError) as info:
            await vm.get_dirty_log(0, short)
        assert info.value.errno == errno.EFAULT
        assert dirty_pages(short) == {1}  # what fitted was written
        assert dirty_pages(await vm.get_dirty_log(0)) == set()  # and the log was cleared
        view = memoryview(bytearray(b"\xff" * 40))[4:36]  # a view into a larger buffer
        await vm.get_dirty_log(0, view)
        assert bytes(view) == bytes(32)
        vcpu.close()
        vm.close()
    finally:
        os.close(memfd)
    kvm.close()


def test_a_reply_whose_runs_do_not_fit_the_bitmap_is_refused() -> None:
    assert uapi.DirtyLog(16, ((0, bytes(8)), (8, bytes(8)))).problem() is None
    assert "past" in str(uapi.DirtyLog(16, ((12, bytes(8)),)).problem())
    assert "overlaps" in str(uapi.DirtyLog(32, ((8, bytes(8)), (12, bytes(8)))).problem())
