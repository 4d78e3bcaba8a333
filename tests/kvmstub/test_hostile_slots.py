"""A memory slot over an fd no VMM could have mapped.

With KVM a slot names a userspace address: the VMM mmaps its backing (MAP_SHARED, PROT_READ
and PROT_WRITE unless the slot is KVM_MEM_READONLY) and passes the address; KVM itself never
sees the fd. kvmstub's wire passes the fd instead, so an fd that mmap would refuse must fail
with mmap's errno (a directory, a pipe, a socket, an O_PATH fd, a read-only fd for a writable
slot), and a regular file, which a VMM can map and KVM accepts, is accepted.

The last test checks the same cases against the host's real KVM when /dev/kvm works.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmstub import client
from kvmstub.memory import GuestMemory
from kvmstub.uapi import KVM_MEM_READONLY, PAGE_SIZE

KvmstubDaemon = Any  # tests/conftest.py's class

SIZE = 4 * PAGE_SIZE
RW, RO = 0, KVM_MEM_READONLY

Opener = Callable[[Path], int]


def _regular(path: Path, mode: int = os.O_RDWR) -> int:
    file = path / "ram"
    if not file.exists():
        file.write_bytes(b"")
        os.truncate(file, SIZE)
    return os.open(file, mode | os.O_CLOEXEC)


def _socket(path: Path) -> int:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    return a.detach()


def _write_sealed(path: Path) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK)
    return fd


def _pipe(path: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


# (what, opener, errno for a writable slot, errno for a read-only slot); 0 = accepted.
# The errnos are do_mmap's (mm/mmap.c), in its order: an O_PATH fd is EBADF (fget refuses
# it); MAP_SHARED + PROT_WRITE on an fd not open for writing is EACCES; an fd not open for
# reading is EACCES; a file without ->mmap (directory, pipe, socket, eventfd) is ENODEV; a
# memfd sealed against writes refuses a shared writable mapping with EPERM (mm/memfd.c).
CASES: list[tuple[str, Opener, int, int]] = [
    ("directory", lambda p: os.open(p, os.O_RDONLY | os.O_DIRECTORY), errno.EACCES, errno.ENODEV),
    ("pipe", _pipe, errno.EACCES, errno.ENODEV),
    ("socket", _socket, errno.ENODEV, errno.ENODEV),
    ("eventfd", lambda p: os.eventfd(0), errno.ENODEV, errno.ENODEV),
    ("O_PATH file", lambda p: _regular(p, os.O_PATH), errno.EBADF, errno.EBADF),
    ("write-only file", lambda p: _regular(p, os.O_WRONLY), errno.EACCES, errno.EACCES),
    ("read-only file", lambda p: _regular(p, os.O_RDONLY), errno.EACCES, 0),
    ("write-sealed memfd", _write_sealed, errno.EPERM, 0),
    ("regular file", _regular, 0, 0),
]
IDS = [case[0] for case in CASES]


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[[Opener], int]]:
    fds: list[int] = []

    def open_(opener: Opener) -> int:
        fds.append(opener(tmp_path))
        return fds[-1]

    yield open_
    for fd in fds:
        os.close(fd)


def stub_errno(fd: int, flags: int, size: int = SIZE) -> int:
    mem = GuestMemory()
    try:
        mem.set_region(0, flags, 0, size, fd, 0)
    except OSError as exc:
        return exc.errno or -1
    finally:
        mem.close()
    return 0


@pytest.mark.parametrize(("what", "opener", "rw", "ro"), CASES, ids=IDS)
def test_an_fd_mmap_would_refuse_fails_with_mmaps_errno(
    opened: Callable[[Opener], int], what: str, opener: Opener, rw: int, ro: int
) -> None:
    fd = opened(opener)
    assert (stub_errno(fd, RW), stub_errno(fd, RO)) == (rw, ro)


def test_a_directory_larger_than_the_slot_is_still_refused(tmp_path: Path) -> None:
    """A directory's st_size can exceed the slot; that must not make it look like memory."""
    for i in range(200):
        (tmp_path / f"entry-{i:04}-{'x' * 40}").touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fstat(fd).st_size >= PAGE_SIZE
        assert stub_errno(fd, RO, PAGE_SIZE) == errno.ENODEV
        assert stub_errno(fd, RW, PAGE_SIZE) == errno.EACCES
    finally:
        os.close(fd)


def test_a_regular_file_backs_guest_memory_like_a_memfd(opened: Callable[[Opener], int]) -> None:
    fd = opened(_regular)
    mem = GuestMemory()
    try:
        mem.set_region(0, 0, 0x10000, SIZE, fd, 0)
        mem.write(0x10000 + 8, b"guest")
        assert os.pread(fd, 5, 8) == b"guest"
        os.pwrite(fd, b"vmm", PAGE_SIZE)
        assert mem.read(0x10000 + PAGE_SIZE, 3) == b"vmm"
        os.truncate(f"/proc/self/fd/{fd}", PAGE_SIZE)  # shrunk under the slot: EFAULT, no SIGBUS
        with pytest.raises(OSError) as info:
            mem.read(0x10000 + 2 * PAGE_SIZE, 1)
        assert info.value.errno == errno.EFAULT
    finally:
        mem.close()


def test_deleting_a_slot_does_not_look_at_the_fd(opened: Callable[[Opener], int]) -> None:
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, SIZE)
    mem = GuestMemory()
    try:
        mem.set_region(0, 0, 0, SIZE, memfd, 0)
        mem.set_region(0, 0, 0, 0, opened(_pipe), 0)  # size 0: KVM ignores the address
        assert mem.slots() == []
    finally:
        mem.close()
        os.close(memfd)


# --- over the daemon --------------------------------------------------------------------------


@pytest.mark.parametrize(("what", "opener", "rw", "ro"), CASES, ids=IDS)
async def test_the_daemon_answers_mmaps_errno_and_keeps_serving(
    kvmstub_daemon: KvmstubDaemon,
    opened: Callable[[Opener], int],
    what: str,
    opener: Opener,
    rw: int,
    ro: int,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    fd = opened(opener)
    for slot, (flags, want) in enumerate([(RW, rw), (RO, ro)]):
        try:
            await vm.set_user_memory_region(slot, slot * SIZE, SIZE, fd, flags=flags)
            got = 0
        except OSError as exc:
            got = exc.errno or -1
        assert got == want, f"{what}, flags {flags}: {errno.errorcode.get(got, got)}"
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, SIZE)
        await vm.set_user_memory_region(9, 16 * SIZE, SIZE, memfd)  # the VM still works
    finally:
        os.close(memfd)
    vm.close()


# --- the real kernel ------------------------------------------------------------------------

KVM_CREATE_VM = 0xAE01
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _real_vm() -> int | None:
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    except OSError:
        return None
    finally:
        os.close(kvm)


def real_kernel_errno(vm: int, slot: int, fd: int, flags: int) -> int:
    """What a VMM gets on the real kernel: mmap the fd as kvmstub assumes, then hand KVM the
    address. mmap is called through libc, not Python's mmap module, which checks on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    prot = mmap.PROT_READ | (0 if flags & KVM_MEM_READONLY else mmap.PROT_WRITE)
    addr = libc.mmap(None, SIZE, prot, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        return ctypes.get_errno()
    try:
        region = struct.pack("=IIQQQ", slot, flags, slot * SIZE, SIZE, addr)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        libc.munmap(addr, SIZE)


def test_the_real_kernel_gives_the_same_answers(opened: Callable[[Opener], int]) -> None:
    vm = _real_vm()
    if vm is None:
        pytest.skip("no usable /dev/kvm here")
    try:
        slot = 0
        for what, opener, _, _ in CASES:
            fd = opened(opener)
            for flags in (RW, RO):
                real = real_kernel_errno(vm, slot, fd, flags)
                stub = stub_errno(fd, flags)
                assert stub == real, (
                    f"{what}, flags {flags}: kernel {errno.errorcode.get(real, real)}, "
                    f"kvmstub {errno.errorcode.get(stub, stub)}"
                )
                slot += 1
    finally:
        os.close(vm)
