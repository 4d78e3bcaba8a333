"""The cross-host SEV migration machine, source against target, with no sockets and no firmware.

Each test builds two `RemoteConnection`s and hands the bytes of one to the other, as the shell
does over TCP. Firmware outputs (certificates, the session blob, packet headers, ciphertext) are
stand-in bytes of the right sizes: the protocol carries them without reading them, except for
the certificate fields and header fields it checks.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from handoff.protocol.local import VcpuStateWire
from handoff.protocol.remote import (
    CERT_SIZE,
    FW_HEADER_SIZE,
    HELD_DECISIONS,
    LIVE_STATES,
    MAX_BATCH_PAGES,
    MAX_MESSAGE_BYTES,
    PAGE_SIZE,
    PROGRESS,
    PROTOCOL_MAX_VERSION,
    RECOVERY,
    SESSION_SIZE,
    TRANSITIONS,
    Cancel,
    CancelCode,
    Commit,
    Describe,
    DeviceState,
    EncryptedPages,
    Ending,
    Finish,
    Hello,
    LocalProtocolError,
    MemorySlot,
    Message,
    NotMigratable,
    PeerGone,
    PlatformChain,
    Received,
    Recovery,
    RemoteConnection,
    RemoteProtocolError,
    Resolution,
    Resolve,
    Resumed,
    Role,
    Round,
    RoundEnd,
    SendStart,
    SharedPage,
    State,
    StopAndCopy,
    VcpuState,
    decode,
    held_outcome,
    operator_outcome,
    parse_platform_id,
    platform_chain,
    platform_id,
    recovery_for,
    session_id_of,
)

SOURCE, TARGET = Role.SOURCE, Role.TARGET
VM_UUID = uuid.UUID("0b7c9d2e-41f5-4a6b-8c0d-1e2f3a4b5c6d")
NODBG, NOKS, ES, NOSEND, DOMAIN, SEV = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
POLICY = NODBG | NOKS | SEV | (0 << 16) | (17 << 24)  # API 0.17 or newer
SLOT0_PAGES, SLOT1_PAGES = 16, 8
SLOT1_GPA = 1 << 32
ALL_PAGES = [i * PAGE_SIZE for i in range(SLOT0_PAGES)] + [
    SLOT1_GPA + i * PAGE_SIZE for i in range(SLOT1_PAGES)
]


# ---- stand-ins for the firmware's bytes --------------------------------------------------------


def cert(usage: int, *, api: tuple[int, int] = (0, 24), version: int = 1) -> bytes:
    """A 2084-byte SEV certificate with the fields the protocol reads (struct sev_cert)."""
    head = version.to_bytes(4, "little") + bytes(api) + b"\0\0" + usage.to_bytes(4, "little")
    body = hashlib.sha256(head).digest() * ((CERT_SIZE - len(head)) // 32 + 1)
    return (head + body)[:CERT_SIZE]


def amd_cert(usage: int, bits: int = 2048) -> bytes:
    """An AMD_CERT-shaped blob (ASK 0x13, ARK 0x0): header, exponent, modulus, signature."""
    head = (
        (1).to_bytes(4, "little")
        + bytes(32)
        + usage.to_bytes(4, "little")
        + bytes(16)
        + bits.to_bytes(4, "little") * 2
    )
    return head + bytes([usage + 1]) * (bits // 8 * 3)


def make_chain(*, pek_api: tuple[int, int] = (0, 24)) -> PlatformChain:
    return PlatformChain(
        pdh=cert(0x1003),
        pek=cert(0x1002, api=pek_api),
        oca=cert(0x1001),
        cek=cert(0x1004),
        ask=amd_cert(0x13),
        ark=amd_cert(0x0),
    )


def session_blob(n: int = 0) -> bytes:
    return hashlib.sha512(f"session {n}".encode()).digest() * 2


class Firmware:
    """Headers with a fresh IV per packet, as SEND_UPDATE_DATA gives them."""

    def __init__(self, seed: int = 0) -> None:
        self.count = 0
        self.seed = seed

    def packet(self, gpa: int) -> tuple[bytes, bytes]:
        self.count += 1
        iv = hashlib.sha256(f"{self.seed}/{self.count}".encode()).digest()[:16]
        mac = hashlib.sha256(iv + gpa.to_bytes(8, "little")).digest()
        header = bytes(4) + iv + mac
        assert len(header) == FW_HEADER_SIZE
        return header, (iv * (PAGE_SIZE // 16))


def make_describe(mode: str = "sev", *, policy: int = POLICY, vcpus: int = 2) -> Describe:
    slots = (
        MemorySlot(slot=0, guest_phys_addr=0, size=SLOT0_PAGES * PAGE_SIZE),
        MemorySlot(slot=1, guest_phys_addr=SLOT1_GPA, size=SLOT1_PAGES * PAGE_SIZE),
    )
    return Describe(
        vcpus=vcpus,
        memory_bytes=sum(s.size for s in slots),
        slots=slots,
        mode=mode,  # type: ignore[arg-type]
        policy=policy,
        line_every=200,
        flip_every=50,
        host_flags={"vm-name": "guest-a"},
    )


def vcpu_state(i: int) -> VcpuState:
    return VcpuState(
        index=i, state=VcpuStateWire(backend="kvmstub", version=1, blob=bytes([i]) * 64)
    )


# ---- a migration plan and an honest pair -------------------------------------------------------


@dataclass
class RoundPlan:
    shared: tuple[tuple[int, int], ...]  # the shared-region list of the round
    dirty: list[int]  # the pages sent in it, in order


@dataclass
class Plan:
    rounds: list[RoundPlan]  # the last one is stop-and-copy
    vcpus: int = 2
    session: int = 0
    batch: int = 4  # private pages per EncryptedPages frame, at most


def shared_in(regions: tuple[tuple[int, int], ...], gpa: int) -> bool:
    return any(start <= gpa < start + n * PAGE_SIZE for start, n in regions)


def page_frames(rnd: RoundPlan, batch: int) -> list[tuple[bool, list[int]]]:
    """A round's pages as the source shell frames them: runs of private pages in batches of at
    most `batch`, each shared page alone; in order."""
    out: list[tuple[bool, list[int]]] = []
    for gpa in rnd.dirty:
        shared = shared_in(rnd.shared, gpa)
        if out and not shared and not out[-1][0] and len(out[-1][1]) < batch:
            out[-1][1].append(gpa)
        else:
            out.append((shared, [gpa]))
    return out


def pages_of(message: Message) -> list[tuple[int, bool]]:
    """(gpa, shared) of each page a page frame carries (none for another message)."""
    if isinstance(message, EncryptedPages):
        return [(gpa, False) for gpa in message.gpas]
    if isinstance(message, SharedPage):
        return [(message.gpa, True)]
    return []


def simple_plan() -> Plan:
    return Plan(
        rounds=[
            RoundPlan(shared=((0x3000, 2),), dirty=ALL_PAGES),
            RoundPlan(shared=((0x3000, 1), (SLOT1_GPA, 1)), dirty=[0x1000, 0x4000, SLOT1_GPA]),
            RoundPlan(shared=((0x4000, 1),), dirty=[0x3000, 0x4000]),
        ]
    )


class Pair:
    """A source and a target machine; `messages()` yields the honest source's and target's next
    messages, built the way the shell builds them."""

    def __init__(
        self,
        plan: Plan | None = None,
        *,
        mode: str = "sev",
        burnt: set[bytes] | None = None,
    ) -> None:
        self.plan = plan or simple_plan()
        self.describe = make_describe(mode, vcpus=self.plan.vcpus)
        self.source = RemoteConnection(SOURCE, guest=self.describe)
        self.target = RemoteConnection(TARGET, burnt_sessions=burnt if burnt is not None else set())
        self.firmware = Firmware(self.plan.session)
        self.sent: list[tuple[Role, Message]] = []

    def conn(self, role: Role) -> RemoteConnection:
        return self.source if role is SOURCE else self.target

    def deliver(self, sender: Role, message: Message) -> Message | PeerGone:
        data = self.conn(sender).send(message)
        self.sent.append((sender, message))
        return self.conn(sender.peer).receive(data)

    def script(self) -> list[tuple[Role, object]]:
        """The conversation as steps: a message, or a callable building one when its turn
        comes (page frames need the machine's sequence number)."""
        src, tgt = self.source, self.target
        steps: list[tuple[Role, object]] = [
            (SOURCE, lambda: src.make_hello(vm_name="guest-a", vm_uuid=VM_UUID)),
            (TARGET, lambda: tgt.make_hello(vm_name="guest-a", vm_uuid=VM_UUID)),
            (SOURCE, lambda: src.describe()),
            (TARGET, make_chain()),
            (
                SOURCE,
                SendStart(
                    session=session_blob(self.plan.session),
                    source_pdh=cert(0x1003, api=(0, 22)),
                    policy=self.describe.policy,
                ),
            ),
        ]
        last = len(self.plan.rounds)
        for n, rnd in enumerate(self.plan.rounds, start=1):
            kind = StopAndCopy if n == last else Round
            steps.append((SOURCE, kind(round=n, shared_regions=rnd.shared)))
            for _, gpas in page_frames(rnd, self.plan.batch):
                steps.append((SOURCE, self._page_builder(*gpas)))
            steps.append((SOURCE, RoundEnd(round=n, pages=len(rnd.dirty))))
        steps.append((SOURCE, DeviceState(doorbell_sum=77, device_blobs={"serial": b"half"})))
        steps += [(SOURCE, vcpu_state(i)) for i in range(self.plan.vcpus)]
        steps.append((SOURCE, lambda: Finish(rounds=last, pages=src.pages)))
        steps.append((TARGET, lambda: Received(session=tgt.session_id)))
        steps.append((SOURCE, lambda: Commit(session=src.session_id)))
        steps.append((TARGET, lambda: Resumed(session=tgt.session_id)))
        return steps

    def _page_builder(self, *gpas: int) -> object:
        """The frame of one shared page, or of a batch of private ones."""

        def build() -> Message:
            if len(gpas) == 1 and self.source.is_shared(gpas[0]):
                gpa = gpas[0]
                return self.source.shared_page(gpa, bytes([gpa >> 12 & 0xFF]) * PAGE_SIZE)
            return self.source.encrypted_pages(gpas, [self.firmware.packet(g) for g in gpas])

        return build

    @staticmethod
    def build(step: object) -> Message:
        return step() if callable(step) else step  # type: ignore[no-any-return]

    def run(self, steps: int | None = None) -> list[tuple[Role, object]]:
        """Deliver the first `steps` steps (all by default); return the rest."""
        script = self.script()
        upto = len(script) if steps is None else steps
        for sender, step in script[:upto]:
            message = self.build(step)
            assert self.deliver(sender, message) == message
        return script[upto:]


# ---- a whole migration -------------------------------------------------------------------------


def test_whole_migration_reaches_done_on_both_sides_with_every_message_intact() -> None:
    pair = Pair()
    pair.run()
    for conn in (pair.source, pair.target):
        assert conn.state is State.DONE
        assert conn.recovery().recovery is Recovery.DONE
        assert conn.version == PROTOCOL_MAX_VERSION == 2
        assert conn.rounds == 3
    assert pair.source.session_id == pair.target.session_id == session_id_of(session_blob(0))
    assert pair.target.description == pair.describe
    assert pair.target.shared_regions == ((0x4000, 1),)
    assert pair.target.pages == pair.source.pages == len(ALL_PAGES) + 3 + 2
    kinds = [type(m) for _, m in pair.sent]
    assert kinds.count(SharedPage) == 2 + 1 + 1  # pages 3 and 4; SLOT1; 4
    # Batches of at most 4 private pages, cut by shared ones: round 1's pages 0-2, then 5-15
    # and SLOT1's 8 (19: 5 batches); round 2's 1 and 4; round 3's 3.
    assert kinds.count(EncryptedPages) == (1 + 5) + 1 + 1


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Any honest migration: 1 to 4 rounds, each with its own shared-region list (sorted runs
    of pages) and its own dirty pages in any order; 1 to 4 vCPUs; batches of 1 to 8 private
    pages."""
    rounds = []
    for _ in range(draw(st.integers(1, 4))):
        shared_pages = sorted(draw(st.sets(st.sampled_from(ALL_PAGES), max_size=8)))
        regions: list[tuple[int, int]] = []
        for gpa in shared_pages:
            if (
                regions
                and regions[-1][0] + regions[-1][1] * PAGE_SIZE == gpa
                and draw(st.booleans())
            ):
                regions[-1] = (regions[-1][0], regions[-1][1] + 1)
            else:
                regions.append((gpa, 1))
        dirty = draw(st.permutations(ALL_PAGES))[: draw(st.integers(0, len(ALL_PAGES)))]
        rounds.append(RoundPlan(shared=tuple(regions), dirty=list(dirty)))
    return Plan(
        rounds=rounds,
        vcpus=draw(st.integers(1, 4)),
        session=draw(st.integers(0, 99)),
        batch=draw(st.integers(1, 8)),
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans())
def test_an_honest_source_and_target_always_agree(plan: Plan) -> None:
    pair = Pair(plan)
    for sender, step in pair.script():
        message = Pair.build(step)
        assert pair.deliver(sender, message) == message
        assert pair.source.state is pair.target.state
        assert pair.source.pages == pair.target.pages
    assert pair.source.state is pair.target.state is State.DONE
    assert (
        pair.source.session_id
        == pair.target.session_id
        == session_id_of(session_blob(plan.session))
    )
    assert pair.target.shared_regions == plan.rounds[-1].shared
    # Each page went the way its round's list said: plaintext exactly for shared pages.
    sent = iter([page for _, m in pair.sent for page in pages_of(m)])
    for rnd in plan.rounds:
        for gpa in rnd.dirty:
            assert next(sent) == (gpa, shared_in(rnd.shared, gpa))
    assert next(sent, None) is None


def test_zero_precopy_rounds_is_a_plain_stop_and_copy() -> None:
    pair = Pair(Plan(rounds=[RoundPlan(shared=(), dirty=ALL_PAGES)]))
    pair.run()
    assert pair.target.state is State.DONE
    assert pair.target.rounds == 1


def test_every_message_fits_in_one_frame_at_its_bounds() -> None:
    largest = [
        make_chain(),
        PlatformChain(
            pdh=cert(0x1003), pek=cert(0x1002), oca=cert(0x1001), cek=cert(0x1004),
            ask=amd_cert(0x13, 4096), ark=amd_cert(0x0, 4096),
        ),
        EncryptedPages(
            session=b"s" * 16, seq=(1 << 63) - 1, gpas=((1 << 52) - PAGE_SIZE,) * MAX_BATCH_PAGES,
            headers=b"h" * 52 * MAX_BATCH_PAGES, data=b"d" * PAGE_SIZE * MAX_BATCH_PAGES,
        ),
        DeviceState(
            doorbell_sum=0xFFFF_FFFF,
            device_blobs={f"{i:064}": b"b" * 8192 for i in range(8)},
        ),
        VcpuState(index=255, state=VcpuStateWire(backend="k" * 64, version=1, blob=b"x" * 65536)),
        Round(round=10_000, shared_regions=tuple((i * 2 * PAGE_SIZE, 1) for i in range(2048))),
    ]  # fmt: skip
    for message in largest:
        data = msgspec.msgpack.encode(message)
        assert len(data) <= MAX_MESSAGE_BYTES
        assert decode(data) == message


# ---- the source refuses before anything is sent -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "policy", "why"),
    [
        ("sev-es", POLICY | ES, "SEV-ES guest cannot migrate between hosts through upstream KVM"),
        ("sev", POLICY | ES, "VMSA"),
        ("sev", POLICY | NOSEND, "NOSEND"),
        ("plain", 0, "for SEV guests"),
    ],
)
def test_a_guest_that_cannot_migrate_is_refused_at_the_source_naming_why(
    mode: str, policy: int, why: str
) -> None:
    with pytest.raises(NotMigratable, match=why) as info:
        RemoteConnection(SOURCE, guest=make_describe(mode, policy=policy))
    assert "keeps running" in str(info.value)


def test_a_target_refuses_an_sev_es_describe_that_a_source_sent_anyway() -> None:
    pair = Pair()
    pair.run(2)
    bad = make_describe("sev-es", policy=POLICY | ES)
    with pytest.raises(RemoteProtocolError, match="VMSA"):
        pair.target.receive(msgspec.msgpack.encode(bad))
    assert pair.target.recovery().recovery is Recovery.DROP


@pytest.mark.parametrize(
    ("slots", "why"),
    [
        ((MemorySlot(slot=0, guest_phys_addr=0, size=8192),) * 2, "slot twice"),
        (
            (
                MemorySlot(slot=0, guest_phys_addr=0, size=8192),
                MemorySlot(slot=1, guest_phys_addr=4096, size=8192),
            ),
            "overlap",
        ),
    ],
)
def test_a_describe_with_repeated_or_overlapping_slots_is_refused(
    slots: tuple[MemorySlot, ...], why: str
) -> None:
    bad = msgspec.structs.replace(
        make_describe(), slots=slots, memory_bytes=sum(s.size for s in slots)
    )
    with pytest.raises(NotMigratable, match=why):
        RemoteConnection(SOURCE, guest=bad)


def batch(
    n: int = 1, *, gpas: tuple[int, ...] | None = None, headers: int = 52, data: int = PAGE_SIZE
) -> EncryptedPages:
    """An EncryptedPages of `n` pages (or `gpas`), with `headers` and `data` bytes a page."""
    gpas = gpas if gpas is not None else tuple(i * PAGE_SIZE for i in range(n))
    n = len(gpas)
    return EncryptedPages(
        session=b"s" * 16, seq=0, gpas=gpas, headers=b"h" * headers * n, data=b"d" * data * n
    )


def test_sizes_of_firmware_objects_are_checked_when_decoding() -> None:
    bad = [
        batch(headers=51),
        batch(data=4095),
        batch(gpas=(100,)),
        batch(gpas=()),  # an empty batch
        batch(MAX_BATCH_PAGES + 1),  # too many pages
        batch(MAX_BATCH_PAGES, headers=53),  # more header bytes than the most pages take
        batch(MAX_BATCH_PAGES, data=PAGE_SIZE + 1),
        SharedPage(session=b"s" * 15, seq=0, gpa=0, data=b"d" * PAGE_SIZE),
        SendStart(session=b"x" * (SESSION_SIZE - 1), source_pdh=cert(0x1003), policy=0),
        SendStart(session=b"x" * SESSION_SIZE, source_pdh=b"p" * 2083, policy=0),
    ]
    for message in bad:
        with pytest.raises(RemoteProtocolError, match="malformed"):
            decode(msgspec.msgpack.encode(message))


@pytest.mark.parametrize(
    ("field", "announced", "said"),
    [
        ("gpas", b"\xdd\xff\xff\xff\xff", "array` of length <= 64"),  # array32: 2**32 - 1
        ("headers", b"\xc6\xff\xff\xff\xff", "length <= 3328"),  # bin32: 4 GiB
        ("data", b"\xc6\x00\x10\x00\x00", "length <= 262144"),  # bin32: 1 MiB
    ],
)
def test_a_batch_announcing_more_than_its_bounds_is_refused_before_it_is_read(
    field: str, announced: bytes, said: str
) -> None:
    """msgpack announces each array's and blob's length before its items: a frame of a few
    bytes announcing billions of pages is refused by the bounds, before anything of it is
    read or allocated."""
    enc = msgspec.msgpack.encode
    frame = b"\x86" + enc("type") + enc("sev-pages")  # a map of six, cut after `field`
    for key, value in msgspec.structs.asdict(batch()).items():
        if key == field:
            frame += enc(key) + announced + bytes(64)
            break
        frame += enc(key) + enc(value)
    with pytest.raises(RemoteProtocolError, match=said):
        decode(frame)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"pek": cert(0x1003)}, r"PEK slot holds a certificate of usage 0x1003 \(PDH\)"),
        ({"pdh": cert(0x1003, version=2)}, "version 2"),
        (
            {"ask": amd_cert(0x13, 32768), "ark": amd_cert(0x0, 32768)},
            "KVM takes at most 16384",
        ),
        ({"ask": amd_cert(0x0)}, "ASK slot holds an AMD certificate of version 1 and usage 0x0"),
        ({"ark": amd_cert(0x0)[:-1]}, "ARK is 831 bytes, its header says 832"),
    ],
)
def test_a_platform_chain_out_of_order_or_oversized_is_refused_naming_the_slot(
    fields: dict[str, bytes], why: str
) -> None:
    pair = Pair()
    pair.run(3)
    chain = msgspec.structs.replace(make_chain(), **fields)
    with pytest.raises(RemoteProtocolError, match=why):
        pair.source.receive(msgspec.msgpack.encode(chain))
    assert pair.source.recovery().recovery is Recovery.NOTHING_TO_DO


def test_the_chain_is_built_from_the_export_blobs_and_gives_them_back() -> None:
    chain = make_chain()
    built = platform_chain(chain.pdh, chain.plat_certs, chain.amd_certs)
    assert built == chain
    assert built.plat_certs == chain.pek + chain.oca + chain.cek
    with pytest.raises(LocalProtocolError, match="three 2084-byte certificates"):
        platform_chain(chain.pdh, chain.plat_certs[:-1], chain.amd_certs)
    with pytest.raises(LocalProtocolError, match="does not start with an AMD certificate"):
        platform_chain(chain.pdh, chain.plat_certs, chain.ask)


def test_source_cancels_before_send_start_when_the_target_firmware_is_too_old() -> None:
    pair = Pair()
    pair.run(3)
    pair.deliver(TARGET, make_chain(pek_api=(0, 16)))
    refusal = pair.source.chain_refusal()
    assert refusal is not None and refusal.code == CancelCode.POLICY
    assert "API 0.17" in refusal.reason and "0.16" in refusal.reason
    pair.deliver(SOURCE, refusal)
    assert pair.source.recovery().recovery is Recovery.NOTHING_TO_DO
    assert pair.target.recovery().recovery is Recovery.DROP
    assert Pair().source.chain_refusal() is None


# ---- the owner's allow-list of target platforms ------------------------------------------------


def _chain_refusal_with(*lists: list[str]) -> Cancel | None:
    pair = Pair()
    pair.source = RemoteConnection(SOURCE, guest=pair.describe, allowed_platforms=lists)
    pair.run(4)  # Hello, Hello, Describe, PlatformChain
    return pair.source.chain_refusal()


def test_a_target_platform_in_every_allow_list_given_passes() -> None:
    seen = platform_id(make_chain())
    assert seen == hashlib.sha256(make_chain().pdh[16:0x414]).hexdigest()
    assert _chain_refusal_with([seen]) is None
    assert _chain_refusal_with([seen.upper(), "0" * 64], [], [f"  {seen}\n"]) is None
    assert _chain_refusal_with() is None and _chain_refusal_with([]) is None  # no list: any


def test_a_target_platform_missing_from_an_allow_list_is_refused_before_send_start() -> None:
    seen = platform_id(make_chain())
    for lists in ([["0" * 64]], [[seen], ["f" * 64]]):  # the VM's list, the command's
        refusal = _chain_refusal_with(*lists)
        assert refusal is not None and refusal.code == CancelCode.POLICY
        assert seen in refusal.reason and "keeps running here" in refusal.reason
    pair = Pair()
    pair.source = RemoteConnection(SOURCE, guest=pair.describe, allowed_platforms=[["0" * 64]])
    pair.run(4)
    refusal = pair.source.chain_refusal()
    assert refusal is not None
    pair.deliver(SOURCE, refusal)  # instead of SendStart
    assert pair.source.recovery().recovery is Recovery.NOTHING_TO_DO
    assert pair.target.recovery().recovery is Recovery.DROP


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "0" * 63, "0" * 65, "sha256:" + "0" * 64])
def test_a_malformed_platform_id_is_refused_with_what_an_id_is(bad: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_platform_id(bad)
    with pytest.raises(ValueError, match="allow-list of target platforms"):
        RemoteConnection(SOURCE, guest=make_describe(), allowed_platforms=[[bad]])


# ---- framing: reordered, duplicated, retargeted frames -----------------------------------------


def _to_first_page(pair: Pair) -> list[tuple[Role, object]]:
    rest = pair.run(6)  # Hello, Hello, Describe, PlatformChain, SendStart, Round 1
    assert pair.target.state is State.PRECOPY
    return rest


def _encode(message: Message) -> bytes:
    return msgspec.msgpack.encode(message)


#: Round 1 of `simple_plan` shares 0x3000 and 0x4000; these are private.
PRIVATE = [0, 0x1000, 0x2000, 0x5000, 0x6000, 0x7000]


def test_a_plaintext_page_for_a_private_address_is_refused_at_the_source() -> None:
    pair = Pair()
    _to_first_page(pair)
    private_gpa = 0x1000
    assert not pair.source.is_shared(private_gpa)
    with pytest.raises(LocalProtocolError, match="private pages travel only through"):
        pair.source.send(pair.source.shared_page(private_gpa, b"secret" * 682 + b"ab" * 2))
    assert pair.source.recovery().recovery is Recovery.CANCEL_AND_RESUME


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("gpas", (0x1000 + 16,), "multiple of 4096"),
        ("gpas", (-PAGE_SIZE,), ">= 0"),
        ("gpas", ("0x1000",), "Expected `int`"),
        ("gpas", (), "length >= 1"),
        ("gpas", (0x1000,) * (MAX_BATCH_PAGES + 1), "length <= 64"),
        ("headers", bytes(51), "length >= 52"),
        ("data", bytes(MAX_BATCH_PAGES * PAGE_SIZE + 1), "length <= 262144"),
        ("session", bytes(15), "length >= 16"),
        ("seq", -1, ">= 0"),
        ("data", "a" * PAGE_SIZE, "Expected `bytes`"),
    ],
)
def test_the_source_sends_no_page_frame_its_peer_would_refuse_to_decode(
    field: str, value: object, said: str
) -> None:
    # The source does not decode the page frames it builds again; a field out of its type's
    # bounds still never leaves: the decoder then judges it, with the peer's words.
    pair = Pair()
    _to_first_page(pair)
    page = msgspec.structs.replace(
        pair.source.encrypted_pages([0x1000], [pair.firmware.packet(0x1000)]), **{field: value}
    )
    with pytest.raises(LocalProtocolError, match=said):
        pair.source.send(page)
    assert pair.source.state is State.ERROR
    assert pair.source.pages == 0


@pytest.mark.parametrize(
    ("headers", "data"),
    [(52 * 2 + 1, PAGE_SIZE * 2), (52, PAGE_SIZE * 2), (52 * 2, PAGE_SIZE * 3), (52 * 2, 4097)],
)
def test_a_batch_whose_lengths_disagree_with_its_addresses_is_refused(
    headers: int, data: int
) -> None:
    for side in (SOURCE, TARGET):
        pair = Pair()
        _to_first_page(pair)
        assert pair.source.session_id is not None
        bad = EncryptedPages(
            session=pair.source.session_id,
            seq=0,
            gpas=(0x1000, 0x2000),
            headers=bytes(headers),
            data=bytes(data),
        )
        said = (
            f"carries {headers} bytes of packet headers and {data} bytes of page data for 2 "
            f"guest addresses: expected {2 * 52} and {2 * PAGE_SIZE}"
        )
        if side is SOURCE:
            with pytest.raises(LocalProtocolError, match=said):
                pair.source.send(bad)
        else:
            with pytest.raises(RemoteProtocolError, match=said):
                pair.target.receive(_encode(bad))
        assert pair.conn(side).state is State.ERROR
        assert pair.conn(side).pages == 0


def test_the_source_page_frames_decode_as_the_pages_it_built() -> None:
    pair = Pair()
    _to_first_page(pair)
    for gpas in ([0, 0x1000, 0x2000], [0x5000], PRIVATE[4:]):
        packets = [pair.firmware.packet(gpa) for gpa in gpas]
        page = pair.source.encrypted_pages(gpas, packets)
        frame = pair.source.send(page)
        received = pair.target.receive(frame)
        assert received == page
        assert isinstance(received, EncryptedPages)
        assert received.packets() == [(g, h, d) for g, (h, d) in zip(gpas, packets, strict=True)]
    assert pair.source.pages == pair.target.pages == len(PRIVATE)


def test_a_full_batch_goes_through_and_one_more_page_does_not() -> None:
    def big_pair() -> Pair:
        slots = (MemorySlot(slot=0, guest_phys_addr=0, size=(MAX_BATCH_PAGES + 1) * PAGE_SIZE),)
        pair = Pair()
        pair.describe = msgspec.structs.replace(
            make_describe(), slots=slots, memory_bytes=slots[0].size
        )
        pair.source = RemoteConnection(SOURCE, guest=pair.describe)
        pair.run(5)
        pair.deliver(SOURCE, Round(round=1))
        return pair

    gpas = [i * PAGE_SIZE for i in range(MAX_BATCH_PAGES + 1)]
    pair = big_pair()
    packets = [pair.firmware.packet(gpa) for gpa in gpas]
    full = pair.source.encrypted_pages(gpas[:-1], packets[:-1])
    frame = pair.source.send(full)
    assert len(frame) <= MAX_MESSAGE_BYTES
    assert pair.target.receive(frame) == full
    assert pair.target.pages == MAX_BATCH_PAGES
    pair = big_pair()
    with pytest.raises(LocalProtocolError, match="length <= 64"):
        pair.source.send(pair.source.encrypted_pages(gpas, packets))


def test_an_encrypted_page_for_a_shared_address_is_refused() -> None:
    pair = Pair()
    _to_first_page(pair)
    frame = pair.source.encrypted_pages([0x3000], [pair.firmware.packet(0x3000)])
    with pytest.raises(RemoteProtocolError, match="says is shared"):
        pair.target.receive(_encode(frame))


def test_a_compressed_firmware_packet_is_refused() -> None:
    pair = Pair()
    _to_first_page(pair)
    header, data = pair.firmware.packet(0)
    header = (1).to_bytes(4, "little") + header[4:]
    with pytest.raises(RemoteProtocolError, match="compressed"):
        pair.target.receive(_encode(pair.source.encrypted_pages([0], [(header, data)])))


def test_pages_outside_guest_memory_are_refused() -> None:
    pair = Pair()
    _to_first_page(pair)
    packet = pair.firmware.packet(0)
    for gpa in (SLOT0_PAGES * PAGE_SIZE, SLOT1_GPA + SLOT1_PAGES * PAGE_SIZE):
        frame = _encode(pair.source.encrypted_pages([gpa], [packet]))
        fresh = Pair()
        _to_first_page(fresh)
        with pytest.raises(RemoteProtocolError, match="outside guest memory"):
            fresh.target.receive(frame)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("outside", "EncryptedPages for {page}, outside guest memory"),
        ("again-in-round", "EncryptedPages for {page} a second time in round 1"),
        (
            "again-in-frame",
            "EncryptedPages for {page} a second time in round 1, the first time earlier in this "
            "frame",
        ),
        ("shared", "an encrypted page for {page}, which the shared-region list says is shared"),
        ("compressed", "header flags 0x1 for {page}: compressed packets are not supported"),
        (
            "iv-of-earlier-frame",
            "the firmware packet for {page} repeats the IV of an earlier packet of this session: "
            "a packet sent again",
        ),
        (
            "iv-in-frame",
            "the firmware packet for {page} repeats the IV of an earlier packet of this session "
            "(earlier in this frame): a packet sent again",
        ),
    ],
)
def test_a_bad_page_in_the_middle_of_a_batch_is_refused_naming_it_and_none_is_applied(
    bad: str, said: str
) -> None:
    """Page 1 of a batch of 3 fails one check: the refusal names its place and address, at the
    source (which never sends it) as at the target, and nothing of the batch counts (the
    connection fails anyway: a batch is one frame, whole or refused)."""
    for side in (SOURCE, TARGET):
        pair = Pair()
        _to_first_page(pair)
        earlier = pair.source.encrypted_pages([0x1000], [pair.firmware.packet(0x1000)])
        pair.deliver(SOURCE, earlier)
        gpas = [0x2000, 0x5000, 0x6000]
        packets = [pair.firmware.packet(gpa) for gpa in gpas]
        if bad == "outside":
            gpas[1] = SLOT0_PAGES * PAGE_SIZE
        elif bad == "again-in-round":
            gpas[1] = 0x1000
        elif bad == "again-in-frame":
            gpas[1] = 0x2000
        elif bad == "shared":
            gpas[1] = 0x3000
        elif bad == "compressed":
            packets[1] = ((1).to_bytes(4, "little") + packets[1][0][4:], packets[1][1])
        elif bad == "iv-of-earlier-frame":
            packets[1] = (earlier.headers, earlier.data)
        else:
            packets[1] = packets[0]
        frame = pair.source.encrypted_pages(gpas, packets)
        page = f"guest address {gpas[1]:#x} (page 1 of the frame's 3, sequence number 2)"
        conn = pair.conn(side)
        with pytest.raises(LocalProtocolError if side is SOURCE else RemoteProtocolError) as info:
            if side is SOURCE:
                pair.source.send(frame)
            else:
                pair.target.receive(_encode(frame))
        message = str(info.value)
        assert said.format(page=page) in message
        assert ("earlier in this frame" in message) == bad.endswith("in-frame")
        assert conn.pages == 1  # the earlier frame's page only
        assert conn.state is State.ERROR
    assert pair.target.recovery().recovery is Recovery.TEAR_DOWN
    honest = msgspec.structs.replace(frame, gpas=(0x2000, 0x5000, 0x6000))
    with pytest.raises(RemoteProtocolError, match="already failed"):
        pair.target.receive(_encode(honest))


@pytest.mark.parametrize("seq", [0, 1, 3, 1 << 40])
def test_a_batch_with_another_sequence_number_than_the_next_page_is_refused(seq: int) -> None:
    pair = Pair()
    _to_first_page(pair)
    first = pair.source.encrypted_pages([0, 0x1000], [pair.firmware.packet(g) for g in (0, 0x1000)])
    pair.deliver(SOURCE, first)
    second = pair.source.encrypted_pages([0x2000], [pair.firmware.packet(0x2000)])
    assert second.seq == 2
    with pytest.raises(RemoteProtocolError, match=f"sequence number {seq}, expected 2: frames"):
        pair.target.receive(_encode(msgspec.structs.replace(second, seq=seq)))
    assert pair.target.pages == 2


def _round_frames(pair: Pair, gpas: list[int], size: int) -> list[EncryptedPages]:
    """The honest batches (of `size` pages) of the first round's private pages `gpas`,
    delivered to nobody yet: the source machine sends them (and advances), the test decides
    what the target sees."""
    frames = []
    for at in range(0, len(gpas), size):
        batch = gpas[at : at + size]
        message = pair.source.encrypted_pages(batch, [pair.firmware.packet(g) for g in batch])
        pair.source.send(message)
        frames.append(message)
    return frames


def _with_page(
    frame: EncryptedPages, i: int, gpa: int, header: bytes, data: bytes
) -> EncryptedPages:
    """`frame` with page i replaced (i == its length: appended) by `gpa`, `header`, `data`."""
    packets = frame.packets()
    packets[i : i + 1] = [(gpa, header, data)]
    return msgspec.structs.replace(
        frame,
        gpas=tuple(g for g, _, _ in packets),
        headers=b"".join(h for _, h, _ in packets),
        data=b"".join(d for _, _, d in packets),
    )


def _pages(frame: EncryptedPages, start: int, stop: int) -> EncryptedPages:
    """Pages start..stop of `frame`, in a frame of their own (same first sequence number)."""
    return msgspec.structs.replace(
        frame,
        gpas=frame.gpas[start:stop],
        headers=frame.headers[start * 52 : stop * 52],
        data=frame.data[start * PAGE_SIZE : stop * PAGE_SIZE],
    )


def _mutations(frames: list[EncryptedPages]) -> dict[str, list[Message]]:
    """Ways a hypervisor could mangle a round's frames (3 batches of 2 pages), each with the
    frame list the target sees; the firmware's MAC would accept every packet in them."""
    replace = msgspec.structs.replace
    b0, b1, b2 = frames
    first_gpa, first_header, first_data = b0.packets()[0]
    # The first packet again, as the next page in sequence, for another page: the retargeted
    # packet. Its IV gives it away.
    again = replace(_pages(b0, 0, 1), seq=4, gpas=(ALL_PAGES[10],))
    # b0's second page moved into b1, the frames keeping their sequence numbers.
    moved = _with_page(b1, 2, *b0.packets()[1])
    return {
        "reordered": [b1, b0, b2],
        "duplicated": [b0, b0, b1, b2],
        "dropped": [b1, b2],
        "retargeted": [b0, b1, again],
        # The same, but over a page already sent this round.
        "retargeted-over-sent": [b0, b1, replace(again, gpas=(b1.gpas[0],))],
        "renumbered-duplicate": [b0, replace(b0, seq=2)],
        "other-session": [replace(b0, session=b"\x01" * 16)],
        # Inside one batch: a page twice (address and packet); a packet twice, for two pages.
        "duplicated-in-batch": [_with_page(b0, 1, first_gpa, first_header, first_data)],
        "retargeted-in-batch": [_with_page(b0, 1, b0.gpas[1], first_header, first_data)],
        "moved-to-a-later-batch": [_pages(b0, 0, 1), moved, b2],
    }


def _assert_only_honest_pages_accepted(
    accepted: list[Message | PeerGone], frames: list[EncryptedPages]
) -> None:
    """Every page the machine let through (and so the shell passed to RECEIVE_UPDATE_DATA) is
    one the honest source sent, with its packet and in its place."""
    honest = [packet for frame in frames for packet in frame.packets()]
    for frame in accepted:
        assert isinstance(frame, EncryptedPages)
        for k, packet in enumerate(frame.packets()):
            assert packet == honest[frame.seq + k]


MUTATIONS = [
    "reordered",
    "duplicated",
    "dropped",
    "retargeted",
    "retargeted-over-sent",
    "renumbered-duplicate",
    "other-session",
    "duplicated-in-batch",
    "retargeted-in-batch",
    "moved-to-a-later-batch",
]


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_mangled_page_stream_is_refused_before_the_frame_reaches_the_firmware(
    mutation: str,
) -> None:
    pair = Pair()
    _to_first_page(pair)
    frames = _round_frames(pair, PRIVATE, 2)
    seen = _mutations(frames)[mutation]
    accepted: list[Message | PeerGone] = []
    with pytest.raises(RemoteProtocolError) as info:
        for frame in [*seen, RoundEnd(round=1, pages=len(PRIVATE))]:
            accepted.append(pair.target.receive(_encode(frame)))
    _assert_only_honest_pages_accepted(accepted, frames)
    assert pair.target.state is State.ERROR
    assert pair.target.recovery().recovery is Recovery.TEAR_DOWN
    assert any(word in str(info.value) for word in ("sequence", "IV", "second time", "session"))


def test_a_packet_replayed_in_a_later_round_for_another_page_is_refused_by_its_iv() -> None:
    pair = Pair()
    _to_first_page(pair)
    (first,) = _round_frames(pair, [0x1000], 1)
    pair.target.receive(_encode(first))
    pair.deliver(SOURCE, RoundEnd(round=1, pages=1))
    pair.deliver(SOURCE, Round(round=2))
    replay = msgspec.structs.replace(first, seq=pair.target.pages, gpas=(0x2000,))
    with pytest.raises(RemoteProtocolError, match="repeats the IV"):
        pair.target.receive(_encode(replay))


def test_a_frame_lost_at_the_end_of_a_round_is_caught_by_round_end() -> None:
    pair = Pair()
    _to_first_page(pair)
    frames = _round_frames(pair, [0x1000, 0x2000, 0x5000], 2)
    pair.target.receive(_encode(frames[0]))
    data = pair.source.send(RoundEnd(round=1, pages=3))
    with pytest.raises(RemoteProtocolError, match="had 3 pages; round 1 had 2: frames were lost"):
        pair.target.receive(data)


def _renumbered(frames: list[EncryptedPages]) -> list[EncryptedPages]:
    """`frames` numbered as an honest source would number them (page by page, from 0)."""
    out, seq = [], 0
    for frame in frames:
        out.append(msgspec.structs.replace(frame, seq=seq))
        seq += len(frame.gpas)
    return out


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    pages=st.lists(st.sampled_from(ALL_PAGES), min_size=2, max_size=12, unique=True),
    size=st.integers(1, 4),
    i=st.integers(0, 11),
    j=st.integers(0, 11),
    how=st.sampled_from(["swap", "repeat", "retarget", "drop", "repeat-page", "retarget-page"]),
)
def test_any_reordered_repeated_retargeted_or_dropped_frame_or_page_is_refused(
    pages: list[int], size: int, i: int, j: int, how: str
) -> None:
    pair = Pair(Plan(rounds=[RoundPlan(shared=(), dirty=ALL_PAGES)]))
    pair.run(5)
    pair.deliver(SOURCE, StopAndCopy(round=1))
    frames = _round_frames(pair, pages, size)
    assume(how != "swap" or len(frames) > 1)
    i, j = i % len(frames), j % len(frames)
    seen = list(frames)
    unsent = [gpa for gpa in ALL_PAGES if gpa not in pages]
    # an earlier frame's (or this one's) first page: address, header, data
    gpa, header, data = frames[min(i, j)].packets()[0]
    if how == "swap":
        if i == j:
            j = (i + 1) % len(frames)
        seen[i], seen[j] = seen[j], seen[i]
    elif how == "repeat":
        seen.insert(i + 1, frames[min(i, j)])
    elif how == "retarget":
        # that packet again, as frame i + 1, for a page not yet sent; later frames renumbered
        again = msgspec.structs.replace(_pages(frames[0], 0, 1), gpas=(unsent[0],))
        again = _with_page(again, 0, unsent[0], header, data)
        seen = _renumbered([*seen[: i + 1], again, *seen[i + 1 :]])
    elif how == "repeat-page":
        # that page again (address and packet), at the end of frame i; later frames renumbered
        seen[i] = _with_page(seen[i], len(seen[i].gpas), gpa, header, data)
        seen = _renumbered(seen)
    elif how == "retarget-page":
        # that packet again, at the end of frame i, for a page not yet sent
        seen[i] = _with_page(seen[i], len(seen[i].gpas), unsent[0], header, data)
        seen = _renumbered(seen)
    else:
        del seen[i]
    stream: list[Message] = [*seen, RoundEnd(round=1, pages=len(pages))]
    accepted: list[Message | PeerGone] = []
    with pytest.raises(RemoteProtocolError):
        for frame in stream:
            accepted.append(pair.target.receive(_encode(frame)))
    _assert_only_honest_pages_accepted(accepted, frames)


# ---- protocol versions -------------------------------------------------------------------------


def test_a_source_of_the_per_page_protocol_is_refused_at_hello_with_the_version_refusal() -> None:
    """Version 1 sent one frame per private page; this machine speaks only version 2 (batches),
    so a version-1 source is answered Cancel("version") before anything else is exchanged."""
    target = RemoteConnection(TARGET)
    old = Hello(min_version=1, max_version=1, vm_name="g", vm_uuid=VM_UUID)
    assert target.receive(_encode(old)) == old
    refusal = target.version_refusal()
    assert refusal is not None and refusal.code == CancelCode.VERSION
    assert "the source speaks 1..1, the target 2..2" in refusal.reason
    with pytest.raises(LocalProtocolError, match="no common protocol version"):
        target.make_hello(vm_name="g", vm_uuid=VM_UUID)
    target.send(refusal)
    assert target.recovery().recovery is Recovery.DROP


def test_a_target_of_the_per_page_protocol_is_refused_at_hello() -> None:
    # A version-1 target answers Cancel("version") (it has no common version); one that chose
    # version 1 anyway is refused by the source's machine.
    for answer in (
        Cancel(code=CancelCode.VERSION, reason="no common SEV migration protocol version"),
        Hello(min_version=1, max_version=1, chosen_version=1, vm_name="g", vm_uuid=VM_UUID),
    ):
        source = RemoteConnection(SOURCE, guest=make_describe())
        hello = source.make_hello(vm_name="g", vm_uuid=VM_UUID)
        assert (hello.min_version, hello.max_version) == (2, 2)
        source.send(hello)
        if isinstance(answer, Cancel):
            assert source.receive(_encode(answer)) == answer
            assert source.state is State.CANCELLED
        else:
            with pytest.raises(RemoteProtocolError, match="chose protocol version 1, outside"):
                source.receive(_encode(answer))
        assert source.recovery().recovery is Recovery.NOTHING_TO_DO


# ---- the session is burnt ----------------------------------------------------------------------


def test_a_target_that_recorded_a_session_refuses_its_replay_before_receive_start() -> None:
    record: set[bytes] = set()
    first = Pair(burnt=record)
    rest = first.run(5)
    assert first.target.session_id is not None
    record.add(first.target.session_id)  # the shell: durably, before RECEIVE_START
    for sender, step in rest:
        first.deliver(sender, Pair.build(step))
    assert first.target.state is State.DONE
    # The recorded stream, played again to the same target host.
    replayed = Pair(burnt=record)
    replayed.run(4)
    send_start = next(m for _, m in first.sent if isinstance(m, SendStart))
    with pytest.raises(RemoteProtocolError, match="received before") as info:
        replayed.target.receive(msgspec.msgpack.encode(send_start))
    assert "second copy" in str(info.value)
    assert replayed.target.session_id is None
    assert replayed.target.recovery().recovery is Recovery.DROP  # no RECEIVE_START issued
    # A new SEND_START (a new session) from the same source is accepted.
    fresh = Pair(Plan(rounds=simple_plan().rounds, session=1), burnt=record)
    fresh.run()
    assert fresh.target.state is State.DONE


@settings(max_examples=50)
@given(n=st.integers(0, 1000), m=st.integers(0, 1000))
def test_session_ids_differ_exactly_when_the_session_blobs_differ(n: int, m: int) -> None:
    assert (session_id_of(session_blob(n)) == session_id_of(session_blob(m))) == (n == m)


def test_commit_received_and_resumed_must_name_this_session() -> None:
    pair = Pair()
    rest = pair.run()
    assert not rest
    other = Pair()
    other.run(len(other.script()) - 3)
    with pytest.raises(RemoteProtocolError, match="another session"):
        other.source.receive(msgspec.msgpack.encode(Received(session=b"\x02" * 16)))


# ---- cancel ------------------------------------------------------------------------------------


def test_the_target_may_not_cancel_once_it_sent_received_nor_the_source_after_commit() -> None:
    pair = Pair()
    steps = len(pair.script())
    pair.run(steps - 2)  # up to Received
    assert not pair.target.may_cancel()
    with pytest.raises(LocalProtocolError, match="may not send Cancel"):
        pair.target.send(Cancel(code="internal", reason="too late"))
    pair = Pair()
    pair.run(steps - 1)  # up to Commit
    assert not pair.source.may_cancel()
    with pytest.raises(LocalProtocolError, match="may not send Cancel"):
        pair.source.send(Cancel(code="operator", reason="too late"))


def test_a_source_that_cancels_after_received_has_the_target_tear_down() -> None:
    pair = Pair()
    pair.run(len(pair.script()) - 2)
    assert pair.source.state is State.RECEIVED
    pair.deliver(SOURCE, Cancel(code=CancelCode.FIRMWARE, reason="SEND_FINISH failed: EIO"))
    assert pair.source.recovery().recovery is Recovery.CANCEL_AND_RESUME
    assert pair.target.recovery().recovery is Recovery.TEAR_DOWN
    assert pair.target.cancel is not None and "SEND_FINISH" in pair.target.cancel.reason


def test_messages_crossing_our_cancel_are_returned_and_change_nothing() -> None:
    pair = Pair()
    pair.run(len(pair.script()) - 3)  # up to Finish
    cancel = pair.source.send(Cancel(code="operator", reason="migrate-cancel"))
    received = pair.target.send(Received(session=pair.target.session_id or b""))
    assert pair.source.receive(received) == Received(session=pair.target.session_id or b"")
    assert pair.source.state is State.CANCELLED
    assert pair.target.receive(cancel).code == "operator"  # type: ignore[union-attr]
    assert pair.target.recovery().recovery is Recovery.TEAR_DOWN
    assert pair.source.recovery().recovery is Recovery.CANCEL_AND_RESUME


def test_a_target_cancel_crossing_a_stream_of_pages_stops_the_source() -> None:
    pair = Pair()
    _to_first_page(pair)
    frames = _round_frames(pair, [0x1000, 0x2000, 0x5000], 2)
    cancel = pair.target.send(Cancel(code=CancelCode.FIRMWARE, reason="RECEIVE_START: EIO 11"))
    for frame in frames:  # already on the wire: dropped by the cancelled target
        assert pair.target.receive(msgspec.msgpack.encode(frame)) == frame
    assert pair.target.pages == 0
    assert isinstance(pair.source.receive(cancel), Cancel)
    assert pair.source.recovery().recovery is Recovery.CANCEL_AND_RESUME
    with pytest.raises(LocalProtocolError, match="ended"):
        pair.source.send(RoundEnd(round=1, pages=2))


# ---- garbage -----------------------------------------------------------------------------------

_PREFIXES = st.integers(0, 30)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(role=st.sampled_from([SOURCE, TARGET]), steps=_PREFIXES, data=st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_remote_protocol_error(
    role: Role, steps: int, data: bytes
) -> None:
    pair = Pair()
    pair.run(min(steps, len(pair.script())))
    conn = pair.conn(role)
    try:
        conn.receive(data)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        assert conn.recovery() == RECOVERY[role][conn.ended_in][Ending.GARBAGE]  # type: ignore[index]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=_PREFIXES,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10_000),
)
def test_corrupted_valid_frames_never_raise_anything_but_remote_protocol_error(
    steps: int, edits: list[tuple[int, int]], cut: int
) -> None:
    pair = Pair()
    script = pair.script()
    steps = min(steps, len(script) - 1)
    pair.run(steps)
    sender, step = pair.script()[steps]
    data = bytearray(pair.conn(sender).send(Pair.build(step)))
    for position, value in edits:
        data[position % len(data)] = value
    corrupted = bytes(data[: max(1, cut % (len(data) + 1))])
    receiver = pair.conn(sender.peer)
    try:
        receiver.receive(corrupted)
    except RemoteProtocolError:
        assert receiver.state is State.ERROR


@st.composite
def batches(draw: st.DrawFn) -> EncryptedPages:
    """A batch of private pages of any shape within the decoder's bounds: its lengths agreeing
    with its addresses or not, its headers compressed or not, its IVs repeated or not."""
    gpas = draw(st.lists(st.sampled_from(ALL_PAGES), min_size=1, max_size=4))
    n = len(gpas) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    ivs = draw(st.lists(st.binary(min_size=1, max_size=1), min_size=n, max_size=n))
    flags = draw(st.sampled_from([bytes(4), b"\x01\0\0\0"]))
    return EncryptedPages(
        session=draw(st.binary(min_size=16, max_size=16)),
        seq=draw(st.integers(0, 40)),
        gpas=tuple(gpas),
        headers=b"".join(flags + iv * 16 + bytes(32) for iv in ivs) or bytes(52),
        data=bytes(max(n, 1) * PAGE_SIZE),
    )


_ANY_MESSAGE = st.one_of(
    batches(),
    st.builds(Cancel, code=st.sampled_from(["busy", "x", "Bad"]), reason=st.text(max_size=20)),
    st.builds(Received, session=st.binary(min_size=16, max_size=16)),
    st.builds(Commit, session=st.binary(min_size=16, max_size=16)),
    st.builds(RoundEnd, round=st.integers(1, 4), pages=st.integers(0, 30)),
    st.builds(Round, round=st.integers(1, 4)),
    st.builds(Finish, rounds=st.integers(1, 4), pages=st.integers(0, 40)),
    st.builds(
        SharedPage,
        session=st.binary(min_size=16, max_size=16),
        seq=st.integers(0, 40),
        gpa=st.sampled_from(ALL_PAGES),
        data=st.just(bytes(PAGE_SIZE)),
    ),
    st.just(make_chain()),
    st.just(make_describe()),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from([SOURCE, TARGET]),
    steps=_PREFIXES,
    messages=st.lists(_ANY_MESSAGE, min_size=1, max_size=5),
)
def test_well_typed_messages_out_of_place_never_raise_anything_but_remote_protocol_error(
    role: Role, steps: int, messages: list[Message]
) -> None:
    pair = Pair()
    pair.run(min(steps, len(pair.script())))
    conn = pair.conn(role)
    for message in messages:
        try:
            conn.receive(msgspec.msgpack.encode(message))
        except RemoteProtocolError:
            assert conn.state is State.ERROR
            break


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(first=batches(), second=batches())
def test_a_batch_is_taken_whole_or_not_at_all(
    first: EncryptedPages, second: EncryptedPages
) -> None:
    """Batches of any shape, in this session and numbered in sequence: each one is accepted
    with all its pages counted, or refused with none of them, and then nothing more is."""
    pair = Pair()
    _to_first_page(pair)
    target = pair.target
    for batch in (first, second):
        batch = msgspec.structs.replace(batch, session=target.session_id, seq=target.pages)
        before = target.pages
        try:
            assert target.receive(_encode(batch)) == batch
        except RemoteProtocolError:
            assert target.pages == before and target.state is State.ERROR
            return
        assert target.pages == before + len(batch.gpas)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), earlier=st.lists(st.sampled_from(ALL_PAGES), max_size=3, unique=True))
def test_a_batch_checked_at_once_is_judged_as_page_by_page(
    batch: EncryptedPages, earlier: list[int]
) -> None:
    """The machine tests a whole batch at once and falls back to page by page only when that
    fails: whatever the batch, in any round (shared pages, pages sent before), both say the
    same, the second naming the page."""
    pair = Pair()
    _to_first_page(pair)
    private = [gpa for gpa in earlier if not pair.source.is_shared(gpa)]
    if private:
        pair.deliver(SOURCE, Pair.build(pair._page_builder(*private)))
    target = pair.target
    batch = msgspec.structs.replace(batch, session=target.session_id, seq=target.pages)
    n = len(batch.gpas)
    assume(len(batch.headers) == 52 * n and len(batch.data) == PAGE_SIZE * n)  # the shape first
    verdicts = []
    for check in (target._check_pages, target._check_pages_one_by_one):
        try:
            check(batch)
            verdicts.append(None)
        except Exception as exc:  # the machine's _Violation
            verdicts.append(str(exc))
    assert verdicts[0] == verdicts[1]


# ---- the recovery table ------------------------------------------------------------------------

FAILURES = [e for e in Ending if e is not Ending.COMPLETED]


def test_the_recovery_table_has_a_row_for_every_state_and_ending() -> None:
    for role in (SOURCE, TARGET):
        assert set(RECOVERY[role]) == set(PROGRESS)
        for state in PROGRESS:
            expected = set(FAILURES) | ({Ending.COMPLETED} if state is State.DONE else set())
            assert set(RECOVERY[role][state]) == expected
            for plan in RECOVERY[role][state].values():
                assert plan.why
    with pytest.raises(ValueError, match="cannot end"):
        recovery_for(SOURCE, State.CANCELLED, Ending.TIMEOUT)


def test_the_guest_is_lost_only_where_the_source_is_sent_and_the_target_failed() -> None:
    lost = [
        (role, state, ending)
        for role in (SOURCE, TARGET)
        for state, row in RECOVERY[role].items()
        for ending, plan in row.items()
        if plan.recovery is Recovery.GUEST_LOST
    ]
    assert lost == [(TARGET, State.COMMITTED, Ending.LOCAL_FAILURE)]
    assert "SENT" in RECOVERY[TARGET][State.COMMITTED][Ending.LOCAL_FAILURE].why


def test_the_source_never_resumes_once_it_sent_commit_and_the_target_never_runs_before() -> None:
    for state in PROGRESS:
        for ending in FAILURES:
            source = RECOVERY[SOURCE][state][ending].recovery
            target = RECOVERY[TARGET][state][ending].recovery
            after_commit = PROGRESS.index(state) >= PROGRESS.index(State.COMMITTED)
            assert (source in (Recovery.NOTHING_TO_DO, Recovery.CANCEL_AND_RESUME)) != (
                after_commit
            )
            assert (target in (Recovery.FINISH_AND_RUN, Recovery.DONE)) == (
                after_commit and not (state is State.COMMITTED and ending is Ending.LOCAL_FAILURE)
            )


def test_the_target_holds_in_doubt_only_after_received_and_only_without_a_cancel() -> None:
    for state in PROGRESS:
        for ending in FAILURES:
            held = RECOVERY[TARGET][state][ending].recovery is Recovery.HOLD
            assert held == (state is State.RECEIVED and ending is not Ending.CANCELLED)


@dataclass
class Side:
    conn: RemoteConnection
    dead: bool = False
    plan: Recovery | None = field(default=None)


def _resolve(
    source_plan: Recovery, target_plan: Recovery, session: bytes
) -> tuple[Recovery, Recovery]:
    """The source delivers its decision to the target on a new connection, as the shells do
    after a conversation broke; returns both sides' plans after it."""
    decision = "commit" if source_plan is Recovery.DELIVER_COMMIT else "cancel"
    src = RemoteConnection.resolver(session, decision)
    tgt = RemoteConnection(TARGET)
    tgt.receive(src.send(src.make_hello(vm_name="guest-a", vm_uuid=VM_UUID)))
    src.receive(tgt.send(tgt.make_hello(vm_name="guest-a", vm_uuid=VM_UUID)))
    request = tgt.receive(src.send(src.make_resolve()))
    assert isinstance(request, Resolve) and tgt.resolve_request == request
    held = (
        target_plan
        if target_plan in (Recovery.HOLD, Recovery.FINISH_AND_RUN, Recovery.DONE)
        else None
    )
    action, outcome = held_outcome(request.decision, held)
    src.receive(tgt.send(Resolution(session=session, outcome=outcome)))
    assert src.state is tgt.state is State.RESOLVED
    assert tgt.recovery().recovery is Recovery.DROP  # nothing of the connection's own
    return src.recovery().recovery, action or target_plan


def _runnable_copies(src: Side, tgt: Side, session: bytes | None) -> int:
    """Resolve each side's plan as the shells do (the held target learns the source's
    decision on a new connection, or that the source is gone) and count the copies that run."""
    assert src.plan is not None and tgt.plan is not None
    source_plan, target_plan = src.plan, tgt.plan
    decides = source_plan is Recovery.DELIVER_COMMIT or (
        source_plan is Recovery.CANCEL_AND_RESUME and target_plan is Recovery.HOLD
    )
    if decides and not src.dead and not tgt.dead:
        assert session is not None
        source_plan, target_plan = _resolve(source_plan, target_plan, session)
    elif target_plan is Recovery.HOLD and src.dead:
        # The operator fenced the dead source's host and tells the target to finish: its VM,
        # and the copy in it, died with it.
        target_plan = operator_outcome("finish", Recovery.HOLD).recovery
    assert tgt.dead or target_plan is not Recovery.HOLD, "a held guest was never resolved"
    source_runs = not src.dead and source_plan in (
        Recovery.NOTHING_TO_DO,
        Recovery.CANCEL_AND_RESUME,
    )
    target_runs = not tgt.dead and target_plan in (Recovery.FINISH_AND_RUN, Recovery.DONE)
    return int(source_runs) + int(target_runs)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.integers(0, 40),
    in_flight=st.booleans(),
    delivered=st.booleans(),
    first=st.sampled_from([SOURCE, TARGET]),
    how=st.sampled_from(["dies", "timeout", "garbage", "local-failure"]),
    other_dies=st.booleans(),
)
def test_every_way_a_migration_can_end_leaves_exactly_one_runnable_copy_or_names_the_loss(
    steps: int, in_flight: bool, delivered: bool, first: Role, how: str, other_dies: bool
) -> None:
    """Cut the honest conversation after any message (one more sent and maybe read), let one
    side fail in any way (die, time out, read garbage, fail a step of its own: it sends Cancel
    when it may), and the other side see what follows (EOF, or the Cancel) and perhaps die too.
    Executing both rows of the table then leaves one copy of the guest running, except where
    its only holder died (the source before the target held everything, the target after it
    ran the guest) or the source is SENT and the target failed: what the firmware makes
    unavoidable."""
    pair = Pair(Plan(rounds=[RoundPlan(shared=((0x3000, 1),), dirty=ALL_PAGES[:4])] * 1))
    script = pair.script()
    steps = min(steps, len(script))
    pair.run(steps)
    if in_flight and steps < len(script):
        sender, step = script[steps]
        data = pair.conn(sender).send(Pair.build(step))
        if delivered:
            pair.conn(sender.peer).receive(data)
    sides = {SOURCE: Side(pair.source), TARGET: Side(pair.target)}
    failing, other = sides[first], sides[first.peer]
    if how == "dies":
        failing.dead = True
    elif how == "garbage" and failing.conn.state in LIVE_STATES:
        with pytest.raises(RemoteProtocolError):
            failing.conn.receive(b"\xc1")
    elif how in ("timeout", "local-failure") and failing.conn.state in LIVE_STATES:
        if failing.conn.may_cancel():
            cancel = failing.conn.send(Cancel(code=CancelCode.INTERNAL, reason=how))
            if other.conn.state in LIVE_STATES:
                other.conn.receive(cancel)
        else:
            failing.conn.give_up(Ending.TIMEOUT if how == "timeout" else Ending.LOCAL_FAILURE)
    # The failing side closes (or is gone): the other side reads EOF after what it was sent.
    if other.conn.state is not State.ERROR:
        other.conn.receive(None)
    other.dead = other_dies
    if not failing.dead and failing.conn.state is not State.ERROR:
        failing.conn.receive(None)
    for side in sides.values():
        side.plan = side.conn.recovery().recovery
    copies = _runnable_copies(sides[SOURCE], sides[TARGET], pair.source.session_id)
    assert copies <= 1, "two runnable copies of one guest"
    source_sent = sides[SOURCE].plan in (Recovery.DELIVER_COMMIT, Recovery.DONE)
    target_held_all = PROGRESS.index(pair.target.ended_in or pair.target.state) >= PROGRESS.index(
        State.RECEIVED
    )
    # Lost without a fault of the protocol: every copy that could run is gone, because its
    # holder died (the source's own, or the target's once it held everything) or because the
    # source is SENT (it can never run again) and the target failed.
    source_copy_gone = sides[SOURCE].dead or source_sent
    target_copy_gone = (
        sides[TARGET].dead or not target_held_all or sides[TARGET].plan is Recovery.GUEST_LOST
    )
    unavoidable = source_copy_gone and target_copy_gone
    assert copies == (0 if unavoidable else 1)


# ---- resolving a held guest on a new connection ------------------------------------------------


def _broken_after_received(last: Message | None) -> Pair:
    """A migration whose connection broke after Received: the source sent `last` (Commit or
    Cancel), which never arrived; both sides then saw the connection end."""
    pair = Pair()
    pair.run(len(pair.script()) - 2)
    if last is not None:
        pair.source.send(last)
    pair.source.receive(None)
    pair.target.receive(None)
    assert pair.target.recovery().recovery is Recovery.HOLD
    return pair


def test_a_held_target_runs_the_guest_once_the_source_delivers_commit_again() -> None:
    pair = _broken_after_received(Commit(session=session_id_of(session_blob(0))))
    assert pair.source.recovery().recovery is Recovery.DELIVER_COMMIT
    session = pair.source.session_id
    assert session is not None
    source_after, target_after = _resolve(Recovery.DELIVER_COMMIT, Recovery.HOLD, session)
    assert (source_after, target_after) == (Recovery.DONE, Recovery.FINISH_AND_RUN)


def test_a_held_target_tears_down_when_the_source_says_it_cancelled() -> None:
    pair = _broken_after_received(Cancel(code="firmware", reason="SEND_FINISH failed: EIO"))
    assert pair.source.recovery().recovery is Recovery.CANCEL_AND_RESUME
    assert pair.source.session_id is not None
    source_after, target_after = _resolve(
        Recovery.CANCEL_AND_RESUME, Recovery.HOLD, pair.source.session_id
    )
    assert (source_after, target_after) == (Recovery.NOTHING_TO_DO, Recovery.TEAR_DOWN)


def test_commit_answered_not_held_is_the_loss_the_firmware_makes_unavoidable() -> None:
    src = RemoteConnection.resolver(b"\x07" * 16, "commit")
    assert src.recovery().recovery is Recovery.DELIVER_COMMIT  # until answered: retry
    source_after, target_after = _resolve(Recovery.DELIVER_COMMIT, Recovery.TEAR_DOWN, b"\x07" * 16)
    assert (source_after, target_after) == (Recovery.GUEST_LOST, Recovery.TEAR_DOWN)
    src = RemoteConnection.resolver(b"\x07" * 16, "commit")
    src.receive(None)
    assert "retry" in src.recovery().why


# ---- the operator's decision for a held guest (the source host fenced) --------------------------


def test_the_operator_decides_only_for_a_guest_held_in_doubt_and_by_the_table() -> None:
    assert set(HELD_DECISIONS) == {
        ("source", "commit"),
        ("source", "cancel"),
        ("operator", "finish"),
        ("operator", "give-up"),
    }
    for (_, decision), plan in HELD_DECISIONS.items():
        runs = decision in ("commit", "finish")
        assert plan.recovery is (Recovery.FINISH_AND_RUN if runs else Recovery.TEAR_DOWN)
        assert plan.why
    assert operator_outcome("finish", Recovery.HOLD) == HELD_DECISIONS["operator", "finish"]
    assert operator_outcome("give-up", Recovery.HOLD).recovery is Recovery.TEAR_DOWN
    assert "two copies" in operator_outcome("finish", Recovery.HOLD).why
    assert "lost" in operator_outcome("give-up", Recovery.HOLD).why
    for held, said in (
        (Recovery.DONE, "runs the guest already"),
        (Recovery.FINISH_AND_RUN, "runs the guest already"),
        (None, "holds no received guest"),
    ):
        for decision in ("finish", "give-up"):
            with pytest.raises(LocalProtocolError, match=said):
                operator_outcome(decision, held)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="'finish' or 'give-up'"):
        operator_outcome("commit", Recovery.HOLD)  # type: ignore[arg-type]


DECISIONS = [
    ("source", "commit"),
    ("source", "cancel"),
    ("operator", "finish"),
    ("operator", "give-up"),
]


@settings(max_examples=200)
@given(decisions=st.lists(st.sampled_from(DECISIONS), min_size=1, max_size=6))
def test_a_held_guest_is_decided_once_by_whoever_decides_first(
    decisions: list[tuple[str, str]],
) -> None:
    """The source's decisions (on new connections) and the operator's, in any order, as a
    target's shell executes them: the first one acts, as its row says; after it the operator
    is refused, and a source learns what became of the guest (resumed, or not held)."""
    held: Recovery | None = Recovery.HOLD
    actions: list[Recovery] = []
    for decider, decision in decisions:
        before = held
        if decider == "source":
            action, outcome = held_outcome(decision, held)  # type: ignore[arg-type]
            if before is not Recovery.HOLD:
                assert action is None
                assert outcome == ("resumed" if before is Recovery.DONE else "not-held")
        else:
            try:
                action = operator_outcome(decision, held).recovery  # type: ignore[arg-type]
            except LocalProtocolError:
                assert before is not Recovery.HOLD
                continue
        if action is not None:
            actions.append(action)
            held = Recovery.DONE if action is Recovery.FINISH_AND_RUN else None
    assert actions == [HELD_DECISIONS[decisions[0]].recovery]  # type: ignore[index]


def _resolving_pair(decision: str) -> tuple[RemoteConnection, RemoteConnection]:
    src = RemoteConnection.resolver(b"\x07" * 16, decision)  # type: ignore[arg-type]
    tgt = RemoteConnection(TARGET)
    tgt.receive(src.send(src.make_hello(vm_name="g", vm_uuid=VM_UUID)))
    src.receive(tgt.send(tgt.make_hello(vm_name="g", vm_uuid=VM_UUID)))
    tgt.receive(src.send(src.make_resolve()))
    return src, tgt


@pytest.mark.parametrize(
    ("decision", "answer", "why"),
    [
        ("cancel", Resolution(session=b"\x07" * 16, outcome="resumed"), "second copy"),
        ("commit", Resolution(session=b"\x07" * 16, outcome="torn-down"), "expected one of"),
        ("commit", Resolution(session=b"\x08" * 16, outcome="resumed"), "another session"),
    ],
)
def test_a_resolution_that_contradicts_the_decision_is_refused_naming_why(
    decision: str, answer: Resolution, why: str
) -> None:
    src, _ = _resolving_pair(decision)
    with pytest.raises(RemoteProtocolError, match=why):
        src.receive(msgspec.msgpack.encode(answer))


def test_a_resolver_sends_only_its_resolve_and_a_migrating_source_never_one() -> None:
    src = RemoteConnection.resolver(b"\x07" * 16, "commit")
    tgt = RemoteConnection(TARGET)
    tgt.receive(src.send(src.make_hello(vm_name="g", vm_uuid=VM_UUID)))
    src.receive(tgt.send(tgt.make_hello(vm_name="g", vm_uuid=VM_UUID)))
    with pytest.raises(LocalProtocolError, match="the Describe it was built with"):
        src.send(make_describe())
    pair = Pair()
    pair.run(2)
    with pytest.raises(LocalProtocolError, match="only a resolving connection"):
        pair.source.send(Resolve(session=b"\x07" * 16, decision="commit"))
    with pytest.raises(ValueError, match="resolving connection"):
        RemoteConnection(TARGET, resolving=Resolve(session=b"\x07" * 16, decision="commit"))


# ---- the table, read as the transition table's mirror ------------------------------------------


def test_each_side_may_cancel_exactly_up_to_its_promise() -> None:
    source_may = {s for s, row in TRANSITIONS[SOURCE].items() if Cancel in row}
    target_may = {s for s, row in TRANSITIONS[TARGET].items() if Cancel in row}
    upto = PROGRESS[: PROGRESS.index(State.RECEIVED) + 1]
    assert source_may == set(upto)
    assert target_may == set(upto) - {State.RECEIVED}


def test_a_hello_of_the_intra_host_protocol_is_refused_clearly() -> None:
    from handoff.protocol import local

    hello = local.Hello(min_version=1, max_version=3, vm_name="g", vm_uuid=VM_UUID, nonce=b"n" * 32)
    target = RemoteConnection(TARGET)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        target.receive(msgspec.msgpack.encode(hello))
    assert isinstance(decode(msgspec.msgpack.encode(Pair().source.make_hello(
        vm_name="g", vm_uuid=VM_UUID))), Hello)  # fmt: skip
