"""Cross-host SEV migration in the model: the firmware's SEND_*/RECEIVE_* commands and KVM's
ioctls over them, two platforms (two `Host`s) under one simulated AMD root.

"Section" numbers point into the reference sev-live-migration.md. Every check of its
section 6 firmware and KVM-layer checklist that kvmstub implements has a test here, with its
status code; the client ioctl path between two daemons is
tests/kernel/test_sev_send_receive_two_hosts.py.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kvmstub import sev_crypto, uapi
from kvmstub.model import Host, SevFwError, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

PID = 1000
U = uapi
PAGES = 4
ROOT = AmdRoot()  # one simulated AMD root for the module (made on first use: RSA-4096)


# --------------------------------------------------------------------------------------------
# helpers


def expect_errno(code: int, call: Callable[[], object]) -> OSError:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == code, f"{info.value} (wanted {errno.errorcode[code]})"
    return info.value


def expect_fw(fw_error: int, call: Callable[[], object]) -> SevFwError:
    with pytest.raises(SevFwError) as info:
        call()
    assert info.value.errno == errno.EIO
    assert info.value.fw_error == fw_error, str(info.value)
    return info.value


def sev(vm: Vm, cmd: int, fields: dict[str, int | bytes] | None = None) -> dict[str, int | bytes]:
    return vm.sev_ioctl(PID, cmd, fields)


def host_under(root: AmdRoot = ROOT, **kwargs: object) -> Host:
    return Host(platform=Platform(PlatformKeys.generate(), root), **kwargs)  # type: ignore[arg-type]


def page_of(i: int) -> bytes:
    """Recognisable plaintext for guest page i."""
    return (f"secret page {i} ".encode() * 400)[:PAGE_SIZE]


def launched(host: Host, fd: int, policy: int = 0) -> Vm:
    """An SEV guest launched with PAGES private pages of known plaintext, RUNNING."""
    vm = host.create_vm(PID)
    sev(vm, U.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, PAGES * PAGE_SIZE, fd, 0)
    for i in range(PAGES):
        os.pwrite(fd, page_of(i), i * PAGE_SIZE)
    sev(vm, U.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": policy})
    sev(vm, U.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": PAGES * PAGE_SIZE})
    sev(vm, U.KVM_SEV_LAUNCH_MEASURE, {})
    sev(vm, U.KVM_SEV_LAUNCH_FINISH)
    return vm


def receiver(host: Host, fd: int) -> Vm:
    """The target's VM: KVM_SEV_INIT (an ASID, no handle yet) and the same memory layout."""
    vm = host.create_vm(PID)
    sev(vm, U.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, PAGES * PAGE_SIZE, fd, 0)
    return vm


def export(host: Host) -> tuple[bytes, bytes, bytes]:
    """What a target hands its source: PDH, PEK||OCA||CEK (PDH_CERT_EXPORT) and ASK||ARK."""
    query = expect_fw(
        U.SEV_RET_INVALID_LEN,
        lambda: host.sev_issue_cmd(U.SEV_PDH_CERT_EXPORT, {"pdh_cert_len": 0}),
    )
    out = host.sev_issue_cmd(
        U.SEV_PDH_CERT_EXPORT,
        {
            "pdh_cert_address": 1,
            "pdh_cert_len": query.fields["pdh_cert_len"],
            "cert_chain_address": 1,
            "cert_chain_len": query.fields["cert_chain_len"],
        },
    )
    amd = host.sev_issue_cmd(U.KVMSTUB_SEV_AMD_CERT_CHAIN, None)["amd_certs"]
    pdh, chain = out["pdh_cert"], out["cert_chain"]
    assert isinstance(pdh, bytes) and isinstance(chain, bytes) and isinstance(amd, bytes)
    return pdh, chain, amd


def send_start_fields(target: Host) -> dict[str, int | bytes]:
    pdh, chain, amd = export(target)
    return {
        "pdh_cert": pdh,
        "plat_certs": chain,
        "amd_certs": amd,
        "session_uaddr": 1,
        "session_len": 128,
    }


def start_receive(dst: Vm, source: Host, sent: dict[str, int | bytes]) -> None:
    """RECEIVE_START on the target `dst` for the session a SEND_START gave (`sent`: its
    output, the session blob and the policy), from the `source` platform's PDH."""
    sev(
        dst,
        U.KVM_SEV_RECEIVE_START,
        {
            "handle": 0,
            "policy": sent["policy"],
            "pdh": source.firmware.platform.pdh_cert,
            "session": sent["session"],
        },
    )


def send_page(vm: Vm, gpa: int, length: int = PAGE_SIZE) -> tuple[bytes, bytes]:
    out = sev(
        vm,
        U.KVM_SEV_SEND_UPDATE_DATA,
        {
            "hdr_uaddr": 1,
            "hdr_len": 52,
            "guest_uaddr": gpa,
            "guest_len": length,
            "trans_uaddr": 1,
            "trans_len": length,
        },
    )
    hdr, trans = out["hdr"], out["trans"]
    assert isinstance(hdr, bytes) and isinstance(trans, bytes)
    return hdr, trans


def receive_page(vm: Vm, gpa: int, hdr: bytes, trans: bytes) -> None:
    fields: dict[str, int | bytes] = {
        "hdr": hdr,
        "guest_uaddr": gpa,
        "guest_len": len(trans),
        "trans": trans,
    }
    sev(vm, U.KVM_SEV_RECEIVE_UPDATE_DATA, fields)


def state(vm: Vm) -> int:
    out = sev(vm, U.KVM_SEV_GUEST_STATUS, {})["state"]
    assert isinstance(out, int)
    return out


def decrypt(vm: Vm, gpa: int, length: int = PAGE_SIZE) -> bytes:
    data = sev(vm, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": gpa, "len": length})["data"]
    assert isinstance(data, bytes)
    return data


@dataclass
class Stream:
    """A captured migration stream, as [Q2]'s format carries it (section 1.5): policy, the
    source PDH, the session, then (gpa, header, ciphertext) per page."""

    policy: int
    source_pdh: bytes
    session: bytes
    packets: list[tuple[int, bytes, bytes]]

    def wire_bytes(self) -> bytes:
        out = struct.pack(">I", self.policy)
        out += struct.pack(">I", len(self.source_pdh)) + self.source_pdh
        out += struct.pack(">I", len(self.session)) + self.session
        for _gpa, hdr, trans in self.packets:
            out += struct.pack(">I", len(hdr)) + hdr + struct.pack(">I", len(trans)) + trans
        return out


@dataclass
class Pair:
    src_host: Host
    dst_host: Host
    src: Vm
    dst_fd: int


@pytest.fixture
def pair(memfds: Callable[[], int]) -> Pair:
    """Two platforms under one root, and a launched SEV guest on the first."""
    src_host, dst_host = host_under(), host_under()
    return Pair(src_host, dst_host, launched(src_host, memfds()), memfds())


def start_send(p: Pair) -> tuple[bytes, int]:
    out = sev(p.src, U.KVM_SEV_SEND_START, send_start_fields(p.dst_host))
    session, policy = out["session"], out["policy"]
    assert isinstance(session, bytes) and isinstance(policy, int)
    return session, policy


def migrate(p: Pair) -> tuple[Vm, Stream]:
    """The whole flow through KVM's ioctls; returns the target VM and the captured stream."""
    session, policy = start_send(p)
    source_pdh = p.src_host.firmware.platform.pdh_cert
    dst = receiver(p.dst_host, p.dst_fd)
    sev(
        dst,
        U.KVM_SEV_RECEIVE_START,
        {"handle": 0, "policy": policy, "pdh": source_pdh, "session": session},
    )
    packets = []
    for i in range(PAGES):
        hdr, trans = send_page(p.src, i * PAGE_SIZE)
        receive_page(dst, i * PAGE_SIZE, hdr, trans)
        packets.append((i * PAGE_SIZE, hdr, trans))
    sev(p.src, U.KVM_SEV_SEND_FINISH)
    sev(dst, U.KVM_SEV_RECEIVE_FINISH)
    return dst, Stream(policy, source_pdh, session, packets)


# --------------------------------------------------------------------------------------------
# the whole flow


def test_a_launched_guest_moves_to_another_platform_and_reads_the_same_there(pair: Pair) -> None:
    dst, _ = migrate(pair)
    assert state(pair.src) == U.SEV_GUEST_STATE_SENT
    assert state(dst) == U.SEV_GUEST_STATE_RUNNING
    for i in range(PAGES):
        assert decrypt(dst, i * PAGE_SIZE) == page_of(i)
        # In the target's memfd the page is ciphertext under the target's own VEK.
        stored = os.pread(pair.dst_fd, PAGE_SIZE, i * PAGE_SIZE)
        assert stored != page_of(i) and stored != os.pread(pair.dst_fd, 0, 0)
    dst_ctx = pair.dst_host.firmware.contexts[dst.sev.handle]
    src_ctx = pair.src_host.firmware.contexts[pair.src.sev.handle]
    assert dst_ctx.vek != src_ctx.vek
    assert dst_ctx.channel is None and src_ctx.channel is None  # both channels zeroed


def test_the_captured_stream_decrypts_offline_with_the_target_pdh_key(pair: Pair) -> None:
    """decrypt.py-style ([S1]): the reference's formulas (section 1.5) written out again with
    `cryptography` alone, fed the target platform's PDH private key and the captured bytes."""
    _, stream = migrate(pair)
    target_pdh_private = pair.dst_host.firmware.platform.keys.pdh

    def hmac256(key: bytes, data: bytes) -> bytes:
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(data)
        return h.finalize()

    def ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
        c = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
        return c.update(data) + c.finalize()

    def kdf(key: bytes, label: bytes, context: bytes, n: int) -> bytes:
        out, i = b"", 1
        while len(out) < n:
            msg = (
                i.to_bytes(4, "little") + label + b"\x00" + context + (n * 8).to_bytes(4, "little")
            )
            out += hmac256(key, msg)
            i += 1
        return out[:n]

    # Parse the stream the way decrypt.py does.
    buf = stream.wire_bytes()
    policy = struct.unpack_from(">I", buf, 0)[0]
    pos = 4
    (n,) = struct.unpack_from(">I", buf, pos)
    pdh = buf[pos + 4 : pos + 4 + n]
    pos += 4 + n
    (n,) = struct.unpack_from(">I", buf, pos)
    session = buf[pos + 4 : pos + 4 + n]
    pos += 4 + n
    # Source PDH public key: QX, QY little-endian 72-byte fields after curve id at 0x10.
    qx = int.from_bytes(pdh[0x14 : 0x14 + 72], "little")
    qy = int.from_bytes(pdh[0x14 + 72 : 0x14 + 144], "little")
    source_public = ec.EllipticCurvePublicNumbers(qx, qy, ec.SECP384R1()).public_key()
    shared = target_pdh_private.exchange(ec.ECDH(), source_public)
    nonce, wrap_tk, wrap_iv = session[0:16], session[16:48], session[48:64]
    wrap_mac, pol_mac = session[64:96], session[96:128]
    master = kdf(shared, b"sev-master-secret", nonce, 16)
    kek, kik = kdf(master, b"sev-kek", b"", 16), kdf(master, b"sev-kik", b"", 16)
    assert hmac256(kik, wrap_tk) == wrap_mac
    tek_tik = ctr(kek, wrap_iv, wrap_tk)
    tek, tik = tek_tik[:16], tek_tik[16:]
    assert hmac256(tik, policy.to_bytes(4, "little")) == pol_mac
    pages = []
    while pos < len(buf):
        (hdr_len,) = struct.unpack_from(">I", buf, pos)
        hdr = buf[pos + 4 : pos + 4 + hdr_len]
        pos += 4 + hdr_len
        (trans_len,) = struct.unpack_from(">I", buf, pos)
        ct = buf[pos + 4 : pos + 4 + trans_len]
        pos += 4 + trans_len
        flags, iv, mac = hdr[0:4], hdr[4:20], hdr[20:52]
        aad = b"\x02" + flags + iv + len(ct).to_bytes(4, "little") * 2 + ct
        assert hmac256(tik, aad) == mac
        pages.append(ctr(tek, iv, ct))
    assert pages == [page_of(i) for i in range(PAGES)]


def test_no_plaintext_page_or_key_appears_in_the_stream(pair: Pair) -> None:
    src_ctx = pair.src_host.firmware.contexts[pair.src.sev.handle]
    src_vek = src_ctx.vek
    session, policy = start_send(pair)
    assert src_ctx.channel is not None
    tek, tik = bytes(src_ctx.channel.tek), bytes(src_ctx.channel.tik)
    dst = receiver(pair.dst_host, pair.dst_fd)
    source_pdh = pair.src_host.firmware.platform.pdh_cert
    sev(
        dst,
        U.KVM_SEV_RECEIVE_START,
        {"handle": 0, "policy": policy, "pdh": source_pdh, "session": session},
    )
    dst_vek = pair.dst_host.firmware.contexts[dst.sev.handle].vek
    packets = []
    for i in range(PAGES):
        hdr, trans = send_page(pair.src, i * PAGE_SIZE)
        packets.append((i * PAGE_SIZE, hdr, trans))
    wire = Stream(policy, source_pdh, session, packets).wire_bytes()
    secrets = [tek, tik, src_vek[:32], src_vek[32:], dst_vek[:32], dst_vek[32:]]
    for secret in secrets:
        assert secret not in wire
    for i in range(PAGES):
        for off in range(0, PAGE_SIZE, 256):  # no 32-byte run of any plaintext page
            assert page_of(i)[off : off + 32] not in wire


# --------------------------------------------------------------------------------------------
# state machine (section 1.2) and anti-cloning


def test_after_send_finish_the_source_is_sent_refuses_everything_and_never_runs(pair: Pair) -> None:
    migrate(pair)
    src = pair.src
    for cmd in (U.KVM_SEV_SEND_FINISH, U.KVM_SEV_SEND_CANCEL):
        expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda cmd=cmd: sev(src, cmd))
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: send_page(src, 0))
    fw = pair.src_host.firmware
    fw.deactivate(src.sev.handle)
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: fw.activate(src.sev.handle, src.sev.asid))


def test_kvm_run_of_a_sent_guest_fails_with_eio(pair: Pair) -> None:
    vcpu = pair.src.create_vcpu(PID, 0)
    migrate(pair)
    expect_errno(errno.EIO, lambda: vcpu.run(PID))


def test_send_cancel_returns_to_running_with_the_channel_zeroed_and_a_new_send_works(
    pair: Pair, memfds: Callable[[], int]
) -> None:
    start_send(pair)
    ctx = pair.src_host.firmware.contexts[pair.src.sev.handle]
    channel = ctx.channel
    assert channel is not None and state(pair.src) == U.SEV_GUEST_STATE_SUPDATE
    send_page(pair.src, 0)  # the guest may be sent from while it runs
    sev(pair.src, U.KVM_SEV_SEND_CANCEL)
    assert state(pair.src) == U.SEV_GUEST_STATE_RUNNING
    assert ctx.channel is None and channel.tek == bytes(16) and channel.tik == bytes(16)
    assert [decrypt(pair.src, i * PAGE_SIZE) for i in range(PAGES)] == [
        page_of(i) for i in range(PAGES)
    ]
    # A new SEND_START to another target platform works, and that migration completes.
    other = Pair(pair.src_host, host_under(), pair.src, memfds())
    dst, _ = migrate(other)
    assert decrypt(dst, 0) == page_of(0)


def test_one_stream_can_be_received_twice_by_the_target_platform(
    pair: Pair, memfds: Callable[[], int]
) -> None:
    """Faithful (section 1.3 observation): the firmware keeps no record of consumed
    sessions, so the target platform can run two copies; handoff must refuse that itself."""
    dst, stream = migrate(pair)
    twin = receiver(pair.dst_host, memfds())
    fields = {
        "handle": 0,
        "policy": stream.policy,
        "pdh": stream.source_pdh,
        "session": stream.session,
    }
    sev(twin, U.KVM_SEV_RECEIVE_START, fields)
    for gpa, hdr, trans in stream.packets:
        receive_page(twin, gpa, hdr, trans)
    sev(twin, U.KVM_SEV_RECEIVE_FINISH)
    assert decrypt(twin, 0) == decrypt(dst, 0) == page_of(0)


def test_receive_commands_need_rupdate_and_send_commands_need_supdate(
    pair: Pair, memfds: Callable[[], int]
) -> None:
    hdr, trans = b"h" * 52, b"t" * PAGE_SIZE
    dst = receiver(pair.dst_host, pair.dst_fd)
    # Launch a guest on the target too, so the commands reach the firmware's state check.
    other = launched(pair.dst_host, memfds())
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: receive_page(other, 0, hdr, trans))
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: sev(other, U.KVM_SEV_RECEIVE_FINISH))
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: send_page(other, 0))
    # A VM that only did KVM_SEV_INIT has no /dev/sev fd recorded yet (LAUNCH_START or
    # RECEIVE_START records it): sev_issue_cmd fails with EBADF before the firmware.
    expect_errno(errno.EBADF, lambda: receive_page(dst, 0, hdr, trans))


def test_platform_state_is_init_then_working_then_init_again() -> None:
    host = host_under()
    assert host.stats()["platform"]["state"] == "INIT"
    vm = host.create_vm(PID)
    sev(vm, U.KVM_SEV_INIT)
    sev(vm, U.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": 0})
    assert host.firmware.platform_state == U.SEV_STATE_WORKING
    assert host.sev_issue_cmd(U.SEV_PLATFORM_STATUS, None)["guest_count"] == 1
    vm.put()
    assert host.firmware.platform_state == U.SEV_STATE_INIT
    assert host.sev_issue_cmd(U.SEV_PLATFORM_STATUS, None)["state"] == U.SEV_STATE_INIT


def test_commands_refuse_in_the_wrong_platform_state(pair: Pair, memfds: Callable[[], int]) -> None:
    fw = pair.src_host.firmware
    fw.platform_state = U.SEV_STATE_INIT  # as if no guest: every SEND_* needs WORKING
    fields = send_start_fields(pair.dst_host)
    expect_fw(U.SEV_RET_INVALID_PLATFORM_STATE, lambda: sev(pair.src, U.KVM_SEV_SEND_START, fields))
    expect_fw(U.SEV_RET_INVALID_PLATFORM_STATE, lambda: sev(pair.src, U.KVM_SEV_SEND_CANCEL))
    fw.platform_state = U.SEV_STATE_UNINIT
    expect_fw(
        U.SEV_RET_INVALID_PLATFORM_STATE,
        lambda: pair.src_host.sev_issue_cmd(U.SEV_PDH_CERT_EXPORT, {}),
    )
    dst = receiver(pair.src_host, memfds())
    session = bytes(128)
    expect_fw(
        U.SEV_RET_INVALID_PLATFORM_STATE,
        lambda: sev(dst, U.KVM_SEV_RECEIVE_START, {"pdh": b"p", "session": session}),
    )


# --------------------------------------------------------------------------------------------
# SEND_START (sections 1.3, 1.6)


def test_send_start_query_answers_eio_invalid_len_with_the_session_length(pair: Pair) -> None:
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: sev(pair.src, U.KVM_SEV_SEND_START, {}))
    assert err.fields == {"policy": 0, "session_len": 128}
    assert state(pair.src) == U.SEV_GUEST_STATE_RUNNING
    fields = send_start_fields(pair.dst_host) | {"session_len": 64}
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: sev(pair.src, U.KVM_SEV_SEND_START, fields))
    assert err.fields["session_len"] == 128


def test_send_start_kvm_checks_come_before_the_firmware(pair: Pair) -> None:
    good = send_start_fields(pair.dst_host)
    plain = pair.src_host.create_vm(PID)
    expect_errno(errno.ENOTTY, lambda: sev(plain, U.KVM_SEV_SEND_START, good))
    expect_errno(errno.EFAULT, lambda: sev(pair.src, U.KVM_SEV_SEND_START, None))
    for missing in ("pdh_cert", "session_uaddr", "plat_certs", "amd_certs"):
        fields = {k: v for k, v in good.items() if k != missing}
        expect_errno(errno.EINVAL, lambda f=fields: sev(pair.src, U.KVM_SEV_SEND_START, f))
    too_big = good | {"session_len": U.SEV_FW_BLOB_MAX_SIZE + 1}
    expect_errno(errno.EINVAL, lambda: sev(pair.src, U.KVM_SEV_SEND_START, too_big))
    huge = good | {"amd_certs": b"x" * (U.SEV_FW_BLOB_MAX_SIZE + 1)}
    expect_errno(errno.EINVAL, lambda: sev(pair.src, U.KVM_SEV_SEND_START, huge))
    assert state(pair.src) == U.SEV_GUEST_STATE_RUNNING


def test_send_start_with_policy_nosend_is_policy_failure(memfds: Callable[[], int]) -> None:
    src_host, dst_host = host_under(), host_under()
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_NOSEND)
    err = expect_fw(
        U.SEV_RET_POLICY_FAILURE, lambda: sev(vm, U.KVM_SEV_SEND_START, send_start_fields(dst_host))
    )
    assert err.fields == {"policy": 0, "session_len": 128}
    assert state(vm) == U.SEV_GUEST_STATE_RUNNING


def test_policy_sev_accepts_a_chain_under_the_shared_root(memfds: Callable[[], int]) -> None:
    src_host, dst_host = host_under(), host_under()
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_SEV | U.SEV_POLICY_NODBG)
    out = sev(vm, U.KVM_SEV_SEND_START, send_start_fields(dst_host))
    assert out["policy"] == U.SEV_POLICY_SEV | U.SEV_POLICY_NODBG
    assert state(vm) == U.SEV_GUEST_STATE_SUPDATE


def test_policy_sev_refuses_a_chain_under_another_root(
    memfds: Callable[[], int],
) -> None:
    src_host = host_under()
    stranger = host_under(AmdRoot())  # a genuine-looking chain under a root we do not trust
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_SEV)
    # amd_cert_validate_ark: a self-signed ARK that is not this firmware's AMD root (key id,
    # fused key hash) is INVALID_CERTIFICATE.
    expect_fw(
        U.SEV_RET_INVALID_CERTIFICATE,
        lambda: sev(vm, U.KVM_SEV_SEND_START, send_start_fields(stranger)),
    )
    # A chain whose ASK and ARK are ours but whose CEK another root signed: BAD_SIGNATURE.
    forged = send_start_fields(stranger) | {"amd_certs": ROOT.chain()}
    expect_fw(U.SEV_RET_BAD_SIGNATURE, lambda: sev(vm, U.KVM_SEV_SEND_START, forged))
    # Our root's chain with a stranger's PDH (not signed by that PEK): BAD_SIGNATURE too.
    fields = send_start_fields(host_under()) | {"pdh_cert": export(stranger)[0]}
    expect_fw(U.SEV_RET_BAD_SIGNATURE, lambda: sev(vm, U.KVM_SEV_SEND_START, fields))
    assert state(vm) == U.SEV_GUEST_STATE_RUNNING


def test_policy_sev_checks_lengths_then_certificates_then_the_api_version(
    memfds: Callable[[], int],
) -> None:
    src_host, dst_host = host_under(), host_under()
    fields = send_start_fields(dst_host)
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_SEV)
    short = fields | {"amd_certs": bytes(fields["amd_certs"])[:-1]}  # type: ignore[arg-type]
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: sev(vm, U.KVM_SEV_SEND_START, short))
    # A PEK certificate offered as the PDH carries no signature by a PEK: INVALID_CERTIFICATE.
    not_pdh = fields | {"pdh_cert": dst_host.firmware.platform.pek_cert}
    expect_fw(U.SEV_RET_INVALID_CERTIFICATE, lambda: sev(vm, U.KVM_SEV_SEND_START, not_pdh))
    pdh = bytearray(fields["pdh_cert"])  # type: ignore[arg-type]
    pdh[0] = 2  # certificate version 2: the signature (checked first) no longer verifies
    expect_fw(
        U.SEV_RET_BAD_SIGNATURE,
        lambda: sev(vm, U.KVM_SEV_SEND_START, fields | {"pdh_cert": bytes(pdh)}),
    )
    pdh = bytearray(fields["pdh_cert"])  # type: ignore[arg-type]
    pdh[0x20] ^= 1  # a bit of QX: the PEK's signature no longer covers it
    expect_fw(
        U.SEV_RET_BAD_SIGNATURE,
        lambda: sev(vm, U.KVM_SEV_SEND_START, fields | {"pdh_cert": bytes(pdh)}),
    )
    # Policy API minimum above the target's PEK: POLICY_FAILURE (launch allows up to ours,
    # so the target platform here runs an older firmware).
    old = Host(platform=Platform(PlatformKeys.generate(), ROOT, api=(1, 0)))
    newer = launched(src_host, memfds(), policy=U.SEV_POLICY_SEV | (1 << 16) | (40 << 24))
    expect_fw(
        U.SEV_RET_POLICY_FAILURE, lambda: sev(newer, U.KVM_SEV_SEND_START, send_start_fields(old))
    )
    sev(newer, U.KVM_SEV_SEND_START, fields)  # 1.55 is new enough


def test_policy_domain_accepts_only_a_target_with_this_platforms_oca(
    memfds: Callable[[], int],
) -> None:
    src_host = host_under()
    oca = src_host.firmware.platform.keys.oca
    same_domain = Host(platform=Platform(PlatformKeys.generate(oca=oca), ROOT))
    other_domain = host_under()
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_DOMAIN)
    expect_fw(
        U.SEV_RET_POLICY_FAILURE,
        lambda: sev(vm, U.KVM_SEV_SEND_START, send_start_fields(other_domain)),
    )
    sev(vm, U.KVM_SEV_SEND_START, send_start_fields(same_domain))
    assert state(vm) == U.SEV_GUEST_STATE_SUPDATE


def test_without_sev_or_domain_any_well_formed_pdh_is_accepted(pair: Pair) -> None:
    """Section 1.3 observation: the source may name a PDH of its own choosing (here one
    under another root, with garbage for the chains): only NOSEND/SEV/DOMAIN prevent it."""
    stranger = host_under(AmdRoot())
    fields = send_start_fields(pair.dst_host) | {
        "pdh_cert": stranger.firmware.platform.pdh_cert,
        "plat_certs": b"x",
        "amd_certs": b"y",
    }
    sev(pair.src, U.KVM_SEV_SEND_START, fields)
    sev(pair.src, U.KVM_SEV_SEND_CANCEL)
    not_pdh = fields | {"pdh_cert": pair.dst_host.firmware.platform.pek_cert}
    expect_fw(U.SEV_RET_INVALID_CERTIFICATE, lambda: sev(pair.src, U.KVM_SEV_SEND_START, not_pdh))
    expect_fw(
        U.SEV_RET_INVALID_LEN,
        lambda: sev(pair.src, U.KVM_SEV_SEND_START, fields | {"pdh_cert": b"p"}),
    )


# --------------------------------------------------------------------------------------------
# SEND_UPDATE_DATA (sections 1.3, 1.6)


def test_send_update_data_query_gives_the_header_length(pair: Pair) -> None:
    start_send(pair)
    err = expect_fw(
        U.SEV_RET_INVALID_LEN, lambda: sev(pair.src, U.KVM_SEV_SEND_UPDATE_DATA, {"hdr_len": 0})
    )
    assert err.fields == {"hdr_len": 52, "trans_len": 0}  # this firmware returns no trans_len
    # The query works in any state: the header length is checked before the handle.
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: sev(pair.src, U.KVM_SEV_SEND_UPDATE_DATA, {}))
    assert err.fields["hdr_len"] == 52


def test_send_update_data_checks_in_kernel_then_firmware_order(pair: Pair) -> None:
    def send(**fields: int) -> dict[str, int | bytes]:
        base = {"hdr_uaddr": 1, "hdr_len": 52, "guest_uaddr": 0, "guest_len": PAGE_SIZE}
        return sev(
            pair.src,
            U.KVM_SEV_SEND_UPDATE_DATA,
            base | {"trans_uaddr": 1, "trans_len": PAGE_SIZE} | fields,
        )

    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, send)  # RUNNING: no SEND_START yet
    start_send(pair)
    expect_errno(errno.EINVAL, lambda: send(hdr_uaddr=0))
    expect_errno(errno.EINVAL, lambda: send(trans_uaddr=0))
    expect_errno(errno.EINVAL, lambda: send(guest_len=0))
    expect_errno(errno.EINVAL, lambda: send(guest_uaddr=16))  # crosses into the next page
    expect_errno(errno.EINVAL, lambda: send(guest_len=2 * PAGE_SIZE, trans_len=2 * PAGE_SIZE))
    expect_errno(errno.ENOMEM, lambda: send(guest_uaddr=PAGES * PAGE_SIZE))  # not backed
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: send(hdr_len=51))
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: send(guest_len=100, trans_len=100))  # not x16
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: send(trans_len=PAGE_SIZE - 16))
    expect_fw(U.SEV_RET_INVALID_ADDRESS, lambda: send(guest_uaddr=8, guest_len=16, trans_len=16))
    out = send(guest_uaddr=32, guest_len=64, trans_len=96, hdr_len=60)
    assert len(out["hdr"]) == 60 and len(out["trans"]) == 96  # at the caller's lengths
    fw = pair.src_host.firmware
    fw.deactivate(pair.src.sev.handle)
    expect_fw(U.SEV_RET_INACTIVE, send)


# --------------------------------------------------------------------------------------------
# RECEIVE_START (sections 1.3, 1.6)


def forged_session(target: Host, policy: int, *, tamper: str = "") -> tuple[bytes, bytes]:
    """A session built as SEND_START builds one, by a source of our own making (its PDH
    certificate and the session blob), for policies no launched guest can have."""
    source = Platform(PlatformKeys.generate(), ROOT)
    target_pdh = sev_crypto.SevCert.parse(target.firmware.platform.pdh_cert).ec_public_key()
    shared = sev_crypto.ecdh_shared_secret(source.keys.pdh, target_pdh)
    nonce = os.urandom(16)
    keys = sev_crypto.derive_channel_keys(shared, nonce)
    session = sev_crypto.wrap_session(keys, nonce, os.urandom(16), os.urandom(16), policy).pack()
    return source.pdh_cert, session


def test_receive_start_kvm_checks_and_binding(pair: Pair) -> None:
    pdh, session = forged_session(pair.dst_host, 0)
    plain = pair.dst_host.create_vm(PID)
    expect_errno(
        errno.ENOTTY, lambda: sev(plain, U.KVM_SEV_RECEIVE_START, {"pdh": pdh, "session": session})
    )
    dst = receiver(pair.dst_host, pair.dst_fd)
    expect_errno(errno.EFAULT, lambda: sev(dst, U.KVM_SEV_RECEIVE_START, None))
    expect_errno(errno.EINVAL, lambda: sev(dst, U.KVM_SEV_RECEIVE_START, {"pdh": pdh}))
    expect_errno(errno.EINVAL, lambda: sev(dst, U.KVM_SEV_RECEIVE_START, {"session": session}))
    big = b"p" * (U.SEV_FW_BLOB_MAX_SIZE + 1)
    expect_errno(
        errno.EINVAL, lambda: sev(dst, U.KVM_SEV_RECEIVE_START, {"pdh": big, "session": session})
    )
    out = sev(
        dst, U.KVM_SEV_RECEIVE_START, {"handle": 0, "policy": 0, "pdh": pdh, "session": session}
    )
    ctx = pair.dst_host.firmware.contexts[out["handle"]]  # type: ignore[index]
    assert ctx.asid == dst.sev.asid and dst.sev.handle == out["handle"]
    assert state(dst) == U.SEV_GUEST_STATE_RUPDATE


def test_receive_start_on_an_es_asid_with_a_plain_policy_fails_binding_and_decommissions(
    pair: Pair,
) -> None:
    pdh, session = forged_session(pair.dst_host, 0)
    es_vm = pair.dst_host.create_vm(PID)
    sev(es_vm, U.KVM_SEV_ES_INIT)
    before = set(pair.dst_host.firmware.contexts)
    expect_fw(
        U.SEV_RET_POLICY_FAILURE,
        lambda: sev(es_vm, U.KVM_SEV_RECEIVE_START, {"policy": 0, "pdh": pdh, "session": session}),
    )
    assert set(pair.dst_host.firmware.contexts) == before and es_vm.sev.handle == 0


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("session_len", U.SEV_RET_INVALID_LEN),
        ("pdh_len", U.SEV_RET_INVALID_LEN),
        ("pdh_usage", U.SEV_RET_INVALID_CERTIFICATE),
        ("wrong_source", U.SEV_RET_BAD_MEASUREMENT),
        ("session_bit", U.SEV_RET_BAD_MEASUREMENT),
        ("policy_changed", U.SEV_RET_BAD_MEASUREMENT),
        ("reserved_bits", U.SEV_RET_POLICY_FAILURE),
        ("api_too_new", U.SEV_RET_POLICY_FAILURE),
        ("share_missing", U.SEV_RET_INVALID_GUEST),
        ("share_noks", U.SEV_RET_POLICY_FAILURE),
        ("es_unsupported", U.SEV_RET_UNSUPPORTED),
    ],
)
def test_receive_start_firmware_checks(case: str, status: int, memfds: Callable[[], int]) -> None:
    target = host_under(sev_es_asids=0) if case == "es_unsupported" else host_under()
    policy = {
        "reserved_bits": 1 << 6,
        "api_too_new": (2 << 16),
        "share_noks": U.SEV_POLICY_NOKS,
        "es_unsupported": U.SEV_POLICY_ES,
    }.get(case, 0)
    pdh, session = forged_session(target, policy)
    handle = 0
    if case == "session_len":
        session = session[:127]
    elif case == "pdh_len":
        pdh += b"\0"
    elif case == "pdh_usage":
        pdh = target.firmware.platform.pek_cert
    elif case == "wrong_source":
        pdh = host_under().firmware.platform.pdh_cert
    elif case == "session_bit":
        session = bytes([session[0] ^ 1]) + session[1:]
    elif case == "policy_changed":
        policy = U.SEV_POLICY_NODBG
    elif case == "share_missing":
        handle = 99
    elif case == "share_noks":
        handle = launched(target, memfds(), policy=U.SEV_POLICY_NOKS).sev.handle
    dst = receiver(target, memfds())
    before = set(target.firmware.contexts)
    fields = {"handle": handle, "policy": policy, "pdh": pdh, "session": session}
    expect_fw(status, lambda: sev(dst, U.KVM_SEV_RECEIVE_START, fields))
    assert set(target.firmware.contexts) == before and dst.sev.handle == 0


# --------------------------------------------------------------------------------------------
# RECEIVE_UPDATE_DATA (sections 1.3, 1.6): integrity


@pytest.fixture
def receiving(pair: Pair) -> tuple[Vm, list[tuple[int, bytes, bytes]]]:
    """A target in RUPDATE, and the source's packets for every page (not yet received)."""
    session, policy = start_send(pair)
    dst = receiver(pair.dst_host, pair.dst_fd)
    source_pdh = pair.src_host.firmware.platform.pdh_cert
    sev(dst, U.KVM_SEV_RECEIVE_START, {"policy": policy, "pdh": source_pdh, "session": session})
    return dst, [(i * PAGE_SIZE, *send_page(pair.src, i * PAGE_SIZE)) for i in range(PAGES)]


def test_receive_update_data_kvm_and_length_checks(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    dst, packets = receiving
    gpa, hdr, trans = packets[0]
    plain = pair.dst_host.create_vm(PID)
    expect_errno(errno.EINVAL, lambda: receive_page(plain, gpa, hdr, trans))  # EINVAL, not ENOTTY

    def receive(**fields: int | bytes) -> None:
        base: dict[str, int | bytes] = {
            "hdr": hdr,
            "guest_uaddr": gpa,
            "guest_len": len(trans),
            "trans": trans,
        }
        sev(dst, U.KVM_SEV_RECEIVE_UPDATE_DATA, base | fields)

    expect_errno(errno.EINVAL, lambda: receive(hdr=b""))
    expect_errno(errno.EINVAL, lambda: receive(trans=b""))
    expect_errno(errno.EINVAL, lambda: receive(guest_len=0))
    expect_errno(errno.EINVAL, lambda: receive(guest_uaddr=gpa + 16))  # crosses a page
    expect_errno(errno.ENOMEM, lambda: receive(guest_uaddr=PAGES * PAGE_SIZE))
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive(guest_len=PAGE_SIZE - 16))  # != trans_len
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive(hdr=hdr[:51]))
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive(trans=trans[:100], guest_len=100))
    expect_fw(
        U.SEV_RET_INVALID_ADDRESS, lambda: receive(guest_uaddr=8, trans=trans[:16], guest_len=16)
    )
    compressed = struct.pack("<I", 1) + hdr[4:]
    expect_fw(U.SEV_RET_UNSUPPORTED, lambda: receive(hdr=compressed))
    receive()
    pair.dst_host.firmware.deactivate(dst.sev.handle)
    expect_fw(U.SEV_RET_INACTIVE, receive)


@pytest.mark.parametrize(
    "offset",
    [0, 3, 4, 10, 19, 20, 40, 51, 52, 52 + 1000, 52 + PAGE_SIZE - 1],
    ids=lambda o: "flags" if o < 4 else "iv" if o < 20 else "mac" if o < 52 else "ciphertext",
)
def test_any_flipped_byte_is_bad_measurement_and_leaves_the_page_unchanged(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]], offset: int
) -> None:
    dst, packets = receiving
    gpa, hdr, trans = packets[1]
    before = os.pread(pair.dst_fd, PAGE_SIZE, gpa)
    blob = bytearray(hdr + trans)
    blob[offset] ^= 0x80 if offset else 0x02  # flags bit 0 is "compressed": flip bit 1
    bad_hdr, bad_trans = bytes(blob[:52]), bytes(blob[52:])
    expect_fw(U.SEV_RET_BAD_MEASUREMENT, lambda: receive_page(dst, gpa, bad_hdr, bad_trans))
    assert os.pread(pair.dst_fd, PAGE_SIZE, gpa) == before
    receive_page(dst, gpa, hdr, trans)  # the genuine packet still goes in
    assert decrypt_after_finish(dst, gpa) == page_of(1)


def decrypt_after_finish(dst: Vm, gpa: int) -> bytes:
    sev(dst, U.KVM_SEV_RECEIVE_FINISH)
    return decrypt(dst, gpa)


def test_part_of_a_page_is_sent_and_received_into_part_of_a_page(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    """Less than a page, at an offset, both ways: the source reads only those bytes, the
    target rewrites only those bytes of its page (the firmware does not bind the GPA, so
    bytes of page 1 can land in page 0)."""
    dst, packets = receiving
    gpa, hdr, trans = packets[0]
    receive_page(dst, gpa, hdr, trans)
    part_hdr, part = send_page(pair.src, PAGE_SIZE + 32, 64)
    receive_page(dst, 32, part_hdr, part)
    expected = page_of(0)[:32] + page_of(1)[32:96] + page_of(0)[96:]
    assert decrypt_after_finish(dst, 0) == expected


def test_a_truncated_ciphertext_is_refused(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    dst, packets = receiving
    gpa, hdr, trans = packets[0]
    expect_fw(U.SEV_RET_BAD_MEASUREMENT, lambda: receive_page(dst, gpa, hdr, trans[:-16]))


def test_a_packet_from_session_a_is_refused_in_session_b(
    pair: Pair, memfds: Callable[[], int]
) -> None:
    session_a, policy = start_send(pair)
    hdr_a, trans_a = send_page(pair.src, 0)
    sev(pair.src, U.KVM_SEV_SEND_CANCEL)
    session_b, _ = start_send(pair)
    assert session_a != session_b
    dst = receiver(pair.dst_host, pair.dst_fd)
    source_pdh = pair.src_host.firmware.platform.pdh_cert
    sev(dst, U.KVM_SEV_RECEIVE_START, {"policy": policy, "pdh": source_pdh, "session": session_b})
    expect_fw(U.SEV_RET_BAD_MEASUREMENT, lambda: receive_page(dst, 0, hdr_a, trans_a))
    hdr_b, trans_b = send_page(pair.src, 0)
    receive_page(dst, 0, hdr_b, trans_b)


def test_within_a_session_the_firmware_binds_no_address(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    """Section 1.5: the MAC binds no GPA or sequence; a re-targeted packet verifies. handoff
    must bind both in its own framing."""
    dst, packets = receiving
    _gpa, hdr, trans = packets[2]
    receive_page(dst, 0, hdr, trans)
    assert decrypt_after_finish(dst, 0) == page_of(2)


# --------------------------------------------------------------------------------------------
# KVM layer gates (section 1.6)


@pytest.mark.parametrize("cmd", [U.KVM_SEV_SEND_UPDATE_VMSA, U.KVM_SEV_RECEIVE_UPDATE_VMSA])
def test_the_vmsa_commands_are_not_reachable_through_kvm(pair: Pair, cmd: int) -> None:
    expect_errno(errno.EINVAL, lambda: sev(pair.src, cmd, {}))


def test_a_mirror_may_not_send_or_receive(pair: Pair) -> None:
    mirror = pair.src_host.create_vm(PID)
    mirror.enable_cap(PID, U.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, 0, [pair.src])
    for cmd in (
        U.KVM_SEV_SEND_START,
        U.KVM_SEV_SEND_UPDATE_DATA,
        U.KVM_SEV_RECEIVE_START,
        U.KVM_SEV_SEND_FINISH,
    ):
        expect_errno(errno.EINVAL, lambda cmd=cmd: sev(mirror, cmd, {}))


def test_without_sev_on_the_host_every_migration_command_is_enotty() -> None:
    host = Host(sev_asids=0, sev_es_asids=0)
    vm = host.create_vm(PID)
    for cmd in (U.KVM_SEV_SEND_START, U.KVM_SEV_RECEIVE_START, U.KVM_SEV_RECEIVE_UPDATE_DATA):
        expect_errno(errno.ENOTTY, lambda cmd=cmd: sev(vm, cmd, {}))


def test_pdh_cert_export_query_then_export(pair: Pair) -> None:
    host = pair.dst_host
    for fields in ({}, {"pdh_cert_address": 1, "pdh_cert_len": 2084}):
        err = expect_fw(
            U.SEV_RET_INVALID_LEN, lambda f=fields: host.sev_issue_cmd(U.SEV_PDH_CERT_EXPORT, f)
        )
        assert err.fields == {"pdh_cert_len": 2084, "cert_chain_len": 3 * 2084}
    expect_errno(
        errno.EFAULT,
        lambda: host.sev_issue_cmd(
            U.SEV_PDH_CERT_EXPORT,
            {
                "pdh_cert_address": 1,
                "pdh_cert_len": 1 << 15,
                "cert_chain_address": 1,
                "cert_chain_len": 1,
            },
        ),
    )
    pdh, chain, _amd = export(host)
    assert pdh == host.firmware.platform.pdh_cert and len(chain) == 3 * 2084
    expect_errno(errno.EFAULT, lambda: host.sev_issue_cmd(U.SEV_PDH_CERT_EXPORT, None))
    expect_errno(errno.EINVAL, lambda: host.sev_issue_cmd(U.SEV_MAX, {}))


def test_the_firmware_has_the_vmsa_commands_and_they_need_an_es_guest(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    """SEND/RECEIVE_UPDATE_VMSA exist in the firmware (KVM cannot issue them): after the
    state check, a guest without the ES policy bit is UNSUPPORTED."""
    dst, packets = receiving
    gpa, hdr, trans = packets[0]
    src_fw, dst_fw = pair.src_host.firmware, pair.dst_host.firmware
    memory = pair.src.memory
    expect_fw(
        U.SEV_RET_UNSUPPORTED,
        lambda: src_fw.send_update_data(
            pair.src.sev.handle, memory, 0, PAGE_SIZE, 52, PAGE_SIZE, vmsa=True
        ),
    )
    expect_fw(
        U.SEV_RET_UNSUPPORTED,
        lambda: dst_fw.receive_update_data(
            dst.sev.handle, dst.memory, gpa, PAGE_SIZE, hdr, trans, vmsa=True
        ),
    )
    sev(dst, U.KVM_SEV_RECEIVE_FINISH)  # RUNNING: the state check comes first
    expect_fw(
        U.SEV_RET_INVALID_GUEST_STATE,
        lambda: dst_fw.receive_update_data(
            dst.sev.handle, dst.memory, gpa, PAGE_SIZE, hdr, trans, vmsa=True
        ),
    )


def test_a_half_received_target_is_decommissioned_and_its_asid_freed_when_closed(
    pair: Pair, receiving: tuple[Vm, list[tuple[int, bytes, bytes]]]
) -> None:
    dst, packets = receiving
    receive_page(dst, *packets[0])
    handle, asid = dst.sev.handle, dst.sev.asid
    channel = pair.dst_host.firmware.contexts[handle].channel
    assert channel is not None
    sev(pair.src, U.KVM_SEV_SEND_CANCEL)  # the source goes on running
    dst.put()  # the target VMM closes its VM fd: sev_vm_destroy deactivates, decommissions
    assert handle not in pair.dst_host.firmware.contexts
    assert asid not in pair.dst_host.asids.in_use and channel.tek == bytes(16)
    assert state(pair.src) == U.SEV_GUEST_STATE_RUNNING


def test_receive_start_may_share_the_key_of_a_guest_with_the_same_policy(
    memfds: Callable[[], int],
) -> None:
    target = host_under()
    owner = launched(target, memfds())
    pdh, session = forged_session(target, 0)
    dst = receiver(target, memfds())
    fields = {"handle": owner.sev.handle, "policy": 0, "pdh": pdh, "session": session}
    out = sev(dst, U.KVM_SEV_RECEIVE_START, fields)
    shared = target.firmware.contexts[out["handle"]]  # type: ignore[index]
    assert shared.vek == target.firmware.contexts[owner.sev.handle].vek
