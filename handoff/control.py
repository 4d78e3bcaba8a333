"""The VMM's control socket: a QMP (QEMU Machine Protocol) server.

The server is *given* its listening AF_UNIX SOCK_STREAM socket and never closes it, because that
socket outlives the process: at a handoff the source calls `stop_accepting()` and passes the
listening socket itself to its successor, which serves it with a new `ControlServer`. Clients
never see the path change; a client that connects during the switch waits in the kernel's
backlog and is greeted by the successor.

The protocol follows QEMU (docs/interop/qmp-spec.rst, monitor/qmp.c, qapi/qmp-dispatch.c):

* On connect the server sends the greeting
  ``{"QMP": {"version": {...}, "capabilities": []}}``.
* Until the client sends ``qmp_capabilities`` every other command fails with CommandNotFound
  "Expecting capabilities negotiation with 'qmp_capabilities'"; afterwards ``qmp_capabilities``
  itself fails the same way ("Capabilities negotiation is already complete, command ignored").
* A command is ``{"execute": NAME, "arguments": {...}, "id": ANY}``; the reply is
  ``{"return": VALUE, "id": ANY}`` or ``{"error": {"class": ..., "desc": ...}, "id": ANY}``.
  Malformed input gets QEMU's GenericError messages ("JSON parse error, ...", "QMP input must be
  a JSON object", "QMP input lacks member 'execute'", ...); it never ends the session.
* Events ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``
  go to every client that has completed negotiation.

Framing: QEMU's parser is a stream parser, and clients rely on it: QEMU's own Python library
(`qemu.qmp`) sends each command as one JSON object with no newline after it. So a request ends
where its outermost object (or array) closes, as in QEMU's json-streamer; a newline also ends
whatever came before it on the line, so a line-based client (socat, our own) that sends an
unbalanced or garbled line gets a "JSON parse error" for that line and goes on. A request longer
than `max_line` bytes is discarded with one error.

Per client, commands run one at a time in arrival order, as in QEMU without out-of-band
execution; different clients run concurrently. A handler is an async callable taking the
arguments dict and returning any value msgspec can encode (None becomes ``{}``); it reports a
failure by raising `QMPCommandError`. A `HandoffError` becomes a GenericError with its message;
any other exception is logged and reported as a GenericError, never ending the server.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import msgspec
import trio

from handoff import __version__
from handoff.errors import HandoffError

__all__ = [
    "MAX_LINE",
    "QMP_VERSION",
    "ControlServer",
    "Handler",
    "QMPCommandError",
]

log = logging.getLogger(__name__)

#: The QEMU version the greeting reports (QMP clients check its shape, not its value).
QMP_VERSION = {"micro": 0, "minor": 0, "major": 9}

#: The longest command line accepted, in bytes.
MAX_LINE = 64 * 1024

#: Messages (events, mostly) waiting for one slow client before it is disconnected.
MAX_PENDING = 1024

_RECV_SIZE = 65536
_UCRED = struct.Struct("iII")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

_encoder = msgspec.json.Encoder()


class QMPCommandError(Exception):
    """Raised by a command handler to answer with a QMP error.

    Args:
        desc: the human-readable description (what failed and what to do).
        error_class: the QMP error class: "GenericError" (almost always), "CommandNotFound",
            "DeviceNotActive", "DeviceNotFound", "KVMMissingCap".
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _encode(message: Mapping[str, Any]) -> bytes:
    return _encoder.encode(message) + b"\n"


def _error(error_class: str, desc: str, request_id: Any = None, has_id: bool = False) -> bytes:
    message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        message["id"] = request_id
    return _encode(message)


_SCAN_OUTSIDE = re.compile(rb'["{}\[\]\n]')
_SCAN_STRING = re.compile(rb'["\\\n]')

#: What `_RequestSplitter.feed` yields for a request that grew beyond the limit.
TOO_LONG = None


class _RequestSplitter:
    """Cut a QMP byte stream into requests (see "Framing" above).

    A request ends when its outermost `{`/`[` closes (brackets inside strings do not count), or
    at a newline outside a string (which ends a blank, scalar, unbalanced or garbled line). A
    request that grows beyond `max_len` bytes yields `TOO_LONG` once and is dropped up to its
    end.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.buf = bytearray()
        self.pos = 0  # scanned up to here
        self.depth = 0
        self.in_string = False
        self.discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        self.buf += data
        out: list[bytes | None] = []
        while True:
            pattern = _SCAN_STRING if self.in_string else _SCAN_OUTSIDE
            match = pattern.search(self.buf, self.pos)
            if match is None:
                self.pos = max(self.pos, len(self.buf))  # past an escape at the very end
                break
            i = match.start()
            char = self.buf[i]
            self.pos = i + 1
            if char == 0x0A:  # newline (a raw one inside a string is invalid JSON anyway)
                self._emit(out, i, i + 1)
            elif self.in_string:
                if char == 0x5C:  # backslash: the next byte is escaped
                    self.pos = i + 2
                else:
                    self.in_string = False
            elif char == 0x22:
                self.in_string = True
            elif char in b"{[":
                self.depth += 1
            else:  # } or ]
                self.depth -= 1
                if self.depth <= 0:
                    self._emit(out, i + 1, i + 1)
        if len(self.buf) > self.max_len:
            if not self.discarding:
                out.append(TOO_LONG)
                self.discarding = True
            # Keep the scanning state (the request's end is still to come), drop its bytes.
            cut = min(self.pos, len(self.buf))
            del self.buf[:cut]
            self.pos -= cut
        return out

    def _emit(self, out: list[bytes | None], end: int, consumed: int) -> None:
        request = bytes(self.buf[:end])
        del self.buf[:consumed]
        self.pos = 0
        self.depth = 0
        self.in_string = False
        if self.discarding:
            self.discarding = False
        elif request.strip():
            out.append(request)


class _Client:
    """One connected QMP client: its socket, its negotiation state and its outgoing queue."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.number = number
        self.negotiated = False
        self.scope = trio.CancelScope()  # the whole session: cancelled to drop the client
        self.read_scope: trio.CancelScope | None = None  # only while waiting for input
        self.write_lock = trio.Lock()
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[bytes](MAX_PENDING)

    def queue(self, data: bytes) -> bool:
        """Queue a message for the writer task; False if this client is too far behind."""
        try:
            self.outbox_send.send_nowait(data)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def write(self, data: bytes) -> None:
        """Write one message now, in order with the writer task.

        The first send is tried before any checkpoint, so a reply whose handler triggered the
        process's shutdown still leaves before the cancellation arrives.
        """
        if not self.write_lock.locked():
            self.write_lock.acquire_nowait()
        else:
            await self.write_lock.acquire()
        try:
            await self._send_all(data)
        finally:
            self.write_lock.release()

    async def write_loop(self) -> None:
        async for data in self.outbox_receive:
            await self.write(data)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as exc:
                # The client went away (EPIPE, ECONNRESET): end its session, not the server.
                log.debug("QMP client %d: write failed: %s", self.number, exc)
                self.close()
                await trio.lowlevel.checkpoint()  # raises Cancelled: the session scope ends
                return
            view = view[sent:]

    async def read(self) -> bytes:
        """Some bytes from the client; b"" at end of file (or when the client broke off)."""
        while True:
            try:
                return self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as exc:
                log.debug("QMP client %d: read failed: %s", self.number, exc)
                return b""

    def close(self) -> None:
        self.scope.cancel()
        self.outbox_send.close()


class ControlServer:
    """A QMP server on a listening socket that someone else owns.

    Args:
        listen_sock: a listening AF_UNIX SOCK_STREAM socket. The server makes it non-blocking
            and accepts on it, but never closes it: its owner does (or hands it on).
        handlers: command name -> async handler. More can be added with `register`.
        package: the "package" string of the greeting.
        allowed_uids: if given, a client whose uid (SO_PEERCRED) is not in it is disconnected
            before the greeting.
        max_line: the longest command line accepted, in bytes.
    """

    def __init__(
        self,
        listen_sock: socket.socket,
        handlers: Mapping[str, Handler] | None = None,
        *,
        package: str = f"handoff {__version__}",
        allowed_uids: Collection[int] | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        listen_sock.setblocking(False)
        self._listen_sock = listen_sock
        self._handlers: dict[str, Handler] = {
            "qmp_capabilities": self._qmp_capabilities_again,
            "query-commands": self._query_commands,
        }
        for name, handler in (handlers or {}).items():
            self.register(name, handler)
        self._greeting = _encode(
            {"QMP": {"version": {"qemu": QMP_VERSION, "package": package}, "capabilities": []}}
        )
        self._allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self._max_line = max_line
        self._clients: set[_Client] = set()
        self._client_count = 0
        self._accepting = True
        self._accept_scope: trio.CancelScope | None = None
        self._accept_wakeup = trio.Event()
        self._closing = False
        self._serve_scope: trio.CancelScope | None = None
        self._client_gone = trio.Event()

    # -- the registry --------------------------------------------------------------------------

    def register(self, name: str, handler: Handler) -> None:
        """Add (or replace) the handler of command `name`."""
        if name == "qmp_capabilities":
            raise ValueError("qmp_capabilities is the server's own command")
        self._handlers[name] = handler

    def command_names(self) -> list[str]:
        return sorted(self._handlers)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._closing

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve clients until `close` or `aclose`; then return."""
        async with trio.open_nursery() as nursery:
            self._serve_scope = nursery.cancel_scope
            nursery.start_soon(self._accept_loop, nursery)
            task_status.started()

    def stop_accepting(self) -> None:
        """Accept no more clients, leaving the listening socket open (to be handed on).

        Connections that arrive from now on wait in the kernel's backlog for whoever accepts on
        the socket next. Connected clients are still served.
        """
        self._accepting = False
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    def start_accepting(self) -> None:
        """Accept again after `stop_accepting` (a handoff that rolled back)."""
        if self._closing:
            return
        self._accepting = True
        self._accept_wakeup.set()

    def close_clients(self) -> None:
        """Disconnect every client now (replies not yet written are dropped)."""
        for client in list(self._clients):
            client.close()

    def close(self) -> None:
        """Stop accepting, disconnect every client now, and make `serve` return."""
        self._closing = True
        self.stop_accepting()
        self.close_clients()
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    async def aclose(self) -> None:
        """Stop accepting and close gracefully: a command already running finishes and its reply
        is written, queued events are flushed, then every client is disconnected. Bound it with
        a cancel scope; when cancelled it closes at once."""
        self._closing = True
        self.stop_accepting()
        for client in list(self._clients):
            if client.read_scope is not None:
                client.read_scope.cancel()
        try:
            while self._clients:
                await self._client_gone.wait()
        finally:
            self.close()

    # -- events --------------------------------------------------------------------------------

    def emit(
        self, event: str, data: Mapping[str, Any] | None = None, at: float | None = None
    ) -> None:
        """Send an event to every client that completed negotiation, stamped `at` (time.time()
        when it happened; by default now). Never blocks: a client too far behind
        (MAX_PENDING messages) is disconnected rather than slowing the VMM."""
        now = time.time() if at is None else at
        seconds = math.floor(now)
        message: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
        if data is not None:
            message["data"] = data
        encoded = _encode(message)
        for client in list(self._clients):
            if client.negotiated and not client.queue(encoded):
                log.warning(
                    "QMP client %d is not reading its events; disconnecting it", client.number
                )
                client.close()

    # -- accepting -----------------------------------------------------------------------------

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while not self._closing:
            if not self._accepting:
                self._accept_wakeup = trio.Event()
                await self._accept_wakeup.wait()
                continue
            with trio.CancelScope() as self._accept_scope:
                while self._may_accept():
                    await trio.lowlevel.wait_readable(self._listen_sock)
                    # A wakeup may already be queued when stop_accepting runs: check again, so
                    # that not one connection is taken after it returned.
                    if not self._may_accept():
                        break
                    try:
                        conn, _ = self._listen_sock.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        # EMFILE and friends: keep the socket for later rather than spin.
                        log.warning("QMP accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._serve_client, conn)
            self._accept_scope = None

    # Methods, not attributes, so that type checkers do not assume these stay unchanged across
    # an await.
    def _may_accept(self) -> bool:
        return self._accepting and not self._closing

    def _is_closing(self) -> bool:
        return self._closing

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if self._allowed_uids is None:
            return True
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return False
        pid, uid, _ = _UCRED.unpack(raw)
        if uid in self._allowed_uids:
            return True
        log.warning(
            "QMP client pid %d runs as uid %d, which may not control this VM (allowed: %s); "
            "disconnected",
            pid,
            uid,
            ", ".join(map(str, sorted(self._allowed_uids))),
        )
        return False

    # -- one client ----------------------------------------------------------------------------

    async def _serve_client(self, conn: socket.socket) -> None:
        if not self._peer_allowed(conn):
            conn.close()
            return
        self._client_count += 1
        client = _Client(conn, self._client_count)
        self._clients.add(client)
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.write_loop)
                    await client.write(self._greeting)
                    await self._read_loop(client)
                    client.outbox_send.close()  # the writer flushes what is queued, then ends
        except Exception:
            # A bug in serving one client must not take the VMM's control socket down.
            log.exception("QMP client %d: internal error; disconnecting it", client.number)
        finally:
            self._clients.discard(client)
            self._client_gone.set()
            self._client_gone = trio.Event()
            client.outbox_send.close()
            trio.lowlevel.notify_closing(conn)
            conn.close()

    async def _read_loop(self, client: _Client) -> None:
        splitter = _RequestSplitter(self._max_line)
        while not self._closing:
            data = b""  # stays empty when aclose() cancels the wait: the session ends
            with trio.CancelScope() as client.read_scope:
                data = await client.read()
            client.read_scope = None
            if not data:
                return
            for request in splitter.feed(data):
                if request is TOO_LONG or len(request) > self._max_line:
                    await client.write(self._too_long())
                else:
                    await client.write(await self._dispatch(client, request))
                if self._is_closing():
                    return

    def _too_long(self) -> bytes:
        return _error(
            "GenericError", f"QMP input line is longer than {self._max_line} bytes; discarded"
        )

    async def _dispatch(self, client: _Client, line: bytes) -> bytes:
        """One request line -> one encoded reply line (QEMU's qmp_dispatch, in its order)."""
        try:
            request = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            return _error("GenericError", f"JSON parse error, {exc}")
        except RecursionError:
            return _error("GenericError", "JSON parse error, nesting too deep")
        if not isinstance(request, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        has_id = "id" in request
        request_id = request.get("id")

        def fail(desc: str, error_class: str = "GenericError") -> bytes:
            return _error(error_class, desc, request_id, has_id)

        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    return fail("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return fail("QMP input member 'arguments' must be an object")
            elif key != "id":
                return fail(f"QMP input member '{key}' is unexpected")
        name = request.get("execute")
        if name is None:
            return fail("QMP input lacks member 'execute'")
        arguments: dict[str, Any] = request.get("arguments", {})

        if not client.negotiated:
            if name != "qmp_capabilities":
                return fail(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
            return self._negotiate(client, arguments, request_id, has_id)

        handler = self._handlers.get(name)
        if handler is None:
            return fail(f"The command {name} has not been found", "CommandNotFound")
        try:
            result = await handler(arguments)
        except QMPCommandError as exc:
            return fail(exc.desc, exc.error_class)
        except HandoffError as exc:
            return fail(str(exc))
        except Exception as exc:
            log.exception("QMP command %s failed", name)
            return fail(f"internal error in {name}: {type(exc).__name__}: {exc}")
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if has_id:
            reply["id"] = request_id
        try:
            return _encode(reply)
        except (TypeError, msgspec.EncodeError) as exc:
            log.error("QMP command %s returned a value that cannot be encoded: %s", name, exc)
            return fail(f"internal error in {name}: its result cannot be encoded as JSON")

    def _negotiate(
        self, client: _Client, arguments: dict[str, Any], request_id: Any, has_id: bool
    ) -> bytes:
        for key, value in arguments.items():
            if key != "enable":
                return _error(
                    "GenericError", f"Parameter '{key}' is unexpected", request_id, has_id
                )
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return _error(
                    "GenericError",
                    "Invalid parameter type for 'enable', expected: array of strings",
                    request_id,
                    has_id,
                )
            if value:
                return _error(
                    "GenericError", f"Capability '{value[0]}' not available", request_id, has_id
                )
        client.negotiated = True
        reply: dict[str, Any] = {"return": {}}
        if has_id:
            reply["id"] = request_id
        return _encode(reply)

    # -- built-in commands ---------------------------------------------------------------------

    async def _qmp_capabilities_again(self, arguments: dict[str, Any]) -> Any:
        raise QMPCommandError(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )

    async def _query_commands(self, arguments: dict[str, Any]) -> Any:
        return [{"name": name} for name in self.command_names()]
