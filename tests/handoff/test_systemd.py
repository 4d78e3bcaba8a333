"""sd_notify as systemd sees it: the exact datagrams on $NOTIFY_SOCKET, with their senders.

A Type=notify service needs READY=1 once the guest runs, STATUS= lines during a handoff, the
handover (the old VMM sends MAINPID=<successor> and waits on BARRIER=1 before it exits; the
successor claims MAINPID itself once it owns the guest), no STOPPING=1 from a VMM that handed
its guest on, and STOPPING=1 on quit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.system import notify
from handoff.testing import NotifySocket, VmmProcess


@pytest.fixture
async def notify_socket(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.serve)
        yield receiver
        nursery.cancel_scope.cancel()
    receiver.close()


async def test_ready_handover_and_stopping_are_the_datagrams_systemd_needs(
    tmp_path: Path, kvmstub_daemon: Any, notify_socket: NotifySocket
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, mode="sev-es", env=notify_socket.env)
    vmm.start()
    try:
        old = vmm.pids[0]
        ready_old = "READY=1\nSTATUS=guest running (sev-es)"
        assert await notify_socket.wait_for(old, ready_old) == [ready_old]

        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        new, hid = result["successor-pid"], result["id"]
        assert await vmm.settle() == [new]
        assert notify_socket.from_pid(old) == [
            ready_old,
            "STATUS=handoff: connecting to the target",
            f"STATUS=handoff {hid}: the target is preparing its VM (guest running)",
            f"STATUS=handoff {hid}: guest paused, switching over to the target",
            f"MAINPID={new}\nSTATUS=handed off to the successor",
            "BARRIER=1",
        ]
        assert notify_socket.from_pid(new) == [
            f"READY=1\nMAINPID={new}\nSTATUS=guest running (sev-es)"
        ]

        await vmm.quit()
        assert notify_socket.from_pid(new)[-1] == "STOPPING=1"
        senders = {pid for pid, _ in notify_socket.messages}
        assert senders == {old, new}
    finally:
        vmm.kill_all()


async def test_a_failed_handoff_reports_status_and_keeps_the_main_pid(
    tmp_path: Path, kvmstub_daemon: Any, notify_socket: NotifySocket
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, mode="plain", env=notify_socket.env)
    vmm.start()
    try:
        pid = vmm.pids[0]
        await notify_socket.wait_for(pid, "READY=1\nSTATUS=guest running (plain)")
        result = await vmm.upgrade(["vcpus=4"])
        assert result["status"] == "failed"
        sent = await notify_socket.wait_for(pid, "STATUS=handoff failed (none): guest running here")
        assert not any("MAINPID" in text or "STOPPING" in text for text in sent)
        # The refused successor never became ready.
        assert {sender for sender, _ in notify_socket.messages} == {pid}
    finally:
        vmm.kill_all()


async def test_barrier_waits_until_the_manager_has_read_earlier_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = NotifySocket(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    try:
        assert notify.notify("MAINPID=1")
        # Nobody reads yet: the barrier times out rather than hang the old VMM forever.
        assert await notify.barrier(timeout=0.2) is False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.serve)
            assert await notify.barrier(timeout=10) is True
            nursery.cancel_scope.cancel()
        texts = [text for _, text in receiver.messages]
        assert texts == ["MAINPID=1", "BARRIER=1", "BARRIER=1"]
    finally:
        receiver.close()


async def test_without_notify_socket_nothing_is_sent_and_barrier_returns_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert await notify.barrier() is False


async def test_sigterm_stops_the_vm_cleanly_with_stopping(
    tmp_path: Path, kvmstub_daemon: Any, notify_socket: NotifySocket
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, env=notify_socket.env)
    vmm.start()
    try:
        pid = vmm.pids[0]
        await notify_socket.wait_for(pid, "READY=1\nSTATUS=guest running (plain)")
        os.kill(pid, signal.SIGTERM)
        assert vmm.process is not None
        with trio.fail_after(10):
            while vmm.process.poll() is None:
                await trio.sleep(0.02)
        assert vmm.process.returncode == 0, vmm.log()
        assert notify_socket.from_pid(pid)[-1] == "STOPPING=1"
        assert os.listdir(vmm.runtime_dir) == []  # socket and entry removed
    finally:
        vmm.kill_all()


async def test_sigterm_during_a_handoff_stops_only_once_the_handoff_has_ended(
    tmp_path: Path, kvmstub_daemon: Any, notify_socket: NotifySocket
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, env=notify_socket.env)
    vmm.start()
    try:
        pid = vmm.pids[0]
        await notify_socket.wait_for(pid, "READY=1\nSTATUS=guest running (plain)")
        results: list[dict[str, Any]] = []

        async def upgrade() -> None:
            # The successor stops answering once it holds the paused guest's Switchover.
            results.append(await vmm.upgrade(["x-fault=target:switchover:hang"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade)
            with trio.fail_after(30):  # the guest is paused: the blackout has begun
                while not any("guest paused" in t for t in notify_socket.from_pid(pid)):
                    await trio.sleep(0.005)
            os.kill(pid, signal.SIGTERM)
            with trio.fail_after(10):
                while "SIGTERM during a handoff, after the guest was paused" not in vmm.log():
                    await trio.sleep(0.01)
            assert vmm.process is not None and vmm.process.poll() is None  # still there
            # End the handoff: the successor dies; the source takes its guest back.
            # The successor is a child of the VMM process (of whichever of its threads
            # spawned it): look through every thread's children.
            (successor,) = [
                child
                for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
            os.kill(int(successor), signal.SIGKILL)
        assert results[0]["status"] == "failed"
        assert results[0]["recovery"] in ("rollback", "reclaim")
        with trio.fail_after(10):
            while vmm.process.poll() is None:
                await trio.sleep(0.02)
        assert vmm.process.returncode == 0, vmm.log()
        sent = notify_socket.from_pid(pid)
        failed = next(i for i, t in enumerate(sent) if t.startswith("STATUS=handoff failed"))
        assert sent[failed + 1 :] == ["STOPPING=1"]
    finally:
        vmm.kill_all()
