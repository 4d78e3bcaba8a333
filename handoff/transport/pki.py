"""A throwaway PKI for trying cross-host migration: a CA and host certificates, as PEM files.

Mutual TLS (`handoff.transport.tcp`) needs, on each host, its certificate and key and the CA
that signs the other host's. `make_pki` writes all of that into one directory for the given
hosts, so a trial (`handoff tls-certs`, `handoff demo`) or a test can run two "hosts" at once:

    pki = make_pki(directory, {"source": ["127.0.0.2"], "target": ["127.0.0.3", "b.test"]})
    listener = await tcp.listen("tcp:127.0.0.3:0", pki["target"])
    channel = await tcp.connect(listener.address, pki["source"])

`make_ca` and `issue` are the pieces (a test may want a foreign CA, or a host certificate from
one). Keys are ECDSA P-256 (fast to make); private keys are written mode 0600. The CA's key is
never written: once the host certificates are issued nobody can issue another, which is what a
throwaway CA should be. A production deployment uses its own CA and its own issuing process.

With `exclusive=True` nothing is overwritten: every file is created with O_EXCL, and
`make_pki` checks all the names it would write before it writes the first.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from handoff.transport.tcp import TlsFiles

__all__ = [
    "DEFAULT_VALID",
    "Authority",
    "PkiError",
    "ca_file_name",
    "check_host_name",
    "check_subject_name",
    "issue",
    "make_ca",
    "make_pki",
]

DEFAULT_VALID = datetime.timedelta(days=1)
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiError(ValueError):
    """A name that cannot go into a certificate or a file name, or a file that exists."""


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and key (in memory) and its certificate's PEM file."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path
    valid: datetime.timedelta = DEFAULT_VALID


def check_host_name(host: str) -> str:
    """A host's short name, used for its files (`<host>.crt`, `<host>.key`).

    Raises:
        PkiError: not a plain name (letters, digits, '.', '_', '-'; no '/', at most 63).
    """
    if not _HOST.match(host) or host in (".", ".."):
        raise PkiError(
            f"host name {host!r}: use letters, digits, '.', '_' or '-' (it names the files "
            "<host>.crt and <host>.key)"
        )
    return host


def check_subject_name(name: str) -> str:
    """An address a host certificate names: an IP address or a DNS name.

    Raises:
        PkiError: neither.
    """
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise PkiError(f"{name!r} is neither an IP address nor a DNS name")
    return name


def ca_file_name(name: str) -> str:
    """The file `make_ca` writes the certificate of a CA called `name` to."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return f"{slug}-ca.pem"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int, exclusive: bool) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise PkiError(f"{path} exists: not overwriting it (choose another directory)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask, and before a byte of a key is in it
        f.write(data)
    return path


def make_ca(
    directory: str | os.PathLike[str],
    name: str = "handoff test CA",
    *,
    valid: datetime.timedelta = DEFAULT_VALID,
    exclusive: bool = False,
) -> Authority:
    """A self-signed CA, its certificate written to `<directory>/<slug>-ca.pem`
    (`ca_file_name`); its key stays in memory.

    Raises:
        PkiError: `exclusive` and the file exists.
    """
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
        .not_valid_after(now + valid)
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
    path = _write(
        directory / ca_file_name(name),
        cert.public_bytes(serialization.Encoding.PEM),
        0o644,
        exclusive,
    )
    return Authority(name=name, cert=cert, key=key, path=path, valid=valid)


def issue(
    ca: Authority,
    directory: str | os.PathLike[str],
    host: str,
    names: Iterable[str],
    *,
    exclusive: bool = False,
) -> TlsFiles:
    """A host certificate signed by `ca`, for `names` (IP addresses become IP
    subjectAltNames, anything else DNS ones), usable as TLS server and client; written as
    `<host>.crt` and `<host>.key` (mode 0600) in `directory`, with `ca`'s file as the CA.

    Raises:
        PkiError: a bad host name or subject name; `exclusive` and a file exists.
    """
    directory = Path(directory)
    check_host_name(host)
    alt: list[x509.GeneralName] = []
    for name in names:
        check_subject_name(name)
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    if not alt:
        raise PkiError(f"host {host!r}: give at least one address or DNS name it is reached by")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + ca.valid)
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
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = _write(directory / f"{host}.key", key_pem, 0o600, exclusive)
    cert_path = _write(
        directory / f"{host}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644, exclusive
    )
    return TlsFiles(cert=cert_path, key=key_path, ca=ca.path)


def make_pki(
    directory: str | os.PathLike[str],
    hosts: Mapping[str, Iterable[str]],
    *,
    ca_name: str = "handoff test CA",
    valid: datetime.timedelta = DEFAULT_VALID,
    exclusive: bool = False,
) -> dict[str, TlsFiles]:
    """One CA and a certificate for each host (its names: IPs and DNS names), all in
    `directory` (created 0700 if missing). Returns each host's `TlsFiles`.

    Raises:
        PkiError: a bad name; with `exclusive`, a file that exists (checked for every file
            before the first is written, so a refusal leaves nothing behind).
    """
    directory = Path(directory)
    hosts = {
        check_host_name(h): [check_subject_name(n) for n in names] for h, names in hosts.items()
    }
    if exclusive:
        wanted = [ca_file_name(ca_name)] + [f"{h}{ext}" for h in hosts for ext in (".crt", ".key")]
        present = [f for f in wanted if os.path.lexists(directory / f)]
        if present:
            raise PkiError(
                f"{directory} already holds {', '.join(present)}: not overwriting (choose "
                "another directory, or remove them)"
            )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = make_ca(directory, ca_name, valid=valid, exclusive=exclusive)
    return {
        host: issue(ca, directory, host, names, exclusive=exclusive)
        for host, names in hosts.items()
    }
