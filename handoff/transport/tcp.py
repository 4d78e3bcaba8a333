"""The cross-host connection: length-prefixed frames over TCP with mutual TLS 1.3, no fds.

The transport of cross-host SEV migration (DESIGN section 8): the source's VMM connects to the
target's, both present host certificates (`--tls-cert`, `--tls-key`) and verify the peer's
against the CA they were given (`--tls-ca`). It owns four promises:

* **No unauthenticated peer gets a byte of protocol.** Only TLS 1.3 is offered; the client
  verifies the server's certificate and name during the handshake, the server requires and
  verifies the client's. Then each side sends a short greeting (`GREETING`) and reads the
  peer's before `connect` or `accept` returns: the server sends its greeting only once it has
  verified the client, so a client refused by the server fails in `connect` with the server's
  alert rather than on its first frame, and a peer that is not a handoff endpoint is named.
* **Frames are whole and bounded.** A frame is a 4-byte big-endian length and that many bytes
  (1 ..`max_frame`). A larger announced length is refused before anything of it is read; a
  stream that ends inside a frame is a truncation, never a short message.
* **Errors are translated once, here**, into `TransportError` with a sentence an operator can
  act on (what failed, with whom, what to check).
* **A clean end is not an error.** `receive` returns None when the peer closed the connection
  with TLS close_notify at a frame boundary (`aclose`). A reset (`abort`, a crashed host's
  RST), an end without close_notify, or one inside a frame raises `TransportError`; a reset
  carries `errno.ECONNRESET`. The protocol machine takes both as the end of the connection
  (`RemoteConnection.receive(None)`); the log says which.

Why not `transport.base.Connection`: that interface is the intra-host shell's, built around fds
(SCM_RIGHTS) and the blackout's non-yielding `send_now` / `receive_now` calls. A TLS stream
carries no fds, and its records cannot be read without the event loop. So `Channel` is a
sibling with the async half of that interface and no fds: `send(frame)`, `receive() -> frame |
None`, `aclose()`, `abort()`, `closed`, and the peer's certificate names for the shell's log
and checks (`peer_names`). The cross-host machine (`protocol.remote`) takes frames without an
fd count to match.

Addresses are `tcp:HOST:PORT`: an IPv4 address, a bracketed IPv6 address (`tcp:[::1]:4444`) or
a host name; `parse_address` is the one parser, with errors that show the accepted forms.

After the greeting the channel runs TLS itself on the connection's `ssl.SSLObject` and memory
BIOs (trio's `SSLStream` did the handshake and the greeting, with the same context, and hands
over its state: see `_TlsState`): a read takes up to `_RECEIVE_CHUNK` bytes from the socket
and decrypts every whole record in them in one round of trio's scheduler (trio's stream takes
one round per 16 KiB record), and a write encrypts all its frames and sends the records in one
socket write. What TLS guarantees is unchanged: the same context made and verified the
session, records are decrypted and authenticated by OpenSSL, close_notify is the only clean
end, and a record cut short by the end of the stream is an error.

Timeouts are the caller's (trio cancel scopes). A `receive` cancelled between frames loses
nothing (partial frames stay buffered); a cancelled `send`, `connect` or `accept` leaves the
TLS stream unusable: the channel is closed.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import ssl
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trio

from handoff.errors import Refused, TransportError

__all__ = [
    "GREETING",
    "HANDSHAKE_TIMEOUT",
    "MAX_FRAME_SIZE",
    "AddressError",
    "Channel",
    "Listener",
    "TcpAddress",
    "TlsFiles",
    "client_context",
    "connect",
    "listen",
    "parse_address",
    "server_context",
]

#: The largest frame either side sends or accepts by default: the remote protocol's messages
#: are at most 320 KiB (`protocol.remote.MAX_MESSAGE_BYTES`: a full batch of private pages).
MAX_FRAME_SIZE = 320 * 1024
#: Sent by each side once the TLS handshake succeeded (and, for the server, the client's
#: certificate was verified): the transport's name and version.
GREETING = b"handoff-tcp/1\n"

#: Seconds a peer has to complete the TLS handshake and the greeting: one that connects and
#: says nothing must not hold up `Listener.accept` for the next.
HANDSHAKE_TIMEOUT = 10.0

_LENGTH = struct.Struct(">I")
#: Bytes asked of the socket per read: about sixteen full TLS records, decrypted together.
_RECEIVE_CHUNK = 256 * 1024
#: Plaintext asked of OpenSSL per call: more than a record holds (it returns one at most).
_RECORD_PLAINTEXT = 64 * 1024
_FORMS = (
    "tcp:HOST:PORT, where HOST is an IPv4 address, a host name, or an IPv6 address in brackets "
    "(tcp:[::1]:4444)"
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class AddressError(ValueError):
    """A `tcp:` address that cannot be used; the message shows the accepted forms."""


@dataclass(frozen=True)
class TcpAddress:
    """A parsed `tcp:HOST:PORT`. `host` is without brackets; `str()` gives the address back."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str, *, listening: bool = False) -> TcpAddress:
    """Parse `tcp:HOST:PORT`.

    Args:
        text: the address, as the operator wrote it.
        listening: allow port 0 (the kernel picks one; `Listener.address` says which).

    Raises:
        AddressError: what is wrong, and the accepted forms.
    """
    if not text.startswith("tcp:"):
        raise AddressError(f"{text!r} is not a TCP address: expected {_FORMS}")
    rest = text[4:]
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise AddressError(f"{text!r}: the IPv6 address has no closing bracket; {_FORMS}")
        host, after = rest[1:close], rest[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: [{host}] is not an IPv6 address; {_FORMS}") from None
        if not after.startswith(":"):
            raise AddressError(f"{text!r}: no port after the IPv6 address; {_FORMS}")
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise AddressError(f"{text!r}: no port; {_FORMS}")
        if ":" in host:
            raise AddressError(
                f"{text!r}: an IPv6 address must be written in brackets, tcp:[{host}]:{port_text}"
            )
        if not host:
            raise AddressError(f"{text!r}: no host; {_FORMS}")
        if not _is_ipv4(host) and not _HOSTNAME.match(host):
            raise AddressError(
                f"{text!r}: {host!r} is neither an IPv4 address nor a valid host name; {_FORMS}"
            )
    if not port_text.isdigit() or not port_text.isascii():
        raise AddressError(f"{text!r}: the port {port_text!r} is not a number; {_FORMS}")
    port = int(port_text)
    low = 0 if listening else 1
    if not low <= port <= 65535:
        raise AddressError(f"{text!r}: port {port} is outside {low}..65535")
    return TcpAddress(host=host, port=port)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# ---- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """This host's certificate and key, and the CA that signs the hosts it talks to (PEM
    files: `--tls-cert`, `--tls-key`, `--tls-ca`)."""

    cert: Path
    key: Path
    ca: Path


def _load(context: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    for flag, path in (
        ("--tls-cert", files.cert),
        ("--tls-key", files.key),
        ("--tls-ca", files.ca),
    ):
        if not Path(path).is_file():
            raise Refused(f"{flag} {path}: no such file")
    try:
        mode = stat.S_IMODE(os.stat(files.key).st_mode)
    except OSError as exc:
        raise Refused(f"--tls-key {files.key}: {exc.strerror}") from exc
    if mode & 0o077:
        raise Refused(
            f"--tls-key {files.key} has mode {mode:04o}: other users could read this host's "
            f"private key; run `chmod 600 {files.key}`"
        )
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise Refused(
            f"cannot use --tls-cert {files.cert} with --tls-key {files.key}: {_ssl_reason(exc)} "
            "(both must be PEM, and the key the certificate's)"
        ) from exc
    try:
        context.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise Refused(
            f"cannot use --tls-ca {files.ca}: {_ssl_reason(exc)} (a PEM CA certificate)"
        ) from exc
    return context


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate signed by `files.ca`.

    Raises:
        Refused: a file is missing, unreadable, not PEM, or the key is readable by others.
    """
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3 client context that verifies the server's certificate (signed by
    `files.ca`, naming the host connected to) and presents ours.

    Raises:
        Refused: as `server_context`.
    """
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), files)
    context.check_hostname = True
    return context


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _translate(exc: BaseException, what: str) -> TransportError:
    """One error for everything the stream can raise, naming the cause."""
    for cause in _causes(exc):
        if isinstance(cause, ConnectionResetError):
            return TransportError(f"{what}: connection reset by the peer", errno=errno.ECONNRESET)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TransportError(
                f"{what}: the peer's certificate was refused: {_ssl_reason(cause)} "
                "(check that both hosts' --tls-ca signed the other's --tls-cert, and the name "
                "connected to is in the server's certificate)"
            )
        if isinstance(cause, ssl.SSLEOFError):
            return TransportError(
                f"{what}: the peer closed the connection without TLS close_notify "
                "(it crashed, or something cut the connection)",
                errno=errno.ECONNABORTED,
            )
        if isinstance(cause, ssl.SSLError):
            reason = _ssl_reason(cause)
            hint = ""
            upper = reason.upper()
            if "CERTIFICATE_REQUIRED" in upper:
                hint = " (the peer requires a client certificate: pass --tls-cert/--tls-key)"
            elif "DID_NOT_RETURN_A_CERTIFICATE" in upper:
                hint = " (the peer presented no certificate: it must be given --tls-cert/--tls-key)"
            elif "UNKNOWN_CA" in upper:
                hint = " (the peer's --tls-ca did not sign this host's certificate)"
            elif "BAD_CERTIFICATE" in upper:
                hint = (
                    " (the peer refused this host's certificate: not signed by its --tls-ca, "
                    "or not naming the address it connected to)"
                )
            elif "VERSION" in upper:
                hint = " (only TLS 1.3 is accepted)"
            return TransportError(f"{what}: TLS refused: {reason}{hint}")
        if isinstance(cause, OSError) and cause.errno is not None:
            return TransportError(
                f"{what}: {cause.strerror or os.strerror(cause.errno)}", errno=cause.errno
            )
    if isinstance(exc, trio.ClosedResourceError):
        return TransportError(f"{what}: the channel is closed", errno=errno.EBADF)
    return TransportError(f"{what}: the connection broke ({exc!r})")


# ---- the channel -------------------------------------------------------------------------------


@dataclass
class _TlsState:
    """The TLS session of a stream that completed its handshake and greeting: the
    `SSLObject`, its two memory BIOs, and ciphertext OpenSSL wrote that is not yet sent (trio
    holds back a TLS 1.3 server's session tickets until its first write)."""

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    unsent: bytes

    @classmethod
    def take_over(cls, stream: trio.SSLStream[trio.SocketStream]) -> _TlsState:
        """Take the session out of trio's `stream`, which must not be used after. The BIOs
        keep what the peer sent beyond the greeting (ciphertext in `incoming`, plaintext
        inside the `SSLObject`): nothing is lost and nothing is decrypted twice.

        Raises:
            TypeError: trio keeps its state otherwise than this code knows (a trio
                upgrade): refuse rather than guess.
        """
        tls = getattr(stream, "_ssl_object", None)
        incoming = getattr(stream, "_incoming", None)
        outgoing = getattr(stream, "_outgoing", None)
        unsent = getattr(stream, "_delayed_outgoing", None) or b""
        if not (
            isinstance(tls, ssl.SSLObject)
            and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(outgoing, ssl.MemoryBIO)
            and isinstance(unsent, bytes | bytearray)
        ):
            raise TypeError(f"cannot take the TLS session out of this trio ({trio.__version__})")
        return cls(tls=tls, incoming=incoming, outgoing=outgoing, unsent=bytes(unsent))


class Channel:
    """One mutually authenticated connection carrying frames. Built by `connect` and
    `Listener.accept`; one task may send while another receives."""

    def __init__(
        self, stream: trio.SSLStream[trio.SocketStream], peer: str, max_frame: int
    ) -> None:
        state = _TlsState.take_over(stream)
        self._tcp = stream.transport_stream
        self._tls = state.tls
        self._incoming = state.incoming
        self._outgoing = state.outgoing
        self._unsent = state.unsent
        self.peer = peer  # "tcp:host:port", for messages
        self.max_frame = max_frame
        # Bytes received and not yet taken as frames: `_buffer[_start:]`. Frames are taken by
        # moving `_start`; what was taken is cut off once per read, not once per frame.
        self._buffer = bytearray()
        self._start = 0
        self._view: memoryview | None = None  # of `_buffer`, released before it changes
        # Whoever takes ciphertext out of `_outgoing` holds this until it is sent, so records
        # reach the socket in the order OpenSSL wrote them.
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._closed = False
        self._eof = False  # close_notify received
        # What ended the stream after the frames already decrypted: raised once they are taken.
        self._failure: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_certificate(self) -> dict[str, object]:
        """The peer's verified certificate, as `ssl.SSLSocket.getpeercert()` gives it."""
        cert = self._tls.getpeercert()
        return dict(cert) if cert else {}

    @property
    def peer_names(self) -> tuple[str, ...]:
        """The names the peer's verified certificate holds (DNS and IP subjectAltNames, then
        the subject's commonName), for the shell's log and its own allow-list."""
        cert: dict[str, Any] = dict(self._tls.getpeercert() or {})
        alt_names = cert.get("subjectAltName", ())
        names = [value for kind, value in alt_names if kind in ("DNS", "IP Address")]
        for rdn in cert.get("subject", ()):
            names += [value for key, value in rdn if key == "commonName"]
        return tuple(str(n) for n in names)

    async def send(self, frame: bytes) -> None:
        """Send one frame.

        Raises:
            TransportError: empty or larger than `max_frame`, or the connection failed (the
                channel is then closed).
        """
        await self.send_many((frame,))

    async def send_many(self, frames: Sequence[bytes]) -> None:
        """Send several frames in one write (fewer, larger TLS records and system calls: a
        migration's shared pages are a 4 KiB frame each). The peer receives them one by one, as
        if sent one by one.

        Raises:
            TransportError: as `send`, before anything is sent if a frame is refused.
        """
        if self._closed:
            raise TransportError(f"send to {self.peer}: the channel is closed", errno=errno.EBADF)
        for frame in frames:
            if not frame:
                raise TransportError("a frame must carry at least one byte")
            if len(frame) > self.max_frame:
                raise TransportError(
                    f"a {len(frame)}-byte frame exceeds the {self.max_frame}-byte limit"
                )
        parts: list[bytes] = []
        for frame in frames:
            parts += (_LENGTH.pack(len(frame)), frame)
        data = b"".join(parts)
        if not data:
            await trio.lowlevel.checkpoint()
            return
        await self._send_plaintext(data)

    async def _send_plaintext(self, data: bytes) -> None:
        """Encrypt `data` (records of up to 16 KiB; none for b"") and send all the ciphertext
        OpenSSL holds in one write."""
        await _take(self._send_lock)
        try:
            if data:
                self._tls.write(data)
            await self._send_outgoing()
        except BaseException as exc:
            self._break()
            if isinstance(exc, trio.Cancelled | KeyboardInterrupt):
                raise
            raise _translate(exc, f"send to {self.peer}") from exc
        finally:
            self._send_lock.release()

    async def _send_outgoing(self) -> None:
        """Send what OpenSSL wrote; the caller holds `_send_lock`."""
        data = self._outgoing.read()
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        if data:
            await self._tcp.send_all(data)

    async def receive(self) -> bytes | None:
        """The next frame, or None when the peer closed the connection cleanly between frames.
        A frame that arrived already is returned at once (no checkpoint), if no other task
        is receiving.

        Raises:
            TransportError: a frame larger than `max_frame` was announced, the stream ended
                inside a frame or without close_notify, or was reset (`errno` ECONNRESET).
        """
        if not self._receive_lock.locked():  # then no task waits for it either
            frame = self._take_frame()
            if frame is not None:
                return frame  # it arrived already
        await _take(self._receive_lock)
        try:
            while True:
                frame = self._take_frame()
                if frame is not None:
                    return frame
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    self._break()
                    raise _translate(failure, f"receive from {self.peer}") from failure
                if self._eof:
                    if len(self._buffer) > self._start:
                        raise self._truncated()
                    return None
                if self._closed:
                    raise TransportError(
                        f"receive from {self.peer}: the channel is closed", errno=errno.EBADF
                    )
                try:
                    data = await self._tcp.receive_some(_RECEIVE_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._break()
                    raise _translate(exc, f"receive from {self.peer}") from exc
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                self._decrypt()
                if self._outgoing.pending and not self._closed and self._failure is None:
                    await self._answer()
        finally:
            self._receive_lock.release()

    def _decrypt(self) -> None:
        """Decrypt every whole record received into `_buffer`. A partial record stays in
        `_incoming` for the next read. close_notify sets `_eof`; an error (a record that fails
        authentication, an end without close_notify, an alert) is kept in `_failure`, raised
        once the frames decrypted before it are taken."""
        self._release_view()
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        buffer, read = self._buffer, self._tls.read
        try:
            while True:
                chunk = read(_RECORD_PLAINTEXT)
                if not chunk:  # OpenSSL's end of the stream (close_notify)
                    self._eof = True
                    return
                buffer += chunk
        except ssl.SSLWantReadError:
            return  # no whole record left
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as exc:
            self._failure = exc

    async def _answer(self) -> None:
        """Send what reading made OpenSSL write (TLS 1.3: a KeyUpdate's answer), after any
        write in progress."""
        await self._send_plaintext(b"")

    def take_buffered(self) -> bytes | None:
        """The next frame if it has already arrived whole, else None; never waits or reads
        the socket. A reader of many small frames takes, after each `receive`, those that
        came in the same TLS records, without a round of the event loop for each.

        Raises:
            TransportError: the next frame's announced length is out of bounds.
        """
        if self._closed and len(self._buffer) == self._start:
            return None
        return self._take_frame()

    def _take_frame(self) -> bytes | None:
        buffer, start = self._buffer, self._start
        if len(buffer) - start < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buffer, start)
        if length == 0 or length > self.max_frame:
            self._break()
            raise TransportError(
                f"{self.peer} announced a frame of {length} bytes; frames are 1.."
                f"{self.max_frame} bytes: a peer speaking another protocol, or a broken one"
            )
        end = start + _LENGTH.size + length
        if len(buffer) < end:
            return None
        view = self._view
        if view is None:
            view = self._view = memoryview(buffer)
        frame = bytes(view[start + _LENGTH.size : end])
        self._start = end
        return frame

    def _release_view(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def _truncated(self) -> TransportError:
        have = len(self._buffer) - self._start
        if have < _LENGTH.size:
            detail = f"{have} of the {_LENGTH.size} bytes of a frame's length"
        else:
            (length,) = _LENGTH.unpack_from(self._buffer, self._start)
            detail = f"{have - _LENGTH.size} of a {length}-byte frame"
        self._release_view()
        self._buffer.clear()
        self._start = 0
        return TransportError(f"{self.peer} closed the connection after {detail}: truncated")

    async def aclose(self) -> None:
        """Close cleanly: TLS close_notify, then the socket (the peer's `receive` returns
        None). Never raises; idempotent."""
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self._close_notify()
        if scope.cancelled_caught:
            self.abort()

    async def _close_notify(self) -> None:
        """One close_notify after any write in progress, without waiting for the peer's (as
        trio's `SSLStream.aclose`), then close the socket."""
        try:
            await _take(self._send_lock)
            try:
                with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: no answer awaited
                    self._tls.unwrap()
                await self._send_outgoing()
            finally:
                self._send_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self._tcp.aclose()

    def abort(self) -> None:
        """Close at once with a TCP reset: the peer's `receive` raises ECONNRESET. For a peer
        that must stop hearing from us now (and for tests)."""
        self._closed = True
        sock = self._tcp.socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _break(self) -> None:
        """After a failed or cancelled operation the TLS stream is in an unknown state."""
        if not self._closed:
            self.abort()

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
        return f"<tcp.Channel {self.peer}{' closed' if self._closed else ''}>"


async def _take(lock: trio.Lock) -> None:
    """Take `lock` at once if it is free, else wait for it. Unlike `async with lock`, taking a
    free lock is not a checkpoint: the stream operation that follows is one (a channel moves
    a migration's pages a TLS record at a time, and each checkpoint is a round of trio's
    scheduler)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


async def _greet(
    stream: trio.SSLStream[trio.SocketStream], peer: str, server: bool, timeout: float
) -> None:
    """The handshake and the greeting exchange (see the module docstring)."""
    try:
        with trio.fail_after(timeout):
            await _greet_now(stream, peer, server)
    except trio.TooSlowError:
        raise TransportError(
            f"TLS with {peer}: no handshake and greeting within {timeout:g} s",
            errno=errno.ETIMEDOUT,
        ) from None


async def _greet_now(stream: trio.SSLStream[trio.SocketStream], peer: str, server: bool) -> None:
    what = f"TLS with {peer}"
    handshaken = False
    try:
        await stream.do_handshake()  # the server verifies the client; the client the server
        handshaken = True
        if server:
            greeting = await _read_exactly(stream, len(GREETING))
            if greeting == GREETING:
                await stream.send_all(GREETING)
        else:
            await stream.send_all(GREETING)
            greeting = await _read_exactly(stream, len(GREETING))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        error = _translate(exc, what)
        if not server and handshaken and "TLS refused" not in str(error):
            # TLS 1.3: the server judges our certificate after our handshake is done.
            error = TransportError(
                f"{error}; the server ended the connection after the handshake: it refused "
                "this host's certificate (check that its --tls-ca signed our --tls-cert)",
                errno=error.errno,
            )
        raise error from exc
    if greeting != GREETING:
        raise TransportError(
            f"{peer} is not a handoff TCP endpoint (it sent {greeting[:16]!r}); check the "
            "address and port"
        )


async def _refuse(stream: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
    """End a connection that failed its handshake or greeting: send the TLS alert OpenSSL
    wrote (trio leaves it unsent when the handshake fails), so the peer learns why, then
    close. Never more than half a second."""
    with trio.move_on_after(0.5) as scope:
        scope.shield = True
        outgoing = getattr(stream, "_outgoing", None)
        pending = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
        try:
            if pending:
                await tcp.send_all(pending)
            await tcp.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if scope.cancelled_caught:
        _reset(tcp)


async def _read_exactly(stream: trio.SSLStream[trio.SocketStream], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def connect(
    address: TcpAddress | str,
    tls: ssl.SSLContext | TlsFiles,
    *,
    local_host: str | None = None,
    max_frame: int = MAX_FRAME_SIZE,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Channel:
    """Connect to a listening handoff endpoint, authenticate both ways, and greet.

    The server's certificate must be signed by our CA and name `address.host` (a DNS or IP
    subjectAltName). `local_host` binds our end to one of this host's addresses (the one its
    certificate names, on a host with several).

    Raises:
        AddressError: `address` does not parse.
        Refused: our own TLS files cannot be used.
        TransportError: the connection, the handshake or the greeting failed (the message
            says which, and what to check).
    """
    if isinstance(address, str):
        address = parse_address(address)
    context = client_context(tls) if isinstance(tls, TlsFiles) else tls
    try:
        tcp = await trio.open_tcp_stream(address.host, address.port, local_address=local_host)
    except OSError as exc:
        raise TransportError(
            f"cannot connect to {address}: {exc.strerror or exc}", errno=exc.errno
        ) from exc
    stream = trio.SSLStream(tcp, context, server_hostname=address.host)
    try:
        await _greet(stream, str(address), server=False, timeout=handshake_timeout)
    except TransportError:
        await _refuse(stream, tcp)
        raise
    except BaseException:
        _reset(tcp)
        raise
    return Channel(stream, str(address), max_frame)


def _reset(tcp: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tcp.socket.close()


class Listener:
    """A listening TCP socket whose `accept` returns authenticated channels only."""

    def __init__(
        self,
        listener: trio.SocketListener,
        context: ssl.SSLContext,
        address: TcpAddress,
        max_frame: int,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._listener = listener
        self._context = context
        self.address = address  # with the port actually bound
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout

    async def accept(self) -> Channel:
        """The next peer that completes the handshake with a certificate signed by our CA and
        greets. A peer that fails is disconnected and raises `TransportError` (the listener
        stays usable); it never gets a byte of protocol.

        Raises:
            TransportError: as `connect`, for this peer.
        """
        try:
            tcp = await self._listener.accept()
        except OSError as exc:
            raise TransportError(
                f"accept on {self.address}: {exc.strerror}", errno=exc.errno
            ) from exc
        try:
            host, port = tcp.socket.getpeername()[:2]
        except OSError:
            host, port = "?", 0
        peer = str(TcpAddress(host=str(host), port=int(port)))
        stream = trio.SSLStream(tcp, self._context, server_side=True)
        try:
            await _greet(stream, peer, server=True, timeout=self.handshake_timeout)
        except TransportError:
            await _refuse(stream, tcp)
            raise
        except BaseException:
            _reset(tcp)
            raise
        return Channel(stream, peer, self.max_frame)

    async def aclose(self) -> None:
        await self._listener.aclose()

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
        return f"<tcp.Listener {self.address}>"


async def listen(
    address: TcpAddress | str,
    tls: ssl.SSLContext | TlsFiles,
    *,
    backlog: int = 16,
    max_frame: int = MAX_FRAME_SIZE,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Listener:
    """Listen on `address` (port 0: any free port, see `Listener.address`).

    Raises:
        AddressError: `address` does not parse.
        Refused: our own TLS files cannot be used.
        TransportError: the address cannot be bound (in use, not local, ...).
    """
    if isinstance(address, str):
        address = parse_address(address, listening=True)
    context = server_context(tls) if isinstance(tls, TlsFiles) else tls
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise TransportError(f"cannot resolve {address}: {exc.strerror or exc}") from exc
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot listen on {address}: {exc.strerror or exc}", errno=exc.errno
        ) from exc
    bound = TcpAddress(host=address.host, port=sock.getsockname()[1])
    return Listener(trio.SocketListener(sock), context, bound, max_frame, handshake_timeout)
