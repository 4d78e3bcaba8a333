"""handoff.qmp.client against handoff.qmp.server: commands, errors, events, broken connections."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from handoff.qmp.client import QMPClient, QMPConnectionError, QMPError, QMPEvent
from handoff.qmp.server import ControlServer, QMPCommandError
from handoff.transport.unix import bind_unix_socket


@pytest.fixture
def sock_path() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="handoff-qmp-"))
    try:
        yield top / "qmp.sock"
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def echo(args: dict[str, Any]) -> Any:
    return args


async def refuse(args: dict[str, Any]) -> None:
    raise QMPCommandError("a handoff is already in progress (status device); wait for it")


@pytest.fixture
async def server(sock_path: Path) -> AsyncIterator[ControlServer]:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    control = ControlServer(listen_sock, {"echo": echo, "refuse": refuse})
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        yield control
        control.close()
    listen_sock.close()


async def test_connect_reads_the_greeting_and_negotiates(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path) as qmp:
        assert qmp.greeting["QMP"]["capabilities"] == []
        # Negotiated: a command other than qmp_capabilities is accepted.
        assert await qmp.execute("echo") == {}


async def test_execute_passes_keyword_and_mapping_arguments_and_returns_the_value(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path) as qmp:
        result = await qmp.execute("echo", {"package-name": "x"}, set=["log-level=debug"])
        assert result == {"package-name": "x", "set": ["log-level=debug"]}
        assert await qmp.execute("echo", name="a name") == {"name": "a name"}


async def test_a_command_error_raises_qmp_error_with_class_and_description(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path) as qmp:
        with pytest.raises(QMPError) as info:
            await qmp.execute("refuse")
        assert info.value.error_class == "GenericError"
        assert str(info.value) == "a handoff is already in progress (status device); wait for it"
        with pytest.raises(QMPError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert await qmp.execute("echo", ok=True) == {"ok": True}  # the session goes on


async def test_without_negotiation_commands_are_refused_as_qemu_does(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path, negotiate=False) as qmp:
        with pytest.raises(QMPError, match="Expecting capabilities negotiation") as info:
            await qmp.execute("echo")
        assert info.value.error_class == "CommandNotFound"


async def test_events_are_iterated_while_commands_run_in_another_task(
    server: ControlServer, sock_path: Path
) -> None:
    release = trio.Event()

    async def upgrade(args: dict[str, Any]) -> str:
        for status in ("setup", "device", "completed"):
            server.emit("HANDOFF", {"status": status})
            await trio.sleep(0)
        await release.wait()
        return "ok"

    server.register("upgrade", upgrade)
    seen: list[QMPEvent] = []
    async with await QMPClient.connect(sock_path) as qmp:

        async def watch() -> None:
            async for event in qmp:
                seen.append(event)
                if event.data["status"] == "completed":
                    release.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            assert await qmp.execute("upgrade") == "ok"
    assert [e.data["status"] for e in seen] == ["setup", "device", "completed"]
    assert all(e.event == "HANDOFF" and e.timestamp > 0 for e in seen)


async def test_next_event_by_name_keeps_other_events_queued(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path) as qmp:
        await trio.testing.wait_all_tasks_blocked()
        server.emit("STOP", {})
        server.emit("RESUME", {})
        assert (await qmp.next_event("RESUME")).event == "RESUME"
        assert (await qmp.next_event()).event == "STOP"


async def test_event_iteration_ends_when_the_server_closes_the_connection(
    server: ControlServer, sock_path: Path
) -> None:
    async with await QMPClient.connect(sock_path) as qmp:
        await trio.testing.wait_all_tasks_blocked()
        server.emit("SHUTDOWN", {"guest": False})
        server.close_clients()
        events = [event.event async for event in qmp]
        assert events == ["SHUTDOWN"]


async def test_a_connection_lost_during_a_command_raises_qmp_connection_error(
    server: ControlServer, sock_path: Path
) -> None:
    async def hangs_up(args: dict[str, Any]) -> None:
        server.close_clients()
        await trio.sleep_forever()

    server.register("hangs-up", hangs_up)
    async with await QMPClient.connect(sock_path) as qmp:
        with pytest.raises(QMPConnectionError, match="closed the control connection"):
            await qmp.execute("hangs-up")
        with pytest.raises(QMPConnectionError, match="closed"):
            await qmp.execute("echo")


async def test_connecting_to_nothing_says_which_socket_and_what_to_check(tmp_path: Path) -> None:
    missing = tmp_path / "absent.sock"
    with pytest.raises(QMPConnectionError, match=r"absent\.sock.*--control") as info:
        await QMPClient.connect(missing)
    assert isinstance(info.value, QMPError)  # one except clause covers both


async def test_a_server_that_is_not_qmp_is_reported(sock_path: Path) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    listener = trio.socket.from_stdlib_socket(listen_sock)

    async def not_qmp() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.send(b'{"hello": "world"}\n')
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(not_qmp)
        with pytest.raises(QMPConnectionError, match="did not greet with QMP"):
            await QMPClient.connect(sock_path)
        nursery.cancel_scope.cancel()
    listener.close()
