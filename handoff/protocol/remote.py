"""Cross-host SEV live migration as a pure state machine: messages, order, framing, recovery.

DESIGN.md section 8 and reference/sev-live-migration.md, as far as they can be decided without
I/O. Sans-IO like `handoff.protocol.local`: no sockets, no trio, no clocks, no randomness, no
firmware. The shell (the migrate command, over `handoff.transport.tcp`) calls the firmware
(PDH_CERT_EXPORT, SEND_*, RECEIVE_*) and carries what they take and give as opaque bytes in
these messages; this machine decides what may be sent when, checks every field, and says what
to do with the guest when the conversation ends.

Theory of operation
===================

One TCP connection with mutual TLS; the source (the VMM that runs the guest) connects, the target
listens. One msgpack message per frame. Both machines track one *conversation state*, named
after the last message exchanged; in every live state one side sends the next ordinary message
(`TRANSITIONS`), the only exception being the page stream, where the source sends many frames in
one state::

    source                                      target
    Hello          ------------------>                          START -> HELLO
                   <------------------  Hello (chosen version)  GREETED
    Describe       ------------------>                          DESCRIBED
                   <------------------  PlatformChain           CERTIFIED  (PDH_CERT_EXPORT)
    (chain_refusal: the owner's allow-list of platforms, the policy's API version)
    (SEND_START)
    SendStart      ------------------>                          STARTED    (RECEIVE_START)
    Round n        ------------------>                          PRECOPY    (guest runs)
    EncryptedPages* / SharedPage* --->                                     (RECEIVE_UPDATE_DATA)
    RoundEnd n     ------------------>                          STARTED    ... more rounds
    (pause)
    StopAndCopy    ------------------>                          STOP_AND_COPY (guest paused)
    EncryptedPages* / SharedPage* --->
    RoundEnd       ------------------>                          COPIED
    DeviceState    ------------------>                          DEVICES
    VcpuState * vcpus  -------------->
    Finish         ------------------>                          FINISHED
                   <------------------  Received                RECEIVED   (holds, unrunnable)
    (SEND_FINISH: the commit point)
    Commit         ------------------>                          COMMITTED  (RECEIVE_FINISH)
                   <------------------  Resumed                 DONE       (then vCPUs run)

The commit point
----------------

SEND_FINISH makes the source's guest SENT: the firmware never lets it run again (ACTIVATE is
refused). RECEIVE_FINISH makes the target's RUNNING. So at every instant at most one copy can
run if, and only if, the target never calls RECEIVE_FINISH before the source called
SEND_FINISH, and the source calls SEND_FINISH only once the target holds everything:

* `Received` is the target's promise: every page, the device state and the registers arrived
  and went through RECEIVE_UPDATE_DATA; it holds the guest *unrunnable* (RUPDATE) and will not
  give it up on its own. After `Received` the target may not cancel.
* The source answers `Received` with SEND_FINISH and then `Commit` (SEND_FINISH first: a
  source that fails it is still SUPDATE, so it sends SEND_CANCEL and `Cancel` instead). A
  source may cancel up to `Commit`.
* The target calls RECEIVE_FINISH only on `Commit`, and sends `Resumed` before its vCPUs run.

A failure after `Received` and before `Commit` arrives leaves the target *in doubt*: the source
may have cancelled and resumed, or be SENT. It holds the guest (`Recovery.HOLD`) until the
source's decision reaches it; the source is never in doubt, because its firmware state is the
decision. See `RECOVERY`.

The decision travels on a new connection when the first one broke: a source built with
`RemoteConnection.resolver(session_id, decision)` sends `Resolve` ("commit" if it is SENT,
"cancel" if it resumed) after the Hellos, and the target answers `Resolution` with what it did
(`held_outcome`: finish and run, tear down, or "not-held"). A "commit" answered "not-held" is
the one loss the firmware makes unavoidable: the source is SENT and the target lost its copy.

A source that is dead (its host powered off or fenced) delivers nothing, and the target would
hold the guest forever. Only the operator can know that the source host is fenced, so only the
operator decides then (`operator_outcome`): "finish" (RECEIVE_FINISH and run: safe because a
fenced source runs nothing, and a SENT one never would) or "give-up" (tear down; the guest is
lost if the source was SENT). Both decisions, the source's and the operator's, are rows of
`HELD_DECISIONS`. The resolving conversation::

    source (resolver)                           target
    Hello          ------------------>                          START -> HELLO
                   <------------------  Hello                   GREETED
    Resolve        ------------------>                          RESOLVING (acts on it)
                   <------------------  Resolution              RESOLVED

Framing that the firmware does not provide
------------------------------------------

A firmware packet (52-byte header: flags, IV, MAC; and the page's ciphertext) is MACed with the
session's TIK, but the MAC binds neither the guest address nor a sequence number (reference
1.5): within one session a packet can be reordered, duplicated, dropped or written to another
page, and the firmware accepts it. So every page frame carries the session id (derived from the
SEND_START session blob: `session_id_of`), the guest physical address of each page and a
sequence number, and the receiving machine refuses, before anything reaches
RECEIVE_UPDATE_DATA:

* a frame of another session (a spliced or replayed stream);
* a sequence number other than the next one (reordered, duplicated or dropped frames; a drop
  at the end of a round is caught by `RoundEnd.pages`);
* a page outside the guest's memory slots, or not page-aligned;
* a guest address sent twice in one round;
* a firmware header whose IV was seen before in this session: the firmware draws a fresh IV
  for every packet, so a repeated IV is a packet sent again, whatever address its frame names
  (a retargeted packet);
* a firmware packet for a page the round's shared-region list says is shared, or a plaintext
  page for one it says is private. The source's machine refuses to *send* the latter too: a
  private page never leaves in the clear because of a bug in the shell.

Private pages travel in batches, one frame each (`EncryptedPages`: 1 to `MAX_BATCH_PAGES`
pages, page i numbered `seq + i`), shared pages one a frame (`SharedPage`); sequence numbers
and `RoundEnd.pages` count pages, not frames. Every page of a batch goes through every check
above, in order, a repeat within the batch included, and the refusal names the first page that
fails (its index in the frame and its address); a batch is accepted whole or not at all.

The session is burnt: a target records `session_id` (durably) before it calls RECEIVE_START,
and a target machine constructed with those records (`burnt_sessions`) refuses a `SendStart`
of a recorded session. The firmware would receive one stream twice and run two copies
(reference 1.3, RECEIVE_START): this is the only place that stops it.

Cancel, errors and endings
--------------------------

Either side may send `Cancel` (a code and a sentence) while it may still cancel: the source
until it sends `Commit`, the target until it sends `Received`. Because those are prefixes of
the conversation and each direction is ordered, a peer's `Cancel` always arrives in a state in
which the peer was allowed to send it. After we cancelled, the peer's messages that crossed
ours are decoded and returned (so the shell can drop them) but change nothing.

`receive(None)` means the connection ended (EOF or reset): an ordinary input. A message that
breaks the rules raises `RemoteProtocolError` and the connection is in the sticky ERROR state;
a message we try to send against the rules raises `LocalProtocolError`. The shell reports a
timeout or a failure of its own step with `give_up`. What to do then is `recovery()`, a row of
the table `RECOVERY`.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import struct
import uuid
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Annotated, Final, Literal, TypeAlias

import msgspec

from handoff.protocol.local import (
    MAX_DEVICE_BLOB_BYTES,
    MAX_DEVICE_BLOBS,
    MAX_FEATURES,
    MAX_HOST_FLAGS,
    MAX_NAME_LENGTH,
    MAX_SHARED_REGIONS,
    MAX_SLOTS,
    MAX_TEXT_LENGTH,
    MAX_VCPUS,
    LocalProtocolError,
    Mode,
    ProtocolError,
    RemoteProtocolError,
    Role,
    VcpuStateWire,
)

__all__ = [
    "CERT_SIZE",
    "FW_HEADER_SIZE",
    "HELD_DECISIONS",
    "LIVE_STATES",
    "MAX_AMD_CERTS_BYTES",
    "MAX_BATCH_PAGES",
    "MAX_MESSAGE_BYTES",
    "MAX_ROUNDS",
    "PAGE_SIZE",
    "PROGRESS",
    "PROTOCOL_MAX_VERSION",
    "PROTOCOL_MIN_VERSION",
    "RECOVERY",
    "SESSION_ID_SIZE",
    "SESSION_SIZE",
    "TRANSITIONS",
    "Cancel",
    "CancelCode",
    "Commit",
    "Decider",
    "Decision",
    "Describe",
    "DeviceState",
    "EncryptedPages",
    "Ending",
    "Finish",
    "Hello",
    "LocalProtocolError",
    "MemorySlot",
    "Message",
    "NotMigratable",
    "OperatorDecision",
    "Outcome",
    "PeerGone",
    "PlatformChain",
    "ProtocolError",
    "Received",
    "Recovery",
    "RecoveryPlan",
    "RemoteConnection",
    "RemoteProtocolError",
    "Resolution",
    "Resolve",
    "Resumed",
    "Role",
    "Round",
    "RoundEnd",
    "SendStart",
    "SharedPage",
    "State",
    "StopAndCopy",
    "VcpuState",
    "chain_refusal",
    "decode",
    "held_outcome",
    "migration_refusal",
    "operator_outcome",
    "parse_platform_id",
    "platform_chain",
    "platform_id",
    "platform_refusal",
    "recovery_for",
    "session_id_of",
]

#: Version 2: private pages travel in batches (`EncryptedPages`), where version 1 sent one frame
#: per page; a peer of version 1 is refused at Hello (`version_refusal`).
PROTOCOL_MIN_VERSION: Final = 2
PROTOCOL_MAX_VERSION: Final = 2

# ---- sizes of the firmware's objects (reference 1.1, 1.3, 1.5; KVM's limits 1.6) ---------------

PAGE_SIZE: Final = 4096  # KVM moves one 4 KiB page per SEND/RECEIVE_UPDATE_DATA
FW_HEADER_SIZE: Final = 52  # packet header: flags u32 | IV 16 B | MAC 32 B
FW_IV_OFFSET: Final = 4
FW_IV_SIZE: Final = 16
_NO_FLAGS: Final = bytes(4)  # a packet header's flags: none (no compression)
#: A packet header's flags and IV (the MAC skipped), for a batch's headers at once; a header,
#: a page, for cutting a batch into its packets.
_FLAGS_IV: Final = struct.Struct(f"<I{FW_IV_SIZE}s{FW_HEADER_SIZE - FW_IV_OFFSET - FW_IV_SIZE}x")
_HEADER: Final = struct.Struct(f"{FW_HEADER_SIZE}s")
_PAGE: Final = struct.Struct(f"{PAGE_SIZE}s")
SESSION_SIZE: Final = 128  # the SEND_START session blob
CERT_SIZE: Final = 2084  # an SEV certificate (PDH, PEK, OCA, CEK)
#: KVM copies ASK||ARK as one blob of at most SEV_FW_BLOB_MAX_SIZE (reference 1.6, [K3]).
MAX_AMD_CERTS_BYTES: Final = 0x4000
SESSION_ID_SIZE: Final = 16

# SEV certificate fields (struct sev_cert, reference 1.4 [F2]): u32 version at 0, api_major and
# api_minor at 4 and 5, u32 pub_key_usage at 8, all little-endian.
CERT_VERSION: Final = 1
CERT_USAGE: Final = {"pdh": 0x1003, "pek": 0x1002, "oca": 0x1001, "cek": 0x1004}
_USAGE_NAMES: Final = {
    0x0: "ARK",
    0x13: "ASK",
    0x1001: "OCA",
    0x1002: "PEK",
    0x1003: "PDH",
    0x1004: "CEK",
}

# AMD certificates (ASK, ARK; AMD_CERT as sev-tool writes it out): u32 version at 0, u32 key
# usage at 0x24, u32 public exponent and modulus sizes in bits at 0x38 and 0x3C, a 64-byte
# header, then exponent, modulus and the signature (as long as the modulus).
AMD_CERT_HEADER_SIZE: Final = 64
AMD_USAGE: Final = {"ask": 0x13, "ark": 0x0}

# Guest policy bits (reference 1.4).
POLICY_ES: Final = 1 << 2
POLICY_NOSEND: Final = 1 << 3
POLICY_DOMAIN: Final = 1 << 4
POLICY_SEV: Final = 1 << 5

# ---- bounds of this protocol -------------------------------------------------------------------

#: The most private pages one `EncryptedPages` frame carries (the source sends batches of 30).
MAX_BATCH_PAGES: Final = 64
#: The largest message either side sends or accepts: a full batch of private pages is about
#: 260 KiB (64 pages, their headers and addresses), the platform chain about 25 KiB, a vCPU
#: state at most 64 KiB and the device state 64 KiB.
MAX_MESSAGE_BYTES: Final = 320 * 1024
MAX_ROUNDS: Final = 10_000
MAX_VCPU_STATE_BYTES: Final = 64 * 1024
#: Guest physical addresses are below 2**52 on x86-64 (MAXPHYADDR).
MAX_GPA: Final = 1 << 52

_U32_MAX = (1 << 32) - 1
U32: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=_U32_MAX)]
U64: TypeAlias = Annotated[int, msgspec.Meta(ge=0)]
PositiveU32: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=_U32_MAX)]
Gpa: TypeAlias = Annotated[int, msgspec.Meta(ge=0, lt=MAX_GPA, multiple_of=PAGE_SIZE)]
PageCount: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=MAX_GPA // PAGE_SIZE)]
Version: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=0xFFFF)]
Name: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Text: TypeAlias = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
RoundNumber: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROUNDS)]
SessionId: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=SESSION_ID_SIZE, max_length=SESSION_ID_SIZE)
]
Cert: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=CERT_SIZE, max_length=CERT_SIZE)]
AmdCert: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_AMD_CERTS_BYTES)]
SessionBlob: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=SESSION_SIZE, max_length=SESSION_SIZE)
]
FwHeader: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=FW_HEADER_SIZE, max_length=FW_HEADER_SIZE)
]
PageBytes: TypeAlias = Annotated[bytes, msgspec.Meta(min_length=PAGE_SIZE, max_length=PAGE_SIZE)]
#: A batch's fields: 1..MAX_BATCH_PAGES addresses, and as many headers and pages concatenated
#: (that their lengths agree with the addresses is `_check_pages`'s, with a sentence).
BatchGpas: TypeAlias = Annotated[
    tuple[Gpa, ...], msgspec.Meta(min_length=1, max_length=MAX_BATCH_PAGES)
]
BatchHeaders: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=FW_HEADER_SIZE, max_length=MAX_BATCH_PAGES * FW_HEADER_SIZE)
]
BatchData: TypeAlias = Annotated[
    bytes, msgspec.Meta(min_length=PAGE_SIZE, max_length=MAX_BATCH_PAGES * PAGE_SIZE)
]
CancelCodeText: TypeAlias = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9-]{0,31}$")]
DeviceBlob: TypeAlias = Annotated[bytes, msgspec.Meta(max_length=MAX_DEVICE_BLOB_BYTES)]
#: (guest physical address, number of 4 KiB pages) the guest made shared (plaintext).
SharedRegion: TypeAlias = tuple[Gpa, PageCount]
SharedRegions: TypeAlias = Annotated[
    tuple[SharedRegion, ...], msgspec.Meta(max_length=MAX_SHARED_REGIONS)
]


class NotMigratable(ProtocolError):
    """The guest cannot migrate between hosts; raised at the source before anything is sent.
    The message names why and says that the guest keeps running where it is."""


class _Violation(Exception):
    """Raised inside the machine; `send` re-raises it as Local, `receive` as Remote."""


class State(enum.Enum):
    """The conversation state, named after the last message exchanged."""

    START = "start"
    HELLO = "hello"  # the source's Hello
    GREETED = "greeted"  # both Hellos: version agreed
    DESCRIBED = "described"  # Describe: the guest the source offers
    CERTIFIED = "certified"  # PlatformChain: the target's PDH chain
    STARTED = "started"  # SendStart, or a RoundEnd: the session is open, between rounds
    PRECOPY = "precopy"  # Round: pages of a live round (the guest runs on the source)
    STOP_AND_COPY = "stop-and-copy"  # StopAndCopy: the last pages (the guest is paused)
    COPIED = "copied"  # the last RoundEnd: all memory sent
    DEVICES = "devices"  # DeviceState, then one VcpuState per vCPU
    FINISHED = "finished"  # Finish: the source sent everything
    RECEIVED = "received"  # Received: the target holds the guest, unrunnable
    COMMITTED = "committed"  # Commit: the source is SENT (SEND_FINISH)
    DONE = "done"  # Resumed: the guest runs on the target
    CANCELLED = "cancelled"  # a side sent Cancel
    RESOLVING = "resolving"  # Resolve: the source's decision for a guest the target holds
    RESOLVED = "resolved"  # Resolution: the target acted on it
    CLOSED = "closed"  # the connection ended (EOF or reset)
    ERROR = "error"  # the protocol was broken, or the shell gave up; sticky


#: The conversation in order (the states a connection passes through when all goes well).
PROGRESS: Final = (
    State.START,
    State.HELLO,
    State.GREETED,
    State.DESCRIBED,
    State.CERTIFIED,
    State.STARTED,
    State.PRECOPY,
    State.STOP_AND_COPY,
    State.COPIED,
    State.DEVICES,
    State.FINISHED,
    State.RECEIVED,
    State.COMMITTED,
    State.DONE,
)
LIVE_STATES: Final = (frozenset(PROGRESS) - {State.DONE}) | {State.RESOLVING}


class CancelCode(enum.StrEnum):
    """The usual `Cancel.code` values (the wire accepts any short lowercase word)."""

    VERSION = "version"  # no common protocol version
    INCOMPATIBLE = "incompatible"  # the target cannot host this guest
    UNSUPPORTED = "unsupported"  # the guest cannot migrate this way (SEV-ES, NOSEND)
    POLICY = "policy"  # the target's chain does not satisfy the guest policy
    FIRMWARE = "firmware"  # a SEND_*/RECEIVE_* command failed
    REPLAY = "replay"  # the session was received before
    TIMEOUT = "timeout"  # the peer took too long
    OPERATOR = "operator"  # migrate-cancel
    INTERNAL = "internal"  # this side failed


# ---------------------------------------------------------------------------------------------
# Messages. One per frame; `type` names it. Every field is bounded, so that decoding fails
# cleanly (msgspec.ValidationError) on anything a peer could send.
# ---------------------------------------------------------------------------------------------


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class Hello(_Message, frozen=True, kw_only=True, tag="sev-hello"):
    """Both ways, first: the protocol versions we speak (the target adds its choice) and the
    guest's name and uuid (for both sides' logs and records)."""

    min_version: Version
    max_version: Version
    chosen_version: Version | None = None
    vm_name: Name
    vm_uuid: uuid.UUID
    features: Annotated[tuple[Name, ...], msgspec.Meta(max_length=MAX_FEATURES)] = ()


class MemorySlot(msgspec.Struct, frozen=True, kw_only=True):
    """One guest memory slot: no memfd crosses hosts, the target makes its own of this size."""

    slot: Annotated[int, msgspec.Meta(ge=0, lt=32764)]  # < KVM_USER_MEM_SLOTS
    guest_phys_addr: Gpa
    size: Annotated[int, msgspec.Meta(ge=PAGE_SIZE, le=MAX_GPA, multiple_of=PAGE_SIZE)]


class Describe(_Message, frozen=True, kw_only=True, tag="sev-describe"):
    """Source -> target: the guest-visible configuration, and the request for the target's
    platform certificate chain (answered by `PlatformChain`, or `Cancel`)."""

    vcpus: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)]
    memory_bytes: Annotated[int, msgspec.Meta(ge=PAGE_SIZE)]  # the sum of the slot sizes
    slots: Annotated[tuple[MemorySlot, ...], msgspec.Meta(min_length=1, max_length=MAX_SLOTS)]
    mode: Mode
    policy: U32  # the SEV guest policy
    line_every: PositiveU32  # guest parameters, from its launch image
    flip_every: PositiveU32
    host_flags: Annotated[dict[Name, Text], msgspec.Meta(max_length=MAX_HOST_FLAGS)] = (
        msgspec.field(default_factory=dict)
    )


class PlatformChain(_Message, frozen=True, kw_only=True, tag="sev-platform-chain"):
    """Target -> source: the target platform's certificates (PDH_CERT_EXPORT, and AMD's ASK and
    ARK for its chip), which SEND_START takes: PDH, PEK||OCA||CEK, ASK||ARK. Built from those
    three blobs with `platform_chain`."""

    pdh: Cert
    pek: Cert
    oca: Cert
    cek: Cert
    ask: AmdCert
    ark: AmdCert

    @property
    def plat_certs(self) -> bytes:
        """PEK || OCA || CEK, SEND_START's platform chain."""
        return self.pek + self.oca + self.cek

    @property
    def amd_certs(self) -> bytes:
        """ASK || ARK, SEND_START's AMD chain."""
        return self.ask + self.ark


class SendStart(_Message, frozen=True, kw_only=True, tag="sev-send-start"):
    """Source -> target: SEND_START's outputs, which RECEIVE_START takes: the session blob
    (wrapped TEK/TIK), the source platform's PDH certificate, and the guest policy."""

    session: SessionBlob
    source_pdh: Cert
    policy: U32


class Round(_Message, frozen=True, kw_only=True, tag="sev-round"):
    """Source -> target: a pre-copy round begins (the guest runs on the source). Its page frames
    follow, then `RoundEnd`. `shared_regions` is the shared-region list, read after this
    round's dirty log (reference section 2, Sean's rule), complete and sorted: a page in it
    travels as `SharedPage`, any other in an `EncryptedPages`."""

    round: RoundNumber
    shared_regions: SharedRegions = ()


class StopAndCopy(_Message, frozen=True, kw_only=True, tag="sev-stop-and-copy"):
    """Source -> target: the source paused the guest; the last round begins (as `Round`). Its
    `shared_regions` is the guest's list at the pause, the one the target keeps."""

    round: RoundNumber
    shared_regions: SharedRegions = ()


class EncryptedPages(_Message, frozen=True, kw_only=True, tag="sev-pages"):
    """Source -> target: 1..MAX_BATCH_PAGES private pages as SEND_UPDATE_DATA gave them (each
    one's firmware packet header and the page encrypted with the transport keys), in handoff's
    framing, one frame for the batch. Page i is the guest page at `gpas[i]`, numbered `seq + i`;
    its header is `headers[52 i : 52 (i + 1)]`, its ciphertext `data[4096 i : 4096 (i + 1)]`
    (`packets()` cuts them)."""

    session: SessionId
    seq: U64  # the first page's sequence number
    gpas: BatchGpas
    headers: BatchHeaders
    data: BatchData

    def packets(self) -> list[tuple[int, bytes, bytes]]:
        """(gpa, header, ciphertext) of each page, in order: what RECEIVE_UPDATE_DATA takes.
        For a batch whose lengths agree with its addresses (one the machine accepted); any
        other raises ValueError (`struct.error`)."""
        return [
            (gpa, header, data)
            for gpa, (header,), (data,) in zip(
                self.gpas,
                _HEADER.iter_unpack(self.headers),
                _PAGE.iter_unpack(self.data),
                strict=True,
            )
        ]


class SharedPage(_Message, frozen=True, kw_only=True, tag="sev-shared-page"):
    """Source -> target: one shared page, in plaintext (the guest made it shared)."""

    session: SessionId
    seq: U64
    gpa: Gpa
    data: PageBytes


class RoundEnd(_Message, frozen=True, kw_only=True, tag="sev-round-end"):
    """Source -> target: the round is over; `pages` pages were sent in it (a batch of private
    pages counts as many as it carries)."""

    round: RoundNumber
    pages: U64


class DeviceState(_Message, frozen=True, kw_only=True, tag="sev-device-state"):
    """Source -> target, after the last round: host-side device state. One `VcpuState` per
    vCPU follows, in order."""

    doorbell_sum: U32
    device_blobs: Annotated[dict[Name, DeviceBlob], msgspec.Meta(max_length=MAX_DEVICE_BLOBS)] = (
        msgspec.field(default_factory=dict)
    )


class VcpuState(_Message, frozen=True, kw_only=True, tag="sev-vcpu-state"):
    """Source -> target: one vCPU's registers (SEV: readable with KVM_GET_REGS and the rest),
    opaque to the protocol like version 3 of the local one."""

    index: Annotated[int, msgspec.Meta(ge=0, lt=MAX_VCPUS)]
    state: VcpuStateWire


class Finish(_Message, frozen=True, kw_only=True, tag="sev-finish"):
    """Source -> target: everything was sent: `rounds` rounds (the last one stop-and-copy) of
    `pages` pages in all. The target answers `Received` (or `Cancel`)."""

    rounds: RoundNumber
    pages: U64


class Received(_Message, frozen=True, kw_only=True, tag="sev-received"):
    """Target -> source: everything arrived and went through RECEIVE_UPDATE_DATA; the target
    holds the guest unrunnable and will RECEIVE_FINISH on `Commit`. It may not cancel now."""

    session: SessionId


class Commit(_Message, frozen=True, kw_only=True, tag="sev-commit"):
    """Source -> target: SEND_FINISH succeeded; the source is SENT and can never run the guest
    again. The commit point."""

    session: SessionId


class Resumed(_Message, frozen=True, kw_only=True, tag="sev-resumed"):
    """Target -> source: RECEIVE_FINISH succeeded and the guest is restored; sent before the
    target's vCPUs run. The source tears down its SENT VM."""

    session: SessionId


class Cancel(_Message, frozen=True, kw_only=True, tag="sev-cancel"):
    """Either side, while it may cancel: the migration stops. `code` is a `CancelCode` value
    (or a newer word), `reason` a sentence an operator can act on."""

    code: CancelCodeText
    reason: Text


Decision: TypeAlias = Literal["commit", "cancel"]
#: The operator's decision for a guest a target holds in doubt, once the source host is
#: fenced (`operator_outcome`); who decided (`HELD_DECISIONS`).
OperatorDecision: TypeAlias = Literal["finish", "give-up"]
Decider: TypeAlias = Literal["source", "operator"]
Outcome: TypeAlias = Literal["resumed", "torn-down", "not-held"]


class Resolve(_Message, frozen=True, kw_only=True, tag="sev-resolve"):
    """Source -> target, on a new connection, after the Hellos: the source's decision for a
    session whose conversation broke after `Received` (`Recovery.HOLD` at the target):
    "commit" (the source is SENT: Commit re-delivered) or "cancel" (the source resumed)."""

    session: SessionId
    decision: Decision


class Resolution(_Message, frozen=True, kw_only=True, tag="sev-resolution"):
    """Target -> source: what the target did with the session (`held_outcome`): "resumed"
    (it runs the guest, now or already), "torn-down" (it dropped the held guest), or
    "not-held" (it holds no such session: never received whole, torn down, or lost)."""

    session: SessionId
    outcome: Outcome


Message: TypeAlias = (
    Hello
    | Describe
    | PlatformChain
    | SendStart
    | Round
    | StopAndCopy
    | EncryptedPages
    | SharedPage
    | RoundEnd
    | DeviceState
    | VcpuState
    | Finish
    | Received
    | Commit
    | Resumed
    | Cancel
    | Resolve
    | Resolution
)

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final[msgspec.msgpack.Decoder[Message]] = msgspec.msgpack.Decoder(Message)
_ENCODE_ERRORS: Final = (msgspec.MsgspecError, TypeError, ValueError, OverflowError)


def _decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise _Violation(f"a {len(data)}-byte message exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        return _decoder.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError) as exc:
        raise _Violation(f"malformed message: {exc}") from None


def _encode(message: Message) -> bytes:
    try:
        return _encoder.encode(message)
    except _ENCODE_ERRORS as exc:
        raise _Violation(f"{type(message).__name__} cannot be encoded: {exc}") from None


_U64_MAX: Final = (1 << 64) - 1


def _page_in_bounds(page: EncryptedPages | SharedPage) -> bool:
    """Whether a page frame's fields are of their declared types and within their bounds
    (`SessionId`, `U64`, `Gpa`, `PageBytes`; a batch's `BatchGpas`, `BatchHeaders`,
    `BatchData`): what decoding its frame would prove. False says only that this quick look
    cannot tell: the decoder then decides."""
    seq = page.seq
    if not (
        type(page.session) is bytes
        and len(page.session) == SESSION_ID_SIZE
        and type(seq) is int
        and 0 <= seq <= _U64_MAX
        and type(page.data) is bytes
    ):
        return False
    if isinstance(page, SharedPage):
        gpa = page.gpa
        return (
            type(gpa) is int
            and 0 <= gpa < MAX_GPA
            and not gpa % PAGE_SIZE
            and len(page.data) == PAGE_SIZE
        )
    gpas, headers = page.gpas, page.headers
    return (
        type(gpas) is tuple
        and 1 <= len(gpas) <= MAX_BATCH_PAGES
        and all(type(gpa) is int and 0 <= gpa < MAX_GPA and not gpa % PAGE_SIZE for gpa in gpas)
        and type(headers) is bytes
        and FW_HEADER_SIZE <= len(headers) <= MAX_BATCH_PAGES * FW_HEADER_SIZE
        and PAGE_SIZE <= len(page.data) <= MAX_BATCH_PAGES * PAGE_SIZE
    )


def decode(data: bytes) -> Message:
    """Decode one frame without a connection (for tools and logs).

    Raises:
        RemoteProtocolError: the bytes are not a valid message.
    """
    try:
        return _decode(data)
    except _Violation as exc:
        raise RemoteProtocolError(str(exc)) from None


def session_id_of(session: bytes) -> bytes:
    """The id of a migration session: a digest of the SEND_START session blob.

    The blob holds a fresh nonce and the wrapped transport keys, so every SEND_START gives a new
    id, and a replay of a session necessarily carries the same blob (RECEIVE_START refuses any
    other: its MAC), hence the same id. The id is not a secret: the blob is wrapped."""
    return hashlib.sha256(b"handoff sev migration session\0" + session).digest()[:SESSION_ID_SIZE]


# ---------------------------------------------------------------------------------------------
# Checks that need no connection.
# ---------------------------------------------------------------------------------------------


def _policy_api(policy: int) -> tuple[int, int]:
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


def migration_refusal(describe: Describe) -> str | None:
    """Why this guest cannot migrate between hosts (None if it can). The source checks it
    before it sends anything; the target checks it again on `Describe`."""
    keeps = "; the guest keeps running where it is"
    if describe.mode == "plain":
        return (
            "cross-host migration is for SEV guests: a plain guest has no SEND/RECEIVE "
            "firmware path here (use an intra-host handoff)" + keeps
        )
    if describe.mode == "sev-es" or describe.policy & POLICY_ES:
        return (
            "an SEV-ES guest cannot migrate between hosts through upstream KVM: its registers "
            "live in the encrypted VMSA, and KVM has no SEND_UPDATE_VMSA/RECEIVE_UPDATE_VMSA "
            "ioctl (the firmware commands exist, the kernel does not expose them); use an "
            "intra-host handoff, or a guest-assisted migration helper when one is supported" + keeps
        )
    if describe.policy & POLICY_NOSEND:
        return (
            f"the guest's SEV policy {describe.policy:#x} sets NOSEND (bit 3): its owner "
            "forbade migration and SEND_START would fail with POLICY_FAILURE" + keeps
        )
    return None


def _amd_cert_size(blob: bytes) -> int | None:
    """The size an AMD_CERT's header announces (None: too short to say)."""
    if len(blob) < AMD_CERT_HEADER_SIZE:
        return None
    exp_bits = int.from_bytes(blob[0x38:0x3C], "little")
    mod_bits = int.from_bytes(blob[0x3C:0x40], "little")
    return AMD_CERT_HEADER_SIZE + exp_bits // 8 + 2 * (mod_bits // 8)


def platform_chain(pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> PlatformChain:
    """The target's `PlatformChain` from PDH_CERT_EXPORT's two blobs (PDH; PEK||OCA||CEK) and
    the AMD chain ASK||ARK, split where the ASK's header says it ends.

    Raises:
        LocalProtocolError: a blob is not of the shape SEND_START takes (says which).
    """
    if len(plat_certs) != 3 * CERT_SIZE:
        raise LocalProtocolError(
            f"PEK||OCA||CEK is {len(plat_certs)} bytes, expected {3 * CERT_SIZE} (three "
            f"{CERT_SIZE}-byte certificates, as PDH_CERT_EXPORT gives them)"
        )
    ask_size = _amd_cert_size(amd_certs)
    if ask_size is None or not 0 < ask_size < len(amd_certs):
        raise LocalProtocolError(
            f"ASK||ARK ({len(amd_certs)} bytes) does not start with an AMD certificate whose "
            "header gives its size: AMD's ASK and ARK for this chip are expected"
        )
    return PlatformChain(
        pdh=pdh,
        pek=plat_certs[:CERT_SIZE],
        oca=plat_certs[CERT_SIZE : 2 * CERT_SIZE],
        cek=plat_certs[2 * CERT_SIZE :],
        ask=amd_certs[:ask_size],
        ark=amd_certs[ask_size:],
    )


def _check_amd_cert(name: str, cert: bytes) -> None:
    size = _amd_cert_size(cert)
    if size != len(cert):
        raise _Violation(
            f"the {name.upper()} is {len(cert)} bytes, its header says "
            + ("nothing (too short)" if size is None else f"{size}")
            + ": not an AMD certificate, or ASK and ARK were split in the wrong place"
        )
    version = int.from_bytes(cert[0:4], "little")
    usage = int.from_bytes(cert[0x24:0x28], "little")
    if version != CERT_VERSION or usage != AMD_USAGE[name]:
        raise _Violation(
            f"the {name.upper()} slot holds an AMD certificate of version {version} and usage "
            f"{usage:#x}, expected version 1 and usage {AMD_USAGE[name]:#x}: the chain is out "
            "of order"
        )


def _check_cert(name: str, cert: bytes) -> None:
    version = int.from_bytes(cert[0:4], "little")
    usage = int.from_bytes(cert[8:12], "little")
    expected = CERT_USAGE[name]
    if version != CERT_VERSION:
        raise _Violation(
            f"the {name.upper()} certificate has version {version}, not {CERT_VERSION}: not an "
            "SEV certificate (PDH_CERT_EXPORT output is expected)"
        )
    if usage != expected:
        what = _USAGE_NAMES.get(usage, f"unknown usage {usage:#x}")
        raise _Violation(
            f"the {name.upper()} slot holds a certificate of usage {usage:#x} ({what}), "
            f"expected {expected:#x}: the chain is out of order or incomplete"
        )


def chain_refusal(policy: int, chain: PlatformChain) -> str | None:
    """What the source can tell of the target's chain against the guest policy before
    SEND_START (None: let the firmware judge the signatures). With the policy's SEV bit the
    firmware requires the target PEK's API version to be at least the policy's (reference
    1.3); refusing here names it, before the session is opened."""
    if not policy & POLICY_SEV:
        return None
    need = _policy_api(policy)
    have = (chain.pek[4], chain.pek[5])
    if have < need:
        return (
            f"the guest policy {policy:#x} requires SEV firmware API {need[0]}.{need[1]} or "
            f"newer on the target, whose PEK says {have[0]}.{have[1]}: update the target's "
            "SEV firmware or choose another target; the guest keeps running here"
        )
    return None


#: A platform id: SHA-256 of the PDH certificate's header and public key (its first 0x414
#: bytes after the 16-byte header, what the signatures cover: the key that SEND_START wraps the
#: transport keys for). It is what `kvmstub stats` shows as `pdh_fingerprint`.
PLATFORM_ID_HEX_LENGTH: Final = 64
#: The most platform ids an allow-list may hold (a fleet, not a database).
MAX_ALLOWED_PLATFORMS: Final = 1024
_PDH_PUBLIC_START: Final = 16
_PDH_SIGNED_END: Final = 0x414


def platform_id(chain: PlatformChain) -> str:
    """The target platform's id: the hex SHA-256 of its PDH public key field. Only a firmware
    holding that PDH's private key can unwrap a session SEND_START made towards it, so an owner
    who pins the id pins who can read the guest, whatever the policy asks of the chain."""
    return hashlib.sha256(chain.pdh[_PDH_PUBLIC_START:_PDH_SIGNED_END]).hexdigest()


def parse_platform_id(text: str) -> str:
    """A platform id as an owner writes it (64 hex digits, any case, optional surrounding
    blanks), normalised to lower case.

    Raises:
        ValueError: anything else; the message says what an id looks like and where to find one.
    """
    value = text.strip().lower()
    if len(value) != PLATFORM_ID_HEX_LENGTH or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            f"{text.strip()[:80]!r} is not a platform id: 64 hex digits, the SHA-256 of the "
            "target platform's PDH (`kvmstub stats --json` shows it as pdh_fingerprint on the "
            "target host; a refused migration names the one it saw)"
        )
    return value


def platform_refusal(chain: PlatformChain, allowed: Iterable[frozenset[str]]) -> str | None:
    """Why the target's platform is not one the guest's owner allows (None: it is, or no
    list was given). Every list in `allowed` (the VM's own, the migrate command's) must name
    it; an empty one allows any, as without lists."""
    seen = platform_id(chain)
    for ids in allowed:
        if ids and seen not in ids:
            return (
                f"the target's SEV platform {seen} is not in the owner's allow-list of target "
                f"platforms ({len(ids)} allowed): nothing was sent; add it with "
                "--target-platform if this is the host you meant, or choose another target; "
                "the guest keeps running here"
            )
    return None


def _check_describe(describe: Describe) -> None:
    total = sum(slot.size for slot in describe.slots)
    if total != describe.memory_bytes:
        raise _Violation(
            f"Describe says {describe.memory_bytes} bytes of memory, its slots add up to {total}"
        )
    numbers = [slot.slot for slot in describe.slots]
    if len(set(numbers)) != len(numbers):
        raise _Violation(f"Describe lists a memory slot twice: {sorted(numbers)}")
    ranges = sorted((s.guest_phys_addr, s.guest_phys_addr + s.size) for s in describe.slots)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        if start < end:
            raise _Violation(
                f"Describe's memory slots overlap at guest address {start:#x}: each page must "
                "belong to one slot"
            )
    if ranges[-1][1] > MAX_GPA:
        raise _Violation(f"Describe's memory ends at {ranges[-1][1]:#x}, beyond 2**52")
    why = migration_refusal(describe)
    if why is not None:
        raise _Violation(why)


def _check_regions(regions: tuple[tuple[int, int], ...], slots: _Slots) -> None:
    previous_end = -1
    for gpa, pages in regions:
        if gpa < previous_end:
            raise _Violation(
                f"the shared-region list must be sorted and without overlaps: {gpa:#x} begins "
                f"before the previous region ends at {previous_end:#x}"
            )
        end = gpa + pages * PAGE_SIZE
        if not slots.covers(gpa, end):
            raise _Violation(
                f"shared region {gpa:#x}+{pages} pages is not inside one memory slot of the guest"
            )
        previous_end = end


class _Slots:
    """The guest's memory ranges, for finding the slot of an address."""

    def __init__(self, slots: Iterable[MemorySlot]) -> None:
        ranges = sorted((s.guest_phys_addr, s.guest_phys_addr + s.size) for s in slots)
        self._starts = [start for start, _ in ranges]
        self._ends = [end for _, end in ranges]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]


class _Regions:
    """A sorted shared-region list, for asking whether a page is shared."""

    def __init__(self, regions: tuple[tuple[int, int], ...] = ()) -> None:
        self._starts = [gpa for gpa, _ in regions]
        self._ends = [gpa + pages * PAGE_SIZE for gpa, pages in regions]

    def shared(self, gpa: int) -> bool:
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and gpa < self._ends[i]

    def any_in(self, start: int, end: int) -> bool:
        """Whether a page of [start, end) is shared. The regions are sorted and do not
        overlap, so the last one that begins before `end` ends last of those."""
        i = bisect.bisect_left(self._starts, end) - 1
        return i >= 0 and self._ends[i] > start


# ---------------------------------------------------------------------------------------------
# The transition table.
#
# TRANSITIONS[sender][state][message type] -> the state after that message. Only live states
# appear, and in each only what its sender may send. Both machines read the same table: `send`
# under our role, `receive` under the peer's. Cancel: the source in every state up to RECEIVED
# (it may cancel until it sends Commit), the target up to FINISHED (until it sends Received).
# After the Hellos the source sends Describe (a migration) or Resolve (its decision for a
# session the target holds, answered by one Resolution). The checks that need more than the
# message's type (round numbers, sequence numbers, session ids, counts) are in
# RemoteConnection._check.
# ---------------------------------------------------------------------------------------------

_PAGES: Final = (EncryptedPages, SharedPage)

TRANSITIONS: Final[dict[Role, dict[State, dict[type[_Message], State]]]] = {
    Role.SOURCE: {
        State.START: {Hello: State.HELLO, Cancel: State.CANCELLED},
        State.HELLO: {Cancel: State.CANCELLED},
        State.GREETED: {
            Describe: State.DESCRIBED,
            Resolve: State.RESOLVING,
            Cancel: State.CANCELLED,
        },
        State.DESCRIBED: {Cancel: State.CANCELLED},
        State.CERTIFIED: {SendStart: State.STARTED, Cancel: State.CANCELLED},
        State.STARTED: {
            Round: State.PRECOPY,
            StopAndCopy: State.STOP_AND_COPY,
            Cancel: State.CANCELLED,
        },
        State.PRECOPY: {
            EncryptedPages: State.PRECOPY,
            SharedPage: State.PRECOPY,
            RoundEnd: State.STARTED,
            Cancel: State.CANCELLED,
        },
        State.STOP_AND_COPY: {
            EncryptedPages: State.STOP_AND_COPY,
            SharedPage: State.STOP_AND_COPY,
            RoundEnd: State.COPIED,
            Cancel: State.CANCELLED,
        },
        State.COPIED: {DeviceState: State.DEVICES, Cancel: State.CANCELLED},
        State.DEVICES: {
            VcpuState: State.DEVICES,
            Finish: State.FINISHED,
            Cancel: State.CANCELLED,
        },
        State.FINISHED: {Cancel: State.CANCELLED},
        State.RECEIVED: {Commit: State.COMMITTED, Cancel: State.CANCELLED},
        State.COMMITTED: {},
        State.RESOLVING: {},
    },
    Role.TARGET: {
        State.START: {Cancel: State.CANCELLED},
        State.HELLO: {Hello: State.GREETED, Cancel: State.CANCELLED},
        State.GREETED: {Cancel: State.CANCELLED},
        State.DESCRIBED: {PlatformChain: State.CERTIFIED, Cancel: State.CANCELLED},
        State.CERTIFIED: {Cancel: State.CANCELLED},
        State.STARTED: {Cancel: State.CANCELLED},
        State.PRECOPY: {Cancel: State.CANCELLED},
        State.STOP_AND_COPY: {Cancel: State.CANCELLED},
        State.COPIED: {Cancel: State.CANCELLED},
        State.DEVICES: {Cancel: State.CANCELLED},
        State.FINISHED: {Received: State.RECEIVED, Cancel: State.CANCELLED},
        State.RECEIVED: {},
        State.COMMITTED: {Resumed: State.DONE},
        State.RESOLVING: {Resolution: State.RESOLVED},
    },
}


#: The states in which the source streams pages (each page frame leaves the state as it is),
#: read off the table: there `send` and `receive` take a page frame by their page path
#: (`_send_page`; `_check_frame` and `_apply_frame`), without the table's lookups.
_PAGE_STATES: Final = tuple(
    state
    for state, allowed in TRANSITIONS[Role.SOURCE].items()
    if all(allowed.get(kind) is state for kind in _PAGES)
)
_FINISHED_STATES: Final = (State.CANCELLED, State.CLOSED, State.DONE, State.RESOLVED)
_COMPLETED_STATES: Final = (State.DONE, State.RESOLVED)
_ERROR: Final = State.ERROR


# ---------------------------------------------------------------------------------------------
# The recovery table.
# ---------------------------------------------------------------------------------------------


class Ending(enum.Enum):
    """How a conversation ended (besides `COMPLETED`)."""

    PEER_CLOSED = "peer-closed"  # EOF or reset: the peer exited, died, or the network failed
    GARBAGE = "garbage"  # the peer broke the protocol (RemoteProtocolError)
    TIMEOUT = "timeout"  # the peer took too long (the shell's clock)
    CANCELLED = "cancelled"  # the peer sent Cancel
    LOCAL_FAILURE = "local-failure"  # a step of our own failed, or we cancelled
    COMPLETED = "completed"  # Resumed was exchanged


class Recovery(enum.Enum):
    """What a side does about the guest when the conversation ends. The shell's duties for
    each are in `RecoveryPlan.why` and in docs/internals.md."""

    # source
    NOTHING_TO_DO = "nothing-to-do"  # firmware untouched: keep running
    CANCEL_AND_RESUME = "cancel-and-resume"  # SEND_CANCEL (SUPDATE -> RUNNING), resume vCPUs
    DELIVER_COMMIT = "deliver-commit"  # SENT: only the target can run it; tell it Commit
    # target
    DROP = "drop"  # nothing received: drop what was prepared
    TEAR_DOWN = "tear-down"  # DECOMMISSION the half-received guest, free its ASID
    HOLD = "hold"  # keep the guest unrunnable until the source's decision is known
    FINISH_AND_RUN = "finish-and-run"  # RECEIVE_FINISH, restore, send Resumed, run
    GUEST_LOST = "guest-lost"  # the firmware leaves no runnable copy (see why)
    # both
    DONE = "done"


@dataclass(frozen=True)
class RecoveryPlan:
    """One row of `RECOVERY`: the action, and a sentence for the operator's log."""

    recovery: Recovery
    why: str


_SOURCE_BEFORE_SESSION: Final = (
    State.START,
    State.HELLO,
    State.GREETED,
    State.DESCRIBED,
    State.CERTIFIED,
)
_SESSION_OPEN: Final = (
    State.STARTED,
    State.PRECOPY,
    State.STOP_AND_COPY,
    State.COPIED,
    State.DEVICES,
    State.FINISHED,
)
_FAILURES: Final = tuple(e for e in Ending if e is not Ending.COMPLETED)


def _source_plan(state: State, ending: Ending) -> RecoveryPlan:
    if state is State.DONE:
        return RecoveryPlan(Recovery.DONE, "the guest runs on the target; tear down the SENT VM")
    if state in _SOURCE_BEFORE_SESSION:
        return RecoveryPlan(
            Recovery.NOTHING_TO_DO,
            "no SEND_START was issued: the guest keeps running here, untouched",
        )
    if state in (*_SESSION_OPEN, State.RECEIVED):
        return RecoveryPlan(
            Recovery.CANCEL_AND_RESUME,
            "SEND_FINISH was not issued: SEND_CANCEL (SUPDATE -> RUNNING) and resume the guest "
            "here; the target, not having seen Commit, never runs it"
            + (
                ", and holds it until told: send it Cancel, now or on a new connection"
                if state in (State.FINISHED, State.RECEIVED)
                else ""
            ),
        )
    assert state is State.COMMITTED
    return RecoveryPlan(
        Recovery.DELIVER_COMMIT,
        "SEND_FINISH made this copy SENT and the firmware will not run it again: the guest can "
        "only run on the target, which holds it (Received) until it learns of Commit; deliver "
        "Commit (on a new connection if this one "
        + ("closed" if ending is Ending.PEER_CLOSED else "failed")
        + "). If the target no longer holds the session, the guest is lost",
    )


def _target_plan(state: State, ending: Ending) -> RecoveryPlan:
    if state is State.DONE:
        return RecoveryPlan(Recovery.DONE, "the guest runs here")
    if state in _SOURCE_BEFORE_SESSION:
        return RecoveryPlan(
            Recovery.DROP,
            "no RECEIVE_START was issued: drop what was prepared; the source keeps the guest",
        )
    if state in _SESSION_OPEN:
        return RecoveryPlan(
            Recovery.TEAR_DOWN,
            "Received was not sent, so the source never issued SEND_FINISH: DECOMMISSION the "
            "half-received guest and free its ASID; the source cancels and resumes",
        )
    if state is State.RECEIVED:
        if ending is Ending.CANCELLED:
            return RecoveryPlan(
                Recovery.TEAR_DOWN,
                "the source cancelled before SEND_FINISH and resumes the guest: DECOMMISSION "
                "the received guest and free its ASID",
            )
        return RecoveryPlan(
            Recovery.HOLD,
            "in doubt: the source may have cancelled and resumed, or be SENT. Keep the guest "
            "unrunnable (neither RECEIVE_FINISH nor DECOMMISSION) until a decision arrives "
            "(HELD_DECISIONS): the source's on a new connection, Commit -> finish and run, "
            "Cancel -> tear down; or, once the source host is fenced, the operator's: finish "
            "and run, or give up (tear down)",
        )
    assert state is State.COMMITTED
    if ending is Ending.LOCAL_FAILURE:
        return RecoveryPlan(
            Recovery.GUEST_LOST,
            "the guest is lost: the source is SENT (SEND_FINISH) and the firmware refuses to "
            "run it again, and RECEIVE_FINISH or the restore failed here; keep the logs",
        )
    return RecoveryPlan(
        Recovery.FINISH_AND_RUN,
        "the source is SENT: this is the only copy; RECEIVE_FINISH, restore, and run it "
        "whatever became of the connection",
    )


#: RECOVERY[role][state][ending]: what each side does when the conversation ended in `state`
#: (the last live state, or DONE) by `ending`. Complete: every live state and DONE, every
#: ending (COMPLETED only with DONE).
RECOVERY: Final[dict[Role, dict[State, dict[Ending, RecoveryPlan]]]] = {
    role: {
        state: {
            ending: plan(state, ending)
            for ending in (_FAILURES if state is not State.DONE else (*_FAILURES, Ending.COMPLETED))
        }
        for state in PROGRESS
    }
    for role, plan in ((Role.SOURCE, _source_plan), (Role.TARGET, _target_plan))
}


def recovery_for(role: Role, ended_in: State, ending: Ending) -> RecoveryPlan:
    """The row of `RECOVERY` for a conversation that ended in `ended_in` by `ending`.

    Raises:
        ValueError: no conversation ends that way.
    """
    try:
        return RECOVERY[role][ended_in][ending]
    except KeyError:
        raise ValueError(f"a conversation cannot end in {ended_in.name} by {ending.name}") from None


#: What a target does with a session it holds (`Recovery.HOLD`) when a decision reaches it:
#: the source's, on a new connection (`Resolve`), or the operator's, who fenced the source host
#: and tells the target itself (QMP `migrate-resolve`, `handoff resolve`). The one place the
#: fate of a held guest is decided; `held_outcome` and `operator_outcome` read it.
HELD_DECISIONS: Final[dict[tuple[Decider, Decision | OperatorDecision], RecoveryPlan]] = {
    ("source", "commit"): RecoveryPlan(
        Recovery.FINISH_AND_RUN,
        "the source is SENT (Commit, re-delivered): this is the only copy; RECEIVE_FINISH, "
        "restore, and run it",
    ),
    ("source", "cancel"): RecoveryPlan(
        Recovery.TEAR_DOWN,
        "the source cancelled before SEND_FINISH and resumed the guest: DECOMMISSION the held "
        "guest and free its ASID",
    ),
    ("operator", "finish"): RecoveryPlan(
        Recovery.FINISH_AND_RUN,
        "the operator fenced the source host and told this target to finish: a SENT source "
        "never runs the guest again and a dead one took its copy with it, so this is the only "
        "copy; RECEIVE_FINISH, restore, and run it (had the source resumed the guest, two "
        "copies would now run: the operator's fencing is what rules that out)",
    ),
    ("operator", "give-up"): RecoveryPlan(
        Recovery.TEAR_DOWN,
        "the operator told this target to give the held guest up: DECOMMISSION it and free its "
        "ASID; if the source was SENT (it issued SEND_FINISH) the guest is lost",
    ),
}


def operator_outcome(decision: OperatorDecision, held: Recovery | None) -> RecoveryPlan:
    """For the target's shell, on the operator's decision (the source host fenced): what to do.

    Args:
        decision: "finish" (RECEIVE_FINISH and run) or "give-up" (tear down).
        held: the target's plan for its session, as for `held_outcome`: `Recovery.HOLD` (held,
            unrunnable), `FINISH_AND_RUN` or `DONE` (it runs the guest), None (nothing held).

    Raises:
        LocalProtocolError: the target holds no guest in doubt, so there is nothing to decide
            (says why: it runs the guest already, or holds nothing).
    """
    if decision not in ("finish", "give-up"):
        raise LocalProtocolError(f"the operator decides 'finish' or 'give-up', not {decision!r}")
    if held is Recovery.HOLD:
        return HELD_DECISIONS["operator", decision]
    if held in (Recovery.FINISH_AND_RUN, Recovery.DONE):
        raise LocalProtocolError(
            "this target runs the guest already (its source's Commit arrived, or an operator "
            "finished it): there is nothing in doubt to decide"
        )
    raise LocalProtocolError(
        "this target holds no received guest in doubt (it holds a guest only after it said "
        "Received and the connection broke before the source's decision): nothing to decide"
    )


def held_outcome(decision: Decision, held: Recovery | None) -> tuple[Recovery | None, Outcome]:
    """For the target's shell, on `Resolve`: what to do with the session and what to answer.

    Args:
        decision: the source's decision.
        held: the target's plan for that session from its record: `Recovery.HOLD` (held,
            unrunnable), `FINISH_AND_RUN` or `DONE` (it runs the guest already), or None (it
            holds nothing of that session).

    Returns:
        (the plan to execute now, or None for nothing; the `Resolution.outcome` to send).
    """
    if held is Recovery.HOLD:
        plan = HELD_DECISIONS["source", decision].recovery
        return plan, "resumed" if plan is Recovery.FINISH_AND_RUN else "torn-down"
    if held in (Recovery.FINISH_AND_RUN, Recovery.DONE):
        # Only a Commit lets a target run a guest: a "cancel" here is the source's bug, and the
        # source's machine refuses the answer, which names it.
        return None, "resumed"
    return None, "not-held"


def _resolver_plan(decision: Decision, outcome: Outcome | None) -> RecoveryPlan:
    """The source's plan after a resolving conversation (or its failure)."""
    if decision == "cancel":
        return RecoveryPlan(
            Recovery.NOTHING_TO_DO,
            "the source resumed the guest already; "
            + (
                "the target dropped what it held"
                if outcome is not None
                else "retry the Cancel so that the target can free the guest it holds"
            ),
        )
    if outcome is None:
        return RecoveryPlan(
            Recovery.DELIVER_COMMIT,
            "the source is SENT and the target has not confirmed: retry delivering Commit",
        )
    if outcome == "resumed":
        return RecoveryPlan(Recovery.DONE, "the target runs the guest; tear down the SENT VM")
    return RecoveryPlan(
        Recovery.GUEST_LOST,
        "the guest is lost: the source is SENT (SEND_FINISH) and the firmware refuses to run it "
        "again, and the target holds no copy of the session (it died or failed after Received)",
    )


@dataclass(frozen=True)
class PeerGone:
    """What `receive(None)` returns: the connection ended. `lost_in` is the state the
    conversation ended in; `plan` what to do now."""

    lost_in: State
    plan: RecoveryPlan


# ---------------------------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------------------------


class RemoteConnection:
    """One side of one cross-host migration, as a pure state machine.

    Args:
        role: `Role.SOURCE` (runs the guest, connects) or `Role.TARGET` (listens).
        guest: the source's guest (its `Describe`); required for the source, and checked at
            once (`NotMigratable`), so nothing is sent for a guest that cannot migrate.
        burnt_sessions: the target's record of every session id it accepted before (a
            container the shell keeps durably); a `SendStart` of one of them is refused.
        resolving: for a source that only delivers its decision for a held session (use
            `RemoteConnection.resolver`).
        allowed_platforms: the source's allow-lists of target platform ids (`platform_id`):
            each non-empty list must name the target's, or `chain_refusal` refuses it before
            SEND_START; none (or only empty ones) allow any platform.
        max_version, min_version: the protocol versions we speak.

    Raises:
        NotMigratable: the source's guest cannot migrate between hosts (names why).
        ValueError: a source without a guest, a version range outside this module's, or a
            malformed platform id (the message names it).
    """

    def __init__(
        self,
        role: Role,
        *,
        guest: Describe | None = None,
        burnt_sessions: Container[bytes] = frozenset(),
        resolving: Resolve | None = None,
        allowed_platforms: Iterable[Iterable[str]] = (),
        max_version: int = PROTOCOL_MAX_VERSION,
        min_version: int = PROTOCOL_MIN_VERSION,
    ) -> None:
        if not PROTOCOL_MIN_VERSION <= min_version <= max_version <= PROTOCOL_MAX_VERSION:
            raise ValueError(
                f"protocol versions {min_version}..{max_version} are not a range within the "
                f"supported {PROTOCOL_MIN_VERSION}..{PROTOCOL_MAX_VERSION}"
            )
        if resolving is not None and (role is not Role.SOURCE or guest is not None):
            raise ValueError("a resolving connection is the source's, for no new guest")
        if role is Role.SOURCE and resolving is None:
            if guest is None:
                raise ValueError("the source's machine needs the guest's Describe")
            why = migration_refusal(guest)
            if why is not None:
                raise NotMigratable(why)
            try:
                _check_describe(guest)
            except _Violation as exc:
                raise NotMigratable(str(exc)) from None
        self.our_role: Final = role
        self.their_role: Final = role.peer
        self.min_version: Final = min_version
        self.max_version: Final = max_version
        self._burnt = burnt_sessions
        allowed = []
        for ids in allowed_platforms:
            try:
                allowed.append(frozenset(parse_platform_id(i) for i in ids))
            except ValueError as exc:
                raise ValueError(f"allow-list of target platforms: {exc}") from None
            if len(allowed[-1]) > MAX_ALLOWED_PLATFORMS:
                raise ValueError(
                    f"an allow-list of {len(allowed[-1])} target platforms; at most "
                    f"{MAX_ALLOWED_PLATFORMS}"
                )
        #: The owner's allow-lists of target platforms (each non-empty one must name it).
        self.allowed_platforms: Final = tuple(allowed)
        self._guest = guest
        self._resolving = resolving
        #: The source's Resolve (a resolving conversation) and the target's answer.
        self.resolve_request: Resolve | None = None
        self.resolution: Resolution | None = None
        #: The negotiated version, once known.
        self.version: int | None = None
        self.our_hello: Hello | None = None
        self.peer_hello: Hello | None = None
        #: The guest (sent by the source, received by the target).
        self.description: Describe | None = None
        #: The target's chain (received by the source, sent by the target).
        self.chain: PlatformChain | None = None
        #: The session id, from SendStart on. The target's shell records it durably before it
        #: calls RECEIVE_START; it is never accepted again.
        self.session_id: bytes | None = None
        #: The guest's shared-region list as of the last round (the stop-and-copy round's is
        #: the one the target's VMM keeps).
        self.shared_regions: tuple[tuple[int, int], ...] = ()
        self.cancel: Cancel | None = None
        self.cancelled_by: Role | None = None
        self.pages = 0  # page frames in the session so far (the next sequence number)
        self.rounds = 0
        self._slots: _Slots | None = None
        self._regions = _Regions()
        self._round_pages = 0
        self._round_gpas: set[int] = set()
        self._ivs: set[bytes] = set()
        self._batch_ivs: set[bytes] = set()  # the IVs of the batch `_check_pages` passed
        # Whether our frames, or the peer's, are the page stream (the source's).
        self._pages_ours: Final = role is Role.SOURCE
        self._pages_theirs: Final = role.peer is Role.SOURCE
        self._vcpus_done = 0
        self._state = State.START
        self._ended_in: State | None = None
        self._ending: Ending | None = None

    # ---- what the shell reads ---------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def ended_in(self) -> State | None:
        """The last live state (or DONE) before the conversation ended; None while live."""
        return self._ended_in

    @property
    def ending(self) -> Ending | None:
        return self._ending

    def recovery(self) -> RecoveryPlan:
        """What to do about the guest: the row of `RECOVERY` for how the conversation ended;
        while it is live, the row for giving up now because of a failure of our own. A
        resolving conversation has its own plans (`held_outcome` for the target's shell)."""
        if self._resolving is not None:
            outcome = None if self.resolution is None else self.resolution.outcome
            return _resolver_plan(self._resolving.decision, outcome)
        if self.resolve_request is not None:
            return RecoveryPlan(
                Recovery.DROP,
                "this connection carried the source's decision for a held session: execute "
                "held_outcome's plan for that session; nothing else was received",
            )
        if self._ended_in is None or self._ending is None:
            return recovery_for(self.our_role, self._state, Ending.LOCAL_FAILURE)
        return recovery_for(self.our_role, self._ended_in, self._ending)

    def may_cancel(self) -> bool:
        """Whether we may send `Cancel` now (the source until Commit, the target until
        Received)."""
        return Cancel in TRANSITIONS[self.our_role].get(self._state, {})

    # ---- building messages ------------------------------------------------------------------

    def make_hello(
        self, *, vm_name: str, vm_uuid: uuid.UUID, features: Iterable[str] = ()
    ) -> Hello:
        """Our Hello, with this connection's versions (the target's with its choice).

        Raises:
            LocalProtocolError: the target has not received the source's Hello, or there is
                no common version (send `version_refusal()`).
        """
        chosen: int | None = None
        if self.our_role is Role.TARGET:
            if self.peer_hello is None:
                raise LocalProtocolError("the target answers the source's Hello: receive it first")
            if self.version is None:
                raise LocalProtocolError("no common protocol version: send version_refusal()")
            chosen = self.version
        return Hello(
            min_version=self.min_version,
            max_version=self.max_version,
            chosen_version=chosen,
            vm_name=vm_name,
            vm_uuid=vm_uuid,
            features=tuple(features),
        )

    def version_refusal(self) -> Cancel | None:
        """For the target after the source's Hello: the Cancel to send when the version ranges
        do not overlap, or None when they do."""
        if self.our_role is not Role.TARGET or self.peer_hello is None or self.version is not None:
            return None
        hello = self.peer_hello
        return Cancel(
            code=CancelCode.VERSION,
            reason=f"no common SEV migration protocol version: the source speaks "
            f"{hello.min_version}..{hello.max_version}, the target "
            f"{self.min_version}..{self.max_version}; run matching handoff releases",
        )

    @classmethod
    def resolver(cls, session_id: bytes, decision: Decision) -> RemoteConnection:
        """A source connection that only delivers its decision for a session the target
        holds (after Received): `Resolve` follows the Hellos, `Resolution` ends it."""
        return cls(Role.SOURCE, resolving=Resolve(session=session_id, decision=decision))

    def make_resolve(self) -> Resolve:
        """The resolver's Resolve."""
        if self._resolving is None:
            raise LocalProtocolError("only a resolving connection sends Resolve")
        return self._resolving

    def describe(self) -> Describe:
        """The source's Describe (the guest it was built with)."""
        if self._guest is None:
            raise LocalProtocolError("only the source describes the guest")
        return self._guest

    def chain_refusal(self) -> Cancel | None:
        """For the source after `PlatformChain`: the Cancel to send (before SEND_START) when the
        target's platform is not in the owner's allow-lists, or its chain cannot satisfy the
        guest policy; None when neither."""
        if self.chain is None or self.description is None:
            return None
        why = platform_refusal(self.chain, self.allowed_platforms)
        if why is None:
            why = chain_refusal(self.description.policy, self.chain)
        return None if why is None else Cancel(code=CancelCode.POLICY, reason=why)

    def encrypted_pages(
        self, gpas: Iterable[int], packets: Iterable[tuple[bytes, bytes]]
    ) -> EncryptedPages:
        """The next frame for a batch of private pages: the pages at `gpas`, in order, and
        SEND_UPDATE_DATA's (header, data) of each, in the same order."""
        headers: list[bytes] = []
        data: list[bytes] = []
        for header, page in packets:
            headers.append(header)
            data.append(page)
        return EncryptedPages(
            session=self._session(),
            seq=self.pages,
            gpas=tuple(gpas),
            headers=b"".join(headers),
            data=b"".join(data),
        )

    def shared_page(self, gpa: int, data: bytes) -> SharedPage:
        """The next frame for a shared page (plaintext)."""
        return SharedPage(session=self._session(), seq=self.pages, gpa=gpa, data=data)

    def is_shared(self, gpa: int) -> bool:
        """Whether the current round's list says the page at `gpa` is shared."""
        return self._regions.shared(gpa)

    def _session(self) -> bytes:
        if self.session_id is None:
            raise LocalProtocolError("no session yet: SendStart comes first")
        return self.session_id

    # ---- the inputs -------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send `message` now, advance, and return its frame's bytes.

        Raises:
            LocalProtocolError: not allowed now, or not valid (the check the peer applies); the
                connection is then in ERROR.
        """
        state = self._state
        if state is _ERROR:
            raise LocalProtocolError("the connection already failed; it cannot send")
        kind = type(message)
        if (
            (kind is EncryptedPages or kind is SharedPage)
            and self._pages_ours
            and (state in _PAGE_STATES)
        ):
            return self._send_page(message)  # type: ignore[arg-type]
        if state in _FINISHED_STATES:
            if isinstance(message, Cancel) and state is State.CANCELLED:
                raise LocalProtocolError("the migration is already cancelled")
            raise LocalProtocolError(
                f"the conversation ended ({state.name}); nothing more may be sent"
            )
        try:
            new_state = self._next_state(self.our_role, message)
            data = _encode(message)
            _decode(data)  # the bounds the peer will enforce
            self._check(self.our_role, message)
        except _Violation as exc:
            self._fail(Ending.LOCAL_FAILURE)
            raise LocalProtocolError(str(exc)) from None
        self._apply(self.our_role, message, new_state)
        return data

    def receive(self, data: bytes | None) -> Message | PeerGone:
        """Take one frame from the peer (None: the connection ended) and advance.

        Returns:
            The message, or `PeerGone`. After we cancelled, what the peer sent before it read
            our Cancel is returned too, and changes nothing.

        Raises:
            RemoteProtocolError: the frame breaks the protocol; the connection is then in
                ERROR (and every later call raises).
        """
        state = self._state
        if state is _ERROR:
            raise RemoteProtocolError("the connection already failed; nothing more is accepted")
        if data is None:
            self._end(state, Ending.PEER_CLOSED)
            self._state = State.CLOSED
            assert self._ended_in is not None
            return PeerGone(lost_in=self._ended_in, plan=self.recovery())
        if state is State.CLOSED:
            raise RemoteProtocolError("data after the end of the connection")
        try:
            message = _decode(data)
            kind = type(message)
            if (
                (kind is EncryptedPages or kind is SharedPage)
                and self._pages_theirs
                and (state in _PAGE_STATES)
            ):
                # The page path: what the table and `_check` decide for a page frame in these
                # states, without their lookups (the same checks, in the same order).
                self._check_frame(message)  # type: ignore[arg-type]
                self._apply_frame(message)  # type: ignore[arg-type]
                return message
            if state in _COMPLETED_STATES:
                raise _Violation(f"{kind.__name__} after the conversation completed")
            if state is State.CANCELLED:
                if self.cancelled_by is self.our_role:
                    return message  # crossed our Cancel
                raise _Violation(f"{kind.__name__} after the peer's Cancel")
            new_state = self._next_state(self.their_role, message)
            self._check(self.their_role, message)
        except _Violation as exc:
            self._fail(Ending.GARBAGE)
            raise RemoteProtocolError(str(exc)) from None
        self._apply(self.their_role, message, new_state)
        return message

    def _send_page(self, page: EncryptedPages | SharedPage) -> bytes:
        """`send` of a page frame in a state where the source streams pages (the state stays).
        The peer decodes the frame with the message types' bounds; a page whose fields are
        already of the types and within the bounds those declare (`_page_in_bounds`) is not
        decoded again to prove it: any other goes through the decoder as every message does,
        which refuses it with the peer's own words."""
        try:
            data = _encode(page)
            if not _page_in_bounds(page):
                _decode(data)
            self._check_frame(page)
        except _Violation as exc:
            self._fail(Ending.LOCAL_FAILURE)
            raise LocalProtocolError(str(exc)) from None
        self._apply_frame(page)
        return data

    def give_up(self, ending: Literal[Ending.TIMEOUT, Ending.LOCAL_FAILURE]) -> RecoveryPlan:
        """The shell ends the conversation: the peer took too long, or a step of our own
        failed. Send `Cancel` first if `may_cancel()`; this ends it either way (ERROR) and
        returns what to do."""
        if ending not in (Ending.TIMEOUT, Ending.LOCAL_FAILURE):
            raise ValueError(f"the shell gives up for a timeout or a local failure, not {ending}")
        self._fail(ending)
        return self.recovery()

    # ---- internals --------------------------------------------------------------------------

    def _next_state(self, sender: Role, message: Message) -> State:
        allowed = TRANSITIONS[sender].get(self._state, {})
        new_state = allowed.get(type(message))
        if new_state is None:
            expected = ", ".join(t.__name__ for t in allowed) or "nothing"
            raise _Violation(
                f"the {sender.value} may not send {type(message).__name__} in state "
                f"{self._state.name} (it may send: {expected})"
            )
        return new_state

    def _check(self, sender: Role, message: Message) -> None:
        """The rules that depend on more than one field, or on earlier messages."""
        if isinstance(message, _PAGES):
            self._check_frame(message)
        elif isinstance(message, Hello):
            self._check_hello(sender, message)
        elif isinstance(message, Describe):
            _check_describe(message)
            if sender is self.our_role and message != self._guest:
                raise _Violation("the source must send the Describe it was built with")
        elif isinstance(message, Resolve):
            if sender is self.our_role and message != self._resolving:
                raise _Violation(
                    "only a resolving connection sends Resolve, the one it was built with"
                )
        elif isinstance(message, Resolution):
            self._check_resolution(message)
        elif isinstance(message, PlatformChain):
            for name in ("pdh", "pek", "oca", "cek"):
                _check_cert(name, getattr(message, name))
            if len(message.ask) + len(message.ark) > MAX_AMD_CERTS_BYTES:
                raise _Violation(
                    f"ASK and ARK together are {len(message.ask) + len(message.ark)} bytes; "
                    f"KVM takes at most {MAX_AMD_CERTS_BYTES} for the AMD chain"
                )
            _check_amd_cert("ask", message.ask)
            _check_amd_cert("ark", message.ark)
        elif isinstance(message, SendStart):
            self._check_send_start(message)
        elif isinstance(message, Round | StopAndCopy):
            if message.round != self.rounds + 1:
                raise _Violation(
                    f"{type(message).__name__} {message.round} follows round {self.rounds}: "
                    "rounds are numbered 1, 2, 3, ..."
                )
            assert self._slots is not None
            _check_regions(message.shared_regions, self._slots)
        elif isinstance(message, RoundEnd):
            if message.round != self.rounds or message.pages != self._round_pages:
                raise _Violation(
                    f"RoundEnd says round {message.round} had {message.pages} pages; round "
                    f"{self.rounds} had {self._round_pages}: frames were lost or added"
                )
        elif isinstance(message, VcpuState):
            assert self.description is not None
            if message.index != self._vcpus_done or message.index >= self.description.vcpus:
                raise _Violation(
                    f"VcpuState {message.index} out of order: expected vCPU {self._vcpus_done} "
                    f"of {self.description.vcpus}"
                )
            if len(message.state.blob) > MAX_VCPU_STATE_BYTES:
                raise _Violation(
                    f"vCPU {message.index}'s state is {len(message.state.blob)} bytes, more "
                    f"than {MAX_VCPU_STATE_BYTES}"
                )
        elif isinstance(message, Finish):
            assert self.description is not None
            if self._vcpus_done != self.description.vcpus:
                raise _Violation(
                    f"Finish after {self._vcpus_done} of {self.description.vcpus} vCPU states"
                )
            if (message.rounds, message.pages) != (self.rounds, self.pages):
                raise _Violation(
                    f"Finish says {message.rounds} rounds and {message.pages} pages; the stream "
                    f"had {self.rounds} rounds and {self.pages} pages"
                )
        elif isinstance(message, Received | Commit | Resumed) and message.session != (
            self.session_id
        ):
            raise _Violation(
                f"{type(message).__name__} names another session than this one: refused"
            )

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
            raise _Violation("our Hello must carry this connection's versions: use make_hello()")
        if sender is Role.SOURCE:
            if hello.chosen_version is not None:
                raise _Violation("the source's Hello chooses no version; the target does")
            return
        chosen = hello.chosen_version
        if chosen is None:
            raise _Violation("the target's Hello must carry the chosen version")
        if sender is self.our_role:
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

    def _check_resolution(self, answer: Resolution) -> None:
        request = self.resolve_request
        assert request is not None  # the table puts Resolve before Resolution
        if answer.session != request.session:
            raise _Violation("Resolution names another session than the Resolve it answers")
        allowed = (
            ("resumed", "not-held") if request.decision == "commit" else ("torn-down", "not-held")
        )
        if answer.outcome not in allowed:
            raise _Violation(
                f"the target answered {answer.outcome!r} to {request.decision!r}: "
                + (
                    "a target runs a guest only after Commit, so a cancelled session running "
                    "there is a second copy; stop the target's guest and investigate"
                    if answer.outcome == "resumed"
                    else f"expected one of {allowed}"
                )
            )

    def _check_send_start(self, start: SendStart) -> None:
        assert self.description is not None
        if start.policy != self.description.policy:
            raise _Violation(
                f"SendStart carries policy {start.policy:#x}, the guest described has "
                f"{self.description.policy:#x}"
            )
        _check_cert("pdh", start.source_pdh)
        session = session_id_of(start.session)
        if self.our_role is Role.TARGET and session in self._burnt:
            raise _Violation(
                f"session {session.hex()} was received before: this stream is a replay or a "
                "duplicate, and receiving it again would make a second copy of the guest; "
                "refused before RECEIVE_START"
            )

    def _check_frame(self, page: EncryptedPages | SharedPage) -> None:
        """A page frame's checks: a batch's (`_check_pages`) or a shared page's."""
        if isinstance(page, EncryptedPages):
            self._check_pages(page)
        else:
            self._check_page(page)

    def _apply_frame(self, page: EncryptedPages | SharedPage) -> None:
        """A checked page frame applied: a batch (`_apply_pages`) or a shared page."""
        if isinstance(page, EncryptedPages):
            self._apply_pages(page)
        else:
            self._apply_page(page)

    def _check_page(self, page: SharedPage) -> None:
        if page.session != self.session_id:
            raise _Violation(f"{type(page).__name__} of another session than this one: refused")
        if page.seq != self.pages:
            raise _Violation(
                f"{type(page).__name__} with sequence number {page.seq}, expected {self.pages}: "
                "frames were reordered, repeated or lost"
            )
        gpa = page.gpa
        assert self._slots is not None
        if not self._slots.covers(gpa, gpa + PAGE_SIZE):
            raise _Violation(
                f"{type(page).__name__} for guest address {gpa:#x}, outside guest memory"
            )
        if gpa in self._round_gpas:
            raise _Violation(
                f"{type(page).__name__} for guest address {gpa:#x} a second time in round "
                f"{self.rounds}"
            )
        if not self._regions.shared(gpa):
            raise _Violation(
                f"a plaintext page for guest address {gpa:#x}, which the shared-region "
                "list says is private: private pages travel only through SEND_UPDATE_DATA"
            )

    def _check_pages(self, batch: EncryptedPages) -> None:
        """`_check_page`'s checks for a batch: its shape, its session and first sequence
        number, then every page in order (a page again, or an IV again, within the batch
        included). Leaves the batch's IVs for `_apply_pages`; changes nothing else."""
        gpas, headers = batch.gpas, batch.headers
        n = len(gpas)
        if len(headers) != n * FW_HEADER_SIZE or len(batch.data) != n * PAGE_SIZE:
            raise _Violation(
                f"EncryptedPages carries {len(headers)} bytes of packet headers and "
                f"{len(batch.data)} bytes of page data for {n} guest addresses: expected "
                f"{n * FW_HEADER_SIZE} and {n * PAGE_SIZE} ({FW_HEADER_SIZE} and {PAGE_SIZE} "
                "for each address, in its order): a malformed frame"
            )
        if batch.session != self.session_id:
            raise _Violation("EncryptedPages of another session than this one: refused")
        if batch.seq != self.pages:
            raise _Violation(
                f"EncryptedPages with sequence number {batch.seq}, expected {self.pages}: "
                "frames were reordered, repeated or lost"
            )
        assert self._slots is not None
        # The whole batch at once, in C: when every test holds, each page passes each check.
        # One that fails says only that some page may not: the pages are then taken one by
        # one, and the first that fails a check is named.
        flags, page_ivs = zip(*_FLAGS_IV.iter_unpack(headers), strict=True)
        batch_gpas, batch_ivs = set(gpas), set(page_ivs)
        low, high = min(gpas), max(gpas) + PAGE_SIZE
        if (
            self._slots.covers(low, high)  # one slot holds them all
            and len(batch_gpas) == n
            and self._round_gpas.isdisjoint(batch_gpas)
            and not (self._regions.any_in(low, high) and any(map(self._regions.shared, gpas)))
            and not any(flags)
            and len(batch_ivs) == n
            and self._ivs.isdisjoint(batch_ivs)
        ):
            self._batch_ivs = batch_ivs
            return
        self._check_pages_one_by_one(batch)

    def _check_pages_one_by_one(self, batch: EncryptedPages) -> None:
        """`_check_pages` page after page: every check for each page in `_check_page`'s
        order, the first page that fails one refused by name."""
        gpas, headers = batch.gpas, batch.headers
        assert self._slots is not None
        covers, round_gpas, ivs = self._slots.covers, self._round_gpas, self._ivs
        shared = self._regions.shared
        batch_gpas: set[int] = set()
        batch_ivs: set[bytes] = set()
        at = 0
        for gpa in gpas:
            # One test for all of a page's checks; which one failed, and the words, are
            # `_page_refusal`'s (the same checks, in `_check_page`'s order).
            iv = headers[at + FW_IV_OFFSET : at + FW_IV_OFFSET + FW_IV_SIZE]
            if (
                not covers(gpa, gpa + PAGE_SIZE)
                or gpa in round_gpas
                or gpa in batch_gpas
                or shared(gpa)
                or headers[at : at + FW_IV_OFFSET] != _NO_FLAGS
                or iv in ivs
                or iv in batch_ivs
            ):
                raise self._page_refusal(batch, at // FW_HEADER_SIZE, batch_gpas, batch_ivs)
            batch_gpas.add(gpa)
            batch_ivs.add(iv)
            at += FW_HEADER_SIZE
        self._batch_ivs = batch_ivs

    def _page_refusal(
        self, batch: EncryptedPages, i: int, batch_gpas: set[int], batch_ivs: set[bytes]
    ) -> _Violation:
        """Why page `i` of `batch` is refused, the pages before it having passed
        (`batch_gpas`, `batch_ivs`: theirs): the first of `_check_page`'s checks it fails,
        naming the page's place in the frame and its address."""
        gpa, n = batch.gpas[i], len(batch.gpas)
        page = (
            f"guest address {gpa:#x} (page {i} of the frame's {n}, sequence number {batch.seq + i})"
        )
        assert self._slots is not None
        if not self._slots.covers(gpa, gpa + PAGE_SIZE):
            return _Violation(f"EncryptedPages for {page}, outside guest memory")
        if gpa in self._round_gpas or gpa in batch_gpas:
            return _Violation(
                f"EncryptedPages for {page} a second time in round {self.rounds}"
                + (", the first time earlier in this frame" if gpa in batch_gpas else "")
            )
        if self._regions.shared(gpa):
            return _Violation(
                f"an encrypted page for {page}, which the shared-region list says is shared: "
                "the guest would read ciphertext"
            )
        header = batch.headers[i * FW_HEADER_SIZE : (i + 1) * FW_HEADER_SIZE]
        if header[:FW_IV_OFFSET] != _NO_FLAGS:
            flags = int.from_bytes(header[:FW_IV_OFFSET], "little")
            return _Violation(
                f"firmware packet header flags {flags:#x} for {page}: compressed packets are "
                "not supported (RECEIVE_UPDATE_DATA would refuse them)"
            )
        iv = header[FW_IV_OFFSET : FW_IV_OFFSET + FW_IV_SIZE]
        assert iv in self._ivs or iv in batch_ivs
        return _Violation(
            f"the firmware packet for {page} repeats the IV of an earlier packet of this "
            "session"
            + (" (earlier in this frame)" if iv in batch_ivs else "")
            + ": a packet sent again (for another page, or again for this one)"
        )

    def _apply_page(self, page: SharedPage) -> None:
        """A shared page's frame was checked (`_check_page`): count it, remember its address
        for the round. The state stays."""
        self.pages += 1
        self._round_pages += 1
        self._round_gpas.add(page.gpa)

    def _apply_pages(self, batch: EncryptedPages) -> None:
        """A batch was checked (`_check_pages`): count its pages, remember their addresses for
        the round and their IVs for the session. The state stays."""
        n = len(batch.gpas)
        self.pages += n
        self._round_pages += n
        self._round_gpas.update(batch.gpas)
        self._ivs |= self._batch_ivs
        self._batch_ivs = set()

    def _apply(self, sender: Role, message: Message, new_state: State) -> None:
        old_state = self._state
        if isinstance(message, _PAGES):
            self._apply_frame(message)
        elif isinstance(message, Hello):
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
            self._slots = _Slots(message.slots)
        elif isinstance(message, PlatformChain):
            self.chain = message
        elif isinstance(message, SendStart):
            self.session_id = session_id_of(message.session)
        elif isinstance(message, Round | StopAndCopy):
            self.rounds = message.round
            self.shared_regions = message.shared_regions
            self._regions = _Regions(message.shared_regions)
            self._round_pages = 0
            self._round_gpas = set()
        elif isinstance(message, VcpuState):
            self._vcpus_done += 1
        elif isinstance(message, Resolve):
            self.resolve_request = message
        elif isinstance(message, Resolution):
            self.resolution = message
        elif isinstance(message, Cancel):
            self.cancel = message
            self.cancelled_by = sender
            self._end(
                old_state, Ending.LOCAL_FAILURE if sender is self.our_role else Ending.CANCELLED
            )
        self._state = new_state
        if new_state in (State.DONE, State.RESOLVED):
            self._end(new_state, Ending.COMPLETED)

    def _end(self, state: State, how: Ending) -> None:
        if self._ended_in is None:
            self._ended_in = state
            self._ending = how

    def _fail(self, how: Ending) -> None:
        self._end(self._state, how)
        self._state = State.ERROR
