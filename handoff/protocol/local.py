"""The handoff protocol as a pure state machine: messages, versions, order, and failure rules.

This module is the whole of DESIGN.md section 4 that can be decided without I/O. It is sans-IO
in the style of h11: no sockets, no trio, no clocks, no randomness. The trio shell
(`handoff.transport.unix`, `handoff.migration.peer`) reads a datagram and its fds, hands the
bytes and the fd count to `HandoffConnection.receive`, and gets back a message (or
`PeerGone`); it asks `HandoffConnection.send` for the bytes of a message and attaches the fds
the message declares (`Message.nfds()`). What to do when the connection ends early is
`HandoffConnection.recovery()`.

Theory of operation
===================

One SOCK_SEQPACKET connection, one msgpack message per datagram. The source (old VMM) connects,
the target (new VMM) listens. A handoff is a strict alternation of eight messages::

    source                                   target
    Hello            ---------------->                           START -> HELLO
                     <----------------       Hello               HELLO -> GREETED
    Describe         ---------------->       (memfds..., control socket)
                     <----------------       Prepared            (target VM fd: escrow)
    (pause)
    Switchover       ---------------->       (source VM fd)
                     <----------------       Moved
    Commit           ---------------->                           the commit point
                     <----------------       Resumed             then the guest runs on target

Because the two sides take turns, both machines track one *conversation state*: the number of
messages exchanged so far, named after the last one (`State.HELLO` ... `State.DONE`). In every
state exactly one side may send its next message (see `TRANSITIONS`). Both sides use the same
table: `send` looks up our own role, `receive` the peer's.

Besides its turn, either side may send `Refuse` in any state before `Commit` (the target before
it has seen `Commit`). A refusal ends the conversation: state `REFUSED`. Refusals race with
ordinary messages, and the machine accepts the races the protocol allows:

* the peer may refuse in the state *before* our last message, because it had not read our
  message yet. This is how a source can see `Refuse` after it sent `Commit`: the target refused
  while waiting for `Commit`. The source then takes the guest back (`Recovery.RECLAIM`).
* after we refused, the peer may still send what it would have sent had it not yet read our
  `Refuse` (a `Switchover` crossing the target's refusal, say). `receive` returns such a message
  so that the shell can close its fds; it changes nothing.

`receive(None)` means the peer is gone (EOF: the process exited or died). It is an ordinary
input that returns `PeerGone`, not an exception. Anything else that breaks the rules (bytes that
do not decode, a field out of bounds, a message out of order, a wrong fd count) raises
`RemoteProtocolError` and puts the connection in the sticky `ERROR` state; a message we try to
send out of order raises `LocalProtocolError`, with the same effect, as in h11. (One exception,
see the failure rules: a source whose conversation broke after `Commit` still accepts the
target's `Resumed`, which says that the target runs the guest.)

Versions
========

The source's `Hello` carries its version range, the target answers with its range and the
version it chose: the highest one both speak. With no common version the target sends
`version_refusal()` instead, naming both ranges. Version 2 adds `Resumed.timings` (what the
target measured of the blackout); in version 1 `Resumed` carries nothing. Version 3 carries vCPU
state as opaque per-backend blobs (`Switchover.vcpu_states`, `VcpuStateWire`) instead of struct
kvm_regs (`Switchover.regs`), inline or, when large, in a sealed memfd sent as a second fd with
`Switchover` (`vcpu_states_memfd`, read with `decode_vcpu_states`); each version refuses the
other's fields. A connection constructed with `max_version=1` (or 2) plays a peer of that
version, so a newer release can be tested against an older one.

Token challenge
===============

Peers are first checked by uid (SO_PEERCRED, in the shell). An optional one-time token adds an
HMAC challenge: each `Hello` carries a fresh 32-byte nonce, and each side proves it knows the
token by answering the *peer's* nonce: ``proof = HMAC-SHA256(token, peer_nonce || role label)``.
The target answers in its `Hello` (it has seen the source's nonce); the source answers in
`Describe.proof`, the first message it sends after seeing the target's nonce. No fd crosses to
an unproven peer from a correctly configured side: the source checks the target's proof
(`check_peer_token`) before it sends `Describe`, and with different tokens both proofs fail, so
the source refuses first; the target checks the source's proof before it touches the received
memfds or sends its own VM fd. Nonces come from the shell (``secrets.token_bytes(NONCE_SIZE)``).

Failure rules
=============

`recovery_for(role, state, peer_lost=...)` is DESIGN.md section 4's failure handling as a
table, keyed by the conversation state in which the connection ended:

Source:
  * before `Prepared` arrived: `NOTHING_TO_DO`; the source never paused and keeps running.
  * `Prepared` received, `Switchover` not sent: `ROLLBACK`: resume the own VM if it was paused
    already, drop the escrowed target VM fd.
  * `Switchover` sent, `Commit` not sent: `RESUME_OR_RECLAIM`: resume the own VM if it still
    has the guest's context; if KVM_RUN says EIO (the target moved it), move the context back
    from the escrowed target VM into a fresh VM of our own.
  * `Commit` sent, `Resumed` not received, and the target is gone (EOF): `RECLAIM`: take the
    guest back from escrow.
  * `Commit` sent, `Resumed` not received, the target not known to be gone (we gave up
    waiting, our own step failed, it broke the protocol or refused while `Commit` was in
    flight): `FENCE_THEN_RECLAIM`. The target may have resumed the guest already, its
    `Resumed` crossing our failure, and killing it then would kill the guest's only holder. So
    the shell first freezes the target (SIGSTOP), reads whatever it had sent, and hands it to
    `HandoffConnection.fenced`. A `Resumed` among it completes the handoff (`DONE`: the guest
    is the target's, which is left running); otherwise the answer becomes `RECLAIM`.
  * `Resumed` received: `DONE`: drop the escrow and exit.

Target:
  * the conversation ended after `Switchover` arrived, however (the source gone, silent, or
    refusing or breaking the protocol), unless we refused: `TAKEOVER`: the target holds the
    source VM fd; its shell waits (briefly) for the source's process to be gone, and only then
    completes the move if it has not yet, and resumes: nobody else will. A source that is
    still alive recovers the guest itself (it fences us first), so the shell steps aside.
  * `Resumed` sent: `DONE`: the guest is ours.
  * anything else (before `Switchover`, or our own refusal: our step failed before we held
    the guest): `ABORT`: drop everything and exit. A source that is still alive recovers the
    guest itself, and the escrow it holds keeps our VM, and the context in it, alive.

One subtle rule makes `RECLAIM` exact: the target sends `Resumed` *before* it lets its vCPUs
run. If the target dies before `Resumed`, the guest never ran on it, so the source's register
snapshot (sent in `Switchover`) and guest memory are exactly the guest's state. If the target
sent `Resumed` and then died, the datagram is already queued at the source, which reads it
before the EOF: the source sees `DONE`, never a loss in `COMMITTED`. For the same reason a
target that cannot send `Resumed` (a protocol error after `Commit`) must not run the guest
while the source lives: its recovery is `TAKEOVER`, which its shell carries out only once the
source's process is gone; a live source fences it and reclaims.

A peer that refused or broke the protocol may still be finishing its current step (a target
moving the context, say). The shell acts on `recovery()` once the peer is gone (EOF or process
exit), never while it may still act on the guest, and it ends the connection only by exiting:
an EOF is how the peer learns that we are gone.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

__all__ = [
    "INLINE_VCPU_STATES_BYTES",
    "LIVE_STATES",
    "MAX_DEVICE_BLOBS",
    "MAX_DEVICE_BLOB_BYTES",
    "MAX_HOST_FLAGS",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_SHARED_REGIONS",
    "MAX_SLOTS",
    "MAX_TEXT_LENGTH",
    "MAX_VCPUS",
    "MAX_VCPU_STATES_BYTES",
    "MAX_VCPU_STATE_BYTES",
    "NONCE_SIZE",
    "PROTOCOL_MAX_VERSION",
    "PROTOCOL_MIN_VERSION",
    "TOKEN_FEATURE",
    "TRANSITIONS",
    "VCPU_STATES_VERSION",
    "Commit",
    "Describe",
    "HandoffConnection",
    "Hello",
    "LocalProtocolError",
    "MemfdSlot",
    "Message",
    "Mode",
    "Moved",
    "PeerGone",
    "Prepared",
    "ProtocolError",
    "Recovery",
    "Refuse",
    "RefuseCode",
    "Regs",
    "RemoteProtocolError",
    "Resumed",
    "Role",
    "SevContext",
    "State",
    "Switchover",
    "TargetTimings",
    "VcpuStateWire",
    "check_peer_token",
    "decode",
    "decode_vcpu_states",
    "encode_vcpu_states",
    "recovery_for",
    "token_proof",
    "verify_token_proof",
]

# The kernel's numbers the messages are bounded by (include/uapi/linux/kvm.h, psp-sev.h).
KVM_USER_MEM_SLOTS: Final = 32764
SEV_GUEST_STATE_SENT: Final = 6  # the highest SEV guest state (UNINIT 0 .. SENT 6)


class Regs(msgspec.Struct, frozen=True):
    """struct kvm_regs (x86) as `Switchover` carries it: the general purpose registers, rip
    and rflags. The wire format of versions 1 and 2, field for field the kernel's struct."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


PROTOCOL_MIN_VERSION: Final = 1
PROTOCOL_MAX_VERSION: Final = 3
#: The first version that carries vCPU state as opaque per-backend blobs (`VcpuStateWire`)
#: instead of struct kvm_regs (`Regs`).
VCPU_STATES_VERSION: Final = 3

#: The largest datagram either side sends or accepts. It matches the channel's receive buffer
#: and a default SO_SNDBUF (208 KiB); the bounds below keep every valid message inside it.
MAX_MESSAGE_BYTES: Final = 256 * 1024

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32  # HMAC-SHA256
MEASUREMENT_SIZE: Final = 32

MAX_VCPUS: Final = 256
MAX_SLOTS: Final = 64  # memfds in one Describe; with the control socket, 65 fds per datagram
MAX_SHARED_REGIONS: Final = 2048
MAX_FEATURES: Final = 32
MAX_HOST_FLAGS: Final = 64
MAX_DEVICE_BLOBS: Final = 8
MAX_DEVICE_BLOB_BYTES: Final = 8192
MAX_NAME_LENGTH: Final = 64
MAX_TEXT_LENGTH: Final = 1024
#: One vCPU's state blob (version 3). Real x86 state (regs, sregs2, xsave, MSRs, LAPIC, ...)
#: is about 10 KiB; the bound leaves room for larger xsave areas.
MAX_VCPU_STATE_BYTES: Final = 64 * 1024
#: The largest sealed memfd of vCPU states a side sends or accepts (version 3): every vCPU at
#: its bound, with room for the msgpack framing.
MAX_VCPU_STATES_BYTES: Final = MAX_VCPUS * (MAX_VCPU_STATE_BYTES + 256)
#: Above this many bytes of state blobs, `Switchover` carries the states in a sealed memfd
#: rather than inline, so that the datagram stays well inside `MAX_MESSAGE_BYTES`.
INLINE_VCPU_STATES_BYTES: Final = 128 * 1024

#: The feature a side lists in its `Hello` when it was given a token (see `check_peer_token`).
TOKEN_FEATURE: Final = "token"

_U32_MAX = (1 << 32) - 1

U32: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)]
# msgspec bounds only within int64; msgpack itself carries no integer beyond 2**64 - 1.
U64: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
PositiveU32: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=_U32_MAX)]
PositiveU64: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]
Version: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=0xFFFF)]
Name: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Text: TypeAlias = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
Nonce: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]
Proof: TypeAlias = Annotated[bytes, msgspec.Meta(max_length=PROOF_SIZE)]
Measurement: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=MEASUREMENT_SIZE, max_length=MEASUREMENT_SIZE)
]
SlotNumber: TypeAlias = Annotated[int, msgspec.Meta(ge=0, lt=KVM_USER_MEM_SLOTS)]
SevState: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=SEV_GUEST_STATE_SENT)]
RefuseCodeText: TypeAlias = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9-]{0,31}$")]
DeviceBlob: TypeAlias = Annotated[bytes, msgspec.Meta(max_length=MAX_DEVICE_BLOB_BYTES)]
#: One range of guest pages the guest has made shared (plaintext): (guest physical address,
#: number of 4 KiB pages).
SharedRegion: TypeAlias = tuple[U64, PositiveU64]

#: How the guest is protected. `plain`: no SEV, registers move in `Switchover`. `sev`: the
#: encryption context moves with KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, registers are readable and
#: move in `Switchover`. `sev-es`: registers live in the encrypted VMSA and move only with the
#: context.
Mode: TypeAlias = Literal["plain", "sev", "sev-es"]


class ProtocolError(Exception):
    """The handoff protocol was broken. Its message says how, for the operator's log."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (or nothing we can decode)."""


class _Violation(Exception):
    """Raised inside the machine; `send` re-raises it as Local, `receive` as Remote."""


class Role(enum.Enum):
    """Which end of the handoff this machine plays."""

    SOURCE = "source"  # the old VMM: connects, gives the guest away
    TARGET = "target"  # the new VMM: listens, takes the guest

    @property
    def peer(self) -> Role:
        return Role.TARGET if self is Role.SOURCE else Role.SOURCE


class State(enum.Enum):
    """The conversation state: where both sides are, named after the last message exchanged."""

    START = "start"  # nothing exchanged yet
    HELLO = "hello"  # the source's Hello
    GREETED = "greeted"  # both Hellos: version agreed
    DESCRIBED = "described"  # Describe: the target prepares its VM
    PREPARED = "prepared"  # Prepared: the target VM is in escrow; the source may pause
    SWITCHED_OVER = "switched-over"  # Switchover: the source is paused, its VM fd sent
    MOVED = "moved"  # Moved: the target holds the guest, not yet running it
    COMMITTED = "committed"  # Commit: the commit point
    DONE = "done"  # Resumed: the handoff is complete
    REFUSED = "refused"  # a side sent Refuse
    CLOSED = "closed"  # the peer is gone (EOF)
    ERROR = "error"  # the protocol was broken; sticky


#: States in which the conversation is still going on.
LIVE_STATES: Final = frozenset(
    {
        State.START,
        State.HELLO,
        State.GREETED,
        State.DESCRIBED,
        State.PREPARED,
        State.SWITCHED_OVER,
        State.MOVED,
        State.COMMITTED,
    }
)


class Recovery(enum.Enum):
    """What a side must do about the guest when the connection ends (see the module docstring).

    Source values: NOTHING_TO_DO, ROLLBACK, RESUME_OR_RECLAIM, FENCE_THEN_RECLAIM, RECLAIM, DONE.
    Target values: ABORT, TAKEOVER, DONE.
    """

    NOTHING_TO_DO = "nothing-to-do"  # source: never paused; keep running
    ROLLBACK = "rollback"  # source: resume own VM (if paused), drop the escrow
    RESUME_OR_RECLAIM = "resume-or-reclaim"  # source: resume own VM, or reclaim on EIO
    FENCE_THEN_RECLAIM = "fence-then-reclaim"  # source: freeze the target, read what it sent
    RECLAIM = "reclaim"  # source: move the guest back from the escrowed target VM
    ABORT = "abort"  # target: drop everything and exit
    TAKEOVER = "takeover"  # target: the source is gone: complete the move and resume
    DONE = "done"  # both: the handoff completed


class RefuseCode(enum.StrEnum):
    """The usual `Refuse.code` values. The wire accepts any short lowercase word, so that an
    older release can still print a newer release's refusal."""

    VERSION = "version"  # no common protocol version
    INCOMPATIBLE = "incompatible"  # guest-visible configuration differs
    CREDENTIALS = "credentials"  # the peer's uid is not allowed
    AUTH = "auth"  # token missing or wrong
    BUSY = "busy"  # a handoff is already under way, or the VMM is not ready
    TIMEOUT = "timeout"  # the peer took too long for a step
    INTERNAL = "internal"  # this side failed (a KVM call, a bug)


# --------------------------------------------------------------------------------------------
# Messages. Each is one datagram; `type` names it on the wire. Every field is bounded, so that
# decoding fails cleanly (msgspec.ValidationError) on anything a peer could send.
# --------------------------------------------------------------------------------------------


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    def nfds(self) -> int:
        """How many fds travel with this message (SCM_RIGHTS, in the same datagram)."""
        return 0


class Hello(_Message, frozen=True, kw_only=True, tag="hello"):
    """Step 1, both ways: who we are and which protocol versions we speak.

    The source sends `chosen_version=None`; the target answers with the version it chose
    (`HandoffConnection.make_hello` fills the version fields). `nonce` is the token challenge
    for the peer; `proof` (target only) answers the source's nonce, empty without a token.
    """

    min_version: Version
    max_version: Version
    chosen_version: Version | None = None
    vm_name: Name
    vm_uuid: uuid.UUID
    features: Annotated[tuple[Name, ...], msgspec.Meta(max_length=MAX_FEATURES)] = ()
    nonce: Nonce
    proof: Proof = b""


class MemfdSlot(msgspec.Struct, frozen=True, kw_only=True):
    """One guest memory slot. The i-th slot of a `Describe` is backed by the i-th fd of its
    datagram, mapped from `offset` in that memfd."""

    slot: SlotNumber
    guest_phys_addr: U64
    size: PositiveU64
    offset: U64


class SevContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the source's VMM knows of the guest's SEV context (for logs and checks)."""

    handle: U32  # the firmware's guest handle
    state: SevState  # firmware guest state (SEV_GUEST_STATE_*), normally RUNNING
    measurement: Measurement | None = None  # the launch measurement, when the VMM kept it


class Describe(_Message, frozen=True, kw_only=True, tag="describe"):
    """Step 2, source -> target: the guest-visible configuration and the guest's memory.

    fds: one memfd per entry of `slots`, in order, then the listening QMP control socket.
    `proof` answers the target's token nonce (empty without a token).
    """

    vcpus: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)]
    memory_bytes: PositiveU64  # the sum of the slot sizes
    slots: Annotated[tuple[MemfdSlot, ...], msgspec.Meta(min_length=1, max_length=MAX_SLOTS)]
    mode: Mode
    policy: U32  # the SEV guest policy (0 for plain)
    line_every: PositiveU32  # guest parameters, from its launch image
    flip_every: PositiveU32
    sev: SevContext | None = None  # present exactly for sev and sev-es
    host_flags: Annotated[dict[Name, Text], msgspec.Meta(max_length=MAX_HOST_FLAGS)] = (
        msgspec.field(default_factory=dict)
    )  # the source's flags, for the target's log
    proof: Proof = b""
    # The copy baseline (plain mode only): no memfd crosses; the source streams guest memory
    # into fresh memfds of the target during the blackout, as a VMM without fd passing does.
    copy_memory: bool = False

    def nfds(self) -> int:
        return (0 if self.copy_memory else len(self.slots)) + 1


class Prepared(_Message, frozen=True, kw_only=True, tag="prepared"):
    """Step 4, target -> source. fd: the target's VM, held by the source as escrow until
    `Resumed`: while the source holds it, the target VM (and a context moved into it) lives.
    With `stream` (the copy baseline), a second fd: a stream socket for guest memory."""

    stream: bool = False

    def nfds(self) -> int:
        return 2 if self.stream else 1


class VcpuStateWire(msgspec.Struct, frozen=True, kw_only=True):
    """One vCPU's state as version 3 carries it: opaque to the protocol, named by the
    hypervisor backend that wrote it and its format version (the target's backend checks
    both before loading it)."""

    backend: Name
    version: U32
    blob: Annotated[bytes, msgspec.Meta(max_length=MAX_VCPU_STATE_BYTES)]


VcpuStates: TypeAlias = Annotated[tuple[VcpuStateWire, ...], msgspec.Meta(max_length=MAX_VCPUS)]


class Switchover(_Message, frozen=True, kw_only=True, tag="switchover"):
    """Step 6, source -> target, sent after the pause. fds: the source's VM, then (version 3,
    with `vcpu_states_memfd`) the sealed memfd holding the vCPU states.

    The vCPU state, for plain and sev, one entry per vCPU in order; none for sev-es (the
    registers are in the VMSA and move with the context):

    * versions 1 and 2: `regs` (struct kvm_regs); `vcpu_states` and `vcpu_states_memfd` absent.
    * version 3: no `regs`; either `vcpu_states` inline, or `vcpu_states_memfd`, the size in
      bytes of a sealed memfd (F_SEAL_SHRINK|GROW|WRITE|SEAL) whose whole content is
      `encode_vcpu_states` of them, when inline they would make the datagram too large.

    `paused_at_ns` is CLOCK_MONOTONIC at the pause (one host, one clock), so the target can
    measure the blackout.
    """

    doorbell_sum: U32
    shared_regions: Annotated[
        tuple[SharedRegion, ...], msgspec.Meta(max_length=MAX_SHARED_REGIONS)
    ] = ()
    device_blobs: Annotated[dict[Name, DeviceBlob], msgspec.Meta(max_length=MAX_DEVICE_BLOBS)] = (
        msgspec.field(default_factory=dict)
    )  # opaque state of further devices, by device name
    regs: Annotated[tuple[Regs, ...], msgspec.Meta(max_length=MAX_VCPUS)] | None
    paused_at_ns: U64
    vcpu_states: VcpuStates | None = None
    vcpu_states_memfd: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPU_STATES_BYTES)] | None = None

    def nfds(self) -> int:
        return 1 if self.vcpu_states_memfd is None else 2


class Moved(_Message, frozen=True, kw_only=True, tag="moved"):
    """Step 8, target -> source: the target holds the guest (context moved, registers and
    devices restored) and waits for `Commit`."""


class Commit(_Message, frozen=True, kw_only=True, tag="commit"):
    """Step 8, source -> target: the commit point. After it only `Resumed` may follow."""


class TargetTimings(msgspec.Struct, frozen=True, kw_only=True):
    """What the target measured (version 2). Durations in ns; `resumed_at_ns` is
    CLOCK_MONOTONIC when it released its vCPUs, so `resumed_at_ns - Switchover.paused_at_ns`
    is the blackout."""

    prepare_ns: U64  # Describe received -> Prepared sent
    restore_ns: U64  # Switchover received -> Moved sent
    commit_wait_ns: U64  # Moved sent -> Commit received
    resumed_at_ns: U64


class Resumed(_Message, frozen=True, kw_only=True, tag="resumed"):
    """Step 9, target -> source, sent *before* the target's vCPUs run. The source drops the
    escrow and exits. `timings` is present in version 2 and absent in version 1."""

    timings: TargetTimings | None = None


class Refuse(_Message, frozen=True, kw_only=True, tag="refuse"):
    """Either side, at any state before `Commit`: the handoff stops. `code` is a `RefuseCode`
    value (or a newer word), `reason` a sentence an operator can act on."""

    code: RefuseCodeText
    reason: Text


Message: TypeAlias = Hello | Describe | Prepared | Switchover | Moved | Commit | Resumed | Refuse

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final[msgspec.msgpack.Decoder[Message]] = msgspec.msgpack.Decoder(Message)
# What msgspec may raise on a value it cannot encode (e.g. an int beyond 64 bits).
_ENCODE_ERRORS: Final = (msgspec.MsgspecError, TypeError, ValueError, OverflowError)


def decode(data: bytes) -> Message:
    """Decode one datagram without a connection (for tools and logs).

    Raises:
        RemoteProtocolError: the bytes are not a valid message.
    """
    try:
        return _decode(data)
    except _Violation as exc:
        raise RemoteProtocolError(str(exc)) from None


_vcpu_states_decoder: Final = msgspec.msgpack.Decoder(VcpuStates)


def encode_vcpu_states(states: Iterable[VcpuStateWire]) -> bytes:
    """The content of a version-3 vCPU-state memfd (see `Switchover`)."""
    return _encoder.encode(tuple(states))


def decode_vcpu_states(data: bytes, describe: Describe) -> tuple[VcpuStateWire, ...]:
    """Read the content of a version-3 vCPU-state memfd received with `Switchover`, for the
    guest that `describe` announced: one bounded state per vCPU.

    Raises:
        RemoteProtocolError: too large, not valid, or not one state per vCPU.
    """
    if len(data) > MAX_VCPU_STATES_BYTES:
        raise RemoteProtocolError(
            f"a {len(data)}-byte vCPU state memfd exceeds the {MAX_VCPU_STATES_BYTES}-byte limit"
        )
    try:
        states = _vcpu_states_decoder.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed vCPU states in the memfd: {exc}") from None
    if describe.mode == "sev-es" or len(states) != describe.vcpus:
        raise RemoteProtocolError(
            f"the vCPU state memfd holds {len(states)} states for a {describe.mode} guest "
            f"of {describe.vcpus} vCPUs"
        )
    return states


def _decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise _Violation(f"a {len(data)}-byte message exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        return _decoder.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError) as exc:
        raise _Violation(f"malformed message: {exc}") from None


@dataclass(frozen=True)
class PeerGone:
    """The event `receive(None)` returns: the peer closed the connection or died.

    `lost_in` is the state in which the conversation ended (the state at the EOF, or, for a
    connection already refused or done, the state it ended in); `recovery` is what to do now.
    """

    lost_in: State
    recovery: Recovery


# --------------------------------------------------------------------------------------------
# The transition table.
#
# TRANSITIONS[sender][state][message type] -> the conversation state after that message.
#
# Only live states appear, and in each one only the messages its sender may send. Both machines
# read the same table: `send` under our role, `receive` under the peer's. Apart from Refuse the
# two sides strictly alternate, so every live state has exactly one sender of an ordinary
# message. Refuse is allowed to both sides in every state before Commit; after Commit nothing
# but Resumed. Races of Refuse with an ordinary message are handled in HandoffConnection
# (see the module docstring), not here.
# --------------------------------------------------------------------------------------------

TRANSITIONS: Final[dict[Role, dict[State, dict[type[_Message], State]]]] = {
    Role.SOURCE: {
        State.START: {Hello: State.HELLO, Refuse: State.REFUSED},
        State.HELLO: {Refuse: State.REFUSED},
        State.GREETED: {Describe: State.DESCRIBED, Refuse: State.REFUSED},
        State.DESCRIBED: {Refuse: State.REFUSED},
        State.PREPARED: {Switchover: State.SWITCHED_OVER, Refuse: State.REFUSED},
        State.SWITCHED_OVER: {Refuse: State.REFUSED},
        State.MOVED: {Commit: State.COMMITTED, Refuse: State.REFUSED},
        State.COMMITTED: {},
    },
    Role.TARGET: {
        State.START: {Refuse: State.REFUSED},
        State.HELLO: {Hello: State.GREETED, Refuse: State.REFUSED},
        State.GREETED: {Refuse: State.REFUSED},
        State.DESCRIBED: {Prepared: State.PREPARED, Refuse: State.REFUSED},
        State.PREPARED: {Refuse: State.REFUSED},
        State.SWITCHED_OVER: {Moved: State.MOVED, Refuse: State.REFUSED},
        State.MOVED: {Refuse: State.REFUSED},
        State.COMMITTED: {Resumed: State.DONE},
    },
}

# The failure rules of DESIGN.md section 4, by the state in which the connection ended.
_SOURCE_RECOVERY: Final = {
    State.START: Recovery.NOTHING_TO_DO,
    State.HELLO: Recovery.NOTHING_TO_DO,
    State.GREETED: Recovery.NOTHING_TO_DO,
    State.DESCRIBED: Recovery.NOTHING_TO_DO,
    State.PREPARED: Recovery.ROLLBACK,
    State.SWITCHED_OVER: Recovery.RESUME_OR_RECLAIM,
    State.MOVED: Recovery.RESUME_OR_RECLAIM,
    State.COMMITTED: Recovery.FENCE_THEN_RECLAIM,  # RECLAIM once the target is silent
    State.DONE: Recovery.DONE,
}
# The target takes over only from a source that is gone, and only once it holds the source VM.
_TARGET_TAKEOVER_STATES: Final = frozenset({State.SWITCHED_OVER, State.MOVED, State.COMMITTED})


def recovery_for(
    role: Role, ended_in: State, *, peer_lost: bool, we_refused: bool = False
) -> Recovery:
    """The failure rule for a connection that ended in `ended_in`.

    Args:
        role: our role.
        ended_in: the last live state (or DONE) before the connection ended.
        peer_lost: True if it ended because the peer went away (EOF), or the peer can send
            nothing more and all it sent was received (the source's shell froze the target
            and drained the connection: `HandoffConnection.fenced`); False if a side
            refused or broke the protocol, or we gave up waiting (the peer may be alive and
            will recover on its own side, or, after `Commit`, may have resumed the guest).
        we_refused: the conversation ended with our own `Refuse` (the target: our step failed
            before we held the guest).

    Returns:
        What to do about the guest; see `Recovery` and the module docstring.

    Raises:
        ValueError: `ended_in` is not a live state or DONE.
    """
    if ended_in is not State.DONE and ended_in not in LIVE_STATES:
        raise ValueError(f"a connection cannot end in state {ended_in.name}")
    if role is Role.SOURCE:
        if ended_in is State.COMMITTED and peer_lost:
            # Nothing more can come: a Resumed would have been read before the EOF.
            return Recovery.RECLAIM
        return _SOURCE_RECOVERY[ended_in]
    if ended_in is State.DONE:
        return Recovery.DONE
    if ended_in in _TARGET_TAKEOVER_STATES and (peer_lost or not we_refused):
        # Whatever ended it, the source may be gone: taking over from a dead source is the
        # guest's only way on (the shell does it only once the source's process is gone).
        return Recovery.TAKEOVER
    return Recovery.ABORT


# --------------------------------------------------------------------------------------------
# Token challenge (pure helpers; the shell supplies nonces and consumes the one-time token).
# --------------------------------------------------------------------------------------------

_PROOF_LABELS: Final = {Role.SOURCE: b"handoff source proof", Role.TARGET: b"handoff target proof"}


def token_proof(token: bytes, peer_nonce: bytes, prover: Role) -> bytes:
    """The answer of `prover` to the peer's nonce: HMAC-SHA256(token, peer_nonce || label).

    The role label keeps a proof from being reflected back as the other role's answer.
    """
    return hmac.new(token, peer_nonce + _PROOF_LABELS[prover], hashlib.sha256).digest()


def verify_token_proof(token: bytes, our_nonce: bytes, prover: Role, proof: bytes) -> bool:
    """Whether `proof` is `prover`'s correct answer to our nonce (constant-time compare)."""
    return hmac.compare_digest(token_proof(token, our_nonce, prover), proof)


def check_peer_token(
    token: bytes | None,
    *,
    our_nonce: bytes,
    peer_role: Role,
    peer_features: Collection[str],
    peer_proof: bytes,
) -> Refuse | None:
    """Check the peer's answer to the token challenge.

    The source calls it on the target's `Hello` (`peer_proof=hello.proof`) before sending
    `Describe`; the target on `Describe.proof` before using anything the source sent. A side
    with a token lists `TOKEN_FEATURE` in its `Hello`, so a mismatch in configuration is
    refused as clearly as a wrong token.

    Args:
        token: our token, or None if we were given none.
        our_nonce: the nonce of our own `Hello`, which the peer answered.
        peer_role: the role of the peer (the prover).
        peer_features: the `features` of the peer's `Hello`.
        peer_proof: the peer's answer.

    Returns:
        None if the peer is accepted, else the `Refuse` (code "auth") to send.
    """
    peer = peer_role.value
    peer_has_token = TOKEN_FEATURE in peer_features
    if token is None:
        if not peer_has_token:
            return None
        return Refuse(
            code=RefuseCode.AUTH,
            reason=f"the {peer} requires a handoff token and this side was given none: "
            "pass the same token to both VMMs",
        )
    if not peer_has_token:
        return Refuse(
            code=RefuseCode.AUTH,
            reason=f"this side requires a handoff token and the {peer} was given none: "
            "pass the same token to both VMMs",
        )
    if not verify_token_proof(token, our_nonce, peer_role, peer_proof):
        return Refuse(
            code=RefuseCode.AUTH,
            reason=f"the {peer}'s token proof does not match: the two VMMs were given "
            "different tokens (or the token was already used)",
        )
    return None


# --------------------------------------------------------------------------------------------
# The machine.
# --------------------------------------------------------------------------------------------


class _Ending(enum.Enum):
    COMPLETED = "completed"
    REFUSED = "refused"
    PEER_LOST = "peer-lost"
    ERROR = "error"


class HandoffConnection:
    """One side of one handoff connection, as a pure state machine.

    Args:
        role: `Role.SOURCE` (old VMM, connects) or `Role.TARGET` (new VMM, listens).
        max_version: the newest protocol version we speak (pin to 1 to play an old release).
        min_version: the oldest protocol version we accept.

    Raises:
        ValueError: the version range is empty or outside what this module implements.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_version: int = PROTOCOL_MAX_VERSION,
        min_version: int = PROTOCOL_MIN_VERSION,
    ) -> None:
        if not PROTOCOL_MIN_VERSION <= min_version <= max_version <= PROTOCOL_MAX_VERSION:
            raise ValueError(
                f"protocol versions {min_version}..{max_version} are not a range within the "
                f"supported {PROTOCOL_MIN_VERSION}..{PROTOCOL_MAX_VERSION}"
            )
        self.our_role: Final = role
        self.their_role: Final = role.peer
        self.min_version: Final = min_version
        self.max_version: Final = max_version
        #: The negotiated protocol version, once known (target: after the source's Hello,
        #: None if there is no common version; source: after the target's Hello).
        self.version: int | None = None
        self.our_hello: Hello | None = None
        self.peer_hello: Hello | None = None
        #: The Describe exchanged (sent by the source, received by the target).
        self.description: Describe | None = None
        #: The Refuse that ended the conversation, and who sent it.
        self.refusal: Refuse | None = None
        self.refused_by: Role | None = None
        self._state = State.START
        # The state before our last message while we wait for the peer's answer: the peer may
        # not have read that message yet, so its Refuse may still come from this state.
        self._peer_may_lag_in: State | None = None
        # After we refused: the conversation as the peer sees it, not having read our Refuse.
        self._peer_view: State | None = None
        self._ended_in: State | None = None
        self._ending: _Ending | None = None
        self._peer_silent = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def ended_in(self) -> State | None:
        """The last live state (or DONE) before the conversation ended; None while live."""
        return self._ended_in

    def recovery(self) -> Recovery:
        """What to do about the guest now (see `recovery_for`).

        Once the connection has ended (refused, peer gone, protocol error, done) this is the
        rule for the state it ended in; while it is live, the rule for giving up now: for the
        target, the source counts as lost (its shell takes over only from a source whose
        process is gone); for the source, the target does not, until it is `fenced`.
        """
        if self._ended_in is None:
            lost = self.our_role is Role.TARGET or self._peer_silent
            return recovery_for(self.our_role, self._state, peer_lost=lost)
        lost = self._ending is _Ending.PEER_LOST or self._peer_silent
        return recovery_for(
            self.our_role,
            self._ended_in,
            peer_lost=lost,
            we_refused=self.refused_by is self.our_role,
        )

    def may_refuse(self) -> bool:
        """Whether we may send `Refuse` now (a side may not once `Commit` crossed, nor twice)."""
        return Refuse in TRANSITIONS[self.our_role].get(self._state, {})

    def fenced(self, queued: Iterable[tuple[bytes | None, int]]) -> Recovery:
        """Executing `Recovery.FENCE_THEN_RECLAIM`: the shell froze the peer (SIGSTOP), so it
        can send nothing more, and read every datagram it had queued (bytes and fd count; None
        for EOF). Each is taken as `receive` would; the recovery that follows is returned:
        `DONE` if a `Resumed` was among them (the target runs the guest; leave it running),
        else `RECLAIM` (the guest never ran on the target).

        Unlike `receive`, this accepts the target's `Resumed` even after the conversation broke
        after `Commit` (the target sent something else first, say): the target does not know
        that it broke anything, and runs the guest once it has sent `Resumed`.
        """
        for data, nfds in queued:
            if self._state is State.ERROR:
                if self._late_resumed(data, nfds) is not None:
                    break
                continue
            if self._state in (State.DONE, State.CLOSED):
                break  # nothing more is read
            with contextlib.suppress(RemoteProtocolError):
                self.receive(data, nfds)
        self._peer_silent = True
        return self.recovery()

    def undelivered(self) -> Recovery:
        """The transport could not deliver the message we sent last (a SEQPACKET datagram is
        sent whole or not at all, so the peer never read it): the conversation ends in the
        state before that message, with the peer lost, and the recovery for it is returned.

        This is how the target's failed `Resumed` is decided: it ends in COMMITTED, so
        TAKEOVER, which the shell does only once the source's process is gone; a source that
        lives never saw `Resumed` and takes the guest back (it fences the target first, and
        the target has not let a vCPU run). A `Refuse` that could not be sent changes nothing.
        """
        before = self._peer_may_lag_in
        if before is None:
            raise LocalProtocolError("no message of ours is waiting to be read by the peer")
        if self.refused_by is self.our_role:
            return self.recovery()
        self._ended_in = before
        self._ending = _Ending.PEER_LOST
        self._state = State.CLOSED
        self._peer_may_lag_in = None
        return self.recovery()

    # ---- building messages ------------------------------------------------------------------

    def make_hello(
        self,
        *,
        vm_name: str,
        vm_uuid: uuid.UUID,
        nonce: bytes,
        features: Collection[str] = (),
        proof: bytes = b"",
    ) -> Hello:
        """Our `Hello`, with this connection's version range (and, for the target, the
        negotiated version).

        Raises:
            LocalProtocolError: the target has not received the source's Hello yet, or there
                is no common version (send `version_refusal()` instead).
        """
        chosen: int | None = None
        if self.our_role is Role.TARGET:
            if self.peer_hello is None:
                raise LocalProtocolError("the target answers the source's Hello: receive it first")
            if self.version is None:
                raise LocalProtocolError(
                    "no common protocol version with the source: send version_refusal()"
                )
            chosen = self.version
        return Hello(
            min_version=self.min_version,
            max_version=self.max_version,
            chosen_version=chosen,
            vm_name=vm_name,
            vm_uuid=vm_uuid,
            features=tuple(features),
            nonce=nonce,
            proof=proof,
        )

    def version_refusal(self) -> Refuse | None:
        """For the target after the source's Hello: the Refuse to send when the two version
        ranges do not overlap (naming both), or None when they do."""
        if self.our_role is not Role.TARGET or self.peer_hello is None or self.version is not None:
            return None
        hello = self.peer_hello
        return Refuse(
            code=RefuseCode.VERSION,
            reason=f"no common handoff protocol version: the source speaks versions "
            f"{hello.min_version}..{hello.max_version}, the target "
            f"{self.min_version}..{self.max_version}; run a handoff release on the target "
            "that speaks the source's protocol",
        )

    # ---- the two inputs ---------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send `message` now, advance, and return the datagram's bytes.

        The caller attaches `message.nfds()` fds (in the order the message documents).

        Raises:
            LocalProtocolError: the message is not allowed in this state, or not valid (the
                check is the one the peer applies); the connection is then in ERROR.
        """
        if self._state is State.ERROR:
            raise LocalProtocolError("the connection already failed; it cannot send")
        try:
            new_state = self._next_state(self.our_role, message)
            self._check(self.our_role, message)
            try:
                data = _encoder.encode(message)
            except _ENCODE_ERRORS as exc:
                raise _Violation(f"{type(message).__name__} cannot be encoded: {exc}") from None
            _decode(data)  # enforce the bounds the peer will enforce
        except _Violation as exc:
            self._fail()
            raise LocalProtocolError(str(exc)) from None
        self._apply(self.our_role, message, new_state)
        return data

    def receive(self, data: bytes | None, nfds: int = 0) -> Message | PeerGone:
        """Take one datagram from the peer (or None: the peer is gone) and advance.

        Args:
            data: the datagram's bytes, or None for EOF (the peer exited or died).
            nfds: how many fds arrived with it.

        Returns:
            The message, or `PeerGone` for EOF. After we refused, a message that crossed our
            `Refuse` is returned too (close its fds; it changes nothing).

        Raises:
            RemoteProtocolError: the datagram breaks the protocol; the connection is then in
                ERROR (and every later call raises).
        """
        if self._state is State.ERROR:
            raise RemoteProtocolError("the connection already failed; nothing more is accepted")
        if data is None:
            self._end(self._state, _Ending.PEER_LOST)
            self._state = State.CLOSED
            assert self._ended_in is not None
            return PeerGone(lost_in=self._ended_in, recovery=self.recovery())
        try:
            message = _decode(data)
            if self._state is State.REFUSED and self.refused_by is self.our_role:
                self._receive_crossing(message, nfds)
                return message
            new_state = self._next_state(self.their_role, message)
            self._check_fds(message, nfds)
            self._check(self.their_role, message)
        except _Violation as exc:
            self._fail()
            raise RemoteProtocolError(str(exc)) from None
        self._apply(self.their_role, message, new_state)
        return message

    # ---- internals --------------------------------------------------------------------------

    def _next_state(self, sender: Role, message: Message) -> State:
        allowed = TRANSITIONS[sender].get(self._state, {})
        new_state = allowed.get(type(message))
        if new_state is not None:
            return new_state
        if (
            isinstance(message, Refuse)
            and sender is self.their_role
            and self._peer_may_lag_in is not None
            and Refuse in TRANSITIONS[sender][self._peer_may_lag_in]
        ):
            return State.REFUSED
        expected = ", ".join(t.__name__ for t in allowed) or "nothing"
        raise _Violation(
            f"the {sender.value} may not send {type(message).__name__} in state "
            f"{self._state.name} (it may send: {expected})"
        )

    def _late_resumed(self, data: bytes | None, nfds: int) -> Resumed | None:
        """The one exception to a sticky ERROR: a source whose conversation broke after
        `Commit` (the target sent something else first, say) still learns of the target's
        `Resumed`, found while fencing: the target runs the guest, so the handoff is DONE."""
        if not (
            self.our_role is Role.SOURCE
            and self._ended_in is State.COMMITTED
            and data is not None
            and nfds == 0
        ):
            return None
        try:
            message = _decode(data)
            if not isinstance(message, Resumed):
                return None
            self._check(self.their_role, message)
        except _Violation:
            return None
        self._state = State.DONE
        self._ended_in = State.DONE
        self._ending = _Ending.COMPLETED
        return message

    def _receive_crossing(self, message: Message, nfds: int) -> None:
        """After our Refuse: accept what the peer may send before it reads it."""
        assert self._peer_view is not None
        allowed = TRANSITIONS[self.their_role].get(self._peer_view, {})
        new_view = allowed.get(type(message))
        if new_view is None:
            raise _Violation(
                f"the {self.their_role.value} sent {type(message).__name__} after we refused "
                f"in state {self._peer_view.name}"
            )
        self._check_fds(message, nfds)
        self._check(self.their_role, message)
        self._peer_view = new_view

    @staticmethod
    def _check_fds(message: Message, nfds: int) -> None:
        if nfds != message.nfds():
            raise _Violation(
                f"{type(message).__name__} must carry {message.nfds()} fds, "
                f"the datagram carried {nfds}"
            )

    def _check(self, sender: Role, message: Message) -> None:
        """The rules that depend on more than one field, or on earlier messages."""
        if isinstance(message, Hello):
            self._check_hello(sender, message)
        elif isinstance(message, Describe):
            _check_describe(message)
        elif isinstance(message, Prepared):
            assert self.description is not None  # the table puts Describe before Prepared
            if message.stream != self.description.copy_memory:
                raise _Violation(
                    "Prepared must carry a memory stream exactly when Describe asked to copy memory"
                )
        elif isinstance(message, Switchover):
            assert self.description is not None  # the table puts Describe before Switchover
            _check_switchover(self.description, message, self.version)
        elif isinstance(message, Resumed):
            if self.version == 1 and message.timings is not None:
                raise _Violation("Resumed carries no timings in protocol version 1")
            if self.version is not None and self.version >= 2 and message.timings is None:
                raise _Violation(f"Resumed must carry timings in protocol version {self.version}")

    def _check_hello(self, sender: Role, hello: Hello) -> None:
        if hello.min_version > hello.max_version:
            raise _Violation(
                f"the {sender.value}'s version range {hello.min_version}..{hello.max_version} "
                "is empty"
            )
        if sender is self.our_role and (hello.min_version, hello.max_version) != (
            self.min_version,
            self.max_version,
        ):
            raise _Violation(
                f"our Hello must carry this connection's versions "
                f"{self.min_version}..{self.max_version}: build it with make_hello()"
            )
        if sender is Role.SOURCE:
            if hello.chosen_version is not None:
                raise _Violation("the source's Hello chooses no version; the target does")
            return
        chosen = hello.chosen_version
        if chosen is None:
            raise _Violation("the target's Hello must carry the chosen version")
        if sender is self.our_role:
            if self.version is None:
                raise _Violation("no common protocol version: send version_refusal()")
            if chosen != self.version:
                raise _Violation(f"the target must choose version {self.version}, not {chosen}")
            return
        if not (
            hello.min_version <= chosen <= hello.max_version
            and self.min_version <= chosen <= self.max_version
        ):
            raise _Violation(
                f"the target chose protocol version {chosen}, outside the source's range "
                f"{self.min_version}..{self.max_version} or its own "
                f"{hello.min_version}..{hello.max_version}"
            )

    def _apply(self, sender: Role, message: Message, new_state: State) -> None:
        old_state = self._state
        if isinstance(message, Hello):
            if sender is self.our_role:
                self.our_hello = message
            else:
                self.peer_hello = message
            if sender is Role.SOURCE and self.our_role is Role.TARGET:
                low = max(message.min_version, self.min_version)
                high = min(message.max_version, self.max_version)
                self.version = high if low <= high else None
            elif sender is Role.TARGET:
                self.version = message.chosen_version
        elif isinstance(message, Describe):
            self.description = message
        elif isinstance(message, Refuse):
            self.refusal = message
            self.refused_by = sender
            self._end(old_state, _Ending.REFUSED)
            if sender is self.our_role:
                self._peer_view = old_state
        self._state = new_state
        if new_state is State.DONE:
            self._end(State.DONE, _Ending.COMPLETED)
        self._peer_may_lag_in = old_state if sender is self.our_role else None

    def _end(self, state: State, how: _Ending) -> None:
        if self._ended_in is None:
            self._ended_in = state
            self._ending = how

    def _fail(self) -> None:
        self._end(self._state, _Ending.ERROR)
        self._state = State.ERROR


def _check_describe(describe: Describe) -> None:
    total = sum(slot.size for slot in describe.slots)
    if total != describe.memory_bytes:
        raise _Violation(
            f"Describe says {describe.memory_bytes} bytes of memory, its slots add up to {total}"
        )
    numbers = [slot.slot for slot in describe.slots]
    if len(set(numbers)) != len(numbers):
        raise _Violation(f"Describe lists a memory slot twice: {sorted(numbers)}")
    if describe.copy_memory and describe.mode != "plain":
        raise _Violation(
            "copying memory is for plain guests only: an encrypted guest's memory cannot be "
            "copied into another context without the SEV send/receive commands"
        )
    if (describe.mode == "plain") != (describe.sev is None):
        raise _Violation(
            f"Describe in mode {describe.mode} must "
            + ("not " if describe.mode == "plain" else "")
            + "carry SEV context information"
        )


def _check_switchover(describe: Describe, switchover: Switchover, version: int | None) -> None:
    if version is not None and version >= VCPU_STATES_VERSION:
        _check_vcpu_states(describe, switchover, version)
        return
    if switchover.vcpu_states is not None or switchover.vcpu_states_memfd is not None:
        raise _Violation(
            f"Switchover carries no vcpu_states in protocol version {version} "
            f"(registers go in regs; opaque vCPU states need version {VCPU_STATES_VERSION})"
        )
    if describe.mode == "sev-es":
        if switchover.regs is not None:
            raise _Violation("Switchover carries no registers for sev-es (they are in the VMSA)")
    elif switchover.regs is None or len(switchover.regs) != describe.vcpus:
        got = "none" if switchover.regs is None else len(switchover.regs)
        raise _Violation(
            f"Switchover in mode {describe.mode} must carry registers for each of the "
            f"{describe.vcpus} vCPUs, it carries {got}"
        )


def _check_vcpu_states(describe: Describe, switchover: Switchover, version: int) -> None:
    if switchover.regs is not None:
        raise _Violation(
            f"Switchover carries no regs in protocol version {version}: vCPU state goes in "
            "vcpu_states (or its memfd)"
        )
    inline, memfd = switchover.vcpu_states, switchover.vcpu_states_memfd
    if describe.mode == "sev-es":
        if inline is not None or memfd is not None:
            raise _Violation("Switchover carries no vCPU state for sev-es (it is in the VMSA)")
        return
    if inline is not None and memfd is not None:
        raise _Violation("Switchover carries vCPU states either inline or in a memfd, not both")
    if memfd is not None:
        return  # the count is checked when the memfd is read (decode_vcpu_states)
    if inline is None or len(inline) != describe.vcpus:
        got = "none" if inline is None else len(inline)
        raise _Violation(
            f"Switchover in mode {describe.mode} must carry a vCPU state for each of the "
            f"{describe.vcpus} vCPUs (inline or in a memfd), it carries {got}"
        )
