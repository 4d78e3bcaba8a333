"""The control socket driven by QEMU's own Python QMP library (`qemu.qmp`, asyncio), unmodified:
whatever QMP tooling an operator already has must work against a handoff VMM.

These tests are synchronous on purpose: qemu.qmp runs on asyncio, so each test runs its client
session with `asyncio.run` while the VMM is a real process on a real kvmstub daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from handoff.testing import VmmProcess

qmp = pytest.importorskip("qemu.qmp")


@pytest.fixture
def sev_es_vmm(vmm_factory: Callable[..., VmmProcess]) -> VmmProcess:
    return vmm_factory(mode="sev-es", vcpus=2)


async def _session(control: str) -> Any:
    client = qmp.QMPClient("handoff-test")
    await client.connect(control)  # reads the greeting and negotiates capabilities
    return client


def test_qemu_qmp_negotiates_and_queries_status_sev_and_handoff(sev_es_vmm: VmmProcess) -> None:
    async def main() -> dict[str, Any]:
        client = await _session(sev_es_vmm.control)
        try:
            greeting = client.greeting
            return {
                "version": greeting.QMP.version["qemu"],
                "capabilities": greeting.QMP.capabilities,
                "status": await client.execute("query-status"),
                "sev": await client.execute("query-sev"),
                "handoff": await client.execute("query-handoff"),
                "name": await client.execute("query-name"),
                "commands": await client.execute("query-commands"),
            }
        finally:
            await client.disconnect()

    got = asyncio.run(main())
    assert set(got["version"]) == {"major", "minor", "micro"}
    assert got["capabilities"] == []
    assert got["status"]["running"] is True
    assert got["status"]["status"] == "running"
    assert got["status"]["mode"] == "sev-es"
    assert got["sev"]["enabled"] is True
    assert got["sev"]["es"] is True
    assert got["sev"]["state"] == "running"
    assert got["handoff"]["status"] == "none"
    assert got["name"] == {"name": "vm0"}
    names = {c["name"] for c in got["commands"]}
    assert {"query-status", "query-sev", "query-handoff", "upgrade", "qmp_capabilities"} <= names


def test_qemu_qmp_upgrade_streams_handoff_events_until_completed(sev_es_vmm: VmmProcess) -> None:
    async def main() -> tuple[int, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        client = await _session(sev_es_vmm.control)
        events: list[dict[str, Any]] = []
        try:
            old_pid = (await client.execute("query-status"))["pid"]
            with client.listener("HANDOFF") as listener:
                started = await client.execute("upgrade", {"set": []})
                sev_es_vmm.pids.append(started["pid"])  # killed after the test, whatever happens
                async for event in asyncio_timeout_iter(listener, 30):
                    events.append(dict(event["data"]))
                    if event["data"]["status"] in ("completed", "failed"):
                        break
        finally:
            # The old VMM exits once it has handed over: qemu.qmp reports the server's EOF from
            # disconnect(), as it does when QEMU itself quits (QEMU's own harness ignores it).
            with contextlib.suppress(EOFError):
                await client.disconnect()
        # The same path, now served by the successor.
        client = await _session(sev_es_vmm.control)
        try:
            status = await client.execute("query-status")
        finally:
            await client.disconnect()
        return old_pid, started, events, status

    old_pid, started, events, status = asyncio.run(main())
    assert started["uri"].startswith("unix:")
    assert [e["status"] for e in events] == ["setup", "active", "device", "completed"], events
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["downtime"] > 0
    assert status["pid"] == started["pid"] != old_pid
    assert status["status"] == "running"


def test_qemu_qmp_sees_errors_with_qemu_error_classes_and_stop_resume_events(
    sev_es_vmm: VmmProcess,
) -> None:
    async def main() -> tuple[list[tuple[str, str]], list[str], str]:
        client = await _session(sev_es_vmm.control)
        errors: list[tuple[str, str]] = []
        try:
            for command, args in (("no-such-command", {}), ("handoff", {"uri": "tcp:x"})):
                try:
                    await client.execute(command, args)
                except qmp.ExecuteError as exc:
                    errors.append((exc.error_class, exc.error.error.desc))
            with client.listener(("STOP", "RESUME")) as listener:
                await client.execute("stop")
                paused = (await client.execute("query-status"))["status"]
                await client.execute("cont")
                seen = [(await listener.get())["event"], (await listener.get())["event"]]
        finally:
            await client.disconnect()
        return errors, seen, paused

    errors, seen, paused = asyncio.run(main())
    assert errors[0] == ("CommandNotFound", "The command no-such-command has not been found")
    assert errors[1][0] == "GenericError"
    assert "unix:PATH" in errors[1][1]
    assert paused == "paused"
    assert seen == ["STOP", "RESUME"]


async def asyncio_timeout_iter(listener: Any, timeout: float) -> Any:
    """The listener's events, failing the test if none arrives within `timeout` seconds."""
    while True:
        yield await asyncio.wait_for(listener.get(), timeout)
