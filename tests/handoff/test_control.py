"""handoff.qmp.server: the QMP server, its negotiation rule, errors, events, and a listening socket
that outlives the server that first served it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from handoff import __version__
from handoff.errors import Incompatible
from handoff.qmp.server import ControlServer, QMPCommandError
from handoff.transport.unix import bind_unix_socket, socketpair

NEGOTIATION = "Expecting capabilities negotiation with 'qmp_capabilities'"


class RawClient:
    """A QMP client that sends exactly the bytes a test gives it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def execute(self, name: str, **request: Any) -> dict[str, Any]:
        await self.send(json.dumps({"execute": name, **request}).encode() + b"\n")
        return await self.read()

    async def read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"server closed the connection; unparsed: {self.buffer!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def at_eof(self) -> bool:
        return self.buffer == b"" and await self.stream.receive_some(65536) == b""

    async def negotiate(self) -> None:
        greeting = await self.read()
        assert "QMP" in greeting
        assert await self.execute("qmp_capabilities") == {"return": {}}

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="handoff-control-"))
    try:
        yield top / "qmp.sock"
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def echo(args: dict[str, Any]) -> Any:
    return {"echo": args}


async def nothing(args: dict[str, Any]) -> None:
    return None


@pytest.fixture
async def server(sock_path: Path) -> AsyncIterator[ControlServer]:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    control = ControlServer(listen_sock, {"echo": echo, "nothing": nothing})
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        yield control
        control.close()
    listen_sock.close()


async def connect(path: Path) -> RawClient:
    return await RawClient.connect(path)


# -- greeting and negotiation -------------------------------------------------------------------


async def test_greeting_announces_a_qemu_version_the_package_and_no_capabilities(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    assert await client.read() == {
        "QMP": {
            "version": {
                "qemu": {"micro": 0, "minor": 0, "major": 9},
                "package": f"handoff {__version__}",
            },
            "capabilities": [],
        }
    }
    await client.aclose()


async def test_any_command_before_qmp_capabilities_is_command_not_found(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.read()
    for name in ("echo", "query-commands", "no-such-command"):
        reply = await client.execute(name, id=7)
        assert reply == {"error": {"class": "CommandNotFound", "desc": NEGOTIATION}, "id": 7}
    assert await client.execute("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    assert (await client.execute("echo"))["return"] == {"echo": {}}
    await client.aclose()


async def test_qmp_capabilities_after_negotiation_is_refused_as_qemu_does(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    assert await client.execute("qmp_capabilities") == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
    }
    await client.aclose()


async def test_enabling_a_capability_not_offered_fails_and_leaves_the_session_unnegotiated(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.read()
    reply = await client.execute("qmp_capabilities", arguments={"enable": ["oob"]})
    assert reply == {"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}
    assert (await client.execute("echo"))["error"]["desc"] == NEGOTIATION
    assert await client.execute("qmp_capabilities", arguments={"enable": []}) == {"return": {}}
    await client.aclose()


# -- commands -----------------------------------------------------------------------------------


async def test_a_handler_receives_its_arguments_and_the_reply_echoes_any_id(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    for request_id in (1, "abc", {"nested": [1, 2]}, None):
        reply = await client.execute("echo", arguments={"uri": "unix:/x"}, id=request_id)
        assert reply == {"return": {"echo": {"uri": "unix:/x"}}, "id": request_id}
    assert await client.execute("echo") == {"return": {"echo": {}}}  # no id, none echoed
    await client.aclose()


async def test_a_handler_returning_none_answers_an_empty_object(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    assert await client.execute("nothing") == {"return": {}}
    await client.aclose()


async def test_an_unknown_command_is_command_not_found_naming_it(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    assert await client.execute("frobnicate", id=3) == {
        "error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"},
        "id": 3,
    }
    await client.aclose()


async def test_query_commands_lists_built_in_and_registered_commands(
    server: ControlServer, sock_path: Path
) -> None:
    async def later(args: dict[str, Any]) -> int:
        return 42

    server.register("query-later", later)
    client = await connect(sock_path)
    await client.negotiate()
    names = [c["name"] for c in (await client.execute("query-commands"))["return"]]
    assert names == sorted(["echo", "nothing", "qmp_capabilities", "query-commands", "query-later"])
    assert (await client.execute("query-later"))["return"] == 42
    await client.aclose()


async def test_handler_failures_become_qmp_errors_and_the_server_keeps_serving(
    server: ControlServer, sock_path: Path
) -> None:
    async def refuses(args: dict[str, Any]) -> None:
        raise QMPCommandError("SEV feature is not available")

    async def not_found(args: dict[str, Any]) -> None:
        raise QMPCommandError("no device 'x'", "DeviceNotFound")

    async def incompatible(args: dict[str, Any]) -> None:
        raise Incompatible("target has 8 vCPUs, source VM has 4; source keeps running")

    async def crashes(args: dict[str, Any]) -> None:
        raise RuntimeError("bug")

    async def unencodable(args: dict[str, Any]) -> object:
        return object()

    for name, handler in [
        ("refuses", refuses),
        ("not-found", not_found),
        ("incompatible", incompatible),
        ("crashes", crashes),
        ("unencodable", unencodable),
    ]:
        server.register(name, handler)
    client = await connect(sock_path)
    await client.negotiate()
    assert (await client.execute("refuses", id=1)) == {
        "error": {"class": "GenericError", "desc": "SEV feature is not available"},
        "id": 1,
    }
    assert (await client.execute("not-found"))["error"]["class"] == "DeviceNotFound"
    assert (await client.execute("incompatible"))["error"] == {
        "class": "GenericError",
        "desc": "target has 8 vCPUs, source VM has 4; source keeps running",
    }
    crash = (await client.execute("crashes"))["error"]
    assert crash["class"] == "GenericError"
    assert crash["desc"] == "internal error in crashes: RuntimeError: bug"
    assert "cannot be encoded" in (await client.execute("unencodable"))["error"]["desc"]
    assert (await client.execute("echo"))["return"] == {"echo": {}}
    await client.aclose()


async def test_commands_sent_together_are_answered_one_by_one_in_order(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    batch = b"".join(
        json.dumps({"execute": "echo", "arguments": {"n": i}, "id": i}).encode() + b"\n"
        for i in range(50)
    )
    await client.send(batch)
    replies = [await client.read() for _ in range(50)]
    assert [r["id"] for r in replies] == list(range(50))
    assert [r["return"]["echo"]["n"] for r in replies] == list(range(50))
    await client.aclose()


# -- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "desc"),
    [
        (b"{not json", "JSON parse error"),
        (b'{"execute": "echo"', "JSON parse error"),
        (b"\xff\xfe garbage \x00", "JSON parse error"),
        (b"[" * 20000 + b"]" * 20000, "JSON nesting depth limit exceeded"),
        (b'["execute", "echo"]', "QMP input must be a JSON object"),
        (b"42", "QMP input must be a JSON object"),
        (b'{"id": 5}', "QMP input lacks member 'execute'"),
        (b'{"execute": 5}', "QMP input member 'execute' must be a string"),
        (
            b'{"execute": "echo", "arguments": [1]}',
            "QMP input member 'arguments' must be an object",
        ),
        (b'{"execute": "echo", "exec-oob": "x"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
async def test_malformed_input_is_a_generic_error_and_the_session_goes_on(
    server: ControlServer, sock_path: Path, line: bytes, desc: str
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(line + b"\n")
    reply = await client.read()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc)
    assert (await client.execute("echo", id=1)) == {"return": {"echo": {}}, "id": 1}
    await client.aclose()


async def test_errors_in_a_request_that_is_an_object_echo_its_id(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(b'{"execute": "echo", "bogus": 1, "id": "x"}\n')
    assert await client.read() == {
        "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"},
        "id": "x",
    }
    await client.aclose()


async def test_blank_lines_are_ignored(server: ControlServer, sock_path: Path) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(b"\n  \n\r\n" + json.dumps({"execute": "echo", "id": 2}).encode() + b"\n")
    assert await client.read() == {"return": {"echo": {}}, "id": 2}
    await client.aclose()


async def test_requests_without_newlines_are_split_where_each_object_closes(
    server: ControlServer, sock_path: Path
) -> None:
    # What qemu.qmp sends: compact objects, no newline, possibly several in one write.
    client = await connect(sock_path)
    await client.read()
    await client.send(b'{"execute":"qmp_capabilities","arguments":{}}')
    assert await client.read() == {"return": {}}
    await client.send(b'{"execute":"echo","id":1}{"execute":"echo","arguments":{"a":[1]},"id":2}')
    assert await client.read() == {"return": {"echo": {}}, "id": 1}
    assert await client.read() == {"return": {"echo": {"a": [1]}}, "id": 2}
    await client.aclose()


async def test_a_request_split_across_writes_is_answered_once_it_is_whole(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    request = b'{"execute": "echo", "arguments": {"s": "a \\"}{\\\\"}, "id": 7}'
    for i in range(len(request)):
        await client.send(request[i : i + 1])
    assert await client.read() == {"return": {"echo": {"s": 'a "}{\\'}}, "id": 7}
    await client.aclose()


async def test_brackets_inside_strings_do_not_end_a_request(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(b'{"execute":"echo","arguments":{"s":"}]{["},"id":3}')
    assert await client.read() == {"return": {"echo": {"s": "}]{["}}, "id": 3}
    await client.aclose()


async def test_an_over_long_line_is_discarded_with_one_error_and_the_session_goes_on(
    sock_path: Path,
) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    control = ControlServer(listen_sock, {"echo": echo}, max_line=1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        client = await connect(sock_path)
        await client.negotiate()
        # Sent in pieces with no newline, far beyond the limit, then ended.
        for _ in range(64):
            await client.send(b"x" * 1000)
        await client.send(b"\n" + json.dumps({"execute": "echo", "id": 1}).encode() + b"\n")
        assert await client.read() == {
            "error": {
                "class": "GenericError",
                "desc": "QMP input line is longer than 1024 bytes; discarded",
            }
        }
        assert await client.read() == {"return": {"echo": {}}, "id": 1}
        await client.aclose()
        control.close()
    listen_sock.close()


async def test_an_over_long_object_without_newline_is_discarded_up_to_its_closing_brace(
    sock_path: Path,
) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    control = ControlServer(listen_sock, {"echo": echo}, max_line=1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        client = await connect(sock_path)
        await client.negotiate()
        big = json.dumps({"execute": "echo", "arguments": {"x": "}" * 5000}}).encode()
        await client.send(big + b'{"execute":"echo","id":1}')
        reply = await client.read()
        assert reply["error"]["desc"] == "QMP input line is longer than 1024 bytes; discarded"
        assert await client.read() == {"return": {"echo": {}}, "id": 1}
        await client.aclose()
        control.close()
    listen_sock.close()


async def test_garbage_from_one_client_does_not_disturb_another(
    server: ControlServer, sock_path: Path
) -> None:
    good = await connect(sock_path)
    await good.negotiate()
    bad = await connect(sock_path)
    await bad.read()
    await bad.send(os.urandom(100_000))
    await bad.aclose()
    assert (await good.execute("echo", id=9))["id"] == 9
    await good.aclose()


# -- events -------------------------------------------------------------------------------------


async def test_events_reach_negotiated_clients_only_with_a_qmp_timestamp(
    server: ControlServer, sock_path: Path
) -> None:
    negotiated = await connect(sock_path)
    await negotiated.negotiate()
    fresh = await connect(sock_path)
    await fresh.read()  # greeting only
    await trio.testing.wait_all_tasks_blocked()
    server.emit("HANDOFF", {"status": "setup"})
    server.emit("STOP")
    event = await negotiated.read()
    assert event["event"] == "HANDOFF"
    assert event["data"] == {"status": "setup"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert isinstance(event["timestamp"]["seconds"], int)
    assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
    stop = await negotiated.read()
    assert stop["event"] == "STOP"
    assert "data" not in stop  # an event without data has no "data" member, as in QEMU
    # The client that had not negotiated got nothing: its next line is its own reply.
    assert await fresh.execute("qmp_capabilities", id=1) == {"return": {}, "id": 1}
    await negotiated.aclose()
    await fresh.aclose()


async def test_an_event_carries_the_time_it_was_raised_when_given(
    server: ControlServer, sock_path: Path
) -> None:
    client = await connect(sock_path)
    await client.negotiate()
    await trio.testing.wait_all_tasks_blocked()
    server.emit("HANDOFF", {"status": "device"}, at=1234.5)
    event = await client.read()
    assert event["timestamp"] == {"seconds": 1234, "microseconds": 500000}
    await client.aclose()


def test_events_raised_inside_the_blackout_are_delivered_after_it_in_order() -> None:
    """App.events_held: a QMP client woken inside the blackout takes a CPU from the VMMs, so
    what is raised there is sent when it ends, stamped with when it happened."""
    from handoff.process.app import App

    sent: list[tuple[str, dict[str, Any], float | None]] = []

    class Control:
        def emit(self, event: str, data: dict[str, Any], at: float | None = None) -> None:
            sent.append((event, data, at))

    app = object.__new__(App)  # only the event plumbing: no VM, no flags
    app.control = Control()  # type: ignore[assignment]
    app._held_events = None
    app.nursery = None
    app.emit("HANDOFF", {"status": "active"})
    assert [e for e, _, _ in sent] == ["HANDOFF"]
    before = time.time()
    with pytest.raises(RuntimeError), app.events_held():
        app.emit("HANDOFF", {"status": "device"})
        app.emit("STOP", {})
        assert len(sent) == 1  # nothing goes out inside
        raise RuntimeError("the blackout failed")  # delivered on the way out all the same
    assert [(e, d) for e, d, _ in sent[1:]] == [("HANDOFF", {"status": "device"}), ("STOP", {})]
    stamps = [at for _, _, at in sent[1:]]
    assert all(at is not None and before <= at <= time.time() for at in stamps)
    app.emit("HANDOFF", {"status": "failed"})
    assert sent[-1][0:2] == ("HANDOFF", {"status": "failed"})


async def test_events_held_in_a_blackout_that_lasts_go_out_after_the_limit() -> None:
    """A hung target keeps the blackout going until the handoff's timeout: its "device"
    event (and the STATUS= line) still reaches the operator, `at_most` seconds in."""
    from handoff.process.app import App

    sent: list[str] = []

    class Control:
        def emit(self, event: str, data: dict[str, Any], at: float | None = None) -> None:
            sent.append(str(data.get("status")))

    app = object.__new__(App)
    app.control = Control()  # type: ignore[assignment]
    app._held_events = None
    async with trio.open_nursery() as nursery:
        app.nursery = nursery
        with app.events_held(at_most=0.05):
            app.emit("HANDOFF", {"status": "device"})
            await trio.sleep(0.01)
            assert sent == []
            with trio.fail_after(10):  # a hang guard
                while not sent:
                    await trio.sleep(0.01)
            assert sent == ["device"]
            app.emit("HANDOFF", {"status": "late"})  # after the limit: at once
            assert sent == ["device", "late"]
    assert sent == ["device", "late"]


async def test_an_event_reaches_a_client_while_its_own_command_is_still_running(
    server: ControlServer, sock_path: Path
) -> None:
    release = trio.Event()
    started = trio.Event()

    async def long_running(args: dict[str, Any]) -> str:
        started.set()
        await release.wait()
        return "done"

    server.register("upgrade", long_running)
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(b'{"execute": "upgrade", "id": 1}\n')
    await started.wait()
    server.emit("HANDOFF", {"status": "device"})
    assert (await client.read())["event"] == "HANDOFF"
    release.set()
    assert await client.read() == {"return": "done", "id": 1}
    await client.aclose()


async def test_many_clients_are_served_concurrently_and_all_receive_events(
    server: ControlServer, sock_path: Path
) -> None:
    release = trio.Event()

    async def blocks(args: dict[str, Any]) -> str:
        await release.wait()
        return "released"

    server.register("blocks", blocks)
    clients = [await connect(sock_path) for _ in range(40)]
    for client in clients:
        await client.negotiate()
    # One client's command blocks; every other client is still answered.
    await clients[0].send(b'{"execute": "blocks", "id": "b"}\n')
    for i, client in enumerate(clients[1:], 1):
        assert (await client.execute("echo", arguments={"i": i}))["return"] == {"echo": {"i": i}}
    assert server.client_count == 40
    server.emit("RESUME", {})
    for client in clients:
        assert (await client.read())["event"] == "RESUME"
    release.set()
    assert await clients[0].read() == {"return": "released", "id": "b"}
    for client in clients:
        await client.aclose()


async def test_a_client_that_stops_reading_events_is_dropped_not_waited_for(
    server: ControlServer, sock_path: Path
) -> None:
    sleeper = await connect(sock_path)
    await sleeper.negotiate()
    await trio.testing.wait_all_tasks_blocked()
    payload = {"blob": "x" * 1024}
    for _ in range(5000):  # ~5 MiB: more than the socket buffers and the queue together hold
        server.emit("NOISE", payload)
        await trio.sleep(0)
    with trio.fail_after(10):
        while server.client_count:
            await trio.sleep(0.01)
    await sleeper.aclose()


async def test_a_client_vanishing_mid_command_does_not_disturb_the_server(
    server: ControlServer, sock_path: Path
) -> None:
    release = trio.Event()
    finished = trio.Event()

    async def slow(args: dict[str, Any]) -> str:
        await release.wait()
        finished.set()
        return "too late"

    server.register("slow", slow)
    client = await connect(sock_path)
    await client.negotiate()
    await client.send(b'{"execute": "slow"}\n')
    await trio.testing.wait_all_tasks_blocked()
    await client.aclose()
    release.set()
    await finished.wait()
    with trio.fail_after(5):
        while server.client_count:
            await trio.sleep(0.01)
    other = await connect(sock_path)
    await other.negotiate()
    assert (await other.execute("echo"))["return"] == {"echo": {}}
    await other.aclose()


async def test_uids_not_allowed_are_disconnected_before_the_greeting(sock_path: Path) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    control = ControlServer(listen_sock, {}, allowed_uids={os.getuid() + 1})
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        client = await connect(sock_path)
        with trio.fail_after(5):
            assert await client.at_eof()
        await client.aclose()
        control.close()
    listen_sock.close()


# -- shutting down ------------------------------------------------------------------------------


async def test_the_reply_of_a_command_that_shuts_the_process_down_is_still_delivered(
    sock_path: Path,
) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    quit_requested = trio.Event()

    async def quit_(args: dict[str, Any]) -> None:
        quit_requested.set()  # the process's main task cancels everything as soon as it runs

    control = ControlServer(listen_sock, {"quit": quit_})
    client = await connect(sock_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        await client.negotiate()
        await client.send(b'{"execute": "quit", "id": "q"}\n')
        await quit_requested.wait()
        nursery.cancel_scope.cancel()
    listen_sock.close()
    assert await client.read() == {"return": {}, "id": "q"}
    assert await client.at_eof()
    await client.aclose()


async def test_aclose_lets_a_running_command_finish_and_flushes_its_reply(
    server: ControlServer, sock_path: Path
) -> None:
    release = trio.Event()

    async def finishing(args: dict[str, Any]) -> str:
        await release.wait()
        return "finished"

    server.register("finishing", finishing)
    busy = await connect(sock_path)
    await busy.negotiate()
    idle = await connect(sock_path)
    await idle.negotiate()
    await busy.send(b'{"execute": "finishing", "id": 1}\n')
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.aclose)
        await trio.testing.wait_all_tasks_blocked()
        assert not server.accepting
        assert await idle.at_eof()  # an idle client is let go at once
        release.set()
    assert await busy.read() == {"return": "finished", "id": 1}
    assert await busy.at_eof()
    await busy.aclose()
    await idle.aclose()


# -- the listening socket outlives its server ---------------------------------------------------


async def test_stop_accepting_leaves_the_socket_open_and_takes_no_new_client(
    server: ControlServer, sock_path: Path
) -> None:
    served = await connect(sock_path)
    await served.negotiate()
    server.stop_accepting()
    waiting = await connect(sock_path)  # the kernel queues it in the backlog
    with trio.move_on_after(0.2) as scope:
        await waiting.read()
    assert scope.cancelled_caught  # nobody greeted it
    assert server.client_count == 1
    assert (await served.execute("echo"))["return"] == {"echo": {}}  # still served
    server.start_accepting()
    assert "QMP" in await waiting.read()  # taken from the backlog once accepting again
    await served.aclose()
    await waiting.aclose()


async def test_a_listening_socket_handed_to_a_second_server_serves_new_clients_on_the_same_path(
    sock_path: Path,
) -> None:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)

    async def whoami_first(args: dict[str, Any]) -> str:
        return "first"

    async def whoami_second(args: dict[str, Any]) -> str:
        return "second"

    first = ControlServer(listen_sock, {"whoami": whoami_first}, package="handoff first")
    async with trio.open_nursery() as nursery:
        await nursery.start(first.serve)
        old_client = await connect(sock_path)
        await old_client.negotiate()
        assert (await old_client.execute("whoami"))["return"] == "first"

        # The switch: the first server stops accepting; the listening socket travels as an fd
        # over a handoff channel, as it does between two VMM processes.
        first.stop_accepting()
        in_between = await connect(sock_path)  # arrives while nobody accepts
        source, target = socketpair()
        await source.send(b"Describe", [listen_sock.fileno()])
        _, fds = await target.receive(max_fds=1)
        source.close()
        target.close()
        received = socket.socket(fileno=fds[0])
        assert received.getsockname() == str(sock_path)
        second = ControlServer(received, {"whoami": whoami_second}, package="handoff second")
        await nursery.start(second.serve)

        greeting = await in_between.read()
        assert greeting["QMP"]["version"]["package"] == "handoff second"
        new_client = await connect(sock_path)
        assert (await new_client.read())["QMP"]["version"]["package"] == "handoff second"
        assert await new_client.execute("qmp_capabilities") == {"return": {}}
        assert (await new_client.execute("whoami"))["return"] == "second"
        assert (await old_client.execute("whoami"))["return"] == "first"  # until it is let go

        # The old process lets its clients go and closes its copy of the socket.
        first.close()
        assert await old_client.at_eof()
        listen_sock.close()
        last = await connect(sock_path)
        assert (await last.read())["QMP"]["version"]["package"] == "handoff second"
        assert second.client_count == 3
        for client in (old_client, in_between, new_client, last):
            await client.aclose()
        second.close()
    received.close()
