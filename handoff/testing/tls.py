"""A test PKI for cross-host migration: a CA and host certificates, written as PEM files.

Mutual TLS (`handoff.transport.tcp`) needs, on each host, its certificate and key and the CA
that signed the other host's. `make_pki` writes all of that into a directory for the given
hosts, so tests and the demo can run two "hosts" on 127.0.0.x:

    pki = make_pki(tmp_path, {"source": ["127.0.0.2"], "target": ["127.0.0.3", "target.test"]})
    listener = await tcp.listen("tcp:127.0.0.3:0", pki["target"])
    channel = await tcp.connect(listener.address, pki["source"])

`make_ca` and `issue` are the pieces, for tests that need a foreign CA or a host certificate
from one. Keys are ECDSA P-256 (fast to make), certificates valid for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from handoff.transport.tcp import TlsFiles

__all__ = ["Authority", "issue", "make_ca", "make_pki"]

_VALID = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and key (in memory) and its certificate's PEM file."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # whatever the umask
    return path


def make_ca(directory: str | os.PathLike[str], name: str = "handoff test CA") -> Authority:
    """A self-signed CA, its certificate written to `<directory>/<slug>-ca.pem`."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    path = _write(
        directory / f"{slug}-ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return Authority(name=name, cert=cert, key=key, path=path)


def issue(
    ca: Authority,
    directory: str | os.PathLike[str],
    host: str,
    names: Iterable[str],
) -> TlsFiles:
    """A host certificate signed by `ca`, for `names` (IP addresses become IP
    subjectAltNames, anything else DNS ones), usable as TLS server and client; written as
    `<host>.crt` and `<host>.key` (mode 0600) in `directory`, with `ca`'s file as the CA."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = _write(
        directory / f"{host}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = _write(directory / f"{host}.key", key_pem, 0o600)
    return TlsFiles(cert=cert_path, key=key_path, ca=ca.path)


def make_pki(
    directory: str | os.PathLike[str], hosts: Mapping[str, Iterable[str]]
) -> dict[str, TlsFiles]:
    """One CA and a certificate for each host (its names: IPs and DNS names), all in
    `directory`. Returns each host's `TlsFiles`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    return {host: issue(ca, directory, host, names) for host, names in hosts.items()}
