"""The source's recovery is the protocol's table, executed: `recovery.recover_source` dispatches on
`conn.recovery()` (one function per `Recovery`) and has no rule of its own.

Each test drives a real `HandoffConnection` to the state a failure leaves it in, and runs the
recovery against a fake VMM (it records what is done to the guest). The fence is tested against
a real process: frozen, then killed, or let go on when its `Resumed` is found queued.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
import trio

from handoff import protocol
from handoff.migration import recovery
from handoff.migration.host import VmmHost
from handoff.migration.peer import Peer
from handoff.protocol import (
    Commit,
    Describe,
    HandoffConnection,
    MemfdSlot,
    Moved,
    Prepared,
    Recovery,
    Refuse,
    Resumed,
    Role,
    SevContext,
    State,
    Switchover,
    TargetTimings,
)

SOURCE, TARGET = Role.SOURCE, Role.TARGET
ESCROW = 1234  # a fake fd: the fake VMM only records it


class FakeGate:
    def __init__(self, paused: bool) -> None:
        self.pause_requested = paused


class FakeVmm:
    """What recovery does to the guest, in order: "probe" (KVM_RUN: does our VM still hold
    the context?), ("reclaim", escrow), "resume"."""

    def __init__(self, *, paused: bool, holds: bool, calls: list[Any]) -> None:
        self.gate = FakeGate(paused)
        self.holds = holds
        self.calls = calls

    def resume(self) -> None:
        self.calls.append("resume")
        self.gate.pause_requested = False

    async def holds_context(self) -> bool:
        self.calls.append("probe")
        return self.holds

    async def reclaim(self, escrow: int, regs: object) -> None:
        self.calls.append(("reclaim", escrow))


class FakeControl:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    def start_accepting(self) -> None:
        self.calls.append("accept")


class FakeApp:
    def __init__(self, *, paused: bool = True, holds: bool = False) -> None:
        self.calls: list[Any] = []
        self.vmm = FakeVmm(paused=paused, holds=holds, calls=self.calls)
        self.control = FakeControl(self.calls)


# ---- a conversation, driven to where a failure leaves it -----------------------------------------


def _describe() -> Describe:
    slot = MemfdSlot(slot=0, guest_phys_addr=0, size=1 << 20, offset=0)
    return Describe(
        vcpus=2,
        memory_bytes=slot.size,
        slots=(slot,),
        mode="sev-es",
        policy=0x5,
        line_every=200,
        flip_every=50,
        sev=SevContext(handle=7, state=3, measurement=b"\x5a" * 32),
    )


RESUMED = Resumed(
    timings=TargetTimings(prepare_ns=1, restore_ns=1, commit_wait_ns=1, resumed_at_ns=1)
)


def _step(source_conn: HandoffConnection, target_conn: HandoffConnection) -> None:
    state = source_conn.state
    if state is State.START:
        hello = source_conn.make_hello(vm_name="g", vm_uuid=uuid.UUID(int=1), nonce=b"s" * 32)
        target_conn.receive(source_conn.send(hello))
        return
    if state is State.HELLO:
        hello = target_conn.make_hello(vm_name="g", vm_uuid=uuid.UUID(int=1), nonce=b"t" * 32)
        source_conn.receive(target_conn.send(hello))
        return
    by_source: dict[State, protocol.Message] = {
        State.GREETED: _describe(),
        State.PREPARED: Switchover(
            doorbell_sum=0, shared_regions=(), device_blobs={}, regs=None, paused_at_ns=1
        ),
        State.MOVED: Commit(),
    }
    by_target: dict[State, protocol.Message] = {
        State.DESCRIBED: Prepared(),
        State.SWITCHED_OVER: Moved(),
        State.COMMITTED: RESUMED,
    }
    if state in by_source:
        message = by_source[state]
        target_conn.receive(source_conn.send(message), message.nfds())
    else:
        message = by_target[state]
        source_conn.receive(target_conn.send(message), message.nfds())


def conversation(state: State) -> tuple[HandoffConnection, HandoffConnection]:
    source_conn, target_conn = HandoffConnection(SOURCE), HandoffConnection(TARGET)
    while source_conn.state is not state:
        _step(source_conn, target_conn)
    return source_conn, target_conn


def source_refused_in(state: State) -> HandoffConnection:
    """The source failed in `state` and told the target (as `_hand_off` does)."""
    conn, _ = conversation(state)
    conn.send(Refuse(code="internal", reason="a failure of ours"))
    return conn


def recovering(
    app: FakeApp,
    conn: HandoffConnection,
    *,
    watch: int | None = None,
    pidfd: int | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> recovery.SourceFailure:
    pid = proc.pid if proc is not None else 0
    return recovery.SourceFailure(cast(VmmHost, app), conn, ESCROW, None, pidfd, proc, pid, watch)


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The handoff connection: (the source's end, the target's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


# ---- the dispatch ----------------------------------------------------------------------------


def test_every_source_recovery_of_the_table_has_exactly_one_function() -> None:
    source_values = {
        protocol.recovery_for(SOURCE, state, peer_lost=lost)
        for state in (*protocol.LIVE_STATES, State.DONE)
        for lost in (True, False)
    }
    assert set(recovery.SOURCE_RECOVERIES) == source_values
    assert Recovery.FENCE_THEN_RECLAIM in source_values


@pytest.mark.parametrize("state", [State.START, State.HELLO, State.GREETED, State.DESCRIBED])
async def test_a_failure_before_prepared_leaves_the_running_guest_alone(state: State) -> None:
    app = FakeApp(paused=False)
    conn = source_refused_in(state)
    assert conn.recovery() is Recovery.NOTHING_TO_DO
    assert await recovery.recover_source(recovering(app, conn)) == "none"
    assert app.calls == ["accept"]


@pytest.mark.parametrize(("paused", "word"), [(False, "none"), (True, "rollback")])
async def test_a_failure_before_switchover_resumes_the_guest_if_the_handoff_paused_it(
    paused: bool, word: str
) -> None:
    app = FakeApp(paused=paused)
    conn = source_refused_in(State.PREPARED)
    assert conn.recovery() is Recovery.ROLLBACK
    assert await recovery.recover_source(recovering(app, conn)) == word
    assert app.calls == (["accept", "resume"] if paused else ["accept"])


@pytest.mark.parametrize("state", [State.SWITCHED_OVER, State.MOVED])
@pytest.mark.parametrize(
    ("holds", "word", "calls"),
    [
        (True, "rollback", ["probe", "accept", "resume"]),
        (False, "reclaim", ["probe", ("reclaim", ESCROW), "accept", "resume"]),
    ],
)
async def test_a_failure_after_switchover_resumes_our_vm_or_reclaims_from_escrow(
    state: State, holds: bool, word: str, calls: list[Any]
) -> None:
    app = FakeApp(holds=holds)
    conn = source_refused_in(state)
    assert conn.recovery() is Recovery.RESUME_OR_RECLAIM
    assert await recovery.recover_source(recovering(app, conn)) == word
    assert app.calls == calls


async def test_a_target_gone_after_commit_is_reclaimed_from() -> None:
    app = FakeApp()
    conn, _ = conversation(State.COMMITTED)
    conn.receive(None)
    assert conn.recovery() is Recovery.RECLAIM
    assert await recovery.recover_source(recovering(app, conn)) == "reclaim"
    assert app.calls == ["probe", ("reclaim", ESCROW), "accept", "resume"]


async def test_a_silent_committed_target_is_fenced_then_reclaimed_from(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = connection
    app = FakeApp()
    conn, _ = conversation(State.COMMITTED)  # we gave up waiting for Resumed: still live
    assert conn.recovery() is Recovery.FENCE_THEN_RECLAIM
    assert await recovery.recover_source(recovering(app, conn, watch=ours.fileno())) == "reclaim"
    assert app.calls == ["probe", ("reclaim", ESCROW), "accept", "resume"]
    assert conn.recovery() is Recovery.RECLAIM


@pytest.mark.parametrize("garbage_first", [False, True])
async def test_a_resumed_that_crossed_our_failure_completes_the_handoff(
    connection: tuple[socket.socket, socket.socket], garbage_first: bool
) -> None:
    ours, theirs = connection
    app = FakeApp()
    conn, target_conn = conversation(State.COMMITTED)
    if garbage_first:  # a target that broke the protocol without knowing, then resumed
        with pytest.raises(protocol.RemoteProtocolError):
            conn.receive(b"\xc1")
    theirs.send(target_conn.send(RESUMED))
    assert await recovery.recover_source(recovering(app, conn, watch=ours.fileno())) == "committed"
    assert app.calls == []  # the guest is the target's: nothing here touches it
    assert conn.state is State.DONE
    assert conn.recovery() is Recovery.DONE


async def test_after_resumed_there_is_nothing_to_recover() -> None:
    app = FakeApp()
    conn, _ = conversation(State.DONE)
    assert await recovery.recover_source(recovering(app, conn)) == "committed"
    assert app.calls == []


async def test_a_refusal_is_not_sent_once_commit_crossed_and_the_table_stays_in_charge() -> None:
    conn, _ = conversation(State.COMMITTED)
    peer = Peer(cast(Any, None), conn, 1.0)  # a send would fail on the missing channel
    await peer.refuse("internal", "gave up")
    assert conn.state is State.COMMITTED
    assert conn.recovery() is Recovery.FENCE_THEN_RECLAIM


# ---- the fence, against a real process -------------------------------------------------------


@pytest.fixture
def target_process() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfd = os.pidfd_open(proc.pid)
    yield proc, pidfd
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(pidfd)


def _state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


async def test_the_fence_kills_a_committed_target_that_had_not_resumed(
    connection: tuple[socket.socket, socket.socket],
    target_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    ours, _theirs = connection
    proc, pidfd = target_process
    app = FakeApp()
    conn, _ = conversation(State.COMMITTED)
    r = recovering(app, conn, watch=ours.fileno(), pidfd=pidfd, proc=proc)
    assert await recovery.recover_source(r) == "reclaim"
    assert proc.wait(5) == -signal.SIGKILL


async def test_the_fence_lets_a_target_that_resumed_run_on(
    connection: tuple[socket.socket, socket.socket],
    target_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    ours, theirs = connection
    proc, pidfd = target_process
    app = FakeApp()
    conn, target_conn = conversation(State.COMMITTED)
    theirs.send(target_conn.send(RESUMED))
    r = recovering(app, conn, watch=ours.fileno(), pidfd=pidfd, proc=proc)
    assert await recovery.recover_source(r) == "committed"
    await trio.sleep(0.05)
    assert proc.poll() is None
    assert _state_of(proc.pid) not in "Tt"  # frozen, then let go on (SIGCONT)
    assert app.calls == []


# ---- the target ------------------------------------------------------------------------------


class FakeSource:
    """The source's process as the target's recovery waits on it."""

    def __init__(self, gone: bool) -> None:
        self.gone = gone
        self.waited = 0

    async def wait_gone(self, timeout: float) -> bool:
        self.waited += 1
        return self.gone


def test_every_target_recovery_of_the_table_is_handled() -> None:
    values = {
        protocol.recovery_for(TARGET, state, peer_lost=lost, we_refused=refused)
        for state in (*protocol.LIVE_STATES, State.DONE)
        for lost in (True, False)
        for refused in (True, False)
    }
    assert values == recovery.TARGET_RECOVERIES


@pytest.mark.parametrize("gone", [True, False])
async def test_the_target_takes_over_only_from_a_source_whose_process_is_gone(gone: bool) -> None:
    _, target = conversation(State.SWITCHED_OVER)
    target.receive(None)
    assert target.recovery() is Recovery.TAKEOVER
    proc = FakeSource(gone)
    assert await recovery.recover_target(target, cast(Any, proc)) is gone
    assert proc.waited == 1


async def test_a_target_that_refused_aborts_without_waiting_for_anything() -> None:
    target = HandoffConnection(TARGET)
    target.send(Refuse(code="busy", reason="already taking over a guest"))
    proc = FakeSource(True)
    assert await recovery.recover_target(target, cast(Any, proc)) is False
    assert proc.waited == 0
