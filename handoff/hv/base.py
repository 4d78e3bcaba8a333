"""What a VMM's machine asks of a kernel: `Hypervisor`, `Vm`, `Vcpu`, and the opaque
`VcpuState` that crosses a handoff.

Every backend (kvmstub over its socket, the kvmstub model in-process for tests, and the real
/dev/kvm) keeps the kernel's conventions: failures are `OSError`s with the kernel's errno (EIO
from KVM_RUN: this VM no longer holds the guest; EINTR: the run was kicked before the guest was
entered), exits carry the kernel's exit reasons (`handoff.hv.abi`), and a VM is named to the
kernel by a file descriptor, which is what crosses SCM_RIGHTS in a handoff.

A vCPU's state (and a VM's own, `VmState`) is opaque above this layer: the backend that read it
is the only one that can write it back, and it says so (`VcpuState.backend`, `.version`), so a
target refuses state from another kernel with a message instead of loading garbage.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol, runtime_checkable

import msgspec


class VcpuState(msgspec.Struct, frozen=True, kw_only=True):
    """One vCPU's architectural state as its backend reads and writes it, opaque to every
    layer above `hv`. `version` is the backend's format, bumped when the blob changes."""

    backend: str
    version: int
    blob: bytes


class VmState(msgspec.Struct, frozen=True, kw_only=True):
    """A VM's own state besides its vCPUs' (the real KVM's PIT, PIC/IOAPIC, kvmclock), as its
    backend reads and writes it, opaque like `VcpuState`. Backends whose VMs have none (kvmstub)
    answer None for it."""

    backend: str
    version: int
    blob: bytes


class StateMismatch(ValueError):
    """A `VcpuState` written by another backend or format than the one asked to load it."""


def check_state(state: VcpuState, backend: str, version: int) -> None:
    """Refuse state this backend did not write, naming both sides."""
    if state.backend != backend or state.version != version:
        raise StateMismatch(
            f"vCPU state from backend {state.backend!r} format {state.version} cannot be "
            f"loaded by backend {backend!r} format {version}; both VMMs of a handoff must "
            "run on the same kernel"
        )


class PeerVm:
    """A VM another process created, held by the fd it sent us: a handoff's escrow, or the
    source of a context move. All a kernel lets us do with it is name it (its VM and vCPU
    ioctls are the creator's: EIO here). Owns its fd: `close` (or the `with` block) closes it
    once, and a closed handle refuses to name anything."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("this peer VM's fd is already closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PeerVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PeerVm(fd={self._fd})" if self._fd >= 0 else "PeerVm(closed)"


def check_vm_state(state: VmState, backend: str, version: int) -> None:
    """Refuse VM state this backend did not write, naming both sides."""
    if state.backend != backend or state.version != version:
        raise StateMismatch(
            f"VM state from backend {state.backend!r} format {state.version} cannot be "
            f"loaded by backend {backend!r} format {version}; both VMMs of a handoff must "
            "run on the same kernel"
        )


class IoExitView(Protocol):
    """kvm_run.io: `data` holds size*count bytes for OUT; IN's bytes go back with the next run."""

    @property
    def direction(self) -> int: ...
    @property
    def port(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def data(self) -> bytes: ...


class HypercallExitView(Protocol):
    """kvm_run.hypercall: `ret` goes back with the next run."""

    @property
    def nr(self) -> int: ...
    @property
    def args(self) -> tuple[int, int, int, int, int, int]: ...


class ExitView(Protocol):
    """One KVM_RUN's exit, in the kernel's terms (`handoff.hv.abi.EXIT_*`)."""

    @property
    def exit_reason(self) -> int: ...
    @property
    def io(self) -> IoExitView | None: ...
    @property
    def hypercall(self) -> HypercallExitView | None: ...


class SevLaunch(msgspec.Struct, frozen=True, kw_only=True):
    """What the SEV launch sequence reported: LAUNCH_MEASURE's digest, GUEST_STATUS."""

    measurement: bytes | None
    status: dict[str, int]


@runtime_checkable
class Vcpu(Protocol):
    """One vCPU of a `Vm`, created in index order (what a context move pairs vCPUs by)."""

    index: int

    def fileno(self) -> int: ...

    async def run(self, *, immediate_exit: bool = False) -> ExitView:
        """KVM_RUN: deliver the completion of the last exit, then run the guest until its next
        exit. With `immediate_exit` (or after `kick`), only the completion: EINTR."""
        ...

    @property
    def run_in_flight(self) -> bool:
        """A KVM_RUN started with `start_run` whose exit `run` has not collected yet."""
        ...

    def start_run(self) -> bool:
        """Start a KVM_RUN now, to be collected by the next `run` (a resume starts every
        vCPU's back to back). False where the backend cannot, or one is in flight."""
        ...

    def serve_exits_on_thread(self, handler: Callable[[ExitView], bool]) -> bool:
        """Where KVM_RUN is issued by a thread of this process, let that thread serve exits:
        it calls `handler(exit)` (holding the GIL, between two KVM_RUNs) for each exit, and
        on True issues the next KVM_RUN at once, which delivers the completion (`complete_io`
        from the handler); on False the exit goes to `run` as usual. A kick still ends the
        run: the next KVM_RUN returns EINTR to `run`. Returns whether the
        backend serves exits so (kvmstub's runs are served by its daemon: False)."""
        ...

    def wait_returned(self, timeout: float) -> bool:
        """After `kick`: wait, without holding the interpreter, until the KVM_RUN in flight
        has come back (to `run`), or `timeout` seconds pass; whether it has. Where a thread of
        this process serves exits (`serve_exits_on_thread`) it needs the interpreter to see
        the kick, and a caller that kept it (the pause going on) held the pause back by
        0.25 ms on the real KVM. Backends without such a thread: True."""
        ...

    def wait_entered(self, timeout: float) -> bool:
        """After `start_run`: wait, without holding the interpreter, until that KVM_RUN is
        issued to the kernel or `timeout` seconds pass; whether it was. Where the KVM_RUN is
        issued by a thread of this process, the thread needs the interpreter for a moment
        first, and a caller that keeps it (the event loop going on after a resume) held the
        vCPU back (the GIL's switch interval is 5 ms). Backends without such a thread: True."""
        ...

    def kick(self) -> None:
        """Make the KVM_RUN in flight end at once and the next ones not enter the guest
        (kvm_run.immediate_exit, plus whatever interrupts a running vCPU), until `unkick`."""
        ...

    def unkick(self) -> None: ...

    def complete_io(self, data: bytes) -> None:
        """IN data for the exit just served, handed to the kernel with the next run."""
        ...

    def complete_hypercall(self, ret: int) -> None: ...

    async def get_state(self) -> VcpuState: ...

    async def set_state(self, state: VcpuState) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Vm(Protocol):
    """One VM: its file descriptor is its name to the kernel (and what a handoff sends)."""

    def fileno(self) -> int: ...

    async def set_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, offset: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION over `fd` (the caller keeps its fd)."""
        ...

    async def create_vcpu(self, index: int) -> Vcpu: ...

    async def enable_exit_hypercall(self) -> None:
        """KVM_CAP_EXIT_HYPERCALL for MAP_GPA_RANGE (a guest flipping page encryption)."""
        ...

    async def sev_init(self, *, es: bool) -> None: ...

    async def sev_launch(self, image_len: int, policy: int, *, es: bool) -> SevLaunch:
        """LAUNCH_START, UPDATE_DATA over the image at GPA 0, UPDATE_VMSA (SEV-ES), MEASURE,
        FINISH, then GUEST_STATUS."""
        ...

    async def move_enc_context_from(self, source: PeerVm) -> None:
        """KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM: the encryption context of the VM `source` names
        moves into this one, which must not be SEV yet (the caller keeps `source`)."""
        ...

    async def get_vm_state(self) -> VmState | None:
        """The VM-wide state a successor must load besides every vCPU's (interrupt
        controllers, timers, clock), read with every vCPU stopped; None where the backend's
        VMs keep none."""
        ...

    async def set_vm_state(self, state: VmState) -> None:
        """Load what `get_vm_state` of the source VM read (refused: another backend's)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Hypervisor(Protocol):
    """One kernel, as a VMM process holds it open."""

    name: str
    # The SEV firmware's version as query-sev reports it: API major, API minor, build id.
    sev_api: tuple[int, int, int]

    async def create_vm(self) -> Vm: ...

    def witness_image(
        self, vcpus: int, line_every: int, flip_every: int, *, idle_us: int = 0
    ) -> bytes:
        """The witness guest's launch image for this kernel (placed at GPA 0). `idle_us`: the
        guest asks to idle that long after each line (an OUT to port 0x512, on both
        kernels' witness guests)."""
        ...

    def check_state(self, state: VcpuState) -> None:
        """Refuse, before anything is loaded, a vCPU state this kernel could not load:
        StateMismatch (another backend's or format) or ValueError (malformed). A handoff's
        target asks this of every state a Switchover carries, so a bad one is refused while
        the source still holds the guest."""
        ...

    def witness_initial_state(self, index: int) -> VcpuState:
        """vCPU `index`'s state before the witness guest's first instruction."""
        ...

    def polling(self, seconds: float) -> AbstractContextManager[None]:
        """Within it, answers are polled for up to `seconds` instead of slept for, where the
        backend can (a blackout's one request whose answer nothing else waits beside)."""
        ...

    def requests_made(self) -> int:
        """How many requests this process has made of the kernel so far (the benchmark counts
        those inside a handoff's pause); 0 where the backend does not count them."""
        ...

    def close(self) -> None: ...


def no_polling(seconds: float) -> AbstractContextManager[None]:
    """`Hypervisor.polling` for a backend that has nothing to poll."""
    return contextlib.nullcontext()


# ---- cross-host SEV migration (DESIGN section 8) ---------------------------------------------
#
# Not every kernel can do it: the real /dev/kvm backend here has no SEV, so these are separate
# interfaces, and the migration code asks `migration_vm()` / `sev_platform()` for them, which
# refuse by name where a backend has none.


def fw_error(exc: BaseException) -> int | None:
    """The SEV firmware status an `OSError(EIO)` from an SEV command carries (None if none)."""
    status = getattr(exc, "fw_error", None)
    return status if isinstance(status, int) else None


def batch_index(exc: BaseException) -> int | None:
    """Which command of a batch (`sev_send_update_data_batch`,
    `sev_receive_update_data_batch`) an `OSError` is the failure of: its position in the list
    (those before it ran, those after it did not). None: not a batch's failure."""
    index = getattr(exc, "batch_index", None)
    return index if isinstance(index, int) else None


def batch_done(exc: BaseException) -> list[tuple[bytes, bytes]]:
    """The packets `sev_send_update_data_batch` made before the command that failed."""
    done = getattr(exc, "batch_done", None)
    return list(done) if isinstance(done, list) else []


def mark_batch_failure(exc: OSError, index: int, done: list[tuple[bytes, bytes]]) -> None:
    """Mark `exc` as the failure of command `index` of a batch, after `done` (what
    `batch_index` and `batch_done` read): for backends that run a batch as single calls."""
    exc.batch_index = index  # type: ignore[attr-defined]
    exc.batch_done = done  # type: ignore[attr-defined]


@runtime_checkable
class DirtyLogVm(Protocol):
    """KVM_MEM_LOG_DIRTY_PAGES and KVM_GET_DIRTY_LOG: which pages the guest wrote."""

    async def set_dirty_logging(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, *, on: bool
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION again over the same slot, with or without
        KVM_MEM_LOG_DIRTY_PAGES (a live slot keeps its memory)."""
        ...

    async def get_dirty_log(self, slot: int, bitmap: bytearray) -> None:
        """KVM_GET_DIRTY_LOG (read and clear) into `bitmap`, the caller's buffer of the
        slot's ALIGN(npages, 64) / 8 bytes, every one of which is written: bit i = page i of
        the slot written by the guest since the last call (only the guest's writes, never
        the VMM's own). A buffer kept from round to round costs no allocation."""
        ...


@runtime_checkable
class SevMigrationVm(DirtyLogVm, Protocol):
    """The SEV firmware's SEND_* / RECEIVE_* commands of one VM (KVM_MEMORY_ENCRYPT_OP ids 8,
    9, 11, 12, 13, 15, 21). Failures are `OSError`: EIO with the firmware status in
    `fw_error` (see `fw_error()`), or the kernel's own errno."""

    async def sev_send_start(
        self, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes
    ) -> tuple[bytes, int]:
        """SEND_START towards the target platform's chain: (session blob, guest policy)."""
        ...

    async def sev_send_update_data(self, gpa: int) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA of one private page: (52-byte packet header, ciphertext)."""
        ...

    async def sev_send_update_data_batch(self, gpas: Sequence[int]) -> list[tuple[bytes, bytes]]:
        """SEND_UPDATE_DATA of each page, in order: one command per page, as the kernel
        takes them, which a backend may submit together. The packets, in order. A failure
        is the failing command's `OSError`, with `batch_index()` and `batch_done()`."""
        ...

    async def sev_send_finish(self) -> None: ...

    async def sev_send_cancel(self) -> None: ...

    async def sev_receive_start(self, source_pdh: bytes, session: bytes, policy: int) -> int:
        """RECEIVE_START on a VM that did KVM_SEV_INIT (`sev_init`): the new handle."""
        ...

    async def sev_receive_update_data(self, gpa: int, header: bytes, data: bytes) -> None: ...

    async def sev_receive_update_data_batch(
        self, packets: Sequence[tuple[int, bytes, bytes]]
    ) -> None:
        """RECEIVE_UPDATE_DATA of each (gpa, header, data), in order: one command per page,
        which a backend may submit together. A failure is the failing command's `OSError`
        with `batch_index()`: that page is unchanged, the packets after it not received."""
        ...

    async def sev_receive_finish(self) -> None: ...

    async def sev_guest_status(self) -> dict[str, int]:
        """GUEST_STATUS: handle, policy, state."""
        ...


@runtime_checkable
class SevPlatform(Protocol):
    """The host's SEV platform (/dev/sev), as a migration target hands its chain out."""

    async def sev_pdh_cert_export(self) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT: (PDH certificate, PEK || OCA || CEK)."""
        ...

    async def sev_amd_cert_chain(self) -> bytes:
        """ASK || ARK for this platform's chip (AMD's key server)."""
        ...


class NoSevMigration(OSError):
    """The kernel a VMM runs on cannot migrate SEV guests between hosts."""


def migration_vm(vm: Vm, backend: str) -> SevMigrationVm:
    """`vm` as a VM whose SEV guest can be sent or received, or `NoSevMigration`."""
    if not isinstance(vm, SevMigrationVm):
        raise NoSevMigration(
            errno.ENOTTY,
            f"the {backend} backend has no SEV SEND/RECEIVE commands or dirty log: cross-host "
            "SEV migration needs a kernel with SEV (kvmstub here)",
        )
    return vm


def sev_platform(hypervisor: Hypervisor) -> SevPlatform:
    """`hypervisor`'s SEV platform, or `NoSevMigration`."""
    if not isinstance(hypervisor, SevPlatform):
        raise NoSevMigration(
            errno.ENODEV,
            f"the {hypervisor.name} backend has no SEV platform (/dev/sev): it cannot be the "
            "target of a cross-host SEV migration",
        )
    return hypervisor


# ---- MSR_KVM_MIGRATION_CONTROL: the guest says when it may migrate ---------------------------
#
# KVM does not implement the MSR (reference section 2): a VMM advertises the feature in CPUID,
# filters the MSR so the guest's writes exit to it, and keeps the value itself. A guest writes 1
# once its shared-region reports are complete, 0 before it goes down (reboot, kexec): a VMM must
# refuse to migrate while it is 0.

MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1 << 0
EXIT_X86_WRMSR = 30


@runtime_checkable
class MigrationControlVm(Protocol):
    async def filter_migration_control(self) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR(KVM_MSR_EXIT_REASON_FILTER) and an MSR filter that sends
        the guest's writes of MSR_KVM_MIGRATION_CONTROL (and nothing else) to the VMM."""
        ...


@runtime_checkable
class MigrationControlVcpu(Protocol):
    async def advertise_migration_control(self) -> None:
        """KVM_SET_CPUID2 with KVM_FEATURE_HC_MAP_GPA_RANGE and KVM_FEATURE_MIGRATION_CONTROL,
        before the vCPU first runs."""
        ...

    def complete_msr(self, error: int = 0) -> None:
        """kvm_run.msr.error for the last MSR exit (non-zero: the guest takes #GP)."""
        ...


class MsrExitView(Protocol):
    """kvm_run.msr of a KVM_EXIT_X86_WRMSR."""

    @property
    def index(self) -> int: ...
    @property
    def data(self) -> int: ...
