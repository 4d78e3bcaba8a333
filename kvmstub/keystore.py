"""Where a host's SEV platform keys and the simulated AMD root live between daemon runs.

`kvmstub serve --state-dir DIR --amd-root DIR`: the platform's private keys (PDH, PEK, OCA,
CEK) are kept in DIR/sev-platform.pem and the AMD root's (ARK, ASK) in ROOT/amd-root.pem,
each created on first use. Hosts that name the same root directory trust each other's chains.
These are simulated keys for a simulated firmware: never a real AMD key.

`--oca-key FILE` puts the platform in an owner's domain (guest policy DOMAIN, reference
section 1.3): the platform's PEK is certified by the owner's OCA key read from FILE, as the
firmware's PEK_CERT_IMPORT does once the owner signed the platform's PEK_CSR; hosts given the
same FILE share one OCA. The owner's key is only read, never created or copied: FILE must be
this user's, mode 0600. (A real firmware is handed the OCA certificate and the signed PEK, not
the OCA's private key; the simulation signs with the key itself.)

Directories follow the rule every socket directory of the project follows: created mode 0700
when missing; refused when another uid owns them or others can reach into them. Key files are
mode 0600, written whole under a temporary name and linked into place, so two daemons starting
at once end up with the same keys (the loser loads the winner's) and a crash never leaves half
a key file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvmstub.platform import AmdRoot, Platform, PlatformKeys, new_rsa_key

ROOT_FILE = "amd-root.pem"
PLATFORM_FILE = "sev-platform.pem"
_PEM_END = b"-----END PRIVATE KEY-----\n"


class KeystoreError(Exception):
    """A key directory or file that cannot be used; the message says what to do."""


def _check_directory(directory: Path, what: str) -> None:
    if not directory.exists():
        try:
            directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as e:
            raise KeystoreError(f"cannot create the {what} {directory}: {e.strerror}") from e
    try:
        st = os.stat(directory)
    except OSError as e:
        raise KeystoreError(f"cannot inspect the {what} {directory}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise KeystoreError(f"the {what} {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise KeystoreError(
            f"the {what} {directory} is owned by uid {st.st_uid}, not by this process "
            f"(uid {os.geteuid()}): another user could replace the keys; use a directory of "
            "your own with mode 0700"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeystoreError(
            f"the {what} {directory} has mode {mode:04o}, which lets other users reach the "
            f"keys; run `chmod 700 {directory}` or choose a private directory"
        )


def _read_keys(
    path: Path, count: int, advice: str = "remove it to start over"
) -> list[bytes] | None:
    """The `count` PEM private keys in `path`, or None if the file does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeystoreError(f"cannot open {path}: {e.strerror}") from e
    # Checked on the fd before it becomes a file object: fdopen of a directory fails (and
    # would leave the fd open) before the check could say what is wrong.
    with contextlib.ExitStack() as owned:
        owned.callback(os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise KeystoreError(f"{path} is not a regular file of this user: refusing its keys")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeystoreError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: private keys must be 0600 "
                f"(run `chmod 600 {path}`)"
            )
        owned.pop_all()
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    blocks = [b + _PEM_END for b in data.split(_PEM_END) if b.strip()]
    if len(blocks) != count:
        raise KeystoreError(f"{path} holds {len(blocks)} keys, not {count}: {advice}")
    return blocks


def _write_keys(path: Path, blocks: list[bytes]) -> bool:
    """Create `path` (0600) holding `blocks`; False if another process (or another thread of
    this one: the temporary name is its own, not merely the pid's) created it first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(blocks))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(block: bytes, path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except ValueError as e:
        raise KeystoreError(f"{path}: not a usable private key ({e})") from e
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeystoreError(f"{path}: unexpected key type {type(key).__name__}")
    return key


def _load_or_create(path: Path, count: int, make: list[bytes]) -> list[bytes]:
    blocks = _read_keys(path, count)
    if blocks is None:
        if _write_keys(path, make):
            return make
        blocks = _read_keys(path, count)
        assert blocks is not None
    return blocks


def load_or_create_root(directory: str | os.PathLike[str]) -> AmdRoot:
    """The simulated AMD root kept in `directory` (created there if missing).

    Raises:
        KeystoreError: the directory or key file is unsafe or unusable.
    """
    path = Path(directory).absolute()
    _check_directory(path, "AMD root directory")
    file = path / ROOT_FILE
    blocks = _read_keys(file, 2)
    if blocks is None:
        blocks = _load_or_create(file, 2, [_pem(new_rsa_key()), _pem(new_rsa_key())])
    ark, ask = (_load(b, file) for b in blocks)
    if not isinstance(ark, rsa.RSAPrivateKey) or not isinstance(ask, rsa.RSAPrivateKey):
        raise KeystoreError(f"{file}: the AMD root keys must be RSA")
    return AmdRoot(ark, ask)


def load_or_create_platform(
    directory: str | os.PathLike[str],
    root: AmdRoot,
    oca: ec.EllipticCurvePrivateKey | None = None,
) -> Platform:
    """The platform whose keys are kept in `directory` (created there if missing), under
    `root`; with `oca` (an owner's key, `load_oca_key`) its PEK is certified by that owner
    instead of by the platform's own OCA, which stays in the file for a run without one.

    Raises:
        KeystoreError: the directory or key file is unsafe or unusable.
    """
    path = Path(directory).absolute()
    _check_directory(path, "state directory")
    file = path / PLATFORM_FILE
    blocks = _read_keys(file, 4)
    if blocks is None:
        fresh = PlatformKeys.generate()
        make = [_pem(k) for k in (fresh.pdh, fresh.pek, fresh.oca, fresh.cek)]
        blocks = _load_or_create(file, 4, make)
    keys = [_load(b, file) for b in blocks]
    ec_keys = [k for k in keys if isinstance(k, ec.EllipticCurvePrivateKey)]
    if len(ec_keys) != 4 or any(not isinstance(k.curve, ec.SECP384R1) for k in ec_keys):
        raise KeystoreError(f"{file}: the platform keys must be P-384")
    own = PlatformKeys(*ec_keys)
    return Platform(own if oca is None else dataclasses.replace(own, oca=oca), root)


_MAKE_OCA_KEY = (
    "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out FILE && chmod 600 FILE"
)


def load_oca_key(file: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The owner's OCA key in `file` (`kvmstub serve --oca-key`): one P-384 private key, PEM
    (PKCS#8), a regular file of this user with mode 0600. Never created here: the key is the
    owner's, and every host of the owner's domain is given the same file.

    Raises:
        KeystoreError: the file is missing, unsafe, or not one P-384 private key.
    """
    path = Path(file).absolute()
    what = f"one P-384 private key in PKCS#8 PEM (make one with `{_MAKE_OCA_KEY}`)"
    blocks = _read_keys(path, 1, f"an OCA key file holds {what}")
    if blocks is None:
        raise KeystoreError(f"the OCA key file {path} does not exist: it must hold {what}")
    key = _load(blocks[0], path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise KeystoreError(f"{path}: an OCA key is {what}")
    return key


__all__ = ["KeystoreError", "load_oca_key", "load_or_create_platform", "load_or_create_root"]
