"""The host's real /dev/kvm through raw ioctls, for the differential tests (kvmstub's answers
against the kernel's): `fcntl.ioctl` on packed structs, ctypes' `ioctl` where the argument is
an unsigned long (CPython parses an int argument as a C int).

    kvm = RealKvm.open()                             # open("/dev/kvm"); raises OSError
    vm = kvm.create_vm()                              # KVM_CREATE_VM
    vcpu = vm.create_vcpu(0)                          # KVM_CREATE_VCPU
    vm.enable_cap(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, source.fd)
    kvm.close()                                       # closes every fd made through it

Failures raise `OSError` with the kernel's errno, as kvmstub.client's do. Numbers and struct
layouts are x86-64, from include/uapi/linux/kvm.h (reference real-kvm.md section 2). Importable
without pytest, so that a child process can use it too.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from typing import Final

KVM_GET_API_VERSION: Final = 0xAE00
KVM_CREATE_VM: Final = 0xAE01
KVM_CHECK_EXTENSION: Final = 0xAE03
KVM_CREATE_VCPU: Final = 0xAE41
KVM_SET_USER_MEMORY_REGION: Final = 0x4020AE46  # _IOW(KVMIO, 0x46, 32-byte region)
KVM_RUN: Final = 0xAE80
KVM_GET_REGS: Final = 0x8090AE81  # _IOR(KVMIO, 0x81, struct kvm_regs), 144 bytes
KVM_ENABLE_CAP: Final = 0x4068AEA3  # _IOW(KVMIO, 0xa3, struct kvm_enable_cap), 104 bytes
KVM_MEMORY_ENCRYPT_OP: Final = 0xC008AEBA  # _IOWR(KVMIO, 0xba, unsigned long)
KVM_MEMORY_ENCRYPT_REG_REGION: Final = 0x8010AEBB  # _IOR(KVMIO, 0xbb, struct kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION: Final = 0x8010AEBC

_ENABLE_CAP: Final = struct.Struct("=II4Q64x")  # cap, flags, args[4], pad[64]
_MEMORY_REGION: Final = struct.Struct("=IIQQQ")  # slot, flags, gpa, memory_size, uaddr
_SEV_CMD: Final = struct.Struct("=IIQII")  # id, pad0, data, error, sev_fd
_ENC_REGION: Final = struct.Struct("=QQ")  # addr, size
_REGS_SIZE: Final = 144
U64_MASK: Final = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """ioctl(fd, request, (unsigned long)arg), through libc: what the C selftests do."""
    ret: int = _libc.ioctl(fd, request, arg & U64_MASK)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _buffer_ioctl(fd: int, request: int, data: bytes) -> int:
    """ioctl with a pointer to a copy of `data` (a bytearray: fcntl passes it in place)."""
    result: int = fcntl.ioctl(fd, request, bytearray(data), True)
    return result


class RealKvm:
    """The system fd; owns every VM and vCPU fd made through it (`close` closes them all)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._owned: list[int] = [fd]

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> RealKvm:
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def own(self, fd: int) -> int:
        """Close `fd` with this object."""
        self._owned.append(fd)
        return fd

    def close_now(self, fd: int) -> None:
        """Close an owned fd before the others."""
        self._owned.remove(fd)
        os.close(fd)

    def get_api_version(self) -> int:
        return ioctl_ulong(self.fd, KVM_GET_API_VERSION, 0)

    def check_extension(self, cap: int) -> int:
        return ioctl_ulong(self.fd, KVM_CHECK_EXTENSION, cap)

    def create_vm(self, vm_type: int = 0) -> RealVm:
        return RealVm(self, self.own(ioctl_ulong(self.fd, KVM_CREATE_VM, vm_type)))

    def close(self) -> None:
        owned, self._owned = self._owned, []
        for fd in reversed(owned):
            os.close(fd)


class RealVm:
    """A VM fd."""

    def __init__(self, kvm: RealKvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def create_vcpu(self, vcpu_id: int) -> RealVcpu:
        return RealVcpu(self.kvm.own(ioctl_ulong(self.fd, KVM_CREATE_VCPU, vcpu_id)))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """KVM_ENABLE_CAP with up to four args (an fd argument is its number)."""
        values = [arg & U64_MASK for arg in args] + [0] * (4 - len(args))
        return _buffer_ioctl(self.fd, KVM_ENABLE_CAP, _ENABLE_CAP.pack(cap, flags, *values))

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        region = _MEMORY_REGION.pack(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _buffer_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def memory_encrypt_op(self, cmd: int, data: int = 0) -> int:
        """KVM_MEMORY_ENCRYPT_OP with a struct kvm_sev_cmd (no /dev/sev fd: sev_fd 0)."""
        return _buffer_ioctl(self.fd, KVM_MEMORY_ENCRYPT_OP, _SEV_CMD.pack(cmd, 0, data, 0, 0))

    def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        _buffer_ioctl(self.fd, KVM_MEMORY_ENCRYPT_REG_REGION, _ENC_REGION.pack(addr, size))

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        _buffer_ioctl(self.fd, KVM_MEMORY_ENCRYPT_UNREG_REGION, _ENC_REGION.pack(addr, size))


class RealVcpu:
    """A vCPU fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def get_regs(self) -> bytes:
        buf = bytearray(_REGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_REGS, buf, True)
        return bytes(buf)

    def run(self) -> int:
        """KVM_RUN (without the kvm_run mapping: only its errno matters here)."""
        return ioctl_ulong(self.fd, KVM_RUN, 0)


def usable_kvm(path: str = "/dev/kvm") -> RealKvm | str:
    """An open /dev/kvm on which KVM_CREATE_VM works, else why not (for a skip)."""
    try:
        kvm = RealKvm.open(path)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        probe = kvm.create_vm()
    except OSError as e:
        kvm.close()
        return f"KVM_CREATE_VM fails on {path}: {e.strerror}"
    kvm.close_now(probe.fd)
    return kvm
