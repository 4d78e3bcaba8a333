"""The VMM's host-side devices: the serial port, the doorbell, and the shared-region list.

Their state is what a handoff must carry besides the guest's own CPU and memory state:
`DeviceState` is the snapshot taken at the pause and restored by the successor.
"""

from __future__ import annotations

import contextlib
import os

import msgspec

from kvmstub import uapi

from .config import open_serial_log

SUM_MASK = 0xFFFF_FFFF


class DeviceState(msgspec.Struct, frozen=True):
    """Everything the devices hold that the guest can observe."""

    doorbell_sums: tuple[int, ...] = ()
    shared_regions: list[tuple[int, int]] = []

    def doorbell_blob(self) -> bytes:
        return b"".join(s.to_bytes(4, "little") for s in self.doorbell_sums)

    @staticmethod
    def sums_from_blob(blob: bytes) -> tuple[int, ...]:
        if len(blob) % 4:
            raise ValueError("doorbell state is not a whole number of 32-bit sums")
        return tuple(int.from_bytes(blob[i : i + 4], "little") for i in range(0, len(blob), 4))


class Serial:
    """The 16550 at 0x3f8, reduced to what the guest uses: whole lines, appended to a log.

    The log is opened in append mode and flushed per line, so a successor VMM appending to the
    same path continues the same file, and a crash loses at most the line being written.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._partial = b""
        self.lines = 0
        self.panicked: str | None = None
        # The last seq each vCPU printed: a handoff records it at the pause, so the first line
        # after it (whose gap_us holds the pause the guest saw) can be found.
        self.last_seq: dict[int, int] = {}
        if path is not None:
            self._fd = open_serial_log(path)

    def write(self, data: bytes) -> None:
        buf = self._partial + data
        *complete, self._partial = buf.split(b"\n")
        for line in complete:
            self.lines += 1
            if line.startswith(b"vcpu="):
                fields = line.split(b" ", 2)
                if len(fields) >= 2 and fields[1].startswith(b"seq="):
                    with contextlib.suppress(ValueError):
                        self.last_seq[int(fields[0][5:])] = int(fields[1][4:])
            elif line.startswith(b"PANIC") and self.panicked is None:
                self.panicked = line.decode("ascii", "replace")
            if self._fd is not None:
                os.write(self._fd, line + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    a copy must send in plaintext.
    """

    def __init__(self, regions: list[tuple[int, int]] | None = None) -> None:
        self._pages: set[int] = set()
        for gpa, npages in regions or []:
            for i in range(npages):
                self._pages.add(gpa + i * uapi.PAGE_SIZE)

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> int:
        """Apply one hypercall; return the value for the guest's RAX (0 or -KVM_EINVAL)."""
        if gpa % uapi.PAGE_SIZE or npages <= 0 or npages > (1 << 40) or attrs & ~0x1F:
            return -uapi.KVM_EINVAL
        if attrs & 0xF != uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K:
            return -uapi.KVM_EINVAL
        pages = range(gpa, gpa + npages * uapi.PAGE_SIZE, uapi.PAGE_SIZE)
        if attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED:
            self._pages.difference_update(pages)
        else:
            self._pages.update(pages)
        return 0

    def regions(self) -> list[tuple[int, int]]:
        """The shared pages as sorted (gpa, page count) runs."""
        out: list[tuple[int, int]] = []
        for page in sorted(self._pages):
            if out and out[-1][0] + out[-1][1] * uapi.PAGE_SIZE == page:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((page, 1))
        return out


class Devices:
    """The set of devices one VMM exposes to its guest."""

    def __init__(
        self, serial_log: str | None, vcpus: int, state: DeviceState | None = None
    ) -> None:
        self.vcpus = vcpus
        self.serial = Serial(serial_log)
        self.restore(state or DeviceState())

    def restore(self, state: DeviceState) -> None:
        """Take the state a snapshot carried (a handoff's Switchover). The serial log stays
        as it is: it holds no state of its own, only the file, which the target opened at
        its start (closing and reopening it cost 20-30 us inside the blackout)."""
        self.doorbell = Doorbell(self.vcpus, state.doorbell_sums)
        self.shared = SharedRegions(state.shared_regions)

    def snapshot(self) -> DeviceState:
        return DeviceState(tuple(self.doorbell.sums), self.shared.regions())

    def handle_io(self, vcpu: int, io: uapi.IoExit) -> bytes | None:
        """Serve one port I/O exit; return the IN data to hand back with the next KVM_RUN."""
        if io.direction == uapi.KVM_EXIT_IO_OUT:
            if io.port == uapi.SERIAL_PORT:
                self.serial.write(io.data)
            elif io.port == uapi.DOORBELL_OUT_PORT:
                self.doorbell.out(vcpu, io.data)
            return None
        nbytes = io.size * io.count
        if io.port == uapi.DOORBELL_IN_PORT:
            return self.doorbell.read(vcpu, nbytes)
        # An unclaimed port reads as all ones, as on a PC.
        return b"\xff" * nbytes

    def close(self) -> None:
        self.serial.close()
