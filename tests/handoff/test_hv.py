"""The hypervisor interface: every backend keeps one contract (handoff.hv.base).

The same cases run on the kvmstub daemon (over its socket) and on the in-process model: the
witness guest boots and prints, a kick ends a run with EINTR, state round-trips and is refused
by another backend's format, and an SEV-ES context moves into another process's VM, after
which the old VM's KVM_RUN fails with EIO and the new one runs the guest on.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from handoff import protocol
from handoff.errors import Incompatible
from handoff.hv import Hypervisor, PeerVm, StateMismatch, Vcpu, VcpuState, Vm, abi, witness
from handoff.hv.kvmstub import open_kvmstub
from handoff.hv.model import ModelHypervisor, ModelKernel
from handoff.machine.devices import Devices
from handoff.migration import messages
from handoff.testing import KvmstubDaemon

MEMORY = 1 << 20  # one slot of 1 MiB: the witness guest needs a few pages
VCPUS = 2
SEV_ES_POLICY = 1 << 2  # SEV_POLICY_ES


@pytest.fixture(params=["model", "kvmstub"])
async def two_processes(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Hypervisor, Hypervisor]]:
    """Two VMM processes' handles on one host's kernel."""
    if request.param == "model":
        kernel = ModelKernel()
        yield ModelHypervisor(kernel), ModelHypervisor(kernel)
        return
    daemon: KvmstubDaemon = request.getfixturevalue("kvmstub_daemon")
    a = await open_kvmstub(daemon.socket)
    b = await open_kvmstub(daemon.socket)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def memfd() -> int:
    fd = os.memfd_create("hv-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEMORY)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


async def build(hv: Hypervisor, mem: int, *, es: bool | None) -> tuple[Vm, list[Vcpu]]:
    """A VM over `mem`; launched with the witness image unless `es` is None (a MOVE target)."""
    vm = await hv.create_vm()
    if es is not None and es:
        await vm.sev_init(es=True)
    await vm.set_memory_region(0, 0, MEMORY, mem)
    await vm.enable_exit_hypercall()
    vcpus = [await vm.create_vcpu(i) for i in range(VCPUS)]
    if es is not None:
        image = hv.witness_image(VCPUS, 2, 1)
        os.pwrite(mem, image, 0)
        for v in vcpus:
            await v.set_state(hv.witness_initial_state(v.index))
        if es:
            await vm.sev_launch(len(image), SEV_ES_POLICY, es=True)
    return vm, vcpus


async def serve_until(
    vcpus: list[Vcpu], devices: Devices, done: Callable[[], bool], max_runs: int = 20000
) -> None:
    """The smallest VMM loop: run each vCPU in turn and serve its exits."""
    for _ in range(max_runs):
        for v in vcpus:
            exit_ = await v.run()
            if exit_.exit_reason == abi.EXIT_IO and exit_.io is not None:
                data = devices.handle_io(v.index, exit_.io)
                if data is not None:
                    v.complete_io(data)
            elif exit_.exit_reason == abi.EXIT_HYPERCALL and exit_.hypercall is not None:
                hc = exit_.hypercall
                if hc.nr == abi.HC_MAP_GPA_RANGE:
                    ret = devices.shared.map_gpa_range(hc.args[0], hc.args[1], hc.args[2])
                else:
                    ret = -abi.ENOSYS
                v.complete_hypercall(ret & abi.U64_MASK)
            else:
                assert exit_.exit_reason == abi.EXIT_INTR, exit_
        assert devices.serial.panicked is None, devices.serial.panicked
        if done():
            return
    raise AssertionError("the guest did not get there")


def seqs(devices: Devices) -> dict[int, int]:
    return dict(devices.serial.last_seq)


async def test_backends_satisfy_the_interfaces(two_processes: tuple[Any, Any]) -> None:
    hv, _ = two_processes
    assert isinstance(hv, Hypervisor)
    from kvmstub import uapi

    assert hv.sev_api == (uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR, uapi.SEV_BUILD)  # query-sev
    mem = memfd()
    vm, vcpus = await build(hv, mem, es=None)
    try:
        assert isinstance(vm, Vm)
        assert all(isinstance(v, Vcpu) for v in vcpus)
        assert [v.index for v in vcpus] == list(range(VCPUS))
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        os.close(mem)


async def test_plain_witness_runs_and_its_state_round_trips(
    two_processes: tuple[Any, Any],
) -> None:
    hv, _ = two_processes
    mem = memfd()
    devices = Devices(None, VCPUS)
    vm, vcpus = await build(hv, mem, es=False)
    try:
        await serve_until(vcpus, devices, lambda: len(seqs(devices)) == VCPUS)
        state = await vcpus[0].get_state()
        assert state.backend == hv.name
        await vcpus[0].set_state(state)
        assert await vcpus[0].get_state() == state

        # A kick: the next run only delivers the completion (EINTR), until unkicked.
        vcpus[1].kick()
        with pytest.raises(OSError) as info:
            await vcpus[1].run()
        assert info.value.errno == errno.EINTR
        vcpus[1].unkick()
        before = seqs(devices)[1]
        await serve_until(vcpus, devices, lambda: seqs(devices)[1] > before)

        other = VcpuState(backend="kvm", version=1, blob=b"\0" * 8)
        with pytest.raises(StateMismatch, match="same kernel"):
            await vcpus[0].set_state(other)
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        os.close(mem)
        devices.close()


async def test_sev_es_context_moves_to_another_processes_vm(
    two_processes: tuple[Any, Any],
) -> None:
    old_hv, new_hv = two_processes
    mem = memfd()
    devices = Devices(None, VCPUS)
    old_vm, old_vcpus = await build(old_hv, mem, es=True)
    new_vm, new_vcpus = await build(new_hv, mem, es=None)
    try:
        await serve_until(old_vcpus, devices, lambda: len(seqs(devices)) == VCPUS)
        with pytest.raises(OSError) as info:
            await old_vcpus[0].get_state()  # SEV-ES: the registers are in the VMSA
        assert info.value.errno == errno.EINVAL

        for v in old_vcpus:  # park: deliver each pending completion, run nothing
            v.kick()
            with pytest.raises(OSError):
                await v.run()
        with PeerVm(os.dup(old_vm.fileno())) as named:  # as SCM_RIGHTS would give it
            await new_vm.move_enc_context_from(named)

        with pytest.raises(OSError) as info:
            await old_vcpus[0].run(immediate_exit=True)
        assert info.value.errno == errno.EIO  # the old VM no longer holds the guest

        moved = seqs(devices)
        await serve_until(
            new_vcpus, devices, lambda: all(seqs(devices)[i] > moved[i] for i in range(VCPUS))
        )
    finally:
        for v in old_vcpus + new_vcpus:
            v.close()
        old_vm.close()
        new_vm.close()
        os.close(mem)
        devices.close()


async def test_a_vm_fd_copy_keeps_the_model_vm_alive() -> None:
    """As in the kernel, a VM lives while any file refers to it: the source's escrow copy of
    a target's VM fd names it after the target closed its own."""
    kernel = ModelKernel()
    hv = ModelHypervisor(kernel)
    vm = await hv.create_vm()
    copy = os.dup(vm.fileno())
    vm.close()
    assert kernel.vm_of_fd(copy) is not None
    os.close(copy)
    kernel.sweep()
    assert not kernel.host.vms
    await trio.lowlevel.checkpoint()


def test_abi_and_witness_numbers_are_the_kernels() -> None:
    """hv.abi and hv.witness restate kvmstub's numbers without importing it: they must agree."""
    from guestprog import x86
    from kvmstub import guest, uapi

    assert (abi.EXIT_IO, abi.EXIT_HYPERCALL, abi.EXIT_SHUTDOWN, abi.EXIT_INTR) == (
        uapi.KVM_EXIT_IO,
        uapi.KVM_EXIT_HYPERCALL,
        uapi.KVM_EXIT_SHUTDOWN,
        uapi.KVM_EXIT_INTR,
    )
    assert (abi.IO_IN, abi.IO_OUT) == (uapi.KVM_EXIT_IO_IN, uapi.KVM_EXIT_IO_OUT)
    assert (abi.HC_MAP_GPA_RANGE, abi.ENOSYS, abi.EINVAL) == (
        uapi.KVM_HC_MAP_GPA_RANGE,
        uapi.KVM_ENOSYS,
        uapi.KVM_EINVAL,
    )
    assert (abi.MAP_GPA_RANGE_PAGE_SZ_4K, abi.MAP_GPA_RANGE_ENCRYPTED) == (
        uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
        uapi.KVM_MAP_GPA_RANGE_ENCRYPTED,
    )
    assert (abi.SEV_POLICY_ES, abi.SEV_POLICY_NOSEND) == (
        uapi.SEV_POLICY_ES,
        uapi.SEV_POLICY_NOSEND,
    )
    for name in ("UNINIT", "LUPDATE", "LSECRET", "RUNNING", "SUPDATE", "RUPDATE", "SENT"):
        assert getattr(abi, f"SEV_GUEST_STATE_{name}") == getattr(uapi, f"SEV_GUEST_STATE_{name}")
    assert (abi.PAGE_SIZE, abi.U64_MASK) == (uapi.PAGE_SIZE, uapi.U64_MASK)
    assert (witness.SERIAL_PORT, witness.DOORBELL_OUT_PORT, witness.DOORBELL_IN_PORT) == (
        uapi.SERIAL_PORT,
        uapi.DOORBELL_OUT_PORT,
        uapi.DOORBELL_IN_PORT,
    )
    for vcpus in (1, 4, 256):
        # Every kernel's witness fits: kvmstub's and the real KVM's x86 one.
        need = witness.required_memory(vcpus)
        assert need >= guest.required_memory(guest.GuestParams(vcpus))
        assert need >= x86.required_memory(vcpus)


async def test_state_crosses_protocol_1_and_2_as_kvm_regs(two_processes: tuple[Any, Any]) -> None:
    """A backend's state becomes the kvm_regs that protocol versions 1 and 2 carry, and back,
    unchanged; state of another backend is refused with a message, not sent as garbage."""
    hv, _ = two_processes
    requests = hv.requests_made()
    mem = memfd()
    devices = Devices(None, VCPUS)
    vm, vcpus = await build(hv, mem, es=False)
    try:
        await serve_until(vcpus, devices, lambda: len(seqs(devices)) == VCPUS)
        state = await vcpus[1].get_state()
        regs = messages.wire_regs(state)
        assert isinstance(regs, protocol.Regs) and regs.rbx == 1  # the vCPU index
        assert messages.regs_state(regs) == state
        await vcpus[1].set_state(messages.regs_state(regs))
        assert await vcpus[1].get_state() == state
        assert hv.requests_made() >= requests
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        os.close(mem)
        devices.close()
    other = VcpuState(backend="kvm", version=1, blob=b"")
    with pytest.raises(Incompatible, match="protocol 1 or 2"):
        messages.wire_regs(other)


def test_a_peer_vm_owns_its_fd_closes_it_once_and_then_names_nothing() -> None:
    r, w = os.pipe()
    os.close(w)
    peer = PeerVm(r)
    assert peer.fileno() == r and not peer.closed
    with peer:
        pass
    assert peer.closed
    with pytest.raises(OSError):
        os.fstat(r)  # closed (and not reused in between: nothing else opened a file)
    peer.close()  # a second close closes nothing (the number may name another file by now)
    with pytest.raises(ValueError, match="already closed"):
        peer.fileno()
