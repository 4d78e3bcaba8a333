"""The serial log against hostile neighbours (issue 14, item 9).

A log path that is a symbolic link, a directory, in a missing directory, or a file another uid
owns is refused before anything starts, with one line saying what to fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from handoff.cli import check_run_args
from handoff.config import ConfigError, open_serial_log

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root (mount, chown)")
HANDOFF = str(Path(sys.executable).parent / "handoff")


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
