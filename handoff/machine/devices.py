"""The VMM's host-side devices: the serial port, the doorbell, and the shared-region list.

Their state is what a handoff must carry besides the guest's own CPU and memory state:
`DeviceState` is the snapshot taken at the pause and restored by the successor.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from handoff.hv import IoExitView, abi, witness
from handoff.hv.base import VmState
from handoff.machine.config import open_serial_log

log = logging.getLogger("handoff.devices")

SUM_MASK = 0xFFFF_FFFF


# Bytes of an unfinished serial line kept per vCPU (a witness line is about 40): a handoff
# carries it whole, so a line that grows past this is cut here, as a line of its own.
MAX_PARTIAL_LINE = 128


class DeviceState(msgspec.Struct, frozen=True):
    """Everything the devices hold that the guest can observe, and the VM's own kernel state
    (the real KVM's interrupt controllers, PIT and clock: `hv.VmState`), read at the pause."""

    doorbell_sums: tuple[int, ...] = ()
    shared_regions: list[tuple[int, int]] = []
    # Each vCPU's unfinished serial line (a real x86 guest writes a line in several OUTs, and
    # a handoff may come between two of them).
    serial_partial: tuple[tuple[int, bytes], ...] = ()
    vm_state: VmState | None = None
    # MSR_KVM_MIGRATION_CONTROL as the guest last wrote it (None: not offered to the guest).
    migration_control: int | None = None

    def doorbell_blob(self) -> bytes:
        return b"".join(s.to_bytes(4, "little") for s in self.doorbell_sums)

    @staticmethod
    def sums_from_blob(blob: bytes) -> tuple[int, ...]:
        if len(blob) % 4:
            raise ValueError("doorbell state is not a whole number of 32-bit sums")
        return tuple(int.from_bytes(blob[i : i + 4], "little") for i in range(0, len(blob), 4))


class LogFile(Protocol):
    """Where the serial device writes its lines: `write` as `os.write` (may write less)."""

    def write(self, data: bytes | memoryview) -> int: ...

    def close(self) -> None: ...


class _FdLog:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failing file system must not stop a shutdown
            os.close(self.fd)


# While the serial log keeps failing, at most one warning in this many seconds (the first
# failure of an outage is warned about at once).
WARN_EVERY = 10.0


class Serial:
    """The 16550 at 0x3f8, reduced to what the guest uses: whole lines, appended to a log.

    The log is opened in append mode and flushed per line, so a successor VMM appending to the
    same path continues the same file, and a crash loses at most the line being written.

    A log that fails (a full disk, a file over its size limit, an I/O error) never stops the
    guest: the line is dropped and counted (`status()`, in query-status), a warning says so
    (rate-limited), and the next line tries again, so writing resumes when the file takes
    writes again. Each line costs one write attempt, failing or not.
    """

    def __init__(
        self,
        path: str | None,
        *,
        out: LogFile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._out: LogFile | None = out
        # Each vCPU's line so far: a real x86 guest writes a line in several OUTs (4 bytes
        # each), and the vCPUs' OUTs interleave.
        self.partial: dict[int, bytes] = {}
        self.lines = 0
        self.panicked: str | None = None
        # The last seq each vCPU printed: a handoff records it at the pause, so the first line
        # after it (whose gap_us holds the pause the guest saw) can be found.
        self.last_seq: dict[int, int] = {}
        # Output the log could not take: totals, the current error (None while writes work),
        # and what was dropped since the last warning.
        self.lost_bytes = 0
        self.lost_lines = 0
        self.error: str | None = None
        self._torn = False  # a short write left part of a line, without its newline, in the log
        self._clock = clock
        self._warned_at = -math.inf
        self._outage_warned = False
        self._unwarned_bytes = 0
        self._unwarned_lines = 0
        if out is None and path is not None:
            self._out = _FdLog(open_serial_log(path))

    def write(self, data: bytes, vcpu: int = 0) -> None:
        buf = self.partial.get(vcpu, b"") + data
        *complete, rest = buf.split(b"\n")
        if len(rest) > MAX_PARTIAL_LINE:  # a guest that never ends its line: cut it there
            complete.append(rest)
            rest = b""
        if rest:
            self.partial[vcpu] = rest
        else:
            self.partial.pop(vcpu, None)
        for line in complete:
            self.lines += 1
            if line.startswith(b"vcpu="):
                fields = line.split(b" ", 2)
                if len(fields) >= 2 and fields[1].startswith(b"seq="):
                    with contextlib.suppress(ValueError):
                        self.last_seq[int(fields[0][5:])] = int(fields[1][4:])
            elif line.startswith(b"PANIC") and self.panicked is None:
                self.panicked = line.decode("ascii", "replace")
            if self._out is not None:
                self._append(line + b"\n")

    def _append(self, data: bytes) -> None:
        assert self._out is not None
        # After a torn line, a newline first: the piece stays a line of its own.
        lead = b"\n" if self._torn else b""
        buf = memoryview(lead + data)
        done = 0
        try:
            while done < len(buf):
                n = self._out.write(buf[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as exc:
            if done:
                self._torn = buf[done - 1] != ord("\n")
            self._dropped(len(data) - max(0, done - len(lead)), exc)
            return
        self._torn = False
        if self.error is not None:
            self._resumed()

    def _dropped(self, nbytes: int, exc: OSError) -> None:
        self.lost_bytes += nbytes
        self.lost_lines += 1
        self._unwarned_bytes += nbytes
        self._unwarned_lines += 1
        self.error = exc.strerror or str(exc)
        now = self._clock()
        if now - self._warned_at < WARN_EVERY:
            return
        if not self._outage_warned:
            log.warning(
                "serial log %s: cannot write (%s): the guest keeps running; its output is "
                "dropped and counted (query-status) until the file takes writes again",
                self.path,
                self.error,
            )
        else:
            log.warning(
                "serial log %s: still cannot write (%s): %d lines (%d bytes) dropped since "
                "the last warning, %d lines (%d bytes) in all",
                self.path,
                self.error,
                self._unwarned_lines,
                self._unwarned_bytes,
                self.lost_lines,
                self.lost_bytes,
            )
        self._warned_at = now
        self._outage_warned = True
        self._unwarned_bytes = self._unwarned_lines = 0

    def _resumed(self) -> None:
        if self._outage_warned:
            log.warning(
                "serial log %s: writing again; %d lines (%d bytes) of guest output were "
                "dropped in all",
                self.path,
                self.lost_lines,
                self.lost_bytes,
            )
            self._outage_warned = False
            self._unwarned_bytes = self._unwarned_lines = 0
        self.error = None

    def status(self) -> dict[str, Any] | None:
        """For query-status: the log's path, the output it lost, and why (None: it works)."""
        if self.path is None and self._out is None:
            return None
        return {
            "path": self.path,
            "lost-bytes": self.lost_bytes,
            "lost-lines": self.lost_lines,
            "error": self.error,
        }

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class Doorbell:
    """Ports 0x510 (out) and 0x511 (in), one register per vCPU (like a local APIC): the guest
    adds its seq and reads back its running sum.

    The sums are device state: a successor that lost them would answer a wrong sum and the
    guest would PANIC, which is how the tests see lost device state.
    """

    def __init__(self, vcpus: int, sums: tuple[int, ...] = ()) -> None:
        self.sums = [0] * vcpus
        for i, value in enumerate(sums[:vcpus]):
            self.sums[i] = value & SUM_MASK

    def out(self, vcpu: int, data: bytes) -> None:
        value = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
        self.sums[vcpu] = (self.sums[vcpu] + value) & SUM_MASK

    def read(self, vcpu: int, size: int) -> bytes:
        return self.sums[vcpu].to_bytes(4, "little")[:size].ljust(size, b"\0")


class SharedRegions:
    """The guest-physical ranges the guest has made shared with MAP_GPA_RANGE.

    KVM tracks nothing (reference section 6); a VMM keeps this list, e.g. to know which pages
    a copy must send in plaintext. It is kept as sorted, disjoint, non-touching runs
    [start, end) of bytes, so one hypercall costs what the runs it touches cost, not what its
    page count does: a guest may ask for 2^40 pages at once (KVM passes any count that does
    not wrap), and walking them page by page would hold the vCPU and fill the host's memory.
    """

    def __init__(self, regions: list[tuple[int, int]] | None = None) -> None:
        self._runs: list[tuple[int, int]] = []
        for gpa, npages in regions or []:
            if npages > 0:
                self._set(gpa, gpa + npages * abi.PAGE_SIZE, shared=True)

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """Apply one hypercall; return the value for the guest's RAX (0 or -KVM_EINVAL).

        `npages` counts 4 KiB pages whatever bits 3:0 of `attrs` say: those are the guest's
        preferred page size (Documentation/virt/kvm/x86/hypercalls.rst: "preferred page size
        encoding 0 = 4kb, 1 = 2mb, 2 = 1gb, etc."), a hint for how the host maps the range,
        which a list of runs has no use for; QEMU ignores it too. Bits 63:5 must be zero."""
        if gpa % abi.PAGE_SIZE or npages <= 0 or npages > (1 << 40) or attrs & ~0x1F:
            return -abi.EINVAL
        end = gpa + npages * abi.PAGE_SIZE
        self._set(gpa, end, shared=not attrs & abi.MAP_GPA_RANGE_ENCRYPTED)
        return 0

    def _set(self, start: int, end: int, *, shared: bool) -> None:
        """Make [start, end) shared or private: replace the runs that overlap or touch it."""
        runs = self._runs
        lo = bisect.bisect_left(runs, start, key=lambda run: run[1])  # first ending at/after
        hi = bisect.bisect_right(runs, end, key=lambda run: run[0])  # past the last starting by
        touched = runs[lo:hi]
        new: list[tuple[int, int]] = []
        if shared:
            first = min(start, touched[0][0]) if touched else start
            last = max(end, touched[-1][1]) if touched else end
            new.append((first, last))
        else:
            for a, b in touched:
                if a < start:
                    new.append((a, min(b, start)))
                if b > end:
                    new.append((max(a, end), b))
        runs[lo:hi] = new

    def regions(self) -> list[tuple[int, int]]:
        """The shared pages as sorted (gpa, page count) runs."""
        return [(a, (b - a) // abi.PAGE_SIZE) for a, b in self._runs]


class Devices:
    """The set of devices one VMM exposes to its guest."""

    def __init__(
        self, serial_log: str | None, vcpus: int, state: DeviceState | None = None
    ) -> None:
        self.vcpus = vcpus
        self.serial = Serial(serial_log)
        # Port I/O is served by the event loop and by vCPU threads (`VcpuRunner`): one at a
        # time (the serial log's torn-line and counters are the devices' shared state).
        self._io_lock = threading.Lock()
        self.restore(state or DeviceState())

    def restore(self, state: DeviceState) -> None:
        """Take the state a snapshot carried (a handoff's Switchover). The serial log stays
        as it is: it holds no state of its own, only the file, which the target opened at
        its start (closing and reopening it cost 20-30 us inside the blackout)."""
        self.doorbell = Doorbell(self.vcpus, state.doorbell_sums)
        self.shared = SharedRegions(state.shared_regions)
        self.serial.partial = {
            v: bytes(line[:MAX_PARTIAL_LINE])
            for v, line in state.serial_partial
            if 0 <= v < self.vcpus and line
        }

    def snapshot(
        self, vm_state: VmState | None = None, migration_control: int | None = None
    ) -> DeviceState:
        return DeviceState(
            tuple(self.doorbell.sums),
            self.shared.regions(),
            tuple(sorted(self.serial.partial.items())),
            vm_state,
            migration_control,
        )

    def handle_io(self, vcpu: int, io: IoExitView) -> bytes | None:
        """Serve one port I/O exit; return the IN data to hand back with the next KVM_RUN.
        Any thread may call it."""
        with self._io_lock:
            return self._handle_io(vcpu, io)

    def _handle_io(self, vcpu: int, io: IoExitView) -> bytes | None:
        if io.direction == abi.IO_OUT:
            if io.port == witness.SERIAL_PORT:
                self.serial.write(io.data, vcpu)
            elif io.port == witness.DOORBELL_OUT_PORT:
                self.doorbell.out(vcpu, io.data)
            return None
        nbytes = io.size * io.count
        if io.port == witness.DOORBELL_IN_PORT:
            return self.doorbell.read(vcpu, nbytes)
        # An unclaimed port reads as all ones, as on a PC.
        return b"\xff" * nbytes

    def close(self) -> None:
        self.serial.close()
