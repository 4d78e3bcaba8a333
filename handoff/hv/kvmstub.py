"""The kvmstub backend: the kernel stand-in's daemon, reached over its socket.

The only module of handoff's product code that imports `kvmstub` (with `hv.model`, its
in-process twin for tests). A vCPU's state here is `struct kvm_regs`, which is all the witness
guest keeps in registers: the rest of its state is guest memory, which a handoff never copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import msgspec

from kvmstub import client, guest, uapi

from .base import ExitView, PeerVm, SevLaunch, StateMismatch, VcpuState, VmState, check_state

NAME = "kvmstub"
STATE_VERSION = 1  # VcpuState.blob: msgpack of kvmstub.uapi.Regs

_regs_encoder = msgspec.msgpack.Encoder()
_regs_decoder = msgspec.msgpack.Decoder(uapi.Regs)


def regs_state(regs: uapi.Regs) -> VcpuState:
    return VcpuState(backend=NAME, version=STATE_VERSION, blob=_regs_encoder.encode(regs))


def state_regs(state: VcpuState) -> uapi.Regs:
    check_state(state, NAME, STATE_VERSION)
    try:
        return _regs_decoder.decode(state.blob)
    except msgspec.DecodeError as exc:
        raise ValueError(
            f"vCPU state ({NAME} format {STATE_VERSION}) is malformed: {exc}"
        ) from None


def refuse_vm_state(state: VmState) -> None:
    """kvmstub's VMs have no VM-wide state: any `VmState` is another backend's."""
    raise StateMismatch(
        f"VM state from backend {state.backend!r} format {state.version} cannot be loaded by "
        f"backend {NAME!r}, whose VMs keep none; both VMMs of a handoff must run on the same "
        "kernel"
    )


def witness_image(vcpus: int, line_every: int, flip_every: int, idle_us: int = 0) -> bytes:
    """The witness guest's launch image as kvmstub's guest program reads it."""
    params = guest.GuestParams(
        vcpus=vcpus, line_every=line_every, flip_every=flip_every, idle_us=idle_us
    )
    return guest.build_launch_image(params)


def witness_initial_state(index: int) -> VcpuState:
    return regs_state(guest.initial_regs(index))


class KvmstubVcpu:
    """A kvmstub vCPU fd and its kvm_run page."""

    def __init__(self, vcpu: client.Vcpu, index: int) -> None:
        self._vcpu = vcpu
        self.index = index
        # The calls of every exit, bound once: the vCPU loop is the hot path.
        self.run = vcpu.run
        self.start_run = vcpu.start_run
        self.complete_io = vcpu.complete_io
        self.complete_hypercall = vcpu.complete_hypercall
        self.fileno = vcpu.fileno

    @property
    def run_in_flight(self) -> bool:
        return self._vcpu.run_in_flight

    def serve_exits_on_thread(self, handler: Callable[[ExitView], bool]) -> bool:
        return False

    def wait_returned(self, timeout: float) -> bool:
        return True

    def wait_entered(self, timeout: float) -> bool:
        return True  # the request went out in `start_run`: kvmstub's daemon runs it

    def kick(self) -> None:
        # kvmstub checks kvm_run's immediate_exit between guest steps: a slice in flight ends
        # at its next step and queued KVM_RUNs only deliver their completions.
        self._vcpu.kvm_run.immediate_exit = True

    def unkick(self) -> None:
        self._vcpu.kvm_run.immediate_exit = False

    async def get_state(self) -> VcpuState:
        return regs_state(await self._vcpu.get_regs())

    # ---- base.MigrationControlVcpu
    async def advertise_migration_control(self) -> None:
        features = 1 << uapi.KVM_FEATURE_HC_MAP_GPA_RANGE | 1 << uapi.KVM_FEATURE_MIGRATION_CONTROL
        await self._vcpu.set_cpuid2(uapi.kvm_cpuid_leaves(features))

    def complete_msr(self, error: int = 0) -> None:
        self._vcpu.complete_msr(error)

    async def set_state(self, state: VcpuState) -> None:
        await self._vcpu.set_regs(state_regs(state))

    def close(self) -> None:
        self._vcpu.close()


class KvmstubVm:
    def __init__(self, vm: client.Vm) -> None:
        self._vm = vm
        self.fileno = vm.fileno

    async def set_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, offset: int = 0
    ) -> None:
        await self._vm.set_user_memory_region(slot, guest_phys_addr, size, fd, offset)

    async def create_vcpu(self, index: int) -> KvmstubVcpu:
        return KvmstubVcpu(await self._vm.create_vcpu(index), index)

    async def enable_exit_hypercall(self) -> None:
        await self._vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)

    async def sev_init(self, *, es: bool) -> None:
        await self._vm.sev_ioctl(uapi.KVM_SEV_ES_INIT if es else uapi.KVM_SEV_INIT)

    async def sev_launch(self, image_len: int, policy: int, *, es: bool) -> SevLaunch:
        vm = self._vm
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=image_len)
        if es:
            await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        measure = await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
        status = await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
        m = measure.get("measurement")
        return SevLaunch(
            measurement=m if isinstance(m, bytes) else None,
            status={k: v for k, v in status.items() if isinstance(v, int)},
        )

    async def move_enc_context_from(self, source: PeerVm) -> None:
        await self._vm.enable_cap(uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, source.fileno())

    async def get_vm_state(self) -> VmState | None:
        return None  # kvmstub's VMs keep no state of their own besides their vCPUs'

    # ---- base.MigrationControlVm
    async def filter_migration_control(self) -> None:
        await self._vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_FILTER)
        only_it = uapi.MsrFilterRange(
            uapi.KVM_MSR_FILTER_WRITE, 1, uapi.MSR_KVM_MIGRATION_CONTROL, bytes(8)
        )
        await self._vm.set_msr_filter([only_it], flags=uapi.KVM_MSR_FILTER_DEFAULT_ALLOW)

    # ---- cross-host SEV migration (base.SevMigrationVm)
    async def set_dirty_logging(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, *, on: bool
    ) -> None:
        flags = uapi.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        await self._vm.set_user_memory_region(slot, guest_phys_addr, size, fd, 0, flags)

    async def get_dirty_log(self, slot: int, bitmap: bytearray) -> None:
        await self._vm.get_dirty_log(slot, bitmap)

    async def sev_send_start(
        self, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes
    ) -> tuple[bytes, int]:
        return await self._vm.sev_send_start(pdh_cert, plat_certs, amd_certs)

    async def sev_send_update_data(self, gpa: int) -> tuple[bytes, bytes]:
        return await self._vm.sev_send_update_data(gpa, uapi.PAGE_SIZE)

    async def sev_send_update_data_batch(self, gpas: Sequence[int]) -> list[tuple[bytes, bytes]]:
        return await self._vm.sev_send_update_data_batch(gpas, uapi.PAGE_SIZE)

    async def sev_send_finish(self) -> None:
        await self._vm.sev_send_finish()

    async def sev_send_cancel(self) -> None:
        await self._vm.sev_send_cancel()

    async def sev_receive_start(self, source_pdh: bytes, session: bytes, policy: int) -> int:
        return await self._vm.sev_receive_start(source_pdh, session, policy)

    async def sev_receive_update_data(self, gpa: int, header: bytes, data: bytes) -> None:
        await self._vm.sev_receive_update_data(gpa, header, data)

    async def sev_receive_update_data_batch(
        self, packets: Sequence[tuple[int, bytes, bytes]]
    ) -> None:
        await self._vm.sev_receive_update_data_batch(packets)

    async def sev_receive_finish(self) -> None:
        await self._vm.sev_receive_finish()

    async def sev_guest_status(self) -> dict[str, int]:
        status = await self._vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
        return {k: v for k, v in status.items() if isinstance(v, int)}

    async def set_vm_state(self, state: VmState) -> None:
        refuse_vm_state(state)

    def close(self) -> None:
        self._vm.close()


SEV_API = (uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR, uapi.SEV_BUILD)


class KvmstubHypervisor:
    name = NAME
    sev_api = SEV_API

    def __init__(self, kvm: client.Kvm, path: str) -> None:
        self._kvm = kvm
        self.path = path

    async def create_vm(self) -> KvmstubVm:
        return KvmstubVm(await self._kvm.create_vm())

    def check_state(self, state: VcpuState) -> None:
        state_regs(state)

    def witness_image(
        self, vcpus: int, line_every: int, flip_every: int, *, idle_us: int = 0
    ) -> bytes:
        return witness_image(vcpus, line_every, flip_every, idle_us)

    def witness_initial_state(self, index: int) -> VcpuState:
        return witness_initial_state(index)

    def polling(self, seconds: float) -> AbstractContextManager[None]:
        return client.polling(seconds)

    def requests_made(self) -> int:
        return client.requests_made()

    async def stats(self) -> dict[str, object]:
        return await self._kvm.stats()

    # ---- the host's SEV platform (base.SevPlatform)
    async def sev_pdh_cert_export(self) -> tuple[bytes, bytes]:
        return await self._kvm.sev_pdh_cert_export()

    async def sev_amd_cert_chain(self) -> bytes:
        return await self._kvm.sev_amd_cert_chain()

    def close(self) -> None:
        self._kvm.close()


async def open_kvmstub(path: str | os.PathLike[str]) -> KvmstubHypervisor:
    """Connect to `kvmstub serve` at `path`, with a message that says what to check."""
    try:
        kvm = await client.open_kvm(path)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot open kvmstub at {os.fspath(path)} ({exc.strerror or exc}); "
            "is `kvmstub serve` running there? (--kvm PATH)",
        ) from exc
    return KvmstubHypervisor(kvm, os.fspath(path))


def default_socket() -> str:
    """Where kvmstub's daemon listens unless `--kvm` says otherwise."""
    return client.default_socket()


def requests_made() -> int:
    """How many requests this process has sent to kvmstub (the benchmark counts them)."""
    return client.requests_made()


def read_stats(path: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """Blocking: kvmstub's statistics (VMs, vCPUs, ASIDs) on a connection of its own."""
    return client.read_stats(path, timeout)
