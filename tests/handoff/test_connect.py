"""How the old VMM reaches its successor's handoff socket (source._connect): it looks for the
socket cheaply until it appears, notices a successor that died first, and gives up in time."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from handoff.errors import HandoffError, HandoffTimeout
from handoff.migration import source


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen()
    return sock


async def test_a_successor_that_starts_listening_later_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "incoming.sock"
    successor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    listeners: list[socket.socket] = []

    async def listen_later() -> None:
        await trio.sleep(0.05)
        listeners.append(_listen(path))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen_later)
            with trio.fail_after(10):  # a hang guard
                chan = await source._connect(str(path), successor, timeout=5)
        chan.close()
    finally:
        for listener in listeners:
            listener.close()
        successor.kill()
        successor.wait()


async def test_a_successor_that_dies_before_listening_is_reported(tmp_path: Path) -> None:
    successor = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    successor.wait()
    with pytest.raises(HandoffError, match="exited with status 3 before it listened"):
        await source._connect(str(tmp_path / "incoming.sock"), successor, timeout=5)


async def test_nothing_listening_times_out_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "incoming.sock"
    with pytest.raises(HandoffTimeout, match=r"within 0\.1 s \(nothing is listening"):
        await source._connect(str(path), None, timeout=0.1)  # an operator's target
    successor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(HandoffTimeout, match="its socket did not appear"):
            await source._connect(str(path), successor, timeout=0.1)
    finally:
        successor.kill()
        successor.wait()
