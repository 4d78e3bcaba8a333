"""The serial log under hard faults and hostile neighbours (issue 14, items 3 and 9).

A full disk (ENOSPC), a file over its size limit (EFBIG) or a failing device (EIO) under the
serial log must not stop the guest: the lost output is counted, shown in `query-status` and
warned about (rate-limited), and writing resumes when the file takes writes again. A log path
that is a symbolic link, a directory, in a missing directory, or a file another uid owns is
refused before anything starts, with one line saying what to fix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.machine import devices
from handoff.machine.config import ConfigError, open_serial_log
from handoff.machine.devices import Serial
from handoff.process.flags import check_run_args
from handoff.testing import KvmstubDaemon, VmmProcess

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root (mount, chown)")
HANDOFF = str(Path(sys.executable).parent / "handoff")


# --- unit: a log file that fails, then recovers ---------------------------------------------------


class FlakyLog:
    """A serial log file: takes writes while `error` is None; otherwise raises it. With `short`,
    the next write takes only that many bytes (as a file system that fills mid-write does)."""

    def __init__(self) -> None:
        self.data = b""
        self.error: int | None = None
        self.short: int | None = None
        self.calls = 0

    def write(self, data: bytes | memoryview) -> int:
        self.calls += 1
        if self.short is not None:
            n, self.short = self.short, None
            self.data += bytes(data[:n])
            return n
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        self.data += bytes(data)
        return len(data)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def line(seq: int) -> bytes:
    return f"vcpu=0 seq={seq} gap_us=5\n".encode()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EIO])
def test_a_failing_log_drops_and_counts_lines_and_writing_resumes_when_it_recovers(
    err: int,
) -> None:
    out = FlakyLog()
    serial = Serial("serial.log", out=out)
    serial.write(line(0))
    out.error = err
    for seq in (1, 2, 3):
        serial.write(line(seq))  # no exception: the guest's vCPU goes on
    assert serial.lines == 4
    assert serial.last_seq == {0: 3}  # the device still follows the guest
    status = serial.status()
    assert status == {
        "path": "serial.log",
        "lost-bytes": 3 * len(line(1)),
        "lost-lines": 3,
        "error": os.strerror(err),
    }
    out.error = None
    serial.write(line(4))
    assert out.data == line(0) + line(4)
    assert serial.status() == {**status, "error": None}  # the counts stay: they are totals


def test_a_panic_line_is_seen_even_when_the_log_cannot_take_it() -> None:
    out = FlakyLog()
    out.error = errno.ENOSPC
    serial = Serial("serial.log", out=out)
    serial.write(b"PANIC doorbell sum 1 != 2\n")
    assert serial.panicked == "PANIC doorbell sum 1 != 2"
    assert serial.status()["lost-lines"] == 1


def test_a_line_torn_by_a_short_write_is_ended_before_the_next_line() -> None:
    out = FlakyLog()
    serial = Serial("serial.log", out=out)
    out.short, out.error = 7, errno.ENOSPC
    serial.write(line(0))
    assert out.data == line(0)[:7]
    assert serial.status()["lost-lines"] == 1
    assert serial.status()["lost-bytes"] == len(line(0)) - 7
    out.error = None
    serial.write(line(1))
    # The torn piece stays a line of its own (a reader sees it as garbage, not as a seq).
    assert out.data == line(0)[:7] + b"\n" + line(1)


def test_a_failing_log_costs_one_write_attempt_per_line() -> None:
    out = FlakyLog()
    out.error = errno.ENOSPC
    serial = Serial("serial.log", out=out)
    serial.write(b"".join(line(i) for i in range(50)))
    assert out.calls == 50


def test_warnings_are_rate_limited_first_at_once_then_with_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    clock = Clock()
    out = FlakyLog()
    serial = Serial("serial.log", out=out, clock=clock)
    out.error = errno.ENOSPC

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == devices.log.name]

    serial.write(line(0))
    assert len(messages()) == 1
    assert "No space left on device" in messages()[0]
    assert "serial.log" in messages()[0]
    assert caplog.records[-1].levelno == logging.WARNING
    for seq in range(1, 1000):
        clock.now += 0.001
        serial.write(line(seq))
    assert len(messages()) == 1  # a second of failures: still the one warning
    clock.now += devices.WARN_EVERY
    serial.write(line(1000))
    assert len(messages()) == 2
    assert "1000 lines" in messages()[1]  # dropped since the first warning
    assert "1001 lines" in messages()[1]  # in all
    out.error = None
    serial.write(line(1001))
    assert len(messages()) == 3
    assert "writing again" in messages()[2]
    serial.write(line(1002))
    assert len(messages()) == 3


# --- unit: refusing a log path -------------------------------------------------------------------


def test_open_refuses_a_symlink_as_the_last_component(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "serial.log").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        open_serial_log(str(tmp_path / "serial.log"))
    assert not target.exists()


def test_open_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "serial.log")
    with pytest.raises(ConfigError, match="not a regular file"):
        open_serial_log(str(tmp_path / "serial.log"))


def test_open_takes_a_character_device_and_a_file_of_our_own(tmp_path: Path) -> None:
    for path in ("/dev/null", str(tmp_path / "serial.log")):
        fd = open_serial_log(path)
        try:
            assert os.get_blocking(fd)
        finally:
            os.close(fd)


def test_an_upgrade_set_serial_log_to_a_missing_directory_is_refused_before_spawning() -> None:
    with pytest.raises(ConfigError, match="--serial-log /nonexistent/x"):
        check_run_args(["--name", "a", "--serial-log", "/nonexistent/x"])


# --- `handoff run` with a bad serial log: one line, exit 2, nothing started -----------------------


def run_refused(tmp_path: Path, serial_log: str) -> str:
    """`handoff run --serial-log SERIAL_LOG` (kvmstub absent: the check must come first);
    asserts exit 2 with a one-line message and no traceback; returns the message."""
    env = {**os.environ, "HANDOFF_RUNTIME_DIR": str(tmp_path / "run")}
    kvm = str(tmp_path / "no-kvmstub.sock")
    proc = subprocess.run(
        [HANDOFF, "run", "--name", "s", "--kvm", kvm, "--serial-log", serial_log],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "kvmstub" not in lines[0]
    assert not (tmp_path / "run" / "s.qmp").exists()
    return lines[0]


def test_run_with_a_serial_log_in_a_missing_directory_says_so(tmp_path: Path) -> None:
    msg = run_refused(tmp_path, "/nonexistent/x")
    assert "--serial-log /nonexistent/x" in msg
    assert "/nonexistent" in msg and "does not exist" in msg


def test_run_with_a_directory_as_serial_log_says_so(tmp_path: Path) -> None:
    msg = run_refused(tmp_path, "/tmp")
    assert "--serial-log /tmp" in msg and "is a directory" in msg


def test_run_refuses_a_serial_log_that_is_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    planted = tmp_path / "serial.log"
    planted.symlink_to(victim)
    msg = run_refused(tmp_path, str(planted))
    assert "symbolic link" in msg
    assert victim.read_bytes() == b"keep me\n"


@needs_root
def test_run_refuses_a_serial_log_owned_by_another_uid(tmp_path: Path) -> None:
    planted = tmp_path / "serial.log"
    planted.write_bytes(b"")
    os.chown(planted, NOBODY, NOBODY)
    msg = run_refused(tmp_path, str(planted))
    assert f"owned by uid {NOBODY}" in msg
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        open_serial_log(str(planted))  # the open checks again (the file may appear later)
    assert planted.read_bytes() == b""


# --- end to end: a real VMM whose serial log fails ----------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system under `directory` to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


def start_with_serial_log(tmp_path: Path, daemon: KvmstubDaemon, log_path: str) -> VmmProcess:
    vmm = VmmProcess(tmp_path, daemon.socket, name="ser", line_every=50)
    i = vmm.argv.index("--serial-log")
    vmm.argv[i + 1] = log_path
    # (Not /dev/full among the logs the test reads: it reads as endless zeros.)
    vmm.serial_logs = [] if log_path.startswith("/dev/") else [log_path]
    vmm.start()
    return vmm


async def wait_status(vmm: VmmProcess, pred: Any, timeout: float = 20) -> dict[str, Any]:
    status: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            status = await vmm.qmp("query-status")
            if pred(status):
                return status
            await trio.sleep(0.05)
    raise AssertionError(f"query-status never matched: {status}\nVMM log:\n{vmm.log()}")


async def test_a_full_disk_under_the_serial_log_keeps_the_guest_running_and_writing_resumes(
    tmp_path: Path, kvmstub_daemon: KvmstubDaemon, tiny_tmpfs: Path
) -> None:
    log_path = tiny_tmpfs / "serial.log"
    vmm = start_with_serial_log(tmp_path, kvmstub_daemon, str(log_path))
    try:
        await vmm.wait_lines(2)
        filler = fill(tiny_tmpfs)
        status = await wait_status(vmm, lambda s: s["serial-log"]["lost-lines"] >= 5)
        assert status["status"] == "running"
        assert status["serial-log"]["error"] == "No space left on device"
        assert status["serial-log"]["path"] == str(log_path)
        assert status["serial-log"]["lost-bytes"] > 0
        await trio.sleep(0.5)
        assert vmm.process is not None and vmm.process.poll() is None
        assert kvmstub_daemon.vm_ids(), "kvmstub's VM is gone"
        assert "serial log" in vmm.log() and "No space left on device" in vmm.log()
        size = log_path.stat().st_size

        filler.unlink()
        status = await wait_status(vmm, lambda s: s["serial-log"]["error"] is None)
        assert status["status"] == "running"
        with trio.move_on_after(20):
            while log_path.stat().st_size < size + 200:
                await trio.sleep(0.05)
        assert log_path.stat().st_size >= size + 200, "no new serial lines after space came back"
        report = await vmm.wait_lines(2)
        assert report.panics == []
        assert "writing again" in vmm.log()
    finally:
        await vmm.quit()
        vmm.kill_all()


async def test_a_handoff_carries_on_after_serial_output_was_lost(
    tmp_path: Path, kvmstub_daemon: KvmstubDaemon
) -> None:
    # /dev/full: every write fails with ENOSPC.
    vmm = start_with_serial_log(tmp_path, kvmstub_daemon, "/dev/full")
    try:
        status = await wait_status(vmm, lambda s: s["serial-log"]["lost-lines"] >= 5)
        assert status["serial-log"]["error"] == "No space left on device"
        new_log = str(tmp_path / "ser-serial-1.log")
        result = await vmm.upgrade([f"serial-log={new_log}"])
        assert result["status"] == "completed", f"{result}\n{vmm.log()}"
        assert await vmm.settle() == [result["successor-pid"]]
        report = await vmm.wait_lines(3)
        assert report.panics == []
        assert all(report.lines.get(v) for v in range(vmm.vcpus)), vmm.log()
        status = await vmm.qmp("query-status")
        assert status["pid"] == result["successor-pid"]
        assert status["serial-log"] == {
            "path": new_log,
            "lost-bytes": 0,
            "lost-lines": 0,
            "error": None,
        }
    finally:
        await vmm.quit()
        vmm.kill_all()
