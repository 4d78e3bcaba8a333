"""handoff.migration.peer: the blackout's send_now / receive_now between two Peers over a real
socketpair.

The two protocol machines are first stepped in memory (as `Pair` in test_protocol.py does) to
the state where the blackout starts; from there the messages cross the socket, fds included.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from handoff import protocol
from handoff.errors import HandoffTimeout, PeerFailed, Refused, TransportError
from handoff.migration.peer import Peer, PeerGoneError
from handoff.protocol import (
    NONCE_SIZE,
    Commit,
    Describe,
    HandoffConnection,
    MemfdSlot,
    Moved,
    Prepared,
    Refuse,
    RefuseCode,
    Resumed,
    Role,
    State,
    Switchover,
    TargetTimings,
    VcpuStateWire,
)
from handoff.transport.unix import socketpair

SOURCE, TARGET = Role.SOURCE, Role.TARGET
VM_UUID = uuid.UUID("6f1e9a52-3c7d-4b8e-9a01-2b3c4d5e6f70")
VCPUS = 2


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def make_memfd(content: bytes = b"source vm") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def describe() -> Describe:
    slots = (MemfdSlot(slot=0, guest_phys_addr=0, size=1 << 20, offset=0),)
    return Describe(
        vcpus=VCPUS,
        memory_bytes=1 << 20,
        slots=slots,
        mode="plain",
        policy=0,
        line_every=200,
        flip_every=50,
    )


def switchover() -> Switchover:
    states = tuple(
        VcpuStateWire(backend="kvmstub", version=1, blob=bytes([i]) * 100) for i in range(VCPUS)
    )
    return Switchover(doorbell_sum=42, regs=None, vcpu_states=states, paused_at_ns=5_000_000_000)


def resumed(version: int | None) -> Resumed:
    if version == 1:
        return Resumed()
    return Resumed(
        timings=TargetTimings(prepare_ns=3, restore_ns=4, commit_wait_ns=5, resumed_at_ns=6)
    )


def advance_in_memory(source: HandoffConnection, target: HandoffConnection, to: State) -> None:
    """Step both machines, the bytes of each message handed straight to the other, to `to`."""
    while source.state is not to:
        state = source.state
        assert state is target.state
        sender: HandoffConnection
        message: protocol.Message
        if state is State.START:
            sender, message = (
                source,
                source.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=bytes(NONCE_SIZE)),
            )
        elif state is State.HELLO:
            sender, message = (
                target,
                target.make_hello(
                    vm_name="guest-a", vm_uuid=VM_UUID, nonce=bytes(range(NONCE_SIZE))
                ),
            )
        elif state is State.GREETED:
            sender, message = source, describe()
        elif state is State.DESCRIBED:
            sender, message = target, Prepared()
        elif state is State.PREPARED:
            sender, message = source, switchover()
        elif state is State.SWITCHED_OVER:
            sender, message = target, Moved()
        else:
            raise AssertionError(f"not stepped in memory beyond {state.name}")
        receiver = target if sender is source else source
        receiver.receive(sender.send(message), message.nfds())
    assert target.state is to


MakePeers = Callable[..., tuple[Peer, Peer]]


@pytest.fixture
async def make_peers() -> AsyncIterator[MakePeers]:
    """`make_peers(state, timeout=1.0)`: a source and a target Peer, both machines in `state`,
    joined by a socketpair; closed at the end of the test."""
    made: list[Peer] = []

    def make(state: State, timeout: float = 1.0) -> tuple[Peer, Peer]:
        source_conn, target_conn = HandoffConnection(SOURCE), HandoffConnection(TARGET)
        advance_in_memory(source_conn, target_conn, state)
        a, b = socketpair()
        pair = (Peer(a, source_conn, timeout), Peer(b, target_conn, timeout))
        made.extend(pair)
        return pair

    yield make
    for peer in made:
        peer.close()


async def test_the_blackout_round_trip_crosses_with_its_fd_and_ends_done(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.PREPARED)
    vm = make_memfd(b"source vm")
    try:
        source.send_now(switchover(), [vm])
        msg, owned = target.receive_now(Switchover)
        assert msg == switchover()
        assert len(owned) == 1
        assert os.fstat(owned[0]).st_ino == os.fstat(vm).st_ino
        assert os.pread(owned[0], 9, 0) == b"source vm"
        owned.close()

        target.send_now(Moved())
        moved, none = source.receive_now(Moved)
        assert (moved, len(none)) == (Moved(), 0)
        source.send_now(Commit())
        commit, none = target.receive_now(Commit)
        assert (commit, len(none)) == (Commit(), 0)
        target.send_now(resumed(target.conn.version))
        done, none = source.receive_now(Resumed)
        assert done == resumed(source.conn.version)
        assert len(none) == 0
    finally:
        os.close(vm)
    assert source.conn.state is State.DONE
    assert target.conn.state is State.DONE
    assert (source.messages, target.messages) == (4, 4)


async def test_send_now_and_async_receive_interoperate(make_peers: MakePeers) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    target.send_now(Moved())
    msg, owned = await source.receive(Moved)
    assert (msg, len(owned)) == (Moved(), 0)
    await source.send(Commit())
    msg2, _ = target.receive_now(Commit)
    assert msg2 == Commit()


async def test_an_unexpected_message_is_peer_failed_and_its_fds_are_closed(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.PREPARED)
    vm = make_memfd()
    before = open_fds()
    try:
        source.send_now(switchover(), [vm])
        with pytest.raises(PeerFailed, match="expected Commit, the peer sent Switchover"):
            target.receive_now(Commit)
        assert open_fds() == before
    finally:
        os.close(vm)


async def test_a_protocol_violation_is_peer_failed_and_its_fds_are_closed(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.PREPARED)
    vm = make_memfd()
    before = open_fds()
    try:
        # A Switchover carrying two fds where the protocol allows one.
        source.chan.send_now(source.conn.send(switchover()), [vm, vm])
        with pytest.raises(PeerFailed, match=r"broke the handoff protocol.*must carry 1 fds"):
            target.receive_now(Switchover)
        assert open_fds() == before
        assert target.conn.state is State.ERROR
    finally:
        os.close(vm)


async def test_a_refuse_during_the_blackout_is_refused_naming_code_and_reason(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    target.send_now(Refuse(code=RefuseCode.INCOMPATIBLE, reason="the VM fd is not ours"))
    with pytest.raises(Refused, match=r"refused the handoff \(incompatible\): the VM fd is not"):
        source.receive_now(Moved)
    assert source.conn.state is State.REFUSED
    assert source.conn.recovery() is protocol.Recovery.RESUME_OR_RECLAIM


async def test_eof_while_waiting_is_peer_gone_naming_the_expected_message(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    target.close()
    with pytest.raises(PeerGoneError, match="closed the connection while we waited for Moved"):
        source.receive_now(Moved)
    assert source.conn.state is State.CLOSED
    assert source.conn.recovery() is protocol.Recovery.RESUME_OR_RECLAIM


async def test_a_timeout_names_the_expected_message_and_the_seconds_waited(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    with pytest.raises(HandoffTimeout, match=r"sent nothing for 0\.03 s .* waited for Moved"):
        source.receive_now(Moved, timeout=0.03)
    # Nothing was consumed and the machine did not move: the reply is still taken after.
    assert source.conn.state is State.SWITCHED_OVER
    target.send_now(Moved())
    msg, _ = source.receive_now(Moved)
    assert msg == Moved()


async def test_receive_now_waits_the_peer_timeout_by_default(make_peers: MakePeers) -> None:
    source, _ = make_peers(State.SWITCHED_OVER, timeout=0.02)
    with pytest.raises(HandoffTimeout, match=r"sent nothing for 0\.02 s while we waited for Moved"):
        source.receive_now(Moved)


async def test_async_receive_names_the_timeout_it_was_given(make_peers: MakePeers) -> None:
    # _timed_out is shared: the async receive names the timeout passed, not the peer's.
    source, _ = make_peers(State.SWITCHED_OVER, timeout=5.0)
    with pytest.raises(HandoffTimeout, match=r"sent nothing for 0\.02 s while we waited for Moved"):
        await source.receive(Moved, timeout=0.02)


async def test_send_now_to_a_peer_that_closed_is_a_transport_error(make_peers: MakePeers) -> None:
    source, target = make_peers(State.MOVED)
    target.close()
    with pytest.raises(TransportError, match="peer closed"):
        source.send_now(Commit())
    assert source.messages == 0


async def test_receive_fast_takes_a_prompt_reply_without_yielding(make_peers: MakePeers) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    target.send_now(Moved())
    ran = []

    async def other() -> None:
        ran.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        msg, owned = await source.receive_fast(Moved)
        # The reply was there: no other task ran before receive_fast returned.
        assert ran == []
    assert (msg, len(owned)) == (Moved(), 0)


async def test_receive_fast_lets_other_tasks_run_once_the_reply_is_late(
    make_peers: MakePeers,
) -> None:
    source, target = make_peers(State.SWITCHED_OVER)
    ticks = 0

    async def late_reply() -> None:
        nonlocal ticks
        # Runs only once receive_fast stopped blocking: a signal or a QMP client would too.
        while ticks < 5:
            ticks += 1
            await trio.sleep(0.001)
        target.send_now(Moved())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_reply)
        msg, _ = await source.receive_fast(Moved, timeout=5)
    assert msg == Moved()
    assert ticks == 5


async def test_receive_fast_times_out_naming_the_whole_wait(make_peers: MakePeers) -> None:
    source, _ = make_peers(State.SWITCHED_OVER, timeout=5.0)
    with pytest.raises(HandoffTimeout, match=r"sent nothing for 0\.05 s while we waited for Moved"):
        await source.receive_fast(Moved, timeout=0.05)
