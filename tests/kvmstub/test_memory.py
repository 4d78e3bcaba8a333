"""kvmstub.memory: the slot rules of KVM_SET_USER_MEMORY_REGION, guest-physical access over
memfds, and private pages stored as AES-256-XTS ciphertext."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kvmstub import memory
from kvmstub.memory import GuestMemory, xts_decrypt, xts_encrypt
from kvmstub.uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    PAGE_SIZE,
)

MiB = 1 << 20
TiB = 1 << 40

VEK = bytes(range(64))

MakeMemfd = Callable[..., int]


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


@pytest.fixture(params=["sealed", "unsealed"])
def memfd(request: pytest.FixtureRequest, fds: list[int]) -> MakeMemfd:
    """A memfd factory. Every access path is tested: a memfd sealed against shrinking is
    mapped, an unsealed one is reached with pread/pwrite."""

    def make(size: int = MiB) -> int:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        fds.append(fd)
        os.ftruncate(fd, size)
        if request.param == "sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return fd

    return make


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    yield memory
    memory.close()


def errno_of(fn: Callable[[], object]) -> int | None:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- access by guest physical address ------------------------------------------------------


def test_writes_by_gpa_land_in_the_memfd_at_slot_offset(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd(4 * PAGE_SIZE)
    mem.set_region(0, 0, 0x10000, 2 * PAGE_SIZE, fd, PAGE_SIZE)
    mem.write(0x10000 + 100, b"hello")
    assert os.pread(fd, 5, PAGE_SIZE + 100) == b"hello"
    os.pwrite(fd, b"from the vmm", PAGE_SIZE + 0x1000)
    assert mem.read(0x11000, 12) == b"from the vmm"


def test_read_and_write_span_adjacent_slots(mem: GuestMemory, memfd: MakeMemfd) -> None:
    a, b = memfd(PAGE_SIZE), memfd(PAGE_SIZE)
    mem.set_region(0, 0, 0, PAGE_SIZE, a, 0)
    mem.set_region(1, 0, PAGE_SIZE, PAGE_SIZE, b, 0)
    mem.write(PAGE_SIZE - 3, b"abcdef")
    assert os.pread(a, 3, PAGE_SIZE - 3) == b"abc"
    assert os.pread(b, 3, 0) == b"def"
    assert mem.read(PAGE_SIZE - 3, 6) == b"abcdef"


def test_unbacked_gpa_is_efault_and_nothing_is_written(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd(PAGE_SIZE)
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    assert errno_of(lambda: mem.read(PAGE_SIZE, 1)) == errno.EFAULT
    assert errno_of(lambda: mem.read_page(2 * PAGE_SIZE, None)) == errno.EFAULT
    assert errno_of(lambda: mem.write_page(2 * PAGE_SIZE, bytes(PAGE_SIZE), VEK)) == errno.EFAULT
    # a write that runs off the end of the slot writes nothing at all
    assert errno_of(lambda: mem.write(PAGE_SIZE - 2, b"xyzw")) == errno.EFAULT
    assert os.pread(fd, 2, PAGE_SIZE - 2) == b"\0\0"


def test_page_access_requires_page_alignment_and_a_whole_page(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    mem.set_region(0, 0, 0, 2 * PAGE_SIZE, memfd(2 * PAGE_SIZE), 0)
    assert errno_of(lambda: mem.read_page(8, None)) == errno.EINVAL
    assert errno_of(lambda: mem.write_page(0, b"short", None)) == errno.EINVAL


def test_readonly_slot_refuses_writes_with_efault(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd(PAGE_SIZE)
    os.pwrite(fd, b"rom", 0)
    mem.set_region(0, KVM_MEM_READONLY, 0, PAGE_SIZE, fd, 0)
    assert mem.read(0, 3) == b"rom"
    assert errno_of(lambda: mem.write(0, b"x")) == errno.EFAULT
    assert errno_of(lambda: mem.write_page(0, bytes(PAGE_SIZE), None)) == errno.EFAULT
    assert os.pread(fd, 3, 0) == b"rom"


def test_truncated_unsealed_memfd_reads_efault_instead_of_killing_the_daemon(
    mem: GuestMemory, fds: list[int]
) -> None:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    fds.append(fd)
    os.ftruncate(fd, 4 * PAGE_SIZE)
    mem.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, 0)
    os.ftruncate(fd, PAGE_SIZE)  # the VMM shrinks the memfd under the slot
    assert mem.read_page(0, None) == bytes(PAGE_SIZE)
    assert errno_of(lambda: mem.read_page(2 * PAGE_SIZE, None)) == errno.EFAULT


def test_shrink_sealed_memfd_cannot_be_truncated_under_its_mapping(
    mem: GuestMemory, fds: list[int]
) -> None:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fds.append(fd)
    os.ftruncate(fd, 4 * PAGE_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    mem.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, PAGE_SIZE)
    mem.write_page(3 * PAGE_SIZE, b"\1" * PAGE_SIZE, None)
    assert os.pread(fd, 1, 3 * PAGE_SIZE) == b"\1"


def test_sparse_1tib_memfd_allocates_only_the_pages_touched(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd(TiB)
    mem.set_region(0, 0, 0, TiB, fd, 0)
    for gpa in (0, 512 * MiB, TiB - PAGE_SIZE):
        mem.write_page(gpa, os.urandom(PAGE_SIZE), VEK)
        assert len(mem.read_page(gpa, VEK)) == PAGE_SIZE
    # st_blocks counts 512-byte blocks: three 4 KiB pages are 24
    assert os.fstat(fd).st_blocks <= 3 * PAGE_SIZE // 512


# --- KVM_SET_USER_MEMORY_REGION rules --------------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "size", "offset"),
    [
        (0, PAGE_SIZE + 1, 0),
        (0x800, PAGE_SIZE, 0),
        (0, PAGE_SIZE, 0x10),
        (-PAGE_SIZE, PAGE_SIZE, 0),
    ],
    ids=["size", "gpa", "offset", "negative-gpa"],
)
def test_misaligned_region_is_einval(
    mem: GuestMemory, memfd: MakeMemfd, gpa: int, size: int, offset: int
) -> None:
    fd = memfd()
    assert errno_of(lambda: mem.set_region(0, 0, gpa, size, fd, offset)) == errno.EINVAL
    assert mem.slots() == []


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, -1])
def test_unknown_flags_are_einval(mem: GuestMemory, memfd: MakeMemfd, flags: int) -> None:
    fd = memfd()
    assert errno_of(lambda: mem.set_region(0, flags, 0, PAGE_SIZE, fd, 0)) == errno.EINVAL


@pytest.mark.parametrize("slot", [KVM_USER_MEM_SLOTS, 0xFFFF, 1 << 16, -1])
def test_slot_id_outside_user_slots_or_address_space_is_einval(
    mem: GuestMemory, memfd: MakeMemfd, slot: int
) -> None:
    fd = memfd()
    assert errno_of(lambda: mem.set_region(slot, 0, 0, PAGE_SIZE, fd, 0)) == errno.EINVAL


def test_highest_user_slot_id_is_accepted(mem: GuestMemory, memfd: MakeMemfd) -> None:
    mem.set_region(KVM_USER_MEM_SLOTS - 1, 0, 0, PAGE_SIZE, memfd(), 0)
    assert [s.slot for s in mem.slots()] == [KVM_USER_MEM_SLOTS - 1]


def test_region_wrapping_past_top_of_address_space_is_einval(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd(2 * PAGE_SIZE)
    top = (1 << 64) - PAGE_SIZE
    assert errno_of(lambda: mem.set_region(0, 0, top, 2 * PAGE_SIZE, fd, 0)) == errno.EINVAL


def test_memfd_shorter_than_offset_plus_size_is_einval(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd(4 * PAGE_SIZE)
    assert errno_of(lambda: mem.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, PAGE_SIZE)) == errno.EINVAL
    mem.set_region(0, 0, 0, 3 * PAGE_SIZE, fd, PAGE_SIZE)


def test_bad_fd_is_ebadf(mem: GuestMemory, fds: list[int]) -> None:
    r, w = os.pipe()
    fds.extend((r, w))
    os.close(w)
    fds.remove(w)
    assert errno_of(lambda: mem.set_region(0, 0, 0, PAGE_SIZE, w, 0)) == errno.EBADF


def test_overlapping_another_slot_is_eexist(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd(8 * PAGE_SIZE)
    mem.set_region(0, 0, 2 * PAGE_SIZE, 2 * PAGE_SIZE, fd, 0)
    overlap = lambda: mem.set_region(1, 0, 3 * PAGE_SIZE, 2 * PAGE_SIZE, fd, 0)  # noqa: E731
    assert errno_of(overlap) == errno.EEXIST
    mem.set_region(1, 0, 4 * PAGE_SIZE, 2 * PAGE_SIZE, fd, 0)  # adjacent is fine
    mem.set_region(2, 0, 0, 2 * PAGE_SIZE, fd, 0)
    assert [s.slot for s in mem.slots()] == [0, 1, 2]


def test_size_zero_deletes_the_slot_and_closes_its_dup(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd()
    before = open_fds()
    mem.set_region(5, 0, 0, PAGE_SIZE, fd, 0)
    assert open_fds() == before + 1
    mem.set_region(5, 0, 0, 0, -1, 0)
    assert open_fds() == before
    assert mem.slots() == []
    assert errno_of(lambda: mem.read(0, 1)) == errno.EFAULT


def test_deleting_a_slot_that_does_not_exist_is_einval(mem: GuestMemory) -> None:
    assert errno_of(lambda: mem.set_region(3, 0, 0, 0, -1, 0)) == errno.EINVAL


def test_resizing_an_existing_slot_is_einval(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd()
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    assert errno_of(lambda: mem.set_region(0, 0, 0, 2 * PAGE_SIZE, fd, 0)) == errno.EINVAL
    assert mem.slots()[0].memory_size == PAGE_SIZE


def test_changing_an_existing_slots_backing_is_einval(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd, other = memfd(), memfd()
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    assert errno_of(lambda: mem.set_region(0, 0, 0, PAGE_SIZE, other, 0)) == errno.EINVAL
    assert errno_of(lambda: mem.set_region(0, 0, 0, PAGE_SIZE, fd, PAGE_SIZE)) == errno.EINVAL


def test_toggling_readonly_on_an_existing_slot_is_einval(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd()
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    assert (
        errno_of(lambda: mem.set_region(0, KVM_MEM_READONLY, 0, PAGE_SIZE, fd, 0)) == errno.EINVAL
    )


def test_existing_slot_may_change_dirty_logging_and_move(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd(4 * PAGE_SIZE)
    os.pwrite(fd, b"moved", 0)
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    mem.set_region(1, 0, 4 * PAGE_SIZE, PAGE_SIZE, fd, PAGE_SIZE)
    dup_count = open_fds()
    mem.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, PAGE_SIZE, fd, 0)  # flags only
    assert mem.slots()[0].flags == KVM_MEM_LOG_DIRTY_PAGES
    onto_slot1 = lambda: mem.set_region(0, 0, 4 * PAGE_SIZE, PAGE_SIZE, fd, 0)  # noqa: E731
    assert errno_of(onto_slot1) == errno.EEXIST
    mem.set_region(0, 0, 8 * PAGE_SIZE, PAGE_SIZE, fd, 0)  # move: same backing, new gpa
    assert open_fds() == dup_count
    assert mem.read(8 * PAGE_SIZE, 5) == b"moved"
    assert errno_of(lambda: mem.read(0, 1)) == errno.EFAULT


def test_caller_keeps_its_fd_and_slot_reports_the_memfd_inode(
    mem: GuestMemory, memfd: MakeMemfd, fds: list[int]
) -> None:
    fd = memfd()
    inode = os.fstat(fd).st_ino
    mem.set_region(7, KVM_MEM_LOG_DIRTY_PAGES, 0x100000, 2 * PAGE_SIZE, fd, PAGE_SIZE)
    os.pwrite(fd, b"still here", PAGE_SIZE)
    fds.remove(fd)
    os.close(fd)  # the VMM closes its copy; the slot's dup keeps the memfd alive
    assert mem.read(0x100000, 10) == b"still here"
    (slot,) = mem.slots()
    assert (slot.slot, slot.guest_phys_addr, slot.memory_size, slot.offset, slot.flags) == (
        7,
        0x100000,
        2 * PAGE_SIZE,
        PAGE_SIZE,
        KVM_MEM_LOG_DIRTY_PAGES,
    )
    assert slot.inode == inode


def test_close_unmaps_and_closes_every_dup(memfd: MakeMemfd) -> None:
    a, b = memfd(), memfd()
    before = open_fds()
    mem = GuestMemory()
    mem.set_region(0, 0, 0, PAGE_SIZE, a, 0)
    mem.set_region(1, 0, PAGE_SIZE, PAGE_SIZE, b, 0)
    mem.write_page(0, bytes(PAGE_SIZE), VEK)
    assert open_fds() == before + 2
    mem.close()
    assert open_fds() == before
    assert mem.slots() == []
    assert errno_of(lambda: mem.read(0, 1)) == errno.EFAULT


# --- private pages: AES-256-XTS with the GPA as tweak -------------------------------------


def reference_xts(vek: bytes, gpa: int, data: bytes, *, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(vek), modes.XTS(gpa.to_bytes(16, "little")))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def test_private_page_is_stored_as_xts_ciphertext_with_gpa_tweak(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd(4 * PAGE_SIZE)
    mem.set_region(0, 0, 0x200000, 4 * PAGE_SIZE, fd, 0)
    plain = b"secret guest data".ljust(PAGE_SIZE, b".")
    gpa = 0x200000 + 2 * PAGE_SIZE
    mem.write_page(gpa, plain, VEK)
    stored = os.pread(fd, PAGE_SIZE, 2 * PAGE_SIZE)
    assert stored == reference_xts(VEK, gpa, plain, encrypt=True)
    assert b"secret" not in stored
    assert mem.read_page(gpa, VEK) == plain
    assert mem.read_page(gpa, None) == stored  # the VMM's view: ciphertext


def test_shared_page_is_stored_in_plaintext(mem: GuestMemory, memfd: MakeMemfd) -> None:
    fd = memfd()
    mem.set_region(0, 0, 0, PAGE_SIZE, fd, 0)
    plain = b"shared with the host".ljust(PAGE_SIZE, b"\0")
    mem.write_page(0, plain, None)
    assert os.pread(fd, PAGE_SIZE, 0) == plain


def test_same_plaintext_at_two_gpas_gives_two_ciphertexts(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    fd = memfd(2 * PAGE_SIZE)
    mem.set_region(0, 0, 0, 2 * PAGE_SIZE, fd, 0)
    page = bytes(PAGE_SIZE)
    mem.write_page(0, page, VEK)
    mem.write_page(PAGE_SIZE, page, VEK)
    assert mem.read(0, PAGE_SIZE) != mem.read(PAGE_SIZE, PAGE_SIZE)


def test_pages_under_keyed_veks_agree_with_fresh_ciphers(
    mem: GuestMemory, memfd: MakeMemfd
) -> None:
    """Two VEKs in turn over the same pages, each page written and read again and again:
    what the host's keyed VEKs (native) store and read is what a fresh `cryptography`
    cipher per page gives."""
    fd = memfd(8 * PAGE_SIZE)
    mem.set_region(0, 0, 0, 8 * PAGE_SIZE, fd, 0)
    other_vek = bytes(reversed(VEK))
    for round_ in range(3):
        for i in range(8):
            vek = VEK if (i + round_) % 2 else other_vek
            page = os.urandom(PAGE_SIZE)
            gpa = i * PAGE_SIZE
            mem.write_page(gpa, page, vek)
            assert os.pread(fd, PAGE_SIZE, gpa) == reference_xts(vek, gpa, page, encrypt=True)
            assert mem.read_page(gpa, vek) == page
            assert mem.read_page(gpa, vek) == page


def test_a_vek_is_keyed_once_for_every_page_and_every_vm_of_the_host(
    memfd: MakeMemfd,
) -> None:
    """After a move the new VM runs the guest under the same VEK at the same GPAs: its
    accesses find the VEK the old VM keyed (no key schedule in the handoff's pause), one
    key for all its pages, and they still read and write what a fresh cipher would."""
    fd = memfd(4 * PAGE_SIZE)
    vek = os.urandom(64)  # a key no other test has keyed
    old, new = GuestMemory(), GuestMemory()
    try:
        old.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, 0)
        before = memory.keyed_veks()
        pages = [os.urandom(PAGE_SIZE) for _ in range(4)]
        for i, page in enumerate(pages):
            old.write_page(i * PAGE_SIZE, page, vek)
            assert old.read_page(i * PAGE_SIZE, vek) == page
        keyed = memory.keyed_veks()
        assert keyed in (before + 1, 1)  # one more, or the cache was full and dropped
        old.close()  # the source VM goes; its key stays for the destination
        new.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, 0)
        for i, page in enumerate(pages):
            gpa = i * PAGE_SIZE
            assert new.read_page(gpa, vek) == page
            new.write_page(gpa, page[::-1], vek)
            assert os.pread(fd, PAGE_SIZE, gpa) == reference_xts(vek, gpa, page[::-1], encrypt=True)
        assert memory.keyed_veks() == keyed
    finally:
        old.close()
        new.close()


def test_the_keyed_veks_are_bounded_and_refuse_a_bad_vek() -> None:
    """The cache keys at most LIMIT VEKs (then starts again), takes a VEK as bytes or
    bytearray alike, and refuses a VEK of the wrong size or with equal halves, as
    `cryptography` refuses them."""
    keys = memory._XtsKeys()
    page = os.urandom(PAGE_SIZE)
    veks = [os.urandom(64) for _ in range(keys.LIMIT + 1)]
    for n, vek in enumerate(veks):
        sealed = keys.encrypt(vek, n * PAGE_SIZE, page)
        assert sealed == reference_xts(vek, n * PAGE_SIZE, page, encrypt=True)
        assert keys.decrypt(bytearray(vek), n * PAGE_SIZE, sealed) == page
        assert len(keys) <= keys.LIMIT
    assert len(keys) == 1  # the first LIMIT dropped when the last came
    with pytest.raises(ValueError, match="duplicated keys"):
        keys.encrypt(bytes(32) * 2, 0, page)
    with pytest.raises(ValueError, match="duplicated keys"):
        xts_encrypt(bytes(32) * 2, 0, page)  # the reference says the same
    with pytest.raises(ValueError, match="64 bytes"):
        keys.decrypt(VEK[:32], 0, page)
    keys.clear()
    assert len(keys) == 0


def test_backed_up_to_is_where_the_first_hole_begins(mem: GuestMemory, memfd: MakeMemfd) -> None:
    mem.set_region(1, 0, 4 * PAGE_SIZE, 4 * PAGE_SIZE, memfd(4 * PAGE_SIZE), 0)
    mem.set_region(0, 0, 0, 4 * PAGE_SIZE, memfd(4 * PAGE_SIZE), 0)  # adjacent, below
    mem.set_region(2, 0, 16 * PAGE_SIZE, 4 * PAGE_SIZE, memfd(4 * PAGE_SIZE), 0)
    assert mem.backed_up_to(0, PAGE_SIZE) >= PAGE_SIZE
    assert mem.backed_up_to(3 * PAGE_SIZE, 5 * PAGE_SIZE) == 8 * PAGE_SIZE  # across two slots
    assert mem.backed_up_to(7 * PAGE_SIZE, 9 * PAGE_SIZE) == 8 * PAGE_SIZE  # the hole
    assert mem.backed_up_to(9 * PAGE_SIZE, 10 * PAGE_SIZE) == 9 * PAGE_SIZE  # in the hole
    mem.read_page(17 * PAGE_SIZE, None)  # the last slot used, asked first
    assert mem.backed_up_to(17 * PAGE_SIZE, 18 * PAGE_SIZE) >= 18 * PAGE_SIZE
    assert mem.backed_up_to(19 * PAGE_SIZE, 21 * PAGE_SIZE) == 20 * PAGE_SIZE
    assert GuestMemory().backed_up_to(0, PAGE_SIZE) == 0


def test_xts_helpers_roundtrip_and_match_reference() -> None:
    page = os.urandom(PAGE_SIZE)
    sealed = xts_encrypt(VEK, 0x5000, page)
    assert sealed == reference_xts(VEK, 0x5000, page, encrypt=True)
    assert xts_decrypt(VEK, 0x5000, sealed) == page
    assert xts_decrypt(VEK, 0x6000, sealed) != page


def test_vek_must_be_64_bytes() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        xts_encrypt(VEK[:32], 0, bytes(PAGE_SIZE))
