"""Shared fixtures: a real kvmstub daemon, run as a subprocess the way an operator runs it.

    def test_something(kvmstub_daemon):            # `kvmstub serve --socket <tmp>/kvm.sock`
        kvm = await client.open_kvm(kvmstub_daemon.socket)
        ...
        assert kvmstub_daemon.stats()["vms"] == []

    @pytest.mark.kvmstub_args("--sev-es-asids", "1")   # extra `kvmstub serve` flags
    def test_with_one_es_asid(kvmstub_daemon): ...

`kvmstub_factory(directory, *flags)` starts another one (a daemon over a path the test
prepared, a second daemon). On teardown each daemon still running gets SIGTERM, must exit 0
and must have removed its socket.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmstub import client

_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvmstub_args(*flags): extra `kvmstub serve` flags for kvmstub_daemon"
    )


class KvmstubDaemon:
    """A running `kvmstub serve` subprocess.

    Attributes:
        socket: the socket path to give `client.open_kvm`.
        pid: the daemon's pid.
        process: the subprocess.Popen.
        ready_line: what it printed when ready.
        log_path: its stderr.
    """

    def __init__(self, process: subprocess.Popen[str], socket: Path, ready_line: str) -> None:
        self.process = process
        self.pid = process.pid
        self.socket = socket
        self.ready_line = ready_line
        self.log_path = socket.parent / "kvmstub.log"

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics (`kvmstub stats --json`), read synchronously."""
        return client.read_stats(self.socket)

    def vm_ids(self) -> list[int]:
        """Ids of the VMs alive in the daemon."""
        return [vm["id"] for vm in self.stats()["vms"]]

    def open_fds(self) -> int:
        """How many fds the daemon process holds (for leak checks)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(_STOP_TIMEOUT)
            if self.process.stdout is not None:
                self.process.stdout.close()
            return status
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("kvmstub daemon did not stop on SIGTERM") from None


def start_kvmstub_daemon(directory: Path, *flags: str) -> KvmstubDaemon:
    """Run `python -m kvmstub.cli serve --socket <directory>/kvm.sock <flags>` and wait for
    its ready line."""
    sock = directory / "kvm.sock"
    log = open(directory / "kvmstub.log", "w")  # noqa: SIM115 (the child owns it from here)
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(sock), *flags],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + _READY_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                process.wait()
                raise AssertionError(f"kvmstub did not get ready in {_READY_TIMEOUT}s")
            line = process.stdout.readline()
            if line.startswith("kvmstub: ready "):
                return KvmstubDaemon(process, sock, line.strip())
            if not line:
                process.wait()
                text = (directory / "kvmstub.log").read_text(errors="replace")
                raise AssertionError(f"kvmstub exited with {process.returncode}:\n{text}")


@pytest.fixture
def kvmstub_dir() -> Iterator[Path]:
    """A short private directory (a socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kvmstub-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stop_and_check(daemon: KvmstubDaemon) -> None:
    was_running = daemon.alive()
    status = daemon.stop()
    if was_running:
        assert status == 0, f"kvmstub exited with {status}:\n{daemon.log()}"
        assert not daemon.socket.exists(), "kvmstub left its socket behind"


@pytest.fixture
def kvmstub_daemon(request: pytest.FixtureRequest, kvmstub_dir: Path) -> Iterator[KvmstubDaemon]:
    """A fresh kvmstub daemon for one test; stopped with SIGTERM afterwards, which must
    exit 0 and remove the socket."""
    marker = request.node.get_closest_marker("kvmstub_args")
    flags = [str(flag) for flag in marker.args] if marker else []
    daemon = start_kvmstub_daemon(kvmstub_dir, *flags)
    try:
        yield daemon
    finally:
        _stop_and_check(daemon)


@pytest.fixture
def kvmstub_factory() -> Iterator[Callable[..., KvmstubDaemon]]:
    """`start(directory, *flags)`: more daemons; each is stopped and checked afterwards."""
    started: list[KvmstubDaemon] = []

    def start(directory: Path, *flags: str) -> KvmstubDaemon:
        daemon = start_kvmstub_daemon(directory, *flags)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            _stop_and_check(daemon)
