"""The kvmstub daemon: the model of the host kernel behind a /dev/kvm-like Unix socket.

Connecting to the listening socket is `open("/dev/kvm")`: the accepted connection is the
system fd. Every VM or vCPU given to a client is one end of a SOCK_SEQPACKET socketpair made
here; the client end is sent with SCM_RIGHTS and our copy closed, the other end stays here
(with SO_PASSCRED) and one trio task serves it. So:

- an ioctl is a request datagram on the object's own fd and a reply datagram on the same fd:
  holding the fd is what lets a process issue requests, as with a kernel fd;
- the kernel fills in the sender's pid (SCM_CREDENTIALS) on every datagram; it is passed to
  the model as `mm`, which enforces `kvm->mm != current->mm -> EIO` (reference section 4);
- when every copy of a client end is closed, anywhere, our end hangs up: that is the fd's
  release, and the model's `put()` runs. A client that dies releases what it held;
- a fd argument arrives as SCM_RIGHTS with its request. A socket whose inode is the client end
  of a VM we made is that VM; anything else is "not a KVM file" (the model answers EBADF).

Nothing a client sends can stop the daemon: a malformed request gets an error reply, and every
model call is wrapped so that an unexpected exception becomes an error reply and a log line.
The model is synchronous. KVM_RUN is not: a vCPU that enters the guest joins the run queue of
`_Cpu`, which runs every vCPU in KVM_RUN, of every VM, in turn for a short quantum and lets
the other requests in between quanta, as a host CPU would time-share vCPU threads. So one
vCPU's slice never holds up another vCPU or an ioctl, and a vCPU's KVM_RUN ends when its
guest exits, its slice is spent or its kvm_run page asks it to (the kick). A vCPU in KVM_RUN
holds its vcpu->mutex: its other ioctls wait for the run to end, and MOVE waits at section 1
step 7 until it can take the mutexes of both VMs' vCPUs. The per-request path uses
non-blocking socket calls on the raw socket plus trio's readiness waits, which is measurably
cheaper than trio.socket's wrappers (see tools/).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import logging
import mmap
import os
import select
import signal
import socket
import stat
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import msgspec
import trio

from kvmstub import uapi, wire
from kvmstub.memory import dirty_bitmap_bytes
from kvmstub.model import Host, Vcpu, Vm

log = logging.getLogger(__name__)

_CREDENTIALS: Final = struct.Struct("iII")  # struct ucred: pid, uid, gid
_ANCBUFSIZE: Final = socket.CMSG_SPACE(_CREDENTIALS.size) + socket.CMSG_SPACE(
    wire.MAX_FDS_RECEIVED * 4
)
# How often an fd whose holder shut down its write side is checked for the final close.
_HANGUP_POLL_SECONDS: Final = 0.05
_SOCKET_MODE: Final = 0o660
_MAX_MESSAGE: Final = 1000  # characters of an error message sent back
# recvmsg flags as plain ints: an operation on the socket module's flag enums costs about a
# microsecond, on every request.
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


class Kind(Enum):
    """What a daemon-side socket end stands for."""

    SYSTEM = "system"
    VM = "vm"
    VCPU = "vcpu"


_ALLOWED: Final = {
    Kind.SYSTEM: wire.SYSTEM_REQUESTS,
    Kind.VM: wire.VM_REQUESTS,
    Kind.VCPU: wire.VCPU_REQUESTS,
}
# What the kernel answers for an ioctl number a file does not handle: kvm_dev_ioctl ->
# kvm_arch_dev_ioctl's default (EINVAL), kvm_vm_ioctl -> kvm_arch_vm_ioctl's (ENOTTY),
# kvm_vcpu_ioctl -> kvm_arch_vcpu_ioctl's (EINVAL), all in arch/x86/kvm/x86.c.
_UNKNOWN_IOCTL: Final = {Kind.SYSTEM: errno.EINVAL, Kind.VM: errno.ENOTTY, Kind.VCPU: errno.EINVAL}
_DEFAULT_ANSWER_ERRNOS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError)


@dataclass(eq=False, slots=True)
class _End:
    """Our end of one client object."""

    sock: socket.socket
    kind: Kind
    vm: Vm | None = None  # the VM (for a vCPU end: its VM, for the gate)
    vcpu: Vcpu | None = None
    key: tuple[int, int] | None = None  # (st_dev, st_ino) of the client end, for VM ends
    # A vCPU's kvm_run page, shared with its client (mmap of the vCPU fd in KVM): the VMM
    # writes immediate_exit there without a system call; we read it at KVM_RUN entry and
    # between guest steps.
    run_page: mmap.mmap | None = None
    # vcpu->mutex: held by every ioctl on the vCPU, for a KVM_RUN until the run ends.
    mutex: trio.Semaphore | None = None
    # For a vCPU end: whose guest vCPU it runs (see _Blackouts), and when it last stepped.
    guest: tuple[int, int, int] | None = None
    last_step_ns: int = 0

    def kicked(self) -> bool:
        """immediate_exit in the kvm_run page: what a signal to the vCPU thread stands for."""
        page = self.run_page
        return page is not None and page[_IMMEDIATE_EXIT] != 0


@dataclass(eq=False, slots=True)
class _InRun:
    """A vCPU inside KVM_RUN: the request to answer when the run ends."""

    end: _End
    vcpu: Vcpu
    rid: int


_Answer = tuple[wire.Reply, list[int] | None]
# What a request handler gives back: the answer, or None when a KVM_RUN was taken into the
# run queue (the CPU answers it later), or a coroutine function that must wait (a vCPU
# mutex) before it can answer.
_Handled = _Answer | None | Callable[[], Awaitable[_Answer | None]]


def _error(
    request_id: int,
    err: int,
    message: str,
    fw_error: int | None = None,
    fields: dict[str, int | bytes] | None = None,
) -> wire.Error:
    if not 1 <= err <= 4095:
        err = errno.EINVAL
    if fw_error is not None and not 0 <= fw_error <= wire.U32_MAX:
        fw_error = None
    return wire.Error(request_id, err, message[:_MAX_MESSAGE], fw_error, fields or None)


# struct kvm_run: request_interrupt_window (u8) at 0, immediate_exit (u8) at 1.
RUN_PAGE_SIZE = 4096
_IMMEDIATE_EXIT = 1


def _failed(request: wire.Request, e: Exception) -> wire.Error:
    """The error reply for what the model raised on `request`: an OSError as the ioctl's
    errno (and SEV status), another exception logged as a bug. Called while `e` is being
    handled, where the log finds its traceback."""
    if isinstance(e, OSError):
        return _error(
            request.id,
            e.errno or errno.EINVAL,
            e.strerror or str(e),
            getattr(e, "fw_error", None),
            getattr(e, "fields", None),
        )
    if isinstance(e, _DEFAULT_ANSWER_ERRNOS):
        log.exception("model refused %s with a non-OSError", type(request).__name__)
        return _error(request.id, errno.EINVAL, f"kvmstub: {type(e).__name__}: {e}")
    log.exception("model failed on %s", type(request).__name__)
    return _error(request.id, errno.EFAULT, f"kvmstub: internal error: {e!r}")


def _run_page() -> tuple[int, mmap.mmap]:
    """A vCPU's kvm_run page: a sealed one-page memfd, mapped here and handed to the client."""
    fd = os.memfd_create("kvm_run", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, RUN_PAGE_SIZE)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        page = mmap.mmap(fd, RUN_PAGE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd, page


def _try_acquire(mutex: trio.Semaphore) -> bool:
    try:
        mutex.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[int | None, list[int]]:
    """The sender's pid (None if the kernel attached none) and the fds that came."""
    pid: int | None = None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
        elif kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDENTIALS.size:
            pid = _CREDENTIALS.unpack_from(payload)[0]
    return pid, fds


def _check_log_fits(vm: Vm, slot: int) -> None:
    """kvmstub's limit, not the kernel's: a dirty log travels in one reply, at most
    MAX_SPILLED bytes, so a logging slot over 2 TiB cannot be read (ENOMEM, said first so
    that no dirty bit is lost to a reply that cannot be sent). Its runs never take more
    than the bitmap and a few dozen bytes (runs closer than a dozen bytes of framing are
    merged, `memory._RUN_GAP`), within the 64 kept apart here."""
    if slot >> 16 or vm.memory is None:
        return
    for s in vm.memory.slots():
        if s.slot == slot and s.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            size = dirty_bitmap_bytes(s.memory_size // uapi.PAGE_SIZE)
            if size > wire.MAX_SPILLED - 64:
                raise OSError(
                    errno.ENOMEM,
                    f"kvmstub: the dirty log of slot {slot} is {size} bytes, more than a "
                    f"reply carries ({wire.MAX_SPILLED}): use memory slots of at most 2 TiB",
                )


def _spill(data: bytes) -> int:
    """A memfd holding `data`, for a reply bigger than a datagram."""
    fd = os.memfd_create("kvmstub-reply", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hung_up(sock: socket.socket) -> bool:
    """True once every copy of the peer end is closed. EOF alone is not enough: a holder
    that only shut down its write side still has the fd open (and may pass it on)."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP is always reported
    return any(events & select.POLLHUP for _, events in poller.poll(0))


DEFAULT_QUANTUM_NS = 10_000
"""How long one vCPU in KVM_RUN runs before the next one's turn (a few guest steps), while at
most _ROTATION vCPUs take turns; shorter when more do."""
_ROTATION = 4


def _guest_of(vcpu: Vcpu) -> tuple[int, int, int] | None:
    """Which guest vCPU `vcpu` runs: the memfd (inode) and file offset behind guest physical
    address 0, and the vCPU's index. None while no memory slot covers address 0."""
    memory = vcpu.vm.memory
    for slot in memory.slots() if memory is not None else []:
        if slot.guest_phys_addr == 0:
            return slot.inode, slot.offset, vcpu.index
    return None


class _Blackouts:
    """What a guest saw of each handoff, measured where its vCPUs step: for each vCPU, from
    its last step in the VM it left to its first step in the VM that took it over. The
    guest's own figure (the largest gap of the serial line the pause falls in) also holds
    whatever stalled it just before or after; this one is the blackout alone. Reported per
    VM by `kvmstub stats` (handoff_gap_us: the largest over its vCPUs).

    A guest vCPU is known by where its memory lives, not by its VM: a VM that takes a guest
    over maps the same memfd and pairs vCPUs by index, as the move of the encryption context
    does. (A copy handoff maps a fresh memfd: its VM gets no figure, nor does one whose old
    VM was gone before it first ran.) Costs one clock read and one store per stepping turn."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._latest: dict[tuple[int, int, int], _End] = {}  # guest vCPU -> last end to step
        self._gaps_ns: dict[int, dict[int, int]] = {}  # VM id -> vCPU index -> its blackout

    def first_step(self, end: _End, vcpu: Vcpu, started_ns: int) -> None:
        """`vcpu` (on `end`) took its first steps, in a turn that started at `started_ns`."""
        end.guest = guest = _guest_of(vcpu)
        if guest is None:
            return
        before = self._latest.get(guest)
        self._latest[guest] = end
        if before is None or before.vm is vcpu.vm or not before.last_step_ns:
            return
        for vm_id in [i for i in self._gaps_ns if i not in self._host.vms]:
            del self._gaps_ns[vm_id]  # VMs gone since
        self._gaps_ns.setdefault(vcpu.vm.id, {})[vcpu.index] = started_ns - before.last_step_ns

    def released(self, end: _End) -> None:
        """`end`'s last fd is closed: its steps can no longer be anyone's "before"."""
        if end.guest is not None and self._latest.get(end.guest) is end:
            del self._latest[end.guest]

    def stats_of(self, vm_id: int) -> dict[str, Any]:
        gaps = self._gaps_ns.get(vm_id, {})
        return {
            "handoff_gap_us": round(max(gaps.values()) / 1000, 1) if gaps else None,
            "handoff_gap_vcpus": len(gaps),
        }


class _Cpu:
    """The CPU the guests run on: every vCPU in KVM_RUN takes turns of one quantum each, with
    a trio checkpoint after every turn so that requests (a KVM_RUN coming back from an exit,
    a pause, a MOVE) are served within a quantum, never behind whole slices of other vCPUs.
    The vCPU's run ends, and the CPU answers its KVM_RUN, when its guest exits to the VMM,
    its slice is spent or it is kicked."""

    def __init__(self, daemon: Daemon, quantum_ns: int, halt_poll_ns: int = 0) -> None:
        self._daemon = daemon
        self._clock = daemon.host_clock
        self._quantum_ns = quantum_ns
        self._halt_poll_ns = halt_poll_ns
        self._queue: deque[_InRun] = deque()
        self._idle = trio.lowlevel.ParkingLot()

    def add(self, run: _InRun) -> None:
        """A vCPU entering KVM_RUN takes the next turn: it comes back from its VMM (an exit
        served, a pause lifted), as a thread just woken is favoured by the host's scheduler;
        the vCPUs it passes have had their turns meanwhile."""
        self._queue.appendleft(run)
        if self._idle:
            self._idle.unpark_all()

    def drop(self, end: _End) -> bool:
        """The vCPU's fd was released: forget its run, if it was in one (True). A vCPU in
        KVM_RUN holds its mutex; with the mutex free there is no run to look for (an old
        VMM closing its 256 vCPU fds used to scan the new VM's 256 runs for each)."""
        if end.mutex is None or end.mutex.value:
            return False
        before = len(self._queue)
        self._queue = deque(r for r in self._queue if r.end is not end)
        return len(self._queue) != before

    def quantum_ns(self) -> int:
        """This turn's length: the full quantum while a few vCPUs take turns, shrinking as
        more do, so that a vCPU waits about _ROTATION quanta between turns however many are
        in KVM_RUN (at least one guest step per turn, whatever the quantum)."""
        waiting = len(self._queue)
        if waiting <= _ROTATION:
            return self._quantum_ns
        return self._quantum_ns * _ROTATION // waiting

    async def loop(self) -> None:
        while True:
            if not self._queue:
                if not await self._poll():
                    await self._idle.park()
                continue
            quantum_ns = self.quantum_ns()
            run = self._queue.popleft()
            if self.take_turn(run, quantum_ns):
                self._queue.append(run)
            elif run.end.kicked():
                self.end_kicked()
            await trio.lowlevel.checkpoint()

    async def _poll(self) -> bool:
        """KVM's halt polling (halt_poll_ns): with no vCPU to run, look for work a while
        before sleeping, each request served meanwhile starting the while again. True once
        a vCPU is runnable. A request then needs no wake-up of this process (on a small VM
        host about 40 µs to wake a sleeper on another CPU, 16 of them spent by the sender),
        and a handoff's blackout is a chain of such requests: the MOVE, then the KVM_RUNs.
        The price is the CPU time spent polling, worth paying only on a CPU of our own."""
        if not self._halt_poll_ns:
            return False
        clock, daemon = self._clock, self._daemon
        served = daemon.requests_served
        deadline = clock() + self._halt_poll_ns
        while not self._queue:
            await trio.lowlevel.checkpoint()  # a round of the event loop: epoll, requests
            if daemon.requests_served != served:
                served = daemon.requests_served
                deadline = clock() + self._halt_poll_ns
            elif clock() >= deadline:
                return False
        return True

    def take_turn(self, run: _InRun, quantum_ns: int) -> bool:
        """Run `run`'s vCPU for one quantum. True while it stays in KVM_RUN; else its
        KVM_RUN has been answered."""
        vcpu = run.vcpu
        steps = vcpu.steps
        clock = self._clock
        started = 0 if steps else clock()
        reply: wire.Reply
        try:
            exit_ = vcpu.run_for(quantum_ns, run.end.kicked)
        except OSError as e:
            reply = _error(run.rid, e.errno or errno.EFAULT, e.strerror or str(e))
        except Exception as e:
            log.exception("KVM_RUN failed inside the guest")
            reply = _error(run.rid, errno.EFAULT, f"kvmstub: internal error: {e!r}")
        else:
            if vcpu.steps != steps:
                if not steps:
                    self._daemon.blackouts.first_step(run.end, vcpu, started)
                run.end.last_step_ns = clock()
            if exit_ is None:
                return True
            reply = wire.RunReply(run.rid, exit_)
        self._daemon.end_run(run, reply)
        return False

    def end_kicked(self) -> None:
        """A turn found its vCPU kicked: every other vCPU kicked by now leaves KVM_RUN at
        once too, without a guest step. A kick stands for a signal to each vCPU thread; with
        a CPU per vCPU thread, as a host has, they all leave the guest together. Waiting for
        each one's own turn instead stretched a VMM's pause by a round of the run queue:
        milliseconds with 256 vCPUs in KVM_RUN."""
        staying: deque[_InRun] = deque()
        for run in self._queue:
            if not run.end.kicked() or self.take_turn(run, 0):
                staying.append(run)
        self._queue = staying


class Daemon:
    """The fd table and the request dispatch, over one `Host`.

    Args:
        host: the model of the kernel.
        nursery: where the per-fd tasks and the CPU run; cancelling it stops everything.
        quantum_ns: how long a vCPU in KVM_RUN runs before the next one's turn.
        halt_poll_ns: how long to poll for work with no vCPU to run before sleeping (0: off).
    """

    def __init__(
        self,
        host: Host,
        nursery: trio.Nursery,
        *,
        quantum_ns: int = DEFAULT_QUANTUM_NS,
        halt_poll_ns: int = 0,
    ) -> None:
        self._host = host
        self._nursery = nursery
        self._vms: dict[tuple[int, int], Vm] = {}  # client-end inode -> VM
        self._mutexes: dict[Vcpu, trio.Semaphore] = {}  # vcpu->mutex of each vCPU with an fd
        self.host_clock = host.clock
        self.blackouts = _Blackouts(host)
        self.requests_served = 0
        self._cpu = _Cpu(self, quantum_ns, halt_poll_ns)
        nursery.start_soon(self._cpu.loop)
        # One receive buffer for every task: a datagram is decoded before the next await.
        self._buffer = bytearray(wire.MAX_DATAGRAM)
        self._view = memoryview(self._buffer)

    # --- connections ------------------------------------------------------------------------

    async def accept_loop(self, listener: socket.socket) -> None:
        """Accept connections forever; each one is a system fd."""
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as e:
                # EMFILE and friends: refuse this one, keep serving; don't spin.
                log.warning("accept failed: %s", e)
                await trio.sleep(0.01)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._nursery.start_soon(self._serve_end, _End(conn, Kind.SYSTEM))

    async def _serve_end(self, end: _End) -> None:
        """Serve requests on one end until every copy of the client end is closed."""
        sock = end.sock
        buffer = self._buffer
        view = self._view
        try:
            while True:
                # Wait first: a client waits for each reply before it sends again, so a
                # receive right after replying would almost always fail with EAGAIN. One
                # wait per datagram also makes each request a checkpoint (fairness).
                await trio.lowlevel.wait_readable(sock)
                try:
                    nbytes, ancdata, msg_flags, _ = sock.recvmsg_into(
                        [buffer], _ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    continue
                except OSError as e:
                    log.debug("%s end: receive failed (%s); releasing", end.kind.value, e)
                    return
                if nbytes == 0 and not ancdata:
                    # End of file (a real datagram, even an empty one, carries credentials
                    # because our end has SO_PASSCRED).
                    if end.kind is not Kind.SYSTEM:
                        while not _hung_up(sock):
                            await trio.sleep(_HANGUP_POLL_SECONDS)
                    return
                handled = self._handle(end, view[:nbytes], ancdata, msg_flags)
                if callable(handled):
                    handled = await handled()
                if handled is None:
                    continue  # a KVM_RUN: the CPU answers it
                await self._send(sock, *handled)
        finally:
            self._release(end)

    def _release(self, end: _End) -> None:
        """The client end's last copy is closed (or we are shutting down): drop the fd."""
        end.sock.close()
        if end.mutex is not None:
            if self._cpu.drop(end):
                # The run's mutex, which a MOVE at step 7 may be waiting for. (In the kernel
                # a KVM_RUN in flight holds its file; here the run ends with its last fd.)
                end.mutex.release()
            if end.vcpu is not None:
                self._mutexes.pop(end.vcpu, None)
        if end.run_page is not None:
            end.run_page.close()
            end.run_page = None
        self.blackouts.released(end)
        if end.key is not None:
            self._vms.pop(end.key, None)
        obj = end.vcpu if end.kind is Kind.VCPU else end.vm
        if obj is None:
            return
        try:
            obj.put()
        except Exception:
            log.exception("releasing a %s raised; carrying on", end.kind.value)

    async def _send(
        self, sock: socket.socket, reply: wire.Reply, handout: list[int] | None
    ) -> None:
        """Send one reply, with the fds of a new object (`handout`, closed here after)."""
        data = self._encode(reply)
        attached = handout
        spilled = None
        if len(data) > wire.MAX_DATAGRAM:
            spilled = _spill(data)
            data = wire.encode(wire.Spilled(reply.id))
            attached = [spilled]
        try:
            while True:
                try:
                    if attached is None:
                        sock.send(data, socket.MSG_NOSIGNAL)
                    else:
                        fds = array.array("i", attached)
                        sock.sendmsg(
                            [data],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
                            socket.MSG_NOSIGNAL,
                        )
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                except OSError as e:
                    # The holder shut down its read side or is gone: nobody can hear the
                    # reply. The read side will see the hangup and release the object.
                    log.debug("reply not delivered: %s", e)
                    return
        finally:
            if handout is not None:
                # Our copies of the new fds: once closed, only the client holds them.
                _close_fds(handout)
            if spilled is not None:
                os.close(spilled)

    def end_run(self, run: _InRun, reply: wire.Reply) -> None:
        """A KVM_RUN is over: answer it at once from the CPU (no hop through the fd's task)
        and release the vCPU's mutex."""
        end = run.end
        if end.mutex is not None:
            end.mutex.release()
        data = self._encode(reply)
        try:
            end.sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self._nursery.start_soon(self._send, end.sock, reply, None)
        except OSError as e:
            log.debug("KVM_RUN reply not delivered: %s", e)

    def _encode(self, reply: wire.Reply) -> bytes:
        try:
            data = wire.encode(reply)
        except Exception:
            log.exception("cannot encode %r", reply)
            data = wire.encode(_error(reply.id, errno.EFAULT, "kvmstub: reply not encodable"))
        if len(data) > wire.MAX_SPILLED:
            message = f"kvmstub: reply exceeds {wire.MAX_SPILLED} bytes"
            data = wire.encode(_error(reply.id, errno.E2BIG, message))
        return data

    # --- one request ------------------------------------------------------------------------

    def _handle(
        self,
        end: _End,
        data: memoryview,
        ancdata: list[tuple[int, int, bytes]],
        msg_flags: int,
    ) -> _Handled:
        """Answer one datagram. Every fd that came with it is closed before returning."""
        self.requests_served += 1
        pid, fds = _parse_ancillary(ancdata)
        try:
            return self._handle_request(end, data, pid, fds, msg_flags)
        finally:
            _close_fds(fds)

    def _handle_request(
        self, end: _End, data: memoryview, pid: int | None, fds: list[int], msg_flags: int
    ) -> _Handled:
        if pid is None:
            # Cannot happen with SO_PASSCRED set before the end was handed out.
            return _error(wire.request_id_of(data), errno.EPERM, "kvmstub: no credentials"), None
        if msg_flags & _TRUNCATED:
            what = (
                f"datagram larger than {wire.MAX_DATAGRAM} bytes"
                if msg_flags & _MSG_TRUNC
                else f"more than {wire.MAX_FDS_RECEIVED} fds"
            )
            return self._refuse(end, pid, wire.request_id_of(data), errno.EINVAL, what), None
        try:
            request = wire.decode_request(data)
        except wire.WireError as e:
            return self._refuse(end, pid, wire.request_id_of(data), errno.EINVAL, str(e)), None
        if type(request) not in _ALLOWED[end.kind]:
            err = _UNKNOWN_IOCTL[end.kind]
            message = f"{type(request).__name__} is not a {end.kind.value} fd ioctl"
            return self._refuse(end, pid, request.id, err, message), None
        if len(fds) > wire.declared_fds(request):
            message = f"{type(request).__name__} carries {len(fds)} fds, declares fewer"
            return self._refuse(end, pid, request.id, errno.EINVAL, message), None
        mutex = end.mutex
        if mutex is not None and not self._gated(end, pid):
            # kvm_vcpu_ioctl: the mm / vm_dead gate, then mutex_lock_killable(&vcpu->mutex).
            if not _try_acquire(mutex):
                return partial(self._after_mutex, end, request, pid)
            return self._with_mutex(end, request, pid)
        return self._answer(request, lambda: self._dispatch(end, request, pid, fds))

    def _with_mutex(self, end: _End, request: wire.Request, pid: int) -> _Handled:
        """A vCPU ioctl holding the vCPU's mutex: released after it, unless a KVM_RUN took
        the vCPU into the guest (the CPU releases it when the run ends)."""
        assert end.mutex is not None
        handled: _Handled = None
        try:
            handled = self._answer(request, lambda: self._dispatch(end, request, pid, []))
        finally:
            if handled is not None:
                end.mutex.release()
        return handled

    async def _after_mutex(self, end: _End, request: wire.Request, pid: int) -> _Answer | None:
        """A vCPU ioctl that came while the vCPU was busy (in KVM_RUN): wait for it."""
        assert end.mutex is not None
        await end.mutex.acquire()
        handled = self._with_mutex(end, request, pid)
        assert not callable(handled)
        return handled

    def _answer(self, request: wire.Request, call: Callable[[], _Handled]) -> _Handled:
        """`call`'s answer, with an error reply for whatever the model raised."""
        try:
            return call()
        except Exception as e:
            return _failed(request, e), None

    def _refuse(self, end: _End, pid: int, request_id: int, err: int, message: str) -> wire.Error:
        """An error the daemon answers itself. kvm_vm_ioctl and kvm_vcpu_ioctl begin with the
        mm / vm_dead check, so a VM or vCPU ioctl from another process is EIO before anything
        else is looked at, and our own refusals keep that order."""
        if self._gated(end, pid):
            return _error(request_id, errno.EIO, "kvmstub: VM is dead or not the caller's")
        return _error(request_id, err, f"kvmstub: {message}")

    def _gated(self, end: _End, pid: int) -> bool:
        """The model's gate (reference section 4), for requests the model never sees."""
        vm = end.vm
        if vm is None:
            return False
        if pid != vm.creator:
            return True
        # move_into_dead_ok lifts the vm_dead half for VM ioctls only (the model's rule).
        return vm.dead and (end.kind is Kind.VCPU or not self._host.move_into_dead_ok)

    def _dispatch(self, end: _End, request: wire.Request, pid: int, fds: list[int]) -> _Handled:
        host = self._host
        rid = request.id
        vcpu = end.vcpu
        vm = end.vm
        # The kind check above guarantees which of vm / vcpu is set for each request type.
        match request:
            case wire.Run():
                assert vcpu is not None
                failed = vcpu.enter(
                    pid,
                    immediate_exit=request.immediate_exit or end.kicked(),
                    io_data=request.io_data,
                    hypercall_ret=request.hypercall_ret,
                    msr_error=request.msr_error,
                )
                if failed is not None:
                    return wire.RunReply(rid, failed), None
                self._cpu.add(_InRun(end, vcpu, rid))
                return None
            case wire.GetApiVersion():
                return wire.Ok(rid, host.get_api_version()), None
            case wire.CheckExtension():
                if self._gated(end, pid):  # on a VM fd it is a VM ioctl, gate included
                    raise OSError(errno.EIO, "KVM_CHECK_EXTENSION: VM is dead or not yours")
                return wire.Ok(rid, host.check_extension(request.cap)), None
            case wire.CreateVm():
                new_vm = host.create_vm(pid, request.vm_type)
                return self._hand_out(rid, new_vm, None, new_vm.put)
            case wire.Stats():
                return wire.StatsReply(rid, self._stats()), None
            case wire.SevIssueCmd():
                fields = None if request.fields is None else dict(request.fields)
                return wire.Ok(rid, 0, host.sev_issue_cmd(request.cmd, fields)), None
            case wire.CreateVcpu():
                assert vm is not None
                new_vcpu = vm.create_vcpu(pid, request.vcpu_id)
                return self._hand_out(rid, vm, new_vcpu, new_vcpu.put)
            case wire.SetUserMemoryRegion():
                assert vm is not None
                vm.set_user_memory_region(
                    pid,
                    request.slot,
                    request.flags,
                    request.guest_phys_addr,
                    request.memory_size,
                    fds[0] if fds else -1,
                    request.offset,
                )
                return wire.Ok(rid), None
            case wire.GetDirtyLog():
                assert vm is not None
                if not self._gated(end, pid):
                    _check_log_fits(vm, request.slot)  # before the log is read and cleared
                log = vm.get_dirty_log_runs(pid, request.slot)
                # Only the runs that may be non-zero travel; the client writes the zeros.
                return wire.DirtyLogReply(rid, log.size, log.runs), None
            case wire.ClearDirtyLog():
                assert vm is not None
                vm.clear_dirty_log(
                    pid, request.slot, request.first_page, request.num_pages, request.bitmap
                )
                return wire.Ok(rid), None
            case wire.EnableCap():
                assert vm is not None
                args: list[int | Vm | None] = [0, 0, 0, 0]  # struct kvm_enable_cap.args[4]
                args[: len(request.args)] = request.args
                if request.cap in wire.FD_ARG_CAPS:
                    # args[0] is an fd: only an fd that came with the request can name a
                    # VM; a bare number names nothing here (EBADF from the model).
                    args[0] = self._vm_of_fd(fds[0]) if request.fd_arg == 0 and fds else None
                return self._enable_cap(
                    request, vm.enable_cap_steps(pid, request.cap, request.flags, args), args[0]
                )
            case wire.SetMsrFilter():
                assert vm is not None
                ranges = [uapi.MsrFilterRange(*msgspec.structs.astuple(r)) for r in request.ranges]
                vm.set_msr_filter(pid, request.flags, ranges)
                return wire.Ok(rid), None
            case wire.SevIoctl():
                assert vm is not None
                fields = None if request.fields is None else dict(request.fields)
                out = vm.sev_ioctl(pid, request.cmd, fields)
                return wire.Ok(rid, 0, out), None
            case wire.SevIoctlBatch():
                assert vm is not None
                return self._sev_batch(vm, request, pid), None
            case wire.RegRegion():
                assert vm is not None
                vm.reg_region(pid, request.addr, request.size)
                return wire.Ok(rid), None
            case wire.UnregRegion():
                assert vm is not None
                vm.unreg_region(pid, request.addr, request.size)
                return wire.Ok(rid), None
            case wire.SetCpuid2():
                assert vcpu is not None
                entries = [uapi.CpuidEntry(*msgspec.structs.astuple(e)) for e in request.entries]
                vcpu.set_cpuid2(pid, entries)
                return wire.Ok(rid), None
            case wire.GetRegs():
                assert vcpu is not None
                return wire.RegsReply(rid, wire.regs_to_wire(vcpu.get_regs(pid))), None
            case wire.SetRegs():
                assert vcpu is not None
                vcpu.set_regs(pid, wire.regs_from_wire(request.regs))
                return wire.Ok(rid), None
        raise AssertionError(f"no handler for {type(request).__name__}")  # pragma: no cover

    def _sev_batch(self, vm: Vm, request: wire.SevIoctlBatch, pid: int) -> wire.BatchReply:
        """Each entry as its own KVM_MEMORY_ENCRYPT_OP (`SevIoctl` above: the same model
        call, the same errors), in order, until the first that fails."""
        rid = request.id
        sev_ioctl = vm.sev_ioctl
        results: list[wire.Ok | wire.Error] = []
        for entry in request.entries:
            fields = None if entry.fields is None else dict(entry.fields)
            try:
                out = sev_ioctl(pid, entry.cmd, fields)
            except Exception as e:  # as `_answer` answers a SevIoctl
                results.append(_failed(request, e))
                break
            results.append(wire.Ok(rid, 0, out))
        return wire.BatchReply(rid, tuple(results))

    def _enable_cap(
        self,
        request: wire.EnableCap,
        steps: Generator[list[Vcpu], None, int],
        source: int | Vm | None,
    ) -> _Handled:
        """Drive KVM_ENABLE_CAP. MOVE stops at section 1 step 7 with the vCPUs whose mutexes
        it takes: when none is in KVM_RUN it goes on at once, otherwise it waits for them.
        The source VM is referenced meanwhile, as the ioctl's fdget would hold its file."""
        try:
            needed = next(steps)
        except StopIteration as done:
            return wire.Ok(request.id, done.value), None
        mutexes = [m for m in (self._mutexes.get(v) for v in needed) if m is not None]
        taken: list[trio.Semaphore] = []
        for mutex in mutexes:
            if not _try_acquire(mutex):
                break
            taken.append(mutex)
        else:
            try:
                return self._finish_steps(request, steps)
            finally:
                for mutex in taken:
                    mutex.release()
        for mutex in taken:  # keep the order of kvm_lock_all_vcpus: wait from here on
            mutex.release()
        held = source if isinstance(source, Vm) else None
        if held is not None:
            held.get()
        return partial(self._enable_cap_waiting, request, steps, mutexes, held)

    async def _enable_cap_waiting(
        self,
        request: wire.EnableCap,
        steps: Generator[list[Vcpu], None, int],
        mutexes: list[trio.Semaphore],
        held: Vm | None,
    ) -> _Answer:
        taken: list[trio.Semaphore] = []
        try:
            for mutex in mutexes:
                await mutex.acquire()
                taken.append(mutex)
            answer = self._answer(request, lambda: self._finish_steps(request, steps))
            assert answer is not None and not callable(answer)
            return answer
        finally:
            steps.close()  # after a cancellation: unwinds at step 7, as EINTR would
            for mutex in taken:
                mutex.release()
            if held is not None:
                held.put()

    @staticmethod
    def _finish_steps(request: wire.EnableCap, steps: Generator[list[Vcpu], None, int]) -> _Answer:
        try:
            next(steps)
        except StopIteration as done:
            return wire.Ok(request.id, done.value), None
        raise AssertionError("KVM_ENABLE_CAP stopped twice")  # pragma: no cover

    def _stats(self) -> dict[str, Any]:
        """The model's statistics (`Host.stats`), and what the daemon measured of each VM."""
        stats = self._host.stats()
        for vm in stats.get("vms", []):
            vm.update(self.blackouts.stats_of(vm["id"]))
        return stats

    def _vm_of_fd(self, fd: int) -> Vm | None:
        """The VM whose client end `fd` is, or None: the kernel's file_is_kvm()."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            return None
        return self._vms.get((st.st_dev, st.st_ino))

    def _hand_out(
        self, rid: int, vm: Vm, vcpu: Vcpu | None, undo: Callable[[], None]
    ) -> tuple[wire.Reply, list[int] | None]:
        """Make the socketpair for a new VM (vcpu None) or vCPU and start serving it.
        `undo` drops the model's reference if the fd cannot be made."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            undo()
            raise
        ours.setblocking(False)
        # Before the client can send anything: every datagram then carries credentials.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if vcpu is None:
            st = os.fstat(theirs.fileno())
            key = (st.st_dev, st.st_ino)
            self._vms[key] = vm
            end = _End(ours, Kind.VM, vm=vm, key=key)
        else:
            mutex = trio.Semaphore(1)
            end = _End(ours, Kind.VCPU, vm=vm, vcpu=vcpu, mutex=mutex)
            self._mutexes[vcpu] = mutex
        handout = [theirs.detach()]
        if vcpu is not None:
            try:
                run_fd, end.run_page = _run_page()
            except OSError:
                self._mutexes.pop(vcpu, None)
                ours.close()
                _close_fds(handout)
                undo()
                raise
            handout.append(run_fd)
        # From here the object's life is its fd's: if the reply never reaches the client,
        # closing our copy of its end after the send makes our end hang up (release).
        self._nursery.start_soon(self._serve_end, end)
        return wire.NewObject(rid, "vm" if vcpu is None else "vcpu"), handout


# --- the listening socket -------------------------------------------------------------------


def _bind(path: Path) -> socket.socket:
    """Bind and listen on `path` (mode 0660), creating its directory if missing. A stale
    socket left by a dead daemon is replaced; a live one is refused."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        else:
            raise OSError(errno.EADDRINUSE, f"a kvmstub daemon already serves {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # Accepted connections inherit SO_PASSCRED, and the kernel attaches credentials to
        # datagrams sent before accept() too (the embryo socket has no owner yet).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old_umask = os.umask(0o777 & ~_SOCKET_MODE)  # no window with a wider mode
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, _SOCKET_MODE)
        listener.listen(128)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _remove_socket(path: Path, inode: int) -> None:
    """Unlink `path` if it is still the socket we bound (not a successor's)."""
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


async def serve(
    socket_path: str | os.PathLike[str],
    host: Host,
    *,
    quantum_ns: int = DEFAULT_QUANTUM_NS,
    halt_poll_ns: int = 0,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `host` on a Unix SEQPACKET socket at `socket_path` until cancelled; the socket
    is removed on the way out.

    Args:
        socket_path: where to listen; the directory is created if missing.
        host: the model of the kernel.
        quantum_ns: how long a vCPU in KVM_RUN runs before the next one's turn.
        halt_poll_ns: how long to poll for work with no vCPU to run before sleeping (0: off).
        task_status: `started()` with the socket's path once clients can connect.

    Raises:
        OSError: the socket cannot be bound (EADDRINUSE if a live daemon serves it).
    """
    path = Path(socket_path)
    await _serve_bound(
        path,
        _bind(path),
        host,
        quantum_ns=quantum_ns,
        halt_poll_ns=halt_poll_ns,
        task_status=task_status,
    )


async def _serve_bound(
    path: Path,
    listener: socket.socket,
    host: Host,
    *,
    quantum_ns: int = DEFAULT_QUANTUM_NS,
    halt_poll_ns: int = 0,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    inode = path.lstat().st_ino
    try:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(host, nursery, quantum_ns=quantum_ns, halt_poll_ns=halt_poll_ns)
            nursery.start_soon(daemon.accept_loop, listener)
            task_status.started(path)
    finally:
        _remove_socket(path, inode)
        listener.close()


def ready_line(path: Path, host_info: dict[str, Any]) -> str:
    """The line `kvmstub serve` prints once clients can connect."""
    extra = "".join(f" {key}={value}" for key, value in host_info.items())
    return f"kvmstub: ready socket={path} pid={os.getpid()}{extra}"


async def run(
    socket_path: str | os.PathLike[str],
    host: Host,
    *,
    host_info: dict[str, Any],
    quantum_ns: int = DEFAULT_QUANTUM_NS,
    halt_poll_ns: int = 0,
    out: IO[str] = sys.stdout,
) -> None:
    """`kvmstub serve`: serve until SIGTERM or SIGINT, print one ready line, remove the
    socket on the way out.

    Raises:
        OSError: the socket cannot be bound (raised as is, not in an exception group).
    """
    path = Path(socket_path)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listener = _bind(path)  # before the nursery, so that a failure is a plain OSError
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    _serve_bound,
                    path,
                    listener,
                    host,
                    quantum_ns=quantum_ns,
                    halt_poll_ns=halt_poll_ns,
                )
            )
            # Everything alive now (modules, classes, functions: about 29000 objects) lives as
            # long as the daemon: keep it out of the cyclic collector's scans, whose pauses
            # every guest would feel (guests run in here): a full collection took 13 ms on 2
            # cores, in which no guest ran a step.
            gc.collect()
            gc.freeze()
            print(ready_line(path, host_info), file=out, flush=True)
            async for signum in signals:
                log.info("kvmstub: %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
