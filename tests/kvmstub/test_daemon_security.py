"""kvmstub as the security boundary it plays (the kernel): only a VM's creator drives it, a VM
is named only by an fd to it, and a private page's plaintext leaves kvmstub only through
DBG_DECRYPT of a guest whose policy allows debugging (SECURITY.md)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import trio

from kvmstub import client, guest, uapi

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
PARAMS = guest.GuestParams(vcpus=1)
PAGE = uapi.PAGE_SIZE


async def launch(
    kvm: client.Kvm, *, es: bool, policy: int
) -> tuple[client.Vm, list[client.Vcpu], int]:
    """A measured SEV (or SEV-ES) guest over a fresh memfd, as a VMM launches it."""
    size = max(guest.required_memory(PARAMS), 16 * PAGE)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    image = guest.build_launch_image(PARAMS)
    os.pwrite(memfd, image, 0)
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_ES_INIT if es else uapi.KVM_SEV_INIT)
    await vm.set_user_memory_region(0, 0, size, memfd)
    vcpus = [await vm.create_vcpu(0)]
    await vcpus[0].set_regs(guest.initial_regs(0))
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=len(image))
    if es:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
    return vm, vcpus, memfd


def chunks(data: bytes, size: int = 32) -> list[bytes]:
    """The non-trivial pieces of `data` (so an all-zero page proves nothing)."""
    out = [data[i : i + size] for i in range(0, len(data) - size + 1, size)]
    return [c for c in out if len(set(c)) > 4]


# --- only the creator drives a VM ----------------------------------------------------------------

_NON_CREATOR = """
import errno, json, os, socket, sys
from kvmstub import uapi, wire
vm_fd, vcpu_fd = int(sys.argv[1]), int(sys.argv[2])
def ask(fd, request, fds=()):
    s = socket.socket(fileno=os.dup(fd))
    s.settimeout(10)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
        __import__("array").array("i", fds))))] if fds else []
    s.sendmsg([wire.encode(request)], anc)
    reply = wire.decode_reply(s.recv(wire.MAX_DATAGRAM))
    s.detach()
    return getattr(reply, "errno", 0)
memfd = os.memfd_create("x"); os.ftruncate(memfd, 1 << 20)
out = {
    "create_vcpu": ask(vm_fd, wire.CreateVcpu(1, 1)),
    "set_memory": ask(vm_fd, wire.SetUserMemoryRegion(2, 1, 0, 1 << 30, 1 << 20), [memfd]),
    "dbg_decrypt": ask(vm_fd, wire.SevIoctl(3, uapi.KVM_SEV_DBG_DECRYPT,
                                            {"src_uaddr": 0, "len": 64})),
    "dbg_encrypt": ask(vm_fd, wire.SevIoctl(4, uapi.KVM_SEV_DBG_ENCRYPT,
                                            {"dst_uaddr": 0, "data": b"x" * 16})),
    "guest_status": ask(vm_fd, wire.SevIoctl(5, uapi.KVM_SEV_GUEST_STATUS, {})),
    "enable_cap": ask(vm_fd, wire.EnableCap(6, uapi.KVM_CAP_EXIT_HYPERCALL, 0, (1 << 12,))),
    "run": ask(vcpu_fd, wire.Run(7)),
    "get_regs": ask(vcpu_fd, wire.GetRegs(8)),
    "set_regs": ask(vcpu_fd, wire.SetRegs(9, wire.WireRegs())),
}
print(json.dumps(out))
"""


async def test_a_process_that_did_not_create_the_vm_gets_eio_for_every_vm_and_vcpu_call(
    kvmstub_daemon: Any,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm, vcpus, memfd = await launch(kvm, es=False, policy=0)
    try:
        fds = [vm.fileno(), vcpus[0].fileno()]
        done = subprocess.run(
            [sys.executable, "-c", _NON_CREATOR, *map(str, fds)],
            pass_fds=fds, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers = json.loads(done.stdout)
        assert answers == dict.fromkeys(answers, errno.EIO)
        # The creator still drives it: the refusals changed nothing.
        regs = await vcpus[0].get_regs()
        assert regs == guest.initial_regs(0)
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        kvm.close()
        os.close(memfd)


# --- a VM is named only by an fd ---------------------------------------------------------------


async def test_a_vm_cannot_be_named_by_its_number_only_by_an_fd_to_it(kvmstub_daemon: Any) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    source, vcpus, memfd = await launch(kvm, es=True, policy=uapi.SEV_POLICY_ES)
    dest = await kvm.create_vm()
    try:
        stats = kvmstub_daemon.stats()
        by_id = {vm["id"]: vm for vm in stats["vms"]}
        source_id = next(i for i, vm in by_id.items() if vm["asid"])
        # Every number that could name it: its id in `kvmstub stats`, the number of our fd to
        # it (meaningless in the daemon), an ASID. Sent as plain numbers: none is an fd.
        for number in {source_id, source.fileno(), by_id[source_id]["asid"], 0, 1, 2, 3}:
            assert await move_by_number(dest, number) == errno.EBADF, number
        after = {vm["id"]: vm for vm in kvmstub_daemon.stats()["vms"]}
        assert after[source_id]["asid"] == by_id[source_id]["asid"]  # the context stayed
        assert not after[source_id]["dead"]
        # With the fd, the same request moves it.
        vcpus.append(await dest.create_vcpu(0))
        await dest.enable_cap(MOVE, source)
        moved = {vm["id"]: vm for vm in kvmstub_daemon.stats()["vms"]}
        assert moved[source_id]["dead"]
    finally:
        for v in vcpus:
            v.close()
        for vm in (source, dest):
            vm.close()
        kvm.close()
        os.close(memfd)


async def move_by_number(dest: client.Vm, number: int) -> int:
    """MOVE with `number` as a plain argument and no fd: the errno (0 if it worked). The
    client sends a number that is not an fd of ours as a number; make sure it is not one."""
    while _is_fd(number):  # an fd of ours would be sent as that fd: not what is tested
        number += 1 << 20
    try:
        await dest.enable_cap(MOVE, number)
    except OSError as exc:
        return exc.errno or 0
    return 0


def _is_fd(number: int) -> bool:
    try:
        os.fstat(number)
    except OSError:
        return False
    return True


# --- no plaintext of a private page without DBG_DECRYPT permission ------------------------------


@pytest.mark.parametrize("es", [False, True], ids=["sev", "sev-es"])
async def test_guest_memory_the_vmm_maps_holds_only_ciphertext_of_private_pages(
    kvmstub_daemon: Any, es: bool
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    policy = uapi.SEV_POLICY_NODBG | (uapi.SEV_POLICY_ES if es else 0)
    vm, vcpus, memfd = await launch(kvm, es=es, policy=policy)
    try:
        image = guest.build_launch_image(PARAMS)
        for _ in range(50):  # let the guest write its journal (private) pages
            exit_ = await vcpus[0].run()
            if exit_.exit_reason == uapi.KVM_EXIT_IO and exit_.io is not None:
                if exit_.io.direction == uapi.KVM_EXIT_IO_IN:
                    vcpus[0].complete_io(b"\0" * exit_.io.size * exit_.io.count)
            elif exit_.exit_reason == uapi.KVM_EXIT_HYPERCALL:
                vcpus[0].complete_hypercall(0)
        memory = os.pread(memfd, 16 * PAGE, 0)
        assert memory[:PAGE] != image[:PAGE]
        leaked = [c for c in chunks(image) if c in memory]
        assert leaked == []
        # The journal pages were written (they are not zero), as ciphertext.
        assert any(memory[PAGE : 2 * PAGE])
        # NODBG: the firmware refuses to decrypt, and says so; no data comes back.
        with pytest.raises(OSError) as refused:
            await vm.sev_ioctl(uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=PAGE, len=64)
        assert refused.value.errno == errno.EIO
        if es:  # and SEV-ES keeps the registers in the encrypted VMSA
            with pytest.raises(OSError) as raised:
                await vcpus[0].get_regs()
            assert raised.value.errno == errno.EINVAL
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        kvm.close()
        os.close(memfd)


async def test_dbg_decrypt_is_the_one_way_to_plaintext_and_only_when_policy_allows(
    kvmstub_daemon: Any,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    image = guest.build_launch_image(PARAMS)
    results = {}
    for policy in (0, uapi.SEV_POLICY_NODBG):
        vm, vcpus, memfd = await launch(kvm, es=False, policy=policy)
        try:
            try:
                out = await vm.sev_ioctl(uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=0, len=64)
                results[policy] = out.get("data")
            except OSError as exc:
                results[policy] = exc.errno
            assert image[:64] not in os.pread(memfd, PAGE, 0)
        finally:
            for v in vcpus:
                v.close()
            vm.close()
            os.close(memfd)
    kvm.close()
    assert results[0] == image[:64]  # debugging allowed: the plaintext, on request
    assert results[uapi.SEV_POLICY_NODBG] == errno.EIO  # NODBG: refused


# --- fds of the wrong kind as guest memory ------------------------------------------------------


async def test_a_pipe_or_a_short_memfd_as_guest_memory_is_refused_and_nothing_is_kept(
    kvmstub_daemon: Any,
) -> None:
    def daemon_fds() -> int:
        return len(os.listdir(f"/proc/{kvmstub_daemon.pid}/fd"))

    kvm = await client.open_kvm(kvmstub_daemon.socket)
    vm = await kvm.create_vm()
    # Objects of earlier tests on this daemon may still be on their way out (a release is
    # seen within a hang-up poll): count once the daemon's fds have settled.
    before = -1
    while before != daemon_fds():
        before = daemon_fds()
        await trio.sleep(0.15)
    r, w = os.pipe()
    short = os.memfd_create("short", os.MFD_CLOEXEC)
    os.ftruncate(short, PAGE)
    try:
        refusals = {}
        for name, fd in (("pipe", r), ("short memfd", short)):
            with pytest.raises(OSError) as refused:
                await vm.set_user_memory_region(0, 0, 16 * PAGE, fd)
            refusals[name] = refused.value.errno
        # A pipe's read end under a writable slot: what the VMM's own mmap(2) would have said
        # (EACCES: not open for writing; test_hostile_slots checks this against /dev/kvm).
        assert refusals == {"pipe": errno.EACCES, "short memfd": errno.EINVAL}
        assert daemon_fds() == before  # the daemon closed its copies of both
        # The VM is unharmed: a proper memfd is accepted afterwards.
        good = os.memfd_create("good", os.MFD_CLOEXEC)
        os.ftruncate(good, 16 * PAGE)
        await vm.set_user_memory_region(0, 0, 16 * PAGE, good)
        os.close(good)
    finally:
        for fd in (r, w, short):
            os.close(fd)
        vm.close()
        kvm.close()
