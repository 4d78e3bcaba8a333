"""The second process of test_differential's foreign-process tests (not a test module).

    python foreign_child.py kvmstub|kernel <socket fd>

Receives a /dev/kvm fd, a VM fd and a vCPU fd from its parent over SCM_RIGHTS on the socket,
makes the same calls on them on either side (kvmstub.client or raw ioctls), and sends back
what each call answered ("ok", an errno's name, or check_extension's value) as one JSON
object. The VM and vCPU are the parent's, so the kernel's `kvm->mm != current->mm` rule makes
their ioctls EIO here; the /dev/kvm fd has no such rule, and a VM made through it is ours.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import mmap
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import rawkvm

MOVE = 206  # KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
EXIT_HYPERCALL = 201  # KVM_CAP_EXIT_HYPERCALL
HC_MAP_GPA_RANGE_MASK = 1 << 12
GUEST_STATUS = 16  # KVM_SEV_GUEST_STATUS
PAGE = 4096


def receive_fds(sock: socket.socket, count: int) -> list[int]:
    _, ancdata, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(count * 4))
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    assert len(fds) == count, f"received {len(fds)} fds, expected {count}"
    return list(fds)


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "ok"


def kernel_report(fds: list[int], memfd: int) -> dict[str, str]:
    kvm = rawkvm.RealKvm(fds[0])
    received = rawkvm.RealVm(kvm, kvm.own(fds[1]))
    vcpu = rawkvm.RealVcpu(kvm.own(fds[2]))
    mapping = mmap.mmap(memfd, PAGE)
    view = (ctypes.c_char * PAGE).from_buffer(mapping)
    address = ctypes.addressof(view)
    try:
        own: list[rawkvm.RealVm] = []
        report = {
            "received kvm: KVM_CHECK_EXTENSION(MOVE)": str(kvm.check_extension(MOVE)),
            "received kvm: KVM_CREATE_VM, KVM_CREATE_VCPU": ",".join(
                (
                    outcome(lambda: own.append(kvm.create_vm())),
                    outcome(lambda: own[0].create_vcpu(0)),
                )
            ),
            "received vm: KVM_CREATE_VCPU": outcome(lambda: received.create_vcpu(1)),
            "received vm: KVM_ENABLE_CAP(EXIT_HYPERCALL)": outcome(
                lambda: received.enable_cap(EXIT_HYPERCALL, HC_MAP_GPA_RANGE_MASK)
            ),
            "received vm: KVM_SET_USER_MEMORY_REGION": outcome(
                lambda: received.set_user_memory_region(0, 0, 0, PAGE, address)
            ),
            "received vm: KVM_MEMORY_ENCRYPT_OP(GUEST_STATUS)": outcome(
                lambda: received.memory_encrypt_op(GUEST_STATUS)
            ),
            "received vm: KVM_MEMORY_ENCRYPT_REG_REGION": outcome(
                lambda: received.memory_encrypt_reg_region(0, PAGE)
            ),
            "received vm: MOVE into it": outcome(lambda: received.enable_cap(MOVE, own[0].fd)),
            "received vcpu: KVM_GET_REGS": outcome(vcpu.get_regs),
            "received vcpu: KVM_RUN": outcome(vcpu.run),
            "own vm: MOVE from the received vm": outcome(
                lambda: own[0].enable_cap(MOVE, received.fd)
            ),
        }
    finally:
        del view
        mapping.close()
        kvm.close()
    return report


async def kvmstub_report(fds: list[int], memfd: int) -> dict[str, str]:
    from kvmstub import client

    async def outcome_of(call: Awaitable[object]) -> str:
        try:
            await call
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        return "ok"

    kvm = client.Kvm(socket.socket(fileno=fds[0]))
    received = client.Vm.from_fd(fds[1])
    vcpu = client.Vcpu(socket.socket(fileno=fds[2]))
    objects: list[client.Kvm | client.Vm | client.Vcpu] = [kvm, received, vcpu]
    try:
        own = await kvm.create_vm()
        objects.append(own)
        created = "ok"
        try:
            objects.append(await own.create_vcpu(0))
        except OSError as e:
            created = errno.errorcode[e.errno or 0]
        return {
            "received kvm: KVM_CHECK_EXTENSION(MOVE)": str(await kvm.check_extension(MOVE)),
            "received kvm: KVM_CREATE_VM, KVM_CREATE_VCPU": f"ok,{created}",
            "received vm: KVM_CREATE_VCPU": await outcome_of(received.create_vcpu(1)),
            "received vm: KVM_ENABLE_CAP(EXIT_HYPERCALL)": await outcome_of(
                received.enable_cap(EXIT_HYPERCALL, HC_MAP_GPA_RANGE_MASK)
            ),
            "received vm: KVM_SET_USER_MEMORY_REGION": await outcome_of(
                received.set_user_memory_region(0, 0, PAGE, memfd)
            ),
            "received vm: KVM_MEMORY_ENCRYPT_OP(GUEST_STATUS)": await outcome_of(
                received.sev_ioctl(GUEST_STATUS)
            ),
            "received vm: KVM_MEMORY_ENCRYPT_REG_REGION": await outcome_of(
                received.memory_encrypt_reg_region(0, PAGE)
            ),
            "received vm: MOVE into it": await outcome_of(received.enable_cap(MOVE, own)),
            "received vcpu: KVM_GET_REGS": await outcome_of(vcpu.get_regs()),
            "received vcpu: KVM_RUN": await outcome_of(vcpu.run()),
            "own vm: MOVE from the received vm": await outcome_of(own.enable_cap(MOVE, received)),
        }
    finally:
        for obj in reversed(objects):
            obj.close()


def main(side: str, sock_fd: int) -> None:
    with socket.socket(fileno=sock_fd) as sock:
        fds = receive_fds(sock, 3)
        memfd = os.memfd_create("foreign-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, PAGE)
            if side == "kernel":
                report = kernel_report(fds, memfd)
            else:
                import trio

                report = trio.run(kvmstub_report, fds, memfd)
        finally:
            os.close(memfd)
        sock.send(json.dumps(report).encode())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
