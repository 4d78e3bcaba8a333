"""What the kernel selftest cannot show from one process, against a real kvmstub daemon:

- Two processes (reference section 4): a VM fd passed with SCM_RIGHTS to a real child
  process gives EIO there for every VM and vCPU ioctl (`kvm->mm != current->mm`), yet the
  child can name it as the source of a MOVE into its own VM; afterwards the parent's VM is
  dead (EIO) and the context, ASID and VMSAs are the child's.
- ASID conservation (reference section 2: KVM makes no firmware call and allocates nothing on
  MOVE): with one SEV-ES ASID on the host, a launched and running SEV-ES guest moves through
  five fresh VMs on that one ASID, while ES_INIT anywhere else gets EBUSY.
- Confidentiality (DESIGN.md: private pages are AES-XTS under the guest's VEK): the VMM's
  memfd holds ciphertext for private pages and plaintext for a page the guest shared;
  DBG_DECRYPT is refused under the NODBG policy (SEV status POLICY_FAILURE) and allowed
  without it; no reply and no statistic carries a private page's plaintext.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import sys
from collections.abc import Awaitable, Iterator
from typing import Any

import msgspec
import pytest
import trio

from kvmstub import client, guest, uapi

SelftestKvm = Any  # tests/kernel/conftest.py
KvmVm = Any  # tests/kernel/conftest.py
KvmstubDaemon = Any  # tests/conftest.py

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
NR_VCPUS = 4  # as sev_migrate_tests.c
CHILD_TIMEOUT = 30.0


async def ioctl_errno(call: Awaitable[object]) -> int:
    """0 if the ioctl succeeded, else its errno."""
    try:
        await call
    except OSError as e:
        assert e.errno is not None
        return e.errno
    return 0


async def sev_es_vm_create(kvm: SelftestKvm, nr_vcpus: int) -> KvmVm:
    """sev_migrate_tests.c's sev_vm_create(es=true): ES_INIT, vCPUs, launch with VMSAs."""
    vm = await kvm.vm_create_barebones()
    await vm.sev_es_vm_init()
    for i in range(nr_vcpus):
        await vm.vcpu_add(i)
    await vm.sev_vm_launch(uapi.SEV_POLICY_ES)
    return vm


# --- two processes ---------------------------------------------------------------------------

# The second process: receives the parent's VM fd and vCPU fd, tries them, moves the context
# into a VM of its own, reports errnos as JSON, and holds its VM until the parent says "bye".
CHILD = r"""
import array, json, os, socket, sys
import trio
from kvmstub import client, uapi

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM

async def errno_of(call):
    try:
        await call
    except OSError as e:
        return e.errno
    return 0

async def main(kvm_path, sock_fd, nr_vcpus):
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=sock_fd))
    _, ancdata, _, _ = await sock.recvmsg(16, socket.CMSG_SPACE(2 * 4))
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % 4])
    received = client.Vm.from_fd(fds[0])
    received_vcpu = client.Vcpu(socket.socket(fileno=fds[1]))
    kvm = await client.open_kvm(kvm_path)
    own = await kvm.create_vm()
    vcpus = [await own.create_vcpu(i) for i in range(nr_vcpus)]
    other = await kvm.create_vm()
    report = {
        "pid": os.getpid(),
        # VM and vCPU ioctls on the parent's objects: kvm->mm != current->mm
        "received_guest_status": await errno_of(
            received.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0)),
        "received_create_vcpu": await errno_of(received.create_vcpu(nr_vcpus)),
        "received_as_move_destination": await errno_of(received.enable_cap(MOVE, own)),
        "received_vcpu_get_regs": await errno_of(received_vcpu.get_regs()),
        "received_vcpu_run": await errno_of(received_vcpu.run()),
        # ... but the fd is a fine MOVE source: only the destination is gated
        "move_into_own_vm": await errno_of(own.enable_cap(MOVE, received)),
        # a moved-from VM is no longer SEV: as a source again, EINVAL
        "move_from_dead_source": await errno_of(other.enable_cap(MOVE, received)),
    }
    await sock.send(json.dumps(report).encode())
    assert await sock.recv(16) == b"bye"
    for obj in (received_vcpu, received, *vcpus, own, other, kvm):
        obj.close()
    sock.close()

trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


async def test_a_vm_fd_in_another_process_gives_eio_but_is_a_move_source_there(
    kvm: SelftestKvm,
) -> None:
    """A VM fd passed to a child process: its VM and vCPU ioctls fail with EIO there, MOVE
    from it into the child's own VM works, and the parent's VM is then dead (EIO) while
    the child's VM holds the context, the ASID and every VMSA."""
    parent_vm = await sev_es_vm_create(kvm, NR_VCPUS)
    # The parent, its creator, may use it: the child's EIOs come from the mm check.
    await parent_vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0)
    asid = (await kvm.vm_stats(parent_vm))["asid"]

    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = trio.socket.from_stdlib_socket(parent_end)
    with child_end:
        child = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-c",
                CHILD,
                str(kvm.daemon.socket),
                str(child_end.fileno()),
                str(NR_VCPUS),
            ],
            pass_fds=(child_end.fileno(),),
        )
    try:
        with trio.fail_after(CHILD_TIMEOUT):
            fds = array.array("i", [parent_vm.fd, parent_vm.vcpus[0].fileno()])
            await sock.sendmsg([b"vm"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            report = json.loads(await sock.recv(65536))

            assert report == {
                "pid": child.pid,
                "received_guest_status": errno.EIO,
                "received_create_vcpu": errno.EIO,
                "received_as_move_destination": errno.EIO,
                "received_vcpu_get_regs": errno.EIO,
                "received_vcpu_run": errno.EIO,
                "move_into_own_vm": 0,
                "move_from_dead_source": errno.EINVAL,
            }

            # The child's VM holds the context; the parent's VM is dead and plain.
            stats = await kvm.stats()
            child_vms = [v for v in stats["vms"] if v["creator"] == child.pid]
            holder = next(v for v in child_vms if v["mode"] != "plain")
            assert (holder["mode"], holder["asid"], holder["dead"]) == ("sev-es", asid, False)
            assert [v["protected"] for v in holder["vcpus"]] == [True] * NR_VCPUS
            parent_info = await kvm.vm_stats(parent_vm)
            assert (parent_info["mode"], parent_info["asid"], parent_info["dead"]) == (
                "plain",
                0,
                True,
            )
            assert stats["asids"]["sev_es"]["used"] == 1

            # Every VM and vCPU ioctl of the parent on its own, now dead, VM: EIO.
            vcpu = parent_vm.vcpus[0]
            assert await parent_vm.try_sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0) == (errno.EIO)
            assert await ioctl_errno(parent_vm.vm.create_vcpu(NR_VCPUS)) == errno.EIO
            assert await ioctl_errno(vcpu.get_regs()) == errno.EIO
            assert await ioctl_errno(vcpu.run()) == errno.EIO
            spare = await kvm.vm_create_barebones()
            assert await parent_vm.try_enable_cap(MOVE, spare.fd) == errno.EIO

            await sock.send(b"bye")
            assert await child.wait() == 0
    finally:
        sock.close()
        if child.returncode is None:
            child.kill()
            await child.wait()

    # The child exited: its VM (and with it the ASID) is gone although the parent still
    # holds the dead VM's fds.
    stats = await kvm.settle(
        lambda s: not any(v["creator"] == child.pid for v in s["vms"]), "the child's VMs gone"
    )
    assert stats["asids"]["sev_es"]["used"] == 0
    parent_vm.free()
    spare.free()
    await kvm.assert_nothing_left()


# --- a guest and a minimal VMM loop ------------------------------------------------------------


class GuestVmm:
    """The VMM side of a running guest program (kvmstub.guest): its memfd, the doorbell
    device (the running sum of the seq values the guest rings with) and the serial lines."""

    def __init__(self, params: guest.GuestParams) -> None:
        self.params = params
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, guest.required_memory(params))
        os.pwrite(self.memfd, guest.build_launch_image(params), 0)
        self.doorbell_sum = 0
        self.lines: list[bytes] = []
        self.exits: list[uapi.RunExit] = []  # every exit KVM_RUN returned

    def close(self) -> None:
        os.close(self.memfd)

    def page(self, gpa: int) -> bytes:
        """What the VMM sees in its own memory at guest page `gpa`."""
        return os.pread(self.memfd, uapi.PAGE_SIZE, gpa)

    def memory(self) -> bytes:
        return os.pread(self.memfd, guest.required_memory(self.params), 0)

    async def map_into(self, vm: KvmVm) -> None:
        await vm.vm.set_user_memory_region(0, 0, guest.required_memory(self.params), self.memfd)

    async def run(self, vcpu: client.Vcpu) -> uapi.RunExit:
        """One KVM_RUN; serves the doorbell and collects serial lines (the completion of an
        exit goes in with the next KVM_RUN, as in KVM). A hypercall is left to the caller."""
        exit_ = await vcpu.run()
        self.exits.append(exit_)
        io = exit_.io
        if exit_.exit_reason == uapi.KVM_EXIT_IO and io is not None:
            if io.port == uapi.SERIAL_PORT:
                self.lines.append(io.data)
                assert not io.data.startswith(b"PANIC"), io.data
            elif io.port == uapi.DOORBELL_OUT_PORT:
                self.doorbell_sum = (self.doorbell_sum + int.from_bytes(io.data, "little")) & (
                    0xFFFFFFFF
                )
            elif io.port == uapi.DOORBELL_IN_PORT:
                vcpu.complete_io(self.doorbell_sum.to_bytes(4, "little"))
        assert exit_.exit_reason != uapi.KVM_EXIT_SHUTDOWN, self.lines
        return exit_

    async def run_until_line(self, vcpu: client.Vcpu) -> bytes:
        """KVM_RUN until the guest prints a line; then complete that exit (immediate_exit),
        so that nothing is pending in this vCPU and the guest can move."""
        count = len(self.lines)
        with trio.fail_after(CHILD_TIMEOUT):
            while len(self.lines) == count:
                await self.run(vcpu)
        with pytest.raises(InterruptedError):
            await vcpu.run(immediate_exit=True)
        return self.lines[-1]


def seq_of(line: bytes) -> int:
    match = guest.LINE_PATTERN.fullmatch(line)
    assert match is not None, line
    return int(match.group(2))


@pytest.mark.kvmstub_args("--sev-es-asids", "1")
async def test_an_sev_es_guest_moves_through_five_vms_on_its_one_asid(kvm: SelftestKvm) -> None:
    """With one SEV-ES ASID on the host, a launched SEV-ES guest runs in five fresh VMs in
    turn, moved each time: the same ASID throughout, never a second one allocated or freed,
    its serial seq contiguous; ES_INIT in another VM meanwhile fails with EBUSY (the misc
    cgroup charge, reference section 1 step 6); once the guest is gone the ASID is free."""
    stats = await kvm.stats()
    assert stats["asids"]["sev_es"]["total"] == 1

    vmm = GuestVmm(guest.GuestParams(vcpus=1, line_every=5, flip_every=1 << 40))
    try:
        vm = await kvm.vm_create_barebones()
        await vm.sev_es_vm_init()
        vcpu = await vm.vcpu_add(0)
        await vmm.map_into(vm)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=uapi.SEV_POLICY_ES)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=uapi.PAGE_SIZE)
        await vcpu.set_regs(guest.initial_regs(0))
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE, handle=0)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
        asid = (await kvm.vm_stats(vm))["asid"]
        assert asid

        elsewhere = await kvm.vm_create_barebones()
        seqs = [seq_of(await vmm.run_until_line(vcpu))]
        holders = [vm]
        for _ in range(5):
            dst = await kvm.vm_create_barebones()
            dst_vcpu = await dst.vcpu_add(0)
            await vmm.map_into(dst)
            assert await dst.try_enable_cap(MOVE, holders[-1].fd) == 0
            holders.append(dst)
            seqs.append(seq_of(await vmm.run_until_line(dst_vcpu)))

            stats = await kvm.stats()
            assert stats["asids"]["sev_es"] == {
                "total": 1,
                "used": 1,
                "free": 0,
                "reclaim_pending": 0,  # nothing was freed: no second ASID, ever
            }
            by_id = {v["id"]: v for v in stats["vms"]}
            assert (by_id[dst.id]["mode"], by_id[dst.id]["asid"]) == ("sev-es", asid)
            assert all(by_id[h.id]["dead"] for h in holders[:-1])
            assert stats["firmware_guests"] == 1
            # The one ASID is held: another guest cannot have it.
            assert await elsewhere.try_sev_ioctl(uapi.KVM_SEV_ES_INIT) == errno.EBUSY
            assert (await kvm.vm_stats(elsewhere))["mode"] == "plain"

        assert seqs == list(range(seqs[0], seqs[0] + 6)), "the guest lost or repeated a line"

        for holder in holders:
            holder.free()
        stats = await kvm.settle_gone(*holders)
        assert stats["asids"]["sev_es"]["used"] == 0
        # The freed ASID is reusable (after the flush sev_alloc_asid does).
        await elsewhere.sev_es_vm_init()
        assert (await kvm.vm_stats(elsewhere))["asid"] == asid
        elsewhere.free()
    finally:
        vmm.close()


# --- confidentiality -------------------------------------------------------------------------

JOURNAL_GPA = 1 * uapi.PAGE_SIZE  # vCPU 0's journal (one vCPU)
FLIP_GPA = 2 * uapi.PAGE_SIZE  # vCPU 0's flip page (one vCPU)


async def launch_sev_guest(
    kvm: SelftestKvm, vmm: GuestVmm, policy: int, replies: list[object]
) -> tuple[KvmVm, client.Vcpu]:
    """An SEV (not ES) guest: INIT, vCPU 0, memory, LAUNCH_START, the image encrypted in
    place (LAUNCH_UPDATE_DATA), MEASURE, FINISH, MAP_GPA_RANGE exits on. Every reply goes
    into `replies`."""
    vm = await kvm.vm_create_barebones()
    await vm.sev_vm_init()
    vcpu = await vm.vcpu_add(0)
    await vmm.map_into(vm)
    replies.append(await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy))
    replies.append(await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=uapi.PAGE_SIZE))
    replies.append(await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE, handle=0))
    replies.append(await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH))
    replies.append(await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0))
    await vcpu.set_regs(guest.initial_regs(0))
    await vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
    return vm, vcpu


async def run_until_flip_page_shared(vmm: GuestVmm, vcpu: client.Vcpu) -> uapi.Regs:
    """Run until the guest has converted its flip page to shared and rewritten it (its
    first MAP_GPA_RANGE, completed with success); returns the registers then."""
    with trio.fail_after(CHILD_TIMEOUT):
        while True:
            exit_ = await vmm.run(vcpu)
            if exit_.exit_reason == uapi.KVM_EXIT_HYPERCALL:
                assert exit_.hypercall is not None
                regs = await vcpu.get_regs()
                if regs.r14 % 2 == 1:  # shared already: this call asks to make it private
                    return regs
                # Still private here: the memfd must not show the pattern.
                assert vmm.page(FLIP_GPA) != guest.flip_pattern(0, regs.r14)
                vcpu.complete_hypercall(0)


def private_plaintexts(vmm: GuestVmm, regs: uapi.Regs) -> dict[str, bytes]:
    """Distinctive plaintext of the guest's private pages."""
    image = guest.build_launch_image(vmm.params)
    journal = guest.journal_page(0, regs.rcx, regs.rdx)
    return {
        "image": image[:32],
        "journal": journal[:32],
        "private flip pattern": guest.flip_pattern(0, 0)[:64],
    }


@pytest.fixture
def vmm() -> Iterator[GuestVmm]:
    vmm = GuestVmm(guest.GuestParams(vcpus=1, line_every=1 << 40, flip_every=20))
    try:
        yield vmm
    finally:
        vmm.close()


async def test_the_memfd_shows_ciphertext_for_private_pages_and_plaintext_for_shared_ones(
    kvm: SelftestKvm, vmm: GuestVmm
) -> None:
    """After LAUNCH_UPDATE_DATA the image page in the VMM's memfd is ciphertext; after the
    guest runs, its journal page is ciphertext and its flip page, once shared, plaintext."""
    image = guest.build_launch_image(vmm.params)
    assert vmm.page(0) == image  # the VMM wrote it in the clear
    vm, vcpu = await launch_sev_guest(kvm, vmm, 0, [])
    assert vmm.page(0) != image
    assert guest.IMAGE_MAGIC not in vmm.memory()

    regs = await run_until_flip_page_shared(vmm, vcpu)
    assert vmm.page(FLIP_GPA) == guest.flip_pattern(0, regs.r14)  # shared: plaintext
    journal = guest.journal_page(0, regs.rcx, regs.rdx)
    assert regs.rcx > 0 and vmm.page(JOURNAL_GPA) != journal
    assert guest.JOURNAL_MAGIC not in vmm.memory()

    # The guest's own view (through its key) is the plaintext: DBG_DECRYPT, no NODBG.
    decrypted = await vm.sev_ioctl(
        uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=JOURNAL_GPA, len=uapi.PAGE_SIZE
    )
    assert decrypted["data"] == journal
    decrypted = await vm.sev_ioctl(uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=0, len=uapi.PAGE_SIZE)
    assert decrypted["data"] == image


@pytest.mark.parametrize("command", ["DBG_DECRYPT", "DBG_ENCRYPT"])
async def test_debug_commands_are_refused_with_policy_failure_under_nodbg(
    kvm: SelftestKvm, vmm: GuestVmm, command: str
) -> None:
    """Under the NODBG policy DBG_DECRYPT and DBG_ENCRYPT fail with EIO and SEV status
    POLICY_FAILURE, and guest memory is unchanged."""
    vm, _ = await launch_sev_guest(kvm, vmm, uapi.SEV_POLICY_NODBG, [])
    before = vmm.memory()
    with pytest.raises(OSError) as failure:
        if command == "DBG_DECRYPT":
            await vm.vm.sev_ioctl(uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=0, len=uapi.PAGE_SIZE)
        else:
            await vm.vm.sev_ioctl(uapi.KVM_SEV_DBG_ENCRYPT, dst_uaddr=0, data=b"x" * 16)
    assert failure.value.errno == errno.EIO
    assert failure.value.fw_error == uapi.SEV_RET_POLICY_FAILURE  # type: ignore[attr-defined]
    assert vmm.memory() == before


async def test_no_reply_or_statistic_carries_a_private_pages_plaintext(
    kvm: SelftestKvm, vmm: GuestVmm
) -> None:
    """A NODBG guest launched and run: the plaintext of its image, journal and private
    flip page appears in no reply the daemon sent, not in its statistics, its log, nor the
    VMM's memfd."""
    replies: list[object] = []
    vm, vcpu = await launch_sev_guest(kvm, vmm, uapi.SEV_POLICY_NODBG, replies)
    regs = await run_until_flip_page_shared(vmm, vcpu)
    replies.append(regs)
    replies.extend(vmm.exits)
    replies.append(await kvm.stats())
    replies.append(await kvm.vm_stats(vm))

    blob = msgspec.msgpack.encode(replies)  # bytes stay raw bytes in msgpack
    log = kvm.daemon.log().encode()
    memory = vmm.memory()
    for name, plaintext in private_plaintexts(vmm, regs).items():
        for where, data in (("replies", blob), ("daemon log", log), ("memfd", memory)):
            assert plaintext not in data, f"{name} plaintext in the {where}"
            assert plaintext.hex().encode() not in data, f"{name} plaintext (hex) in {where}"
    # And the page the guest shared is in the clear, as it must be for the VMM.
    assert guest.flip_pattern(0, regs.r14) in memory
