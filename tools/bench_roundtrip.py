"""Benchmark: the round trip of a trivial kvmstub request against a bare trio SEQPACKET echo.

Both servers run as separate processes, as the daemon does in use; both clients run in this
process under trio. Prints the median round trip of each (µs) and their ratio. The aim is a
kvmstub GetApiVersion round trip within 1.5x of the bare echo.

    .venv/bin/python tools/bench_roundtrip.py [--count N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from kvmstub import client

_ECHO_SERVER = """
import socket, sys, trio

async def echo(conn):
    with conn:
        while True:
            data = await conn.recv(65536)
            if not data:
                return
            await conn.send(data)

async def main(path):
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(echo, conn)

trio.run(main, sys.argv[1])
"""


def _start(argv: list[str], marker: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if marker not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {shlex.join(argv)}: {line!r}")
    return proc


async def _batch(call: Callable[[], Awaitable[object]], count: int) -> float:
    """The mean round trip of `count` calls, in µs."""
    start = time.perf_counter_ns()
    for _ in range(count):
        await call()
    return (time.perf_counter_ns() - start) / count / 1000


async def _bench(echo_path: str, kvm_path: str, count: int, repeat: int) -> tuple[float, float]:
    """Median batch time of each, batches interleaved so that both see the same machine
    (other load on the host shifts both alike)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_SEQPACKET)
    await sock.connect(echo_path)
    payload = b"\x92\xadGetApiVersion\x01"  # a datagram the size of the kvmstub request

    async def echo_once() -> None:
        await sock.send(payload)
        await sock.recv(65536)

    kvm = await client.open_kvm(kvm_path)
    await _batch(echo_once, 1000)  # warm up
    await _batch(kvm.get_api_version, 1000)
    echo_batches, kvm_batches = [], []
    for _ in range(repeat):
        echo_batches.append(await _batch(echo_once, count))
        kvm_batches.append(await _batch(kvm.get_api_version, count))
    sock.close()
    kvm.close()
    return statistics.median(echo_batches), statistics.median(kvm_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="round trips per batch")
    parser.add_argument("--repeat", type=int, default=15, help="batches (the median is shown)")
    parser.add_argument(
        "--daemon",
        default=f"{shlex.quote(sys.executable)} -m kvmstub.cli serve",
        help="command that runs the daemon (--socket is appended)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        echo_path = os.path.join(tmp, "echo.sock")
        kvm_path = os.path.join(tmp, "kvm.sock")
        echo = _start([sys.executable, "-c", _ECHO_SERVER, echo_path], "ready")
        kvmstub = _start([*shlex.split(args.daemon), "--socket", kvm_path], "kvmstub: ready")
        try:
            echo_us, kvm_us = trio.run(_bench, echo_path, kvm_path, args.count, args.repeat)
        finally:
            for proc in (echo, kvmstub):
                proc.terminate()
                proc.wait(10)
        assert not Path(kvm_path).exists(), "kvmstub left its socket behind"
    print(f"bare trio SEQPACKET echo round trip: {echo_us:7.2f} us")
    print(f"kvmstub GetApiVersion round trip:    {kvm_us:7.2f} us")
    print(f"ratio:                               {kvm_us / echo_us:7.2f}x (aim: <= 1.5x)")


if __name__ == "__main__":
    main()
