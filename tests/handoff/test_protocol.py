"""The handoff protocol machine, driven source against target with no sockets.

Each test builds two `HandoffConnection`s and passes the bytes of one to the other, exactly as
the trio shell would, with the fd count the shell would have seen.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff.protocol import (
    LIVE_STATES,
    MAX_DEVICE_BLOB_BYTES,
    MAX_DEVICE_BLOBS,
    MAX_HOST_FLAGS,
    MAX_MESSAGE_BYTES,
    MAX_NAME_LENGTH,
    MAX_SHARED_REGIONS,
    MAX_SLOTS,
    MAX_TEXT_LENGTH,
    MAX_VCPU_STATE_BYTES,
    MAX_VCPU_STATES_BYTES,
    MAX_VCPUS,
    NONCE_SIZE,
    PROTOCOL_MAX_VERSION,
    TOKEN_FEATURE,
    VCPU_STATES_VERSION,
    Commit,
    Describe,
    HandoffConnection,
    Hello,
    LocalProtocolError,
    MemfdSlot,
    Message,
    Mode,
    Moved,
    PeerGone,
    Prepared,
    Recovery,
    Refuse,
    RefuseCode,
    Regs,
    RemoteProtocolError,
    Resumed,
    Role,
    SevContext,
    State,
    Switchover,
    TargetTimings,
    VcpuStateWire,
    check_peer_token,
    decode,
    decode_vcpu_states,
    encode_vcpu_states,
    recovery_for,
    token_proof,
    verify_token_proof,
)
from kvmstub.uapi import (
    REG_NAMES,
    SEV_GUEST_STATE_RUNNING,
    SEV_POLICY_ES,
    SEV_POLICY_NODBG,
)

SOURCE, TARGET = Role.SOURCE, Role.TARGET
VM_UUID = uuid.UUID("6f1e9a52-3c7d-4b8e-9a01-2b3c4d5e6f70")
SOURCE_NONCE = bytes(range(NONCE_SIZE))
TARGET_NONCE = bytes(range(100, 100 + NONCE_SIZE))
TOKEN = b"a one-time token for this handoff"
MODES: tuple[Mode, ...] = ("plain", "sev", "sev-es")
U64_MAX = (1 << 64) - 1

# The conversation as DESIGN.md section 4 lays it out, written independently of the module's
# table: in each state, who sends the next ordinary message, and which one.
CONVERSATION: list[tuple[State, Role, type[Any]]] = [
    (State.START, SOURCE, Hello),
    (State.HELLO, TARGET, Hello),
    (State.GREETED, SOURCE, Describe),
    (State.DESCRIBED, TARGET, Prepared),
    (State.PREPARED, SOURCE, Switchover),
    (State.SWITCHED_OVER, TARGET, Moved),
    (State.MOVED, SOURCE, Commit),
    (State.COMMITTED, TARGET, Resumed),
]
NEXT = {state: (sender, kind) for state, sender, kind in CONVERSATION}
PROGRESS = [state for state, _, _ in CONVERSATION] + [State.DONE]
BEFORE_COMMIT = PROGRESS[: PROGRESS.index(State.COMMITTED)]
MESSAGE_TYPES: list[type[Any]] = [
    Hello,
    Describe,
    Prepared,
    Switchover,
    Moved,
    Commit,
    Resumed,
    Refuse,
]

# The failure rules of DESIGN.md section 4, for a peer lost (EOF) in each state.
RECOVERY_WHEN_PEER_LOST = {
    SOURCE: {
        State.START: Recovery.NOTHING_TO_DO,
        State.HELLO: Recovery.NOTHING_TO_DO,
        State.GREETED: Recovery.NOTHING_TO_DO,
        State.DESCRIBED: Recovery.NOTHING_TO_DO,
        State.PREPARED: Recovery.ROLLBACK,
        State.SWITCHED_OVER: Recovery.RESUME_OR_RECLAIM,
        State.MOVED: Recovery.RESUME_OR_RECLAIM,
        State.COMMITTED: Recovery.RECLAIM,
        State.DONE: Recovery.DONE,
    },
    TARGET: {
        State.START: Recovery.ABORT,
        State.HELLO: Recovery.ABORT,
        State.GREETED: Recovery.ABORT,
        State.DESCRIBED: Recovery.ABORT,
        State.PREPARED: Recovery.ABORT,
        State.SWITCHED_OVER: Recovery.TAKEOVER,
        State.MOVED: Recovery.TAKEOVER,
        State.COMMITTED: Recovery.TAKEOVER,
        State.DONE: Recovery.DONE,
    },
}


def recovery_when_ended(role: Role, state: State, *, peer_lost: bool) -> Recovery:
    """The rule for a connection that ended in `state` some other way than by EOF (a refusal,
    a protocol error, or we gave up): as for a lost peer, except that a source after Commit
    must first fence the target, whose Resumed may be on its way."""
    if role is SOURCE and state is State.COMMITTED and not peer_lost:
        return Recovery.FENCE_THEN_RECLAIM
    return RECOVERY_WHEN_PEER_LOST[role][state]


# ---- building blocks ---------------------------------------------------------------------------


def make_describe(mode: Mode = "plain", *, vcpus: int = 2, proof: bytes = b"") -> Describe:
    slots = (
        MemfdSlot(slot=0, guest_phys_addr=0, size=1 << 20, offset=0),
        MemfdSlot(slot=1, guest_phys_addr=1 << 32, size=2 << 20, offset=4096),
    )
    sev = None
    policy = 0
    if mode != "plain":
        policy = SEV_POLICY_NODBG | (SEV_POLICY_ES if mode == "sev-es" else 0)
        sev = SevContext(handle=7, state=SEV_GUEST_STATE_RUNNING, measurement=b"\x5a" * 32)
    return Describe(
        vcpus=vcpus,
        memory_bytes=sum(s.size for s in slots),
        slots=slots,
        mode=mode,
        policy=policy,
        line_every=200,
        flip_every=50,
        sev=sev,
        host_flags={"vm-name": "guest-a", "log-level": "info"},
        proof=proof,
    )


def make_states(vcpus: int = 2) -> tuple[VcpuStateWire, ...]:
    return tuple(
        VcpuStateWire(backend="kvmstub", version=1, blob=bytes([i]) * 300) for i in range(vcpus)
    )


def make_switchover(
    mode: Mode = "plain", *, vcpus: int = 2, version: int = PROTOCOL_MAX_VERSION
) -> Switchover:
    """A valid Switchover for `version`: kvm_regs in 1 and 2, opaque states inline in 3."""
    regs = None
    states = None
    if mode != "sev-es" and version < VCPU_STATES_VERSION:
        regs = tuple(Regs(rax=i, rip=0x1000 + i, rsp=0x8000, rflags=0x202) for i in range(vcpus))
    elif mode != "sev-es":
        states = make_states(vcpus)
    return Switchover(
        doorbell_sum=123456,
        shared_regions=((0x3000, 1), (0x5000, 2)),
        device_blobs={"serial": b"partial line"},
        regs=regs,
        vcpu_states=states,
        paused_at_ns=5_000_000_000,
    )


def make_resumed(version: int) -> Resumed:
    if version == 1:
        return Resumed()
    return Resumed(
        timings=TargetTimings(
            prepare_ns=3_000_000, restore_ns=400_000, commit_wait_ns=60_000, resumed_at_ns=1
        )
    )


def make_refuse(code: str = RefuseCode.BUSY) -> Refuse:
    return Refuse(code=code, reason="a handoff of this VM is already under way; retry later")


def sample(kind: type[Any], mode: Mode = "plain") -> Message:
    """A valid instance of each message type, for feeding out of turn."""
    hello = Hello(
        min_version=1, max_version=2, vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE
    )
    samples: dict[type[Any], Message] = {
        Hello: hello,
        Describe: make_describe(mode),
        Prepared: Prepared(),
        Switchover: make_switchover(mode),
        Moved: Moved(),
        Commit: Commit(),
        Resumed: make_resumed(2),
        Refuse: make_refuse(),
    }
    return samples[kind]


def state_of(conn: HandoffConnection) -> State:
    """The state, read through a call so that the type checker does not pin it."""
    return conn.state


def raw(message: Message) -> bytes:
    """Encode without a machine, as a peer that does not follow the rules would."""
    return msgspec.msgpack.encode(message)


class Pair:
    """A source and a target machine, with the bytes of each message handed to the other."""

    def __init__(
        self,
        mode: Mode = "plain",
        *,
        source_max: int = PROTOCOL_MAX_VERSION,
        source_min: int = 1,
        target_max: int = PROTOCOL_MAX_VERSION,
        target_min: int = 1,
    ) -> None:
        self.mode = mode
        self.source = HandoffConnection(SOURCE, max_version=source_max, min_version=source_min)
        self.target = HandoffConnection(TARGET, max_version=target_max, min_version=target_min)

    def conn(self, role: Role) -> HandoffConnection:
        return self.source if role is SOURCE else self.target

    def deliver(self, sender: Role, message: Message) -> Message | PeerGone:
        data = self.conn(sender).send(message)
        return self.conn(sender.peer).receive(data, message.nfds())

    def next_message(self) -> tuple[Role, Message]:
        state = self.source.state
        assert state == self.target.state, "the pair is only stepped in lockstep"
        sender, _ = NEXT[state]
        message: Message
        if state is State.START:
            message = self.source.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE)
        elif state is State.HELLO:
            message = self.target.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=TARGET_NONCE)
        elif state is State.COMMITTED:
            assert self.target.version is not None
            message = make_resumed(self.target.version)
        else:
            fixed: dict[State, Message] = {
                State.GREETED: make_describe(self.mode),
                State.DESCRIBED: Prepared(),
                State.PREPARED: make_switchover(self.mode, version=self.source.version or 1),
                State.SWITCHED_OVER: Moved(),
                State.MOVED: Commit(),
            }
            message = fixed[state]
        return sender, message

    def step(self) -> tuple[Message, Message | PeerGone]:
        sender, message = self.next_message()
        return message, self.deliver(sender, message)

    def advance_to(self, state: State) -> None:
        while self.source.state is not state:
            self.step()
        assert self.target.state is state


# ---- a whole handoff ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_whole_handoff_reaches_done_on_both_sides_with_every_message_intact(mode: Mode) -> None:
    pair = Pair(mode)
    kinds = []
    while pair.source.state is not State.DONE:
        sent, received = pair.step()
        assert received == sent
        kinds.append(type(sent))
    assert kinds == [kind for _, _, kind in CONVERSATION]
    for conn in (pair.source, pair.target):
        assert conn.state is State.DONE
        assert conn.version == PROTOCOL_MAX_VERSION
        assert conn.recovery() is Recovery.DONE
    assert pair.target.description == make_describe(mode)
    assert pair.source.peer_hello == pair.target.our_hello
    assert pair.target.peer_hello == pair.source.our_hello


@pytest.mark.parametrize("role", [SOURCE, TARGET])
def test_eof_after_done_is_an_ordinary_end_with_nothing_to_recover(role: Role) -> None:
    pair = Pair()
    pair.advance_to(State.DONE)
    event = pair.conn(role).receive(None)
    assert event == PeerGone(lost_in=State.DONE, recovery=Recovery.DONE)
    assert pair.conn(role).state is State.CLOSED


def test_each_message_declares_its_fds_and_describe_one_per_memfd_plus_control_socket() -> None:
    describe = make_describe()
    assert describe.nfds() == len(describe.slots) + 1 == 3
    assert Prepared().nfds() == 1
    assert make_switchover().nfds() == 1
    for kind in (Hello, Moved, Commit, Resumed, Refuse):
        assert sample(kind).nfds() == 0


def test_largest_valid_messages_fit_in_one_datagram() -> None:
    describe = Describe(
        vcpus=MAX_VCPUS,
        memory_bytes=MAX_SLOTS * (1 << 40),
        slots=tuple(
            MemfdSlot(slot=i, guest_phys_addr=i << 40, size=1 << 40, offset=U64_MAX)
            for i in range(MAX_SLOTS)
        ),
        mode="sev-es",
        policy=0xFFFF_FFFF,
        line_every=0xFFFF_FFFF,
        flip_every=0xFFFF_FFFF,
        sev=SevContext(handle=0xFFFF_FFFF, state=6, measurement=b"m" * 32),
        host_flags={
            f"{i:0{MAX_NAME_LENGTH}}": "v" * MAX_TEXT_LENGTH for i in range(MAX_HOST_FLAGS)
        },
        proof=b"p" * 32,
    )
    switchover = Switchover(
        doorbell_sum=0xFFFF_FFFF,
        shared_regions=tuple((U64_MAX, U64_MAX) for _ in range(MAX_SHARED_REGIONS)),
        device_blobs={
            f"{i:0{MAX_NAME_LENGTH}}": b"b" * MAX_DEVICE_BLOB_BYTES for i in range(MAX_DEVICE_BLOBS)
        },
        regs=tuple(Regs(**dict.fromkeys(REG_NAMES, U64_MAX)) for _ in range(MAX_VCPUS)),
        paused_at_ns=U64_MAX,
    )
    for message in (describe, switchover):
        data = raw(message)
        assert len(data) <= MAX_MESSAGE_BYTES
        assert decode(data) == message


# ---- modes: what Switchover must carry ---------------------------------------------------------


def test_sev_es_switchover_with_registers_is_refused_both_ways() -> None:
    pair = Pair("sev-es")
    pair.advance_to(State.PREPARED)
    with_regs = make_switchover("plain")
    with pytest.raises(RemoteProtocolError, match="VMSA"):
        pair.target.receive(raw(with_regs), 1)
    assert pair.target.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="VMSA"):
        pair.source.send(with_regs)
    assert pair.source.state is State.ERROR


@pytest.mark.parametrize("mode", ["plain", "sev"])
@pytest.mark.parametrize("regs_count", [None, 0, 1, 3])
def test_plain_and_sev_switchover_must_carry_registers_for_every_vcpu(
    mode: Mode, regs_count: int | None
) -> None:
    pair = Pair(mode, source_max=2, target_max=2)
    pair.advance_to(State.PREPARED)
    regs = None if regs_count is None else tuple(Regs() for _ in range(regs_count))
    bad = Switchover(doorbell_sum=0, regs=regs, paused_at_ns=0)
    with pytest.raises(RemoteProtocolError, match="registers for each of the 2 vCPUs"):
        pair.target.receive(raw(bad), 1)
    assert pair.target.state is State.ERROR


def test_describe_whose_slots_do_not_add_up_or_repeat_is_a_protocol_error() -> None:
    good = make_describe()
    wrong_total = msgspec.structs.replace(good, memory_bytes=good.memory_bytes + 4096)
    repeated = msgspec.structs.replace(
        good, slots=(good.slots[0], good.slots[0]), memory_bytes=2 * good.slots[0].size
    )
    plain_with_sev = msgspec.structs.replace(good, sev=make_describe("sev").sev)
    sev_without = msgspec.structs.replace(make_describe("sev"), sev=None)
    for bad, why in [
        (wrong_total, "add up"),
        (repeated, "slot twice"),
        (plain_with_sev, "must not carry SEV"),
        (sev_without, "must carry SEV"),
    ]:
        pair = Pair()
        pair.advance_to(State.GREETED)
        with pytest.raises(RemoteProtocolError, match=why):
            pair.target.receive(raw(bad), bad.nfds())


# ---- versions ----------------------------------------------------------------------------------


def test_version_negotiation_picks_the_highest_common_version() -> None:
    pair = Pair()
    pair.advance_to(State.GREETED)
    assert pair.source.version == pair.target.version == PROTOCOL_MAX_VERSION == 3
    assert pair.source.peer_hello is not None
    assert pair.source.peer_hello.chosen_version == 3


@pytest.mark.parametrize("pinned", [SOURCE, TARGET])
def test_a_side_pinned_to_version_1_completes_a_v1_handoff_without_timings(
    pinned: Role,
) -> None:
    pair = Pair(source_max=1) if pinned is SOURCE else Pair(target_max=1)
    pair.advance_to(State.COMMITTED)
    assert pair.source.version == pair.target.version == 1
    _, received = pair.step()
    assert received == Resumed(timings=None)
    assert pair.source.state is pair.target.state is State.DONE


def test_version_2_resumed_carries_the_targets_timings() -> None:
    pair = Pair()
    pair.advance_to(State.COMMITTED)
    _, received = pair.step()
    assert isinstance(received, Resumed)
    assert received.timings == make_resumed(2).timings


def test_version_1_resumed_with_timings_is_refused_both_ways() -> None:
    pair = Pair(source_max=1)
    pair.advance_to(State.COMMITTED)
    with pytest.raises(RemoteProtocolError, match="no timings in protocol version 1"):
        pair.source.receive(raw(make_resumed(2)), 0)
    with pytest.raises(LocalProtocolError, match="no timings in protocol version 1"):
        pair.target.send(make_resumed(2))


def test_version_2_resumed_without_timings_is_a_protocol_error() -> None:
    pair = Pair()
    pair.advance_to(State.COMMITTED)
    with pytest.raises(RemoteProtocolError, match="must carry timings"):
        pair.source.receive(raw(Resumed()), 0)


def test_no_common_version_makes_the_target_refuse_naming_both_ranges() -> None:
    pair = Pair(source_min=2, source_max=2, target_max=1)
    pair.step()  # the source's Hello
    assert pair.target.version is None
    with pytest.raises(LocalProtocolError, match="no common protocol version"):
        pair.target.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=TARGET_NONCE)
    refusal = pair.target.version_refusal()
    assert refusal is not None
    assert refusal.code == RefuseCode.VERSION
    assert "source speaks versions 2..2" in refusal.reason
    assert "target 1..1" in refusal.reason
    received = pair.deliver(TARGET, refusal)
    assert received == refusal
    assert pair.source.state is pair.target.state is State.REFUSED
    assert pair.source.refused_by is TARGET
    assert pair.source.recovery() is Recovery.NOTHING_TO_DO
    assert pair.target.recovery() is Recovery.ABORT


def test_version_refusal_is_none_when_the_ranges_overlap() -> None:
    pair = Pair(source_max=1)
    pair.step()
    assert pair.target.version == 1
    assert pair.target.version_refusal() is None


def test_target_cannot_hand_craft_a_hello_with_a_version_other_than_the_negotiated_one() -> None:
    pair = Pair(source_max=1)
    pair.step()
    hello = pair.target.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=TARGET_NONCE)
    with pytest.raises(LocalProtocolError, match="must choose version 1"):
        pair.target.send(msgspec.structs.replace(hello, chosen_version=2))


def test_target_choosing_a_version_outside_the_source_range_is_a_protocol_error() -> None:
    pair = Pair(source_max=1)
    pair.step()
    bad = Hello(
        min_version=1,
        max_version=2,
        chosen_version=2,
        vm_name="guest-a",
        vm_uuid=VM_UUID,
        nonce=TARGET_NONCE,
    )
    with pytest.raises(RemoteProtocolError, match=r"outside the source's range 1\.\.1"):
        pair.source.receive(raw(bad), 0)
    assert pair.source.state is State.ERROR


def test_source_hello_that_chooses_a_version_is_a_protocol_error() -> None:
    target = HandoffConnection(TARGET)
    hello = msgspec.structs.replace(sample(Hello), chosen_version=2)
    with pytest.raises(RemoteProtocolError, match="chooses no version"):
        target.receive(raw(hello), 0)


def test_target_hello_without_a_chosen_version_is_a_protocol_error() -> None:
    pair = Pair()
    pair.step()
    with pytest.raises(RemoteProtocolError, match="must carry the chosen version"):
        pair.source.receive(raw(sample(Hello)), 0)


def test_hello_with_an_empty_version_range_is_a_protocol_error() -> None:
    target = HandoffConnection(TARGET)
    hello = msgspec.structs.replace(sample(Hello), min_version=2, max_version=1)
    with pytest.raises(RemoteProtocolError, match=r"range 2\.\.1 is empty"):
        target.receive(raw(hello), 0)


@pytest.mark.parametrize(("low", "high"), [(0, 2), (1, PROTOCOL_MAX_VERSION + 1), (2, 1)])
def test_connection_refuses_a_version_range_it_does_not_implement(low: int, high: int) -> None:
    with pytest.raises(ValueError, match="not a range"):
        HandoffConnection(SOURCE, min_version=low, max_version=high)


# ---- order ---------------------------------------------------------------------------------------


def _peer_may_refuse(receiver: Role, state: State) -> bool:
    # Refuse is allowed before Commit; a source that sent Commit may still see the target's
    # Refuse sent while it waited for Commit.
    return state in BEFORE_COMMIT or (receiver is SOURCE and state is State.COMMITTED)


def _out_of_order_cases() -> list[tuple[Role, State, type[Any]]]:
    cases = []
    for receiver in (SOURCE, TARGET):
        for state in PROGRESS:
            for kind in MESSAGE_TYPES:
                expected = NEXT.get(state)
                if expected == (receiver.peer, kind):
                    continue
                if kind is Refuse and _peer_may_refuse(receiver, state):
                    continue
                cases.append((receiver, state, kind))
    return cases


@pytest.mark.parametrize(("receiver", "state", "kind"), _out_of_order_cases())
def test_out_of_order_message_is_a_remote_protocol_error_and_the_error_is_sticky(
    receiver: Role, state: State, kind: type[Any]
) -> None:
    pair = Pair()
    pair.advance_to(state)
    conn = pair.conn(receiver)
    right = pair.next_message()[1] if state is not State.DONE else make_refuse()
    message = sample(kind)
    with pytest.raises(RemoteProtocolError):
        conn.receive(raw(message), message.nfds())
    assert conn.state is State.ERROR
    # Sticky: nothing is accepted any more, not even what would have been right.
    with pytest.raises(RemoteProtocolError):
        conn.receive(raw(right), right.nfds())
    with pytest.raises(RemoteProtocolError):
        conn.receive(None)
    with pytest.raises(LocalProtocolError):
        conn.send(make_refuse())
    assert conn.state is State.ERROR


def _out_of_turn_sends() -> list[tuple[Role, State, type[Any]]]:
    cases = []
    for sender in (SOURCE, TARGET):
        for state in PROGRESS:
            for kind in MESSAGE_TYPES:
                if NEXT.get(state) == (sender, kind):
                    continue
                if kind is Refuse and state in BEFORE_COMMIT:
                    continue
                cases.append((sender, state, kind))
    return cases


@pytest.mark.parametrize(("sender", "state", "kind"), _out_of_turn_sends())
def test_sending_a_message_out_of_turn_is_a_local_protocol_error(
    sender: Role, state: State, kind: type[Any]
) -> None:
    pair = Pair()
    pair.advance_to(state)
    conn = pair.conn(sender)
    with pytest.raises(LocalProtocolError, match="may not send"):
        conn.send(sample(kind))
    assert conn.state is State.ERROR


def test_a_second_hello_from_the_source_is_a_protocol_error() -> None:
    pair = Pair()
    hello, _ = pair.step()
    with pytest.raises(RemoteProtocolError, match="may not send Hello in state HELLO"):
        pair.target.receive(raw(hello), 0)


# ---- fds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", PROGRESS[:-1])
@pytest.mark.parametrize("wrong", ["one more", "sixty more", "none, or one for none"])
def test_a_message_with_the_wrong_number_of_fds_is_a_protocol_error(
    state: State, wrong: str
) -> None:
    pair = Pair("sev")
    pair.advance_to(state)
    sender, message = pair.next_message()
    right = message.nfds()
    nfds = {"one more": right + 1, "sixty more": right + 60}.get(wrong, 0 if right else 1)
    receiver = pair.conn(sender.peer)
    with pytest.raises(RemoteProtocolError, match=f"must carry {right} fds, the datagram carried"):
        receiver.receive(raw(message), nfds)
    assert receiver.state is State.ERROR


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", BEFORE_COMMIT)
@pytest.mark.parametrize("refuser", [SOURCE, TARGET])
def test_either_side_may_refuse_before_commit_and_each_side_knows_its_recovery(
    state: State, refuser: Role
) -> None:
    pair = Pair("sev")
    pair.advance_to(state)
    refusal = make_refuse(RefuseCode.INCOMPATIBLE)
    assert pair.deliver(refuser, refusal) == refusal
    for conn in (pair.source, pair.target):
        assert conn.state is State.REFUSED
        assert conn.refusal == refusal
        assert conn.refused_by is refuser
        assert conn.ended_in is state
    # The source recovers as for a loss in the same state. The target never takes over after
    # its own refusal; after the source's it may, from Switchover on, once the source's process
    # is gone (its shell checks): a source that refused and died leaves the guest to it.
    assert pair.source.recovery() is recovery_when_ended(SOURCE, state, peer_lost=False)
    target_rule = Recovery.ABORT if refuser is TARGET else RECOVERY_WHEN_PEER_LOST[TARGET][state]
    assert pair.target.recovery() is target_rule
    # The EOF that follows changes nothing.
    gone = pair.target.receive(None)
    assert isinstance(gone, PeerGone)
    assert gone.recovery is target_rule


@pytest.mark.parametrize("role", [SOURCE, TARGET])
def test_no_refusal_may_be_sent_once_commit_was_sent_or_received(role: Role) -> None:
    pair = Pair()
    pair.advance_to(State.COMMITTED)
    with pytest.raises(LocalProtocolError, match="may not send Refuse in state COMMITTED"):
        pair.conn(role).send(make_refuse())


def test_target_that_refuses_while_commit_is_in_flight_leaves_the_source_to_reclaim() -> None:
    pair = Pair("sev-es")
    pair.advance_to(State.MOVED)
    commit = pair.source.send(Commit())
    refusal = make_refuse(RefuseCode.TIMEOUT)
    refuse = pair.target.send(refusal)
    # The source, having sent Commit, sees a refusal that crossed it.
    assert pair.source.receive(refuse, 0) == refusal
    assert pair.source.state is State.REFUSED
    # The target did not resume (it refused); the source still fences it before reclaiming.
    assert pair.source.recovery() is Recovery.FENCE_THEN_RECLAIM
    assert pair.source.fenced([]) is Recovery.RECLAIM
    # The target sees Commit after it refused: returned for the log, but it changes nothing.
    assert pair.target.receive(commit, 0) == Commit()
    assert pair.target.state is State.REFUSED
    assert pair.target.recovery() is Recovery.ABORT


def test_switchover_crossing_a_target_refusal_is_returned_so_its_fd_can_be_closed() -> None:
    pair = Pair("sev")
    pair.advance_to(State.PREPARED)
    refuse = pair.target.send(make_refuse())
    switchover = make_switchover("sev")
    data = pair.source.send(switchover)
    assert pair.target.receive(data, 1) == switchover
    assert state_of(pair.target) is State.REFUSED
    assert pair.target.recovery() is Recovery.ABORT
    assert pair.source.receive(refuse, 0) == make_refuse()
    assert pair.source.recovery() is Recovery.RESUME_OR_RECLAIM
    # Having sent Switchover, the source waits for Moved: nothing else can cross.
    with pytest.raises(RemoteProtocolError, match="after we refused"):
        pair.target.receive(raw(Commit()), 0)
    assert state_of(pair.target) is State.ERROR
    assert pair.target.recovery() is Recovery.ABORT


def test_a_crossing_message_must_still_carry_its_fds() -> None:
    pair = Pair()
    pair.advance_to(State.PREPARED)
    pair.target.send(make_refuse())
    with pytest.raises(RemoteProtocolError, match="must carry 1 fds"):
        pair.target.receive(raw(make_switchover()), 0)


def test_nothing_may_follow_a_refusal_from_the_peer() -> None:
    pair = Pair()
    pair.advance_to(State.GREETED)
    pair.deliver(TARGET, make_refuse())
    with pytest.raises(RemoteProtocolError, match="REFUSED"):
        pair.source.receive(raw(Prepared()), 1)


def test_a_target_that_is_busy_may_refuse_before_reading_the_source_hello() -> None:
    pair = Pair()
    hello = pair.source.send(
        pair.source.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE)
    )
    refuse = pair.target.send(make_refuse(RefuseCode.BUSY))
    assert isinstance(pair.target.receive(hello, 0), Hello)
    assert pair.source.receive(refuse, 0) == make_refuse(RefuseCode.BUSY)
    assert pair.source.recovery() is Recovery.NOTHING_TO_DO


def test_refuse_codes_outside_the_known_set_are_accepted_but_malformed_ones_are_not() -> None:
    pair = Pair()
    newer = Refuse(code="maintenance", reason="the host is being drained")
    assert pair.target.receive(raw(newer), 0) == newer
    pair = Pair()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        pair.target.receive(raw(Refuse(code="Not A Code!", reason="x")), 0)


# ---- lost peers --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", PROGRESS)
@pytest.mark.parametrize("role", [SOURCE, TARGET])
def test_peer_lost_in_each_state_gives_the_recovery_of_design_section_4(
    role: Role, state: State
) -> None:
    pair = Pair("sev")
    pair.advance_to(state)
    conn = pair.conn(role)
    expected = RECOVERY_WHEN_PEER_LOST[role][state]
    # What giving up now would mean (the target: if the source turns out dead).
    assert conn.recovery() is recovery_when_ended(role, state, peer_lost=role is TARGET)
    event = conn.receive(None)
    assert event == PeerGone(lost_in=state, recovery=expected)
    assert conn.state is State.CLOSED
    assert conn.recovery() is expected
    assert conn.receive(None) == event  # EOF stays EOF
    with pytest.raises(RemoteProtocolError):
        conn.receive(raw(Commit()), 0)


@pytest.mark.parametrize(
    ("role", "expected"), [(SOURCE, Recovery.FENCE_THEN_RECLAIM), (TARGET, Recovery.TAKEOVER)]
)
def test_protocol_error_after_commit_leaves_the_guest_to_the_source_while_it_lives(
    role: Role, expected: Recovery
) -> None:
    # The target runs the guest after a broken connection only as a takeover: its shell does
    # that only once the source's process is gone. While the source lives (it sent garbage,
    # or received it) the target steps aside and the source fences it and takes the guest back.
    pair = Pair("sev")
    pair.advance_to(State.COMMITTED)
    conn = pair.conn(role)
    with pytest.raises(RemoteProtocolError):
        conn.receive(b"\xc1", 0)
    assert conn.recovery() is expected


def test_target_protocol_error_after_switchover_takes_over_if_the_source_is_gone() -> None:
    """A source that broke the protocol after Switchover and then died leaves the guest to
    the target, which holds its VM fd (the shell takes over only once it is gone)."""
    pair = Pair("sev-es")
    pair.advance_to(State.MOVED)
    with pytest.raises(RemoteProtocolError):
        pair.target.receive(raw(Moved()), 0)
    assert pair.target.recovery() is Recovery.TAKEOVER


def test_target_that_refused_after_switchover_aborts() -> None:
    """Our own step failed before we held the guest: we refused, and the source reclaims."""
    pair = Pair("sev-es")
    pair.advance_to(State.SWITCHED_OVER)
    pair.target.send(Refuse(code=RefuseCode.INTERNAL, reason="the move failed"))
    assert pair.target.recovery() is Recovery.ABORT


def test_local_protocol_error_ends_the_connection_with_the_recovery_of_its_state() -> None:
    pair = Pair()
    pair.advance_to(State.COMMITTED)
    with pytest.raises(LocalProtocolError):
        pair.source.send(Commit())
    assert pair.source.state is State.ERROR
    assert pair.source.ended_in is State.COMMITTED
    assert pair.source.recovery() is Recovery.FENCE_THEN_RECLAIM


@pytest.mark.parametrize("state", [State.REFUSED, State.CLOSED, State.ERROR])
def test_recovery_for_refuses_states_a_connection_cannot_end_in(state: State) -> None:
    with pytest.raises(ValueError, match="cannot end"):
        recovery_for(SOURCE, state, peer_lost=True)


# ---- token challenge ---------------------------------------------------------------------------


def test_token_proof_from_the_same_token_verifies() -> None:
    proof = token_proof(TOKEN, SOURCE_NONCE, TARGET)
    assert len(proof) == 32
    assert verify_token_proof(TOKEN, SOURCE_NONCE, TARGET, proof)


@pytest.mark.parametrize(
    ("token", "nonce", "prover", "why"),
    [
        (b"another token", SOURCE_NONCE, TARGET, "wrong token"),
        (TOKEN, TARGET_NONCE, TARGET, "answer to another nonce (replay)"),
        (TOKEN, SOURCE_NONCE, SOURCE, "the other role's answer (reflection)"),
    ],
)
def test_token_proof_does_not_verify_with(
    token: bytes, nonce: bytes, prover: Role, why: str
) -> None:
    proof = token_proof(token, nonce, prover)
    assert not verify_token_proof(TOKEN, SOURCE_NONCE, TARGET, proof), why
    refusal = check_peer_token(
        TOKEN,
        our_nonce=SOURCE_NONCE,
        peer_role=TARGET,
        peer_features=[TOKEN_FEATURE],
        peer_proof=proof,
    )
    assert refusal is not None
    assert refusal.code == RefuseCode.AUTH
    assert "different tokens" in refusal.reason


@pytest.mark.parametrize(
    ("ours", "peer_features", "phrase"),
    [
        (TOKEN, (), "the target was given none"),
        (None, (TOKEN_FEATURE,), "this side was given none"),
    ],
)
def test_a_token_on_one_side_only_is_refused_with_advice(
    ours: bytes | None, peer_features: tuple[str, ...], phrase: str
) -> None:
    refusal = check_peer_token(
        ours,
        our_nonce=SOURCE_NONCE,
        peer_role=TARGET,
        peer_features=peer_features,
        peer_proof=b"",
    )
    assert refusal is not None
    assert refusal.code == RefuseCode.AUTH
    assert phrase in refusal.reason
    assert "pass the same token to both" in refusal.reason


def test_no_token_on_either_side_needs_no_proof() -> None:
    assert (
        check_peer_token(
            None, our_nonce=SOURCE_NONCE, peer_role=SOURCE, peer_features=(), peer_proof=b""
        )
        is None
    )


def test_token_challenge_through_the_handshake_proves_both_sides_before_any_fd() -> None:
    source = HandoffConnection(SOURCE)
    target = HandoffConnection(TARGET)
    features = (TOKEN_FEATURE,)
    hello = source.make_hello(
        vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE, features=features
    )
    source_hello = target.receive(source.send(hello), 0)
    assert isinstance(source_hello, Hello)
    answer = target.make_hello(
        vm_name="guest-a",
        vm_uuid=VM_UUID,
        nonce=TARGET_NONCE,
        features=features,
        proof=token_proof(TOKEN, source_hello.nonce, TARGET),
    )
    target_hello = source.receive(target.send(answer), 0)
    assert isinstance(target_hello, Hello)
    # The source checks the target before it sends any fd (Describe carries the memfds).
    assert (
        check_peer_token(
            TOKEN,
            our_nonce=SOURCE_NONCE,
            peer_role=TARGET,
            peer_features=target_hello.features,
            peer_proof=target_hello.proof,
        )
        is None
    )
    describe = make_describe(proof=token_proof(TOKEN, target_hello.nonce, SOURCE))
    received = target.receive(source.send(describe), describe.nfds())
    assert isinstance(received, Describe)
    # The target checks the source before it uses the memfds or sends its VM fd.
    assert (
        check_peer_token(
            TOKEN,
            our_nonce=TARGET_NONCE,
            peer_role=SOURCE,
            peer_features=source_hello.features,
            peer_proof=received.proof,
        )
        is None
    )
    assert (
        check_peer_token(
            b"the target's different token",
            our_nonce=TARGET_NONCE,
            peer_role=SOURCE,
            peer_features=source_hello.features,
            peer_proof=received.proof,
        )
        is not None
    )


# ---- bounds and garbage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (msgspec.structs.replace(sample(Hello), nonce=b"short"), "nonce"),
        (msgspec.structs.replace(sample(Hello), vm_name=""), "vm_name"),
        (msgspec.structs.replace(sample(Hello), features=("x",) * 33), "features"),
        (msgspec.structs.replace(sample(Hello), max_version=0), "max_version"),
    ],
)
def test_out_of_bounds_fields_are_refused_on_receive_and_on_send(message: Hello, why: str) -> None:
    target = HandoffConnection(TARGET)
    with pytest.raises(RemoteProtocolError, match=why):
        target.receive(raw(message), 0)
    source = HandoffConnection(SOURCE, max_version=2)
    local = msgspec.structs.replace(message, min_version=1, max_version=2)
    if why != "max_version":
        with pytest.raises(LocalProtocolError, match=why):
            source.send(local)


@pytest.mark.parametrize(
    ("field", "value"),
    [("vcpus", 0), ("vcpus", MAX_VCPUS + 1), ("policy", -1), ("line_every", 0)],
)
def test_describe_fields_out_of_bounds_are_protocol_errors(field: str, value: int) -> None:
    pair = Pair()
    pair.advance_to(State.GREETED)
    bad = msgspec.structs.replace(make_describe(), **{field: value})
    with pytest.raises(RemoteProtocolError, match=field):
        pair.target.receive(raw(bad), bad.nfds())


def test_a_message_too_large_for_one_datagram_is_refused_before_decoding() -> None:
    target = HandoffConnection(TARGET)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        target.receive(b"\x00" * (MAX_MESSAGE_BYTES + 1), 0)


def test_an_integer_too_large_for_the_wire_is_a_local_protocol_error() -> None:
    pair = Pair()
    pair.advance_to(State.PREPARED)
    too_big = msgspec.structs.replace(make_switchover(), paused_at_ns=1 << 70)
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        pair.source.send(too_big)


def test_decode_turns_garbage_into_remote_protocol_error() -> None:
    assert decode(raw(Commit())) == Commit()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode(msgspec.msgpack.encode({"type": "launch-missiles"}))


# ---- properties --------------------------------------------------------------------------------

u64 = st.integers(0, U64_MAX)
names = st.text(min_size=1, max_size=12)
regs = st.builds(Regs, **dict.fromkeys(REG_NAMES, u64))
hellos = st.builds(
    Hello,
    min_version=st.integers(1, 3),
    max_version=st.integers(1, 3),
    chosen_version=st.none() | st.integers(1, 3),
    vm_name=names,
    vm_uuid=st.uuids(),
    features=st.lists(names, max_size=3).map(tuple),
    nonce=st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
    proof=st.binary(max_size=32),
)
slots = st.builds(
    MemfdSlot,
    slot=st.integers(0, 3),
    guest_phys_addr=u64,
    size=st.integers(1, 1 << 30),
    offset=u64,
)
sev_contexts = st.builds(
    SevContext,
    handle=st.integers(0, 2**32 - 1),
    state=st.integers(0, 6),
    measurement=st.none() | st.binary(min_size=32, max_size=32),
)


@st.composite
def describes(draw: st.DrawFn) -> Describe:
    chosen = tuple(draw(st.lists(slots, min_size=1, max_size=3)))
    total = sum(s.size for s in chosen)
    return Describe(
        vcpus=draw(st.integers(1, 4)),
        memory_bytes=draw(st.just(total) | st.integers(1, 1 << 40)),
        slots=chosen,
        mode=draw(st.sampled_from(MODES)),
        policy=draw(st.integers(0, 2**32 - 1)),
        line_every=draw(st.integers(1, 1000)),
        flip_every=draw(st.integers(1, 1000)),
        sev=draw(st.none() | sev_contexts),
        host_flags=draw(st.dictionaries(names, st.text(max_size=8), max_size=3)),
        proof=draw(st.binary(max_size=32)),
    )


switchovers = st.builds(
    Switchover,
    doorbell_sum=st.integers(0, 2**32 - 1),
    shared_regions=st.lists(st.tuples(u64, st.integers(1, 8)), max_size=3).map(tuple),
    device_blobs=st.dictionaries(names, st.binary(max_size=8), max_size=2),
    regs=st.none() | st.lists(regs, max_size=4).map(tuple),
    paused_at_ns=u64,
)
timings = st.builds(
    TargetTimings, prepare_ns=u64, restore_ns=u64, commit_wait_ns=u64, resumed_at_ns=u64
)
messages: st.SearchStrategy[Message] = st.one_of(
    hellos,
    describes(),
    st.just(Prepared()),
    switchovers,
    st.just(Moved()),
    st.just(Commit()),
    st.builds(Resumed, timings=st.none() | timings),
    st.builds(Refuse, code=st.sampled_from(list(RefuseCode)), reason=st.text(max_size=40)),
)
# None stands for "the right next message", so that sequences get deep into the handoff.
peer_inputs = st.lists(
    st.none() | st.tuples(messages, st.none() | st.integers(0, 4)), min_size=1, max_size=12
)


def _our_next(conn: HandoffConnection) -> Message | None:
    """What an honest side sends when it is its turn in `conn.state`, else None."""
    state = conn.state
    if state not in NEXT or NEXT[state][0] is not conn.our_role:
        return None
    if state is State.START:
        return conn.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE)
    if state is State.HELLO:
        refusal = conn.version_refusal()
        if refusal is not None:
            return refusal
        return conn.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=TARGET_NONCE)
    if state is State.PREPARED:
        assert conn.description is not None
        return make_switchover(
            conn.description.mode,
            vcpus=conn.description.vcpus,
            version=conn.version or PROTOCOL_MAX_VERSION,
        )
    if state is State.COMMITTED:
        assert conn.version is not None
        return make_resumed(conn.version)
    fixed: dict[State, Message] = {
        State.GREETED: make_describe("sev"),
        State.DESCRIBED: Prepared(),
        State.SWITCHED_OVER: Moved(),
        State.MOVED: Commit(),
    }
    return fixed[state]


def _right_peer_message(conn: HandoffConnection) -> Message:
    """What an honest peer would send now (or a refusal when it is not its turn)."""
    state = conn.state
    if state not in NEXT or NEXT[state][0] is conn.our_role:
        return make_refuse()
    mirror = HandoffConnection(conn.their_role)
    if state is State.START:
        return mirror.make_hello(vm_name="guest-a", vm_uuid=VM_UUID, nonce=SOURCE_NONCE)
    if state is State.HELLO:
        return Hello(
            min_version=1,
            max_version=2,
            chosen_version=conn.max_version,
            vm_name="guest-a",
            vm_uuid=VM_UUID,
            nonce=TARGET_NONCE,
        )
    if state is State.GREETED:
        return make_describe("sev-es")
    if state is State.PREPARED:
        assert conn.description is not None
        return make_switchover(
            conn.description.mode,
            vcpus=conn.description.vcpus,
            version=conn.version or PROTOCOL_MAX_VERSION,
        )
    if state is State.COMMITTED:
        assert conn.version is not None
        return make_resumed(conn.version)
    fixed: dict[State, Message] = {
        State.DESCRIBED: Prepared(),
        State.SWITCHED_OVER: Moved(),
        State.MOVED: Commit(),
    }
    return fixed[state]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from([SOURCE, TARGET]), inputs=peer_inputs)
def test_any_sequence_of_peer_messages_follows_the_protocol_or_ends_in_a_protocol_error(
    role: Role, inputs: list[tuple[Message, int | None] | None]
) -> None:
    conn = HandoffConnection(role)
    for item in inputs:
        ours = _our_next(conn)
        if ours is not None:
            conn.send(ours)
        if item is None:
            message = _right_peer_message(conn)
            nfds = message.nfds()
        else:
            message, wrong_nfds = item
            nfds = message.nfds() if wrong_nfds is None else wrong_nfds
        before = conn.state
        try:
            event = conn.receive(raw(message), nfds)
        except RemoteProtocolError:
            assert conn.state is State.ERROR
            assert conn.ended_in is not None
            assert conn.recovery() in {
                *RECOVERY_WHEN_PEER_LOST[role].values(),
                recovery_when_ended(role, conn.ended_in, peer_lost=False),
            }
            with pytest.raises(RemoteProtocolError):
                conn.receive(raw(message), nfds)
            return
        assert event == message
        assert nfds == message.nfds()
        if before is State.REFUSED:
            # We refused; the peer's message crossed our Refuse and changed nothing.
            assert conn.state is State.REFUSED
            assert conn.refused_by is role
        elif isinstance(message, Refuse):
            assert _peer_may_refuse(role, before)
            assert conn.state is State.REFUSED
            assert conn.refused_by is role.peer
        else:
            assert NEXT[before] == (role.peer, type(message))
            assert PROGRESS.index(conn.state) == PROGRESS.index(before) + 1


_any_state = st.sampled_from(PROGRESS)


@settings(max_examples=400)
@given(
    role=st.sampled_from([SOURCE, TARGET]),
    state=_any_state,
    data=st.binary(max_size=300),
    nfds=st.integers(0, 4),
)
def test_random_bytes_never_raise_anything_but_remote_protocol_error(
    role: Role, state: State, data: bytes, nfds: int
) -> None:
    pair = Pair()
    pair.advance_to(state)
    conn = pair.conn(role)
    try:
        event = conn.receive(data, nfds)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
    else:
        assert type(event) in MESSAGE_TYPES
        assert conn.state is not State.ERROR


@settings(max_examples=400)
@given(
    state=st.sampled_from(PROGRESS[:-1]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10_000),
)
def test_corrupted_valid_datagrams_never_raise_anything_but_remote_protocol_error(
    state: State, edits: list[tuple[int, int]], cut: int
) -> None:
    pair = Pair("sev")
    pair.advance_to(state)
    sender, message = pair.next_message()
    data = bytearray(raw(message))
    for position, value in edits:
        data[position % len(data)] = value
    corrupted = bytes(data[: max(1, cut % (len(data) + 1))])
    receiver = pair.conn(sender.peer)
    try:
        event = receiver.receive(corrupted, message.nfds())
    except RemoteProtocolError:
        assert receiver.state is State.ERROR
    else:
        assert type(event) in MESSAGE_TYPES
        assert receiver.state is not State.ERROR


# ---- where the guest ends up ------------------------------------------------------------------
# What each side does with the guest once its connection has ended (DESIGN.md section 4): the
# source keeps or takes it back unless the handoff was done; the target runs it when the
# handoff was done, or takes it over when the source is really dead (the shell's pidfd check).

SOURCE_KEEPS = {
    Recovery.NOTHING_TO_DO,
    Recovery.ROLLBACK,
    Recovery.RESUME_OR_RECLAIM,
    Recovery.RECLAIM,
}


def runs_guest(role: Role, recovery: Recovery, *, peer_dead: bool) -> bool:
    assert recovery is not Recovery.FENCE_THEN_RECLAIM, "fence first (HandoffConnection.fenced)"
    if role is SOURCE:
        return recovery in SOURCE_KEEPS
    return recovery is Recovery.DONE or (recovery is Recovery.TAKEOVER and peer_dead)


@settings(max_examples=300)
@given(
    mode=st.sampled_from(MODES),
    steps=st.integers(0, len(CONVERSATION)),
    in_flight=st.booleans(),
    dead=st.sampled_from([None, SOURCE, TARGET]),
)
def test_a_connection_cut_at_any_point_leaves_the_guest_in_exactly_one_vmm(
    mode: Mode, steps: int, in_flight: bool, dead: Role | None
) -> None:
    """Cut after any message, with one more sent but unread or not, either side dead or both
    alive: exactly one side runs the guest, unless the one process that held it died outside
    the critical section (the source before the target held its VM, the target after it sent
    Resumed), which no VMM survives."""
    pair = Pair(mode)
    for _ in range(steps):
        pair.step()
    if in_flight and pair.source.state in NEXT:
        sender, message = pair.next_message()
        data = pair.conn(sender).send(message)
        if dead is not sender.peer:  # SEQPACKET: a live receiver still reads a queued datagram
            pair.conn(sender.peer).receive(data, message.nfds())
    target_state = pair.target.state
    running = 0
    for role in (SOURCE, TARGET):
        if role is dead:
            continue
        gone = pair.conn(role).receive(None)
        assert isinstance(gone, PeerGone)
        running += runs_guest(role, gone.recovery, peer_dead=dead is role.peer)
    holder_died = (
        dead is SOURCE
        and target_state not in (State.SWITCHED_OVER, State.MOVED, State.COMMITTED, State.DONE)
    ) or (dead is TARGET and target_state is State.DONE)
    assert running == (0 if holder_died else 1)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from([SOURCE, TARGET]), inputs=peer_inputs)
def test_a_hostile_peer_ends_in_a_clean_refusal_and_the_guest_in_exactly_one_vmm(
    role: Role, inputs: list[tuple[Message, int | None] | None]
) -> None:
    """The honest side against a live peer sending well-typed messages out of order, with
    contradictory fields or wrong fd counts: it never raises anything but RemoteProtocolError,
    and it ends holding the guest exactly when the peer does not: the source keeps it unless
    it saw a valid Resumed; the target runs it only after sending Resumed, never by takeover
    from a peer that is alive."""
    conn = HandoffConnection(role)
    for item in inputs:
        if conn.state not in LIVE_STATES:
            break
        ours = _our_next(conn)
        if ours is not None:
            conn.send(ours)
            if conn.state not in LIVE_STATES:
                break
        message, nfds = (_right_peer_message(conn), None) if item is None else item
        try:
            conn.receive(raw(message), message.nfds() if nfds is None else nfds)
        except RemoteProtocolError:
            break
    done = conn.ended_in is State.DONE or conn.state is State.DONE
    recovery = conn.recovery()
    if recovery is Recovery.FENCE_THEN_RECLAIM:
        recovery = conn.fenced([])  # frozen, it had nothing more queued: then killed
    ours_runs = runs_guest(role, recovery, peer_dead=False)
    # The live peer holds the guest: a target once it sent Resumed, a source until then.
    peer_runs = done if role is SOURCE else not done
    assert ours_runs + peer_runs == 1


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(MODES),
    garbage_first=st.booleans(),
    resumed=st.booleans(),
    target_dies=st.booleans(),
    own_error=st.booleans(),
    data=st.data(),
)
def test_a_source_failing_after_commit_fences_and_a_crossing_resumed_leaves_one_holder(
    mode: Mode,
    garbage_first: bool,
    resumed: bool,
    target_dies: bool,
    own_error: bool,
    data: st.DataObject,
) -> None:
    """After Commit the target may resume at any moment, sending Resumed just before its first
    KVM_RUN, while the source fails (it gives up waiting, a step of its own breaks, or the
    target sent something else first). The source's recovery, executed as the shell does
    (freeze the target, hand what it had queued to `fenced`, then kill it or, if it resumed,
    let it run), leaves the guest in exactly one VMM, and the source takes it back only when
    it never ran on the target. Any interleaving: the source reads any prefix of what the
    target sent before it fails, and the target may die after it (its EOF queued last)."""
    pair = Pair(mode)
    pair.advance_to(State.COMMITTED)
    assert pair.target.version is not None
    queue: list[tuple[bytes | None, int]] = []
    if garbage_first:
        queue.append((b"\xc1", 0))  # a fault-injected target, unaware that it broke anything
    if resumed:
        queue.append((pair.target.send(make_resumed(pair.target.version)), 0))
    if target_dies:
        queue.append((None, 0))
    source = pair.source
    read = data.draw(st.integers(0, len(queue)), label="read before the failure")
    unread = queue[read:]
    for i, (datagram, nfds) in enumerate(queue[:read]):
        try:
            source.receive(datagram, nfds)
        except RemoteProtocolError:
            unread = queue[i + 1 :]  # the shell stops at the error: the rest stays queued
            break
    if own_error and source.state is State.COMMITTED:
        with pytest.raises(LocalProtocolError):
            source.send(make_refuse())  # not allowed after Commit; the shell's own bug
    recovery = source.recovery()
    if recovery is Recovery.FENCE_THEN_RECLAIM:
        recovery = source.fenced(unread)
    # The target resumed exactly when it sent Resumed; the source must then leave it the guest.
    assert recovery is (Recovery.DONE if resumed else Recovery.RECLAIM)
    source_runs = runs_guest(SOURCE, recovery, peer_dead=target_dies)
    # Fenced: killed unless the source found its Resumed (then let go on: SIGCONT).
    target_runs = resumed and not target_dies and recovery is Recovery.DONE
    holder_died = resumed and target_dies
    assert source_runs + target_runs == (0 if holder_died else 1)


def test_fenced_takes_a_resumed_that_follows_a_protocol_error_after_commit() -> None:
    pair = Pair("sev")
    pair.advance_to(State.COMMITTED)
    with pytest.raises(RemoteProtocolError):
        pair.source.receive(b"\xc1", 0)
    assert pair.source.recovery() is Recovery.FENCE_THEN_RECLAIM
    resumed = pair.target.send(make_resumed(2))
    # receive stays sticky; only fencing reads what the target had queued.
    with pytest.raises(RemoteProtocolError):
        pair.source.receive(resumed, 0)
    assert pair.source.fenced([(resumed, 0)]) is Recovery.DONE
    assert pair.source.state is State.DONE
    assert pair.source.ended_in is State.DONE


def test_fenced_refuses_a_late_resumed_with_fds_or_before_commit() -> None:
    pair = Pair("sev")
    pair.advance_to(State.COMMITTED)
    with pytest.raises(RemoteProtocolError):
        pair.source.receive(b"\xc1", 0)
    late = pair.target.send(make_resumed(2))
    assert pair.source.fenced([(late, 1)]) is Recovery.RECLAIM
    # Before Commit a Resumed is no news of a resumed guest: fencing changes nothing.
    pair = Pair("sev")
    pair.advance_to(State.MOVED)
    pair.source.send(make_refuse())
    assert pair.source.recovery() is Recovery.RESUME_OR_RECLAIM
    assert pair.source.fenced([(raw(make_resumed(2)), 0)]) is Recovery.RESUME_OR_RECLAIM


def test_the_wire_regs_are_the_kernels_struct_field_for_field() -> None:
    """Versions 1 and 2 carry struct kvm_regs; the protocol keeps its own copy of it (it may
    not import a hypervisor), which must stay the backend's field for field and byte for byte."""
    from handoff import protocol
    from kvmstub import uapi

    assert protocol.Regs.__struct_fields__ == uapi.Regs.__struct_fields__
    regs = uapi.Regs(rax=1, rip=0x1000, rflags=0x202)
    assert msgspec.msgpack.encode(regs) == msgspec.msgpack.encode(
        protocol.Regs(*msgspec.structs.astuple(regs))
    )


# ---- version 3: opaque vCPU states, inline or in a sealed memfd --------------------------------


@pytest.mark.parametrize("pinned", [SOURCE, TARGET])
@pytest.mark.parametrize("old", [1, 2])
def test_a_v3_side_talks_the_older_version_both_ways_and_switchover_carries_regs(
    pinned: Role, old: int
) -> None:
    pair = Pair(source_max=old) if pinned is SOURCE else Pair(target_max=old)
    pair.advance_to(State.PREPARED)
    assert pair.source.version == pair.target.version == old
    sent, received = pair.step()
    assert isinstance(received, Switchover) and received == sent
    assert received.regs is not None and len(received.regs) == 2
    assert received.vcpu_states is None and received.vcpu_states_memfd is None
    assert received.nfds() == 1
    pair.advance_to(State.DONE)


@pytest.mark.parametrize("mode", MODES)
def test_v3_switchover_carries_opaque_states_inline_and_no_regs(mode: Mode) -> None:
    pair = Pair(mode)
    pair.advance_to(State.PREPARED)
    sent, received = pair.step()
    assert received == sent
    assert isinstance(received, Switchover) and received.regs is None
    if mode == "sev-es":
        assert received.vcpu_states is None
    else:
        assert received.vcpu_states == make_states()
    assert received.nfds() == 1


def test_v3_switchover_with_states_in_a_memfd_carries_a_second_fd() -> None:
    states = make_states()
    data = encode_vcpu_states(states)
    sw = Switchover(doorbell_sum=0, regs=None, vcpu_states_memfd=len(data), paused_at_ns=1)
    assert sw.nfds() == 2
    pair = Pair()
    pair.advance_to(State.PREPARED)
    with pytest.raises(RemoteProtocolError, match="must carry 2 fds, the datagram carried 1"):
        pair.target.receive(raw(sw), 1)
    pair = Pair()
    pair.advance_to(State.PREPARED)
    assert pair.deliver(SOURCE, sw) == sw
    assert pair.target.description is not None
    assert decode_vcpu_states(data, pair.target.description) == states


@pytest.mark.parametrize("version", [1, 2])
def test_v1_and_v2_refuse_vcpu_states_inline_or_in_a_memfd(version: int) -> None:
    for bad in (
        msgspec.structs.replace(make_switchover(version=version), vcpu_states=make_states()),
        msgspec.structs.replace(make_switchover(version=version), vcpu_states_memfd=100),
    ):
        pair = Pair(source_max=version)
        pair.advance_to(State.PREPARED)
        with pytest.raises(
            RemoteProtocolError, match=f"no vcpu_states in protocol version {version}"
        ):
            pair.target.receive(raw(bad), bad.nfds())
        assert pair.target.state is State.ERROR
        with pytest.raises(LocalProtocolError, match="no vcpu_states"):
            pair.source.send(bad)


@pytest.mark.parametrize("mode", ["plain", "sev"])
def test_v3_refuses_regs_both_or_neither_and_a_wrong_count(mode: Mode) -> None:
    regs = make_switchover(mode, version=2).regs
    cases = [
        (Switchover(doorbell_sum=0, regs=regs, paused_at_ns=0), "no regs in protocol version 3"),
        (
            Switchover(doorbell_sum=0, regs=regs, vcpu_states=make_states(), paused_at_ns=0),
            "no regs in protocol version 3",
        ),
        (
            Switchover(
                doorbell_sum=0,
                regs=None,
                vcpu_states=make_states(),
                vcpu_states_memfd=10,
                paused_at_ns=0,
            ),
            "not both",
        ),
        (Switchover(doorbell_sum=0, regs=None, paused_at_ns=0), "for each of the 2 vCPUs"),
        (
            Switchover(doorbell_sum=0, regs=None, vcpu_states=make_states(3), paused_at_ns=0),
            "for each of the 2 vCPUs",
        ),
    ]
    for bad, why in cases:
        pair = Pair(mode)
        pair.advance_to(State.PREPARED)
        with pytest.raises(RemoteProtocolError, match=why):
            pair.target.receive(raw(bad), bad.nfds())
        assert pair.target.state is State.ERROR


def test_v3_sev_es_switchover_with_vcpu_states_is_refused() -> None:
    for bad in (
        make_switchover("plain"),
        Switchover(doorbell_sum=0, regs=None, vcpu_states_memfd=10, paused_at_ns=0),
    ):
        pair = Pair("sev-es")
        pair.advance_to(State.PREPARED)
        with pytest.raises(RemoteProtocolError, match="VMSA"):
            pair.target.receive(raw(bad), bad.nfds())


def test_vcpu_states_are_bounded_in_the_message_and_in_the_memfd() -> None:
    big = VcpuStateWire(backend="kvmstub", version=1, blob=b"x" * (MAX_VCPU_STATE_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode(raw(Switchover(doorbell_sum=0, regs=None, vcpu_states=(big,), paused_at_ns=0)))
    too_big = Switchover(
        doorbell_sum=0, regs=None, vcpu_states_memfd=MAX_VCPU_STATES_BYTES + 1, paused_at_ns=0
    )
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode(raw(too_big))
    describe = make_describe()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode_vcpu_states(encode_vcpu_states((big, big)), describe)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_vcpu_states(b"\x00" * (MAX_VCPU_STATES_BYTES + 1), describe)
    with pytest.raises(RemoteProtocolError, match="holds 3 states"):
        decode_vcpu_states(encode_vcpu_states(make_states(3)), describe)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode_vcpu_states(b"\xc1garbage", describe)
    # The largest valid memfd content decodes within the bound.
    largest = tuple(
        VcpuStateWire(
            backend="k" * MAX_NAME_LENGTH, version=0xFFFF_FFFF, blob=b"b" * MAX_VCPU_STATE_BYTES
        )
        for _ in range(MAX_VCPUS)
    )
    data = encode_vcpu_states(largest)
    assert len(data) <= MAX_VCPU_STATES_BYTES
    assert decode_vcpu_states(data, msgspec.structs.replace(describe, vcpus=MAX_VCPUS)) == largest


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", range(len(CONVERSATION)))
def test_a_message_a_dead_peer_never_read_leaves_the_guest_with_exactly_one_vmm(
    mode: Mode, steps: int
) -> None:
    """A send fails whole when the peer is gone (SEQPACKET): the sender's `undelivered` ends
    the conversation in the state before its message, and its recovery, with the peer dead,
    keeps the guest running unless the dead peer was the one holding it. The target's failed
    Resumed is the case that matters: it takes over only because the source is gone."""
    pair = Pair(mode)
    for _ in range(steps):
        pair.step()
    sender, message = pair.next_message()
    target_state = pair.target.state
    pair.conn(sender).send(message)
    recovery = pair.conn(sender).undelivered()
    assert pair.conn(sender).state is State.CLOSED
    runs = runs_guest(sender, recovery, peer_dead=True)
    holder_died = sender is TARGET and target_state not in (
        State.SWITCHED_OVER,
        State.MOVED,
        State.COMMITTED,
    )
    assert runs == (0 if holder_died else 1)


def test_a_resumed_that_could_not_be_sent_is_a_takeover_only_from_a_dead_source() -> None:
    pair = Pair("plain")
    pair.advance_to(State.COMMITTED)
    assert pair.target.version is not None
    pair.target.send(make_resumed(pair.target.version))
    assert pair.target.undelivered() is Recovery.TAKEOVER
    assert pair.target.ended_in is State.COMMITTED
    # The source, alive, never saw it: it fences the target and takes the guest back.
    assert pair.source.recovery() is Recovery.FENCE_THEN_RECLAIM
    assert pair.source.fenced([]) is Recovery.RECLAIM
    assert not runs_guest(TARGET, Recovery.TAKEOVER, peer_dead=False)


def test_undelivered_needs_a_message_of_ours_in_flight() -> None:
    pair = Pair("plain")
    with pytest.raises(LocalProtocolError):
        pair.source.undelivered()
