"""Guest memory of one VM: the KVM memory slots, backed by memfds the VMM hands over.

This is the kernel's side of KVM_SET_USER_MEMORY_REGION. The daemon cannot see a VMM's
address space, so a slot names its backing as (fd, offset) instead of `userspace_addr`; the
checks and their order are those of `kvm_set_memory_region` (virt/kvm/kvm_main.c), with the
fd standing in for the host virtual address. An fd that the VMM could not have mapped fails
with the errno the VMM's mmap would have got (`_check_mappable`).

Private pages are stored encrypted with the guest's VEK (AES-256-XTS, tweak = the page's guest
physical address), shared pages in plaintext, so a VMM reading its own memfd sees what it would
see on SEV hardware: ciphertext for private pages.

Only pages that are read or written are ever touched: a slot over a 1 TiB sparse memfd costs
nothing until the guest uses it.

Dirty logging. A slot with KVM_MEM_LOG_DIRTY_PAGES has a dirty bitmap, one bit per page in
the kernel's layout (bit i of byte i/8, rounded up to whole 64-bit words), which only the
guest's own writes set: `write_guest_page` is the MMU's path, taken by the vCPUs. Writes the
firmware makes into guest memory (LAUNCH_UPDATE_DATA, DBG_ENCRYPT) and the VMM's writes to
its memfd are not guest writes, as in the kernel, which logs only what the guest writes
through its page tables (and what KVM writes on the guest's behalf, of which the stub has
none). KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG follow kvm_get_dirty_log_protect and
kvm_clear_dirty_log_protect (virt/kvm/kvm_main.c). Beside the bitmap a slot keeps the set of
its 64-bit words a guest write touched, so a read costs what was dirtied, not the slot's
size: the log goes out as its runs that may be non-zero (`uapi.DirtyLog`), and only those
words are cleared.

Access path. A memfd that the VMM can still shrink must never be accessed through a mapping:
touching a mapped page beyond the new end of file raises SIGBUS, which would kill the daemon
(the whole "host kernel") at the whim of one VMM. So a slot is mapped MAP_SHARED only when its
memfd carries F_SEAL_SHRINK (seals cannot be removed); otherwise its pages are reached with
pread/pwrite, which report a truncated backing as a short read: EFAULT, as KVM_RUN reports a
guest access to a truncated memfd. Both paths see the same page cache. A sealed memfd is
reached with pread/pwrite too when mapping it fails for want of address space (ENOMEM): this
one process maps the slots of every VM, which the kernel never does.

Not thread safe: one thread at a time per GuestMemory (the keyed AES-XTS contexts hold state).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kvmstub.sev_crypto import _sevcrypto  # (built or refused there)
from kvmstub.uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    PAGE_SIZE,
    U64_MASK,
    DirtyLog,
)

VEK_SIZE = 64
"""Bytes in a VEK: two AES-256 keys, as AES-256-XTS takes them."""

KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
"""x86's limit on the pages of one slot (arch/x86/include/asm/kvm_host.h)."""

KVM_ADDRESS_SPACE_NUM = 1
"""Address spaces modelled: only the normal one (no SMM), so `slot >> 16` must be 0."""

_VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
_PAGE_MASK = PAGE_SIZE - 1
_BITS_PER_LONG = 64


def dirty_bitmap_bytes(npages: int) -> int:
    """kvm_dirty_bitmap_bytes: the bytes of a slot's dirty bitmap, whole 64-bit words."""
    return (npages + _BITS_PER_LONG - 1) // _BITS_PER_LONG * 8


def _fault(what: str) -> OSError:
    return OSError(errno.EFAULT, what)


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


@dataclass(frozen=True, slots=True)
class MemorySlot:
    """One KVM_SET_USER_MEMORY_REGION slot, as `slots()` reports it."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    offset: int
    flags: int
    inode: int
    """st_ino of the memfd behind the slot (the VMM's memfd: the same file, not a copy)."""


class _Backing:
    """A live slot and its own reference to the memfd: a dup of the caller's fd, or for a
    shrink-sealed memfd the MAP_SHARED mapping (mmap keeps a dup of its own)."""

    __slots__ = (
        "dev",
        "dirty",
        "dirty_words",
        "end",
        "fd",
        "flags",
        "gpa",
        "ino",
        "map",
        "offset",
        "size",
        "slot",
    )

    def __init__(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        fd: int,
        offset: int,
        dev: int,
        ino: int,
        mapping: mmap.mmap | None,
    ) -> None:
        self.slot = slot
        self.flags = flags
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.fd = fd
        self.offset = offset
        self.dev = dev
        self.ino = ino
        self.map = mapping
        # memslot->dirty_bitmap: present exactly while KVM_MEM_LOG_DIRTY_PAGES is set.
        self.dirty: bytearray | None = None
        # The 64-bit words of `dirty` that may be non-zero (a guest write adds its word), so
        # reading a large log that is mostly clean costs what is dirty, not the slot's size.
        # None where that is not known (a log made all set): a read then scans the bitmap.
        self.dirty_words: set[int] | None = None

    def set_dirty_logging(self, flags: int, initially_set: bool) -> None:
        """kvm_prepare_memory_region's rule for the bitmap under the slot's new flags: none
        without KVM_MEM_LOG_DIRTY_PAGES; kept when logging was on already (a flags-only
        change or a move keeps it); else a new one, all clear, or all set under
        KVM_DIRTY_LOG_INITIALLY_SET with manual protection."""
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.dirty = None
            self.dirty_words = None
        elif self.dirty is None:
            npages = self.size // PAGE_SIZE
            self.dirty = bytearray(dirty_bitmap_bytes(npages))
            self.dirty_words = set()
            if initially_set:  # bitmap_set(new->dirty_bitmap, 0, new->npages)
                self.dirty[: npages // 8] = b"\xff" * (npages // 8)
                if npages % 8:
                    self.dirty[npages // 8] = (1 << (npages % 8)) - 1
                self.dirty_words = None

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> MemorySlot:
        return MemorySlot(self.slot, self.gpa, self.size, self.offset, self.flags, self.ino)


# --- AES-256-XTS --------------------------------------------------------------------------


def _tweak(gpa: int) -> bytes:
    return gpa.to_bytes(16, "little")


def _check_vek(vek: bytes) -> None:
    if len(vek) != VEK_SIZE:
        raise ValueError(f"a VEK is {VEK_SIZE} bytes (AES-256-XTS), got {len(vek)}")


def xts_encrypt(vek: bytes, gpa: int, page: bytes) -> bytes:
    """Encrypt one page as the SEV memory controller would store it.

    Args:
        vek: the guest's 64-byte VEK (AES-256-XTS key; its two halves must differ).
        gpa: guest physical address of the page: the XTS tweak, 16 bytes little endian.
        page: the plaintext (at least 16 bytes; a page in practice).
    """
    _check_vek(vek)
    return Cipher(algorithms.AES(vek), modes.XTS(_tweak(gpa))).encryptor().update(page)


def xts_decrypt(vek: bytes, gpa: int, page: bytes) -> bytes:
    """Decrypt one page stored by `xts_encrypt` with the same VEK and GPA."""
    _check_vek(vek)
    return Cipher(algorithms.AES(vek), modes.XTS(_tweak(gpa))).decryptor().update(page)


class _XtsKeys:
    """AES-256-XTS keyed once per VEK (`_sevcrypto.XtsKey`, native code): a page then costs
    setting its tweak and one AES pass, whether the guest touches it on every step or a
    migration moves it once. (Through `cryptography` a page needed a cipher context of its
    own, about 3 us to make, kept per page for the guest's hot pages: a migration's pages,
    each moved once, paid it every time.) Bounded; dropped wholesale when full.

    One cache serves every VM of the host (`_HOST_XTS`): after MOVE_ENC_CONTEXT_FROM (or a
    mirror's COPY) the destination's guest runs under the same VEK, so its first steps find
    the key the source VM keyed, with no key schedule inside the handoff's pause.

    The native module holds each key only as OpenSSL's key schedule, cleansed when freed;
    `xts_encrypt` and `xts_decrypt` above are the reference it is held to
    (tests/kvmstub/test_sevcrypto_native.py)."""

    __slots__ = ("_keys",)

    LIMIT = 64  # VEKs keyed at once

    def __init__(self) -> None:
        self._keys: dict[bytes, _sevcrypto.XtsKey] = {}

    def _key(self, vek: bytes) -> _sevcrypto.XtsKey:
        if type(vek) is not bytes:  # a bytearray would not hash
            vek = bytes(vek)
        key = self._keys.get(vek)
        if key is None:
            _check_vek(vek)
            key = _sevcrypto.XtsKey(vek)  # ValueError: the two halves are equal
            if len(self._keys) >= self.LIMIT:
                self._keys.clear()
            self._keys[vek] = key
        return key

    def encrypt(self, vek: bytes, gpa: int, page: bytes) -> bytes:
        """`page` encrypted as `xts_encrypt` does it."""
        return self._key(vek).encrypt(_tweak(gpa), page)

    def decrypt(self, vek: bytes, gpa: int, page: bytes) -> bytes:
        """`page` decrypted as `xts_decrypt` does it."""
        return self._key(vek).decrypt(_tweak(gpa), page)

    def clear(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


_HOST_XTS = _XtsKeys()


def keyed_veks() -> int:
    """How many VEKs the host-wide AES-XTS cache has keyed (for tests and stats)."""
    return len(_HOST_XTS)


# --- the slots ----------------------------------------------------------------------------


_F_SEAL_FUTURE_WRITE = 0x0010  # include/uapi/linux/fcntl.h (not in Python 3.11's fcntl)


def _check_mappable(fd: int, st: os.stat_result, flags: int) -> None:
    """Refuse a backing no VMM could have mapped, with the errno its mmap would have got.

    With KVM the slot's backing is a userspace address: the VMM first maps its file with
    mmap(NULL, memory_size, PROT_READ | PROT_WRITE (PROT_READ alone for KVM_MEM_READONLY),
    MAP_SHARED, fd, offset), then passes the address. KVM never sees the fd and never looks
    at the mapping when the slot is set: __kvm_set_memory_region (virt/kvm/kvm_main.c) checks
    only that userspace_addr is page aligned and access_ok(). (Only guest_memfd, through
    KVM_SET_USER_MEMORY_REGION2, names an fd; kvm_gmem_bind in virt/kvm/guest_memfd.c answers
    EBADF for no file and EINVAL for a file that is not a guest_memfd of this VM. kvmstub has
    no guest_memfd.) So a bad fd here is one whose mmap fails, and it fails with mmap's errno,
    in do_mmap's order (mm/mmap.c; tests/kvmstub/test_hostile_slots.py checks each case
    against the host's KVM where /dev/kvm works):

    - an O_PATH fd: EBADF (the mmap syscall's fget() refuses it);
    - a writable slot over an fd not open for writing: EACCES (MAP_SHARED with PROT_WRITE);
    - an fd not open for reading: EACCES;
    - a file without an mmap method (directory, pipe, socket, eventfd, /dev/null): ENODEV;
    - a memfd sealed against writes, for a writable slot: EPERM (mm/memfd.c refuses a shared
      writable mapping).

    A regular file is accepted, as KVM accepts it: a VMM may map any regular file MAP_SHARED
    (QEMU's memory-backend-file) and KVM faults its pages in like a memfd's; a file that
    cannot be sealed is reached with pread/pwrite, so truncating it under the slot is EFAULT
    as in KVM_RUN. Other mappable kinds (a block device, /dev/zero) are ENODEV here: this is
    kvmstub's limit, not the kernel's; it reaches a slot's memory through the fd, and only a
    file's contents are memory the fd names.
    """
    mode = fcntl.fcntl(fd, fcntl.F_GETFL)
    if mode & os.O_PATH:
        raise OSError(errno.EBADF, "an O_PATH fd cannot be mapped")
    access = mode & os.O_ACCMODE
    if not flags & KVM_MEM_READONLY and access != os.O_RDWR:
        raise OSError(
            errno.EACCES, "a writable slot needs a backing fd open for reading and writing"
        )
    if access == os.O_WRONLY:
        raise OSError(errno.EACCES, "the backing fd is not open for reading")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(
            errno.ENODEV,
            f"a {_file_kind(st.st_mode)} cannot back a memory slot: mmap has nothing to map "
            "(use a memfd or a regular file)",
        )
    if not flags & KVM_MEM_READONLY:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:  # not a memfd: no seals
            seals = 0
        if seals & (fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
            raise OSError(errno.EPERM, "the memfd is sealed against writes; the slot is writable")


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "file of this kind (not a regular file)"


def _shrink_sealed(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # not a memfd (or sealing not allowed): it can shrink
        return False


_ZERO_WORD = bytes(8)
_ZERO_BLOCK = bytes(4096)
_RUN_GAP = 32
"""Dirty runs closer than this many bytes travel as one: each run costs about a dozen
bytes of framing, so a log's runs never take more room than its bitmap (see
`daemon._check_log_fits`)."""


def _nonzero_words(dirty: bytearray) -> list[int]:
    """The indices of the non-zero 64-bit words of `dirty`, found a 4 KiB block at a time
    (a block of zeros is one comparison in C)."""
    words: list[int] = []
    for block in range(0, len(dirty), len(_ZERO_BLOCK)):
        if dirty.startswith(_ZERO_BLOCK, block):
            continue
        end = min(block + len(_ZERO_BLOCK), len(dirty))
        words.extend(at // 8 for at in range(block, end, 8) if not dirty.startswith(_ZERO_WORD, at))
    return words


def _spans(dirty: bytearray, words: list[int]) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of `dirty` covering its non-zero words among `words`
    (sorted; they may name zero words, which are left out), merged where less than
    `_RUN_GAP` bytes apart."""
    spans: list[tuple[int, int]] = []
    for w in words:
        start = w * 8
        if dirty[start : start + 8] == _ZERO_WORD:
            continue
        if spans and start - spans[-1][1] < _RUN_GAP:
            spans[-1] = (spans[-1][0], start + 8)
        else:
            spans.append((start, start + 8))
    return spans


class GuestMemory:
    """The memory slots of one VM, and guest-physical access to them."""

    def __init__(self) -> None:
        self._slots: dict[int, _Backing] = {}
        self._by_gpa: list[_Backing] = []  # sorted by gpa, for lookup
        self._last: _Backing | None = None  # the slot of the latest access
        self._xts = _HOST_XTS  # shared by every VM: see _XtsKeys

    # KVM_SET_USER_MEMORY_REGION

    def set_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        fd: int,
        offset: int,
        *,
        dirty_initially_set: bool = False,
    ) -> None:
        """Create, move, re-flag or delete a slot, as KVM_SET_USER_MEMORY_REGION does.

        Args:
            slot: the slot id; bits 16 and up name the address space (only 0 exists here).
            flags: KVM_MEM_LOG_DIRTY_PAGES and/or KVM_MEM_READONLY.
            guest_phys_addr: where the slot starts in guest physical memory.
            memory_size: its length; 0 deletes the slot.
            fd: the memfd (or regular file) backing it; it stands for the VMM's mapping of
                that file, see `_check_mappable`. Duplicated: the caller keeps its own fd.
            offset: where in the memfd the slot starts (the kernel's userspace_addr).
            dirty_initially_set: the VM runs with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
                KVM_DIRTY_LOG_INITIALLY_SET: a dirty bitmap made now starts all set.

        Raises:
            OSError: EINVAL for a bad slot id, bad flags, misaligned or overflowing
                address/size/offset, a memfd shorter than offset+memory_size, deleting a
                slot that does not exist, or changing an existing slot's size, backing or
                read-only flag; EEXIST for an overlap with another slot; EBADF for a bad fd;
                for an fd no VMM could have mapped, mmap's errno (ENODEV, EACCES, EBADF,
                EPERM: see `_check_mappable`).
        """
        # kvm_vm_ioctl_set_memory_region
        if not 0 <= slot <= 0xFFFFFFFF or (slot & 0xFFFF) >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS")
        # check_memory_region_flags
        if not 0 <= flags <= 0xFFFFFFFF or flags & ~_VALID_FLAGS:
            raise _einval(f"unsupported memory region flags {flags:#x}")
        # general sanity checks, in kvm_set_memory_region's order
        if not 0 <= memory_size <= U64_MASK or memory_size & _PAGE_MASK:
            raise _einval("memory_size is not page aligned")
        if not 0 <= guest_phys_addr <= U64_MASK or guest_phys_addr & _PAGE_MASK:
            raise _einval("guest_phys_addr is not page aligned")
        if not 0 <= offset <= U64_MASK or offset & _PAGE_MASK:
            raise _einval("offset is not page aligned")
        st: os.stat_result | None = None
        if memory_size:  # access_ok(): the backing must cover the whole slot
            st = os.fstat(fd)
            _check_mappable(fd, st, flags)
            if st.st_size < offset + memory_size:
                raise _einval(
                    f"memfd is {st.st_size} bytes, shorter than offset+memory_size "
                    f"({offset + memory_size})"
                )
        as_id, sid = slot >> 16, slot & 0xFFFF
        if as_id >= KVM_ADDRESS_SPACE_NUM:
            raise _einval(f"address space {as_id} does not exist")
        if guest_phys_addr + memory_size > U64_MASK + 1:
            raise _einval("guest_phys_addr + memory_size wraps")
        npages = memory_size // PAGE_SIZE
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise _einval("slot larger than KVM_MEM_MAX_NR_PAGES")

        old = self._slots.get(sid)
        if not memory_size:
            if old is None:
                raise _einval(f"slot {sid} does not exist")
            self._remove(old)
            return
        assert st is not None
        if old is not None:  # modify an existing slot
            if (
                (st.st_dev, st.st_ino, offset) != (old.dev, old.ino, old.offset)
                or memory_size != old.size
                or (flags ^ old.flags) & KVM_MEM_READONLY
            ):
                raise _einval(f"slot {sid} may only move or change flags; delete it first")
            if guest_phys_addr == old.gpa:
                if flags != old.flags:  # KVM_MR_FLAGS_ONLY (else nothing to change)
                    old.set_dirty_logging(flags, dirty_initially_set)
                    old.flags = flags
                return
        end = guest_phys_addr + memory_size
        for other in self._by_gpa:
            if other.slot != sid and other.gpa < end and guest_phys_addr < other.end:
                raise OSError(errno.EEXIST, f"overlaps slot {other.slot}")
        if old is not None:  # KVM_MR_MOVE: same backing, new place
            self._by_gpa.remove(old)
            old.set_dirty_logging(flags, dirty_initially_set)
            old.gpa, old.end, old.flags = guest_phys_addr, end, flags
            self._insert(old)
            return
        self._create(sid, flags, guest_phys_addr, memory_size, fd, offset, st)
        self._slots[sid].set_dirty_logging(flags, dirty_initially_set)

    def _create(
        self, sid: int, flags: int, gpa: int, size: int, fd: int, offset: int, st: os.stat_result
    ) -> None:
        mapping = None
        if _shrink_sealed(fd):
            # mmap keeps its own dup of the fd: that copy is the slot's reference.
            prot = mmap.PROT_READ
            if not flags & KVM_MEM_READONLY:
                prot |= mmap.PROT_WRITE
            try:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
            except OSError as exc:
                # Out of address space. The kernel maps no guest memory of its own (each VMM
                # maps its guest; KVM uses the VMM's page tables), but this one process maps
                # every slot of every VM into its 128 TiB: a 64 TiB guest during a handoff
                # (its slots for the old VM and again for the new one) does not fit, and
                # failing here would be a limit no kernel has. pread/pwrite reach the same
                # page cache, so such a slot works without a mapping.
                if exc.errno != errno.ENOMEM:
                    raise
        dup = os.dup(fd) if mapping is None else -1
        backing = _Backing(sid, flags, gpa, size, dup, offset, st.st_dev, st.st_ino, mapping)
        self._slots[sid] = backing
        self._insert(backing)

    def _insert(self, backing: _Backing) -> None:
        self._by_gpa.append(backing)
        self._by_gpa.sort(key=lambda b: b.gpa)
        self._last = None

    def _remove(self, backing: _Backing) -> None:
        del self._slots[backing.slot]
        self._by_gpa.remove(backing)
        self._last = None
        backing.close()

    def slots(self) -> list[MemorySlot]:
        """The live slots, by slot id."""
        return [self._slots[sid].describe() for sid in sorted(self._slots)]

    def close(self) -> None:
        """Unmap every slot and close the dup'ed fds. (The cipher contexts stay in the
        host-wide cache, which is bounded, for a VM that runs on under the same VEK.)"""
        for backing in list(self._slots.values()):
            self._remove(backing)

    def backed_up_to(self, start: int, end: int) -> int:
        """How far from `start` the slots back guest memory without a hole: `end` or
        beyond when all of [start, end) is backed, else the first address that is not
        (`start` itself when no slot holds it). sev_pin_memory's test, without listing the
        slots for a range that one slot holds, as each page of a migration is."""
        last = self._last
        if last is not None and last.gpa <= start and end <= last.end:
            return end
        need = start
        for backing in self._by_gpa:  # in guest-physical order
            if backing.gpa > need:
                break
            need = max(need, backing.end)
        return need

    # guest physical access

    def _lookup(self, gpa: int) -> _Backing:
        last = self._last
        if last is not None and last.gpa <= gpa < last.end:
            return last
        for backing in self._by_gpa:
            if backing.gpa <= gpa < backing.end:
                self._last = backing
                return backing
        raise _fault(f"no memory slot backs guest physical address {gpa:#x}")

    def _pread(self, b: _Backing, gpa: int, length: int) -> bytes:
        pos = gpa - b.gpa
        if b.map is not None:
            return b.map[pos : pos + length]
        data = os.pread(b.fd, length, b.offset + pos)
        if len(data) != length:  # the VMM truncated the memfd under the slot
            raise _fault(f"backing of guest physical address {gpa:#x} is gone")
        return data

    def _pwrite(self, b: _Backing, gpa: int, data: bytes) -> None:
        if b.flags & KVM_MEM_READONLY:
            raise _fault(f"slot {b.slot} is read-only")
        pos = gpa - b.gpa
        if b.map is not None:
            b.map[pos : pos + len(data)] = data
        elif os.pwrite(b.fd, data, b.offset + pos) != len(data):
            raise _fault(f"short write at guest physical address {gpa:#x}")

    def _segments(self, gpa: int, length: int) -> list[tuple[_Backing, int, int]]:
        """Split [gpa, gpa+length) into pieces that each lie in one slot (EFAULT on a hole)."""
        if gpa < 0 or length < 0 or gpa + length > U64_MASK + 1:
            raise _einval("guest physical range out of bounds")
        pieces = []
        while length:
            b = self._lookup(gpa)
            n = min(length, b.end - gpa)
            pieces.append((b, gpa, n))
            gpa += n
            length -= n
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        """The bytes at [gpa, gpa+length), across slots. Raises OSError(EFAULT) where
        no slot backs the range (nothing is read then)."""
        return b"".join([self._pread(b, at, n) for b, at, n in self._segments(gpa, length)])

    def write(self, gpa: int, data: bytes) -> None:
        """Store `data` at `gpa`, across slots. Raises OSError(EFAULT) where no slot (or a
        read-only one) backs the range; nothing is written then."""
        pieces = self._segments(gpa, len(data))
        for b, _, _ in pieces:
            if b.flags & KVM_MEM_READONLY:
                raise _fault(f"slot {b.slot} is read-only")
        pos = 0
        for b, at, n in pieces:
            self._pwrite(b, at, data[pos : pos + n])
            pos += n

    def read_page(self, gpa: int, vek: bytes | None) -> bytes:
        """One page at a page-aligned `gpa`, decrypted with `vek` (a private page) or as
        stored (a shared page, or a guest without SEV)."""
        if gpa & _PAGE_MASK or gpa < 0:
            raise _einval(f"guest physical address {gpa:#x} is not page aligned")
        b = self._last
        if b is None or not b.gpa <= gpa < b.end:
            b = self._lookup(gpa)
        data = self._pread(b, gpa, PAGE_SIZE)
        if vek is None:
            return data
        return self._xts.decrypt(vek, gpa, data)

    def write_page(self, gpa: int, data: bytes, vek: bytes | None) -> None:
        """Store one page at a page-aligned `gpa`, encrypted with `vek` (a private page)
        or in plaintext (a shared page, or a guest without SEV)."""
        if gpa & _PAGE_MASK or gpa < 0:
            raise _einval(f"guest physical address {gpa:#x} is not page aligned")
        if len(data) != PAGE_SIZE:
            raise _einval(f"a page is {PAGE_SIZE} bytes, got {len(data)}")
        b = self._last
        if b is None or not b.gpa <= gpa < b.end:
            b = self._lookup(gpa)
        if vek is not None:
            data = self._xts.encrypt(vek, gpa, data)
        self._pwrite(b, gpa, data)

    def write_guest_page(self, gpa: int, data: bytes, vek: bytes | None) -> None:
        """`write_page` for a write by the guest itself (a vCPU through its page tables):
        the page is also marked in its slot's dirty bitmap, when the slot logs dirty pages
        (mark_page_dirty_in_slot)."""
        self.write_page(gpa, data, vek)
        b = self._last
        assert b is not None and b.gpa <= gpa < b.end  # write_page looked it up
        dirty = b.dirty
        if dirty is not None:
            page = (gpa - b.gpa) >> 12
            dirty[page >> 3] |= 1 << (page & 7)
            words = b.dirty_words
            if words is not None:
                words.add(page >> 6)

    # KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG

    def _logging_slot(self, slot: int) -> _Backing:
        """The slot a dirty-log ioctl names, checked as both ioctls check it: EINVAL for an
        address space or slot id out of range, ENOENT for no such slot or a slot without
        KVM_MEM_LOG_DIRTY_PAGES (virt/kvm/kvm_main.c, kvm_get_dirty_log_protect:
        `as_id >= KVM_ADDRESS_SPACE_NUM || id >= KVM_USER_MEM_SLOTS` -> -EINVAL;
        `!memslot || !memslot->dirty_bitmap` -> -ENOENT)."""
        as_id, sid = (slot >> 16) & 0xFFFF, slot & 0xFFFF
        if not 0 <= slot <= 0xFFFFFFFF or as_id >= KVM_ADDRESS_SPACE_NUM:
            raise _einval(f"address space {as_id} does not exist")
        if sid >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot id {sid} >= KVM_USER_MEM_SLOTS")
        backing = self._slots.get(sid)
        if backing is None:
            raise OSError(errno.ENOENT, f"slot {sid} does not exist")
        if backing.dirty is None:
            raise OSError(errno.ENOENT, f"slot {sid} does not log dirty pages")
        return backing

    def get_dirty_log(self, slot: int, *, manual_protect: bool) -> DirtyLog:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (`dirty_bitmap_bytes(npages)` bytes,
        bit i = page i of the slot), as the runs that may be non-zero (`uapi.DirtyLog`).
        Without manual protection the bitmap is cleared as it is read (each page is
        reported once per write since the last read); with
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE it stays until KVM_CLEAR_DIRTY_LOG.

        The cost follows the dirty words, not the slot's size: a 64 GiB slot's 2 MiB
        bitmap is neither copied nor scanned when the guest wrote a few pages.

        Raises:
            OSError: EINVAL for a bad address space or slot id; ENOENT for a slot that
                does not exist or does not log dirty pages.
        """
        backing = self._logging_slot(slot)
        dirty = backing.dirty
        assert dirty is not None
        known = backing.dirty_words
        words = _nonzero_words(dirty) if known is None else sorted(known)
        spans = _spans(dirty, words)
        runs = tuple((start, bytes(dirty[start:end])) for start, end in spans)
        if manual_protect:
            # The bits stay; the index keeps the words that are still set.
            backing.dirty_words = {w for w in words if dirty[w * 8 : w * 8 + 8] != _ZERO_WORD}
        else:
            # xchg(&dirty_bitmap[i], 0) for every word: only the words that held bits.
            for start, end in spans:
                dirty[start:end] = bytes(end - start)
            backing.dirty_words = set()
        return DirtyLog(len(dirty), runs)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the bits set in `bitmap` (bit i = page first_page+i)
        from the slot's dirty bitmap, in kvm_clear_dirty_log_protect's order of checks.

        Raises:
            OSError: EINVAL for a bad address space or slot id, or for `first_page` not a
                multiple of 64; ENOENT for a slot that does not exist or does not log;
                EINVAL for a range past the slot's end or `num_pages` not a multiple of 64
                short of the end; EFAULT when `bitmap` is shorter than the range needs
                (the kernel's copy_from_user of ALIGN(num_pages, 64) / 8 bytes).
        """
        as_id, sid = (slot >> 16) & 0xFFFF, slot & 0xFFFF
        if not 0 <= slot <= 0xFFFFFFFF or as_id >= KVM_ADDRESS_SPACE_NUM:
            raise _einval(f"address space {as_id} does not exist")
        if sid >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot id {sid} >= KVM_USER_MEM_SLOTS")
        if not 0 <= first_page <= U64_MASK or first_page & 63:
            raise _einval(f"first_page {first_page} is not a multiple of 64")
        backing = self._logging_slot(slot)
        dirty = backing.dirty
        assert dirty is not None
        npages = backing.size // PAGE_SIZE
        if (
            not 0 <= num_pages <= 0xFFFFFFFF
            or first_page > npages
            or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages & 63)
        ):
            raise _einval(
                f"pages {first_page}+{num_pages} of slot {sid} ({npages} pages): the range "
                "must lie in the slot and be a multiple of 64 pages unless it ends the slot"
            )
        n = dirty_bitmap_bytes(num_pages)
        if len(bitmap) < n:
            raise _fault(f"the bitmap of {num_pages} pages is {n} bytes, got {len(bitmap)}")
        if not n:
            return
        start = first_page // 8
        current = int.from_bytes(dirty[start : start + n], "little")
        mask = int.from_bytes(bitmap[:n], "little")
        dirty[start : start + n] = (current & ~mask).to_bytes(n, "little")
