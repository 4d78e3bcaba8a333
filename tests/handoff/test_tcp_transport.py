"""The cross-host transport: frames over TCP with mutual TLS 1.3, on 127.0.0.x.

Two "hosts" are two loopback addresses with certificates from a test CA
(`handoff.testing.tls`); the refusals use a second CA, a client without a certificate, a
server trusting the wrong CA, a certificate for another name and an older TLS version.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import ssl
import struct
import termios
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.errors import Refused, TransportError
from handoff.testing.tls import issue, make_ca, make_pki
from handoff.transport import tcp
from handoff.transport.tcp import (
    GREETING,
    AddressError,
    Channel,
    TcpAddress,
    TlsFiles,
    parse_address,
)

SOURCE_IP, TARGET_IP = "127.0.0.2", "127.0.0.3"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    return make_pki(
        tmp_path / "pki", {"source": [SOURCE_IP], "target": [TARGET_IP, "target.test", "localhost"]}
    )


@pytest.fixture
def foreign(tmp_path: Path) -> dict[str, TlsFiles]:
    """Certificates for the same names from another CA."""
    directory = tmp_path / "foreign"
    directory.mkdir()
    ca = make_ca(directory, "another CA")
    return {
        "source": issue(ca, directory, "source", [SOURCE_IP]),
        "target": issue(ca, directory, "target", [TARGET_IP]),
    }


async def _both(
    accept: Callable[[], Awaitable[Channel]], connect: Callable[[], Awaitable[Channel]]
) -> tuple[Channel | BaseException, Channel | BaseException]:
    """Run accept and connect together; each result is a channel or the error it raised."""
    results: dict[str, Any] = {}

    async def run(name: str, fn: Callable[[], Awaitable[Channel]]) -> None:
        try:
            results[name] = await fn()
        except (TransportError, Refused) as exc:
            results[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "server", accept)
            nursery.start_soon(run, "client", connect)
    return results["server"], results["client"]


async def _pair(
    listener: tcp.Listener, client_tls: TlsFiles | ssl.SSLContext, **kwargs: Any
) -> tuple[Channel, Channel]:
    server, client = await _both(
        listener.accept,
        lambda: tcp.connect(listener.address, client_tls, local_host=SOURCE_IP, **kwargs),
    )
    assert isinstance(server, Channel), server
    assert isinstance(client, Channel), client
    return server, client


def _bare_client_context(ca: Path, *, tls12: bool = False) -> ssl.SSLContext:
    """A client that verifies the server but presents no certificate of its own."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


# ---- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("tcp:127.0.0.3:4444", "127.0.0.3", 4444),
        ("tcp:[::1]:4444", "::1", 4444),
        ("tcp:[fe80::1:2]:1", "fe80::1:2", 1),
        ("tcp:target.example.com:65535", "target.example.com", 65535),
        ("tcp:localhost:22", "localhost", 22),
    ],
)
def test_addresses_parse_and_print_back(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert address == TcpAddress(host=host, port=port)
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.3:4444", "not a TCP address"),
        ("unix:/run/x.sock", "not a TCP address"),
        ("tcp:127.0.0.3", "no port"),
        ("tcp::4444", "no host"),
        ("tcp:::1:4444", r"must be written in brackets, tcp:\[::1\]:4444"),
        ("tcp:[::1:4444", "no closing bracket"),
        ("tcp:[::1]4444", "no port after"),
        ("tcp:[not-v6]:4444", "not an IPv6 address"),
        ("tcp:host:http", "not a number"),
        ("tcp:host:-1", "not a number"),
        ("tcp:host:65536", "outside 1..65535"),
        ("tcp:host:0", "outside 1..65535"),
        ("tcp:bad_name!:4444", "neither an IPv4 address nor a valid host name"),
        ("tcp:-lead.example:4444", "valid host name"),
    ],
)
def test_bad_addresses_are_refused_naming_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(AddressError, match=why):
        parse_address(text)


def test_port_zero_is_for_listening_only() -> None:
    assert parse_address("tcp:127.0.0.3:0", listening=True).port == 0


# ---- mutual TLS --------------------------------------------------------------------------------


def test_the_default_frame_limit_takes_every_message_of_the_remote_protocol() -> None:
    from handoff.protocol import remote

    # The largest is a full batch of private pages (test_remote_protocol checks each message
    # against MAX_MESSAGE_BYTES at its bounds).
    assert tcp.MAX_FRAME_SIZE == remote.MAX_MESSAGE_BYTES


async def test_mutual_tls_round_trip_carries_frames_both_ways_whole(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        assert listener.address.port != 0
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            frames = [b"x", b"hello" * 1000, bytes(range(256)) * 1024, b"y" * tcp.MAX_FRAME_SIZE]
            async with trio.open_nursery() as nursery:
                for frame in frames:  # sent concurrently with their reception
                    nursery.start_soon(client.send, frame)
                    assert await server.receive() == frame
            await server.send(b"reply")
            assert await client.receive() == b"reply"
            assert SOURCE_IP in server.peer_names and "source" in server.peer_names
            assert TARGET_IP in client.peer_names and "target.test" in client.peer_names
            assert server.peer.startswith(f"tcp:{SOURCE_IP}:")


async def test_a_host_name_is_checked_against_the_server_certificate(
    pki: dict[str, TlsFiles],
) -> None:
    """Connecting by name checks a DNS subjectAltName: the target's certificate names
    `localhost`, the source's does not."""
    for files, accepted in ((pki["target"], True), (pki["source"], False)):
        listener = await tcp.listen("tcp:localhost:0", files)
        async with listener:
            server, client = await _both(
                listener.accept,
                lambda listener=listener: tcp.connect(
                    f"tcp:localhost:{listener.address.port}", pki["source"]
                ),
            )
            if accepted:
                assert isinstance(server, Channel) and isinstance(client, Channel)
                await client.send(b"ping")
                assert await server.receive() == b"ping"
                await client.aclose()
                await server.aclose()
            else:
                assert isinstance(client, TransportError)
                assert "localhost" in str(client)


async def _refused(
    listener: tcp.Listener, client_tls: TlsFiles | ssl.SSLContext, address: str | None = None
) -> tuple[BaseException, BaseException]:
    """Both ends of a refused connection fail, and the server delivers no channel (so no
    frame can reach the protocol)."""
    target = address or str(listener.address)
    server, client = await _both(listener.accept, lambda: tcp.connect(target, client_tls))
    assert isinstance(server, TransportError), server
    assert isinstance(client, TransportError), client
    return server, client


async def test_a_client_without_a_certificate_is_refused_and_nothing_is_delivered(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _refused(listener, _bare_client_context(pki["target"].ca))
        assert "certificate" in str(server).lower()
        assert "requires a client certificate" in str(client)
        # The listener still serves an authenticated client afterwards.
        good_server, good_client = await _pair(listener, pki["source"])
        async with good_server, good_client:
            await good_client.send(b"after")
            assert await good_server.receive() == b"after"


async def test_a_client_certificate_from_another_ca_is_refused(
    pki: dict[str, TlsFiles], foreign: dict[str, TlsFiles]
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        # The client trusts the right CA (it verifies the server) but presents a foreign cert.
        client_tls = TlsFiles(
            cert=foreign["source"].cert, key=foreign["source"].key, ca=pki["source"].ca
        )
        server, client = await _refused(listener, client_tls)
        assert "certificate was refused" in str(server)
        assert "did not sign this host's certificate" in str(client)


async def test_a_server_trusting_the_wrong_ca_refuses_the_client(
    pki: dict[str, TlsFiles], foreign: dict[str, TlsFiles]
) -> None:
    server_tls = TlsFiles(cert=pki["target"].cert, key=pki["target"].key, ca=foreign["target"].ca)
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", server_tls)
    async with listener:
        server, _client = await _refused(listener, pki["source"])
        assert "certificate was refused" in str(server)


async def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    pki: dict[str, TlsFiles], foreign: dict[str, TlsFiles]
) -> None:
    server_tls = TlsFiles(
        cert=foreign["target"].cert, key=foreign["target"].key, ca=pki["target"].ca
    )
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", server_tls)
    async with listener:
        _server, client = await _refused(listener, pki["source"])
        assert "certificate was refused" in str(client)
        assert "--tls-ca" in str(client)


async def test_a_server_certificate_for_another_name_is_refused(
    pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    """The source host's certificate is valid (same CA) but names 127.0.0.2, not the address
    connected to."""
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["source"])
    async with listener:
        _server, client = await _refused(listener, pki["source"])
        assert "certificate was refused" in str(client)
        assert "IP address mismatch" in str(client) or "mismatch" in str(client)


async def test_tls_older_than_1_3_is_refused(pki: dict[str, TlsFiles]) -> None:
    context = _bare_client_context(pki["source"].ca, tls12=True)
    context.load_cert_chain(pki["source"].cert, pki["source"].key)
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, _client = await _refused(listener, context)
        assert "TLS" in str(server)


async def test_a_tls_peer_that_is_not_a_handoff_endpoint_is_named(
    pki: dict[str, TlsFiles],
) -> None:
    context = tcp.server_context(pki["target"])
    sock = trio.socket.socket()
    await sock.bind((TARGET_IP, 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    async with trio.SocketListener(sock) as raw:

        async def web_server() -> None:
            stream = trio.SSLStream(await raw.accept(), context, server_side=True)
            await stream.do_handshake()
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(web_server)
            with pytest.raises(TransportError, match="not a handoff TCP endpoint"):
                await tcp.connect(f"tcp:{TARGET_IP}:{port}", pki["source"])


def test_tls_files_that_cannot_be_used_are_refused_with_advice(
    pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    files = pki["source"]
    missing = TlsFiles(cert=tmp_path / "nope.crt", key=files.key, ca=files.ca)
    with pytest.raises(Refused, match=r"--tls-cert .*nope\.crt: no such file"):
        tcp.client_context(missing)
    files.key.chmod(0o644)
    with pytest.raises(Refused, match="chmod 600"):
        tcp.server_context(files)
    files.key.chmod(0o600)
    swapped = TlsFiles(cert=files.cert, key=pki["target"].key, ca=files.ca)
    with pytest.raises(Refused, match="the key the certificate's"):
        tcp.client_context(swapped)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(Refused, match="--tls-ca"):
        tcp.client_context(TlsFiles(cert=files.cert, key=files.key, ca=not_pem))


async def test_nothing_listens_is_a_transport_error_naming_the_address(
    pki: dict[str, TlsFiles],
) -> None:
    sock = socket.socket()
    sock.bind((TARGET_IP, 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(TransportError, match=f"cannot connect to tcp:{TARGET_IP}:{port}"):
        await tcp.connect(f"tcp:{TARGET_IP}:{port}", pki["source"])


# ---- frames ------------------------------------------------------------------------------------


async def test_frames_sent_together_arrive_one_by_one_and_whole(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            frames = [bytes([i]) * (4000 + i) for i in range(20)]
            await client.send_many(frames)
            await client.send_many([])  # nothing to send: nothing sent
            await client.send(b"last")
            got = [await server.receive()]
            while len(got) < len(frames) + 1:
                frame = server.take_buffered()  # those already here, without waiting
                got.append(frame if frame is not None else await server.receive())
            assert got == [*frames, b"last"]
            assert server.take_buffered() is None
            # A refused frame refuses the whole write: nothing of it is sent.
            with pytest.raises(TransportError, match="at least one byte"):
                await client.send_many([b"a", b""])
            await client.send(b"after")
            assert await server.receive() == b"after"


async def test_tasks_sending_and_receiving_at_once_take_turns_and_lose_no_frame(
    pki: dict[str, TlsFiles],
) -> None:
    # A free lock is taken without a checkpoint and a frame that arrived already is returned
    # at once; still, each frame reaches exactly one receiver, in order for each sender.
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            sent = {who: [bytes([who]) * 3000 + i.to_bytes(2, "big") for i in range(60)]
                    for who in (1, 2)}  # fmt: skip
            got: dict[int, list[bytes]] = {1: [], 2: []}

            async def send(who: int) -> None:
                for i in range(0, 60, 3):
                    await client.send_many(sent[who][i : i + 3])

            async def receive(done: trio.CancelScope) -> None:
                while True:
                    frame = await server.receive()
                    assert frame is not None
                    got[frame[0]].append(frame)
                    if sum(map(len, got.values())) == 120:
                        done.cancel()  # the others wait for frames that will not come
                    await trio.sleep(0)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for who in (1, 2):
                        nursery.start_soon(send, who)
                    for _ in range(3):
                        nursery.start_soon(receive, nursery.cancel_scope)
            assert got == sent


async def test_an_oversize_frame_is_refused_by_the_sender_and_by_the_receiver(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"], max_frame=1024)
    async with listener:
        server, client = await _pair(listener, pki["source"], max_frame=4096)
        async with server, client:
            with pytest.raises(TransportError, match="4097-byte frame exceeds the 4096-byte"):
                await client.send(b"z" * 4097)
            with pytest.raises(TransportError, match="at least one byte"):
                await client.send(b"")
            await client.send(b"ok" * 10)
            await client.send(b"z" * 2000)  # within the client's limit, beyond the server's
            assert await server.receive() == b"ok" * 10
            with pytest.raises(TransportError, match="announced a frame of 2000 bytes"):
                await server.receive()
            assert server.closed


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x00\x00", "after 2 of the 4 bytes of a frame's length"),
        (struct.pack(">I", 100) + b"0123456789", "after 10 of a 100-byte frame"),
    ],
)
async def test_a_stream_that_ends_inside_a_frame_is_truncated_not_short(
    pki: dict[str, TlsFiles], raw: bytes, why: str
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server:
            await client.send(b"whole")
            await client._send_plaintext(raw)  # a peer that stops mid-frame
            await client.aclose()  # and closes cleanly (close_notify)
            assert await server.receive() == b"whole"
            with pytest.raises(TransportError, match=f"{why}: truncated"):
                await server.receive()


async def test_a_zero_length_frame_is_refused(pki: dict[str, TlsFiles]) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            await client._send_plaintext(struct.pack(">I", 0))
            with pytest.raises(TransportError, match="frame of 0 bytes"):
                await server.receive()


# ---- how a connection ends ---------------------------------------------------------------------


async def test_a_clean_close_is_the_end_of_the_stream_not_an_error(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        await client.send(b"last words")
        await client.aclose()
        assert client.closed
        assert await server.receive() == b"last words"
        assert await server.receive() is None
        assert await server.receive() is None  # and stays so
        await server.aclose()


async def test_a_reset_is_an_error_with_econnreset(pki: dict[str, TlsFiles]) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        client.abort()
        with pytest.raises(TransportError, match="reset by the peer") as info:
            await server.receive()
        assert info.value.errno == errno.ECONNRESET
        assert server.closed
        with pytest.raises(TransportError, match="closed"):
            await client.send(b"after abort")


async def test_an_end_without_close_notify_is_an_error_not_a_clean_close(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        client._tcp.socket.shutdown(socket.SHUT_WR)  # FIN, no close_notify
        with pytest.raises(TransportError, match="without TLS close_notify") as info:
            await server.receive()
        assert info.value.errno == errno.ECONNABORTED
        client.abort()


async def test_a_receive_cancelled_between_frames_loses_nothing(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            with trio.move_on_after(0.05):
                await server.receive()
            await client.send(b"still here")
            assert await server.receive() == b"still here"


async def test_a_peer_that_connects_and_says_nothing_is_dropped_and_the_next_served(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"], handshake_timeout=0.2)
    async with listener:
        silent = await trio.open_tcp_stream(TARGET_IP, listener.address.port)
        with pytest.raises(TransportError, match=r"no handshake and greeting within 0\.2 s"):
            await listener.accept()
        await silent.aclose()
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            await client.send(b"next")
            assert await server.receive() == b"next"


def test_the_greeting_names_the_transport_and_its_version() -> None:
    assert GREETING == b"handoff-tcp/1\n"


# ---- the cross-host protocol over it -----------------------------------------------------------


async def test_a_whole_sev_migration_conversation_crosses_mutual_tls(
    pki: dict[str, TlsFiles],
) -> None:
    """The protocol machines of both hosts, joined by the transport: every frame fits, arrives
    whole, and the machines agree; then the target's clean close ends the source's stream."""
    from handoff.protocol import remote
    from handoff.protocol.local import Role, VcpuStateWire

    def cert(usage: int) -> bytes:
        head = (1).to_bytes(4, "little") + bytes([0, 24, 0, 0]) + usage.to_bytes(4, "little")
        return head + bytes(remote.CERT_SIZE - len(head))

    def amd(usage: int) -> bytes:
        head = (1).to_bytes(4, "little") + bytes(32) + usage.to_bytes(4, "little") + bytes(16)
        return head + (4096).to_bytes(4, "little") * 2 + bytes(512 * 3)

    guest = remote.Describe(
        vcpus=1,
        memory_bytes=4 * remote.PAGE_SIZE,
        slots=(remote.MemorySlot(slot=0, guest_phys_addr=0, size=4 * remote.PAGE_SIZE),),
        mode="sev",
        policy=0x21,
        line_every=200,
        flip_every=50,
    )
    source = remote.RemoteConnection(Role.SOURCE, guest=guest)
    target = remote.RemoteConnection(Role.TARGET)
    chain = remote.platform_chain(
        cert(0x1003), cert(0x1002) + cert(0x1001) + cert(0x1004), amd(0x13) + amd(0x0)
    )
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        target_end, source_end = await _pair(listener, pki["source"])

        async def source_says(message: remote.Message) -> None:
            await source_end.send(source.send(message))
            assert target.receive(await target_end.receive()) == message

        async def target_says(message: remote.Message) -> None:
            await target_end.send(target.send(message))
            assert source.receive(await source_end.receive()) == message

        uuid_ = uuid.uuid4()
        await source_says(source.make_hello(vm_name="g", vm_uuid=uuid_))
        await target_says(target.make_hello(vm_name="g", vm_uuid=uuid_))
        await source_says(source.describe())
        await target_says(chain)
        await source_says(
            remote.SendStart(session=bytes(range(128)), source_pdh=cert(0x1003), policy=0x21)
        )
        await source_says(remote.StopAndCopy(round=1, shared_regions=((0x3000, 1),)))
        headers = [bytes(4) + bytes([i]) * 16 + bytes(32) for i in range(3)]
        packets = [(headers[i], bytes([i]) * 4096) for i in range(3)]
        await source_says(source.encrypted_pages([0, 4096, 8192], packets))
        await source_says(source.shared_page(0x3000, b"s" * 4096))
        await source_says(remote.RoundEnd(round=1, pages=4))
        await source_says(remote.DeviceState(doorbell_sum=1))
        state = VcpuStateWire(backend="kvmstub", version=1, blob=b"r" * 10_000)
        await source_says(remote.VcpuState(index=0, state=state))
        await source_says(remote.Finish(rounds=1, pages=4))
        session = target.session_id
        assert session is not None
        await target_says(remote.Received(session=session))
        await source_says(remote.Commit(session=session))
        await target_says(remote.Resumed(session=session))
        assert source.state is target.state is remote.State.DONE
        await target_end.aclose()
        gone = source.receive(await source_end.receive())
        assert isinstance(gone, remote.PeerGone) and gone.lost_in is remote.State.DONE
        assert gone.plan.recovery is remote.Recovery.DONE
        await source_end.aclose()


# ---- the record pump: TLS records as the socket delivers them ----------------------------------


class _Relay:
    """A TCP relay in front of a listener that passes the client's bytes on as a test says:
    in small pieces (records split across the server's reads), up to a point and then held
    or cut (a silent peer, an end inside a record), or with a byte flipped (a forged record).
    The server's bytes go back as they come."""

    def __init__(self, target: TcpAddress) -> None:
        self.target = target
        self.address = TcpAddress(host=TARGET_IP, port=0)
        self.piece = 0  # >0: pass the client's bytes on this many at a time, pausing between
        self.pieces = 0  # how many pieces were passed on
        self.limit: int | None = None  # pass this many more of the client's bytes, then stop
        self.cut = False  # at the limit: end the connection to the server (FIN, no TLS alert)
        self.flip = False  # at the limit: flip the next byte and pass everything on
        self.released = trio.Event()  # at the limit, neither cut nor flip: the rest goes on
        self._listeners: list[trio.SocketListener] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._listeners = await trio.open_tcp_listeners(0, host=TARGET_IP)
        self.address = TcpAddress(TARGET_IP, self._listeners[0].socket.getsockname()[1])
        task_status.started()
        client = await self._listeners[0].accept()
        server = await trio.open_tcp_stream(self.target.host, self.target.port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._back, server, client)
            await self._forth(client, server)
            nursery.cancel_scope.cancel()

    async def _back(self, server: trio.SocketStream, client: trio.SocketStream) -> None:
        while data := await server.receive_some():
            await client.send_all(data)

    async def _forth(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        while data := await client.receive_some():
            if self.limit is not None:
                now, rest = data[: self.limit], data[self.limit :]
                self.limit -= len(now)
                await self._pass(now, server)
                if self.limit > 0:
                    continue
                self.limit = None
                if self.cut:
                    await server.send_eof()
                    await trio.sleep_forever()
                if self.flip:
                    rest = bytes([rest[0] ^ 0x01]) + rest[1:]
                else:
                    await self.released.wait()
                data = rest
            await self._pass(data, server)

    async def _pass(self, data: bytes | bytearray, server: trio.SocketStream) -> None:
        step = self.piece or len(data) or 1
        for at in range(0, len(data), step):
            await server.send_all(data[at : at + step])
            self.pieces += 1
            if self.piece:
                await trio.sleep(0.002)  # the server reads what came so far


async def _relayed_pair(
    nursery: trio.Nursery, pki: dict[str, TlsFiles], listener: tcp.Listener
) -> tuple[Channel, Channel, _Relay]:
    relay = _Relay(listener.address)
    await nursery.start(relay.serve)
    server, client = await _both(
        listener.accept,
        lambda: tcp.connect(relay.address, pki["source"], local_host=SOURCE_IP),
    )
    assert isinstance(server, Channel), server
    assert isinstance(client, Channel), client
    return server, client, relay


def _readable(channel: Channel) -> int:
    """Bytes waiting on the channel's socket (FIONREAD)."""
    count = fcntl.ioctl(channel._tcp.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", count)[0])


async def test_the_records_of_one_socket_read_are_all_decrypted_in_that_read(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            reads = 0
            receive_some = server._tcp.receive_some

            async def counted(max_bytes: int | None = None) -> bytes | bytearray:
                nonlocal reads
                reads += 1
                return await receive_some(max_bytes)

            server._tcp.receive_some = counted  # type: ignore[method-assign]
            frames = [bytes([n]) * 4096 for n in range(40)]  # 160 KiB: ten 16 KiB records
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_many, frames)
                    while _readable(server) < 64 * 1024:  # four records and more are there
                        await trio.sleep(0.01)
                    got = [await server.receive()]
                    assert reads == 1
                    while (frame := server.take_buffered()) is not None:
                        got.append(frame)
                    assert len(got) >= 15  # the frames of four records from one read
                    while len(got) < len(frames):
                        got.append(await server.receive())
            assert got == frames
            assert reads < 10


async def test_records_split_across_socket_reads_arrive_as_whole_frames(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener, trio.open_nursery() as nursery:
        server, client, relay = await _relayed_pair(nursery, pki, listener)
        async with server, client:
            relay.piece = 1000  # a 16 KiB record in 17 reads, a frame's length split too
            relay.pieces = 0
            frames = [b"a" * 5000, b"b" * 17, b"c" * 30000]
            await client.send_many(frames)
            assert [await server.receive() for _ in frames] == frames
            assert relay.pieces > 30
        nursery.cancel_scope.cancel()


async def test_a_peer_that_ends_the_connection_inside_a_record_is_an_error(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener, trio.open_nursery() as nursery:
        server, client, relay = await _relayed_pair(nursery, pki, listener)
        async with server, client:
            await client.send(b"whole")
            assert await server.receive() == b"whole"
            relay.limit, relay.cut = 500, True
            await client.send(b"x" * 1000)  # one record, cut after 500 bytes
            with pytest.raises(TransportError, match="without TLS close_notify") as info:
                await server.receive()
            assert info.value.errno == errno.ECONNABORTED
            assert server.closed
        nursery.cancel_scope.cancel()


async def test_a_forged_record_is_refused_and_nothing_of_it_delivered(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener, trio.open_nursery() as nursery:
        server, client, relay = await _relayed_pair(nursery, pki, listener)
        async with server, client:
            relay.limit, relay.flip = 100, True
            await client.send(b"y" * 1000)  # a byte of the record's ciphertext flipped
            with pytest.raises(TransportError, match="TLS refused") as info:
                await server.receive()
            assert "BAD_RECORD_MAC" in str(info.value).upper()
            assert server.closed
        nursery.cancel_scope.cancel()


async def test_a_peer_silent_inside_a_record_times_out_and_the_record_completes_later(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener, trio.open_nursery() as nursery:
        server, client, relay = await _relayed_pair(nursery, pki, listener)
        async with server, client:
            relay.limit = 500
            await client.send(b"z" * 1000)  # half a record arrives, then nothing
            with trio.move_on_after(0.2) as timer:
                await server.receive()
            assert timer.cancelled_caught
            assert not server.closed
            relay.released.set()
            assert await server.receive() == b"z" * 1000
        nursery.cancel_scope.cancel()


async def test_a_silent_peer_times_out_under_the_callers_deadline(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        async with server, client:
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(0.2):
                    await server.receive()
            await client.send(b"late")
            assert await server.receive() == b"late"


async def test_close_notify_after_many_frames_ends_the_stream_after_the_last_one(
    pki: dict[str, TlsFiles],
) -> None:
    listener = await tcp.listen(f"tcp:{TARGET_IP}:0", pki["target"])
    async with listener:
        server, client = await _pair(listener, pki["source"])
        frames = [n.to_bytes(2, "big") * 2048 for n in range(60)]

        async def say_all_and_close() -> None:
            await client.send_many(frames)
            await client.aclose()  # close_notify right behind the last record

        got = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(say_all_and_close)
                while (frame := await server.receive()) is not None:
                    got.append(frame)
        assert got == frames
        assert await server.receive() is None
        await server.aclose()
