"""handoff's framing against a real firmware stream: reordered, duplicated and retargeted
packets are refused by the target's protocol machine before RECEIVE_UPDATE_DATA.

Reference sev-live-migration.md section 1.5: the firmware's packet MAC binds no GPA, no sequence
number and no session beyond its keys, so within one session RECEIVE_UPDATE_DATA accepts a packet
reordered, repeated or written to another page (section 6, "Anti-replay": the test must show
such a packet caught by handoff, not by the firmware). Here the packets are SEND_UPDATE_DATA's
own, from a guest launched on one kvmstub model host and sent towards another; they travel in
`handoff.protocol.remote` frames, a batch of pages a frame (session id, the first page's sequence
number, each page's GPA; the firmware IV remembered per session), and the target side does what
its shell does: each page of a frame the machine returns goes to RECEIVE_UPDATE_DATA, no page of
one it refuses goes anywhere. Then the same packet is handed to the firmware directly, which
takes it.
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
    EncryptedPages,
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

    def frame(self, *gpas: int) -> bytes:
        """The source shell's frame for a batch of pages `gpas`: SEND_UPDATE_DATA of each, then
        the machine."""
        packets = [self.packet(gpa) for gpa in gpas]
        return self.source.send(self.source.encrypted_pages(gpas, packets))

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
        firmware, each page of the batch in order."""
        batch = self.target.receive(frame)
        assert isinstance(batch, EncryptedPages)
        for gpa, header, data in batch.packets():
            self.received.append((gpa, header))
            self.receive_update_data(gpa, header, data)

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


def batch_of(frame: bytes) -> EncryptedPages:
    return msgspec.msgpack.decode(frame, type=EncryptedPages)


def mutated(frame: bytes, **changes: object) -> bytes:
    return msgspec.msgpack.encode(msgspec.structs.replace(batch_of(frame), **changes))


def with_packets(frame: bytes, packets: list[tuple[int, bytes, bytes]]) -> bytes:
    """`frame` carrying `packets` (gpa, header, data) instead of its own, its number kept."""
    return mutated(
        frame,
        gpas=tuple(gpa for gpa, _, _ in packets),
        headers=b"".join(header for _, header, _ in packets),
        data=b"".join(data for _, _, data in packets),
    )


def refused(m: Migration, frame: bytes, said: str) -> None:
    calls, pages = len(m.received), m.target.pages
    with pytest.raises(RemoteProtocolError, match=said):
        m.deliver(frame)
    assert len(m.received) == calls  # no RECEIVE_UPDATE_DATA for any page of it
    assert m.target.pages == pages
    assert m.target.state is State.ERROR


def test_honest_real_frames_go_through_the_machine_to_the_firmware(migration: Migration) -> None:
    m = migration
    m.deliver(m.frame(0, PAGE_SIZE))
    m.deliver(m.frame(2 * PAGE_SIZE, 3 * PAGE_SIZE))
    assert [gpa for gpa, _h in m.received] == [i * PAGE_SIZE for i in range(PAGES)]
    sev(m.dst, U.KVM_SEV_RECEIVE_FINISH)
    for i in range(PAGES):
        out = sev(m.dst, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": i * PAGE_SIZE, "len": PAGE_SIZE})
        assert out["data"] == page_of(i)


def test_a_reordered_real_batch_is_refused_by_handoff_though_the_firmware_takes_it(
    migration: Migration,
) -> None:
    m = migration
    first, second = m.frame(0, PAGE_SIZE), m.frame(2 * PAGE_SIZE, 3 * PAGE_SIZE)
    before = m.target_page(2 * PAGE_SIZE)
    refused(m, second, "sequence number 2, expected 0")
    assert m.target_page(2 * PAGE_SIZE) == before
    # The firmware alone: the second batch's packets before the first's verify and go in.
    for gpa, header, data in [*batch_of(second).packets(), *batch_of(first).packets()]:
        m.receive_update_data(gpa, header, data)
    assert m.decrypted(2 * PAGE_SIZE) == page_of(2)


def test_a_real_packet_moved_to_a_later_batch_is_refused(migration: Migration) -> None:
    """Page 1's packet taken out of the first batch and put in front of the second, each
    frame keeping its number: the second no longer starts where the first ends."""
    m = migration
    first, second = m.frame(0, PAGE_SIZE), m.frame(2 * PAGE_SIZE, 3 * PAGE_SIZE)
    page0, page1 = batch_of(first).packets()
    m.deliver(with_packets(first, [page0]))
    refused(m, with_packets(second, [page1, *batch_of(second).packets()]), "sequence number 2")
    # The firmware alone takes page 1's packet after pages 2 and 3 as readily.
    for gpa, header, data in [*batch_of(second).packets(), page1]:
        m.receive_update_data(gpa, header, data)
    assert m.decrypted(PAGE_SIZE) == page_of(1)


def test_a_duplicated_real_batch_is_refused_by_handoff_though_the_firmware_takes_it(
    migration: Migration,
) -> None:
    m = migration
    first = m.frame(0, PAGE_SIZE)
    m.deliver(first)
    refused(m, first, "sequence number 0, expected 2")
    for gpa, header, data in batch_of(first).packets():  # the firmware: accepted again
        m.receive_update_data(gpa, header, data)
    assert m.decrypted(0) == page_of(0)


def test_a_real_packet_duplicated_inside_its_batch_is_refused(migration: Migration) -> None:
    m = migration
    frame = m.frame(0, PAGE_SIZE)
    page0, _ = batch_of(frame).packets()
    refused(
        m,
        with_packets(frame, [page0, page0]),
        r"address 0x0 \(page 1 of the frame's 2, sequence number 1\) a second time in round 1, "
        "the first time earlier in this frame",
    )
    for gpa, header, data in (page0, page0):  # the firmware: the same packet twice
        m.receive_update_data(gpa, header, data)
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
    refused(m, mutated(first, seq=1, gpas=(2 * PAGE_SIZE,)), "repeats the IV")
    assert m.target_page(2 * PAGE_SIZE) == before
    # The firmware alone writes page 0's contents into page 2: it binds no address.
    ((_, header, data),) = batch_of(first).packets()
    m.receive_update_data(2 * PAGE_SIZE, header, data)
    assert m.decrypted(2 * PAGE_SIZE) == page_of(0)


def test_a_real_packet_retargeted_inside_its_batch_is_refused(migration: Migration) -> None:
    """Page 0's packet in the same frame again, for page 1 in place of page 1's own: the IV
    repeats within the frame, and nothing of the frame reaches the firmware."""
    m = migration
    frame = m.frame(0, PAGE_SIZE)
    (_, header, data), _ = batch_of(frame).packets()
    before = m.target_page(0), m.target_page(PAGE_SIZE)
    refused(
        m,
        with_packets(frame, [(0, header, data), (PAGE_SIZE, header, data)]),
        r"repeats the IV of an earlier packet of this session \(earlier in this frame\)",
    )
    assert (m.target_page(0), m.target_page(PAGE_SIZE)) == before  # not even page 0
    m.receive_update_data(PAGE_SIZE, header, data)  # the firmware alone: page 0's, in page 1
    assert m.decrypted(PAGE_SIZE) == page_of(0)


def test_a_retargeted_real_packet_over_a_page_sent_this_round_is_refused(
    migration: Migration,
) -> None:
    m = migration
    first, second = m.frame(0), m.frame(PAGE_SIZE)
    m.deliver(first)
    refused(m, mutated(second, gpas=(0,)), "a second time in round 1")


def test_a_real_packet_framed_for_another_session_is_refused(migration: Migration) -> None:
    # (Across sessions the firmware refuses too, by the MAC: test_sev_send_receive.py.)
    m = migration
    refused(m, mutated(m.frame(0, PAGE_SIZE), session=b"\x07" * 16), "another session")


def test_what_handoff_does_not_bind_a_source_naming_the_wrong_page_first_time(
    migration: Migration,
) -> None:
    """The limit of the binding, stated: the GPA of a page is the source's word. A batch in
    which each page carries a fresh packet, in sequence, once per page, passes the machine
    even when the source swapped the pages it names, and the firmware writes them where they
    say. The framing catches what a relay or a replay does to the stream (TLS keeps others
    from writing frames at all, or from changing one); the source VMM is trusted to name the
    pages it reads. Within a frame, the order of its pages is the source's too: the same
    pages, each with its own packet, in another order, are the same writes."""
    m = migration
    frame = m.frame(0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE)
    (g0, h0, d0), (g1, h1, d1), (g2, h2, d2), (g3, h3, d3) = batch_of(frame).packets()
    m.deliver(with_packets(frame, [(g1, h0, d0), (g0, h1, d1), (g3, h3, d3), (g2, h2, d2)]))
    assert [gpa for gpa, _h in m.received] == [PAGE_SIZE, 0, 3 * PAGE_SIZE, 2 * PAGE_SIZE]
    assert m.decrypted(0) == page_of(1)
    for i in (2, 3):  # reordered with their packets: each where it belongs
        out = sev(m.dst, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": i * PAGE_SIZE, "len": PAGE_SIZE})
        assert out["data"] == page_of(i)
