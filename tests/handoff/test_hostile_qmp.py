"""A hostile QMP client against handoff.qmp.server: floods, deep nesting, too many clients,
duplicate keys; and `cont` on a VMM whose guest went on to a successor."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_control import RawClient  # the byte-exact QMP client of the server's own tests

from handoff.machine.config import GuestConfig, HostFlags
from handoff.process.app import App
from handoff.qmp import server as control_module
from handoff.qmp.server import MAX_NESTING, ControlServer, QMPCommandError
from handoff.testing import VmmProcess
from handoff.transport.unix import bind_unix_socket

NESTING_ERROR = {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}
SO_SNDBUFFORCE = 32  # Linux; not in the socket module
DUPLICATE_ERROR = {"class": "GenericError", "desc": "JSON parse error, duplicate key"}


@pytest.fixture
def sock_path() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="handoff-hostile-"))
    try:
        yield top / "qmp.sock"
    finally:
        shutil.rmtree(top, ignore_errors=True)


quit_calls: list[int] = []


async def echo(args: dict[str, Any]) -> Any:
    return {"echo": args}


async def query_status(args: dict[str, Any]) -> Any:
    return {"status": "running", "running": True}


async def query_name(args: dict[str, Any]) -> Any:
    return {"name": "vm"}


async def quit_(args: dict[str, Any]) -> None:
    quit_calls.append(1)


HANDLERS = {"echo": echo, "query-status": query_status, "query-name": query_name, "quit": quit_}


async def serving(sock_path: Path, **kwargs: Any) -> tuple[ControlServer, socket.socket]:
    listen_sock = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    return ControlServer(listen_sock, HANDLERS, **kwargs), listen_sock


@pytest.fixture
async def server(sock_path: Path) -> AsyncIterator[ControlServer]:
    control, listen_sock = await serving(sock_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        yield control
        control.close()
    listen_sock.close()


def flooder(path: Path, nbytes: int, then: bytes = b"") -> subprocess.Popen[bytes]:
    """Another process that connects and writes `nbytes` of 'x' with no newline as fast as the
    server takes them, then `then`, then reads until the server closes (its replies on stdout)."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        "block = b'x' * (1 << 20)\n"
        f"left = {nbytes}\n"
        "while left > 0:\n"
        "    n = s.send(block[:left])\n"
        "    left -= n\n"
        f"s.sendall({then!r})\n"
        "s.shutdown(socket.SHUT_WR)\n"
        "while data := s.recv(65536):\n"
        "    sys.stdout.buffer.write(data)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


# -- item 7: a flood without newline ------------------------------------------------------------


async def test_a_flood_without_newline_is_refused_once_and_the_session_goes_on(
    server: ControlServer, sock_path: Path
) -> None:
    """64 MiB with no newline from another process, not even negotiated: one error, and the
    commands after the flood are answered."""
    follow = b'\n{"execute":"qmp_capabilities"}\n{"execute":"query-status","id":1}\n'
    proc = flooder(sock_path, 64 << 20, follow)
    out, _ = await trio.to_thread.run_sync(proc.communicate)
    replies = [json.loads(line) for line in out.splitlines()]
    assert "QMP" in replies[0]
    assert replies[1:] == [
        {
            "error": {
                "class": "GenericError",
                "desc": f"QMP input line is longer than {control_module.MAX_LINE} bytes; discarded",
            }
        },
        {"return": {}},
        {"return": {"status": "running", "running": True}, "id": 1},
    ]


async def test_the_reader_yields_to_other_tasks_between_chunks_of_a_flood(
    server: ControlServer, sock_path: Path
) -> None:
    """Megabytes already queued on the socket are read in bounded steps with the event loop
    served in between (the VMM's vCPU tasks, here a heartbeat), not in one go."""
    ticks = 0
    beating = True

    async def heartbeat() -> None:
        nonlocal ticks
        while beating:
            await trio.sleep(0)
            ticks += 1

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)  # root only
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
    client = RawClient(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    await client.stream.socket.connect(str(sock_path))
    await client.negotiate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        await trio.sleep(0.01)
        # Queue the flood with no checkpoint: the server reads it only once this task waits.
        sock.setblocking(False)
        queued = 0
        block = b"x" * (1 << 20)
        try:
            while queued < (32 << 20):
                queued += sock.send(block)
        except BlockingIOError:
            pass
        if queued < (2 << 20):
            pytest.skip(f"only {queued} bytes could be queued on a unix socket here")
        sock.send(b'\n{"execute":"query-status","id":1}\n')
        before = ticks
        assert (await client.read())["error"]["desc"].startswith("QMP input line is longer")
        assert (await client.read())["id"] == 1
        during = ticks - before
        beating = False
    turns = queued // control_module.READ_PER_TURN
    assert during >= turns // 2, f"{during} heartbeats while {turns} chunks were read"
    await client.aclose()


def test_the_splitter_holds_at_most_a_line_of_an_endless_request() -> None:
    splitter = control_module._RequestSplitter(1024)
    errors = splitter.feed(b'{"execute": "x", "arguments": {"s": "')
    for _ in range(1000):
        errors += splitter.feed(b"y" * 4000)
        assert len(splitter.buf) <= 1024 + 4000
    assert len(errors) == 1 and isinstance(errors[0], str)
    assert splitter.feed(b'"}}{"execute":"ok"}') == [b'{"execute":"ok"}']


# -- item 7: nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 30000])
async def test_nesting_beyond_qemus_limit_is_refused_before_parsing(
    server: ControlServer, sock_path: Path, depth: int
) -> None:
    client = await RawClient.connect(sock_path)
    await client.negotiate()
    deep = b"[" * depth + b"]" * depth
    # Without a newline after it, as qemu.qmp sends: the request still ends where it closes.
    await client.send(
        b'{"execute":"echo","arguments":{"a":' + deep + b'},"id":1}{"execute":"echo"}'
    )
    assert await client.read() == {"error": NESTING_ERROR}
    assert await client.read() == {"return": {"echo": {}}}
    await client.aclose()


def test_the_splitter_refuses_deep_nesting_at_qemus_limit() -> None:
    splitter = control_module._RequestSplitter(1 << 20)
    ok = b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1)
    assert splitter.feed(b"{" + ok + b"}\n") == [b"{" + ok + b"}"]
    deep = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    assert splitter.feed(b"{" + deep + b"}\n") == [NESTING_ERROR["desc"]]


async def test_nesting_the_parser_cannot_take_is_refused_with_the_same_message(
    server: ControlServer, sock_path: Path
) -> None:
    client = await RawClient.connect(sock_path)
    await client.negotiate()
    depth = MAX_NESTING - 10  # within the limit, but beyond what the decoder recurses to
    await client.send(
        b'{"execute":"echo","arguments":{"a":' + b"[" * depth + b"]" * depth + b"}}\n"
    )
    reply = await client.read()
    assert reply == {"error": NESTING_ERROR} or reply["return"]["echo"]["a"]
    await client.aclose()


# -- item 7: too many clients -------------------------------------------------------------------


async def test_the_client_over_the_limit_is_refused_clearly_and_the_server_goes_on(
    sock_path: Path,
) -> None:
    control, listen_sock = await serving(sock_path, max_clients=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        clients = [await RawClient.connect(sock_path) for _ in range(4)]
        for client in clients:
            await client.negotiate()
        extra = await RawClient.connect(sock_path)
        assert await extra.read() == {
            "error": {
                "class": "GenericError",
                "desc": "too many QMP clients: this VM serves at most 4 at once; "
                "disconnect one and try again",
            }
        }
        with trio.fail_after(5):
            assert await extra.at_eof()
        await extra.aclose()
        # The clients already connected are still served...
        assert (await clients[0].execute("query-status", id=1))["id"] == 1
        # ... and once one leaves, a new one is greeted.
        await clients[3].aclose()
        with trio.fail_after(5):
            while control.client_count > 3:
                await trio.sleep(0.01)
        late = await RawClient.connect(sock_path)
        await late.negotiate()
        assert (await late.execute("query-status"))["return"]["status"] == "running"
        for client in [*clients[:3], late]:
            await client.aclose()
        control.close()
    listen_sock.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_hundreds_of_idle_clients_do_not_exhaust_fds_and_warn_once(
    server: ControlServer, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff.control")
    good = await RawClient.connect(sock_path)
    await good.negotiate()
    before = _open_fds()
    idle = []
    for _ in range(control_module.MAX_CLIENTS + 200):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        idle.append(sock)
        await trio.sleep(0)
    with trio.fail_after(10):
        while server.client_count < control_module.MAX_CLIENTS:
            await trio.sleep(0.01)
        await trio.sleep(0.2)  # let the refusals happen
    # Our 264 sockets plus the server's side of at most MAX_CLIENTS of them.
    assert _open_fds() - before <= len(idle) + control_module.MAX_CLIENTS + 2
    assert server.client_count == control_module.MAX_CLIENTS
    assert (await good.execute("query-status", id=2))["id"] == 2
    refusals = [r for r in caplog.records if "too many QMP clients" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    for sock in idle:
        sock.close()
    await good.aclose()


async def test_repeated_warnings_are_rate_limited_with_a_count_of_those_left_out(
    sock_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff.control")
    monkeypatch.setattr(control_module, "WARNING_INTERVAL", 0.5)
    control, listen_sock = await serving(sock_path, max_clients=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        first = await RawClient.connect(sock_path)
        await first.negotiate()
        for _ in range(30):
            refused = await RawClient.connect(sock_path)
            assert (await refused.read())["error"]["desc"].startswith("too many QMP clients")
            await refused.aclose()
        await trio.sleep(0.6)
        refused = await RawClient.connect(sock_path)
        await refused.read()
        await refused.aclose()
        await first.aclose()
        control.close()
    listen_sock.close()
    messages = [r.getMessage() for r in caplog.records if "too many" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "29 more like this" in messages[1], messages


class _FailingAccept(socket.socket):
    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def test_accept_failures_do_not_flood_the_log(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff.control")
    real = bind_unix_socket(sock_path, socket.SOCK_STREAM)
    failing = _FailingAccept(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(real.fileno()))
    control = ControlServer(failing, HANDLERS)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(str(sock_path))  # stays in the backlog: accept fails again and again
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        await trio.sleep(1.5)
        control.close()
    waiting.close()
    failing.close()
    real.close()
    messages = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "Too many open files" in messages[0]


# -- item 9: duplicate keys ---------------------------------------------------------------------


async def test_a_duplicate_key_is_refused_as_qemu_does_and_nothing_runs(
    server: ControlServer, sock_path: Path
) -> None:
    quit_calls.clear()
    client = await RawClient.connect(sock_path)
    await client.negotiate()
    await client.send(b'{"execute":"query-name","execute":"quit"}\n')
    assert await client.read() == {"error": DUPLICATE_ERROR}
    await client.send(b'{"execute":"echo","arguments":{"a":1,"b":{"c":2,"c":3}},"id":4}\n')
    assert await client.read() == {"error": DUPLICATE_ERROR}
    assert quit_calls == []
    # Keys that differ, the same key in different objects, and colons inside strings are fine.
    arguments = {"a": {"k": 1}, "b": {"k": ":"}, 'q"": ': "x:y"}
    assert await client.execute("echo", arguments=arguments, id=5) == {
        "return": {"echo": arguments},
        "id": 5,
    }
    await client.aclose()


# -- item 9: cont after a completed handoff -----------------------------------------------------


def _app() -> App:
    cfg = GuestConfig(vcpus=1, memory=64 << 20, mode="plain", policy=0, line_every=100,
                      flip_every=25)  # fmt: skip
    return App(cfg, HostFlags(name="t", uuid="u", kvm="/nonexistent"), [], [])


async def test_cont_on_a_source_whose_guest_went_to_a_successor_is_refused() -> None:
    app = _app()
    events: list[str] = []
    app.emit = lambda event, data, at=None: events.append(event)  # type: ignore[method-assign]
    app.record.begin("source")
    app.record.finish("completed")
    app.vmm.status = "postmigrate"
    with pytest.raises(QMPCommandError, match="successor"):
        await app.qmp_cont({})
    assert events == []
    assert app.vmm.status == "postmigrate"


async def test_cont_on_a_target_that_took_the_guest_is_allowed() -> None:
    app = _app()
    app.record.begin("target")
    app.record.finish("completed")
    app.vmm.status = "paused"
    app.emit = lambda event, data, at=None: None  # type: ignore[method-assign]
    assert await app.qmp_cont({}) == {}
    assert app.vmm.status == "running"


# -- item 7 end to end: a real guest under a flood ----------------------------------------------


async def test_a_real_guest_keeps_running_while_a_client_floods_its_control_socket(
    vmm_factory: Any, serial_check: Any
) -> None:
    vm: VmmProcess = vmm_factory(vcpus=2)
    await vm.wait_lines(3)
    before = vm.report().last_seq()
    proc = flooder(Path(vm.control), 128 << 20)
    lines_during = 0
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 120:
        await trio.sleep(0.05)
        last = vm.report().last_seq()
        lines_during = min(last.get(v, -1) - before.get(v, -1) for v in range(vm.vcpus))
    out, _ = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 0
    assert b"longer than" in out
    # Every vCPU kept printing while the flood was read, and the guest is whole.
    assert lines_during >= 3, f"only {lines_during} serial lines per vCPU during the flood"
    await serial_check(vm, more=3)
    assert (await vm.qmp("query-status"))["status"] == "running"


def test_the_splitter_cuts_the_same_requests_however_the_data_and_its_budget_are_cut() -> None:
    stream = (
        b'{"execute":"a","arguments":{"s":"x\\"}]\\\\"}}\n  {"execute":"b"}[1,[2]]'
        b'{"s":"\\\n"}]]\n' + b"[" * 1100 + b"]" * 1100 + b'{"execute":"c"}"open string\n{}'
    )
    whole = control_module._RequestSplitter(1 << 16).feed(stream)
    assert whole[-4:] == [NESTING_ERROR["desc"], b'{"execute":"c"}', b'"open string', b"{}"]
    for budget in (1, 2, 7):
        splitter = control_module._RequestSplitter(1 << 16)
        pieces: list[bytes | str] = []
        for i in range(0, len(stream), 5):
            pieces += splitter.feed(stream[i : i + 5], budget)
            while splitter.more:
                pieces += splitter.feed(b"", budget)
        assert pieces == whole, budget
