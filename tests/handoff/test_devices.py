"""handoff.machine.devices: the state a handoff carries, restored on the new VMM's devices."""

from __future__ import annotations

from pathlib import Path

from handoff.machine.devices import Devices, DeviceState
from kvmstub import uapi


def _out(port: int, data: bytes, size: int = 1) -> uapi.IoExit:
    return uapi.IoExit(uapi.KVM_EXIT_IO_OUT, port, size, len(data) // size, data)


def test_restore_takes_the_snapshot_and_keeps_the_serial_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    old = Devices(str(log), 2)
    old.handle_io(0, _out(uapi.SERIAL_PORT, b"vcpu=0 seq=0 gap_us=1\n"))
    old.handle_io(1, _out(uapi.DOORBELL_OUT_PORT, (7).to_bytes(4, "little"), 4))
    old.shared.map_gpa_range(0x10000, 1, uapi.KVM_MAP_GPA_RANGE_DECRYPTED)
    state = old.snapshot()
    old.close()

    new = Devices(str(log), 2)  # as the target opens its devices at its start
    serial = new.serial
    new.restore(state)
    assert new.snapshot() == state
    assert new.serial is serial  # the same open log, not closed and reopened
    assert new.doorbell.read(1, 4) == (7).to_bytes(4, "little")
    new.handle_io(0, _out(uapi.SERIAL_PORT, b"vcpu=0 seq=1 gap_us=2\n"))
    new.close()
    assert log.read_bytes() == b"vcpu=0 seq=0 gap_us=1\nvcpu=0 seq=1 gap_us=2\n"
    assert Devices(None, 2).snapshot() == DeviceState((0, 0), [])
