"""One host's SEV platform identity, and the simulated AMD root of trust above it.

Pure (no I/O; `kvmstub.keystore` keeps the keys on disk). Reference: sev-live-migration.md
section 1.4: ARK -> ASK -> CEK (chip-unique, AMD-signed) -> PEK (signed by the CEK and the
OCA) -> PDH (ECDH P-384, signed by the PEK). PDH_CERT_EXPORT hands out the PDH certificate and
PEK||OCA||CEK; the AMD chain ASK||ARK comes from AMD's key server in real life and from
`Platform.amd_chain()` here.

Never a real AMD key: `AmdRoot` is a simulated root that several simulated hosts may share
(each names the same root directory), so they trust each other's chains, as two genuine AMD
platforms do. A root made without keys creates them on first use (RSA-4096 takes a while), so
a daemon that never migrates never pays for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvmstub import sev_crypto, uapi
from kvmstub.sev_crypto import (
    ALGO_ECDH_SHA256,
    ALGO_ECDSA_SHA256,
    USAGE_ARK,
    USAGE_ASK,
    USAGE_CEK,
    USAGE_OCA,
    USAGE_PDH,
    USAGE_PEK,
)


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=sev_crypto.AMD_RSA_BITS)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


class AmdRoot:
    """The simulated AMD root: ARK (self-signed) and ASK (signed by the ARK), RSA-4096, RSA-PSS.

    Args:
        ark: the ARK private key, or None (with `ask` None) to create both on first use.
        ask: the ASK private key.
    """

    def __init__(
        self, ark: rsa.RSAPrivateKey | None = None, ask: rsa.RSAPrivateKey | None = None
    ) -> None:
        if (ark is None) != (ask is None):
            raise ValueError("give both AMD root keys or neither")
        self._ark = ark
        self._ask = ask
        self._chain: bytes | None = None

    @property
    def created(self) -> bool:
        return self._ark is not None

    def keys(self) -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
        """(ARK, ASK), created now if this root has none yet."""
        if self._ark is None or self._ask is None:
            self._ark, self._ask = new_rsa_key(), new_rsa_key()
        return self._ark, self._ask

    def chain(self) -> bytes:
        """ASK || ARK as AMD_CERTs: the "AMD chain" SEND_START takes."""
        if self._chain is None:
            ark, ask = self.keys()
            ark_cert = sev_crypto.build_amd_cert(
                usage=USAGE_ARK, public_key=ark.public_key(), signer=ark
            )
            ask_cert = sev_crypto.build_amd_cert(
                usage=USAGE_ASK, public_key=ask.public_key(), signer=ark
            )
            self._chain = ask_cert + ark_cert
        return self._chain

    def ark_public(self) -> rsa.RSAPublicKey:
        """The root the firmware trusts (AMD's, built into every genuine part)."""
        return self.keys()[0].public_key()

    def fingerprint(self) -> str | None:
        """SHA-256 of the ARK modulus, or None while the root has no keys yet."""
        if self._ark is None:
            return None
        n = self._ark.public_key().public_numbers().n
        return hashlib.sha256(n.to_bytes(sev_crypto.AMD_RSA_BITS // 8, "big")).hexdigest()


@dataclass(eq=False)
class PlatformKeys:
    """The private keys of one platform: what `kvmstub.keystore` persists."""

    pdh: ec.EllipticCurvePrivateKey
    pek: ec.EllipticCurvePrivateKey
    oca: ec.EllipticCurvePrivateKey
    cek: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, oca: ec.EllipticCurvePrivateKey | None = None) -> PlatformKeys:
        """Fresh keys; `oca` puts the platform in an existing owner's domain (policy DOMAIN)."""
        return cls(new_ec_key(), new_ec_key(), oca or new_ec_key(), new_ec_key())


class Platform:
    """A host's SEV platform: its keys, certificates and the AMD root that vouches for them.

    Args:
        keys: the platform's private keys.
        root: the AMD root (shared by every host that should trust this one).
        api: the firmware API version written into the PEK.
    """

    def __init__(
        self,
        keys: PlatformKeys,
        root: AmdRoot,
        *,
        api: tuple[int, int] = (uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR),
    ) -> None:
        self.keys = keys
        self.root = root
        self.api = api
        self.oca_cert = sev_crypto.build_sev_cert(
            usage=USAGE_OCA,
            algo=ALGO_ECDSA_SHA256,
            public_key=keys.oca.public_key(),
            signers=[(USAGE_OCA, keys.oca)],
        )
        self.pek_cert = sev_crypto.build_sev_cert(
            usage=USAGE_PEK,
            algo=ALGO_ECDSA_SHA256,
            public_key=keys.pek.public_key(),
            api=api,
            signers=[(USAGE_OCA, keys.oca), (USAGE_CEK, keys.cek)],
        )
        self.pdh_cert = sev_crypto.build_sev_cert(
            usage=USAGE_PDH,
            algo=ALGO_ECDH_SHA256,
            public_key=keys.pdh.public_key(),
            signers=[(USAGE_PEK, keys.pek)],
        )
        self._cek_cert: bytes | None = None

    @classmethod
    def ephemeral(cls) -> Platform:
        """A platform of fresh keys under a root of its own, created on first use."""
        return cls(PlatformKeys.generate(), AmdRoot())

    @property
    def cek_cert(self) -> bytes:
        """The CEK certificate, signed by the ASK (made on first use: it needs the root)."""
        if self._cek_cert is None:
            self._cek_cert = sev_crypto.build_sev_cert(
                usage=USAGE_CEK,
                algo=ALGO_ECDSA_SHA256,
                public_key=self.keys.cek.public_key(),
                signers=[(USAGE_ASK, self.root.keys()[1])],
            )
        return self._cek_cert

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT: (PDH certificate, PEK || OCA || CEK)."""
        return self.pdh_cert, self.pek_cert + self.oca_cert + self.cek_cert

    def amd_chain(self) -> bytes:
        """ASK || ARK, what AMD's key server hands out for this chip."""
        return self.root.chain()

    def pdh_fingerprint(self) -> str:
        return sev_crypto.SevCert.parse(self.pdh_cert).fingerprint()

    def oca_fingerprint(self) -> str:
        return sev_crypto.SevCert.parse(self.oca_cert).fingerprint()

    def identity(self) -> dict[str, str | None]:
        """What `kvmstub stats` shows of the platform: public fingerprints only."""
        return {
            "pdh_fingerprint": self.pdh_fingerprint(),
            "oca_fingerprint": self.oca_fingerprint(),
            "amd_root_fingerprint": self.root.fingerprint(),
        }
