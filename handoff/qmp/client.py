"""A small trio QMP client: what `handoff upgrade` / `handoff status` and the tests use to talk to
a VMM's control socket (or to any QEMU).

    async with await QMPClient.connect("/run/vm/qmp.sock") as qmp:
        status = await qmp.execute("query-status")
        await qmp.execute("upgrade", set=["log-level=debug"])
        async for event in qmp:            # events until the VMM closes the connection
            print(event.event, event.data)

`execute` and event iteration may run in different tasks at once: whichever task is waiting
reads the next message from the socket and files it (a reply for its command, an event for the
event reader), so no background task is needed and nothing is lost. Replies are matched to
commands by `id`.

Errors: a command that fails raises `QMPError` with QMP's error class and description; a
connection that cannot be made, breaks, or speaks something other than QMP raises
`QMPConnectionError` (a `QMPError` too, so one `except` covers both).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import msgspec
import trio

__all__ = ["QMPClient", "QMPConnectionError", "QMPError", "QMPEvent", "check_socket_place"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid

#: Longest reply line accepted from the server.
MAX_REPLY = 16 * 1024 * 1024
#: Events kept while nobody reads them; the oldest go first.
MAX_BUFFERED_EVENTS = 10_000


class QMPError(Exception):
    """A QMP error reply: `error_class` (e.g. "GenericError", "CommandNotFound") and `desc`."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def __str__(self) -> str:
        return self.desc


class QMPConnectionError(QMPError):
    """The control connection could not be made, broke, or did not speak QMP."""

    def __init__(self, desc: str) -> None:
        super().__init__("ConnectionError", desc)


class QMPEvent(msgspec.Struct, frozen=True):
    """One QMP event: its name, its data and when the server emitted it (seconds since epoch)."""

    event: str
    data: dict[str, Any]
    timestamp: float


class _Pending:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: QMPError | None = None


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _trusted_uids() -> tuple[int, int]:
    return os.geteuid(), 0


def check_socket_place(path: str) -> None:
    """Before talking to the control socket at `path`: it must be a socket owned by us (or
    root) in a directory that only we (or root) can change. Otherwise another user may have
    put a fake VMM there, whose answers a client would print as the VM's. A missing socket is
    left to connect() to report.

    Raises:
        QMPConnectionError: who owns what, and what to do.
    """
    mine = _trusted_uids()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise QMPConnectionError(f"cannot inspect the control socket {path}: {exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise QMPConnectionError(f"{path} is not a socket, so not a VMM's control socket")
    if st.st_uid not in mine:
        raise QMPConnectionError(
            f"the control socket {path} is owned by {_user(st.st_uid)}, not by you "
            f"({_user(os.geteuid())}) or root: another user may have put a fake VMM there; "
            "refusing to talk to it (check who runs that VM and who owns its directory)"
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError as exc:
        raise QMPConnectionError(f"cannot inspect {directory}: {exc}") from exc
    if dst.st_uid not in mine:
        raise QMPConnectionError(
            f"the control socket's directory {directory} is owned by {_user(dst.st_uid)}, "
            f"not by you ({_user(os.geteuid())}) or root, who could replace the socket; "
            "refusing to talk to it (use a runtime directory of your own, mode 0700)"
        )
    if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
        raise QMPConnectionError(
            f"the control socket's directory {directory} has mode "
            f"{stat.S_IMODE(dst.st_mode):04o}: others can replace the socket in it; refusing "
            f"to talk to it (run `chmod 700 {directory}` or use a private directory)"
        )


def _check_server(stream: trio.SocketStream, where: str) -> None:
    """The process listening there must run as us (or root): the kernel's record of it, not
    the file's owner (a socket can be renamed into place)."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return  # not a Unix socket with credentials (a test double): the file checks held
    pid, uid, _gid = _UCRED.unpack(raw)
    if uid not in _trusted_uids():
        raise QMPConnectionError(
            f"the control socket {where} is served by process {pid} running as {_user(uid)}, "
            f"not by you ({_user(os.geteuid())}) or root: refusing to talk to it"
        )


class QMPClient:
    """A negotiated QMP session over a connected stream. Create it with `QMPClient.connect`."""

    def __init__(self, stream: trio.abc.Stream, greeting: dict[str, Any]) -> None:
        self._stream = stream
        self.greeting = greeting
        self._buffer = bytearray()
        self._read_lock = trio.Lock()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._events: collections.deque[QMPEvent] = collections.deque(maxlen=MAX_BUFFERED_EVENTS)
        self._closed_reason: str | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, negotiate: bool = True) -> Self:
        """Connect to the QMP socket at `path`, read the greeting and (by default) negotiate.

        Raises:
            QMPConnectionError: nothing listens there, or it is not a QMP server.
        """
        where = os.fspath(path)
        check_socket_place(where)
        try:
            stream = await trio.open_unix_socket(where)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise QMPConnectionError(
                f"cannot connect to the control socket {where}: {reason} "
                f"(is a VMM running with --control {where}?)"
            ) from exc
        try:
            _check_server(stream, where)
        except BaseException:
            await stream.aclose()
            raise
        client = cls(stream, {})
        try:
            greeting = await client._read_message()
            if "QMP" not in greeting:
                raise QMPConnectionError(f"{where} did not greet with QMP: {greeting!r:.200}")
            client.greeting = greeting
            if negotiate:
                await client.execute("qmp_capabilities")
        except BaseException:
            await client.aclose()
            raise
        return client

    async def execute(
        self, name: str, arguments: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> Any:
        """Run command `name` and return its "return" value.

        Arguments come from the `arguments` mapping (for names that are not Python identifiers,
        like "package-name") and from keyword arguments.

        Raises:
            QMPError: the server answered with an error (its class and description).
            QMPConnectionError: the connection broke before the reply.
        """
        args = {**(arguments or {}), **kwargs}
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": name, "id": request_id}
        if args:
            request["arguments"] = args
        pending = self._pending[request_id] = _Pending()
        try:
            await self._send(msgspec.json.encode(request) + b"\n")
            while True:
                async with self._read_lock:
                    # Another task may have read our reply while we waited for the lock.
                    if pending.done:
                        break
                    await self._pump()
        finally:
            self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def next_event(self, name: str | None = None) -> QMPEvent:
        """The next event (named `name`, if given; other events stay queued).

        Raises:
            QMPConnectionError: the connection closed first.
        """
        while True:
            for event in self._events:
                if name is None or event.event == name:
                    self._events.remove(event)
                    return event
            async with self._read_lock:
                if not any(name is None or e.event == name for e in self._events):
                    await self._pump()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> QMPEvent:
        try:
            return await self.next_event()
        except QMPConnectionError:
            if self._closed_reason is not None and not self._events:
                raise StopAsyncIteration from None
            raise

    async def aclose(self) -> None:
        self._closed_reason = self._closed_reason or "the client closed the connection"
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals -----------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise QMPConnectionError(f"the control connection is closed: {self._closed_reason}")
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed_reason = f"sending failed: {exc}"
                raise QMPConnectionError(f"the control connection broke: {exc}") from exc

    async def _pump(self) -> None:
        """Read one message and file it: a reply to its command, an event to the queue."""
        message = await self._read_message()
        if "event" in message:
            timestamp = message.get("timestamp") or {}
            self._events.append(
                QMPEvent(
                    event=str(message["event"]),
                    data=message.get("data") or {},
                    timestamp=timestamp.get("seconds", 0) + timestamp.get("microseconds", 0) / 1e6,
                )
            )
            return
        if "return" not in message and "error" not in message:
            log.debug("ignoring a QMP message that is neither reply nor event: %r", message)
            return
        request_id = message.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None and "id" not in message and self._pending:
            # A reply without id (the server could not read our request): the oldest command.
            pending = next(iter(self._pending.values()))
        if pending is None:
            log.debug("dropping a QMP reply nobody waits for: %r", message)
            return
        pending.done = True
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            pending.error = QMPError(
                str(error.get("class", "GenericError")), str(error.get("desc", message["error"]))
            )
        else:
            pending.value = message["return"]

    async def _read_message(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    message = msgspec.json.decode(line)
                except msgspec.DecodeError as exc:
                    raise QMPConnectionError(f"the server sent invalid JSON: {exc}") from exc
                if not isinstance(message, dict):
                    raise QMPConnectionError(f"the server sent a non-object: {message!r:.200}")
                return message
            if len(self._buffer) > MAX_REPLY:
                raise QMPConnectionError(f"the server sent a line longer than {MAX_REPLY} bytes")
            if self._closed_reason is not None:
                raise QMPConnectionError(f"the control connection is closed: {self._closed_reason}")
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed_reason = f"receiving failed: {exc}"
                raise QMPConnectionError(f"the control connection broke: {exc}") from exc
            if not data:
                self._closed_reason = "the VMM closed the connection"
                raise QMPConnectionError("the VMM closed the control connection")
            self._buffer += data
