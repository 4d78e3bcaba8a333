"""The SEV firmware's migration cryptography and certificate formats, byte for byte.

Pure: bytes in, bytes out, no state, no I/O. The firmware model (`kvmstub.model.SevFirmware`)
decides the order of checks and the status codes; this module only computes and verifies.
"The reference" is sev-live-migration.md; section numbers point into it.

- Transport channel (section 1.5): ECDH on P-384 (shared secret = the X coordinate, 48 bytes
  big-endian, as OpenSSL derives it), the NIST SP 800-108 counter-mode KDF over HMAC-SHA256,
  master secret / KEK / KIK, TEK and TIK wrapped with AES-128-CTR under the KEK and MACed with
  the KIK, the policy MAC under the TIK. Session blob: 128 bytes.
- Packets (section 1.5): a 52-byte header (flags u32, IV 16, MAC 32); ciphertext =
  AES-128-CTR(TEK, IV, plaintext); MAC = HMAC-SHA256(TIK, 0x02 || flags || IV ||
  u32le(uncompressed length) || u32le(transport length) || ciphertext): encrypt-then-MAC.
- SEV certificates (section 1.4, spec 55766 as sev-tool's sevapi.h writes it out): 2084 bytes,
  version 1, API major/minor, key usage and algorithm, a public key (P-384: curve id 2 and QX,
  QY as 72-byte little-endian fields) and two signatures (ECDSA r, s as 72-byte little-endian
  fields; RSA signatures little-endian in 512 bytes). The signed region is the first 0x414
  bytes (everything before the signatures).
- AMD certificates (ARK, ASK): the AMD_CERT format of the same header, RSA keys, RSA-PSS
  signatures with SHA-384 and salt = digest length (virtee/sev), stored little-endian.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:
    from kvmstub import _sevcrypto as _sevcrypto  # (re-exported: memory takes it from here)
except ImportError as exc:  # pragma: no cover - a source tree whose C module was never built
    raise ImportError(
        "kvmstub's native crypto (kvmstub/_sevcrypto.c) is not built: `make install` or "
        "`pip install -e .` builds it (it needs gcc and libssl-dev)"
    ) from exc

# --- sizes and codes ------------------------------------------------------------------------

SESSION_LEN: Final = 128
PACKET_HEADER_LEN: Final = 52
SEV_CERT_LEN: Final = 2084
SIGNED_LEN: Final = 0x414  # header (16) + public key (1028): what each signature covers
KEY_LEN: Final = 16  # TEK, TIK, KEK, KIK, master secret, nonce, IVs
MAX_PACKET_LEN: Final = 0x5000  # the firmware's limit on one SEND/RECEIVE_UPDATE_DATA

# Key usages (SEV_USAGE)
USAGE_ARK: Final = 0x0
USAGE_ASK: Final = 0x13
USAGE_INVALID: Final = 0x1000
USAGE_OCA: Final = 0x1001
USAGE_PEK: Final = 0x1002
USAGE_PDH: Final = 0x1003
USAGE_CEK: Final = 0x1004

# Algorithms (SEV_SIG_ALGO)
ALGO_INVALID: Final = 0x0
ALGO_RSA_SHA256: Final = 0x1
ALGO_ECDSA_SHA256: Final = 0x2
ALGO_ECDH_SHA256: Final = 0x3
ALGO_RSA_SHA384: Final = 0x101

CURVE_P384: Final = 2
_ECC_FIELD: Final = 72  # QX, QY, r, s: 72-byte little-endian fields (room for P-521)
_SIG_FIELD: Final = 512

# Packet MAC contexts (section 1.5)
CTX_SECRET: Final = 0x01
CTX_DATA: Final = 0x02
CTX_VMSA: Final = 0x03
CTX_MEASURE: Final = 0x04

PACKET_FLAG_COMPRESSED: Final = 1 << 0

AMD_CERT_HEADER_LEN: Final = 0x40
AMD_RSA_BITS: Final = 4096  # Rome/Milan ARK and ASK


class CryptoError(ValueError):
    """Base of what this module refuses."""


class MalformedCertificate(CryptoError):
    """A certificate whose fields are not what its place in the chain needs."""


class BadSignature(CryptoError):
    """A signature that does not verify."""


class BadMac(CryptoError):
    """A MAC that does not verify."""


# --- primitives -----------------------------------------------------------------------------


def _hmac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the parts, in one call (hashlib's OpenSSL one-shot: cheaper than an HMAC
    object and an update per part)."""
    return std_hmac.digest(key, b"".join(parts), "sha256")


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR (encryption and decryption are the same operation); the IV is the whole
    128-bit initial counter block."""
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def _equal(a: bytes, b: bytes) -> bool:
    return std_hmac.compare_digest(a, b)


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """NIST SP 800-108 counter mode with HMAC-SHA256: block i (from 1) = HMAC(key, u32le(i) ||
    label || 0x00 || context || u32le(length in bits)); the first `length` bytes."""
    out = b""
    i = 1
    while len(out) < length:
        out += _hmac(
            key,
            i.to_bytes(4, "little"),
            label,
            b"\0",
            context,
            (length * 8).to_bytes(4, "little"),
        )
        i += 1
    return out[:length]


def ecdh_shared_secret(
    private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey
) -> bytes:
    """ECDH on P-384: the X coordinate of the shared point, 48 bytes big-endian (section 1.5)."""
    return private.exchange(ec.ECDH(), peer)


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """KEK and KIK of one channel, from the master secret."""

    kek: bytes
    kik: bytes


def derive_channel_keys(shared_secret: bytes, nonce: bytes) -> ChannelKeys:
    """master = KDF(shared, "sev-master-secret", nonce) (16 B); KEK = KDF(master, "sev-kek"),
    KIK = KDF(master, "sev-kik") (16 B each, empty context)."""
    master = kdf(shared_secret, b"sev-master-secret", nonce, KEY_LEN)
    return ChannelKeys(
        kek=kdf(master, b"sev-kek", b"", KEY_LEN), kik=kdf(master, b"sev-kik", b"", KEY_LEN)
    )


# --- the session blob -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """The 128-byte session blob SEND_START writes and RECEIVE_START reads: nonce 0x00-0x0F,
    wrap_tk 0x10-0x2F, wrap_iv 0x30-0x3F, wrap_mac 0x40-0x5F, policy_mac 0x60-0x7F."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def pack(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def unpack(cls, blob: bytes) -> Session:
        if len(blob) != SESSION_LEN:
            raise CryptoError(f"a session blob is {SESSION_LEN} bytes, not {len(blob)}")
        return cls(blob[0:16], blob[16:48], blob[48:64], blob[64:96], blob[96:128])


def policy_mac(tik: bytes, policy: int) -> bytes:
    return _hmac(tik, policy.to_bytes(4, "little"))


def wrap_session(
    keys: ChannelKeys,
    nonce: bytes,
    tek: bytes,
    tik: bytes,
    policy: int,
    wrap_iv: bytes | None = None,
) -> Session:
    """SEND_START's side: wrap TEK||TIK under the KEK (AES-128-CTR, fresh IV), MAC the wrapped
    keys with the KIK and the policy with the TIK."""
    iv = os.urandom(KEY_LEN) if wrap_iv is None else wrap_iv
    wrapped = _aes_ctr(keys.kek, iv, tek + tik)
    return Session(
        nonce=nonce,
        wrap_tk=wrapped,
        wrap_iv=iv,
        wrap_mac=_hmac(keys.kik, wrapped),
        policy_mac=policy_mac(tik, policy),
    )


def unwrap_session(keys: ChannelKeys, session: Session) -> tuple[bytes, bytes]:
    """RECEIVE_START's side: verify wrap_mac with the KIK (BadMac), then unwrap (TEK, TIK).
    The policy MAC is the caller's next check (`verify_policy_mac`)."""
    if not _equal(_hmac(keys.kik, session.wrap_tk), session.wrap_mac):
        raise BadMac("the wrapped transport keys do not verify (wrong PDH or a changed session)")
    keys_ = _aes_ctr(keys.kek, session.wrap_iv, session.wrap_tk)
    return keys_[:KEY_LEN], keys_[KEY_LEN:]


def verify_policy_mac(tik: bytes, policy: int, session: Session) -> None:
    if not _equal(policy_mac(tik, policy), session.policy_mac):
        raise BadMac("the policy does not match the session's policy MAC")


# --- packets --------------------------------------------------------------------------------


_MAC_HEAD: Final = struct.Struct("<BI")  # context, flags
_MAC_LENGTHS: Final = struct.Struct("<II")  # uncompressed length, transport length


def packet_mac(
    tik: bytes, flags: int, iv: bytes, uncompressed_len: int, ciphertext: bytes
) -> bytes:
    """HMAC-SHA256 under the TIK of context 0x02, flags, IV, both lengths and the ciphertext.
    (The reference; a channel's packets go through the native `PacketCipher`, held to it.)"""
    return _hmac(
        tik,
        _MAC_HEAD.pack(CTX_DATA, flags),
        iv,
        _MAC_LENGTHS.pack(uncompressed_len, len(ciphertext)),
        ciphertext,
    )


def seal_packet(
    tek: bytes, tik: bytes, plaintext: bytes, iv: bytes | None = None
) -> tuple[bytes, bytes]:
    """SEND_UPDATE_DATA's transport encryption: (header, ciphertext), encrypt-then-MAC with a
    fresh IV per packet, flags 0 (never compressed)."""
    iv = os.urandom(KEY_LEN) if iv is None else iv
    ciphertext = _aes_ctr(tek, iv, plaintext)
    flags = 0
    mac = packet_mac(tik, flags, iv, len(plaintext), ciphertext)
    return struct.pack("<I", flags) + iv + mac, ciphertext


_PACKET_HEADER: Final = struct.Struct("<I16s32s")  # flags, IV, MAC


class PacketHeader(NamedTuple):
    """A packet header's fields. (A named tuple: one per packet received, and a frozen
    dataclass cost twice as much to make.)"""

    flags: int
    iv: bytes
    mac: bytes

    @classmethod
    def unpack(cls, hdr: bytes) -> PacketHeader:
        if len(hdr) < PACKET_HEADER_LEN:
            raise CryptoError(f"a packet header is {PACKET_HEADER_LEN} bytes, not {len(hdr)}")
        return cls._make(_PACKET_HEADER.unpack_from(hdr))


def open_packet(tek: bytes, tik: bytes, header: PacketHeader, ciphertext: bytes) -> bytes:
    """RECEIVE_UPDATE_DATA's side: verify the MAC (BadMac), then decrypt."""
    mac = packet_mac(tik, header.flags, header.iv, len(ciphertext), ciphertext)
    if not _equal(mac, header.mac):
        raise BadMac("the packet's MAC does not verify")
    return _aes_ctr(tek, header.iv, ciphertext)


_IV_DRAW: Final = 64  # IVs of `PacketCipher.seal` per os.urandom call


class PacketCipher:
    """`seal_packet` and `open_packet` for one channel's TEK and TIK, byte for byte the same,
    in native code (`_sevcrypto.PacketKeys`): the AES key schedule of the TEK and HMAC's two
    keyed SHA-256 blocks of the TIK are made once, and a packet costs its AES-CTR pass and
    its MAC, about 4 us where the same through `cryptography` and `hashlib` cost 6 (and,
    among the four processes of a migration, two to three times that). The keys live only
    in OpenSSL's contexts, cleansed when this object goes (the channel drops it at its
    close). One thread at a time (the contexts hold state).

    The IVs of `seal` come from os.urandom, drawn _IV_DRAW at a time and handed out in turn:
    one getrandom system call per page cost more than the draw does. Each IV is used once;
    an IV is public (it travels in the packet header), so holding the next few in memory
    gives nothing away."""

    __slots__ = ("_iv_at", "_ivs", "_keys")

    def __init__(self, tek: bytes | bytearray, tik: bytes | bytearray) -> None:
        self._keys = _sevcrypto.PacketKeys(tek, tik)  # reads them once, copies neither
        self._ivs = b""
        self._iv_at = 0

    def _next_iv(self) -> bytes:
        at = self._iv_at
        if at == len(self._ivs):
            self._ivs, at = os.urandom(_IV_DRAW * KEY_LEN), 0
        self._iv_at = at + KEY_LEN
        return self._ivs[at : at + KEY_LEN]

    def seal(self, plaintext: bytes, iv: bytes | None = None) -> tuple[bytes, bytes]:
        """`seal_packet(tek, tik, plaintext, iv)`."""
        return self._keys.seal(self._next_iv() if iv is None else iv, plaintext)

    def open(self, header: PacketHeader, ciphertext: bytes) -> bytes:
        """`open_packet(tek, tik, header, ciphertext)`: BadMac, or the plaintext."""
        plaintext = self._keys.open(header.flags, header.iv, header.mac, ciphertext)
        if plaintext is None:
            raise BadMac("the packet's MAC does not verify")
        return plaintext


# --- SEV certificates -----------------------------------------------------------------------


def _le(value: int, width: int) -> bytes:
    return value.to_bytes(width, "little")


def _ec_public_field(key: ec.EllipticCurvePublicKey) -> bytes:
    """SEV_PUBKEY for an ECC key: curve u32, QX[72], QY[72] (little-endian), rmbz to 1028."""
    numbers = key.public_numbers()
    body = struct.pack("<I", CURVE_P384) + _le(numbers.x, _ECC_FIELD) + _le(numbers.y, _ECC_FIELD)
    return body.ljust(1028, b"\0")


def ec_public_key_of(public_field: bytes) -> ec.EllipticCurvePublicKey:
    """The P-384 key of a SEV_PUBKEY field. Raises MalformedCertificate for another curve or a
    point off the curve."""
    (curve,) = struct.unpack_from("<I", public_field)
    if curve != CURVE_P384:
        raise MalformedCertificate(f"public key curve {curve}, not P-384 ({CURVE_P384})")
    x = int.from_bytes(public_field[4 : 4 + _ECC_FIELD], "little")
    y = int.from_bytes(public_field[4 + _ECC_FIELD : 4 + 2 * _ECC_FIELD], "little")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError:
        raise MalformedCertificate("public key is not a point on P-384") from None


@dataclass(frozen=True, slots=True)
class SevCert:
    """A parsed 2084-byte SEV certificate."""

    raw: bytes
    version: int
    api_major: int
    api_minor: int
    usage: int
    algo: int
    public_field: bytes
    sig1_usage: int
    sig1_algo: int
    sig1: bytes
    sig2_usage: int
    sig2_algo: int
    sig2: bytes

    @classmethod
    def parse(cls, raw: bytes) -> SevCert:
        if len(raw) != SEV_CERT_LEN:
            raise MalformedCertificate(f"a SEV certificate is {SEV_CERT_LEN} bytes, not {len(raw)}")
        version, major, minor, _r0, _r1, usage, algo = struct.unpack_from("<IBBBBII", raw)
        s1u, s1a = struct.unpack_from("<II", raw, SIGNED_LEN)
        sig1 = raw[SIGNED_LEN + 8 : SIGNED_LEN + 8 + _SIG_FIELD]
        off2 = SIGNED_LEN + 8 + _SIG_FIELD
        s2u, s2a = struct.unpack_from("<II", raw, off2)
        sig2 = raw[off2 + 8 : off2 + 8 + _SIG_FIELD]
        return cls(
            raw,
            version,
            major,
            minor,
            usage,
            algo,
            raw[16:SIGNED_LEN],
            s1u,
            s1a,
            sig1,
            s2u,
            s2a,
            sig2,
        )

    def ec_public_key(self) -> ec.EllipticCurvePublicKey:
        return ec_public_key_of(self.public_field)

    def validate_body(self) -> None:
        """sev_cert_validate_body: version 1 and a valid public key (a known usage, an ECC
        algorithm, a P-384 point). MalformedCertificate otherwise."""
        if self.version != 1:
            raise MalformedCertificate(f"certificate version {self.version}, not 1")
        if self.usage not in _SEV_USAGES or self.algo not in (ALGO_ECDSA_SHA256, ALGO_ECDH_SHA256):
            raise MalformedCertificate(
                f"certificate key usage {self.usage:#x} algorithm {self.algo:#x}"
            )
        self.ec_public_key()

    def signer(self) -> Signer:
        """This certificate's key as a signer of others (its usage, algorithm, key)."""
        return Signer(self.usage, self.algo, self.ec_public_key())

    def signatures(self) -> list[tuple[int, int, bytes]]:
        return [
            (self.sig1_usage, self.sig1_algo, self.sig1),
            (self.sig2_usage, self.sig2_algo, self.sig2),
        ]

    def fingerprint(self) -> str:
        """SHA-256 of the public key field: who the certificate names."""
        return hashlib.sha256(self.public_field).hexdigest()


_SEV_USAGES: Final = frozenset({USAGE_OCA, USAGE_PEK, USAGE_PDH, USAGE_CEK})
# sev_cert_validate: which signer each kind of certificate must have.
_SIGNED_BY: Final = {
    USAGE_PDH: (USAGE_PEK,),
    USAGE_PEK: (USAGE_OCA, USAGE_CEK),
    USAGE_OCA: (USAGE_OCA,),
    USAGE_CEK: (USAGE_ASK,),
}


@dataclass(frozen=True, slots=True)
class Signer:
    """A signing key as the firmware sees it (sev_cert_pubkey_t): usage, algorithm, key."""

    usage: int
    algo: int
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def expect(cert: SevCert, usage: int, algo: int) -> None:
    """sev_cert_sanity_check: a valid body (MalformedCertificate), then `cert` must be a
    `usage` key of algorithm `algo` (MalformedCertificate)."""
    cert.validate_body()
    if cert.usage != usage or cert.algo != algo:
        raise MalformedCertificate(
            f"certificate has usage {cert.usage:#x} algorithm {cert.algo:#x}, "
            f"expected usage {usage:#x} algorithm {algo:#x}"
        )


def _ecdsa_sig_field(signature: bytes) -> bytes:
    r, s = decode_dss_signature(signature)
    return (_le(r, _ECC_FIELD) + _le(s, _ECC_FIELD)).ljust(_SIG_FIELD, b"\0")


def _ecdsa_from_field(field: bytes) -> bytes:
    r = int.from_bytes(field[:_ECC_FIELD], "little")
    s = int.from_bytes(field[_ECC_FIELD : 2 * _ECC_FIELD], "little")
    return encode_dss_signature(r, s)


_PSS_SHA384: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def build_sev_cert(
    *,
    usage: int,
    algo: int,
    public_key: ec.EllipticCurvePublicKey,
    api: tuple[int, int] = (0, 0),
    signers: Sequence[tuple[int, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]] = (),
) -> bytes:
    """A 2084-byte SEV certificate with up to two signatures, each (signer usage, key):
    ECDSA-SHA256 for P-384 signers, RSA-PSS SHA-384 (RSA_SHA384) for the ASK."""
    head = struct.pack("<IBBBBII", 1, api[0], api[1], 0, 0, usage, algo) + _ec_public_field(
        public_key
    )
    assert len(head) == SIGNED_LEN
    sigs = b""
    for signer_usage, key in signers:
        if isinstance(key, rsa.RSAPrivateKey):
            sig = key.sign(head, _PSS_SHA384, hashes.SHA384())[::-1].ljust(_SIG_FIELD, b"\0")
            sigs += struct.pack("<II", signer_usage, ALGO_RSA_SHA384) + sig
        else:
            # Deterministic (RFC 6979): the same key always gives the same certificate, as a
            # certificate kept by the firmware is the same bytes every time it is exported.
            ecdsa = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
            sig = _ecdsa_sig_field(key.sign(head, ecdsa))
            sigs += struct.pack("<II", signer_usage, ALGO_ECDSA_SHA256) + sig
    for _ in range(2 - len(signers)):
        sigs += struct.pack("<II", USAGE_INVALID, ALGO_INVALID) + bytes(_SIG_FIELD)
    return head + sigs


def verify_sev_cert_signed_by(cert: SevCert, signer: Signer) -> None:
    """sev_cert_validate(cert, signer), in the firmware's order: the signature first (the
    slot whose usage and algorithm are the signer's; none -> MalformedCertificate, a slot
    half filled in or a signature that does not verify -> BadSignature), then the body
    (MalformedCertificate), then whether that signer may sign this kind of certificate
    (MalformedCertificate)."""
    status: CryptoError | None = MalformedCertificate(
        f"certificate carries no signature by usage {signer.usage:#x}"
    )
    body = cert.raw[:SIGNED_LEN]
    for usage, algo, field in cert.signatures():
        if (algo == ALGO_INVALID) != (usage == USAGE_INVALID):
            raise BadSignature("a malformed signature slot")
        if algo != signer.algo or usage != signer.usage:
            continue
        try:
            if isinstance(signer.key, rsa.RSAPublicKey):
                n_bytes = (signer.key.key_size + 7) // 8
                signer.key.verify(field[:n_bytes][::-1], body, _PSS_SHA384, hashes.SHA384())
            else:
                signer.key.verify(_ecdsa_from_field(field), body, ec.ECDSA(hashes.SHA256()))
            status = None
        except InvalidSignature:
            status = BadSignature(f"signature by usage {signer.usage:#x} does not verify")
    if status is not None:
        raise status
    cert.validate_body()
    if signer.usage not in _SIGNED_BY.get(cert.usage, ()):
        raise MalformedCertificate(
            f"a usage {cert.usage:#x} certificate may not be signed by usage {signer.usage:#x}"
        )


# --- AMD certificates (ARK, ASK) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AmdCert:
    """A parsed AMD_CERT: an RSA key with its key id, its signer's id and a PSS signature."""

    raw: bytes
    version: int
    key_id: bytes
    certifying_id: bytes
    usage: int
    public_key: rsa.RSAPublicKey
    signature: bytes
    signed: bytes

    @classmethod
    def parse(cls, raw: bytes) -> AmdCert:
        if len(raw) < AMD_CERT_HEADER_LEN:
            raise MalformedCertificate("AMD certificate too short")
        version = struct.unpack_from("<I", raw)[0]
        key_id, certifying = raw[4:20], raw[20:36]
        usage = struct.unpack_from("<I", raw, 0x24)[0]
        exp_bits, mod_bits = struct.unpack_from("<II", raw, 0x38)
        if exp_bits not in (2048, 4096) or mod_bits not in (2048, 4096):
            raise MalformedCertificate(f"AMD certificate key sizes {exp_bits}/{mod_bits}")
        e_len, n_len = exp_bits // 8, mod_bits // 8
        if len(raw) != amd_cert_len(exp_bits, mod_bits):
            raise MalformedCertificate(f"AMD certificate is {len(raw)} bytes")
        off = AMD_CERT_HEADER_LEN
        e = int.from_bytes(raw[off : off + e_len], "little")
        n = int.from_bytes(raw[off + e_len : off + e_len + n_len], "little")
        try:
            public = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise MalformedCertificate("AMD certificate RSA key is invalid") from None
        signed = raw[: off + e_len + n_len]
        return cls(
            raw, version, key_id, certifying, usage, public, raw[off + e_len + n_len :], signed
        )

    def verify_signed_by(self, signer: rsa.RSAPublicKey) -> None:
        try:
            signer.verify(self.signature[::-1], self.signed, _PSS_SHA384, hashes.SHA384())
        except (InvalidSignature, ValueError):
            raise BadSignature("AMD certificate signature does not verify") from None

    def validate(self, parent: AmdCert, usage: int) -> None:
        """amd_cert_validate: the signature by `parent` first (BadSignature), then the common
        fields, the usage and the signer's key id (MalformedCertificate)."""
        self.verify_signed_by(parent.public_key)
        if self.version != 1:
            raise MalformedCertificate(f"AMD certificate version {self.version}, not 1")
        if self.usage != usage:
            raise MalformedCertificate(f"AMD certificate usage {self.usage:#x}, not {usage:#x}")
        if self.certifying_id != parent.key_id:
            raise MalformedCertificate("AMD certificate names another signer")

    def signer(self) -> Signer:
        """amd_cert_export_pubkey: the key as a SEV signer (algorithm RSA_SHA384)."""
        return Signer(self.usage, ALGO_RSA_SHA384, self.public_key)

    def fingerprint(self) -> str:
        n = self.public_key.public_numbers().n
        return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()


def amd_cert_len(exp_bits: int = AMD_RSA_BITS, mod_bits: int = AMD_RSA_BITS) -> int:
    return AMD_CERT_HEADER_LEN + exp_bits // 8 + 2 * (mod_bits // 8)


def amd_key_id(key: rsa.RSAPublicKey) -> bytes:
    """A stable 16-byte key id for a simulated AMD key (real ids are AMD's own)."""
    n = key.public_numbers().n
    return hashlib.sha256(n.to_bytes(AMD_RSA_BITS // 8, "big")).digest()[:16]


def build_amd_cert(*, usage: int, public_key: rsa.RSAPublicKey, signer: rsa.RSAPrivateKey) -> bytes:
    """An AMD_CERT for `public_key`, signed by `signer` (the ARK signs itself and the ASK)."""
    numbers = public_key.public_numbers()
    n_len = AMD_RSA_BITS // 8
    head = (
        struct.pack("<I", 1)
        + amd_key_id(public_key)
        + amd_key_id(signer.public_key())
        + struct.pack("<I", usage)
        + bytes(16)
        + struct.pack("<II", AMD_RSA_BITS, AMD_RSA_BITS)
    )
    assert len(head) == AMD_CERT_HEADER_LEN
    body = head + _le(numbers.e, n_len) + _le(numbers.n, n_len)
    signature = signer.sign(body, _PSS_SHA384, hashes.SHA384())[::-1]
    return body + signature
