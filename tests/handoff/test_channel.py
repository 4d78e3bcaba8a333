"""handoff.transport.unix: datagrams and fds over SOCK_SEQPACKET, owned fds, peer checks,
safe paths."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from handoff.errors import CredentialsRefused, Refused, TransportError
from handoff.transport.unix import (
    MAX_FDS_PER_MESSAGE,
    MAX_MESSAGE_SIZE,
    Channel,
    OwnedFds,
    connect,
    listen,
    socketpair,
)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def make_memfd(content: bytes = b"guest memory") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def raw_socketpair() -> tuple[Channel, socket.socket]:
    """A channel whose peer is a bare socket, to send what Channel.send would never send."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Channel(a), b


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Under /tmp directly (not pytest's tmp_path), so a child that drops to another uid can
    # reach it when a test opens it up on purpose.
    top = Path(tempfile.mkdtemp(prefix="handoff-test-"))
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Flavour:
    """How a test moves datagrams: awaiting `send` and `receive`, or calling `send_now` and
    `receive_now` (which never yield to other tasks). The checks on what crosses, and what is
    refused, are the same for both."""

    def __init__(self, now: bool) -> None:
        self.now = now

    async def send(self, channel: Channel, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.now:
            channel.send_now(data, fds)
        else:
            await channel.send(data, fds)

    async def receive(
        self, channel: Channel, max_fds: int, max_size: int = MAX_MESSAGE_SIZE
    ) -> tuple[bytes | None, list[int]]:
        if self.now:
            return channel.receive_now(max_fds=max_fds, timeout=1.0, max_size=max_size)
        return await channel.receive(max_fds=max_fds, max_size=max_size)


@pytest.fixture(params=[False, True], ids=["await", "now"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each test taking it runs twice: with `send`/`receive` and with `send_now`/`receive_now`."""
    return Flavour(now=request.param)


# -- fds ----------------------------------------------------------------------------------------


async def test_fds_cross_as_new_fds_on_the_same_file_and_the_sender_keeps_its_own(
    flavour: Flavour,
) -> None:
    a, b = socketpair()
    memfd = make_memfd(b"page zero")
    try:
        await flavour.send(a, b"describe", [memfd])
        data, fds = await flavour.receive(b, max_fds=1)
        assert data == b"describe"
        assert len(fds) == 1
        (received,) = fds
        assert received != memfd
        assert os.fstat(received).st_ino == os.fstat(memfd).st_ino
        assert fcntl.fcntl(received, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.pread(received, 9, 0) == b"page zero"
        os.close(received)  # the caller owns it
        assert os.pread(memfd, 9, 0) == b"page zero"  # the sender's fd is still open
        await flavour.send(a, b"no fds")
        assert await flavour.receive(b, max_fds=1) == (b"no fds", [])
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_received_fds_are_close_on_exec() -> None:
    a, b = socketpair()
    memfd = make_memfd()
    try:
        await a.send(b"x", [memfd])
        _, fds = await b.receive(max_fds=1)
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fds[0])
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_message_boundaries_are_kept_and_each_message_brings_only_its_own_fds() -> None:
    a, b = socketpair()
    m1, m2 = make_memfd(b"one"), make_memfd(b"two")
    try:
        await a.send(b"first", [m1])
        await a.send(b"second")
        await a.send(b"third", [m2, m1])
        d1, f1 = await b.receive(max_fds=2)
        d2, f2 = await b.receive(max_fds=2)
        d3, f3 = await b.receive(max_fds=2)
        assert (d1, len(f1)) == (b"first", 1)
        assert (d2, f2) == (b"second", [])
        assert (d3, len(f3)) == (b"third", 2)
        assert [os.pread(fd, 3, 0) for fd in f3] == [b"two", b"one"]
        OwnedFds(f1 + f3).close()
    finally:
        os.close(m1)
        os.close(m2)
        a.close()
        b.close()


async def test_fds_beyond_max_fds_are_closed_and_reported(flavour: Flavour) -> None:
    a, b = socketpair()
    memfd = make_memfd()
    before = open_fds()
    try:
        await flavour.send(a, b"too many", [memfd, memfd, memfd])
        with pytest.raises(TransportError, match="carried 3 fds where at most 2"):
            await flavour.receive(b, max_fds=2)
        assert open_fds() == before
        await flavour.send(a, b"next")  # the connection is still usable
        assert await flavour.receive(b, max_fds=2) == (b"next", [])
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_fds_sent_where_none_are_expected_are_closed_and_reported() -> None:
    a, b = socketpair()
    memfd = make_memfd()
    before = open_fds()
    try:
        await a.send(b"surprise", [memfd])
        with pytest.raises(TransportError, match="at most 0"):
            await b.receive(max_fds=0)
        assert open_fds() == before
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_fds_cut_short_by_a_full_fd_table_are_closed_and_fatal(flavour: Flavour) -> None:
    a, b = socketpair()
    memfd = make_memfd()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        await flavour.send(a, b"ten fds", [memfd] * 10)
        before = open_fds()
        # Leave exactly two free fd numbers, so the kernel installs two of the ten, sets
        # MSG_CTRUNC and drops the rest.
        limit = 0
        while limit - sum(1 for fd in before if fd < limit) < 2:
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with pytest.raises(TransportError, match="MSG_CTRUNC"):
                await flavour.receive(b, max_fds=10)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds() == before
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_a_datagram_larger_than_max_size_is_refused_with_its_fds_closed(
    flavour: Flavour,
) -> None:
    a, b = socketpair()
    memfd = make_memfd()
    before = open_fds()
    try:
        await flavour.send(a, b"x" * 100, [memfd])
        with pytest.raises(TransportError, match="larger than 16 bytes"):
            await flavour.receive(b, max_fds=1, max_size=16)
        assert open_fds() == before
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_an_empty_datagram_carrying_fds_is_refused_with_its_fds_closed(
    flavour: Flavour,
) -> None:
    channel, raw = raw_socketpair()
    memfd = make_memfd()
    before = open_fds()
    try:
        send_raw(raw, b"", [memfd])
        with pytest.raises(TransportError, match="empty handoff message carried 1 fds"):
            await flavour.receive(channel, max_fds=1)
        assert open_fds() == before
    finally:
        os.close(memfd)
        channel.close()
        raw.close()


async def test_send_refuses_an_empty_datagram_because_it_would_read_as_eof(
    flavour: Flavour,
) -> None:
    a, b = socketpair()
    with a, b, pytest.raises(ValueError, match="at least one byte"):
        await flavour.send(a, b"")


async def test_send_refuses_more_fds_than_the_kernel_carries(flavour: Flavour) -> None:
    a, b = socketpair()
    memfd = make_memfd()
    try:
        with pytest.raises(ValueError, match="253"):
            await flavour.send(a, b"x", [memfd] * (MAX_FDS_PER_MESSAGE + 1))
    finally:
        os.close(memfd)
        a.close()
        b.close()


def test_owned_fds_close_on_error_unless_taken() -> None:
    r1, w1 = os.pipe()
    with pytest.raises(RuntimeError), OwnedFds([r1, w1]):
        raise RuntimeError("boom")
    for fd in (r1, w1):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF

    r2, w2 = os.pipe()
    with OwnedFds([r2, w2]) as owned:
        taken = owned.take()
    assert taken == [r2, w2]
    assert len(owned) == 0
    for fd in taken:
        os.fstat(fd)  # still open: the caller owns them now
        os.close(fd)


# -- end of the connection ----------------------------------------------------------------------


async def test_receive_returns_none_when_the_peer_closes(flavour: Flavour) -> None:
    a, b = socketpair()
    await flavour.send(a, b"last words")
    a.close()
    assert await flavour.receive(b, max_fds=0) == (b"last words", [])
    assert await flavour.receive(b, max_fds=0) == (None, [])
    assert await flavour.receive(b, max_fds=0) == (None, [])  # and stays at EOF
    b.close()


async def test_peer_closing_with_unread_messages_reads_as_eof_not_an_error(
    flavour: Flavour,
) -> None:
    # Closing a Unix socket with unread data gives the survivor ECONNRESET.
    a, b = socketpair()
    await flavour.send(b, b"never read by a")
    a.close()
    assert await flavour.receive(b, max_fds=0) == (None, [])
    b.close()


async def test_what_a_peer_sent_before_closing_on_our_unread_message_still_arrives(
    flavour: Flavour,
) -> None:
    # A target that refuses at once closes with the source's Hello unread: the kernel reports
    # ECONNRESET before the Refuse it queued, and the Refuse (its reason) must not be lost.
    a, b = socketpair()
    await flavour.send(b, b"hello, never read by a")
    await flavour.send(a, b"refuse: here is why")
    a.close()
    assert await flavour.receive(b, max_fds=0) == (b"refuse: here is why", [])
    assert await flavour.receive(b, max_fds=0) == (None, [])
    b.close()


async def test_receive_returns_none_when_the_peer_process_is_killed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    channel = Channel(ours)
    try:
        await channel.send(b"the child never reads this")
        child.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            assert await channel.receive(max_fds=4) == (None, [])
    finally:
        child.kill()
        child.wait()
        channel.close()


async def test_send_to_a_closed_peer_is_a_transport_error_naming_the_cause(
    flavour: Flavour,
) -> None:
    a, b = socketpair()
    b.close()
    with pytest.raises(TransportError, match="peer closed") as info:
        await flavour.send(a, b"hello?")
    assert info.value.errno == errno.EPIPE
    a.close()


async def test_use_after_close_is_a_transport_error(flavour: Flavour) -> None:
    a, b = socketpair()
    a.close()
    with pytest.raises(TransportError, match="already closed"):
        await flavour.send(a, b"x")
    with pytest.raises(TransportError, match="already closed"):
        await flavour.receive(a, max_fds=0)
    b.close()


async def test_closing_a_channel_wakes_a_task_waiting_on_it_with_a_transport_error() -> None:
    a, b = socketpair()
    caught: list[BaseException] = []

    async def waiter() -> None:
        try:
            await a.receive(max_fds=0)
        except TransportError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        a.close()
    assert len(caught) == 1
    assert "closed while in use" in str(caught[0])
    b.close()


# -- flow control, size, cancellation -----------------------------------------------------------


async def test_send_waits_for_room_when_the_peer_is_slow_and_nothing_is_lost() -> None:
    a, b = socketpair()
    message = b"m" * 16384
    count = 200  # far more than the socket buffers hold
    received: list[bytes] = []

    async def reader() -> None:
        for _ in range(count):
            data, _ = await b.receive(max_fds=0)
            assert data is not None
            received.append(data)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for i in range(count):
            await a.send(i.to_bytes(4, "big") + message)
    assert [int.from_bytes(d[:4], "big") for d in received] == list(range(count))
    a.close()
    b.close()


async def test_a_message_too_large_for_the_socket_is_refused_with_emsgsize(
    flavour: Flavour,
) -> None:
    a, b = socketpair()
    with a, b, pytest.raises(TransportError, match="larger than the socket buffer") as info:
        await flavour.send(a, b"x" * (1024 * 1024))
    assert info.value.errno == errno.EMSGSIZE


async def test_a_cancelled_receive_consumes_nothing() -> None:
    a, b = socketpair()
    with trio.move_on_after(0.01) as scope:
        await b.receive(max_fds=0)
    assert scope.cancelled_caught
    await a.send(b"after the timeout")
    assert await b.receive(max_fds=0) == (b"after the timeout", [])
    a.close()
    b.close()


async def test_receive_still_hands_over_a_datagram_and_its_fds_then_eof() -> None:
    # A regression check of the refactor that moved the datagram checks into _take_datagram.
    a, b = socketpair()
    m1, m2 = make_memfd(b"one"), make_memfd(b"two")
    try:
        await a.send(b"with two fds", [m1, m2])
        a.close()
        data, fds = await b.receive(max_fds=2)
        assert data == b"with two fds"
        assert [os.pread(fd, 3, 0) for fd in fds] == [b"one", b"two"]
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
        OwnedFds(fds).close()
        assert await b.receive(max_fds=2) == (None, [])
    finally:
        os.close(m1)
        os.close(m2)
        b.close()


async def test_a_receive_cancelled_during_its_last_schedule_point_still_returns_the_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The last checkpoint is shielded: a cancellation arriving there is delivered at the next
    # checkpoint, after the caller has taken the datagram and its fds.
    a, b = socketpair()
    memfd = make_memfd(b"kept")
    real_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
    try:
        await a.send(b"arrives", [memfd])
        got: list[tuple[bytes | None, list[int]]] = []
        with trio.CancelScope() as scope:

            async def cancel_meanwhile() -> None:
                scope.cancel()
                await real_checkpoint()

            monkeypatch.setattr(trio.lowlevel, "cancel_shielded_checkpoint", cancel_meanwhile)
            got.append(await b.receive(max_fds=1))
            monkeypatch.undo()
            await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        ((data, fds),) = got
        assert data == b"arrives"
        assert [os.pread(fd, 4, 0) for fd in fds] == [b"kept"]
        OwnedFds(fds).close()
    finally:
        os.close(memfd)
        a.close()
        b.close()


async def test_a_receive_interrupted_at_its_last_schedule_point_closes_the_fds_it_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socketpair()
    memfd = make_memfd()
    try:
        await a.send(b"lost with its fds closed", [memfd, memfd])
        before = open_fds()
        with trio.CancelScope() as scope:

            async def cancelled_here() -> None:
                scope.cancel()
                await trio.lowlevel.checkpoint()  # not shielded: Cancelled is raised here

            monkeypatch.setattr(trio.lowlevel, "cancel_shielded_checkpoint", cancelled_here)
            await b.receive(max_fds=2)
            pytest.fail("the receive should have been cancelled")
        monkeypatch.undo()
        assert scope.cancelled_caught
        assert open_fds() == before
    finally:
        os.close(memfd)
        a.close()
        b.close()


# -- send_now and receive_now: what only they do (the rest runs above, in both flavours) --------


def filled_pair() -> tuple[Channel, socket.socket, int]:
    """A channel whose peer (a bare blocking socket) has not read anything and whose buffer is
    full, and how many 1 KiB filler datagrams it took to fill it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    count = 0
    while True:
        try:
            ours.send(b"f" * 1024)
        except BlockingIOError:
            break
        count += 1
    return Channel(ours), theirs, count


async def test_send_now_and_async_receive_interoperate_both_ways() -> None:
    a, b = socketpair()
    with a, b:
        a.send_now(b"now")
        assert await b.receive(max_fds=0) == (b"now", [])
        await b.send(b"later")
        assert a.receive_now(max_fds=0, timeout=1.0) == (b"later", [])


async def test_receive_now_takes_a_waiting_datagram_even_with_no_time_left() -> None:
    a, b = socketpair()
    with a, b:
        await a.send(b"already here")
        assert b.receive_now(max_fds=0, timeout=0) == (b"already here", [])


async def test_receive_now_wakes_for_a_peer_that_closes_while_it_waits() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(ours)
    closer = threading.Timer(0.02, theirs.close)
    closer.start()
    try:
        assert channel.receive_now(max_fds=0, timeout=5.0) == (None, [])
    finally:
        closer.join()
        channel.close()


async def test_receive_now_raises_too_slow_when_nothing_arrives_and_consumes_nothing() -> None:
    a, b = socketpair()
    with a, b:
        with pytest.raises(trio.TooSlowError):
            b.receive_now(max_fds=0, timeout=0.02)
        a.send_now(b"after the timeout")
        assert b.receive_now(max_fds=0, timeout=1.0) == (b"after the timeout", [])


async def test_send_now_gives_up_on_a_full_peer_buffer_instead_of_hanging() -> None:
    channel, theirs, count = filled_pair()
    try:
        with pytest.raises(TransportError, match="socket buffer stayed full"):
            channel.send_now(b"does not fit", timeout=0.05)
        # Nothing of the refused message went out: the peer finds only the filler.
        for _ in range(count):
            assert theirs.recv(2048) == b"f" * 1024
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(2048)
    finally:
        channel.close()
        theirs.close()


async def test_send_now_waits_for_a_full_peer_buffer_to_drain_and_loses_nothing() -> None:
    channel, theirs, count = filled_pair()
    received: list[bytes] = []

    def drain() -> None:
        received.extend(theirs.recv(2048) for _ in range(count))

    reader = threading.Timer(0.05, drain)
    reader.start()
    try:
        channel.send_now(b"fits once drained", timeout=5.0)
        reader.join()
        assert received == [b"f" * 1024] * count
        assert theirs.recv(2048) == b"fits once drained"
    finally:
        reader.join()
        channel.close()
        theirs.close()


# -- peer credentials ---------------------------------------------------------------------------


async def test_peer_credentials_report_pid_uid_gid_of_the_peer() -> None:
    a, b = socketpair()
    with a, b:
        assert a.peer_credentials() == (os.getpid(), os.getuid(), os.getgid())


async def test_accepted_and_connected_ends_both_see_the_peers_credentials(sockdir: Path) -> None:
    path = sockdir / "run" / "handoff.sock"
    async with await listen(path) as listener:
        client = await connect(path)
        server = await listener.accept()
        with client, server:
            me = (os.getpid(), os.getuid(), os.getgid())
            assert server.peer_credentials() == me
            assert client.peer_credentials() == me
            assert server.check_peer({os.getuid()}).uid == os.getuid()


async def test_a_uid_not_allowed_is_refused_naming_the_uid_and_what_is_allowed() -> None:
    a, b = socketpair()
    other = os.getuid() + 1
    with a, b, pytest.raises(CredentialsRefused) as info:
        b.check_peer({other})
    refusal = info.value
    assert refusal.uid == os.getuid()
    assert refusal.pid == os.getpid()
    assert refusal.allowed_uids == frozenset({other})
    assert f"runs as uid {os.getuid()}" in str(refusal)
    assert f"allowed: uid {other}" in str(refusal)
    assert f"--allow-uid {os.getuid()}" in str(refusal)


async def test_a_source_refusing_the_target_uid_sends_nothing_and_the_target_sees_eof(
    sockdir: Path,
) -> None:
    path = sockdir / "handoff.sock"
    memfd = make_memfd()
    async with await listen(path) as listener:
        client = await connect(path)
        server = await listener.accept()
        try:
            with pytest.raises(CredentialsRefused):
                client.check_peer({os.getuid() + 1})
            client.close()  # the refusal ends the connection before anything was sent
            before = open_fds()
            assert await server.receive(max_fds=8) == (None, [])
            assert open_fds() == before
        finally:
            os.close(memfd)
            server.close()


CHILD_AS_NOBODY = r"""
import array, os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
r, w = os.pipe()
s.sendmsg([b"hello"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
print("sent", flush=True)
try:
    print("eof" if s.recv(100) == b"" else "data")
except ConnectionResetError:
    print("eof")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
async def test_a_peer_running_as_another_uid_is_refused_before_any_fd_crosses(
    sockdir: Path,
) -> None:
    path = sockdir / "handoff.sock"
    async with await listen(path) as listener:
        # Simulate a host where the file-system guard was bypassed (directory traversable, socket
        # writable by all): the credential check must still stop the peer on its own.
        os.chmod(sockdir, 0o711)
        os.chmod(path, 0o666)
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", CHILD_AS_NOBODY, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            with trio.fail_after(10):
                server = await listener.accept()
                await trio.lowlevel.wait_readable(server)  # the child's fd is in flight now
            before = open_fds()
            with pytest.raises(CredentialsRefused) as info:
                server.check_peer({os.getuid()})
            server.close()
            assert open_fds() <= before  # nothing arrived: no new fd in this process
            assert info.value.uid == 65534
            assert "nobody" in str(info.value)
            out, _ = child.communicate(timeout=10)
            assert out.split() == ["sent", "eof"]
        finally:
            child.kill()
            child.wait()


# -- the socket in the file system --------------------------------------------------------------


async def test_listen_creates_a_missing_directory_0700_and_a_socket_0600(sockdir: Path) -> None:
    path = sockdir / "new" / "handoff.sock"
    async with await listen(path):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600


async def test_listen_refuses_a_directory_others_can_reach(sockdir: Path) -> None:
    open_dir = sockdir / "shared"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(Refused, match=r"mode 0755.*chmod 700"):
        await listen(open_dir / "handoff.sock")
    assert not (open_dir / "handoff.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory")
async def test_listen_refuses_a_directory_owned_by_another_uid(sockdir: Path) -> None:
    theirs = sockdir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(Refused, match=r"owned by uid 65534 \(nobody\)"):
        await listen(theirs / "handoff.sock")


async def test_listen_replaces_a_stale_socket_nothing_answers_on(sockdir: Path) -> None:
    path = sockdir / "handoff.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(path))
    dead.close()  # a crashed process leaves its file behind
    async with await listen(path) as listener:
        client = await connect(path)
        server = await listener.accept()
        await client.send(b"reached the new listener")
        assert await server.receive(max_fds=0) == (b"reached the new listener", [])
        client.close()
        server.close()


async def test_listen_refuses_a_path_someone_is_listening_on(sockdir: Path) -> None:
    path = sockdir / "handoff.sock"
    async with await listen(path):
        with pytest.raises(Refused, match="already listening"):
            await listen(path)
        assert path.exists()  # the live socket was left alone


async def test_listen_refuses_to_replace_a_file_that_is_not_a_socket(sockdir: Path) -> None:
    path = sockdir / "handoff.sock"
    path.write_text("precious")
    with pytest.raises(Refused, match="not a socket"):
        await listen(path)
    assert path.read_text() == "precious"


async def test_closing_the_listener_removes_its_socket_file(sockdir: Path) -> None:
    path = sockdir / "handoff.sock"
    listener = await listen(path)
    assert path.exists()
    listener.close()
    assert not path.exists()


async def test_closing_the_listener_leaves_a_socket_that_replaced_its_file(
    sockdir: Path,
) -> None:
    path = sockdir / "handoff.sock"
    listener = await listen(path)
    path.unlink()
    successor = await listen(path)
    listener.close()
    assert path.exists()
    successor.close()
    assert not path.exists()


async def test_connect_to_nothing_says_what_to_start(sockdir: Path) -> None:
    with pytest.raises(TransportError, match=r"nothing is listening on .*--incoming unix:"):
        await connect(sockdir / "absent.sock")


async def test_listen_refuses_a_path_too_long_for_af_unix_naming_the_limit(sockdir: Path) -> None:
    path = sockdir / ("d" * 60) / ("s" * 60)
    with pytest.raises(Refused, match="at most 107"):
        await listen(path)


async def test_a_unix_channel_is_a_transport_connection() -> None:
    """The protocol's shell (migration.peer) takes any transport.base.Connection."""
    from handoff.transport.base import Connection

    a, b = socketpair()
    try:
        assert isinstance(a, Connection) and isinstance(b, Connection)
    finally:
        a.close()
        b.close()
