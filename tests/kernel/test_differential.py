"""The kernel as the oracle of kvmstub: the same calls on kvmstub (a daemon, through
kvmstub.client) and on the host's real /dev/kvm (raw ioctls, rawkvm.py), each answer
asserted, every difference explained.

Each `Case` below is one scenario written once against `Side`, the calls both kernels take
(KVM_CHECK_EXTENSION, KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_ENABLE_CAP, KVM_SET_USER_MEMORY_REGION,
KVM_MEMORY_ENCRYPT_OP and its REG/UNREG_REGION), run on three sides:

- `kvmstub`: a daemon with its default platform (SEV and SEV-ES ASIDs);
- `kvmstub-without-sev`: a daemon started with no SEV ASIDs (`--sev-asids 0 --sev-es-asids 0`),
  the nearest kvmstub gets to a host without SEV;
- `kernel`: the real /dev/kvm; skipped where it is missing or KVM_CREATE_VM fails.

A case's answer is "ok" or the errno's name per call (check_extension gives its value), joined
with "," when a case makes several calls. The `kernel` column holds what the project's host
class answers (kernel 6.18, nested KVM served by kvm_pvm, no SEV hardware: reference
real-kvm.md section 1). Where it differs from `kvmstub`, `why` gives the cause and
docs/kernel-differences.md has a row for it (a test checks both). Where kvmstub was wrong, it was
fixed and the case now agrees.

The last tests pass a VM fd and a vCPU fd to a second process (SCM_RIGHTS, foreign_child.py) on
each side: every VM and vCPU ioctl there is EIO (the kernel's `kvm->mm != current->mm`).
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import mmap
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import rawkvm
import trio

from handoff.testing import KvmstubDaemon, start_kvmstub_daemon
from kvmstub import client, uapi

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_VM_TYPES = 235
KVM_MAX_VCPUS = 1024  # x86, CONFIG_KVM_MAX_NR_VCPUS default: both report it (KVM_CAP_MAX_VCPUS)
KVM_MAX_VCPU_IDS = 4 * KVM_MAX_VCPUS  # KVM_VCPU_ID_RATIO 4
NOT_AN_FD = 1_000_000  # above any RLIMIT_NOFILE here: never open
P = uapi.PAGE_SIZE
MEMORY_PAGES = 64  # the guest memory (one memfd) the slot cases map from
KVM_MEM_LOG_DIRTY_PAGES = uapi.KVM_MEM_LOG_DIRTY_PAGES
KVM_MEM_READONLY = uapi.KVM_MEM_READONLY
KVM_MEM_GUEST_MEMFD = 1 << 2
CHILD_TIMEOUT = 30.0

DIFFERENCES_DOC = Path(__file__).parents[2] / "docs" / "kernel-differences.md"


async def answer(call: Awaitable[object]) -> str:
    """ "ok" if the call succeeded, else its errno's name."""
    try:
        await call
    except OSError as e:
        assert e.errno is not None, f"an OSError without errno: {e!r}"
        return errno.errorcode[e.errno]
    return "ok"


# --- the two kernels behind one set of calls ---------------------------------------------------


class Side:
    """One kernel: the calls a case makes. VM and vCPU handles are each side's own objects;
    an fd argument may be a VM handle (the source of MOVE/COPY) or a plain number."""

    name = ""

    async def get_api_version(self) -> int:
        raise NotImplementedError

    async def check_extension(self, cap: int) -> int:
        raise NotImplementedError

    async def create_vm(self, vm_type: int = 0) -> Any:
        raise NotImplementedError

    async def create_vcpu(self, vm: Any, vcpu_id: int) -> Any:
        raise NotImplementedError

    async def enable_cap(self, vm: Any, cap: int, *args: Any, flags: int = 0) -> int:
        raise NotImplementedError

    async def set_user_memory_region(
        self, vm: Any, slot: int, flags: int, gpa: int, size: int, offset: int
    ) -> None:
        """A slot over the side's guest memory from `offset` (kvmstub: the memfd and the
        offset; the kernel: the address of that offset in the memfd's mapping)."""
        raise NotImplementedError

    async def memory_encrypt_op(self, vm: Any, cmd: int) -> None:
        """KVM_MEMORY_ENCRYPT_OP(cmd) with an all-zero command struct."""
        raise NotImplementedError

    async def reg_region(self, vm: Any, addr: int, size: int) -> None:
        raise NotImplementedError

    async def unreg_region(self, vm: Any, addr: int, size: int) -> None:
        raise NotImplementedError

    def system_fd(self) -> int:
        """The /dev/kvm fd."""
        raise NotImplementedError

    def fd_of(self, obj: Any) -> int:
        """The fd number of a VM or vCPU handle."""
        raise NotImplementedError


class StubSide(Side):
    """kvmstub through kvmstub.client."""

    def __init__(self, name: str, kvm: client.Kvm, memfd: int) -> None:
        self.name = name
        self.kvm = kvm
        self.memfd = memfd
        self.objects: list[client.Vm | client.Vcpu] = []

    async def get_api_version(self) -> int:
        return await self.kvm.get_api_version()

    async def check_extension(self, cap: int) -> int:
        return await self.kvm.check_extension(cap)

    async def create_vm(self, vm_type: int = 0) -> client.Vm:
        vm = await self.kvm.create_vm(vm_type)
        self.objects.append(vm)
        return vm

    async def create_vcpu(self, vm: client.Vm, vcpu_id: int) -> client.Vcpu:
        vcpu = await vm.create_vcpu(vcpu_id)
        self.objects.append(vcpu)
        return vcpu

    async def enable_cap(self, vm: client.Vm, cap: int, *args: Any, flags: int = 0) -> int:
        return await vm.enable_cap(cap, *args, flags=flags)

    async def set_user_memory_region(
        self, vm: client.Vm, slot: int, flags: int, gpa: int, size: int, offset: int
    ) -> None:
        await vm.set_user_memory_region(slot, gpa, size, self.memfd, offset=offset, flags=flags)

    async def memory_encrypt_op(self, vm: client.Vm, cmd: int) -> None:
        await vm.sev_ioctl(cmd)

    async def reg_region(self, vm: client.Vm, addr: int, size: int) -> None:
        await vm.memory_encrypt_reg_region(addr, size)

    async def unreg_region(self, vm: client.Vm, addr: int, size: int) -> None:
        await vm.memory_encrypt_unreg_region(addr, size)

    def system_fd(self) -> int:
        return self.kvm.fileno()

    def fd_of(self, obj: client.Vm | client.Vcpu) -> int:
        return obj.fileno()

    def close(self) -> None:
        for obj in reversed(self.objects):
            obj.close()
        self.kvm.close()


class KernelSide(Side):
    """The real /dev/kvm through rawkvm (synchronous ioctls, each as fast as a syscall)."""

    name = "kernel"

    def __init__(self, kvm: rawkvm.RealKvm, memfd: int) -> None:
        self.kvm = kvm
        self._mapping = mmap.mmap(memfd, MEMORY_PAGES * P)
        self._view = (ctypes.c_char * (MEMORY_PAGES * P)).from_buffer(self._mapping)
        self.base = ctypes.addressof(self._view)

    async def get_api_version(self) -> int:
        return self.kvm.get_api_version()

    async def check_extension(self, cap: int) -> int:
        return self.kvm.check_extension(cap)

    async def create_vm(self, vm_type: int = 0) -> rawkvm.RealVm:
        return self.kvm.create_vm(vm_type)

    async def create_vcpu(self, vm: rawkvm.RealVm, vcpu_id: int) -> rawkvm.RealVcpu:
        return vm.create_vcpu(vcpu_id)

    async def enable_cap(self, vm: rawkvm.RealVm, cap: int, *args: Any, flags: int = 0) -> int:
        values = [arg.fd if isinstance(arg, rawkvm.RealVm) else arg for arg in args]
        return vm.enable_cap(cap, *values, flags=flags)

    async def set_user_memory_region(
        self, vm: rawkvm.RealVm, slot: int, flags: int, gpa: int, size: int, offset: int
    ) -> None:
        vm.set_user_memory_region(slot, flags, gpa, size, self.base + offset)

    async def memory_encrypt_op(self, vm: rawkvm.RealVm, cmd: int) -> None:
        vm.memory_encrypt_op(cmd)

    async def reg_region(self, vm: rawkvm.RealVm, addr: int, size: int) -> None:
        vm.memory_encrypt_reg_region(addr, size)

    async def unreg_region(self, vm: rawkvm.RealVm, addr: int, size: int) -> None:
        vm.memory_encrypt_unreg_region(addr, size)

    def system_fd(self) -> int:
        return self.kvm.fd

    def fd_of(self, obj: rawkvm.RealVm | rawkvm.RealVcpu) -> int:
        return obj.fd

    def close(self) -> None:
        del self._view  # releases the buffer export, so the mapping can close
        self._mapping.close()


# --- the cases -----------------------------------------------------------------------------

CaseRun = Callable[[Side], Awaitable[str]]


@dataclass(frozen=True)
class Case:
    """One scenario and what each side answers. `kvmstub_without_sev` defaults to `kvmstub`.
    `why` is required where `kvmstub` and `kernel` differ: the cause, in a few words (the
    docs table says more)."""

    name: str
    run: CaseRun
    kvmstub: str
    kernel: str
    why: str = ""
    kvmstub_without_sev: str | None = None


# The causes of the differences (docs/kernel-differences.md explains each).
NO_HOOK = "kvm_pvm has no vm_{move,copy}_enc_context_from: x86.c answers EINVAL first"
NO_SEV_IOCTL = "kvm_pvm has no mem_enc_ioctl: x86.c answers ENOTTY for every command"
NO_SEV_TYPES = "no SEV on the host: supported_vm_types is the default type only"
MEMFD_NOT_ADDRESS = "kvmstub's slot names a memfd range, which must exist; KVM takes any address"


def check_extension(cap: int) -> CaseRun:
    async def run(side: Side) -> str:
        return str(await side.check_extension(cap))

    return run


async def api_version(side: Side) -> str:
    return str(await side.get_api_version())


def create_vm(vm_type: int) -> CaseRun:
    async def run(side: Side) -> str:
        return await answer(side.create_vm(vm_type))

    return run


def enable_cap(cap: int, *args: int, flags: int = 0) -> CaseRun:
    async def run(side: Side) -> str:
        vm = await side.create_vm()
        return await answer(side.enable_cap(vm, cap, *args, flags=flags))

    return run


def enc_context_from(cap: int, source: str, flags: int = 0) -> CaseRun:
    """MOVE or COPY into a fresh VM from `source`: "not-an-fd", "-1", "pipe", "system",
    "vcpu", "self", "plain" (a VM that is not SEV)."""

    async def run(side: Side) -> str:
        dst = await side.create_vm()
        other = await side.create_vm()
        read_end, write_end = os.pipe()
        try:
            arg: Any = {
                "not-an-fd": NOT_AN_FD,
                "-1": -1,
                "pipe": read_end,
                "system": side.system_fd(),
                "vcpu": side.fd_of(await side.create_vcpu(other, 0)) if source == "vcpu" else 0,
                "self": dst,
                "plain": other,
            }[source]
            return await answer(side.enable_cap(dst, cap, arg, flags=flags))
        finally:
            os.close(read_end)
            os.close(write_end)

    return run


async def copy_into_vm_with_vcpus(side: Side) -> str:
    dst = await side.create_vm()
    await side.create_vcpu(dst, 0)
    src = await side.create_vm()
    return await answer(side.enable_cap(dst, COPY, src))


def sev_init_then_move(*more_args: int) -> CaseRun:
    """KVM_SEV_INIT on one VM, then MOVE its context into another (with `more_args` in
    args[1..3], which neither kernel looks at)."""

    async def run(side: Side) -> str:
        src = await side.create_vm()
        init = await answer(side.memory_encrypt_op(src, uapi.KVM_SEV_INIT))
        dst = await side.create_vm()
        return f"{init},{await answer(side.enable_cap(dst, MOVE, src, *more_args))}"

    return run


def create_vcpus(*ids: int) -> CaseRun:
    async def run(side: Side) -> str:
        vm = await side.create_vm()
        return ",".join([await answer(side.create_vcpu(vm, i)) for i in ids])

    return run


async def more_vcpus_than_allowed(side: Side) -> str:
    """KVM_MAX_VCPUS vCPUs, then one more: kvm->max_vcpus."""
    vm = await side.create_vm()
    for i in range(KVM_MAX_VCPUS):
        await side.create_vcpu(vm, i)
    return await answer(side.create_vcpu(vm, KVM_MAX_VCPUS))


def max_vcpu_id(*steps: int | str) -> CaseRun:
    """KVM_ENABLE_CAP(KVM_CAP_MAX_VCPU_ID, n) for an int step, KVM_CREATE_VCPU(i) for "vcpu i"."""

    async def run(side: Side) -> str:
        vm = await side.create_vm()
        answers = []
        for step in steps:
            if isinstance(step, int):
                call = side.enable_cap(vm, uapi.KVM_CAP_MAX_VCPU_ID, step)
                answers.append(await answer(call))
            else:
                answers.append(await answer(side.create_vcpu(vm, int(step.split()[1]))))
        return ",".join(answers)

    return run


Slot = tuple[int, int, int, int, int]  # slot, flags, gpa, size, offset into guest memory


def memory_regions(*regions: Slot) -> CaseRun:
    """KVM_SET_USER_MEMORY_REGION for each region in turn, on one VM."""

    async def run(side: Side) -> str:
        vm = await side.create_vm()
        return ",".join([await answer(side.set_user_memory_region(vm, *r)) for r in regions])

    return run


async def address_space_one(side: Side) -> str:
    """A slot in address space 1 (SMM), with how many address spaces the side reports."""
    spaces = await side.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE)
    vm = await side.create_vm()
    return f"{spaces},{await answer(side.set_user_memory_region(vm, 1 << 16, 0, 0, P, 0))}"


def memory_encrypt_op(cmd: int) -> CaseRun:
    async def run(side: Side) -> str:
        vm = await side.create_vm()
        return await answer(side.memory_encrypt_op(vm, cmd))

    return run


def enc_region(register: bool) -> CaseRun:
    async def run(side: Side) -> str:
        vm = await side.create_vm()
        await side.set_user_memory_region(vm, 0, 0, 0, 4 * P, 0)
        call = side.reg_region if register else side.unreg_region
        return await answer(call(vm, 0, P))

    return run


SLOT0: Slot = (0, 0, 0, 4 * P, 0)


def same(name: str, run: CaseRun, answer: str) -> Case:
    """A case both kernels (and kvmstub without SEV) answer alike."""
    return Case(name, run, answer, answer)


def differs(
    name: str, run: CaseRun, kvmstub: str, kernel: str, why: str, without_sev: str | None = None
) -> Case:
    """A case the host answers differently, and why."""
    return Case(name, run, kvmstub, kernel, why, without_sev)


CASES = [
    # KVM_GET_API_VERSION, KVM_CHECK_EXTENSION
    same("api version", api_version, "12"),
    same("check unknown cap", check_extension(123456), "0"),
    same("check cap 0x7fffffff", check_extension(0x7FFFFFFF), "0"),
    same("check MOVE cap", check_extension(MOVE), "1"),
    same("check COPY cap", check_extension(COPY), "1"),
    same("check EXIT_HYPERCALL", check_extension(uapi.KVM_CAP_EXIT_HYPERCALL), "4096"),
    same("check USER_MEMORY", check_extension(uapi.KVM_CAP_USER_MEMORY), "1"),
    same("check NR_MEMSLOTS", check_extension(uapi.KVM_CAP_NR_MEMSLOTS), "32764"),
    same("check READONLY_MEM", check_extension(uapi.KVM_CAP_READONLY_MEM), "1"),
    same("check IMMEDIATE_EXIT", check_extension(uapi.KVM_CAP_IMMEDIATE_EXIT), "1"),
    same("check MAX_VCPUS", check_extension(uapi.KVM_CAP_MAX_VCPUS), "1024"),
    same("check MAX_VCPU_ID", check_extension(uapi.KVM_CAP_MAX_VCPU_ID), "4096"),
    same(
        "check NR_VCPUS",
        check_extension(uapi.KVM_CAP_NR_VCPUS),
        str(min(os.cpu_count() or 1, KVM_MAX_VCPUS)),
    ),
    differs("check VM_TYPES", check_extension(KVM_CAP_VM_TYPES), "13", "1", NO_SEV_TYPES, "1"),
    # KVM_CREATE_VM
    same("create VM default type", create_vm(0), "ok"),
    same("create VM SW_PROTECTED type", create_vm(1), "EINVAL"),
    differs("create VM SEV type", create_vm(2), "ok", "EINVAL", NO_SEV_TYPES, "EINVAL"),
    differs("create VM SEV_ES type", create_vm(3), "ok", "EINVAL", NO_SEV_TYPES, "EINVAL"),
    same("create VM SNP type", create_vm(4), "EINVAL"),
    same("create VM TDX type", create_vm(5), "EINVAL"),
    same("create VM type 31", create_vm(31), "EINVAL"),
    same("create VM type 64", create_vm(64), "EINVAL"),
    same("create VM type 2**40", create_vm(1 << 40), "EINVAL"),
    # KVM_ENABLE_CAP: unknown and simple caps
    same("enable unknown cap", enable_cap(123456), "EINVAL"),
    same("enable unknown cap, flags 1", enable_cap(123456, flags=1), "EINVAL"),
    same("enable EXIT_HYPERCALL", enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12), "ok"),
    same("enable EXIT_HYPERCALL bit 0", enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1), "EINVAL"),
    same(
        "enable EXIT_HYPERCALL, args[1..3] set",
        enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12, 1, 2, 3),
        "ok",
    ),
    same(
        "enable EXIT_HYPERCALL, flags 1",
        enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12, flags=1),
        "EINVAL",
    ),
    # MOVE_ENC_CONTEXT_FROM and COPY_ENC_CONTEXT_FROM: argument checks
    *[
        case
        for cap, what in ((MOVE, "MOVE"), (COPY, "COPY"))
        for case in (
            same(f"{what} flags 1", enc_context_from(cap, "plain", flags=1), "EINVAL"),
            *[
                differs(
                    f"{what} from {text}", enc_context_from(cap, source), "EBADF", "EINVAL", NO_HOOK
                )
                for source, text in (
                    ("not-an-fd", "no fd"),
                    ("-1", "fd -1"),
                    ("pipe", "a pipe"),
                    ("system", "/dev/kvm"),
                    ("vcpu", "a vCPU fd"),
                )
            ],
            same(f"{what} from itself", enc_context_from(cap, "self"), "EINVAL"),
            same(f"{what} from a plain VM", enc_context_from(cap, "plain"), "EINVAL"),
        )
    ],
    same("COPY into a VM with vCPUs", copy_into_vm_with_vcpus, "EINVAL"),
    *[
        differs(
            name,
            sev_init_then_move(*more_args),
            "ok,ok",
            "ENOTTY,EINVAL",
            f"{NO_SEV_IOCTL}; {NO_HOOK}",
            "ENOTTY,EINVAL",
        )
        for name, more_args in (
            ("SEV_INIT then MOVE", ()),
            ("SEV_INIT then MOVE, args[1..3] set", (1, 2, 3)),
        )
    ],
    # KVM_CREATE_VCPU
    same("vCPU id twice", create_vcpus(0, 0), "ok,EEXIST"),
    same("vCPU id MAX_VCPU_ID-1", create_vcpus(KVM_MAX_VCPU_IDS - 1), "ok"),
    same("vCPU id MAX_VCPU_ID", create_vcpus(KVM_MAX_VCPU_IDS), "EINVAL"),
    same("vCPU id 2**32", create_vcpus(1 << 32), "EINVAL"),
    same("more vCPUs than MAX_VCPUS", more_vcpus_than_allowed, "EINVAL"),
    same("MAX_VCPU_ID 4 limits ids", max_vcpu_id(4, "vcpu 3", "vcpu 4"), "ok,ok,EINVAL"),
    same("MAX_VCPU_ID above the limit", max_vcpu_id(KVM_MAX_VCPU_IDS + 1), "EINVAL"),
    same("MAX_VCPU_ID set twice", max_vcpu_id(4, 4, 8), "ok,ok,EINVAL"),
    same("MAX_VCPU_ID after a vCPU", max_vcpu_id("vcpu 0", 8, KVM_MAX_VCPU_IDS), "ok,EINVAL,ok"),
    # KVM_SET_USER_MEMORY_REGION
    same("slot 0", memory_regions(SLOT0), "ok"),
    same("overlapping slots", memory_regions(SLOT0, (1, 0, 2 * P, 4 * P, 8 * P)), "ok,EEXIST"),
    same("unaligned gpa", memory_regions((1, 0, 0x100001, 4 * P, 0)), "EINVAL"),
    same("unaligned size", memory_regions((1, 0, 0x100000, 4 * P + 1, 0)), "EINVAL"),
    same("unaligned uaddr", memory_regions((1, 0, 0x100000, 4 * P, 1)), "EINVAL"),
    same("slot id 32763", memory_regions((32763, 0, 0, P, 0)), "ok"),
    same("slot id 32764", memory_regions((32764, 0, 0, P, 0)), "EINVAL"),
    same("slot id 0xffff", memory_regions((0xFFFF, 0, 0, P, 0)), "EINVAL"),
    same("slot in address space 1", address_space_one, "0,EINVAL"),
    same("flag READONLY", memory_regions((0, KVM_MEM_READONLY, 0, P, 0)), "ok"),
    same("flag GUEST_MEMFD", memory_regions((0, KVM_MEM_GUEST_MEMFD, 0, P, 0)), "EINVAL"),
    same("flag bit 3", memory_regions((0, 1 << 3, 0, P, 0)), "EINVAL"),
    same("flag bit 31", memory_regions((0, 1 << 31, 0, P, 0)), "EINVAL"),
    same("delete a missing slot", memory_regions((6, 0, 0, 0, 0)), "EINVAL"),
    same(
        "resize, move, re-point, re-flag a slot",
        memory_regions(
            SLOT0,
            (0, 0, 0, 8 * P, 0),
            (0, 0, 0x800000, 4 * P, 0),
            (0, 0, 0x800000, 4 * P, P),
            (0, KVM_MEM_READONLY, 0x800000, 4 * P, 0),
            (0, KVM_MEM_LOG_DIRTY_PAGES, 0x800000, 4 * P, 0),
        ),
        "ok,EINVAL,ok,EINVAL,EINVAL,ok",
    ),
    same("delete twice", memory_regions(SLOT0, (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)), "ok,ok,EINVAL"),
    same("gpa + size wraps", memory_regions((7, 0, (1 << 64) - P, 2 * P, 0)), "EINVAL"),
    same("slot of 2**31 pages", memory_regions((8, 0, 1 << 40, 1 << 43, 0)), "EINVAL"),
    differs(
        "slot past the memory's end",
        memory_regions((9, 0, 1 << 40, P, 1 << 30)),
        "EINVAL",
        "ok",
        MEMFD_NOT_ADDRESS,
    ),
    # KVM_MEMORY_ENCRYPT_OP and REG/UNREG_REGION on a plain VM
    *[
        same(f"SEV command {name} on a plain VM", memory_encrypt_op(cmd), "ENOTTY")
        for name, cmd in (
            ("LAUNCH_START", uapi.KVM_SEV_LAUNCH_START),
            ("GUEST_STATUS", uapi.KVM_SEV_GUEST_STATUS),
            ("SNP_LAUNCH_START", uapi.KVM_SEV_SNP_LAUNCH_START),
        )
    ],
    *[
        differs(
            f"SEV command {name} on a plain VM",
            memory_encrypt_op(cmd),
            stub,
            "ENOTTY",
            NO_SEV_IOCTL,
            "ENOTTY",
        )
        for name, cmd, stub in (
            ("INIT", uapi.KVM_SEV_INIT, "ok"),
            ("ES_INIT", uapi.KVM_SEV_ES_INIT, "ok"),
            ("SEND_UPDATE_VMSA", uapi.KVM_SEV_SEND_UPDATE_VMSA, "EINVAL"),
            ("50", 50, "EINVAL"),
            ("SNP_LAUNCH_UPDATE", uapi.KVM_SEV_SNP_LAUNCH_UPDATE, "EINVAL"),
        )
    ],
    same("REG_REGION on a plain VM", enc_region(True), "ENOTTY"),
    same("UNREG_REGION on a plain VM", enc_region(False), "ENOTTY"),
]

CASE_IDS = [case.name for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case names must be unique"


# --- the sides as fixtures -----------------------------------------------------------------


def _stop(daemon: KvmstubDaemon) -> None:
    daemon.process.terminate()
    assert daemon.process.wait(timeout=10) == 0, daemon.log()


@pytest.fixture(scope="module")
def stub_daemons() -> Iterator[dict[str, KvmstubDaemon]]:
    """One daemon per kvmstub side for the whole module: each case makes its own VMs and
    leaves the daemon empty (the `side` fixture waits for that); each must exit cleanly."""
    started: dict[str, KvmstubDaemon] = {}
    directories: list[str] = []
    try:
        for name, flags in (
            ("kvmstub", ()),
            ("kvmstub-without-sev", ("--sev-asids", "0", "--sev-es-asids", "0")),
        ):
            directories.append(tempfile.mkdtemp(prefix="kvmstub-"))  # short: a socket path
            started[name] = start_kvmstub_daemon(Path(directories[-1]), *flags)
        yield started
    finally:
        for daemon in started.values():
            _stop(daemon)
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MEMORY_PAGES * P)
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def usable_kvm() -> Iterator[rawkvm.RealKvm | str]:
    """The real /dev/kvm, or why it cannot be used (the `side` fixture skips then)."""
    kvm = rawkvm.usable_kvm()
    try:
        yield kvm
    finally:
        if not isinstance(kvm, str):
            kvm.close()


@pytest.fixture(params=["kvmstub", "kvmstub-without-sev", "kernel"])
def side_name(request: pytest.FixtureRequest, usable_kvm: rawkvm.RealKvm | str) -> str:
    """Which side a case runs on; "kernel" is skipped where /dev/kvm cannot be used."""
    if request.param == "kernel" and isinstance(usable_kvm, str):
        pytest.skip(f"no usable /dev/kvm here: {usable_kvm}")
    name: str = request.param
    return name


@pytest.fixture
async def side(
    side_name: str,
    stub_daemons: dict[str, KvmstubDaemon],
    memfd: int,
    usable_kvm: rawkvm.RealKvm | str,
) -> AsyncIterator[Side]:
    if side_name == "kernel":
        assert not isinstance(usable_kvm, str)
        kernel = KernelSide(usable_kvm, memfd)
        try:
            yield kernel
        finally:
            kernel.close()
        return
    daemon = stub_daemons[side_name]
    stub = StubSide(side_name, await client.open_kvm(daemon.socket), memfd)
    try:
        yield stub
    finally:
        stub.close()
    # Closed fds are released asynchronously; the next case must find the daemon empty.
    with trio.fail_after(10):
        while (await trio.to_thread.run_sync(client.read_stats, daemon.socket))["vms"]:
            await trio.sleep(0.005)


def expected(case: Case, side: str) -> str:
    if side == "kernel":
        return case.kernel
    if side == "kvmstub-without-sev" and case.kvmstub_without_sev is not None:
        return case.kvmstub_without_sev
    return case.kvmstub


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_each_side_answers_as_the_table_says(case: Case, side: Side) -> None:
    """The case's calls on one side give that side's column of the table."""
    with trio.fail_after(60):
        got = await case.run(side)
    assert got == expected(case, side.name), f"{case.name} on {side.name}"


def test_every_difference_has_a_cause_and_a_row_in_the_docs() -> None:
    """A case where kvmstub and the kernel answer differently says why, and
    docs/kernel-differences.md names it; a case where they agree has no cause to give."""
    doc = DIFFERENCES_DOC.read_text()
    for case in CASES:
        if case.kvmstub != case.kernel:
            assert case.why, f"{case.name}: kvmstub and the kernel differ with no cause given"
            assert f"| {case.name} |" in doc, f"{case.name}: no row in {DIFFERENCES_DOC.name}"
        else:
            assert not case.why, f"{case.name}: a cause for answers that agree"


# --- a second process: the kernel's kvm->mm rule ---------------------------------------------

FOREIGN_CHILD = Path(__file__).with_name("foreign_child.py")

# What the second process gets with the received fds (foreign_child.py), on both sides.
FOREIGN_EXPECTED = {
    "received kvm: KVM_CHECK_EXTENSION(MOVE)": "1",
    "received kvm: KVM_CREATE_VM, KVM_CREATE_VCPU": "ok,ok",
    "received vm: KVM_CREATE_VCPU": "EIO",
    "received vm: KVM_ENABLE_CAP(EXIT_HYPERCALL)": "EIO",
    "received vm: KVM_SET_USER_MEMORY_REGION": "EIO",
    "received vm: KVM_MEMORY_ENCRYPT_OP(GUEST_STATUS)": "EIO",
    "received vm: KVM_MEMORY_ENCRYPT_REG_REGION": "EIO",
    "received vm: MOVE into it": "EIO",
    "received vcpu: KVM_GET_REGS": "EIO",
    "received vcpu: KVM_RUN": "EIO",
    # Only the destination is gated: the received VM may be named as a source. It is not
    # SEV (kvmstub: EINVAL, step 5) and kvm_pvm has no MOVE hook (EINVAL): the same errno.
    "own vm: MOVE from the received vm": "EINVAL",
}


async def run_foreign_child(side: str, fds: list[int]) -> dict[str, str]:
    """Start foreign_child.py, send it `fds` (system, VM, vCPU) over SCM_RIGHTS, return its
    report."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = trio.socket.from_stdlib_socket(parent_end)
    with child_end:
        child = await trio.lowlevel.open_process(
            [sys.executable, str(FOREIGN_CHILD), side, str(child_end.fileno())],
            pass_fds=(child_end.fileno(),),
        )
    try:
        with trio.fail_after(CHILD_TIMEOUT):
            rights = array.array("i", fds)
            await sock.sendmsg([b"fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            report: dict[str, str] = json.loads(await sock.recv(65536))
            assert await child.wait() == 0
        return report
    finally:
        sock.close()
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_a_second_process_gets_eio_from_kvmstub_vm_and_vcpu_fds(
    stub_daemons: dict[str, KvmstubDaemon],
) -> None:
    """kvmstub: the parent's VM and vCPU fds, received over SCM_RIGHTS, give EIO for every
    VM and vCPU ioctl in the child, while the parent (their creator) still uses them."""
    daemon = stub_daemons["kvmstub"]
    kvm = await client.open_kvm(daemon.socket)
    vm = await kvm.create_vm()
    vcpu = await vm.create_vcpu(0)
    try:
        report = await run_foreign_child("kvmstub", [kvm.fileno(), vm.fileno(), vcpu.fileno()])
        assert report == FOREIGN_EXPECTED
        assert await answer(vcpu.get_regs()) == "ok"
        assert await answer(vm.create_vcpu(1)) == "ok"
    finally:
        for obj in (vcpu, vm, kvm):
            obj.close()


async def test_a_second_process_gets_eio_from_kernel_vm_and_vcpu_fds(
    real_kvm: rawkvm.RealKvm,
) -> None:
    """The real kernel: the same calls in the child give the same answers as on kvmstub."""
    vm = real_kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    report = await run_foreign_child("kernel", [real_kvm.fd, vm.fd, vcpu.fd])
    assert report == FOREIGN_EXPECTED
    assert len(vcpu.get_regs()) == 144  # the creator still may
    vm.create_vcpu(1)
