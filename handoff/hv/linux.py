"""The Linux /dev/kvm backend: plain (non-SEV) x86-64 guests on the real kernel.

A VM here is a real KVM VM with the in-kernel PIC/IOAPIC/LAPIC and PIT, its memory the VMM's
memfds mapped MAP_SHARED by this module, each vCPU with its CPUID set at creation (the host's
KVM_GET_SUPPORTED_CPUID, with the vCPU's own APIC ID) and its kvm_run page mapped. The guest it
runs is the x86 witness of `guestprog.x86`; `required_memory(vcpus)` is what it needs.

KVM_RUN: each vCPU has a thread of its own that issues it (through ctypes, which releases the
GIL and never retries EINTR, unlike `fcntl.ioctl` on Python 3.14: reference/real-kvm.md section
3) and wakes the trio task that waits for the exit (measured on a nested 2-CPU host: about
50 us an exit less than `trio.to_thread.run_sync`). `kick` sets kvm_run.immediate_exit and
signals that thread with `KICK_SIGNAL`, whose handler does nothing (installed by `open_linux`
from the main thread): a vCPU in the guest leaves at once with EINTR, one about to enter does
not enter. Every other ioctl runs on the caller's thread.

State: `get_state`/`set_state` move a vCPU's whole architectural state as one opaque
`VcpuState` (raw kernel structs in tagged sections, see `_Tag`), in the orders of the
reference, section 2; `get_vm_state`/`set_vm_state` the VM's PIT, PIC and IOAPIC and kvmclock.
Both refuse state read under another CPUID table. Everything is read with every vCPU stopped
(`kick`, then the completion run) and loaded before the target's first KVM_RUN.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, NoReturn

import trio

from guestprog import x86

from . import linux_abi as abi
from .abi import EXIT_IO, IO_OUT
from .base import (
    ExitView,
    PeerVm,
    SevLaunch,
    StateMismatch,
    VcpuState,
    VmState,
    check_state,
    check_vm_state,
    no_polling,
)

log = logging.getLogger("handoff.hv.linux")

NAME = "linux"
STATE_VERSION = 1  # VcpuState.blob and VmState.blob: tagged raw kernel structs (`_Tag`)
KICK_SIGNAL = signal.SIGRTMIN  # what cloud-hypervisor kicks its vCPU threads with
DEFAULT_PATH = "/dev/kvm"
required_memory = x86.required_memory  # guest RAM the x86 witness uses, from GPA 0

_libc = ctypes.CDLL(None, use_errno=True)
_c_ioctl = _libc.ioctl
_c_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_c_ioctl.restype = ctypes.c_int
# The same ioctl called with the GIL held (ctypes.PyDLL): for a call that returns at once, such
# as a KVM_RUN with immediate_exit set, where letting the GIL go is the expensive part.
_c_ioctl_held = ctypes.PyDLL(None, use_errno=True).ioctl
_c_ioctl_held.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_c_ioctl_held.restype = ctypes.c_int

_SECTION = struct.Struct("<HHI")  # tag, 0, length
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MEMORY_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, uaddr
_ENABLE_CAP = struct.Struct("<II4Q64x")  # cap, flags, args[4], pad


class _Tag(enum.IntEnum):
    """A section of a state blob: one kernel struct, as its GET ioctl filled it."""

    CPUID_DIGEST = 1  # sha256 of the vCPU's CPUID table (not a kernel struct)
    MP_STATE = 2
    EVENTS = 3
    REGS = 4
    SREGS = 5
    SREGS2 = 6
    XSAVE = 7
    XCRS = 8
    MSRS = 9  # struct kvm_msrs with its entries
    DEBUGREGS = 10
    LAPIC = 11
    TSC_OFFSET = 12  # u64, KVM_VCPU_TSC_OFFSET
    ENTRY_SREGS = 13  # struct kvm_sregs of an entry state: merged into the vCPU's own
    PIT2 = 20
    CLOCK = 21
    IRQCHIP = 22  # struct kvm_irqchip, one section per chip (PIC master, slave, IOAPIC)


def _pack(sections: Iterable[tuple[_Tag, bytes | bytearray]]) -> bytes:
    return b"".join(_SECTION.pack(tag, 0, len(data)) + bytes(data) for tag, data in sections)


def _unpack(blob: bytes, what: str) -> list[tuple[_Tag, bytes]]:
    return [(tag, blob[at : at + length]) for tag, at, length in _sections_at(blob, what)]


def _sections_at(blob: bytes, what: str) -> list[tuple[_Tag, int, int]]:
    """Each section's tag, offset and length."""
    out: list[tuple[_Tag, int, int]] = []
    pos = 0
    size = len(blob)
    unpack = _SECTION.unpack_from
    while pos < size:
        if pos + _SECTION.size > size:
            raise ValueError(f"{what} ({NAME} format {STATE_VERSION}) is truncated")
        tag, _, length = unpack(blob, pos)
        pos += _SECTION.size
        if pos + length > size:
            raise ValueError(f"{what} ({NAME} format {STATE_VERSION}) is truncated")
        known = _TAGS.get(tag)
        if known is None:
            raise ValueError(f"{what} ({NAME} format {STATE_VERSION}) has unknown section {tag}")
        out.append((known, pos, length))
        pos += length
    return out


_TAGS = {int(tag): tag for tag in _Tag}  # (_Tag(n) costs microseconds a section)


_FIXED_SIZES = {
    _Tag.CPUID_DIGEST: 32,
    _Tag.MP_STATE: abi.MP_STATE_SIZE,
    _Tag.EVENTS: abi.EVENTS_SIZE,
    _Tag.REGS: abi.REGS_SIZE,
    _Tag.SREGS: abi.SREGS_SIZE,
    _Tag.SREGS2: abi.SREGS2_SIZE,
    _Tag.XCRS: abi.XCRS_SIZE,
    _Tag.DEBUGREGS: abi.DEBUGREGS_SIZE,
    _Tag.LAPIC: abi.LAPIC_SIZE,
    _Tag.TSC_OFFSET: 8,
    _Tag.ENTRY_SREGS: abi.SREGS_SIZE,
    _Tag.PIT2: abi.PIT2_SIZE,
    _Tag.CLOCK: abi.CLOCK_SIZE,
    _Tag.IRQCHIP: abi.IRQCHIP_SIZE,
}
MAX_MSRS = 1024  # far above any KVM_GET_MSR_INDEX_LIST (40 here)
_VCPU_TAGS = frozenset(_FIXED_SIZES) - {_Tag.PIT2, _Tag.CLOCK, _Tag.IRQCHIP} | {
    _Tag.XSAVE,
    _Tag.MSRS,
}
_VM_TAGS = frozenset({_Tag.CPUID_DIGEST, _Tag.PIT2, _Tag.CLOCK, _Tag.IRQCHIP})


def checked_sections(
    blob: bytes, what: str, *, xsave_size: int, vm: bool = False
) -> list[tuple[_Tag, bytes]]:
    """A state blob's sections, each checked to be exactly the size its kernel struct has (the
    kernel reads the struct's size from the ioctl number, or, for MSRs, from the count inside
    it: a short buffer would have it read past ours). A blob from a peer is untrusted."""
    return [
        (tag, blob[at : at + length])
        for tag, at, length in checked_offsets(blob, what, xsave_size=xsave_size, vm=vm)
    ]


def checked_offsets(
    blob: bytes, what: str, *, xsave_size: int, vm: bool = False
) -> list[tuple[_Tag, int, int]]:
    """`checked_sections` as each section's tag, offset and length."""
    sections = _sections_at(blob, what)
    allowed = _VM_TAGS if vm else _VCPU_TAGS
    seen: set[_Tag] = set()
    for tag, at, length in sections:
        if tag not in allowed:
            raise ValueError(f"{what} ({NAME} format {STATE_VERSION}) has no place for {tag.name}")
        if tag in seen and tag is not _Tag.IRQCHIP:
            raise ValueError(f"{what} ({NAME} format {STATE_VERSION}) holds {tag.name} twice")
        seen.add(tag)
        if tag is _Tag.XSAVE:
            want = xsave_size
        elif tag is _Tag.MSRS:
            count = _U32.unpack_from(blob, at)[0] if length >= 8 else -1
            if not 0 <= count <= MAX_MSRS:
                raise ValueError(f"{what} ({NAME} format {STATE_VERSION}): bad MSR count {count}")
            want = 8 + count * abi.MSR_ENTRY_SIZE
        else:
            want = _FIXED_SIZES[tag]
        if length != want:
            raise ValueError(
                f"{what} ({NAME} format {STATE_VERSION}): {tag.name} is {length} bytes, "
                f"the kernel's struct {want}"
            )
    return sections


SECTION_NAMES = {
    "mp_state": _Tag.MP_STATE,
    "events": _Tag.EVENTS,
    "regs": _Tag.REGS,
    "sregs": _Tag.SREGS2,
    "xsave": _Tag.XSAVE,
    "xcrs": _Tag.XCRS,
    "msrs": _Tag.MSRS,
    "debugregs": _Tag.DEBUGREGS,
    "lapic": _Tag.LAPIC,
    "tsc_offset": _Tag.TSC_OFFSET,
}


def state_without(state: VcpuState, *names: str) -> VcpuState:
    """`state` less some of its parts (`SECTION_NAMES`): a test's way to break a handoff the
    way a VMM that forgot them would (a target without "xsave" loses the guest's SSE state)."""
    check_state(state, NAME, STATE_VERSION)
    drop = {SECTION_NAMES[n] for n in names}
    if _Tag.SREGS2 in drop:
        drop.add(_Tag.SREGS)
    kept = [(t, d) for t, d in _unpack(state.blob, "vCPU state") if t not in drop]
    return VcpuState(backend=NAME, version=STATE_VERSION, blob=_pack(kept))


def state_sections(state: VcpuState | VmState) -> dict[str, int]:
    """Which structs a state holds and their sizes (for logs and tests)."""
    return {t.name.lower(): len(d) for t, d in _unpack(state.blob, "state")}


# ---------------------------------------------------------------------------- ioctl helpers


class _Counter:
    requests = 0


def _ioctl(fd: int, request: int, buf: bytearray, name: str) -> int:
    """An ioctl on a struct, in place; OSError with the ioctl's name on failure."""
    _Counter.requests += 1
    try:
        ret: int = fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        raise OSError(exc.errno, f"{name}: {os.strerror(exc.errno or 0)}") from None
    return ret


def _ioctl_arg(fd: int, request: int, arg: int, name: str) -> int:
    """An ioctl with an unsigned long argument (fcntl.ioctl would take a C int only)."""
    _Counter.requests += 1
    ret: int = _c_ioctl(fd, request, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def _noop_handler(signum: int, frame: object) -> None:
    """The kick signal's handler: its delivery is all a kick needs (KVM_RUN returns EINTR)."""


def install_kick_handler() -> None:
    """Give `KICK_SIGNAL` a no-op handler (not SIG_IGN, not SIG_DFL: an ignored signal does
    not interrupt KVM_RUN, a default one kills the process). Main thread only (Python's rule
    for signal handlers); a handler already installed by the application is kept."""
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"the linux backend needs a handler for signal {KICK_SIGNAL!r} to kick vCPUs; "
            "open it from the main thread"
        )
    signal.signal(KICK_SIGNAL, _noop_handler)


# ---------------------------------------------------------------------------- exits


class IoExit:
    __slots__ = ("count", "data", "direction", "port", "size")

    def __init__(self, direction: int, size: int, port: int, count: int, data: bytes) -> None:
        self.direction = direction
        self.size = size
        self.port = port
        self.count = count
        self.data = data


class HypercallExit:
    __slots__ = ("args", "nr")

    def __init__(self, nr: int, args: tuple[int, int, int, int, int, int]) -> None:
        self.nr = nr
        self.args = args


class Exit:
    __slots__ = ("exit_reason", "hypercall", "io")

    def __init__(
        self, exit_reason: int, io: IoExit | None = None, hypercall: HypercallExit | None = None
    ) -> None:
        self.exit_reason = exit_reason
        self.io = io
        self.hypercall = hypercall

    def __repr__(self) -> str:
        return f"Exit(reason={self.exit_reason}, io={self.io and vars_of(self.io)})"


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


_EXIT_HYPERCALL = 3
_HYPERCALL = struct.Struct("<7Q")


# ---------------------------------------------------------------------------- vCPU


class _Batch:
    """Jobs on several vCPUs' KVM_RUN threads at once (their state ioctls run in parallel, with
    the GIL released), and one wakeup of the waiting trio task when the last is done."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.lock = threading.Lock()
        self.done = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        if count == 0:
            self.done.set()

    def finished(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.done.set)


_PER_WORKER = 8  # vCPUs to a thread at least when their states are saved or loaded in parallel
_CPUS = len(os.sched_getaffinity(0))


async def _on_threads(
    vcpus: list[LinuxVcpu], fn: Callable[[LinuxVcpu, Any], Any], args: list[Any]
) -> list[Any]:
    """`fn(vcpu, arg)` for every stopped vCPU; the first failure is raised, in vCPU order.

    Split over as many threads as the process has CPUs, each taking at least `_PER_WORKER`
    vCPUs (measured on a nested 2-CPU host: a thread's wakeup costs as much as saving a few
    vCPUs, and with a thread per vCPU every ioctl's return waited for the GIL behind the
    others: 256 vCPUs took 90 ms to save and 133 to load, against 22 and 45 on one thread).
    The first share runs on the calling thread, the others on the KVM_RUN threads of stopped
    vCPUs, each ioctl with the GIL released (ctypes). Waits for every share even when
    cancelled (a share that outlived its caller could race the rollback's KVM_RUN): they are
    short."""
    count = len(vcpus)
    results: list[Any] = [None] * count
    errors: list[BaseException | None] = [None] * count
    workers = max(1, min(_CPUS, count // _PER_WORKER))
    shares = [list(range(k, count, workers)) for k in range(workers)]
    threads = [vcpus[share[0]]._thread for share in shares[1:]]
    if any(t is None for t in threads):
        shares, threads = [list(range(count))], []

    def work(share: list[int]) -> None:
        for i in share:
            try:
                results[i] = fn(vcpus[i], args[i])
            except BaseException as exc:  # handed to the caller
                errors[i] = exc
                return

    if not threads:
        # All on this thread: no trip through the scheduler inside the blackout (each was
        # 20 to 100 us here, with other tasks and processes about).
        work(shares[0])
        for err in errors:
            if err is not None:
                raise err
        return results
    batch = _Batch(len(threads))

    def job(share: list[int]) -> Callable[[], None]:
        def run() -> None:
            try:
                work(share)
            finally:
                batch.finished()

        return run

    for thread, share in zip(threads, shares[1:], strict=True):
        assert thread is not None
        thread.do(job(share))
    work(shares[0])
    with trio.CancelScope(shield=True):
        await batch.done.wait()
    for err in errors:
        if err is not None:
            raise err
    return results


def _waited(lock: threading.Lock, timeout: float) -> bool:
    """Whether `lock`, held until something happens, was let go within `timeout` seconds."""
    if not lock.acquire(timeout=max(timeout, 0.0)):
        return False
    lock.release()
    return True


def _let_go(lock: threading.Lock) -> None:
    """Say that it happened (`_waited`): only the thread that waits for nothing releases."""
    if lock.locked():
        lock.release()


class _RunThread:
    """The thread that issues one vCPU's KVM_RUNs, one per `go`."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.in_kvm_run = False
        self.closing = False
        self.errno = 0
        self.enter_ns = 0  # CLOCK_MONOTONIC as the last KVM_RUN was issued, and as it returned
        self.exit_ns = 0
        self._notify: Callable[[], None] = lambda: None
        # Serves an exit on this thread (True) so that the next KVM_RUN goes at once, without
        # the trip to the event loop and back; see `LinuxVcpu.serve_exits_on_thread`.
        self.serve: Callable[[], bool] | None = None
        # Where the next `go`'s first KVM_RUN records its "enter" time (a resume's, see
        # `LinuxVcpu.times`): from this thread, since with exits served here the event loop
        # may not hear of that run for a long while.
        self.record_enter: dict[str, int] | None = None
        self._job: Callable[[], None] | None = None
        self._go = threading.Semaphore(0)
        # Held while a KVM_RUN asked by `go` is not yet issued (`go`, `wait_entered`).
        self._entered = threading.Lock()
        # Held while that KVM_RUN (and the runs of exits served here) has not returned for
        # good (`wait_returned`).
        self._returned = threading.Lock()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        ident = self.thread.ident
        assert ident is not None
        self.ident = ident

    def go(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._entered.acquire(blocking=False)  # armed: released as the KVM_RUN is issued
        self._returned.acquire(blocking=False)  # and this one once it has returned
        self._go.release()

    def wait_entered(self, timeout: float) -> bool:
        """Until the KVM_RUN asked by the last `go` is issued, at most `timeout` seconds, with
        the GIL released (a lock's acquire)."""
        return _waited(self._entered, timeout)

    def wait_returned(self, timeout: float) -> bool:
        """Until the KVM_RUN asked by the last `go` has returned to the event loop's side (a
        kick's EINTR, or an exit not served here), at most `timeout` seconds, the GIL
        released."""
        return _waited(self._returned, timeout)

    def do(self, job: Callable[[], None]) -> None:
        """Run `job` on this thread next (its vCPU is stopped: no KVM_RUN in flight)."""
        self._job = job
        self._go.release()

    def _main(self) -> None:
        ioctl, fd, request, now = _c_ioctl, self.fd, abi.KVM_RUN, time.monotonic_ns
        while True:
            self._go.acquire()
            job = self._job
            if job is not None:
                self._job = None
                job()  # it reports its own outcome (`_Batch`)
                continue
            if self.closing:
                return
            self.enter_ns = now()  # the first KVM_RUN of this `go`
            record, self.record_enter = self.record_enter, None
            if record is not None:
                record["enter"] = self.enter_ns
            while True:
                self.in_kvm_run = True
                _let_go(self._entered)
                ret = ioctl(fd, request, 0)
                self.exit_ns = now()
                self.in_kvm_run = False
                self.errno = ctypes.get_errno() if ret < 0 else 0
                serve = self.serve
                if ret < 0 or serve is None or self.closing or not serve():
                    break
            _let_go(self._returned)
            with contextlib.suppress(trio.RunFinishedError):
                self._notify()

    def stop(self) -> None:
        self.closing = True
        self._go.release()
        self.thread.join()


_MSR_KVM_SYSTEM_TIME = (0x12, 0x4B564D01)  # kvmclock's MSRs, old and new; bit 0: enabled


def _kvmclock_on(msrs: bytes) -> bool:
    """Whether a struct kvm_msrs shows the guest's kvmclock enabled (KVMCLOCK_CTRL fails with
    EINVAL otherwise); True where it holds neither MSR (then nobody knows)."""
    seen = False
    for index in _MSR_KVM_SYSTEM_TIME:
        key = _U64.pack(index)  # the entry's index and its reserved zero
        at = msrs.find(key, 8)
        while at >= 0 and (at - 8) % abi.MSR_ENTRY_SIZE:
            at = msrs.find(key, at + 1)
        if at >= 0:
            seen = True
            if _U64.unpack_from(msrs, at + 8)[0] & 1:
                return True
    return not seen


_LOAD_ORDER = (
    (_Tag.SREGS2, abi.KVM_SET_SREGS2, "KVM_SET_SREGS2"),
    (_Tag.SREGS, abi.KVM_SET_SREGS, "KVM_SET_SREGS"),
    (_Tag.ENTRY_SREGS, abi.KVM_SET_SREGS, "KVM_SET_SREGS"),
    (_Tag.REGS, abi.KVM_SET_REGS, "KVM_SET_REGS"),
    # The whole XSAVE2-sized buffer goes to KVM_SET_XSAVE (there is no SET_XSAVE2).
    (_Tag.XSAVE, abi.KVM_SET_XSAVE, "KVM_SET_XSAVE"),
    (_Tag.XCRS, abi.KVM_SET_XCRS, "KVM_SET_XCRS"),
    (_Tag.LAPIC, abi.KVM_SET_LAPIC, "KVM_SET_LAPIC"),
    (_Tag.MSRS, abi.KVM_SET_MSRS, "KVM_SET_MSRS"),
    (_Tag.EVENTS, abi.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS"),
    (_Tag.MP_STATE, abi.KVM_SET_MP_STATE, "KVM_SET_MP_STATE"),
    (_Tag.DEBUGREGS, abi.KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS"),
)
"""`set_state`'s order before the TSC offset (reference section 2, see there)."""


class _SaveLayout:
    """A vCPU state blob laid out once (section headers, the CPUID digest and the MSR indices
    in place), and the GET ioctls that fill its structs where they lie, in the save order."""

    def __init__(self, vcpu: LinuxVcpu) -> None:
        hv = vcpu._hv
        self.msrs_request = hv.msrs_request
        self.msr_count = len(hv.msr_indices)
        xsave = (abi.KVM_GET_XSAVE2, hv.xsave2_size, "KVM_GET_XSAVE2")
        sregs = (
            (_Tag.SREGS2, abi.KVM_GET_SREGS2, abi.SREGS2_SIZE, "KVM_GET_SREGS2")
            if hv.has_sregs2
            else (_Tag.SREGS, abi.KVM_GET_SREGS, abi.SREGS_SIZE, "KVM_GET_SREGS")
        )
        specs: list[tuple[_Tag, int, int, str]] = [
            (_Tag.CPUID_DIGEST, 0, 32, ""),
            (_Tag.MP_STATE, abi.KVM_GET_MP_STATE, abi.MP_STATE_SIZE, "KVM_GET_MP_STATE"),
            (_Tag.EVENTS, abi.KVM_GET_VCPU_EVENTS, abi.EVENTS_SIZE, "KVM_GET_VCPU_EVENTS"),
            (_Tag.REGS, abi.KVM_GET_REGS, abi.REGS_SIZE, "KVM_GET_REGS"),
            sregs,
            (_Tag.XSAVE, *xsave)
            if hv.xsave2_size
            else (_Tag.XSAVE, abi.KVM_GET_XSAVE, abi.XSAVE_SIZE, "KVM_GET_XSAVE"),
        ]
        if hv.has_xcrs:
            specs.append((_Tag.XCRS, abi.KVM_GET_XCRS, abi.XCRS_SIZE, "KVM_GET_XCRS"))
        specs += [
            (_Tag.MSRS, abi.KVM_GET_MSRS, len(self.msrs_request), "KVM_GET_MSRS"),
            (_Tag.DEBUGREGS, abi.KVM_GET_DEBUGREGS, abi.DEBUGREGS_SIZE, "KVM_GET_DEBUGREGS"),
            (_Tag.LAPIC, abi.KVM_GET_LAPIC, abi.LAPIC_SIZE, "KVM_GET_LAPIC"),
        ]
        if vcpu.has_tsc_offset:
            specs.append((_Tag.TSC_OFFSET, abi.KVM_GET_DEVICE_ATTR, 8, "KVM_GET_DEVICE_ATTR"))
        self.blob = bytearray(sum(_SECTION.size + size for _, _, size, _ in specs))
        self._keep = (ctypes.c_char * len(self.blob)).from_buffer(self.blob)
        base = ctypes.addressof(self._keep)
        self.calls: list[tuple[int, int, str]] = []
        pos = 0
        for tag, request, size, name in specs:
            _SECTION.pack_into(self.blob, pos, tag, 0, size)
            pos += _SECTION.size
            if tag is _Tag.CPUID_DIGEST:
                self.blob[pos : pos + size] = vcpu.cpuid_digest
            elif tag is _Tag.MSRS:
                self.blob[pos : pos + size] = self.msrs_request
            if tag is _Tag.TSC_OFFSET:
                # KVM_GET_DEVICE_ATTR writes the offset where the attr's addr points: here.
                self._attr = bytearray(
                    abi.DEVICE_ATTR.pack(
                        0, abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET, base + pos
                    )
                )
                self._attr_keep = (ctypes.c_char * len(self._attr)).from_buffer(self._attr)
                self.calls.append((request, ctypes.addressof(self._attr_keep), name))
            elif request:
                self.calls.append((request, base + pos, name))
            pos += size


class LinuxVcpu:
    """A vCPU fd, its kvm_run page and its KVM_RUN thread."""

    def __init__(self, vm: LinuxVm, index: int, fd: int, run: mmap.mmap) -> None:
        self._vm = vm
        self._hv = vm.hypervisor
        self.index = index
        self._fd = fd
        self._run = run
        self._thread: _RunThread | None = None
        self._in_flight = False
        self._done: trio.Event | None = None
        self._kicked = False
        self._io_offset = 0
        self._tsc_value = ctypes.c_uint64(0)  # KVM_{GET,SET}_DEVICE_ATTR read/write it here
        self._tsc_attr = bytearray(
            abi.DEVICE_ATTR.pack(
                0,
                abi.KVM_VCPU_TSC_CTRL,
                abi.KVM_VCPU_TSC_OFFSET,
                ctypes.addressof(self._tsc_value),
            )
        )
        self.has_tsc_offset = False
        self.cpuid_digest = b""
        # The last pause and resume, in CLOCK_MONOTONIC ns (comparable across processes):
        # kick, out (its KVM_RUN returned), save0/save1, restore0/restore1, go (the resume's
        # KVM_RUN issued), enter (the thread entered it), first_exit. `Vmm` reports them.
        self.times: dict[str, int] = {}
        self._first_run = False
        self._layout: _SaveLayout | None = None
        self.kvmclock_on = True  # as the last state loaded says (`_kvmclock_on`)

    def fileno(self) -> int:
        return self._fd

    # ------------------------------------------------------------ running
    @property
    def run_in_flight(self) -> bool:
        return self._in_flight

    def start_run(self) -> bool:
        if self._in_flight or self._fd < 0:
            return False
        self._begin()
        return True

    def start_thread(self) -> _RunThread:
        thread = self._thread
        if thread is None:
            thread = self._thread = _RunThread(self._fd, f"vcpu{self.index}")
        return thread

    def _begin(self) -> None:
        thread = self.start_thread()
        done = self._done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        self._in_flight = True
        if self._first_run:
            self.times["go"] = time.monotonic_ns()
            thread.record_enter = self.times
        _Counter.requests += 1
        thread.go(lambda: token.run_sync_soon(done.set))

    async def run(self, *, immediate_exit: bool = False) -> Exit:
        if self._fd < 0:
            raise OSError(errno.EBADF, "KVM_RUN: the vCPU was closed")
        if immediate_exit and not self._in_flight:
            return await self._complete_only()
        # With immediate_exit and a run in flight (`start_run`), that run is the one: a kick
        # ends it, and it delivered the completion on entry.
        if not self._in_flight:
            self._begin()
        thread, done = self._thread, self._done
        assert thread is not None and done is not None
        await done.wait()
        self._in_flight = False
        if self._kicked:
            self.times["out"] = thread.exit_ns
        elif self._first_run:
            self._first_run = False
            self.times["first_exit"] = thread.exit_ns
        if self._fd < 0:
            raise OSError(errno.EBADF, "KVM_RUN: the vCPU was closed")
        err = thread.errno
        if err:
            raise OSError(err, f"KVM_RUN: {os.strerror(err)}")
        return self._exit()

    async def _complete_only(self) -> Exit:
        """KVM_RUN with immediate_exit: the last exit's completion, no guest instruction. No
        trip through the scheduler: a pause completes every vCPU's exit this way."""
        run = self._run
        run[abi.RUN_IMMEDIATE_EXIT] = 1
        try:
            _Counter.requests += 1
            if _c_ioctl_held(self._fd, abi.KVM_RUN, 0) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"KVM_RUN: {os.strerror(err)}")
        finally:
            run[abi.RUN_IMMEDIATE_EXIT] = 1 if self._kicked else 0
            if self._kicked:
                self.times["out"] = time.monotonic_ns()
        return self._exit()  # not reached on a kernel that honours immediate_exit

    def _exit(self) -> Exit:
        run = self._run
        reason: int = _U32.unpack_from(run, abi.RUN_EXIT_REASON)[0]
        if reason == EXIT_IO:
            direction, size, port, count, offset = abi.IO_STRUCT.unpack_from(run, abi.RUN_IO)
            self._io_offset = offset
            data = run[offset : offset + size * count] if direction == IO_OUT else b""
            return Exit(reason, io=IoExit(direction, size, port, count, data))
        if reason == _EXIT_HYPERCALL:
            nr, *args = _HYPERCALL.unpack_from(run, abi.RUN_HYPERCALL)
            a = (args[0], args[1], args[2], args[3], args[4], args[5])
            return Exit(reason, hypercall=HypercallExit(nr, a))
        if reason == abi.EXIT_INTERNAL_ERROR:
            suberror, _ = struct.unpack_from("<II", run, abi.RUN_INTERNAL)
            log.error("vCPU %d: KVM internal error, suberror %d", self.index, suberror)
        elif reason == abi.EXIT_FAIL_ENTRY:
            (why,) = _U64.unpack_from(run, abi.RUN_FAIL_ENTRY)
            log.error("vCPU %d: VM entry failed, hardware reason %#x", self.index, why)
        return Exit(reason)

    def serve_exits_on_thread(self, handler: Callable[[ExitView], bool]) -> bool:
        thread = self.start_thread()

        def serve() -> bool:
            # A kick (immediate_exit) makes the next KVM_RUN deliver this completion and
            # return EINTR at once, which goes to `run` as ever: a pause never waits here.
            return handler(self._exit())

        thread.serve = serve
        return True

    def wait_entered(self, timeout: float) -> bool:
        thread = self._thread
        return thread is None or not self._in_flight or thread.wait_entered(timeout)

    def wait_returned(self, timeout: float) -> bool:
        thread = self._thread
        return thread is None or not self._in_flight or thread.wait_returned(timeout)

    def kick(self) -> None:
        self.times = {"kick": time.monotonic_ns()}
        self._kicked = True
        self._run[abi.RUN_IMMEDIATE_EXIT] = 1
        thread = self._thread
        # Set before the check: a thread that is not in KVM_RUN yet will see the flag there.
        if thread is not None and thread.in_kvm_run:
            signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def unkick(self) -> None:
        self._kicked = False
        self._first_run = True
        self._run[abi.RUN_IMMEDIATE_EXIT] = 0

    def complete_io(self, data: bytes) -> None:
        offset = self._io_offset
        self._run[offset : offset + len(data)] = data

    def complete_hypercall(self, ret: int) -> None:
        _U64.pack_into(self._run, abi.RUN_HYPERCALL_RET, ret & ((1 << 64) - 1))

    # ------------------------------------------------------------ state
    def _get(self, request: int, size: int, name: str) -> bytearray:
        buf = bytearray(size)
        _ioctl(self._fd, request, buf, name)
        return buf

    def _set(self, request: int, data: bytes | bytearray, name: str) -> None:
        _ioctl(self._fd, request, bytearray(data), name)

    def _stopped(self, what: str) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, f"{what}: the vCPU was closed")
        if self._in_flight:
            raise OSError(errno.EBUSY, f"{what}: vCPU {self.index} is in KVM_RUN; pause it first")

    async def get_state(self) -> VcpuState:
        """Every vCPU state the kernel keeps for a plain guest, mp_state and events first
        (reading mp_state may accept pending LAPIC events and change the rest)."""
        await trio.lowlevel.checkpoint()
        self._stopped("get_state")
        return self.read_state()

    def _save_layout(self) -> _SaveLayout:
        layout = self._layout
        if layout is None or layout.msrs_request is not self._hv.msrs_request:
            layout = self._layout = _SaveLayout(self)
        return layout

    def read_state(self) -> VcpuState:
        """`get_state` on the calling thread (the vCPU stopped): each struct read by its GET
        ioctl straight into its place in a blob laid out once per vCPU, with the GIL released
        (ctypes), so that vCPUs saved on their own threads save in parallel."""
        t0 = time.monotonic_ns()
        layout = self._save_layout()
        fd, ioctl = self._fd, _c_ioctl
        for request, addr, name in layout.calls:
            ret = ioctl(fd, request, addr)
            if ret < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{name}: {os.strerror(err)}")
            if request == abi.KVM_GET_MSRS and ret != layout.msr_count:
                # An MSR the kernel refuses: dropped from the host's list once (`get_msrs`),
                # then this state read again whole with the new layout.
                _Counter.requests += 1
                self._vm.get_msrs(fd)
                return self.read_state()
        _Counter.requests += len(layout.calls)
        state = VcpuState(backend=NAME, version=STATE_VERSION, blob=bytes(layout.blob))
        self.times["save0"], self.times["save1"] = t0, time.monotonic_ns()
        return state

    async def set_state(self, state: VcpuState) -> None:
        """Load a state in the order the kernel's dependencies ask (reference section 2):
        sregs (apic_base, EFER), regs, xsave, xcrs, lapic, MSRs (TSC deadline after TSC,
        after the LAPIC), events (after regs, which clear a pending exception), mp_state,
        debugregs, and the TSC offset last."""
        await trio.lowlevel.checkpoint()
        self._stopped("set_state")
        self.load_state(state)

    def load_state(self, state: VcpuState) -> None:
        """`set_state` on the calling thread (the vCPU stopped), each struct handed to its SET
        ioctl where it lies in one copy of the blob, with the GIL released (ctypes)."""
        t0 = time.monotonic_ns()
        check_state(state, NAME, STATE_VERSION)
        parts = self._hv.checked_offsets(state)
        blob = state.blob
        digest = parts.get(_Tag.CPUID_DIGEST)
        if digest is not None and blob[digest[0] : digest[0] + digest[1]] != self.cpuid_digest:
            raise StateMismatch(
                f"vCPU {self.index}'s state was read under another CPUID table than this "
                "vCPU's: both VMMs of a handoff must present the same CPU (same kernel, same "
                "host CPU model)"
            )
        buf = bytearray(blob)
        keep = (ctypes.c_char * len(buf)).from_buffer(buf)
        base = ctypes.addressof(keep)
        fd, ioctl = self._fd, _c_ioctl
        calls = 0
        try:
            for tag, request, name in _LOAD_ORDER:
                at = parts.get(tag)
                if at is None:
                    continue
                if tag is _Tag.ENTRY_SREGS:
                    self._set_entry_sregs(blob[at[0] : at[0] + at[1]])
                    continue
                calls += 1
                ret = ioctl(fd, request, base + at[0])
                if ret < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"{name}: {os.strerror(err)}")
                if tag is _Tag.MSRS:
                    # KVM_SET_MSRS stops at the first MSR it refuses and says how many it took.
                    (count,) = _U32.unpack_from(buf, at[0])
                    if ret != count:
                        (index,) = _U32.unpack_from(buf, at[0] + 8 + ret * abi.MSR_ENTRY_SIZE)
                        raise OSError(
                            errno.EINVAL,
                            f"KVM_SET_MSRS refused MSR {index:#x} (took {ret} of {count})",
                        )
            at = parts.get(_Tag.TSC_OFFSET)
            if at is not None and self.has_tsc_offset:
                self._tsc_value.value = _U64.unpack_from(buf, at[0])[0]
                calls += 1
                _ioctl(fd, abi.KVM_SET_DEVICE_ATTR, self._tsc_attr, "KVM_SET_DEVICE_ATTR")
        finally:
            _Counter.requests += calls
            del keep
        msrs = parts.get(_Tag.MSRS)
        if msrs is not None:
            self.kvmclock_on = _kvmclock_on(blob[msrs[0] : msrs[0] + msrs[1]])
        self.times = {"restore0": t0, "restore1": time.monotonic_ns()}

    def _set_entry_sregs(self, entry: bytes) -> None:
        """An entry state's segments, descriptor tables, CR0/CR3/CR4 and EFER over the vCPU's
        own sregs, keeping what the kernel set at creation (apic_base, CR8)."""
        sregs = self._get(abi.KVM_GET_SREGS, abi.SREGS_SIZE, "KVM_GET_SREGS")
        sregs[: abi.SREGS_CONTROL_AT] = entry[: abi.SREGS_CONTROL_AT]
        cr0, _, cr3, cr4, _, efer, _ = abi.SREGS_CONTROL.unpack_from(entry, abi.SREGS_CONTROL_AT)
        _, cr2, _, _, cr8, _, apic_base = abi.SREGS_CONTROL.unpack_from(sregs, abi.SREGS_CONTROL_AT)
        abi.SREGS_CONTROL.pack_into(
            sregs, abi.SREGS_CONTROL_AT, cr0, cr2, cr3, cr4, cr8, efer, apic_base
        )
        self._set(abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def kvmclock_ctrl(self) -> None:
        """Tell a guest using kvmclock that it was paused (KVM_KVMCLOCK_CTRL). EINVAL where it
        has no kvmclock page, which is not a failure of the handoff."""
        with contextlib.suppress(OSError):
            _ioctl_arg(self._fd, abi.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    def close(self) -> None:
        if self._fd < 0:
            return
        thread = self._thread
        if thread is not None:
            self.kick()  # a KVM_RUN in flight ends, and the thread with it
            thread.stop()
            self._thread = None
        self._in_flight = False
        self._run.close()
        os.close(self._fd)
        self._fd = -1


def _set_msrs(fd: int, data: bytes) -> None:
    """KVM_SET_MSRS, which stops at the first MSR it refuses and says how many it took."""
    buf = bytearray(data)
    (count,) = _U32.unpack_from(buf, 0)
    done = _ioctl(fd, abi.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
    if done != count:
        (index,) = _U32.unpack_from(buf, 8 + done * abi.MSR_ENTRY_SIZE)
        raise OSError(errno.EINVAL, f"KVM_SET_MSRS refused MSR {index:#x} (took {done} of {count})")


# ---------------------------------------------------------------------------- VM


class LinuxVm:
    def __init__(self, hypervisor: LinuxHypervisor, fd: int) -> None:
        self.hypervisor = hypervisor
        self._fd = fd
        self._maps: list[mmap.mmap] = []
        self.vcpus: list[LinuxVcpu] = []
        self.times: dict[str, int] = {}  # get_vm_state, set_vm_state: CLOCK_MONOTONIC ns

    def fileno(self) -> int:
        return self._fd

    async def set_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, fd: int, offset: int = 0
    ) -> None:
        await trio.lowlevel.checkpoint()
        mapping = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
        try:
            uaddr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            region = _MEMORY_REGION.pack(slot, 0, guest_phys_addr, size, uaddr)
            _ioctl(
                self._fd,
                abi.KVM_SET_USER_MEMORY_REGION,
                bytearray(region),
                "KVM_SET_USER_MEMORY_REGION",
            )
        except BaseException:
            mapping.close()
            raise
        self._maps.append(mapping)

    async def create_vcpu(self, index: int) -> LinuxVcpu:
        await trio.lowlevel.checkpoint()
        hv = self.hypervisor
        fd = _ioctl_arg(self._fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            run = mmap.mmap(fd, hv.vcpu_mmap_size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        vcpu = LinuxVcpu(self, index, fd, run)
        try:
            # Its KVM_RUN thread now, not at the first run: a target's vCPUs load their state
            # on it inside the blackout (`set_states`).
            vcpu.start_thread()
            # Before anything else: XCRS, MSRs and the first KVM_RUN depend on it.
            cpuid = vcpu_cpuid(hv.cpuid, index)
            _ioctl(fd, abi.KVM_SET_CPUID2, bytearray(cpuid), "KVM_SET_CPUID2")
            vcpu.cpuid_digest = hashlib.sha256(cpuid).digest()
            attr = bytearray(vcpu._tsc_attr)
            try:
                _ioctl(fd, abi.KVM_HAS_DEVICE_ATTR, attr, "KVM_HAS_DEVICE_ATTR")
                vcpu.has_tsc_offset = True
            except OSError:
                vcpu.has_tsc_offset = False
            vcpu._save_layout()  # now, not in the blackout of the first handoff
        except BaseException:
            vcpu.close()
            raise
        self.vcpus.append(vcpu)
        return vcpu

    async def get_states(self, vcpus: list[LinuxVcpu]) -> list[VcpuState]:
        """Every vCPU's `get_state`, in parallel where there are many (`_on_threads`)."""
        for vcpu in vcpus:
            vcpu._stopped("get_state")
        states: list[VcpuState] = await _on_threads(
            vcpus, lambda v, _: v.read_state(), [None] * len(vcpus)
        )
        return states

    async def set_states(self, vcpus: list[LinuxVcpu], states: list[VcpuState]) -> None:
        """Every vCPU's `set_state`, in parallel where there are many (`_on_threads`).

        Part of it is serial in the kernel whatever the threads: each KVM_SET_LAPIC
        recalculates the VM's APIC map over every vCPU under one VM-wide mutex
        (kvm_apic_set_state -> kvm_recalculate_apic_map; 10 us a call at 1 vCPU, 60 at 256 on
        a nested 2-CPU host: 15 ms of a 256-vCPU load). Measured there, two threads loaded 256
        vCPUs no faster than one when the host left them alone (44 ms), but one thread alone
        stalled for 70 to 120 ms in about half the handoffs on a busy host, two in one in
        seven: they stay two."""
        for vcpu in vcpus:
            vcpu._stopped("set_state")
        await _on_threads(vcpus, lambda v, st: v.load_state(st), list(states))

    def get_msrs(self, vcpu_fd: int) -> bytearray:
        """KVM_GET_MSRS of every MSR the host lists that this vCPU takes. An MSR the kernel
        refuses (it stops there and says how many it read) is dropped from the list, once."""
        hv = self.hypervisor
        while True:
            indices = hv.msr_indices
            buf = bytearray(hv.msrs_request)
            done = _ioctl(vcpu_fd, abi.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
            if done == len(indices):
                return buf
            log.debug("KVM_GET_MSRS refused MSR %#x: not moved in a handoff", indices[done])
            hv.msr_indices = indices[:done] + indices[done + 1 :]

    async def enable_exit_hypercall(self) -> None:
        """KVM_CAP_EXIT_HYPERCALL where the kernel has it (the x86 witness makes no hypercall,
        so a kernel without it runs the guest just as well)."""
        await trio.lowlevel.checkpoint()
        if not self.hypervisor.check_extension(abi.KVM_CAP_EXIT_HYPERCALL):
            return
        cap = _ENABLE_CAP.pack(abi.KVM_CAP_EXIT_HYPERCALL, 0, 1 << 12, 0, 0, 0)
        _ioctl(self._fd, abi.KVM_ENABLE_CAP, bytearray(cap), "KVM_ENABLE_CAP")

    async def sev_init(self, *, es: bool) -> None:
        _no_sev("KVM_SEV_ES_INIT" if es else "KVM_SEV_INIT")

    async def sev_launch(self, image_len: int, policy: int, *, es: bool) -> SevLaunch:
        return _no_sev("KVM_SEV_LAUNCH_START")

    async def move_enc_context_from(self, source: PeerVm) -> None:
        _no_sev("KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM")

    async def get_vm_state(self) -> VmState:
        """PIT, kvmclock (without KVM_CLOCK_TSC_STABLE, which SET_CLOCK refuses on older
        kernels), PIC master and slave, IOAPIC. Inside the blackout: no trip through the
        scheduler (a handful of VM ioctls of a microsecond each)."""
        t0 = time.monotonic_ns()
        fd = self._fd
        pit = bytearray(abi.PIT2_SIZE)
        _ioctl(fd, abi.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        clock = bytearray(abi.CLOCK_SIZE)
        _ioctl(fd, abi.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        flags = _U32.unpack_from(clock, 8)[0] & ~abi.KVM_CLOCK_TSC_STABLE
        _U32.pack_into(clock, 8, flags)
        sections: list[tuple[_Tag, bytes | bytearray]] = [
            (_Tag.CPUID_DIGEST, self.hypervisor.cpuid_digest),
            (_Tag.PIT2, pit),
            (_Tag.CLOCK, clock),
        ]
        for chip in range(3):
            irq = bytearray(abi.IRQCHIP_SIZE)
            _U32.pack_into(irq, 0, chip)
            _ioctl(fd, abi.KVM_GET_IRQCHIP, irq, "KVM_GET_IRQCHIP")
            sections.append((_Tag.IRQCHIP, irq))
        state = VmState(backend=NAME, version=STATE_VERSION, blob=_pack(sections))
        self.times = {"save0": t0, "save1": time.monotonic_ns()}
        return state

    async def set_vm_state(self, state: VmState) -> None:
        """PIT, PIC and IOAPIC, then the clock: kvmclock advanced by the host's realtime that
        passed since the source read it (KVM_CLOCK_REALTIME), then KVMCLOCK_CTRL per vCPU.
        Inside the blackout: no trip through the scheduler."""
        t0 = time.monotonic_ns()
        check_vm_state(state, NAME, STATE_VERSION)
        fd = self._fd
        parts = checked_sections(state.blob, "VM state", xsave_size=0, vm=True)
        for tag, data in parts:
            if tag == _Tag.CPUID_DIGEST and data != self.hypervisor.cpuid_digest:
                raise StateMismatch(
                    "the VM state was read under another CPUID table than this host's: both "
                    "VMMs of a handoff must present the same CPU"
                )
        for tag, data in parts:
            if tag == _Tag.PIT2:
                _ioctl(fd, abi.KVM_SET_PIT2, bytearray(data), "KVM_SET_PIT2")
        for tag, data in parts:
            if tag == _Tag.IRQCHIP:
                _ioctl(fd, abi.KVM_SET_IRQCHIP, bytearray(data), "KVM_SET_IRQCHIP")
        for tag, data in parts:
            if tag == _Tag.CLOCK:
                clock, flags, _, realtime, _ = abi.CLOCK_STRUCT.unpack(data)
                flags &= abi.KVM_CLOCK_REALTIME  # the only flag SET_CLOCK acts on
                buf = bytearray(abi.CLOCK_STRUCT.pack(clock, flags, 0, realtime, 0))
                try:
                    _ioctl(fd, abi.KVM_SET_CLOCK, buf, "KVM_SET_CLOCK")
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not flags:
                        raise
                    # Before Linux 5.16 SET_CLOCK takes no flags: the clock then stands still
                    # through the pause.
                    buf = bytearray(abi.CLOCK_STRUCT.pack(clock, 0, 0, 0, 0))
                    _ioctl(fd, abi.KVM_SET_CLOCK, buf, "KVM_SET_CLOCK")
        for vcpu in self.vcpus:
            # Only where the guest enabled kvmclock (its state's MSRs say): elsewhere the
            # kernel refuses it with EINVAL, a vCPU ioctl (6 us here) for nothing.
            if vcpu.fileno() >= 0 and vcpu.kvmclock_on:
                vcpu.kvmclock_ctrl()
        self.times = {"restore0": t0, "restore1": time.monotonic_ns()}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for mapping in self._maps:
            with contextlib.suppress(BufferError):
                mapping.close()
        self._maps = []


def _no_sev(what: str) -> NoReturn:
    raise OSError(
        errno.ENOTTY,
        f"{what}: the linux backend runs plain guests only (no SEV on /dev/kvm here); "
        "use --mode plain, or kvmstub for SEV",
    )


# ---------------------------------------------------------------------------- hypervisor


class LinuxHypervisor:
    """/dev/kvm as one VMM process holds it open: the host's CPUID and MSR lists, read once."""

    name = NAME
    sev_api = (0, 0, 0)  # no SEV firmware behind this backend

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path
        self.vcpu_mmap_size = _ioctl_arg(
            fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
        )
        self.has_sregs2 = bool(self.check_extension(abi.KVM_CAP_SREGS2))
        self.has_xcrs = bool(self.check_extension(abi.KVM_CAP_XCRS))
        self.xsave2_size = self.check_extension(abi.KVM_CAP_XSAVE2)
        self.cpuid = vcpu_cpuid(_supported_cpuid(fd), 0)
        self.cpuid_digest = hashlib.sha256(self.cpuid).digest()
        self._msr_indices = _msr_indices(fd)
        self.msrs_request = _msrs_request(self._msr_indices)
        self.tsc_khz = 0
        # The last vCPU state layout checked in full: its size, the bytes the check read
        # (offset, bytes), and its sections (`checked_offsets`).
        self._layout_known: (
            tuple[int, list[tuple[int, bytes]], dict[_Tag, tuple[int, int]]] | None
        ) = None

    @property
    def msr_indices(self) -> list[int]:
        """The MSRs a vCPU's state holds (KVM_GET_MSR_INDEX_LIST less those refused)."""
        return self._msr_indices

    @msr_indices.setter
    def msr_indices(self, indices: list[int]) -> None:
        self._msr_indices = indices
        self.msrs_request = _msrs_request(indices)

    def check_extension(self, cap: int) -> int:
        return _ioctl_arg(self._fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def _create_vm_fd(self) -> int:
        fd = _ioctl_arg(self._fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        try:
            _ioctl_arg(fd, abi.KVM_SET_TSS_ADDR, abi.KVM_TSS_ADDRESS, "KVM_SET_TSS_ADDR")
            _ioctl_arg(fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
            pit = bytearray(64)
            _U32.pack_into(pit, 0, abi.KVM_PIT_SPEAKER_DUMMY)
            _ioctl(fd, abi.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def create_vm(self) -> LinuxVm:
        await trio.lowlevel.checkpoint()
        return LinuxVm(self, self._create_vm_fd())

    def read_tsc_khz(self) -> int:
        """The guest TSC's frequency: KVM_GET_TSC_KHZ on a throwaway VM (or its vCPU)."""
        vm = self._create_vm_fd()
        try:
            try:
                return _ioctl_arg(vm, abi.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
            except OSError:
                pass  # a VM ioctl only with KVM_CAP_VM_TSC_CONTROL (6.0+): ask a vCPU
            vcpu = _ioctl_arg(vm, abi.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
            try:
                return _ioctl_arg(vcpu, abi.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)

    def check_state(self, state: VcpuState) -> None:
        check_state(state, NAME, STATE_VERSION)
        self.checked_offsets(state)

    def checked_offsets(self, state: VcpuState) -> dict[_Tag, tuple[int, int]]:
        """A vCPU state's sections (offset, length) by tag, checked (`checked_sections`).

        The states of one handoff share one layout: a blob of the size of the last one fully
        checked, with the same section headers at the same places (and so the same MSR count,
        which its section's length fixes), is that layout again, checked in a few
        microseconds instead of tens (a target checks each state before it loads any, and
        again as it loads it)."""
        blob = state.blob
        known = self._layout_known
        if known is not None and len(blob) == known[0]:
            _, fixed, parts = known
            if all(blob.startswith(data, pos) for pos, data in fixed):
                return parts
        sections = checked_offsets(
            blob, "vCPU state", xsave_size=self.xsave2_size or abi.XSAVE_SIZE
        )
        parts = {tag: (at, length) for tag, at, length in sections}
        # What the full check read: each section's header, and the MSR count.
        fixed = [(at - _SECTION.size, blob[at - _SECTION.size : at]) for _, at, _ in sections]
        fixed += [(at, blob[at : at + 4]) for tag, at, _ in sections if tag is _Tag.MSRS]
        self._layout_known = (len(blob), fixed, parts)
        return parts

    def witness_image(
        self,
        vcpus: int,
        line_every: int,
        flip_every: int,
        *,
        idle_us: int = 0,
        tsc_khz: int | None = None,
    ) -> bytes:
        """The x86 witness's launch image (`guestprog.x86`): `line_every` steps between lines;
        with `idle_us`, one idle request (port 0x512) of that many microseconds after each line.
        `flip_every` is unused: the x86 witness flips no pages (that is SEV's)."""
        params = x86.Params(
            vcpus=vcpus, line_every=line_every, idle_us=idle_us, tsc_khz=tsc_khz or self.tsc_khz
        )
        return x86.build_image(params)

    def witness_initial_state(self, index: int) -> VcpuState:
        return witness_initial_state(index)

    def polling(self, seconds: float) -> AbstractContextManager[None]:
        return no_polling(seconds)

    def requests_made(self) -> int:
        return _Counter.requests

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def witness_initial_state(index: int) -> VcpuState:
    """vCPU `index` before the x86 witness's first instruction: entry registers, long-mode
    system registers (merged over the vCPU's own: its apic_base stays), runnable (an AP with
    the in-kernel LAPIC would otherwise wait for INIT/SIPI)."""
    values = x86.entry_registers(index)
    names = [
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rsp",
        "rbp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
        "rip",
        "rflags",
    ]
    regs = abi.REGS.pack(*(values.get(n, 0) for n in names))
    sys = x86.system_registers()
    sregs = bytearray(abi.SREGS_SIZE)
    for i, seg in enumerate((sys.cs, sys.ds, sys.es, sys.fs, sys.gs, sys.ss, sys.tr, sys.ldt)):
        abi.SEGMENT.pack_into(
            sregs, abi.SEGMENT.size * i, seg.base, seg.limit, seg.selector, seg.type,
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable,
        )  # fmt: skip
    abi.SREGS_CONTROL.pack_into(
        sregs, abi.SREGS_CONTROL_AT, sys.cr0, 0, sys.cr3, sys.cr4, 0, sys.efer, 0
    )
    mp_state = _U32.pack(abi.MP_STATE_RUNNABLE)
    sections: list[tuple[_Tag, bytes | bytearray]] = [
        (_Tag.ENTRY_SREGS, sregs),
        (_Tag.REGS, regs),
        (_Tag.MP_STATE, mp_state),
    ]
    return VcpuState(backend=NAME, version=STATE_VERSION, blob=_pack(sections))


_CPUID_ENTRY = struct.Struct("<IIIIIII12x")  # function, index, flags, eax, ebx, ecx, edx


def vcpu_cpuid(table: bytes, index: int) -> bytes:
    """vCPU `index`'s CPUID: the host's table with the APIC ID fields saying `index` (the
    in-kernel LAPIC's ID is the vCPU id). KVM_GET_SUPPORTED_CPUID fills them from whichever
    host CPU the calling thread ran on, so two processes read different tables otherwise."""
    out = bytearray(table)
    (nent,) = _U32.unpack_from(out, 0)
    for i in range(nent):
        at = 8 + abi.CPUID_ENTRY_SIZE * i
        function, sub, flags, eax, ebx, ecx, edx = _CPUID_ENTRY.unpack_from(out, at)
        if function == 0x1:
            ebx = (ebx & 0x00FFFFFF) | (index & 0xFF) << 24  # initial APIC ID
        elif function in (0xB, 0x1F):
            edx = index  # x2APIC ID
        elif function == 0x8000001E:
            eax = index  # extended APIC ID
        else:
            continue
        _CPUID_ENTRY.pack_into(out, at, function, sub, flags, eax, ebx, ecx, edx)
    return bytes(out)


def _supported_cpuid(fd: int) -> bytes:
    """KVM_GET_SUPPORTED_CPUID as the struct kvm_cpuid2 that KVM_SET_CPUID2 takes."""
    nent = 64
    while True:
        buf = bytearray(8 + abi.CPUID_ENTRY_SIZE * nent)
        _U32.pack_into(buf, 0, nent)
        try:
            _ioctl(fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        except OSError as exc:
            if exc.errno != errno.E2BIG or nent >= 4096:
                raise
            nent *= 2
            continue
        (got,) = _U32.unpack_from(buf, 0)
        return bytes(buf[: 8 + abi.CPUID_ENTRY_SIZE * got])


def _msrs_request(indices: list[int]) -> bytes:
    """struct kvm_msrs asking for `indices` (KVM_GET_MSRS fills in the values)."""
    buf = bytearray(8 + abi.MSR_ENTRY_SIZE * len(indices))
    _U32.pack_into(buf, 0, len(indices))
    for i, index in enumerate(indices):
        _U32.pack_into(buf, 8 + abi.MSR_ENTRY_SIZE * i, index)
    return bytes(buf)


def _msr_indices(fd: int) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST, the TSC deadline last (after IA32_TSC when loaded: reference
    section 2, Firecracker's deferred MSRs)."""
    buf = bytearray(4)
    try:
        _ioctl(fd, abi.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
    except OSError as exc:
        if exc.errno != errno.E2BIG:
            raise
    (count,) = _U32.unpack_from(buf, 0)
    buf = bytearray(4 + 4 * count)
    _U32.pack_into(buf, 0, count)
    _ioctl(fd, abi.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
    (count,) = _U32.unpack_from(buf, 0)
    indices = [_U32.unpack_from(buf, 4 + 4 * i)[0] for i in range(count)]
    deferred = [i for i in indices if i == abi.MSR_IA32_TSC_DEADLINE]
    return [i for i in indices if i != abi.MSR_IA32_TSC_DEADLINE] + deferred


def open_linux(path: str = DEFAULT_PATH) -> LinuxHypervisor:
    """Open /dev/kvm at `path` and read what every VM needs of it (CPUID, MSR list, TSC
    frequency). Call from the main thread (it installs the kick signal's handler).

    Raises:
        OSError: with a message saying what to check (missing device, permission, an API
            version or capability this backend needs, KVM_CREATE_VM refused).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise OSError(exc.errno, f"{path} does not exist: no KVM on this host") from None
    except PermissionError as exc:
        raise OSError(
            exc.errno, f"cannot open {path}: permission denied (join the group owning it)"
        ) from None
    try:
        version = _ioctl_arg(fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != abi.KVM_API_VERSION:
            raise OSError(errno.ENOTSUP, f"{path}: KVM API version {version}, not 12")
        for cap, what in (
            (abi.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (abi.KVM_CAP_PIT2, "KVM_CAP_PIT2"),
            (abi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (abi.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
            (abi.KVM_CAP_XSAVE, "KVM_CAP_XSAVE"),
        ):
            if not _ioctl_arg(fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION"):
                raise OSError(errno.ENOTSUP, f"{path}: the kernel lacks {what}")
        hv = LinuxHypervisor(fd, path)
    except BaseException:
        os.close(fd)
        raise
    try:
        hv.tsc_khz = hv.read_tsc_khz()
        install_kick_handler()
    except OSError as exc:
        hv.close()
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
    except BaseException:
        hv.close()
        raise
    return hv


def unusable_reason(path: str = DEFAULT_PATH) -> str | None:
    """Why this backend cannot run guests at `path` (None: it can): for test skips and
    `--hypervisor auto`. Creates and closes one VM."""
    try:
        open_linux(path).close()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None
