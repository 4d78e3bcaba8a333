"""The runtime directory: one small JSON entry per VM beside its control socket.

Each VMM keeps its QMP socket in the runtime directory as `<name>.qmp` (by default) and an entry
`<name>.json` next to it: which process runs the VM now, which program version, the guest's
shape, when the guest started, and the last handoff. The VMM writes the entry when its guest
starts; a successor takes it over after a handoff (same guest start, its own pid and version);
the source of a handoff adds the handoff's id and pause. `handoff list` reads them all.

Writers replace the file atomically (write a temporary file, then rename) under an flock of the
directory, so the two VMMs of a handoff can update their own fields in either order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import trio

__all__ = [
    "LastHandoff",
    "VmEntry",
    "VmListing",
    "entry_path",
    "list_vms",
    "live_owner",
    "process_alive",
    "process_start_time",
    "prune",
    "remove_entry",
    "update_entry",
    "write_entry",
]


class LastHandoff(msgspec.Struct, kw_only=True, omit_defaults=True, rename="kebab"):
    """What the most recent handoff of this VM did, as seen by its source (or, after a
    takeover, by the target)."""

    id: str
    status: str  # completed | failed
    at: float  # when it finished, seconds since the epoch
    pause_ms: float  # the source's pause to the target's resume
    total_ms: float = 0.0
    from_pid: int = 0
    to_pid: int = 0
    protocol: int = 0
    recovery: str = ""
    error: str = ""


class VmEntry(msgspec.Struct, kw_only=True, omit_defaults=True, rename="kebab"):
    """One VM in the runtime directory."""

    name: str
    pid: int
    pid_start: int = 0  # the process's start time in clock ticks: guards against pid reuse
    version: str
    mode: str
    hypervisor: str = "kvmstub"  # the kernel the guest runs on (older releases: kvmstub)
    vcpus: int
    memory: int
    control: str
    started: float  # when the guest was launched (kept across handoffs)
    vmm_started: float  # when the current VMM took the guest
    handoffs: int = 0
    last_handoff: LastHandoff | None = None


_decoder = msgspec.json.Decoder(VmEntry)


def entry_path(control: str) -> str:
    """The entry beside a control socket: `<dir>/<name>.qmp` -> `<dir>/<name>.json`."""
    base = control[: -len(".qmp")] if control.endswith(".qmp") else control
    return base + ".json"


def process_start_time(pid: int) -> int:
    """The start time of process `pid` in clock ticks since boot (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    # After the command name: state is field 3, starttime field 22 (1-based) of the whole line.
    if len(fields) < 20 or fields[0] == "Z":
        return 0
    return int(fields[19])


def process_alive(pid: int, start: int) -> bool:
    """Whether `pid` still names the process that started at `start` (0: any process)."""
    now = process_start_time(pid)
    return now != 0 and (start == 0 or now == start)


def live_owner(control: str) -> VmEntry | None:
    """The entry beside the control socket path `control` if the VMM it names is alive and is
    another process than this one: that VM's name and socket are taken (None: free, ours, or
    only a stale entry there)."""
    entry = _read(entry_path(control))
    if entry is None or entry.pid == os.getpid() or not process_alive(entry.pid, entry.pid_start):
        return None
    return entry


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(path: str) -> VmEntry | None:
    try:
        with open(path, "rb") as f:
            return _decoder.decode(f.read())
    except (OSError, msgspec.DecodeError):
        return None


def _write(path: str, entry: VmEntry) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(entry) + b"\n")
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_entry(path: str, entry: VmEntry) -> None:
    """Create or replace the entry at `path` (its directory must exist)."""
    with _locked(os.path.dirname(path) or "."):
        _write(path, entry)


def update_entry(path: str, change: Callable[[VmEntry | None], VmEntry | None]) -> bool:
    """Read-modify-write under the directory lock: `change` gets the current entry (None when
    there is none or it is unreadable) and returns the new one, or None to leave the file as it
    is. Returns whether it wrote."""
    with _locked(os.path.dirname(path) or "."):
        new = change(_read(path))
        if new is None:
            return False
        _write(path, new)
        return True


async def update_entry_async(
    path: str,
    change: Callable[[VmEntry | None], VmEntry | None],
    timeout: float = 5.0,
) -> bool:
    """`update_entry` for an event loop that must not block: the directory lock is tried
    without waiting and retried after short sleeps (the other VMM of a handoff may hold it,
    niced, for a while); the read-modify-write itself is a few hundred microseconds."""
    directory = os.path.dirname(path) or "."
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(0.005)
        new = change(_read(path))
        if new is None:
            return False
        _write(path, new)
        return True
    finally:
        os.close(fd)  # releases the lock


def remove_entry(path: str, pid: int) -> bool:
    """Remove the entry at `path` if process `pid` owns it (a successor may own it by now)."""
    try:
        with _locked(os.path.dirname(path) or "."):
            entry = _read(path)
            if entry is None or entry.pid != pid:
                return False
            os.unlink(path)
            return True
    except OSError:
        return False


@dataclass
class VmListing:
    """One entry as `handoff list` shows it."""

    path: str
    entry: VmEntry
    alive: bool

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.entry.started)


def list_vms(directory: str) -> list[VmListing]:
    """Every entry in `directory`, sorted by name, each marked alive or stale."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out: list[VmListing] = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        entry = _read(path)
        if entry is None:
            continue
        out.append(VmListing(path, entry, process_alive(entry.pid, entry.pid_start)))
    return out


def prune(directory: str) -> list[VmListing]:
    """Remove the stale entries (their VMM is gone) and their control sockets if nothing
    listens there any more; returns what was removed."""
    removed: list[VmListing] = []
    for item in list_vms(directory):
        if item.alive:
            continue
        with _locked(directory):
            current = _read(item.path)
            if current is None or process_alive(current.pid, current.pid_start):
                continue  # taken over meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)
        # Only the socket beside the entry (an entry names its own socket; one that names a
        # path elsewhere was not written by a VMM), and only if it is a socket nothing answers.
        beside = os.path.abspath(entry_path(current.control)) == os.path.abspath(item.path)
        if beside and not _answers(current.control):
            with contextlib.suppress(OSError):
                os.unlink(current.control)
        removed.append(item)
    return removed


def _answers(path: str) -> bool:
    """Whether a socket at `path` accepts connections (True for anything else that is there,
    so that prune never removes what is not a dead socket)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return True
    except OSError:
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
