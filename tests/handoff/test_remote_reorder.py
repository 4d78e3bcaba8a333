"""handoff's framing against a real firmware stream: reordered, duplicated and retargeted
packets are refused by the target's protocol machine before RECEIVE_UPDATE_DATA.

Reference sev-live-migration.md section 1.5: the firmware's packet MAC binds no GPA, no sequence
number and no session beyond its keys, so within one session RECEIVE_UPDATE_DATA accepts a packet
reordered, repeated or written to another page (section 6, "Anti-replay": the test must show
such a packet caught by handoff, not by the firmware). Here the packets are SEND_UPDATE_DATA's
own, from a guest launched on one kvmstub model host and sent towards another; they travel in
`handoff.protocol.remote` frames (session id, sequence number, GPA; the firmware IV remembered
per session), and the target side does what its shell does: a frame the machine returns goes
to RECEIVE_UPDATE_DATA, one it refuses goes nowhere. Then the same packet is handed to the
firmware directly, which takes it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import pytest

from handoff.protocol.remote import (
    Describe,
    EncryptedPage,
    MemorySlot,
    RemoteConnection,
    RemoteProtocolError,
    Role,
    Round,
    RoundEnd,
    SendStart,
    State,
    platform_chain,
)
from kvmstub import uapi as U
from kvmstub.model import Host, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

PID = 1000
PAGES = 4
POLICY = U.SEV_POLICY_NOKS  # not NODBG: the test reads the received pages with DBG_DECRYPT
VM_UUID = uuid.UUID("5d0e6c3a-7a53-4c8e-9d43-6f0f6a1b2c3d")
ROOT = AmdRoot()


def page_of(i: int) -> bytes:
    return (f"private page {i} ".encode() * 300)[:PAGE_SIZE]


def sev(vm: Vm, cmd: int, fields: dict[str, int | bytes] | None = None) -> dict[str, int | bytes]:
    return vm.sev_ioctl(PID, cmd, fields)


def as_bytes(value: int | bytes) -> bytes:
    assert isinstance(value, bytes)
    return value


@pytest.fixture
def memfds() -> Iterator[Callable[[], int]]:
    made: list[int] = []

    def make() -> int:
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGES * PAGE_SIZE)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


@dataclass
class Migration:
    """A guest in SUPDATE on `src_host`, its receiver in RUPDATE on `dst_host`, and the two
    protocol machines in a pre-copy round; `received` lists the RECEIVE_UPDATE_DATA calls the
    target's shell made (gpa, header)."""

    src: Vm
    dst: Vm
    dst_fd: int
    source: RemoteConnection
    target: RemoteConnection
    received: list[tuple[int, bytes]] = field(default_factory=list)

    def packet(self, gpa: int) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA of one page: the firmware's header and ciphertext."""
        out = sev(
            self.src,
            U.KVM_SEV_SEND_UPDATE_DATA,
            {
                "hdr_uaddr": 1,
                "hdr_len": 52,
                "guest_uaddr": gpa,
                "guest_len": PAGE_SIZE,
                "trans_uaddr": 1,
                "trans_len": PAGE_SIZE,
            },
        )
        return as_bytes(out["hdr"]), as_bytes(out["trans"])

    def frame(self, gpa: int) -> bytes:
        """The source shell's frame for page `gpa`: SEND_UPDATE_DATA, then the machine."""
        header, data = self.packet(gpa)
        return self.source.send(self.source.encrypted_page(gpa, header, data))

    def receive_update_data(self, gpa: int, header: bytes, data: bytes) -> None:
        fields: dict[str, int | bytes] = {
            "hdr": header,
            "guest_uaddr": gpa,
            "guest_len": len(data),
            "trans": data,
        }
        sev(self.dst, U.KVM_SEV_RECEIVE_UPDATE_DATA, fields)

    def deliver(self, frame: bytes) -> None:
        """The target shell: the machine checks the frame; only what it returns reaches the
        firmware."""
        page = self.target.receive(frame)
        assert isinstance(page, EncryptedPage)
        self.received.append((page.gpa, page.header))
        self.receive_update_data(page.gpa, page.header, page.data)

    def target_page(self, gpa: int) -> bytes:
        return os.pread(self.dst_fd, PAGE_SIZE, gpa)

    def decrypted(self, gpa: int) -> bytes:
        sev(self.dst, U.KVM_SEV_RECEIVE_FINISH)
        out = sev(self.dst, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": gpa, "len": PAGE_SIZE})
        return as_bytes(out["data"])


def launched(host: Host, fd: int) -> Vm:
    vm = host.create_vm(PID)
    sev(vm, U.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, PAGES * PAGE_SIZE, fd, 0)
    for i in range(PAGES):
        os.pwrite(fd, page_of(i), i * PAGE_SIZE)
    sev(vm, U.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": POLICY})
    sev(vm, U.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": PAGES * PAGE_SIZE})
    sev(vm, U.KVM_SEV_LAUNCH_MEASURE, {})
    sev(vm, U.KVM_SEV_LAUNCH_FINISH)
    return vm


@pytest.fixture
def migration(memfds: Callable[[], int]) -> Migration:
    src_host = Host(platform=Platform(PlatformKeys.generate(), ROOT))
    dst_host = Host(platform=Platform(PlatformKeys.generate(), ROOT))
    src, dst_fd = launched(src_host, memfds()), memfds()
    describe = Describe(
        vcpus=1,
        memory_bytes=PAGES * PAGE_SIZE,
        slots=(MemorySlot(slot=0, guest_phys_addr=0, size=PAGES * PAGE_SIZE),),
        mode="sev",
        policy=POLICY,
        line_every=200,
        flip_every=50,
    )
    source = RemoteConnection(Role.SOURCE, guest=describe)
    target = RemoteConnection(Role.TARGET, burnt_sessions=set())

    def to_target(message: msgspec.Struct) -> None:
        target.receive(source.send(message))  # type: ignore[arg-type]

    def to_source(message: msgspec.Struct) -> None:
        source.receive(target.send(message))  # type: ignore[arg-type]

    to_target(source.make_hello(vm_name="guest", vm_uuid=VM_UUID))
    to_source(target.make_hello(vm_name="guest", vm_uuid=VM_UUID))
    to_target(source.describe())
    # The target's PDH_CERT_EXPORT and AMD chain, as its shell sends them.
    pdh, chain = dst_host.firmware.platform.pdh_cert_export()
    amd = dst_host.firmware.platform.amd_chain()
    to_source(platform_chain(pdh, chain, amd))
    assert source.chain_refusal() is None
    out = sev(
        src,
        U.KVM_SEV_SEND_START,
        {
            "pdh_cert": pdh,
            "plat_certs": chain,
            "amd_certs": amd,
            "session_uaddr": 1,
            "session_len": 128,
        },
    )
    session, policy = as_bytes(out["session"]), out["policy"]
    assert policy == POLICY
    source_pdh = src_host.firmware.platform.pdh_cert
    to_target(SendStart(session=session, source_pdh=source_pdh, policy=POLICY))
    # The target shell's RECEIVE_START on SendStart.
    dst = dst_host.create_vm(PID)
    sev(dst, U.KVM_SEV_INIT)
    dst.set_user_memory_region(PID, 0, 0, 0, PAGES * PAGE_SIZE, dst_fd, 0)
    sev(dst, U.KVM_SEV_RECEIVE_START, {"policy": POLICY, "pdh": source_pdh, "session": session})
    to_target(Round(round=1))
    assert target.state is State.PRECOPY
    return Migration(src, dst, dst_fd, source, target)


def mutated(frame: bytes, **changes: object) -> bytes:
    page = msgspec.msgpack.decode(frame, type=EncryptedPage)
    return msgspec.msgpack.encode(msgspec.structs.replace(page, **changes))


def refused(m: Migration, frame: bytes, said: str) -> None:
    calls = len(m.received)
    with pytest.raises(RemoteProtocolError, match=said):
        m.deliver(frame)
    assert len(m.received) == calls  # no RECEIVE_UPDATE_DATA for it
    assert m.target.state is State.ERROR


def test_honest_real_frames_go_through_the_machine_to_the_firmware(migration: Migration) -> None:
    m = migration
    for i in range(PAGES):
        m.deliver(m.frame(i * PAGE_SIZE))
    assert [gpa for gpa, _h in m.received] == [i * PAGE_SIZE for i in range(PAGES)]
    sev(m.dst, U.KVM_SEV_RECEIVE_FINISH)
    for i in range(PAGES):
        out = sev(m.dst, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": i * PAGE_SIZE, "len": PAGE_SIZE})
        assert out["data"] == page_of(i)


def test_a_reordered_real_packet_is_refused_by_handoff_though_the_firmware_takes_it(
    migration: Migration,
) -> None:
    m = migration
    first, second = m.frame(0), m.frame(PAGE_SIZE)
    before = m.target_page(PAGE_SIZE)
    refused(m, second, "sequence number 1, expected 0")
    assert m.target_page(PAGE_SIZE) == before
    # The firmware alone: page 1's packet before page 0's verifies and goes in.
    late = msgspec.msgpack.decode(second, type=EncryptedPage)
    m.receive_update_data(late.gpa, late.header, late.data)
    early = msgspec.msgpack.decode(first, type=EncryptedPage)
    m.receive_update_data(early.gpa, early.header, early.data)
    assert m.decrypted(PAGE_SIZE) == page_of(1)


def test_a_duplicated_real_packet_is_refused_by_handoff_though_the_firmware_takes_it(
    migration: Migration,
) -> None:
    m = migration
    first = m.frame(0)
    m.deliver(first)
    refused(m, first, "sequence number 0, expected 1")
    page = msgspec.msgpack.decode(first, type=EncryptedPage)
    m.receive_update_data(page.gpa, page.header, page.data)  # the firmware: accepted again
    assert m.decrypted(0) == page_of(0)


def test_a_duplicated_real_packet_renumbered_in_sequence_is_refused(
    migration: Migration,
) -> None:
    """Renumbered as the next frame it is still the same page in the same round; in a later
    round (where the page may rightly come again) it is still the same firmware packet, and
    its IV, remembered for the session, gives it away."""
    m = migration
    first = m.frame(0)
    m.deliver(first)
    m.target.receive(m.source.send(RoundEnd(round=1, pages=1)))
    m.target.receive(m.source.send(Round(round=2)))
    refused(m, mutated(first, seq=1), "repeats the IV")


def test_a_duplicated_real_packet_renumbered_in_the_same_round_is_refused(
    migration: Migration,
) -> None:
    m = migration
    first = m.frame(0)
    m.deliver(first)
    refused(m, mutated(first, seq=1), "a second time in round 1")


def test_a_retargeted_real_packet_is_refused_by_handoff_though_the_firmware_takes_it(
    migration: Migration,
) -> None:
    """Page 0's packet delivered again, as the next frame in sequence, for page 2: the frame is
    well formed and numbered, but its firmware IV was seen in this session."""
    m = migration
    first = m.frame(0)
    m.deliver(first)
    before = m.target_page(2 * PAGE_SIZE)
    refused(m, mutated(first, seq=1, gpa=2 * PAGE_SIZE), "repeats the IV")
    assert m.target_page(2 * PAGE_SIZE) == before
    # The firmware alone writes page 0's contents into page 2: it binds no address.
    page = msgspec.msgpack.decode(first, type=EncryptedPage)
    m.receive_update_data(2 * PAGE_SIZE, page.header, page.data)
    assert m.decrypted(2 * PAGE_SIZE) == page_of(0)


def test_a_retargeted_real_packet_over_a_page_sent_this_round_is_refused(
    migration: Migration,
) -> None:
    m = migration
    first, second = m.frame(0), m.frame(PAGE_SIZE)
    m.deliver(first)
    refused(m, mutated(second, gpa=0), "a second time in round 1")


def test_a_real_packet_framed_for_another_session_is_refused(migration: Migration) -> None:
    # (Across sessions the firmware refuses too, by the MAC: test_sev_send_receive.py.)
    m = migration
    refused(m, mutated(m.frame(0), session=b"\x07" * 16), "another session")


def test_what_handoff_does_not_bind_a_source_naming_the_wrong_page_first_time(
    migration: Migration,
) -> None:
    """The limit of the binding, stated: the GPA of a frame is the source's word. Frames that
    each carry a fresh packet, in sequence, once per page, pass the machine even when the
    source swapped the pages they name, and the firmware writes them where they say. The
    framing catches what a relay or a replay does to the stream (TLS keeps others from
    writing frames at all); the source VMM is trusted to name the pages it reads."""
    m = migration
    first, second = m.frame(0), m.frame(PAGE_SIZE)
    m.deliver(mutated(first, gpa=PAGE_SIZE))
    m.deliver(mutated(second, gpa=0))
    assert [gpa for gpa, _h in m.received] == [PAGE_SIZE, 0]
    assert m.decrypted(0) == page_of(1)
