"""The pytest plugin of `handoff.testing`: fixtures for a kvmstub daemon, VMMs on it, checked
upgrades and serial-log checks (see `handoff.testing` for each). Registered under the
`pytest11` entry point; the harness itself never imports pytest."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff.seriallog import SerialReport
from handoff.testing import (
    KvmstubDaemon,
    VmmProcess,
    kvmstub_serve_refused,
    serial_checked,
    start_kvmstub_daemon,
    upgrade_checked,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvmstub_args(*flags): extra `kvmstub serve` flags for kvmstub_daemon"
    )


@pytest.fixture
def kvmstub_dir() -> Iterator[Path]:
    """A short private directory (a socket path must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kvmstub-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
        daemon.stop_and_check()


@pytest.fixture
def serve_refused() -> Callable[..., str]:
    """`serve_refused(sock, *flags)`: `kvmstub serve` expected to refuse before it listens
    (`handoff.testing.kvmstub_serve_refused`); returns its stderr."""
    return kvmstub_serve_refused


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
            daemon.stop_and_check()


@pytest.fixture
def vmm_factory(
    tmp_path: Path, kvmstub_daemon: KvmstubDaemon
) -> Iterator[Callable[..., VmmProcess]]:
    """`make(**kwargs)`: start a VM on the test's kvmstub daemon (the `VmmProcess` arguments:
    mode, vcpus, memory, line_every, flip_every, extra, env; name defaults to vm0, vm1, ...).
    Every VMM of every chain is killed after the test."""
    made: list[VmmProcess] = []

    def make(**kwargs: Any) -> VmmProcess:
        kwargs.setdefault("name", f"vm{len(made)}")
        vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, **kwargs)
        made.append(vmm)
        vmm.start()
        return vmm

    try:
        yield make
    finally:
        for vmm in made:
            vmm.kill_all()


@pytest.fixture
def upgrade() -> Callable[..., Awaitable[dict[str, Any]]]:
    """`await upgrade(vmm, *sets, exec_argv=None, expect="completed")`: see `upgrade_checked`."""
    return upgrade_checked


@pytest.fixture
def serial_check() -> Callable[..., Awaitable[SerialReport]]:
    """`await serial_check(vmm, more=3, max_pause_us=None)`: see `serial_checked`."""
    return serial_checked
