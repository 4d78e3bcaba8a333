"""The SEV firmware model's SEND/RECEIVE_UPDATE commands where KVM cannot reach them.

KVM hands the firmware at most one 4 KiB page per SEND/RECEIVE_UPDATE_DATA and refuses more
with EINVAL before the PSP sees it (reference sev-live-migration.md section 1.6), and it has no
SEND/RECEIVE_UPDATE_VMSA ioctl at all. So the firmware's own bounds (a packet of up to 0x5000
bytes, in multiples of 16, section 1.3) and the VMSA commands' success on an SEV-ES guest are
tested here on `SevFirmware` itself, called as the PSP would be. The KVM paths are
tests/kvmstub/test_sev_send_receive.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kvmstub import sev_crypto, uapi
from kvmstub.memory import GuestMemory
from kvmstub.model import SEV_PLATFORM_INIT, Host, SevFirmware, SevFwError, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

U = uapi
PID = 1000
PAGES = 8  # room for a 0x5000-byte packet (five pages) at an offset
MAX = sev_crypto.MAX_PACKET_LEN
HDR = sev_crypto.PACKET_HEADER_LEN
ROOT = AmdRoot()
ES_POLICY = U.SEV_POLICY_ES | U.SEV_POLICY_NOKS


def expect_fw(fw_error: int, call: Callable[[], object]) -> SevFwError:
    with pytest.raises(SevFwError) as info:
        call()
    assert info.value.fw_error == fw_error, str(info.value)
    return info.value


def plaintext(length: int, tag: str = "") -> bytes:
    return (f"guest bytes {tag} ".encode() * (length // 12 + 1))[:length]


@dataclass
class Side:
    host: Host
    vm: Vm  # a VM that gives the firmware guest memory (its pages; the firmware's handle is ours)
    fd: int

    @property
    def fw(self) -> SevFirmware:
        return self.host.firmware

    @property
    def mem(self) -> GuestMemory:
        assert self.vm.memory is not None
        return self.vm.memory


def side(fd: int) -> Side:
    host = Host(platform=Platform(PlatformKeys.generate(), ROOT))
    vm = host.create_vm(PID)
    vm.set_user_memory_region(PID, 0, 0, 0, PAGES * PAGE_SIZE, fd, 0)
    return Side(host, vm, fd)


def launch(src: Side, policy: int, asid: int) -> int:
    """A guest launched at firmware level (LAUNCH_START .. LAUNCH_FINISH), bound to `asid`,
    with its memory written as `plaintext(PAGES * PAGE_SIZE)` and encrypted in place."""
    os.pwrite(src.fd, plaintext(PAGES * PAGE_SIZE), 0)
    fw = src.fw
    handle = fw.launch_start(0, policy).handle
    fw.activate(handle, asid)
    fw.launch_update_data(handle, src.mem, 0, PAGES * PAGE_SIZE)
    fw.launch_measure(handle)
    fw.launch_finish(handle)
    return handle


def send_start(src: Side, handle: int, dst: Side) -> tuple[bytes, int]:
    pdh, chain = dst.fw.platform.pdh_cert_export()
    return src.fw.send_start(handle, pdh, chain, dst.fw.platform.amd_chain(), 128)


def receive_start(src: Side, dst: Side, policy: int, session: bytes, asid: int) -> int:
    ctx = dst.fw.receive_start(0, policy, src.fw.platform.pdh_cert, session)
    dst.fw.activate(ctx.handle, asid)
    return ctx.handle


@dataclass
class Migration:
    src: Side
    dst: Side
    src_handle: int
    dst_handle: int


@pytest.fixture
def sev_migration(memfds: Callable[[], int]) -> Migration:
    """A plain SEV guest in SUPDATE on one platform and its receiver in RUPDATE on another."""
    src, dst = side(memfds()), side(memfds())
    asid = src.host.asids.min_sev_asid
    handle = launch(src, 0, asid)
    session, policy = send_start(src, handle, dst)
    return Migration(src, dst, handle, receive_start(src, dst, policy, session, asid))


def private(dst: Side, handle: int, gpa: int, length: int) -> bytes:
    """What the guest `handle` reads at [gpa, gpa+length) (decrypted with its VEK)."""
    vek = dst.fw.contexts[handle].vek
    first, end = gpa - gpa % PAGE_SIZE, gpa + length
    pages = range(first, end, PAGE_SIZE)
    return b"".join(dst.mem.read_page(p, vek) for p in pages)[gpa - first :][:length]


# ---- the firmware's packet length: up to 0x5000 bytes, multiples of 16 (section 1.3) ----------


def test_a_0x5000_byte_packet_across_pages_goes_through_the_firmware_both_ways(
    sev_migration: Migration,
) -> None:
    m = sev_migration
    gpa = 0x10  # 16-byte aligned, five pages long, so it spans six pages
    hdr, trans = m.src.fw.send_update_data(m.src_handle, m.src.mem, gpa, MAX, HDR, MAX)
    assert len(hdr) == HDR and len(trans) == MAX
    m.dst.fw.receive_update_data(m.dst_handle, m.dst.mem, gpa, MAX, hdr, trans)
    m.dst.fw.receive_finish(m.dst_handle)
    assert private(m.dst, m.dst_handle, gpa, MAX) == plaintext(PAGES * PAGE_SIZE)[gpa : gpa + MAX]


@pytest.mark.parametrize(
    ("guest_len", "trans_len"),
    [
        (MAX + 16, MAX + 16),  # above 0x5000
        (0, 16),  # empty
        (100, 112),  # not a multiple of 16
        (PAGE_SIZE, PAGE_SIZE - 16),  # the transport buffer shorter than the guest range
    ],
    ids=["above-0x5000", "zero", "not-x16", "trans-short"],
)
def test_send_update_data_refuses_firmware_lengths_with_invalid_len(
    sev_migration: Migration, guest_len: int, trans_len: int
) -> None:
    m = sev_migration
    expect_fw(
        U.SEV_RET_INVALID_LEN,
        lambda: m.src.fw.send_update_data(m.src_handle, m.src.mem, 0, guest_len, HDR, trans_len),
    )


def test_send_update_data_checks_in_the_firmware_order(sev_migration: Migration) -> None:
    """Section 1.3: WORKING, hdr_size (before the handle), handle, SUPDATE, ES for VMSA, ASID,
    lengths, address. Each call breaks two checks; the earlier one answers."""
    m = sev_migration
    fw, mem, h = m.src.fw, m.src.mem, m.src_handle
    bad_len = MAX + 16
    # hdr_size before the handle: the query answers for any handle, with the length.
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: fw.send_update_data(999, mem, 0, 16, 0, 16))
    assert err.fields == {"hdr_len": HDR}
    # The handle before the lengths.
    expect_fw(U.SEV_RET_INVALID_GUEST, lambda: fw.send_update_data(999, mem, 0, bad_len, HDR, 0))
    # The guest's state before the lengths: a guest still RUNNING (no SEND_START).
    running = launch(m.src, 0, m.src.host.asids.min_sev_asid + 1)
    expect_fw(
        U.SEV_RET_INVALID_GUEST_STATE,
        lambda: fw.send_update_data(running, mem, 0, bad_len, HDR, bad_len),
    )
    # ES for a VMSA before the lengths.
    expect_fw(
        U.SEV_RET_UNSUPPORTED,
        lambda: fw.send_update_data(h, mem, 0, bad_len, HDR, bad_len, vmsa=True),
    )
    # The lengths before the address.
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: fw.send_update_data(h, mem, 8, 100, HDR, 100))
    expect_fw(U.SEV_RET_INVALID_ADDRESS, lambda: fw.send_update_data(h, mem, 8, 16, HDR, 16))
    # An inactive guest (no ASID) before the lengths.
    fw.deactivate(h)
    expect_fw(U.SEV_RET_INACTIVE, lambda: fw.send_update_data(h, mem, 0, bad_len, HDR, bad_len))
    # The platform's state first of all.
    fw.platform_state = SEV_PLATFORM_INIT  # as if no guest existed
    expect_fw(U.SEV_RET_INVALID_PLATFORM_STATE, lambda: fw.send_update_data(999, mem, 0, 16, 0, 16))


@pytest.mark.parametrize(
    ("trans_len", "guest_len", "hdr_len"),
    [
        (MAX + 16, MAX + 16, HDR),  # above 0x5000
        (0, 0, HDR),  # empty
        (112, 112 - 16, HDR),  # guest_len != trans_len
        (100, 100, HDR),  # not a multiple of 16
        (PAGE_SIZE, PAGE_SIZE, HDR - 1),  # a short header
    ],
    ids=["above-0x5000", "zero", "guest-ne-trans", "not-x16", "short-header"],
)
def test_receive_update_data_refuses_firmware_lengths_with_invalid_len(
    sev_migration: Migration, trans_len: int, guest_len: int, hdr_len: int
) -> None:
    m = sev_migration
    before = os.pread(m.dst.fd, PAGES * PAGE_SIZE, 0)
    expect_fw(
        U.SEV_RET_INVALID_LEN,
        lambda: m.dst.fw.receive_update_data(
            m.dst_handle, m.dst.mem, 0, guest_len, bytes(hdr_len), bytes(trans_len)
        ),
    )
    assert os.pread(m.dst.fd, PAGES * PAGE_SIZE, 0) == before


def test_receive_update_data_checks_in_the_firmware_order(sev_migration: Migration) -> None:
    """Section 1.3: WORKING, handle, RUPDATE, ES for VMSA, ASID, lengths, address, compressed
    flag, MAC. Each call breaks two checks; the earlier one answers."""
    m = sev_migration
    fw, mem, h = m.dst.fw, m.dst.mem, m.dst_handle
    hdr, trans = m.src.fw.send_update_data(m.src_handle, m.src.mem, 0, 64, HDR, 64)
    long = bytes(MAX + 16)
    expect_fw(U.SEV_RET_INVALID_GUEST, lambda: fw.receive_update_data(999, mem, 0, 1, hdr, long))
    expect_fw(
        U.SEV_RET_UNSUPPORTED,
        lambda: fw.receive_update_data(h, mem, 0, len(long), hdr, long, vmsa=True),
    )
    # The lengths before the address; the address before the flags; the flags before the MAC.
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: fw.receive_update_data(h, mem, 8, 100, hdr, long))
    compressed = struct.pack("<I", sev_crypto.PACKET_FLAG_COMPRESSED) + hdr[4:]
    expect_fw(
        U.SEV_RET_INVALID_ADDRESS,
        lambda: fw.receive_update_data(h, mem, 8, 64, compressed, trans),
    )
    bad_mac = compressed[:-1] + bytes([compressed[-1] ^ 1])
    expect_fw(U.SEV_RET_UNSUPPORTED, lambda: fw.receive_update_data(h, mem, 0, 64, bad_mac, trans))
    expect_fw(
        U.SEV_RET_BAD_MEASUREMENT,
        lambda: fw.receive_update_data(h, mem, 0, 64, hdr[:-1] + bytes([hdr[-1] ^ 1]), trans),
    )
    fw.deactivate(h)
    expect_fw(U.SEV_RET_INACTIVE, lambda: fw.receive_update_data(h, mem, 0, 1, hdr, long))
    fw.activate(h, m.dst.host.asids.min_sev_asid)
    fw.receive_update_data(h, mem, 0, 64, hdr, trans)  # the genuine packet still goes in
    fw.receive_finish(h)
    # RUNNING now: the state check comes before the lengths.
    expect_fw(
        U.SEV_RET_INVALID_GUEST_STATE, lambda: fw.receive_update_data(h, mem, 0, 1, hdr, long)
    )
    assert private(m.dst, h, 0, 64) == plaintext(64)


# ---- SEND/RECEIVE_UPDATE_VMSA succeed for an SEV-ES guest (firmware only) ------------------------


def test_an_es_guests_vmsa_goes_through_send_and_receive_update_vmsa(
    memfds: Callable[[], int],
) -> None:
    """The firmware has the VMSA commands and they work for an SEV-ES guest in SUPDATE and
    RUPDATE (KVM cannot issue them: test_sev_send_receive.py). The model reads and writes the
    VMSA as the guest range it is given, under the VEK, with the DATA MAC context as this
    firmware does (section 1.5)."""
    src, dst = side(memfds()), side(memfds())
    es_asid = 1  # SEV-ES ASIDs are 1..min_sev_asid-1
    assert src.host.asids.is_es(es_asid) and dst.host.asids.is_es(es_asid)
    handle = launch(src, ES_POLICY, es_asid)
    session, policy = send_start(src, handle, dst)
    assert policy == ES_POLICY
    dst_handle = receive_start(src, dst, policy, session, es_asid)
    vmsa_gpa = 3 * PAGE_SIZE
    hdr, trans = src.fw.send_update_data(
        handle, src.mem, vmsa_gpa, PAGE_SIZE, HDR, PAGE_SIZE, vmsa=True
    )
    assert plaintext(PAGES * PAGE_SIZE)[vmsa_gpa : vmsa_gpa + PAGE_SIZE] not in trans
    dst.fw.receive_update_data(dst_handle, dst.mem, vmsa_gpa, PAGE_SIZE, hdr, trans, vmsa=True)
    # The same commands without `vmsa` work too for an ES guest (SEND/RECEIVE_UPDATE_DATA).
    hdr0, trans0 = src.fw.send_update_data(handle, src.mem, 0, PAGE_SIZE, HDR, PAGE_SIZE)
    dst.fw.receive_update_data(dst_handle, dst.mem, 0, PAGE_SIZE, hdr0, trans0)
    src.fw.send_finish(handle)
    dst.fw.receive_finish(dst_handle)
    assert src.fw.contexts[handle].state == U.SEV_GUEST_STATE_SENT
    assert dst.fw.contexts[dst_handle].state == U.SEV_GUEST_STATE_RUNNING
    expected = plaintext(PAGES * PAGE_SIZE)
    assert private(dst, dst_handle, vmsa_gpa, PAGE_SIZE) == expected[vmsa_gpa:][:PAGE_SIZE]
    assert private(dst, dst_handle, 0, PAGE_SIZE) == expected[:PAGE_SIZE]


def test_the_vmsa_commands_of_an_es_guest_still_need_supdate_and_rupdate(
    memfds: Callable[[], int],
) -> None:
    src, dst = side(memfds()), side(memfds())
    handle = launch(src, ES_POLICY, 1)
    mem = src.mem
    expect_fw(
        U.SEV_RET_INVALID_GUEST_STATE,
        lambda: src.fw.send_update_data(handle, mem, 0, PAGE_SIZE, HDR, PAGE_SIZE, vmsa=True),
    )
    session, policy = send_start(src, handle, dst)
    hdr, trans = src.fw.send_update_data(handle, mem, 0, PAGE_SIZE, HDR, PAGE_SIZE, vmsa=True)
    dst_handle = receive_start(src, dst, policy, session, 1)
    dst.fw.receive_finish(dst_handle)
    expect_fw(
        U.SEV_RET_INVALID_GUEST_STATE,
        lambda: dst.fw.receive_update_data(
            dst_handle, dst.mem, 0, PAGE_SIZE, hdr, trans, vmsa=True
        ),
    )
