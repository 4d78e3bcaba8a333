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
unbalanced or garbled line gets a "JSON parse error" for that line and goes on.

Limits, so that no client can freeze the guest or take the socket from others (QEMU's parser
has the first two too): a request longer than `max_line` bytes is discarded with one error
(never held whole); one nested deeper than `MAX_NESTING` is refused before it is parsed ("JSON
nesting depth limit exceeded"); an object with a key twice is refused ("JSON parse error,
duplicate key") rather than letting the last one win. A client's input is read and scanned in
bounded steps (READ_PER_TURN bytes, SCAN_PER_TURN tokens, one request) with the event loop served
in between, so a flood costs the guest's exits no more than one step's wait. At most
`max_clients` clients are served at once; one more gets an error instead of the greeting and
is closed. Warnings a client can provoke are logged at most once per WARNING_INTERVAL.

Per client, commands run one at a time in arrival order, as in QEMU without out-of-band
execution; different clients run concurrently. A handler is an async callable taking the
arguments dict and returning any value msgspec can encode (None becomes ``{}``); it reports a
failure by raising `QMPCommandError`. A `HandoffError` becomes a GenericError with its message;
any other exception is logged and reported as a GenericError, never ending the server.
"""

from __future__ import annotations

import contextlib
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
    "MAX_CLIENTS",
    "MAX_LINE",
    "MAX_NESTING",
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

#: QEMU's limit on how deeply a request nests objects and arrays (MAX_NESTING in its
#: json-streamer.c); deeper requests are refused before they are parsed.
MAX_NESTING = 1024

#: Clients served at once; one more is refused with an error instead of the greeting.
MAX_CLIENTS = 64

#: Messages (events, mostly) waiting for one slow client before it is disconnected.
MAX_PENDING = 1024

#: Bytes read from one client before the event loop serves its other tasks (the guest's
#: exits): a client that floods the socket never holds the loop for longer than this takes.
READ_PER_TURN = 16 * 1024

#: Tokens (brackets, runs of them, strings, newlines) scanned for request ends per turn.
SCAN_PER_TURN = 256

#: Seconds between two warnings of one kind (see `_Throttled`).
WARNING_INTERVAL = 10.0

NESTING_TOO_DEEP = "JSON nesting depth limit exceeded"

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


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of a unix socket's peer (SO_PEERCRED); -1, -1 if unknown."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return -1, -1
    pid, uid, _ = _UCRED.unpack(raw)
    return pid, uid


def _encode(message: Mapping[str, Any]) -> bytes:
    return _encoder.encode(message) + b"\n"


def _error(error_class: str, desc: str, request_id: Any = None, has_id: bool = False) -> bytes:
    message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        message["id"] = request_id
    return _encode(message)


_SPECIAL = re.compile(rb'["{}\[\]\n]')
_OPENERS = re.compile(rb"[{\[]*")
_CLOSERS = re.compile(rb"[}\]]*")
_STRING_REST = re.compile(rb'(?:[^"\\\n]|\\.)*+')


def _end_of(pattern: re.Pattern[bytes], buf: bytearray, pos: int) -> int:
    """Where a match of `pattern` (which may match nothing) at `pos` ends."""
    match = pattern.match(buf, pos)
    return pos if match is None else match.end()


class _RequestSplitter:
    """Cut a QMP byte stream into requests (see "Framing" above).

    A request ends when its outermost `{`/`[` closes (brackets inside strings do not count), or
    at a newline (which ends a blank, scalar, unbalanced or garbled line). `feed` returns the
    requests that ended, in order, and in their place a `str`, the description of the error to
    answer, for one that is refused before parsing: one longer than `max_len` bytes, or nested
    deeper than `MAX_NESTING` (QEMU's json-streamer limits). A refused request is dropped up to
    its end; no more than `max_len` bytes of it are ever held.

    The cost of a `feed` is linear in the data it scans: runs of brackets count at once,
    strings are skipped by one regular expression, and the buffer is compacted once per call.
    With a `budget` it scans at most that many tokens (brackets, runs, strings, newlines) and
    leaves the rest for the next call (`more` says whether some is left).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.too_long = f"QMP input line is longer than {max_len} bytes; discarded"
        self.buf = bytearray()
        self.start = 0  # the current request begins here
        self.pos = 0  # scanned up to here
        self.depth = 0
        self.in_string = False
        self.discarding = False
        self.more = False  # the last feed left data unscanned (its budget ran out)

    def feed(self, data: bytes, budget: int = -1) -> list[bytes | str]:
        buf = self.buf
        buf += data
        out: list[bytes | str] = []
        pos, size = self.pos, len(buf)
        self.more = False
        while pos < size:
            if budget == 0:
                self.more = True
                break
            budget -= 1
            if self.in_string:
                stop = _end_of(_STRING_REST, buf, pos)
                if stop == size or (buf[stop] == 0x5C and stop + 1 == size):
                    pos = stop  # the string (or its escape) goes on in the next data
                    break
                self.in_string = False
                # A quote ends the string; a newline (raw, or after a backslash) ends the line,
                # as it does outside strings: a raw one in a string is invalid JSON anyway.
                pos = stop + 1 if buf[stop] != 0x0A else stop
                continue
            match = _SPECIAL.search(buf, pos)
            if match is None:
                pos = size
                break
            i = match.start()
            char = buf[i]
            if char == 0x22:
                self.in_string = True
                pos = i + 1
            elif char == 0x0A:
                pos = self._emit(out, i, i + 1)
            elif char in b"{[":
                run_end = _end_of(_OPENERS, buf, i)
                self.depth += run_end - i
                pos = run_end
                if self.depth > MAX_NESTING and not self.discarding:
                    out.append(NESTING_TOO_DEEP)
                    self.discarding = True
            elif self.depth <= 0:  # a stray closer ends what came before it, with it
                pos = self._emit(out, i + 1, i + 1)
            else:
                run = _end_of(_CLOSERS, buf, i) - i
                if run >= self.depth:  # the outermost bracket closes in this run
                    pos = self._emit(out, i + self.depth, i + self.depth)
                else:
                    self.depth -= run
                    pos = i + run
        if not self.discarding and pos - self.start > self.max_len:
            out.append(self.too_long)
            self.discarding = True
        if self.discarding:
            self.start = pos  # keep the scanning state (its end is still to come), not its bytes
        del buf[: self.start]
        self.pos = pos - self.start
        self.start = 0
        return out

    def _emit(self, out: list[bytes | str], end: int, consumed: int) -> int:
        request = bytes(self.buf[self.start : end])
        self.start = consumed
        self.depth = 0
        self.in_string = False
        if self.discarding:
            self.discarding = False
        elif len(request) > self.max_len:
            out.append(self.too_long)
        elif request.strip():
            out.append(request)
        return consumed


class _Throttled:
    """A warning logged at most once per `WARNING_INTERVAL` seconds; the next one logged says how
    many were left out, so a client that repeats its fault cannot flood the log."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.left_out = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        if self.left_out:
            message += " (%d more like this since the last one, not logged)"
            args = (*args, self.left_out)
        log.warning(message, *args)
        self.left_out = 0
        self.next_at = now + WARNING_INTERVAL


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)


def _has_duplicate_keys(line: bytes, value: Any) -> bool:
    """Whether a decoded request had a key twice in one object (the decoder keeps the last).

    In valid JSON every member has exactly one colon outside strings, so the members written
    are counted in the text and compared with the members the decoded objects hold.
    """
    written = _JSON_STRING.sub(b"", line).count(b":")
    if written == 0:
        return False
    held = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            held += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return held != written


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
                return self.sock.recv(READ_PER_TURN)
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
        max_clients: clients served at once (connections still being checked count); one
            more is answered with a QMP error instead of the greeting and disconnected, so
            that idle connections cannot exhaust the VMM's file descriptors.
    """

    def __init__(
        self,
        listen_sock: socket.socket,
        handlers: Mapping[str, Handler] | None = None,
        *,
        package: str = f"handoff {__version__}",
        allowed_uids: Collection[int] | None = None,
        max_line: int = MAX_LINE,
        max_clients: int = MAX_CLIENTS,
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
        self._max_clients = max_clients
        self._too_many = _error(
            "GenericError",
            f"too many QMP clients: this VM serves at most {max_clients} at once; "
            "disconnect one and try again",
        )
        self._connections = 0  # accepted and not yet closed: clients, and those being checked
        self._warn_accept = _Throttled()
        self._warn_refused = _Throttled()
        self._warn_uid = _Throttled()
        self._warn_slow = _Throttled()
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
                self._warn_slow.warning(
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
                        self._warn_accept.warning("QMP accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if self._connections >= self._max_clients:
                        self._refuse(conn)
                        continue
                    self._connections += 1
                    nursery.start_soon(self._serve_client, conn)
            self._accept_scope = None

    # Methods, not attributes, so that type checkers do not assume these stay unchanged across
    # an await.
    def _may_accept(self) -> bool:
        return self._accepting and not self._closing

    def _is_closing(self) -> bool:
        return self._closing

    def _refuse(self, conn: socket.socket) -> None:
        """Answer a client over the limit with an error instead of the greeting, and close it
        at once: it never waits for a slot, holding an fd."""
        pid, uid = _peer(conn)
        with contextlib.suppress(OSError):
            conn.send(self._too_many, socket.MSG_DONTWAIT)  # a new socket's buffer is empty
        conn.close()
        self._warn_refused.warning(
            "QMP client pid %d (uid %d) refused: too many QMP clients (%d connected, the most "
            "this VM serves at once)",
            pid,
            uid,
            self._connections,
        )

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if self._allowed_uids is None:
            return True
        pid, uid = _peer(conn)
        if uid in self._allowed_uids:
            return True
        self._warn_uid.warning(
            "QMP client pid %d runs as uid %d, which may not control this VM (allowed: %s); "
            "disconnected",
            pid,
            uid,
            ", ".join(map(str, sorted(self._allowed_uids))),
        )
        return False

    # -- one client ----------------------------------------------------------------------------

    async def _serve_client(self, conn: socket.socket) -> None:
        try:
            await self._serve_checked_client(conn)
        finally:
            self._connections -= 1

    async def _serve_checked_client(self, conn: socket.socket) -> None:
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
            # Bounded work per turn, so that the guest's exits are served in between however
            # this client writes: at most READ_PER_TURN bytes read, SCAN_PER_TURN tokens
            # scanned, one request run.
            while True:
                for request in splitter.feed(data, SCAN_PER_TURN):
                    if isinstance(request, str):  # refused before parsing: too long, too deep
                        await client.write(_error("GenericError", request))
                    else:
                        await client.write(await self._dispatch(client, request))
                    if self._is_closing():
                        return
                    await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
                if not splitter.more:
                    break
                data = b""

    async def _dispatch(self, client: _Client, line: bytes) -> bytes:
        """One request line -> one encoded reply line (QEMU's qmp_dispatch, in its order)."""
        try:
            request = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            return _error("GenericError", f"JSON parse error, {exc}")
        except RecursionError:  # within MAX_NESTING, but deeper than the decoder recurses
            return _error("GenericError", NESTING_TOO_DEEP)
        if _has_duplicate_keys(line, request):
            # The decoder keeps the last of two equal keys: `{"execute": "query-name",
            # "execute": "quit"}` would quit. QEMU's parser refuses them; so do we.
            return _error("GenericError", "JSON parse error, duplicate key")
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
