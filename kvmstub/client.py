"""What a VMM imports to talk to kvmstub: KVM's ioctls as async (trio) methods.

    kvm = await open_kvm(path)                      # open("/dev/kvm")
    vm = await kvm.create_vm()                      # KVM_CREATE_VM
    vcpu = await vm.create_vcpu(0)                  # KVM_CREATE_VCPU
    await vm.sev_ioctl(KVM_SEV_LAUNCH_START, handle=0, policy=SEV_POLICY_ES)
    await vm.enable_cap(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, source_vm)   # a Vm or an int fd
    exit_ = await vcpu.run()                        # KVM_RUN

Method names follow the ioctls, so the kernel selftests port line by line. Every object is a
real fd (`fileno()`): it can be passed to another process with SCM_RIGHTS, and the object lives
in kvmstub while any copy of it is open anywhere. A failure raises `OSError(errno, message)`
with the kernel's errno, what `fcntl.ioctl` raises on a real kernel; a SEV firmware failure is
`OSError(EIO)` whose `fw_error` attribute holds the SEV status code (`None` otherwise).

An issued request always gets its reply read, even if the calling task is cancelled meanwhile
(the wait is shielded): like an ioctl, a KVM_RUN that started completes, and its exit is not
lost. Each object has a lock so concurrent tasks never interleave on one fd; different vCPUs
are different fds and run concurrently.

This module imports only `kvmstub.uapi` and `kvmstub.wire`.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar, overload

import trio

from kvmstub import uapi, wire

__all__ = ["Kvm", "Vcpu", "Vm", "open_kvm", "read_stats"]

_ANCBUFSIZE: Final = socket.CMSG_SPACE(wire.MAX_FDS_RECEIVED * 4)
_ReplyT = TypeVar("_ReplyT", bound=wire.Reply)


def _raise_for(reply: wire.Error) -> None:
    """The OSError fcntl.ioctl would raise (OSError picks the errno's subclass itself)."""
    err = OSError(reply.errno, reply.message or os.strerror(reply.errno))
    err.fw_error = reply.fw_error  # type: ignore[attr-defined]
    # What the kernel copied back although the command failed (a query's length).
    err.fields = dict(reply.fields or {})  # type: ignore[attr-defined]
    raise err


class _FdLock:
    """A FIFO lock for one fd whose uncontended acquire does not yield (trio's locks
    always checkpoint, ~10% of a round trip here). The request made under it always waits
    for its reply, and that wait is the checkpoint."""

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiters.park()  # woken by release(), which hands the lock over
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def try_acquire(self) -> bool:
        """Take the lock if it is free (no waiting); the holder need not be a task."""
        if self._held:
            return False
        self._held = True
        return True

    def release(self) -> None:
        if self._waiters:
            self._waiters.unpark()  # stays held: ownership passes to the next waiter
        else:
            self._held = False


class _KvmFile:
    """One kvmstub fd: a SOCK_SEQPACKET socket on which a request gets exactly one reply."""

    _kind = "kvm"
    # Requests this process has made (all fds): how a VMM counts the "ioctls" of a span.
    requests_made = 0

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._lock = _FdLock()
        self._cancel_seen = False
        # Ids only need to be unique per fd; the pid helps when reading a daemon log.
        self._ids = itertools.count((os.getpid() & 0xFFFF_FFFF) << 32)

    def fileno(self) -> int:
        """The fd, to pass to another process (SCM_RIGHTS) or to `enable_cap`."""
        if self._sock is None:
            raise OSError(errno.EBADF, f"{self._kind} fd is closed")
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close this fd. The object itself goes when the last copy anywhere is closed."""
        sock, self._sock = self._sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)  # wakes a task waiting on it, if any
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<kvmstub {self._kind} {state}>"

    def _next_id(self) -> int:
        return next(self._ids) & wire.U64_MAX

    async def _call(
        self,
        request: wire.Request,
        expect: type[_ReplyT],
        fd: int | None = None,
        data: bytes | None = None,
    ) -> tuple[_ReplyT, list[int]]:
        """Send `request` (with `fd` attached if given), return its reply and the fds that
        came with it (the caller owns them). Raises the reply's OSError on failure. `data`:
        the request's encoding, if the caller made it already."""
        if data is None:
            data = wire.encode(request)
        if len(data) > wire.MAX_DATAGRAM:
            # The daemon would refuse it too (EINVAL); say so before sending.
            raise OSError(errno.EINVAL, f"kvmstub: request exceeds {wire.MAX_DATAGRAM} bytes")
        _KvmFile.requests_made += 1
        if self._cancel_seen:
            self._cancel_seen = False
            await trio.lowlevel.checkpoint_if_cancelled()
        async with self._lock:
            sock = self._sock
            if sock is None:
                raise OSError(errno.EBADF, f"{self._kind} fd is closed")
            try:
                await self._send(sock, data, fd)
            except trio.ClosedResourceError:
                raise OSError(errno.EBADF, f"{self._kind} fd was closed") from None
            reply, fds = await self._reply_to(sock, request.id)
        return self._judge(reply, fds, expect)

    async def _reply_to(
        self, sock: socket.socket, request_id: int
    ) -> tuple[wire.AnyReply, list[int]]:
        """The reply to the request `request_id`, sent on `sock` under the lock."""
        try:
            try:
                return await self._receive(sock, request_id)
            except trio.Cancelled:
                # Sent, so the daemon acts on it: the reply must still be read (and a
                # KVM_RUN's exit kept), like an ioctl that cannot be interrupted. The
                # cancellation is level-triggered: the caller's next checkpoint raises
                # it again. (Shielding every wait instead costs ~10% of a round trip.)
                with trio.CancelScope(shield=True):
                    reply = await self._receive(sock, request_id)
                # Swallowed here so the reply is not lost; the next call on this fd
                # raises it before sending anything (else a loop of calls never would).
                self._cancel_seen = True
                return reply
        except trio.ClosedResourceError:
            raise OSError(errno.EBADF, f"{self._kind} fd was closed") from None

    @staticmethod
    def _judge(
        reply: wire.AnyReply, fds: list[int], expect: type[_ReplyT]
    ) -> tuple[_ReplyT, list[int]]:
        if type(reply) is expect:
            return reply, fds
        for received in fds:
            os.close(received)
        if isinstance(reply, wire.Error):
            _raise_for(reply)
        raise OSError(errno.EPROTO, f"kvmstub: unexpected reply {type(reply).__name__}")

    @staticmethod
    async def _send(sock: socket.socket, data: bytes, fd: int | None) -> None:
        while True:
            try:
                if fd is None:
                    sock.send(data, socket.MSG_NOSIGNAL)
                else:
                    rights = array.array("i", [fd])
                    sock.sendmsg(
                        [data],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                        socket.MSG_NOSIGNAL,
                    )
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except (BrokenPipeError, ConnectionResetError):
                raise OSError(errno.EIO, "kvmstub: daemon gone") from None

    @staticmethod
    async def _receive(sock: socket.socket, request_id: int) -> tuple[wire.AnyReply, list[int]]:
        deadline = time.perf_counter() + _POLLING.seconds if _POLLING.seconds else 0.0
        while True:
            # Wait first: the reply is never there the moment the request is sent. Inside
            # `polling`, try again at once until its time is up, then wait.
            if not deadline or time.perf_counter() >= deadline:
                await trio.lowlevel.wait_readable(sock)
            buffer = _RECEIVE.view
            try:
                nbytes, ancdata, msg_flags, _ = sock.recvmsg_into(
                    [buffer], _ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            except ConnectionResetError:
                nbytes, ancdata, msg_flags = 0, [], 0
            data = buffer[:nbytes]  # decoded before the next await: every task shares it
            fds = _fds_of(ancdata)
            if not nbytes and not ancdata:
                raise OSError(errno.EIO, "kvmstub: daemon gone")
            try:
                reply = wire.decode_reply(data)
            except wire.WireError as e:
                _close_all(fds)
                raise OSError(errno.EPROTO, f"kvmstub: {e}") from None
            if reply.id == request_id and not msg_flags & _MSG_CTRUNC:
                if isinstance(reply, wire.Spilled):
                    return _read_spilled(fds, request_id), []
                return reply, fds
            # The reply to a request whose task gave up, or to another process sharing this
            # fd (whose ioctls get EIO anyway): not ours.
            _close_all(fds)


_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # an int: a flag enum operation costs a microsecond


class _ReceiveBuffer(threading.local):
    """One receive buffer per thread (each runs its own event loop, as the kernel selftests'
    threads do): recvmsg() allocates a whole MAX_DATAGRAM buffer per call, which at 128 KiB
    is an mmap and a munmap, about 15 µs more per reply on a VM host, at every exit a VMM
    serves. Replies are decoded from it before the next await."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(wire.MAX_DATAGRAM))


_RECEIVE = _ReceiveBuffer()


class _Polling(threading.local):
    seconds = 0.0


_POLLING = _Polling()


@contextlib.contextmanager
def polling(seconds: float) -> Iterator[None]:
    """Inside this block (in this thread), a request's reply is awaited by polling its fd
    for up to `seconds` after the request is sent, then by sleeping in the event loop as
    usual. A process asleep is woken by an interrupt to its CPU: on a virtual machine host
    tens of microseconds, paid by every request that crosses to kvmstub on another CPU.
    Polling costs this CPU the wait, and the event loop runs nothing else meanwhile: for a
    caller awaiting one urgent request at a time, with a CPU apart from kvmstub's (a VMM's
    MOVE inside a handoff's blackout). `seconds <= 0` changes nothing."""
    before = _POLLING.seconds
    _POLLING.seconds = max(0.0, seconds)
    try:
        yield
    finally:
        _POLLING.seconds = before


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


def _read_spilled(fds: list[int], request_id: int) -> wire.AnyReply:
    """The reply a `Spilled` datagram carries in its memfd. Closes the fds."""
    try:
        if len(fds) != 1:
            raise OSError(errno.EPROTO, f"kvmstub: spilled reply carried {len(fds)} fds")
        size = os.fstat(fds[0]).st_size
        if size > wire.MAX_SPILLED:
            raise OSError(errno.EPROTO, f"kvmstub: spilled reply of {size} bytes")
        data = os.pread(fds[0], size, 0)
    finally:
        _close_all(fds)
    try:
        reply = wire.decode_reply(data)
    except wire.WireError as e:
        raise OSError(errno.EPROTO, f"kvmstub: {e}") from None
    if reply.id != request_id or isinstance(reply, wire.Spilled):
        raise OSError(errno.EPROTO, "kvmstub: spilled reply does not answer the request")
    return reply


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _socket_from(fds: list[int], what: str) -> socket.socket:
    """The one fd a NewObject reply carries, as a socket."""
    if len(fds) != 1:
        _close_all(fds)
        raise OSError(errno.EPROTO, f"kvmstub: {what} reply carried {len(fds)} fds")
    return socket.socket(fileno=fds[0])


class Kvm(_KvmFile):
    """The system fd: what `open("/dev/kvm")` returns."""

    _kind = "kvm"

    async def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12)."""
        reply, _ = await self._call(wire.GetApiVersion(self._next_id()), wire.Ok)
        return reply.result

    async def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: > 0 if `cap` is supported."""
        reply, _ = await self._call(wire.CheckExtension(self._next_id(), cap), wire.Ok)
        return reply.result

    async def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM. The calling process becomes the VM's creator (its `mm`)."""
        _, fds = await self._call(wire.CreateVm(self._next_id(), vm_type), wire.NewObject)
        return Vm(_socket_from(fds, "KVM_CREATE_VM"))

    async def stats(self) -> dict[str, Any]:
        """kvmstub's statistics: VMs, vCPUs, ASIDs (what `kvmstub stats --json` prints)."""
        reply, _ = await self._call(wire.Stats(self._next_id()), wire.StatsReply)
        return reply.stats

    # /dev/sev: kvmstub serves the SEV platform device on the same socket.

    async def sev_issue_cmd(
        self, cmd: int, *, null_data: bool = False, **fields: int | bytes
    ) -> dict[str, int | bytes]:
        """The /dev/sev ioctl SEV_ISSUE_CMD: platform command `cmd` (uapi.SEV_PLATFORM_STATUS,
        SEV_PDH_CERT_EXPORT, ...) with its struct's fields by their kernel names; returns
        the output fields. A firmware failure is OSError(EIO) with `fw_error` and `fields`."""
        if null_data and fields:
            raise TypeError("null_data=True sends no fields")
        request = wire.SevIssueCmd(self._next_id(), cmd, None if null_data else fields)
        reply, _ = await self._call(request, wire.Ok)
        return dict(reply.fields or {})

    async def sev_platform_status(self) -> dict[str, int | bytes]:
        """SEV_PLATFORM_STATUS -> {api_major, api_minor, state, flags, build, guest_count}."""
        return await self.sev_issue_cmd(uapi.SEV_PLATFORM_STATUS, null_data=True)

    async def sev_pdh_cert_export(self) -> tuple[bytes, bytes]:
        """SEV_PDH_CERT_EXPORT as a VMM issues it: the length query (EIO with fw_error
        INVALID_LEN and both lengths filled in), then the export. Returns (PDH certificate,
        PEK || OCA || CEK), what the target of a migration hands its source."""
        try:
            await self.sev_issue_cmd(uapi.SEV_PDH_CERT_EXPORT, pdh_cert_len=0, cert_chain_len=0)
            raise OSError(errno.EPROTO, "kvmstub: PDH_CERT_EXPORT length query succeeded")
        except OSError as e:
            if getattr(e, "fw_error", None) != uapi.SEV_RET_INVALID_LEN:
                raise
            lengths: dict[str, int | bytes] = e.fields  # type: ignore[attr-defined]
        out = await self.sev_issue_cmd(
            uapi.SEV_PDH_CERT_EXPORT,
            pdh_cert_address=1,
            pdh_cert_len=lengths["pdh_cert_len"],
            cert_chain_address=1,
            cert_chain_len=lengths["cert_chain_len"],
        )
        pdh, chain = out["pdh_cert"], out["cert_chain"]
        assert isinstance(pdh, bytes) and isinstance(chain, bytes)
        return pdh, chain

    async def sev_amd_cert_chain(self) -> bytes:
        """ASK || ARK of this host's platform: kvmstub's stand-in for AMD's key server (not a
        kernel command)."""
        out = await self.sev_issue_cmd(uapi.KVMSTUB_SEV_AMD_CERT_CHAIN, null_data=True)
        chain = out["amd_certs"]
        assert isinstance(chain, bytes)
        return chain


class Vm(_KvmFile):
    """A VM fd. Only its creating process may issue its ioctls (others get EIO); any
    process holding it may name it as the source of a MOVE or COPY."""

    _kind = "vm"

    @classmethod
    def from_fd(cls, fd: int) -> Vm:
        """Wrap a VM fd received from another process. Takes ownership of `fd`."""
        return cls(socket.socket(fileno=fd))

    async def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        request = wire.CreateVcpu(self._next_id(), vcpu_id)
        _, fds = await self._call(request, wire.NewObject)
        # The vCPU fd and its kvm_run page (what mmap of a vCPU fd gives in KVM).
        if len(fds) != 2:
            _close_all(fds)
            raise OSError(errno.EPROTO, f"kvmstub: KVM_CREATE_VCPU reply carried {len(fds)} fds")
        try:
            page = mmap.mmap(fds[1], KvmRun.SIZE)  # the mapping keeps the page alive
        except OSError:
            os.close(fds[0])
            raise
        finally:
            os.close(fds[1])
        return Vcpu(socket.socket(fileno=fds[0]), KvmRun(page))

    async def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        fd: int,
        offset: int = 0,
        flags: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION over a memfd: guest memory [guest_phys_addr,
        +memory_size) is the memfd's bytes from `offset`. `memory_size` 0 deletes the slot
        (then `fd` may be -1). The memfd is sent with the request; kvmstub keeps its own copy."""
        request = wire.SetUserMemoryRegion(
            self._next_id(), slot, flags, guest_phys_addr, memory_size, offset, has_fd=fd >= 0
        )
        await self._call(request, wire.Ok, fd if fd >= 0 else None)

    @overload
    async def get_dirty_log(self, slot: int) -> bytes: ...

    @overload
    async def get_dirty_log(self, slot: int, bitmap: bytearray | memoryview) -> None: ...

    async def get_dirty_log(
        self, slot: int, bitmap: bytearray | memoryview | None = None
    ) -> bytes | None:
        """KVM_GET_DIRTY_LOG: the dirty bitmap of memory slot `slot`, ALIGN(npages, 64) / 8
        bytes, bit i (bit i % 8 of byte i // 8) = page i of the slot written by the guest.
        Read-and-clear, unless KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled: then the bits
        stay until `clear_dirty_log`. Only the guest's writes are logged, never the VMM's
        own writes to its memfd. ENOENT for a slot without KVM_MEM_LOG_DIRTY_PAGES (or no
        such slot), EINVAL for a slot id out of range.

        Returned as new bytes, or written into `bitmap` (the ioctl's dirty_bitmap: every
        byte of the log is written; a buffer too short gets what fits and EFAULT, the log
        read all the same, as the kernel's copy_to_user). A caller reading a large log
        every round keeps one buffer: only the dirty runs cross from kvmstub, and filling
        a buffer already in memory costs a memset."""
        reply, _ = await self._call(wire.GetDirtyLog(self._next_id(), slot), wire.DirtyLogReply)
        log = uapi.DirtyLog(reply.size, reply.runs)
        problem = log.problem()
        if problem is not None:
            raise OSError(errno.EPROTO, f"kvmstub: {problem}")
        if bitmap is None:
            return log.to_bytes()
        log.copy_to(bitmap)
        return None

    async def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the pages whose bits are set in `bitmap` (bit i = page
        first_page + i) from the slot's log. `first_page` must be a multiple of 64, and
        `num_pages` too unless the range ends at the slot's end (EINVAL); `bitmap` needs
        ALIGN(num_pages, 64) / 8 bytes (fewer: EFAULT). At most 128 KiB of bitmap a call
        (a million pages): clear a larger log in parts."""
        request = wire.ClearDirtyLog(self._next_id(), slot, first_page, num_pages, bytes(bitmap))
        await self._call(request, wire.Ok)

    async def set_msr_filter(
        self, ranges: Sequence[uapi.MsrFilterRange], flags: int = uapi.KVM_MSR_FILTER_DEFAULT_ALLOW
    ) -> None:
        """KVM_X86_SET_MSR_FILTER: replace the VM's MSR filter with up to 16 `ranges` and
        `flags` (KVM_MSR_FILTER_DEFAULT_DENY or 0). A filtered access exits to the VMM as
        KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR when KVM_CAP_X86_USER_SPACE_MSR enabled
        KVM_MSR_EXIT_REASON_FILTER; otherwise the guest gets #GP."""
        wire_ranges = tuple(
            wire.WireMsrFilterRange(r.flags, r.nmsrs, r.base, r.bitmap) for r in ranges
        )
        await self._call(wire.SetMsrFilter(self._next_id(), flags, wire_ranges), wire.Ok)

    async def enable_cap(self, cap: int, *args: int | Vm, flags: int = 0) -> int:
        """KVM_ENABLE_CAP with up to four args.

        For KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM and KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, args[0] is
        the source VM: a `Vm` or an int fd (e.g. one received over SCM_RIGHTS); the fd itself
        is sent. A number that is not an open fd is sent as a plain number, so kvmstub
        answers EBADF in the kernel's order. For other caps the args are plain integers.
        """
        if len(args) > 4:
            raise TypeError("KVM_ENABLE_CAP takes at most 4 args")
        values: list[int] = []
        fd: int | None = None
        for index, arg in enumerate(args):
            if isinstance(arg, Vm):
                if index != 0 or cap not in wire.FD_ARG_CAPS:
                    raise TypeError(f"a Vm is not an argument of cap {cap} at index {index}")
                fd = arg.fileno()
                values.append(fd)
            elif index == 0 and cap in wire.FD_ARG_CAPS:
                fd = arg if _is_open(arg) else None
                values.append(arg & wire.U64_MAX)
            else:
                values.append(arg & wire.U64_MAX)
        request = wire.EnableCap(
            self._next_id(), cap, flags, tuple(values), fd_arg=None if fd is None else 0
        )
        reply, _ = await self._call(request, wire.Ok, fd)
        return reply.result

    async def sev_ioctl(
        self, cmd: int, *, null_data: bool = False, **fields: int | bytes
    ) -> dict[str, int | bytes]:
        """KVM_MEMORY_ENCRYPT_OP: run SEV command `cmd` with its struct's fields, named as in
        the kernel (LAUNCH_START: handle, policy; LAUNCH_UPDATE_DATA: uaddr, len; ...).
        Addresses are guest physical addresses. Returns the command's output fields
        (GUEST_STATUS -> policy, state, handle). `null_data=True` sends the kernel's NULL
        `data` pointer (the mirror allowlist test does), and no fields."""
        if null_data and fields:
            raise TypeError("null_data=True sends no fields")
        request = wire.SevIoctl(self._next_id(), cmd, None if null_data else fields)
        reply, _ = await self._call(request, wire.Ok)
        return dict(reply.fields or {})

    async def sev_ioctl_batch(
        self, entries: Sequence[tuple[int, dict[str, int | bytes] | None]]
    ) -> list[dict[str, int | bytes]]:
        """KVM_MEMORY_ENCRYPT_OP `(cmd, fields)` for each entry, in order, as that many
        `sev_ioctl` calls (`fields` None: the NULL `data` pointer), submitted together: one
        request to kvmstub for as many entries as fit one (`wire.MAX_BATCH`, a datagram),
        instead of one per ioctl. Returns each one's output fields.

        Raises:
            OSError: the first entry that failed, exactly as `sev_ioctl` raises it, with
                `batch_index` (its position in `entries`) and `batch_done` (the output fields
                of the entries before it, which ran); the entries after it did not run.
        """
        done: list[dict[str, int | bytes]] = []
        for chunk, request, data in self._batch_requests(entries):
            reply, _ = await self._call(request, wire.BatchReply, data=data)
            results = reply.results
            last_type = type(results[-1]) if results else None
            complete = len(results) == len(chunk) and last_type is wire.Ok
            stopped = len(results) <= len(chunk) and last_type is wire.Error
            if not (complete or stopped) or any(type(r) is not wire.Ok for r in results[:-1]):
                raise OSError(errno.EPROTO, "kvmstub: a batch reply that does not fit its batch")
            # Each decoded reply's fields are its own: handed on without a copy.
            done += [
                r.fields if r.fields is not None else {} for r in results if type(r) is wire.Ok
            ]
            last = results[-1]
            if isinstance(last, wire.Error):
                try:
                    _raise_for(last)
                except OSError as err:
                    err.batch_index = len(done)  # type: ignore[attr-defined]
                    err.batch_done = done  # type: ignore[attr-defined]
                    raise
        return done

    def _batch_requests(
        self, entries: Sequence[tuple[int, dict[str, int | bytes] | None]]
    ) -> Iterator[tuple[Sequence[object], wire.SevIoctlBatch, bytes | None]]:
        """The requests of a batch: (its entries, the request, its encoding if made). All
        entries in one request when they are few enough and it fits a datagram, which its
        encoding shows (a migration's batches of pages always do); else cut by `_chunks`."""
        if 0 < len(entries) <= wire.MAX_BATCH:
            request = self._batch_request(entries)
            data = wire.encode(request)
            if len(data) <= wire.MAX_DATAGRAM:
                yield entries, request, data
                return
        for chunk in _chunks(entries):
            yield chunk, self._batch_request(chunk), None

    def _batch_request(
        self, entries: Sequence[tuple[int, dict[str, int | bytes] | None]]
    ) -> wire.SevIoctlBatch:
        return wire.SevIoctlBatch(
            self._next_id(), tuple(wire.SevBatchEntry(cmd, fields) for cmd, fields in entries)
        )

    # Cross-host SEV migration (the SEND_* and RECEIVE_* commands), as a VMM issues them.
    # Each is one KVM_MEMORY_ENCRYPT_OP (two for sev_send_start: the length query first);
    # failures are OSError with the kernel's errno, a firmware failure EIO with `fw_error`.

    async def sev_send_start(
        self, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes
    ) -> tuple[bytes, int]:
        """KVM_SEV_SEND_START towards the platform whose PDH certificate and chains are given
        (the target's `sev_pdh_cert_export()` and `sev_amd_cert_chain()`): the session-length
        query, then the command. Returns (session blob, guest policy) for the target's
        `sev_receive_start`. The guest goes RUNNING -> SUPDATE and keeps running."""
        try:
            await self.sev_ioctl(uapi.KVM_SEV_SEND_START, session_len=0)
            raise OSError(errno.EPROTO, "kvmstub: SEND_START length query succeeded")
        except OSError as e:
            if getattr(e, "fw_error", None) != uapi.SEV_RET_INVALID_LEN:
                raise
            session_len = e.fields["session_len"]  # type: ignore[attr-defined]
        out = await self.sev_ioctl(
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

    async def sev_send_update_data(
        self, gpa: int, length: int = uapi.PAGE_SIZE, hdr_len: int = 52
    ) -> tuple[bytes, bytes]:
        """KVM_SEV_SEND_UPDATE_DATA of guest [gpa, gpa+length) (within one page, 16-byte
        aligned, a multiple of 16): returns (packet header, transport ciphertext)."""
        out = await self.sev_ioctl(
            uapi.KVM_SEV_SEND_UPDATE_DATA,
            hdr_uaddr=1,
            hdr_len=hdr_len,
            guest_uaddr=gpa,
            guest_len=length,
            trans_uaddr=1,
            trans_len=length,
        )
        return _packet_of(out)

    async def sev_send_update_data_batch(
        self, gpas: Sequence[int], length: int = uapi.PAGE_SIZE, hdr_len: int = 52
    ) -> list[tuple[bytes, bytes]]:
        """`sev_send_update_data` of each address in order, one KVM_SEV_SEND_UPDATE_DATA per
        page as the kernel takes them, submitted together (`sev_ioctl_batch`): the (header,
        ciphertext) of each. A failure raises as `sev_ioctl_batch` does, `batch_done` holding
        the (header, ciphertext) of the pages before it."""
        entries = [
            (uapi.KVM_SEV_SEND_UPDATE_DATA, _send_update_fields(gpa, length, hdr_len))
            for gpa in gpas
        ]
        try:
            out = await self.sev_ioctl_batch(entries)
        except OSError as err:
            done = getattr(err, "batch_done", None)
            if done is not None:
                err.batch_done = [_packet_of(fields) for fields in done]  # type: ignore[attr-defined]
            raise
        return [_packet_of(fields) for fields in out]

    async def sev_send_finish(self) -> None:
        """KVM_SEV_SEND_FINISH: the source guest is SENT and never runs again."""
        await self.sev_ioctl(uapi.KVM_SEV_SEND_FINISH)

    async def sev_send_cancel(self) -> None:
        """KVM_SEV_SEND_CANCEL: back to RUNNING, the channel zeroed; may start again."""
        await self.sev_ioctl(uapi.KVM_SEV_SEND_CANCEL)

    async def sev_receive_start(
        self, pdh_cert: bytes, session: bytes, policy: int, handle: int = 0
    ) -> int:
        """KVM_SEV_RECEIVE_START on a VM that did KVM_SEV_INIT: `pdh_cert` is the *source*
        platform's PDH certificate, `session` and `policy` what its sev_send_start returned.
        Binds the VM's ASID to the new guest (RUPDATE). Returns the firmware handle."""
        out = await self.sev_ioctl(
            uapi.KVM_SEV_RECEIVE_START,
            handle=handle,
            policy=policy,
            pdh=pdh_cert,
            session=session,
        )
        new = out["handle"]
        assert isinstance(new, int)
        return new

    async def sev_receive_update_data(self, gpa: int, hdr: bytes, trans: bytes) -> None:
        """KVM_SEV_RECEIVE_UPDATE_DATA: verify one packet and write it at guest `gpa` under
        this guest's key (EIO with fw_error BAD_MEASUREMENT, memory unchanged, if it does
        not verify)."""
        await self.sev_ioctl(
            uapi.KVM_SEV_RECEIVE_UPDATE_DATA,
            hdr=hdr,
            guest_uaddr=gpa,
            guest_len=len(trans),
            trans=trans,
        )

    async def sev_receive_update_data_batch(
        self, packets: Sequence[tuple[int, bytes, bytes]]
    ) -> None:
        """`sev_receive_update_data(gpa, hdr, trans)` of each packet in order, one
        KVM_SEV_RECEIVE_UPDATE_DATA per page, submitted together (`sev_ioctl_batch`). A
        failure raises as `sev_ioctl_batch` does: `batch_index` names the packet refused
        (its page unchanged), and the packets after it were not received."""
        await self.sev_ioctl_batch(
            [
                (
                    uapi.KVM_SEV_RECEIVE_UPDATE_DATA,
                    {"hdr": hdr, "guest_uaddr": gpa, "guest_len": len(trans), "trans": trans},
                )
                for gpa, hdr, trans in packets
            ]
        )

    async def sev_receive_finish(self) -> None:
        """KVM_SEV_RECEIVE_FINISH: the received guest is RUNNING."""
        await self.sev_ioctl(uapi.KVM_SEV_RECEIVE_FINISH)

    async def memory_encrypt_reg_region(self, addr: int, size: int) -> None:
        """KVM_MEMORY_ENCRYPT_REG_REGION (addr is a guest physical address here)."""
        await self._call(wire.RegRegion(self._next_id(), addr, size), wire.Ok)

    async def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """KVM_MEMORY_ENCRYPT_UNREG_REGION."""
        await self._call(wire.UnregRegion(self._next_id(), addr, size), wire.Ok)


def _chunks(
    entries: Sequence[tuple[int, dict[str, int | bytes] | None]],
) -> Iterator[Sequence[tuple[int, dict[str, int | bytes] | None]]]:
    """`entries` in runs that each fit one request: at most MAX_BATCH entries, and blobs
    (a page's header and ciphertext) well within a datagram."""
    start = size = 0
    for i, (_, fields) in enumerate(entries):
        entry_size = 16 + sum(  # msgpack: the entry's array and command; each field's key,
            len(k) + 10 + (len(v) if isinstance(v, bytes) else 0)  # header and value
            for k, v in (fields or {}).items()
        )
        if i > start and (i - start == wire.MAX_BATCH or size + entry_size > _BATCH_BYTES):
            yield entries[start:i]
            start, size = i, 0
        size += entry_size
    if start < len(entries):
        yield entries[start:]


# What a batch's entries may take of a datagram (the rest: the request's own fields).
_BATCH_BYTES: Final = wire.MAX_DATAGRAM - 4096


def _send_update_fields(gpa: int, length: int, hdr_len: int) -> dict[str, int | bytes]:
    return {
        "hdr_uaddr": 1,
        "hdr_len": hdr_len,
        "guest_uaddr": gpa,
        "guest_len": length,
        "trans_uaddr": 1,
        "trans_len": length,
    }


def _packet_of(out: dict[str, int | bytes]) -> tuple[bytes, bytes]:
    """SEND_UPDATE_DATA's output fields: (packet header, transport ciphertext)."""
    hdr, trans = out["hdr"], out["trans"]
    assert isinstance(hdr, bytes) and isinstance(trans, bytes)
    return hdr, trans


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except (OSError, OverflowError, ValueError):
        return False
    return True


class KvmRun:
    """The vCPU's shared kvm_run page. Only `immediate_exit` is modelled: set it and a KVM_RUN
    in flight leaves the guest at its next step with KVM_EXIT_INTR (as a signal would make it),
    and every KVM_RUN after it only completes the pending exit and fails with EINTR, until it
    is cleared. That is how a VMM pauses its vCPUs without waiting for their slices."""

    SIZE = 4096
    _IMMEDIATE_EXIT = 1  # struct kvm_run: request_interrupt_window u8, immediate_exit u8

    def __init__(self, page: mmap.mmap) -> None:
        self._page: mmap.mmap | None = page
        # Fault the page in, writable, now: its first write otherwise comes at a pause or a
        # resume, inside the blackout (a new VMM's resume: 4 vCPUs, about 45 µs).
        page[self._IMMEDIATE_EXIT] = page[self._IMMEDIATE_EXIT]

    @property
    def immediate_exit(self) -> bool:
        return self._page is not None and self._page[self._IMMEDIATE_EXIT] != 0

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        if self._page is not None:
            self._page[self._IMMEDIATE_EXIT] = 1 if value else 0

    def close(self) -> None:
        if self._page is not None:
            self._page.close()
            self._page = None


class Vcpu(_KvmFile):
    """A vCPU fd.

    An exit is completed as in KVM, where the VMM writes into kvm_run before re-entering:
    after an IN exit call `complete_io(data)`, after a hypercall exit
    `complete_hypercall(ret)`, after an MSR exit `complete_msr(error)`; the next `run()`
    hands it in. A completion stays pending until a `run()` succeeds.
    """

    _kind = "vcpu"

    def __init__(self, sock: socket.socket, kvm_run: KvmRun | None = None) -> None:
        super().__init__(sock)
        self._io_data: bytes | None = None
        self._hypercall_ret: int | None = None
        self._msr_error: int | None = None
        self._started: int | None = None  # the id of a KVM_RUN sent by start_run()
        self.kvm_run = kvm_run or KvmRun(mmap.mmap(-1, KvmRun.SIZE))

    def close(self) -> None:
        super().close()
        self.kvm_run.close()

    def complete_io(self, data: bytes) -> None:
        """The bytes of the IN the last exit asked for (kvm_run's io data page)."""
        self._io_data = bytes(data)

    def complete_hypercall(self, ret: int) -> None:
        """kvm_run.hypercall.ret for the last hypercall exit; negative values are stored as
        the u64 the kernel would see (e.g. -KVM_ENOSYS)."""
        self._hypercall_ret = ret & wire.U64_MAX

    def complete_msr(self, error: int = 0) -> None:
        """kvm_run.msr.error for the last KVM_EXIT_X86_WRMSR / RDMSR exit: 0 lets the
        access complete, anything else makes the guest take #GP. A missing completion is 0,
        as the kernel finds kvm_run.msr.error as it left it (zeroed at the exit)."""
        self._msr_error = error & 0xFF

    async def set_cpuid2(self, entries: Sequence[uapi.CpuidEntry]) -> None:
        """KVM_SET_CPUID2: what the guest's CPUID answers (`uapi.kvm_cpuid_leaves` builds
        the KVM paravirtual leaves). E2BIG for more than 256 entries; EINVAL for a
        different table once the vCPU has run."""
        entries_ = tuple(
            wire.WireCpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in entries
        )
        await self._call(wire.SetCpuid2(self._next_id(), entries_), wire.Ok)

    @property
    def run_in_flight(self) -> bool:
        """A KVM_RUN sent by `start_run` whose exit `run()` has not taken yet."""
        return self._started is not None

    def start_run(self) -> bool:
        """Send KVM_RUN now, without waiting: the next `run()` takes its exit instead of
        sending one. A VMM resuming many vCPUs starts them all from one task, back to back,
        as its vCPU threads would enter KVM_RUN together, rather than one task switch
        apart. Sends nothing and returns False when the fd is busy with another call (or
        closed, or its socket full): `run()` then works as usual.

        Until `run()` has taken the exit, other calls on this fd wait, as ioctls wait for
        a vCPU's mutex while it is in KVM_RUN."""
        sock = self._sock
        if sock is None or self._started is not None or not self._lock.try_acquire():
            return False
        request = wire.Run(
            self._next_id(), False, self._io_data, self._hypercall_ret, self._msr_error
        )
        try:
            sock.send(wire.encode(request), socket.MSG_NOSIGNAL)
        except OSError:  # full or broken: run() sends (and reports) it the usual way
            self._lock.release()
            return False
        _KvmFile.requests_made += 1
        self._started = request.id
        return True

    async def run(self, *, immediate_exit: bool = False) -> uapi.RunExit:
        """KVM_RUN: run a guest slice and return why it stopped. With `immediate_exit`, only
        the pending completion is delivered (KVM answers EINTR). After `start_run`, takes
        that KVM_RUN's exit (`immediate_exit` must then be False)."""
        if self._started is not None:
            if immediate_exit:
                raise RuntimeError("a KVM_RUN started by start_run() is in flight")
            return await self._finish_run()
        request = wire.Run(
            self._next_id(), immediate_exit, self._io_data, self._hypercall_ret, self._msr_error
        )
        try:
            reply, _ = await self._call(request, wire.RunReply)
        except InterruptedError:
            # EINTR (immediate_exit) still took the completion, as KVM does.
            self._io_data = self._hypercall_ret = self._msr_error = None
            raise
        self._io_data = self._hypercall_ret = self._msr_error = None
        return reply.exit

    async def _finish_run(self) -> uapi.RunExit:
        request_id, self._started = self._started, None
        assert request_id is not None
        try:
            sock = self._sock
            if sock is None:
                raise OSError(errno.EBADF, f"{self._kind} fd was closed")
            raw, fds = await self._reply_to(sock, request_id)
        finally:
            self._lock.release()
        try:
            reply, _ = self._judge(raw, fds, wire.RunReply)
        except InterruptedError:
            self._io_data = self._hypercall_ret = self._msr_error = None  # as in run()
            raise
        self._io_data = self._hypercall_ret = self._msr_error = None
        return reply.exit

    async def get_regs(self) -> uapi.Regs:
        """KVM_GET_REGS (EINVAL once an SEV-ES vCPU's state is protected)."""
        reply, _ = await self._call(wire.GetRegs(self._next_id()), wire.RegsReply)
        return wire.regs_from_wire(reply.regs)

    async def set_regs(self, regs: uapi.Regs) -> None:
        """KVM_SET_REGS."""
        request = wire.SetRegs(self._next_id(), wire.regs_to_wire(regs))
        await self._call(request, wire.Ok)


def default_socket() -> str:
    """Where kvmstub listens unless told otherwise (the daemon and VMMs share this rule):
    $KVMSTUB_SOCKET, else $XDG_RUNTIME_DIR/kvmstub/kvm.sock, else /run/kvmstub/kvm.sock."""
    if os.environ.get("KVMSTUB_SOCKET"):
        return os.environ["KVMSTUB_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "kvmstub", "kvm.sock")
    return "/run/kvmstub/kvm.sock"


def requests_made() -> int:
    """How many requests (ioctls) this process has sent to kvmstub so far."""
    return _KvmFile.requests_made


async def open_kvm(path: str | os.PathLike[str]) -> Kvm:
    """Connect to the kvmstub daemon at `path`: kvmstub's `open("/dev/kvm")`."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return Kvm(socket.socket(fileno=sock.detach()))


def read_stats(path: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, Any]:
    """Blocking: one Stats request on a fresh connection (for `kvmstub stats` and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.send(wire.encode(wire.Stats(1)))
        data, ancdata, _, _ = sock.recvmsg(wire.MAX_DATAGRAM, _ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_of(ancdata)
    if not data:
        raise OSError(errno.EIO, "kvmstub: daemon closed the connection")
    try:
        reply = wire.decode_reply(data)
    except wire.WireError as e:
        _close_all(fds)
        raise OSError(errno.EPROTO, f"kvmstub: {e}") from None
    if isinstance(reply, wire.Spilled):
        reply = _read_spilled(fds, reply.id)
    else:
        _close_all(fds)
    if isinstance(reply, wire.Error):
        _raise_for(reply)
    if not isinstance(reply, wire.StatsReply):
        raise OSError(errno.EPROTO, f"kvmstub: unexpected reply {type(reply).__name__}")
    return reply.stats
