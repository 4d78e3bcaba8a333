"""The handoff connection: one AF_UNIX SOCK_SEQPACKET socket carrying datagrams and their fds.

This is the thin trio shell under `handoff.protocol`: it moves bytes and fds and knows nothing of
what they mean. It owns three promises:

* **Every fd is owned.** fds arriving with a datagram are received with MSG_CMSG_CLOEXEC (so a
  successor spawned meanwhile cannot inherit them) and held in an `OwnedFds` until handed to the
  caller; on every error path they are closed. fds the caller sends stay the caller's.
* **Errors are translated once, here.** Socket failures become `TransportError`; a refused peer
  becomes `CredentialsRefused`. A peer that closed or died is not an error: `receive` returns
  `None`, an ordinary input for the protocol machine.
* **The socket's place in the file system is safe.** `listen` puts the socket in a directory of
  mode 0700 owned by this uid, makes the file 0600, never removes a socket something still answers
  on, and removes its own file on close.

Timeouts are not handled here: the caller wraps a call in a trio cancel scope. Every operation is
cancel-safe, because a SEQPACKET send or receive is a single syscall that either happens whole or
not at all.

I/O goes straight to `socket.sendmsg` / `socket.recvmsg` on a non-blocking socket, waiting with
`trio.lowlevel.wait_readable` / `wait_writable` only when the kernel says EAGAIN: one syscall per
message on the fast path.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import functools
import os
import pwd
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import trio

from handoff.errors import CredentialsRefused, Refused, TransportError

__all__ = [
    "MAX_FDS_PER_MESSAGE",
    "MAX_MESSAGE_SIZE",
    "Channel",
    "Listener",
    "OwnedFds",
    "PeerCredentials",
    "bind_owned",
    "bind_unix_socket",
    "check_directory",
    "connect",
    "file_identity",
    "listen",
    "rename_noreplace",
    "socket_answers",
    "socketpair",
    "unlink_if_same",
]

#: The kernel's SCM_MAX_FD: the most fds one sendmsg can carry.
MAX_FDS_PER_MESSAGE = 253

#: Receive buffer for one datagram. A Unix datagram must fit the sender's SO_SNDBUF (208 KiB by
#: default, net.core.wmem_default), so anything a default peer can send fits in this.
MAX_MESSAGE_SIZE = 256 * 1024

_FD_SIZE = array.array("i").itemsize
# Room for every fd a peer could possibly attach, so an over-long fd list arrives whole, is
# counted for the error message, and is closed by us (rather than silently dropped by the kernel).
_ANC_BUFSIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)


class _ReceiveBuffer(threading.local):
    """One receive buffer per thread, copied out at once: recvmsg() allocates a whole buffer
    per call, and at 128 KiB and up that is an mmap and a munmap, about 15 µs more per
    message on a VM host, inside the blackout too."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(MAX_MESSAGE_SIZE))


_RECEIVE = _ReceiveBuffer()
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_CONNECT_RETRY_S = 0.001
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL

# trio.lowlevel.wait_readable or wait_writable
_Waiter = Callable[[socket.socket], Awaitable[None]]


class OwnedFds:
    """fds this code is responsible for closing: closed on exit unless `take`n.

    Use it wherever fds are received or created, so that an exception anywhere before the
    hand-over closes them::

        with OwnedFds(fds) as owned:
            check(owned)               # raises: every fd is closed
            return owned.take()        # success: the caller owns them now
    """

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds: list[int] = list(fds)

    def append(self, fd: int) -> None:
        self._fds.append(fd)

    def extend(self, fds: Iterable[int]) -> None:
        self._fds.extend(fds)

    def take(self) -> list[int]:
        """Hand every fd to the caller, who now owns them; this object owns nothing after."""
        fds, self._fds = self._fds, []
        return fds

    def pop(self, index: int = -1) -> int:
        """Hand one fd to the caller."""
        return self._fds.pop(index)

    def close(self) -> None:
        """Close every fd still owned (errors closing one do not stop the others)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __len__(self) -> int:
        return len(self._fds)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._fds))

    def __getitem__(self, index: int) -> int:
        return self._fds[index]

    def __repr__(self) -> str:
        return f"OwnedFds({self._fds!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PeerCredentials(NamedTuple):
    """The peer process as the kernel saw it when it connected (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


# recvmsg flags as plain ints (an operation on the socket module's flag enums costs about a
# microsecond).
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_TRUNC = int(socket.MSG_TRUNC)


def _poll_fd(fd: int, events: int, seconds: float) -> bool:
    """Whether `fd` became ready for `events` (or hung up) within `seconds`, in poll(2)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(max(1, int(seconds * 1000) + 1)))


def _ancillary(data: bytes, fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The SCM_RIGHTS part of a datagram, after checking what the kernel would refuse."""
    if not data:
        raise ValueError("a handoff datagram must carry at least one byte")
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"{len(fds)} fds in one datagram; the kernel allows at most 253")
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno is not None else str(exc)


def _transport_error(what: str, exc: OSError) -> TransportError:
    return TransportError(f"{what}: {_reason(exc)}", errno=exc.errno)


class Channel:
    """One end of a handoff connection (AF_UNIX SOCK_SEQPACKET).

    Takes ownership of `sock` and makes it non-blocking. Use as an async context manager, or
    call `close`.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_credentials(self) -> PeerCredentials:
        """The peer's pid, uid and gid, recorded by the kernel at connect (or socketpair) time.

        Raises:
            TransportError: the socket cannot report them (closed).
        """
        self._check_open()
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError as exc:
            raise _transport_error("cannot read the peer's credentials", exc) from exc
        return PeerCredentials(*_UCRED.unpack(raw))

    def check_peer(self, allowed_uids: Collection[int]) -> PeerCredentials:
        """Refuse a peer whose uid is not in `allowed_uids`. Call it before any fd crosses.

        Returns:
            The peer's credentials, when allowed.

        Raises:
            CredentialsRefused: naming the peer's uid and pid and the uids that are allowed.
        """
        creds = self.peer_credentials()
        if creds.uid in allowed_uids:
            return creds
        allowed = ", ".join(_user_name(u) for u in sorted(allowed_uids)) or "nobody at all"
        raise CredentialsRefused(
            f"peer process {creds.pid} runs as {_user_name(creds.uid)}, which may not take part "
            f"in this handoff (allowed: {allowed}); run the peer as an allowed user, or allow it "
            f"with --allow-uid {creds.uid}",
            pid=creds.pid,
            uid=creds.uid,
            gid=creds.gid,
            allowed_uids=allowed_uids,
        )

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one datagram, with `fds` attached as SCM_RIGHTS. The caller keeps its fds.

        Args:
            data: the message; must not be empty (an empty datagram reads as end of file).
            fds: at most MAX_FDS_PER_MESSAGE fds, which the kernel duplicates into the peer.

        Raises:
            TransportError: the peer is gone (errno EPIPE), the message is larger than the
                socket allows (EMSGSIZE), or another socket failure.
        """
        ancdata = _ancillary(data, fds)
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self._sock.sendmsg([data], ancdata)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable)
                continue
            except OSError as exc:
                raise self._send_error(exc, len(data)) from exc
            break
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_now(self, data: bytes, fds: Sequence[int] = (), timeout: float = 1.0) -> None:
        """`send` without yielding to other tasks: for the blackout's few small messages,
        where every trip through the scheduler lengthens the guest's pause. Blocks this thread
        (every task of it) only while the socket buffer is full, at most `timeout` seconds.

        Raises:
            TransportError: as `send`, or the buffer stayed full for `timeout` seconds.
        """
        ancdata = _ancillary(data, fds)
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.sendmsg([data], ancdata)
            except BlockingIOError:
                self._poll(select.POLLOUT, deadline, "sending a handoff message")
                continue
            except OSError as exc:
                raise self._send_error(exc, len(data)) from exc
            return

    def receive_now(
        self, max_fds: int, timeout: float, max_size: int = MAX_MESSAGE_SIZE
    ) -> tuple[bytes | None, list[int]]:
        """`receive` without yielding to other tasks (see `send_now`): waits in poll(2),
        blocking this thread, at most `timeout` seconds.

        Raises:
            trio.TooSlowError: nothing arrived within `timeout` seconds.
            TransportError: as `receive`.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        while (got := self._recv_once(max_size)) is None:
            self._poll(select.POLLIN, deadline, None)
        return self._take_datagram(*got, max_fds, max_size)

    def _poll(self, events: int, deadline: float, sending: str | None) -> None:
        """Wait in poll(2) until the socket is ready for `events` or `deadline` passes."""
        left = deadline - time.monotonic()
        ready = left > 0 and _poll_fd(self._sock.fileno(), events, left)
        if not ready:
            if sending is not None:
                raise TransportError(f"{sending}: the peer's socket buffer stayed full")
            raise trio.TooSlowError

    async def receive(
        self, max_fds: int, max_size: int = MAX_MESSAGE_SIZE
    ) -> tuple[bytes | None, list[int]]:
        """Receive one datagram and the fds that came with it.

        Args:
            max_fds: how many fds the caller accepts with this message.
            max_size: the largest datagram accepted.

        Returns:
            `(data, fds)`: the caller owns the fds. `(None, [])` when the peer closed the
            connection or died (EOF, ECONNRESET).

        Raises:
            TransportError: the datagram was truncated (data or fds: MSG_TRUNC, MSG_CTRUNC),
                carried more than `max_fds` fds, was empty but carried fds, or the socket
                failed. Every fd that arrived with it has been closed.
        """
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        while (got := self._recv_once(max_size)) is None:
            await self._wait(trio.lowlevel.wait_readable)
        received = self._take_datagram(*got, max_fds, max_size)
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            _close_fds(received[1])
            raise
        return received

    def _recv_once(self, max_size: int) -> tuple[bytes, list[tuple[int, int, bytes]], int] | None:
        """One non-blocking recvmsg: (data, ancdata, flags), or None when nothing is there.

        ECONNRESET means the peer closed with our datagrams unread: it is gone. The kernel
        reports that before the datagrams the peer sent before closing, which are still
        queued (a refusal and its reason, typically): so read on once; end of file after."""
        reset = False
        while True:
            view = _RECEIVE.view
            buffer = view[:max_size] if max_size <= len(view) else memoryview(bytearray(max_size))
            try:
                nbytes, ancdata, flags, _ = self._sock.recvmsg_into(
                    [buffer], _ANC_BUFSIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return (b"", [], 0) if reset else None
            except ConnectionResetError:
                if reset:
                    return b"", [], 0
                reset = True
                continue
            except OSError as exc:
                if reset:
                    return b"", [], 0
                raise _transport_error("receiving on the handoff connection failed", exc) from exc
            return bytes(buffer[:nbytes]), ancdata, flags

    def _take_datagram(
        self,
        data: bytes,
        ancdata: list[tuple[int, int, bytes]],
        flags: int,
        max_fds: int,
        max_size: int,
    ) -> tuple[bytes | None, list[int]]:
        """Own the fds that came, check the datagram; `(None, [])` for end of file."""
        with OwnedFds(fds_of(ancdata)) as owned:
            self._check_datagram(data, owned, flags, max_fds, max_size)
            if not data:
                return None, []
            return data, owned.take()

    def close(self) -> None:
        """Close the socket. A task waiting on it gets TransportError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Channel fd={-1 if self._closed else self._sock.fileno()}>"

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the handoff connection is already closed")

    async def _wait(self, waiter: _Waiter) -> None:
        try:
            await waiter(self._sock)
        except trio.ClosedResourceError as exc:
            raise TransportError("the handoff connection was closed while in use") from exc

    @staticmethod
    def _send_error(exc: OSError, size: int) -> TransportError:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            return TransportError(
                "the peer closed the handoff connection (it exited or gave up)", errno=exc.errno
            )
        if exc.errno == errno.EMSGSIZE:
            return TransportError(
                f"a handoff message of {size} bytes is larger than the socket buffer allows "
                "(net.core.wmem_default, about 208 KiB by default)",
                errno=exc.errno,
            )
        return _transport_error("sending on the handoff connection failed", exc)

    @staticmethod
    def _check_datagram(
        data: bytes, owned: OwnedFds, flags: int, max_fds: int, max_size: int
    ) -> None:
        if flags & _MSG_CTRUNC:
            raise TransportError(
                "a handoff message's fds were cut short (MSG_CTRUNC: the fd table is full or "
                "the peer sent too many); the fds that did arrive were closed"
            )
        if flags & _MSG_TRUNC:
            raise TransportError(
                f"a handoff message was larger than {max_size} bytes and was cut short; "
                "dropped, with its fds closed"
            )
        if len(owned) > max_fds:
            raise TransportError(
                f"a handoff message carried {len(owned)} fds where at most {max_fds} were "
                "expected; dropped, with its fds closed"
            )
        if not data and len(owned):
            raise TransportError(
                f"an empty handoff message carried {len(owned)} fds; dropped, fds closed"
            )


class Listener:
    """A listening handoff socket at `path`. Closing it removes its file (if still its own)."""

    def __init__(
        self, sock: socket.socket, path: Path, identity: tuple[int, int] | None = None
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.path = path
        self._identity = identity if identity is not None else file_identity(path)
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    async def accept(self) -> Channel:
        """Wait for the next connection.

        Raises:
            TransportError: the listener is closed or accept failed.
        """
        if self._closed:
            raise TransportError(f"the handoff listener on {self.path} is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except trio.ClosedResourceError as exc:
                    raise TransportError(
                        f"the handoff listener on {self.path} was closed while accepting"
                    ) from exc
                continue
            except OSError as exc:
                raise _transport_error(f"accepting on {self.path} failed", exc) from exc
            break
        channel = Channel(conn)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return channel

    def close(self) -> None:
        """Stop listening and remove the socket file, unless another socket replaced it."""
        if self._closed:
            return
        self._closed = True
        unlink_if_same(self.path, self._identity)
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

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
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.path}>"


def _secure_directory(directory: Path, *, create: bool = True) -> None:
    """Create `directory` (mode 0700) if missing and `create`; refuse it if another uid owns
    it or others can reach into it (a missing directory is fine when not `create`)."""
    if create and not directory.exists():
        try:
            directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # created meanwhile by someone else: checked below like any other
        except OSError as exc:
            raise Refused(
                f"cannot create the socket directory {directory}: {_reason(exc)}"
            ) from exc
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        if not create:
            return
        raise Refused(f"the socket directory {directory} vanished as it was created") from None
    except OSError as exc:
        raise Refused(f"cannot inspect the socket directory {directory}: {_reason(exc)}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{directory} is meant to hold the socket but is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        raise Refused(
            f"socket directory {directory} is owned by {_user_name(st.st_uid)}, not by this "
            f"process ({_user_name(me)}); another user could replace the socket: use a directory "
            "of your own with mode 0700"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise Refused(
            f"socket directory {directory} has mode {mode:04o}, which lets other users reach "
            f"the socket; run `chmod 700 {directory}` or choose a private directory"
        )


def check_directory(directory: str | os.PathLike[str]) -> None:
    """Refuse an existing `directory` that another uid owns or others can reach (the rule
    every socket's directory follows); a missing one is fine (it will be created 0700).

    Raises:
        Refused: what is wrong with it and what to do.
    """
    _secure_directory(Path(directory).absolute(), create=False)


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path` itself (not a symlink's target), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_same(path: str | os.PathLike[str], identity: tuple[int, int] | None) -> bool:
    """Remove the socket file at `path` only if it is still the inode `identity` (the one this
    process bound or took over): never another process's socket that replaced it, nor a file
    or directory put there since."""
    if identity is None:
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != identity:
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def socket_answers(path: str | os.PathLike[str], sock_type: int = socket.SOCK_STREAM) -> bool:
    """Whether something listens on the socket at `path`; True for anything at `path` that is
    not a socket file (so that a caller never removes it as stale)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # EAGAIN (backlog full), EPROTOTYPE (another kind of socket): alive
    finally:
        probe.close()
    return True


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(old: str | os.PathLike[str], new: str | os.PathLike[str]) -> None:
    """Rename `old` to `new` unless `new` exists (then FileExistsError, nothing changed):
    renameat2(RENAME_NOREPLACE), or a hard link and an unlink where the file system or the C
    library lacks it. Never replaces what is at `new`, whoever put it there meanwhile."""
    src, dst = os.fsencode(old), os.fsencode(new)
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    os.link(src, dst)  # EEXIST if taken: atomic
    os.unlink(src)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _remove_if_stale(path: Path, sock_type: int) -> None:
    """Remove a socket file that nothing answers on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise Refused(f"{path} is a directory; give the socket's own path, not its directory")
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(
            f"{path} exists and is not a socket; refusing to replace it (move it away or "
            "choose another path)"
        )
    if socket_answers(path, sock_type):
        raise Refused(
            f"another process is already listening on {path}; stop it or choose another path"
        )
    # A leftover of a process that died: nothing listens. Remove that very inode only.
    unlink_if_same(path, (st.st_dev, st.st_ino))


def bind_owned(
    path: str | os.PathLike[str], sock_type: int, backlog: int = 16
) -> tuple[socket.socket, tuple[int, int]]:
    """`bind_unix_socket`, plus the (st_dev, st_ino) of the socket file it created: remove
    it later with `unlink_if_same`, so that only this very file is ever removed."""
    path = Path(path).absolute()
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise Refused(
            f"socket path {path} is {len(os.fsencode(path))} bytes long; AF_UNIX allows at most "
            f"{_SUN_PATH_MAX}: choose a shorter path"
        )
    _secure_directory(path.parent)
    _remove_if_stale(path, sock_type)
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        # Linux creates the file with the socket inode's mode (less the umask): 0600 from
        # its first moment, not the umask's mode until a chmod after bind.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        st = os.lstat(path)
        os.chmod(path, 0o600)  # (kept: a kernel that ignores the inode's mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise Refused(f"cannot listen on {path}: {_reason(exc)}") from exc
    return sock, (st.st_dev, st.st_ino)


def bind_unix_socket(
    path: str | os.PathLike[str], sock_type: int, backlog: int = 16
) -> socket.socket:
    """A listening AF_UNIX socket at `path`, placed safely in the file system.

    The parent directory is created with mode 0700 if missing and refused if it is reachable by
    other users or owned by another uid; the socket file gets mode 0600; an existing socket file
    is removed only if nothing answers on it (anything else there is refused, never removed).

    Raises:
        Refused: the directory is unsafe, the path is taken, or binding failed (with the reason).
    """
    return bind_owned(path, sock_type, backlog)[0]


async def listen(path: str | os.PathLike[str], backlog: int = 16) -> Listener:
    """Listen for handoff connections at `path` (see `bind_unix_socket` for the safety rules).

    Raises:
        Refused: the directory is unsafe or the path is taken.
    """
    await trio.lowlevel.checkpoint()
    sock, identity = bind_owned(path, socket.SOCK_SEQPACKET, backlog)
    return Listener(sock, Path(path).absolute(), identity)


async def connect(path: str | os.PathLike[str]) -> Channel:
    """Connect to a handoff listener at `path`.

    Raises:
        TransportError: nothing listens there, or the connection failed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                sock.connect(os.fspath(path))
            except BlockingIOError:
                # AF_UNIX: the listener's backlog is full; there is no pending connect to wait
                # for, so try again shortly.
                await trio.sleep(_CONNECT_RETRY_S)
                continue
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise TransportError(
                    f"nothing is listening on {os.fspath(path)}: start the target first "
                    f"(handoff run --incoming unix:{os.fspath(path)})",
                    errno=exc.errno,
                ) from exc
            except OSError as exc:
                raise _transport_error(f"cannot connect to {os.fspath(path)}", exc) from exc
            break
        await trio.lowlevel.cancel_shielded_checkpoint()
    except BaseException:
        sock.close()
        raise
    return Channel(sock)


def fds_of(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds an SCM_RIGHTS control message brought (the one parser of them): the caller owns
    them from here on. A trailing partial fd number (a truncated message) is ignored."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def unix_uri_path(uri: object) -> str | None:
    """The path of a `unix:PATH` handoff address, or None if `uri` is not one (the one
    parser of addresses: `--incoming` and QMP `handoff` both take them)."""
    if not isinstance(uri, str) or not uri.startswith("unix:") or len(uri) <= len("unix:"):
        return None
    return uri[len("unix:") :]


def socketpair() -> tuple[Channel, Channel]:
    """Two connected channels in this process (for tests and in-process plumbing)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    return Channel(a), Channel(b)
