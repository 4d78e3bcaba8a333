"""What a VMM is asked to run: the guest-visible configuration and the host flags.

The guest-visible part (`GuestConfig`) must match exactly between the two sides of a handoff;
the host flags (`HostFlags`) may change freely, which is how an operator changes log level,
serial log path or allowed uids with an upgrade. Both are validated here, before anything
starts, with messages that name the value and what would be accepted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from typing import Literal

import msgspec

from handoff.hv import abi, witness

Mode = Literal["plain", "sev", "sev-es"]
MODES: tuple[Mode, ...] = ("plain", "sev", "sev-es")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_VCPUS = 256
MAX_MEMORY = 1 << 46  # 64 TiB: at most 64 slots, each one memfd in one SCM_RIGHTS message
# One memory slot is at most this big; a larger guest gets several slots, each its own memfd.
SLOT_MAX = 1 << 40

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class ConfigError(ValueError):
    """A flag or config value that cannot be used; the message says what would be accepted."""


def parse_size(text: str) -> int:
    """Parse `4G`, `512M`, `1T`, `65536` (bytes) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"memory size {text!r} is not a size: use a number with K, M, G or T")
    size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size % abi.PAGE_SIZE:
        raise ConfigError(f"memory size {text!r} is not a multiple of 4 KiB pages")
    if not 0 < size <= MAX_MEMORY:
        raise ConfigError(
            f"memory size {text!r} is out of range: 4K to at most {format_size(MAX_MEMORY)} "
            f"(a handoff passes at most {MAX_MEMORY // SLOT_MAX} memory slots of "
            f"{format_size(SLOT_MAX)}, one memfd each, in one message)"
        )
    return size


def format_size(size: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


class SlotLayout(msgspec.Struct, frozen=True):
    slot: int
    guest_phys_addr: int
    size: int


class GuestConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the guest can see: it must be the same on both sides of a handoff."""

    vcpus: int
    memory: int
    mode: Mode
    policy: int
    line_every: int
    flip_every: int

    def slots(self) -> list[SlotLayout]:
        out: list[SlotLayout] = []
        gpa = 0
        while gpa < self.memory:
            size = min(SLOT_MAX, self.memory - gpa)
            out.append(SlotLayout(len(out), gpa, size))
            gpa += size
        return out

    def differences(self, other: GuestConfig) -> list[str]:
        """Each guest-visible field that differs, as `name: ours vs theirs` phrases."""
        out = []
        for field in self.__struct_fields__:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                if field == "memory":
                    mine, theirs = format_size(mine), format_size(theirs)
                elif field == "policy":
                    mine, theirs = hex(mine), hex(theirs)
                out.append(f"{field}: {mine} here, {theirs} in the running VM")
        return out


def validate_guest(cfg: GuestConfig) -> None:
    if not 1 <= cfg.vcpus <= MAX_VCPUS:
        raise ConfigError(f"--vcpus {cfg.vcpus} is out of range: 1 to {MAX_VCPUS}")
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    if not 0 <= cfg.policy <= 0xFFFF_FFFF:
        raise ConfigError(f"--policy {cfg.policy:#x} is not a 32-bit SEV policy")
    if cfg.mode == "plain" and cfg.policy:
        raise ConfigError("--policy is for --mode sev or sev-es; a plain guest has no policy")
    if cfg.mode == "sev-es" and not cfg.policy & abi.SEV_POLICY_ES:
        raise ConfigError(
            f"--policy {cfg.policy:#x} lacks the ES bit (0x4) that --mode sev-es requires"
        )
    if cfg.mode == "sev" and cfg.policy & abi.SEV_POLICY_ES:
        raise ConfigError(f"--policy {cfg.policy:#x} has the ES bit (0x4): use --mode sev-es")
    if cfg.policy & abi.SEV_POLICY_NOSEND:
        # Intra-host MOVE does not use SEND_START, so NOSEND does not forbid it; allowed.
        pass
    if not 1 <= cfg.line_every <= 1_000_000:
        raise ConfigError(f"--line-every {cfg.line_every} is out of range: 1 to 1000000")
    if not 1 <= cfg.flip_every <= 1_000_000:
        raise ConfigError(f"--flip-every {cfg.flip_every} is out of range: 1 to 1000000")
    need = witness.required_memory(cfg.vcpus)
    if cfg.memory < need:
        raise ConfigError(
            f"--memory {format_size(cfg.memory)} is too small for {cfg.vcpus} vCPUs: "
            f"the guest needs at least {need} bytes"
        )


class HostFlags(msgspec.Struct, frozen=True, kw_only=True):
    """How this VMM process runs; free to change across a handoff."""

    name: str
    uuid: str
    kvm: str
    hypervisor: str = "kvmstub"  # "kvm" or "kvmstub" (handoff.hv.backends), resolved
    control: str | None = None
    serial_log: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    allow_uids: tuple[int, ...] = ()
    max_protocol: int = 3
    vcpu_states_inline_max: int = 128 * 1024  # protocol 3: larger vCPU states go in a memfd
    handoff_timeout: float = 10.0
    fault: str | None = None
    token_file: str | None = None
    # An upgrade's one-time token arrives on this inherited fd (a pipe), never in a file or argv.
    token_fd: int | None = None
    prefault: bool = False
    blackout_poll_us: int = 0  # see `Vmm.complete_incoming`
    idle_us: int = 0  # at launch: the witness guest idles this long after each line

    def allowed_uids(self) -> frozenset[int]:
        return frozenset(self.allow_uids) | {os.getuid()}


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"--name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# The serial log is often put in a shared directory (/tmp, /var/tmp), where another user could
# plant a symbolic link (to make us append to a file of their choosing) or a file of their own
# (to read or truncate what the guest prints). So the last component must not be a link, and a
# regular file must be ours; a character device (/dev/null, a tty) only root can make.
_SERIAL_LOG_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
)


def _serial_log_refusal(path: str, st: os.stat_result) -> str | None:
    """Why an existing `path` with this stat cannot be the serial log, or None."""
    if stat.S_ISLNK(st.st_mode):
        return (
            f"--serial-log {path} is a symbolic link: give the file's own path "
            "(a link in a shared directory could point anywhere)"
        )
    if stat.S_ISDIR(st.st_mode):
        return f"--serial-log {path} is a directory: name a file in it, e.g. {path}/serial.log"
    if stat.S_ISCHR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"--serial-log {path} is not a regular file (nor a character device)"
    if st.st_uid != os.getuid():
        return (
            f"--serial-log {path} is owned by uid {st.st_uid}, not by us (uid {os.getuid()}): "
            "remove it or pick another path"
        )
    return None


def _serial_log_open_error(path: str, exc: OSError) -> str:
    parent = os.path.dirname(path) or "."
    if exc.errno == errno.ELOOP:
        with contextlib.suppress(OSError):
            refusal = _serial_log_refusal(path, os.lstat(path))
            if refusal:
                return refusal
    if exc.errno == errno.EISDIR:
        return f"--serial-log {path} is a directory: name a file in it, e.g. {path}/serial.log"
    if exc.errno == errno.ENXIO:
        return f"--serial-log {path} is not a regular file (nor a character device)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(parent):
        return f"--serial-log {path}: directory {parent} does not exist"
    return f"--serial-log {path}: cannot open it for appending ({exc.strerror or exc})"


def check_serial_log(path: str) -> str:
    """Refuse a serial log path that `open_serial_log` would refuse, without creating it (a
    successor's flags are checked in the running VMM before it starts the successor)."""
    if not path:
        raise ConfigError("--serial-log needs a file path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise ConfigError(f"--serial-log {path}: directory {parent} does not exist") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--serial-log {path}: cannot create it (directory {parent} is not writable)"
            ) from None
        return path
    except OSError as exc:
        raise ConfigError(_serial_log_open_error(path, exc)) from None
    refusal = _serial_log_refusal(path, st)
    if refusal:
        raise ConfigError(refusal)
    return path


def open_serial_log(path: str) -> int:
    """Open (or create, mode 640) the serial log for appending; return its fd.

    Raises ConfigError for a symbolic link as the last component, a directory, a FIFO, a
    socket, a missing directory, or a regular file another uid owns: checked on the open
    file, so nothing can be swapped in between a check and the open.
    """
    try:
        # O_NONBLOCK: a FIFO planted there must not block us until someone reads it.
        fd = os.open(path, _SERIAL_LOG_FLAGS | os.O_NONBLOCK, 0o640)
    except OSError as exc:
        raise ConfigError(_serial_log_open_error(path, exc)) from None
    try:
        refusal = _serial_log_refusal(path, os.fstat(fd))
        if refusal:
            raise ConfigError(refusal)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_token(path: str) -> bytes:
    """A handoff token from a file that only its owner (this uid) can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot open it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--token-file {path}: not a regular file")
        if st.st_uid != os.getuid():
            raise ConfigError(f"--token-file {path}: owned by uid {st.st_uid}, not by us")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"--token-file {path}: mode {st.st_mode & 0o777:o} lets others read it; "
                "chmod 600 it"
            )
        data = os.read(fd, 4097).strip()
    finally:
        os.close(fd)
    if not 16 <= len(data) <= 4096:
        raise ConfigError(
            f"--token-file {path}: the token must be 16 to 4096 bytes (it has {len(data)}); "
            "e.g. `head -c 32 /dev/urandom | base64 > FILE`"
        )
    return data


def read_token_fd(fd: int) -> bytes:
    """An upgrade's one-time token, read to its end from the pipe its old VMM left on `fd`
    (which is closed here: nothing else of this process may read it)."""
    chunks: list[bytes] = []
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ConfigError(f"--token-fd {fd}: not a pipe (it is set by `handoff upgrade`)")
        while len(b"".join(chunks)) <= 4096 and (chunk := os.read(fd, 4097)):
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"--token-fd {fd}: cannot read it ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    data = b"".join(chunks).strip()
    if not 16 <= len(data) <= 4096:
        raise ConfigError(
            f"--token-fd {fd}: the token must be 16 to 4096 bytes (it has {len(data)})"
        )
    return data


def new_uuid() -> str:
    return str(uuid.uuid4())
