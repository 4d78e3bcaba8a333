"""The in-process test backend: `kvmstub.model` (the kernel stand-in's pure core) run inside
the calling process, with no daemon and no sockets, the way httpcore tests against a mock
backend. Two `ModelHypervisor`s over one `ModelKernel` are two VMM processes on one host:
each has its own `mm`, so the kernel's gates (only a VM's creator may drive it) hold between
them, and source and target can be driven against each other in one test.

A VM is still named by a real file descriptor (an empty memfd: an inode of its own), so it
can cross a real SCM_RIGHTS socketpair; the kernel finds the VM by the fd's inode, as the
daemon does.
A VM lives while any copy of its fd is open in this process, as `struct kvm` lives while any
file refers to it: the copies are counted from /proc/self/fd when one is closed.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import trio

from kvmstub import model, uapi

from .base import (
    ExitView,
    PeerVm,
    SevLaunch,
    VcpuState,
    VmState,
    mark_batch_failure,
    no_polling,
)
from .kvmstub import (
    SEV_API,
    refuse_vm_state,
    regs_state,
    state_regs,
    witness_image,
    witness_initial_state,
)

NAME = "kvmstub"  # the model *is* kvmstub's kernel: its state is kvmstub's, and moves to it


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class ModelKernel:
    """One host's kernel: a `kvmstub.model.Host` and the VMs its fds name."""

    def __init__(self, host: model.Host | None = None) -> None:
        self.host = host or model.Host()
        self._vms: dict[tuple[int, int], model.Vm] = {}
        self._released: set[tuple[int, int]] = set()  # the creator closed its copy
        self._mms = itertools.count(1000)

    def next_mm(self) -> int:
        return next(self._mms)

    def register(self, fd: int, vm: model.Vm) -> None:
        self._vms[_inode(fd)] = vm

    def vm_of_fd(self, fd: int) -> model.Vm | None:
        """The kernel's file_is_kvm(): the VM `fd` names, or None."""
        self.sweep()
        try:
            key = _inode(fd)
        except OSError:
            return None
        return self._vms.get(key)

    def released(self, key: tuple[int, int]) -> None:
        self._released.add(key)
        self.sweep()

    def sweep(self) -> None:
        """Drop the fd reference of every VM no fd of this process refers to any more."""
        if not self._released:
            return
        open_keys: set[tuple[int, int]] = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                open_keys.add(_inode(int(name)))
            except OSError:
                continue
        for key in list(self._released):
            if key not in open_keys:
                self._released.discard(key)
                vm = self._vms.pop(key, None)
                if vm is not None and not vm.destroyed:
                    vm.put()


class ModelVcpu:
    def __init__(self, kernel: ModelKernel, mm: int, vcpu: model.Vcpu, index: int) -> None:
        self._kernel = kernel
        self._mm = mm
        self._vcpu = vcpu
        self.index = index
        self._kicked = False
        self._io_data: bytes | None = None
        self._hypercall_ret: int | None = None
        self._closed = False

    def fileno(self) -> int:
        return -1  # an in-process vCPU has no fd of its own

    @property
    def run_in_flight(self) -> bool:
        return False

    def start_run(self) -> bool:
        return False

    def serve_exits_on_thread(self, handler: Callable[[ExitView], bool]) -> bool:
        return False

    def wait_returned(self, timeout: float) -> bool:
        return True

    def wait_entered(self, timeout: float) -> bool:
        return True

    def kick(self) -> None:
        self._kicked = True

    def unkick(self) -> None:
        self._kicked = False

    def complete_io(self, data: bytes) -> None:
        self._io_data = bytes(data)

    def complete_hypercall(self, ret: int) -> None:
        self._hypercall_ret = ret & uapi.U64_MASK

    async def run(self, *, immediate_exit: bool = False) -> uapi.RunExit:
        if self._closed:
            raise OSError(errno.EBADF, "vCPU fd was closed")
        io_data, ret = self._io_data, self._hypercall_ret
        self._io_data = self._hypercall_ret = None
        try:
            exit_ = self._vcpu.run(
                self._mm,
                immediate_exit=immediate_exit or self._kicked,
                io_data=io_data,
                hypercall_ret=ret,
                interrupted=lambda: self._kicked,
            )
        finally:
            await trio.lowlevel.checkpoint()
        return exit_

    async def get_state(self) -> VcpuState:
        await trio.lowlevel.checkpoint()
        return regs_state(self._vcpu.get_regs(self._mm))

    async def set_state(self, state: VcpuState) -> None:
        await trio.lowlevel.checkpoint()
        self._vcpu.set_regs(self._mm, state_regs(state))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._vcpu.put()


class ModelVm:
    def __init__(self, kernel: ModelKernel, mm: int, vm: model.Vm) -> None:
        self._kernel = kernel
        self._mm = mm
        self._vm = vm
        self._fd = os.memfd_create(f"kvm-vm-{vm.id}", os.MFD_CLOEXEC)  # an inode of its own
        self._key = _inode(self._fd)
        kernel.register(self._fd, vm)

    def fileno(self) -> int:
        return self._fd

    async def set_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, offset: int = 0
    ) -> None:
        await trio.lowlevel.checkpoint()
        self._vm.set_user_memory_region(self._mm, slot, 0, guest_phys_addr, size, fd, offset)

    async def create_vcpu(self, index: int) -> ModelVcpu:
        await trio.lowlevel.checkpoint()
        return ModelVcpu(self._kernel, self._mm, self._vm.create_vcpu(self._mm, index), index)

    async def enable_exit_hypercall(self) -> None:
        await trio.lowlevel.checkpoint()
        mask = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        self._vm.enable_cap(self._mm, uapi.KVM_CAP_EXIT_HYPERCALL, 0, [mask])

    def _sev(self, cmd: int, **fields: int | bytes) -> dict[str, int | bytes]:
        return self._vm.sev_ioctl(self._mm, cmd, fields)

    async def sev_init(self, *, es: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._sev(uapi.KVM_SEV_ES_INIT if es else uapi.KVM_SEV_INIT)

    async def sev_launch(self, image_len: int, policy: int, *, es: bool) -> SevLaunch:
        await trio.lowlevel.checkpoint()
        self._sev(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
        self._sev(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=image_len)
        if es:
            self._sev(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        measure = self._sev(uapi.KVM_SEV_LAUNCH_MEASURE)
        self._sev(uapi.KVM_SEV_LAUNCH_FINISH)
        status = self._sev(uapi.KVM_SEV_GUEST_STATUS)
        m = measure.get("measurement")
        return SevLaunch(
            measurement=m if isinstance(m, bytes) else None,
            status={k: v for k, v in status.items() if isinstance(v, int)},
        )

    async def move_enc_context_from(self, source: PeerVm) -> None:
        await trio.lowlevel.checkpoint()
        vm = self._kernel.vm_of_fd(source.fileno())
        self._vm.enable_cap(self._mm, uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, 0, [vm])

    async def get_vm_state(self) -> VmState | None:
        await trio.lowlevel.checkpoint()
        return None

    # ---- cross-host SEV migration (base.SevMigrationVm), as the daemon's client asks it
    async def set_dirty_logging(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, *, on: bool
    ) -> None:
        await trio.lowlevel.checkpoint()
        flags = uapi.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        self._vm.set_user_memory_region(self._mm, slot, flags, guest_phys_addr, size, fd, 0)

    async def get_dirty_log(self, slot: int, bitmap: bytearray) -> None:
        await trio.lowlevel.checkpoint()
        self._vm.get_dirty_log_runs(self._mm, slot).copy_to(bitmap)

    async def sev_send_start(
        self, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes
    ) -> tuple[bytes, int]:
        await trio.lowlevel.checkpoint()
        try:
            self._sev(uapi.KVM_SEV_SEND_START, session_len=0)
            raise OSError(errno.EPROTO, "SEND_START length query succeeded")
        except OSError as exc:
            if getattr(exc, "fw_error", None) != uapi.SEV_RET_INVALID_LEN:
                raise
            session_len = exc.fields["session_len"]  # type: ignore[attr-defined]
        out = self._sev(
            uapi.KVM_SEV_SEND_START,
            pdh_cert=pdh_cert,
            plat_certs=plat_certs,
            amd_certs=amd_certs,
            session_uaddr=1,
            session_len=session_len,
        )
        session, policy = out["session"], out["policy"]
        assert isinstance(session, bytes) and isinstance(policy, int)
        return session, policy

    async def sev_send_update_data(self, gpa: int) -> tuple[bytes, bytes]:
        await trio.lowlevel.checkpoint()
        out = self._sev(
            uapi.KVM_SEV_SEND_UPDATE_DATA,
            hdr_uaddr=1,
            hdr_len=52,
            guest_uaddr=gpa,
            guest_len=uapi.PAGE_SIZE,
            trans_uaddr=1,
            trans_len=uapi.PAGE_SIZE,
        )
        hdr, trans = out["hdr"], out["trans"]
        assert isinstance(hdr, bytes) and isinstance(trans, bytes)
        return hdr, trans

    async def sev_send_update_data_batch(self, gpas: Sequence[int]) -> list[tuple[bytes, bytes]]:
        done: list[tuple[bytes, bytes]] = []
        for index, gpa in enumerate(gpas):
            try:
                done.append(await self.sev_send_update_data(gpa))
            except OSError as exc:
                mark_batch_failure(exc, index, done)
                raise
        return done

    async def sev_send_finish(self) -> None:
        await trio.lowlevel.checkpoint()
        self._sev(uapi.KVM_SEV_SEND_FINISH)

    async def sev_send_cancel(self) -> None:
        await trio.lowlevel.checkpoint()
        self._sev(uapi.KVM_SEV_SEND_CANCEL)

    async def sev_receive_start(self, source_pdh: bytes, session: bytes, policy: int) -> int:
        await trio.lowlevel.checkpoint()
        out = self._sev(
            uapi.KVM_SEV_RECEIVE_START, handle=0, policy=policy, pdh=source_pdh, session=session
        )
        handle = out["handle"]
        assert isinstance(handle, int)
        return handle

    async def sev_receive_update_data(self, gpa: int, header: bytes, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._sev(
            uapi.KVM_SEV_RECEIVE_UPDATE_DATA,
            hdr=header,
            guest_uaddr=gpa,
            guest_len=len(data),
            trans=data,
        )

    async def sev_receive_update_data_batch(
        self, packets: Sequence[tuple[int, bytes, bytes]]
    ) -> None:
        for index, (gpa, header, data) in enumerate(packets):
            try:
                await self.sev_receive_update_data(gpa, header, data)
            except OSError as exc:
                mark_batch_failure(exc, index, [])
                raise

    async def sev_receive_finish(self) -> None:
        await trio.lowlevel.checkpoint()
        self._sev(uapi.KVM_SEV_RECEIVE_FINISH)

    async def sev_guest_status(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        status = self._sev(uapi.KVM_SEV_GUEST_STATUS)
        return {k: v for k, v in status.items() if isinstance(v, int)}

    async def set_vm_state(self, state: VmState) -> None:
        await trio.lowlevel.checkpoint()
        refuse_vm_state(state)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._kernel.released(self._key)


class ModelHypervisor:
    """One VMM process's view of a `ModelKernel` (its own `mm`)."""

    name = NAME
    sev_api = SEV_API

    def __init__(self, kernel: ModelKernel) -> None:
        self.kernel = kernel
        self.mm = kernel.next_mm()

    async def create_vm(self) -> ModelVm:
        await trio.lowlevel.checkpoint()
        return ModelVm(self.kernel, self.mm, self.kernel.host.create_vm(self.mm))

    def check_state(self, state: VcpuState) -> None:
        state_regs(state)

    def witness_image(
        self, vcpus: int, line_every: int, flip_every: int, *, idle_us: int = 0
    ) -> bytes:
        return witness_image(vcpus, line_every, flip_every, idle_us)

    def witness_initial_state(self, index: int) -> VcpuState:
        return witness_initial_state(index)

    def polling(self, seconds: float) -> AbstractContextManager[None]:
        return no_polling(seconds)

    def requests_made(self) -> int:
        return 0  # in-process: no requests to count

    # ---- the host's SEV platform (base.SevPlatform)
    async def sev_pdh_cert_export(self) -> tuple[bytes, bytes]:
        await trio.lowlevel.checkpoint()
        host = self.kernel.host
        try:
            host.sev_issue_cmd(uapi.SEV_PDH_CERT_EXPORT, {"pdh_cert_len": 0, "cert_chain_len": 0})
            raise OSError(errno.EPROTO, "PDH_CERT_EXPORT length query succeeded")
        except OSError as exc:
            if getattr(exc, "fw_error", None) != uapi.SEV_RET_INVALID_LEN:
                raise
            lengths: dict[str, int | bytes] = exc.fields  # type: ignore[attr-defined]
        out = host.sev_issue_cmd(
            uapi.SEV_PDH_CERT_EXPORT,
            {
                "pdh_cert_address": 1,
                "pdh_cert_len": lengths["pdh_cert_len"],
                "cert_chain_address": 1,
                "cert_chain_len": lengths["cert_chain_len"],
            },
        )
        pdh, chain = out["pdh_cert"], out["cert_chain"]
        assert isinstance(pdh, bytes) and isinstance(chain, bytes)
        return pdh, chain

    async def sev_amd_cert_chain(self) -> bytes:
        await trio.lowlevel.checkpoint()
        out = self.kernel.host.sev_issue_cmd(uapi.KVMSTUB_SEV_AMD_CERT_CHAIN, None)
        chain = out["amd_certs"]
        assert isinstance(chain, bytes)
        return chain

    def close(self) -> None:
        pass
