"""A host's SEV platform alone: the crypto of kvmstub.sev_crypto against the reference's
formulas (sev-live-migration.md sections 1.4, 1.5), the certificate chain of
kvmstub.platform, and the keys kvmstub.keystore keeps on disk between daemon runs."""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kvmstub import keystore, sev_crypto, uapi
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.sev_crypto import AmdCert, SevCert

ROOT = AmdRoot()  # made on first use, once for the module


def _hmac(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


# --- primitives -----------------------------------------------------------------------------


def test_kdf_is_sp800_108_counter_mode_over_hmac_sha256() -> None:
    key, label, context = bytes(range(32)), b"sev-master-secret", b"n" * 16
    first = _hmac(
        key, b"\x01\x00\x00\x00" + label + b"\x00" + context + (128).to_bytes(4, "little")
    )
    assert sev_crypto.kdf(key, label, context, 16) == first[:16]
    # Longer outputs chain blocks 1, 2, ... with L in bits.
    l_bits = (48 * 8).to_bytes(4, "little")
    blocks = [
        _hmac(key, i.to_bytes(4, "little") + label + b"\x00" + context + l_bits) for i in (1, 2)
    ]
    assert sev_crypto.kdf(key, label, context, 48) == (blocks[0] + blocks[1])[:48]


def test_session_blob_layout_and_unwrap() -> None:
    keys = sev_crypto.ChannelKeys(kek=b"K" * 16, kik=b"I" * 16)
    tek, tik, nonce, iv = b"T" * 16, b"t" * 16, b"N" * 16, b"V" * 16
    blob = sev_crypto.wrap_session(keys, nonce, tek, tik, 0x30001, wrap_iv=iv).pack()
    assert len(blob) == 128
    assert blob[0:16] == nonce and blob[48:64] == iv
    ctr = Cipher(algorithms.AES(b"K" * 16), modes.CTR(iv)).encryptor()
    assert blob[16:48] == ctr.update(tek + tik) + ctr.finalize()
    assert blob[64:96] == _hmac(b"I" * 16, blob[16:48])
    assert blob[96:128] == _hmac(tik, (0x30001).to_bytes(4, "little"))
    session = sev_crypto.Session.unpack(blob)
    assert sev_crypto.unwrap_session(keys, session) == (tek, tik)
    with pytest.raises(sev_crypto.BadMac):
        sev_crypto.unwrap_session(sev_crypto.ChannelKeys(b"K" * 16, b"J" * 16), session)
    with pytest.raises(sev_crypto.BadMac):
        sev_crypto.verify_policy_mac(tik, 0x30000, session)


def test_packet_is_a_52_byte_header_and_encrypt_then_mac() -> None:
    tek, tik, iv = b"E" * 16, b"M" * 16, b"I" * 16
    plain = os.urandom(4096)
    hdr, ct = sev_crypto.seal_packet(tek, tik, plain, iv=iv)
    assert len(hdr) == 52 and hdr[:4] == bytes(4) and hdr[4:20] == iv and len(ct) == 4096
    dec = Cipher(algorithms.AES(tek), modes.CTR(iv)).decryptor()
    assert dec.update(ct) + dec.finalize() == plain
    aad = b"\x02" + bytes(4) + iv + struct.pack("<II", 4096, 4096) + ct
    assert hdr[20:52] == _hmac(tik, aad)
    header = sev_crypto.PacketHeader.unpack(hdr)
    assert sev_crypto.open_packet(tek, tik, header, ct) == plain
    with pytest.raises(sev_crypto.BadMac):
        sev_crypto.open_packet(tek, tik, header, ct[:-1] + bytes([ct[-1] ^ 1]))


def test_a_channels_packet_cipher_seals_and_opens_as_seal_and_open_packet() -> None:
    """`PacketCipher` (the firmware's per-channel path, native) gives the bytes of
    `seal_packet` and `open_packet`, packet after packet under one context whatever came
    before (lengths that end inside a counter block, an IV whose counter wraps, a refused
    packet)."""
    tek, tik = b"E" * 16, b"M" * 16
    cipher = sev_crypto.PacketCipher(tek, tik)
    for n, length in enumerate([4096, 16, 0x5000, 48, 4096]):
        iv = b"\xff" * 16 if n == 2 else bytes([n]) * 16
        plain = os.urandom(length)
        sealed = cipher.seal(plain, iv=iv)
        assert sealed == sev_crypto.seal_packet(tek, tik, plain, iv=iv)
        header = sev_crypto.PacketHeader.unpack(sealed[0])
        bad = sealed[1][:-1] + bytes([sealed[1][-1] ^ 1])
        with pytest.raises(sev_crypto.BadMac):
            cipher.open(header, bad)
        assert cipher.open(header, sealed[1]) == plain
    cipher.seal(b"x" * 40)  # not a multiple of 16: stops inside a block
    hdr, again = cipher.seal(b"y" * 64, iv=b"I" * 16)
    assert (hdr, again) == sev_crypto.seal_packet(tek, tik, b"y" * 64, iv=b"I" * 16)
    header = sev_crypto.PacketHeader.unpack(hdr)
    assert cipher.open(header, again) == sev_crypto.open_packet(tek, tik, header, again)


def test_a_channels_packet_cipher_draws_a_fresh_iv_per_packet() -> None:
    hdr, _ = sev_crypto.PacketCipher(b"E" * 16, b"M" * 16).seal(bytes(64))
    other, _ = sev_crypto.PacketCipher(b"E" * 16, b"M" * 16).seal(bytes(64))
    assert hdr[4:20] != other[4:20]  # a fresh IV per packet


def test_a_fresh_iv_per_packet() -> None:
    a, _ = sev_crypto.seal_packet(b"E" * 16, b"M" * 16, bytes(64))
    b, _ = sev_crypto.seal_packet(b"E" * 16, b"M" * 16, bytes(64))
    assert a[4:20] != b[4:20]


def test_ecdh_shared_secret_is_the_48_byte_x_coordinate_both_ways() -> None:
    a, b = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    shared = sev_crypto.ecdh_shared_secret(a, b.public_key())
    assert len(shared) == 48 and shared == sev_crypto.ecdh_shared_secret(b, a.public_key())


# --- certificates ---------------------------------------------------------------------------


def test_the_platform_chain_is_ark_ask_cek_pek_pdh_and_verifies() -> None:
    platform = Platform(PlatformKeys.generate(), ROOT)
    pdh_raw, chain = platform.pdh_cert_export()
    assert len(pdh_raw) == 2084 and len(chain) == 3 * 2084
    pdh = SevCert.parse(pdh_raw)
    pek, oca, cek = (SevCert.parse(chain[i * 2084 : (i + 1) * 2084]) for i in range(3))
    assert (pdh.usage, pdh.algo) == (sev_crypto.USAGE_PDH, sev_crypto.ALGO_ECDH_SHA256)
    assert (pek.usage, oca.usage, cek.usage) == (0x1002, 0x1001, 0x1004)
    assert (pek.api_major, pek.api_minor) == (uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR)
    # QX, QY are little-endian 72-byte fields after the curve id at 0x10.
    numbers = platform.keys.pdh.public_key().public_numbers()
    assert struct.unpack_from("<I", pdh_raw, 0x10)[0] == sev_crypto.CURVE_P384
    assert int.from_bytes(pdh_raw[0x14 : 0x14 + 72], "little") == numbers.x
    assert int.from_bytes(pdh_raw[0x14 + 72 : 0x14 + 144], "little") == numbers.y
    amd = platform.amd_chain()
    assert len(amd) == 2 * sev_crypto.amd_cert_len()
    ask, ark = AmdCert.parse(amd[: len(amd) // 2]), AmdCert.parse(amd[len(amd) // 2 :])
    ark.validate(ark, sev_crypto.USAGE_ARK)
    ask.validate(ark, sev_crypto.USAGE_ASK)
    assert ask.certifying_id == ark.key_id and (ask.usage, ark.usage) == (0x13, 0x0)
    sev_crypto.verify_sev_cert_signed_by(cek, ask.signer())
    sev_crypto.verify_sev_cert_signed_by(pek, cek.signer())
    sev_crypto.verify_sev_cert_signed_by(pek, oca.signer())
    sev_crypto.verify_sev_cert_signed_by(oca, oca.signer())
    sev_crypto.verify_sev_cert_signed_by(pdh, pek.signer())


def test_a_chain_under_another_root_does_not_verify() -> None:
    other = Platform(PlatformKeys.generate(), AmdRoot())
    cek = SevCert.parse(other.pdh_cert_export()[1][2 * 2084 :])
    ask = AmdCert.parse(ROOT.chain()[: len(ROOT.chain()) // 2])
    with pytest.raises(sev_crypto.BadSignature):
        sev_crypto.verify_sev_cert_signed_by(cek, ask.signer())


def test_the_signature_is_checked_before_the_fields_as_the_firmware_does() -> None:
    platform = Platform(PlatformKeys.generate(), ROOT)
    pek = SevCert.parse(platform.pek_cert)
    version_2 = bytearray(platform.pdh_cert)
    version_2[0] = 2
    with pytest.raises(sev_crypto.BadSignature):  # the version is under the signature
        sev_crypto.verify_sev_cert_signed_by(SevCert.parse(bytes(version_2)), pek.signer())
    with pytest.raises(sev_crypto.MalformedCertificate):  # a PEK signs no PEK
        sev_crypto.verify_sev_cert_signed_by(pek, pek.signer())
    with pytest.raises(sev_crypto.MalformedCertificate):  # no slot by that signer
        sev_crypto.verify_sev_cert_signed_by(
            SevCert.parse(platform.pdh_cert), SevCert.parse(platform.oca_cert).signer()
        )


def test_the_platforms_own_certificates_are_the_same_bytes_each_time_they_are_made() -> None:
    """ECDSA is deterministic (RFC 6979), so an OCA shared by two platforms is the same
    certificate on both, as policy DOMAIN's memcmp needs. (The CEK's RSA-PSS signature by the
    ASK is randomised: AMD signs each chip's CEK once.)"""
    keys = PlatformKeys.generate()
    one, two = Platform(keys, ROOT), Platform(keys, ROOT)
    assert (one.pdh_cert, one.pek_cert, one.oca_cert) == (two.pdh_cert, two.pek_cert, two.oca_cert)


def test_malformed_certificates_are_refused_as_such() -> None:
    platform = Platform(PlatformKeys.generate(), ROOT)
    with pytest.raises(sev_crypto.MalformedCertificate):
        SevCert.parse(platform.pdh_cert[:-1])
    off_curve = bytearray(platform.pdh_cert)
    off_curve[0x14] ^= 1
    with pytest.raises(sev_crypto.MalformedCertificate):
        SevCert.parse(bytes(off_curve)).ec_public_key()
    with pytest.raises(sev_crypto.MalformedCertificate):
        sev_crypto.expect(
            SevCert.parse(platform.pek_cert), sev_crypto.USAGE_PDH, sev_crypto.ALGO_ECDH_SHA256
        )


def test_an_ephemeral_root_is_made_only_when_first_needed() -> None:
    platform = Platform.ephemeral()
    identity = platform.identity()
    assert identity["amd_root_fingerprint"] is None and identity["pdh_fingerprint"]
    platform.pdh_cert_export()  # the CEK needs the ASK
    assert platform.identity()["amd_root_fingerprint"] == platform.root.fingerprint()


# --- keystore -------------------------------------------------------------------------------


def test_keys_persist_and_files_are_private(tmp_path: Path) -> None:
    root_dir, state_dir = tmp_path / "root", tmp_path / "state"
    root = keystore.load_or_create_root(root_dir)
    first = keystore.load_or_create_platform(state_dir, root)
    assert stat.S_IMODE(os.stat(root_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    for f in (root_dir / keystore.ROOT_FILE, state_dir / keystore.PLATFORM_FILE):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert sorted(os.listdir(state_dir)) == [keystore.PLATFORM_FILE]  # no temporary left
    again_root = keystore.load_or_create_root(root_dir)
    again = keystore.load_or_create_platform(state_dir, again_root)
    assert again.pdh_fingerprint() == first.pdh_fingerprint()
    assert again.oca_fingerprint() == first.oca_fingerprint()
    assert again_root.fingerprint() == root.fingerprint()
    # A platform made again from its keys still chains to the same root.
    cek = SevCert.parse(again.pdh_cert_export()[1][2 * 2084 :])
    ask = AmdCert.parse(root.chain()[: len(root.chain()) // 2])
    sev_crypto.verify_sev_cert_signed_by(cek, ask.signer())


def test_two_hosts_naming_one_root_share_it_and_have_their_own_pdh(tmp_path: Path) -> None:
    results: list[str | None] = []

    def start(name: str) -> None:
        root = keystore.load_or_create_root(tmp_path / "root")  # both at once: one root
        platform = keystore.load_or_create_platform(tmp_path / name, root)
        results.append(root.fingerprint())
        results.append(platform.pdh_fingerprint())

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    roots, pdhs = {results[0], results[2]}, {results[1], results[3]}
    assert len(roots) == 1 and len(pdhs) == 2


def test_unsafe_directories_and_key_files_are_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(keystore.KeystoreError, match="chmod 700"):
        keystore.load_or_create_root(loose)
    state = tmp_path / "state"
    keystore.load_or_create_platform(state, ROOT)
    os.chmod(state / keystore.PLATFORM_FILE, 0o644)
    with pytest.raises(keystore.KeystoreError, match="0600"):
        keystore.load_or_create_platform(state, ROOT)
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    with pytest.raises(keystore.KeystoreError, match="not a directory"):
        keystore.load_or_create_platform(not_dir, ROOT)
    broken = tmp_path / "broken"
    broken.mkdir(mode=0o700)
    fd = os.open(broken / keystore.PLATFORM_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(keystore.KeystoreError, match="remove it"):
        keystore.load_or_create_platform(broken, ROOT)
