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
The model is synchronous; KVM_RUN runs its guest slice inline. The per-request path uses
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
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import trio

from kvmstub import wire
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


def _error(request_id: int, err: int, message: str, fw_error: int | None = None) -> wire.Error:
    if not 1 <= err <= 4095:
        err = errno.EINVAL
    if fw_error is not None and not 0 <= fw_error <= wire.U32_MAX:
        fw_error = None
    return wire.Error(request_id, err, message[:_MAX_MESSAGE], fw_error)


# struct kvm_run: request_interrupt_window (u8) at 0, immediate_exit (u8) at 1.
RUN_PAGE_SIZE = 4096
_IMMEDIATE_EXIT = 1


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


class Daemon:
    """The fd table and the request dispatch, over one `Host`.

    Args:
        host: the model of the kernel.
        nursery: where the per-fd tasks run; cancelling it stops everything.
    """

    def __init__(self, host: Host, nursery: trio.Nursery) -> None:
        self._host = host
        self._nursery = nursery
        self._vms: dict[tuple[int, int], Vm] = {}  # client-end inode -> VM
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
                reply, handout = self._handle(end, view[:nbytes], ancdata, msg_flags)
                await self._send(sock, reply, handout)
        finally:
            self._release(end)

    def _release(self, end: _End) -> None:
        """The client end's last copy is closed (or we are shutting down): drop the fd."""
        end.sock.close()
        if end.run_page is not None:
            end.run_page.close()
            end.run_page = None
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
    ) -> tuple[wire.Reply, list[int] | None]:
        """Answer one datagram. Every fd that came with it is closed before returning."""
        pid, fds = _parse_ancillary(ancdata)
        try:
            return self._handle_request(end, data, pid, fds, msg_flags)
        finally:
            _close_fds(fds)

    def _handle_request(
        self, end: _End, data: memoryview, pid: int | None, fds: list[int], msg_flags: int
    ) -> tuple[wire.Reply, list[int] | None]:
        if pid is None:
            # Cannot happen with SO_PASSCRED set before the end was handed out.
            return _error(wire.request_id_of(data), errno.EPERM, "kvmstub: no credentials"), None
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            what = (
                f"datagram larger than {wire.MAX_DATAGRAM} bytes"
                if msg_flags & socket.MSG_TRUNC
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
        try:
            return self._dispatch(end, request, pid, fds)
        except OSError as e:
            message = e.strerror or str(e)
            return _error(
                request.id, e.errno or errno.EINVAL, message, getattr(e, "fw_error", None)
            ), None
        except _DEFAULT_ANSWER_ERRNOS as e:
            log.exception("model refused %s with a non-OSError", type(request).__name__)
            return _error(request.id, errno.EINVAL, f"kvmstub: {type(e).__name__}: {e}"), None
        except Exception as e:
            log.exception("model failed on %s", type(request).__name__)
            return _error(request.id, errno.EFAULT, f"kvmstub: internal error: {e!r}"), None

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

    def _dispatch(
        self, end: _End, request: wire.Request, pid: int, fds: list[int]
    ) -> tuple[wire.Reply, list[int] | None]:
        host = self._host
        rid = request.id
        vcpu = end.vcpu
        vm = end.vm
        # The kind check above guarantees which of vm / vcpu is set for each request type.
        match request:
            case wire.Run():
                assert vcpu is not None
                page = end.run_page
                kicked = None if page is None else (lambda: page[_IMMEDIATE_EXIT] != 0)
                exit_ = vcpu.run(
                    pid,
                    immediate_exit=request.immediate_exit or (kicked is not None and kicked()),
                    io_data=request.io_data,
                    hypercall_ret=request.hypercall_ret,
                    interrupted=kicked,
                )
                return wire.RunReply(rid, exit_), None
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
                return wire.StatsReply(rid, host.stats()), None
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
            case wire.EnableCap():
                assert vm is not None
                args: list[int | Vm | None] = [0, 0, 0, 0]  # struct kvm_enable_cap.args[4]
                args[: len(request.args)] = request.args
                if request.cap in wire.FD_ARG_CAPS:
                    # args[0] is an fd: only an fd that came with the request can name a
                    # VM; a bare number names nothing here (EBADF from the model).
                    args[0] = self._vm_of_fd(fds[0]) if request.fd_arg == 0 and fds else None
                result = vm.enable_cap(pid, request.cap, request.flags, args)
                return wire.Ok(rid, result), None
            case wire.SevIoctl():
                assert vm is not None
                fields = None if request.fields is None else dict(request.fields)
                out = vm.sev_ioctl(pid, request.cmd, fields)
                return wire.Ok(rid, 0, out), None
            case wire.RegRegion():
                assert vm is not None
                vm.reg_region(pid, request.addr, request.size)
                return wire.Ok(rid), None
            case wire.UnregRegion():
                assert vm is not None
                vm.unreg_region(pid, request.addr, request.size)
                return wire.Ok(rid), None
            case wire.GetRegs():
                assert vcpu is not None
                return wire.RegsReply(rid, wire.regs_to_wire(vcpu.get_regs(pid))), None
            case wire.SetRegs():
                assert vcpu is not None
                vcpu.set_regs(pid, wire.regs_from_wire(request.regs))
                return wire.Ok(rid), None
        raise AssertionError(f"no handler for {type(request).__name__}")  # pragma: no cover

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
            end = _End(ours, Kind.VCPU, vm=vm, vcpu=vcpu)
        handout = [theirs.detach()]
        if vcpu is not None:
            try:
                run_fd, end.run_page = _run_page()
            except OSError:
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
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `host` on a Unix SEQPACKET socket at `socket_path` until cancelled; the socket
    is removed on the way out.

    Args:
        socket_path: where to listen; the directory is created if missing.
        host: the model of the kernel.
        task_status: `started()` with the socket's path once clients can connect.

    Raises:
        OSError: the socket cannot be bound (EADDRINUSE if a live daemon serves it).
    """
    path = Path(socket_path)
    await _serve_bound(path, _bind(path), host, task_status=task_status)


async def _serve_bound(
    path: Path,
    listener: socket.socket,
    host: Host,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    inode = path.lstat().st_ino
    try:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(host, nursery)
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
            await nursery.start(partial(_serve_bound, path, listener, host))
            # Everything alive now lives as long as the daemon: keep it out of the cyclic
            # collector's scans, whose pauses every guest would feel (KVM_RUN runs inline).
            gc.collect()
            gc.freeze()
            print(ready_line(path, host_info), file=out, flush=True)
            async for signum in signals:
                log.info("kvmstub: %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
