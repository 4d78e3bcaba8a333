"""Benchmark: the floor under a real-KVM handoff's pause, with no protocol and no processes.

    python tools/bench_kvm_floor.py                 # 1 and 4 vCPUs, 30 moves each
    python tools/bench_kvm_floor.py --vcpus 1 -n 50

Two `Vmm`s of the product's machine layer in ONE process, on the real /dev/kvm, over the same
memfds: the x86 witness runs on one, is paused, its state read (`get_all_states`, the VM
state, the devices) and loaded into the other (`complete_incoming`), which resumes it; then
back. No socket, no message, no second process, no encoding: what is left is the kernel's
ioctls, the vCPU threads' kick and wake-up, and the machine layer's Python. A handoff between
two VMM processes cannot be faster than this, so this says which of `tools/bench_kvm.py`'s
targets the machine layer (and the host) leaves room for.

Per move: the guest-visible pause (the witness's own largest gap_us in its first two lines on
the new VMM, as tools/bench_kvm.py takes it), the ordinary gap (the median gap_us before the
pause), and the VMM's steps in microseconds (kick until parked, save, load, resume until
every vCPU's KVM_RUN is entered). Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

from handoff.hv.backends import kvm_problem
from handoff.hv.linux import open_linux
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.vmm import Vmm

LINE = re.compile(rb"vcpu=(\d+) seq=(\d+) gap_us=(\d+)")


def _us(a: int, b: int) -> float:
    return (b - a) / 1000


async def _until(done: Callable[[], bool], seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not done():
            await trio.sleep(0.0005)


def _lines_past(vmm: Vmm, seqs: dict[int, int], lines: int) -> Callable[[], bool]:
    last = vmm.devices.serial.last_seq
    return lambda: all(last.get(i, -1) >= seqs.get(i, -1) + lines for i in range(vmm.cfg.vcpus))


def _all_entered(vmm: Vmm) -> Callable[[], bool]:
    """Every vCPU's first KVM_RUN since the resume entered (the backend's own record)."""
    return lambda: all("enter" in (getattr(v, "times", None) or {}) for v in vmm.vcpus)


async def run(vcpus: int, moves: int, work: Path) -> dict[str, list[float]]:
    cfg = GuestConfig(
        vcpus=vcpus, memory=256 << 20, mode="plain", policy=0, line_every=1, flip_every=1
    )
    log = work / f"serial-{vcpus}.log"

    def flags(name: str) -> HostFlags:
        return HostFlags(
            name=name, uuid=str(uuid.uuid4()), kvm="", hypervisor="kvm", serial_log=str(log)
        )

    a = Vmm(cfg, flags("a"), hypervisor=open_linux())
    b = Vmm(cfg, flags("b"), hypervisor=open_linux())
    out: dict[str, list[float]] = {
        k: [] for k in ("guest", "ordinary", "vmm", "parked", "save", "load", "enter")
    }
    marks: list[tuple[int, int]] = []  # (byte offset in the log, move) at each resume
    try:
        async with trio.open_nursery() as nursery:
            await a.launch()
            a.start(nursery)
            a.resume()
            await b.prepare_incoming([os.dup(fd) for fd in a.memfds])
            b.start(nursery)
            src, dst = a, b
            for move in range(moves):
                await _until(_lines_past(src, dict(src.devices.serial.last_seq), 5))
                t0 = time.monotonic_ns()
                await src.pause()
                t1 = time.monotonic_ns()
                states = await src.get_all_states()
                devices = await src.snapshot_devices()
                t2 = time.monotonic_ns()
                await dst.load_incoming(states, devices)
                t3 = time.monotonic_ns()
                dst.devices.serial.last_seq.update(src.devices.serial.last_seq)
                marks.append((log.stat().st_size, move))
                dst.resume()
                await _until(_all_entered(dst), 5)
                enters = [(getattr(v, "times", None) or {}).get("enter", 0) for v in dst.vcpus]
                t4 = max(enters) if all(enters) else time.monotonic_ns()
                out["parked"].append(_us(t0, t1))
                out["save"].append(_us(t1, t2))
                out["load"].append(_us(t2, t3))
                out["enter"].append(_us(t3, t4))
                out["vmm"].append(_us(t0, t4))
                src, dst = dst, src
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()
    _guest_gaps(log.read_bytes(), marks, vcpus, out)
    return out


def _guest_gaps(
    text: bytes, marks: list[tuple[int, int]], vcpus: int, out: dict[str, list[float]]
) -> None:
    """The witness's own gaps: before each resume mark, the ordinary gap (median of the last
    lines); after it, the largest gap_us of each vCPU's first two lines, the max over vCPUs."""
    for offset, _ in marks:
        before = [int(m.group(3)) for m in LINE.finditer(text[:offset])][-20:]
        after: dict[int, list[int]] = {}
        for m in LINE.finditer(text, offset):
            after.setdefault(int(m.group(1)), []).append(int(m.group(3)))
            if len(after) == vcpus and all(len(v) >= 2 for v in after.values()):
                break
        if before:
            out["ordinary"].append(statistics.median(before) / 1000)
        if after:
            out["guest"].append(max(max(v[:2]) for v in after.values()) / 1000)
    if b"PANIC" in text:
        raise SystemExit("the witness printed PANIC: a move lost state")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vcpus", default="1,4", help="vCPU counts, comma-separated (default 1,4)")
    p.add_argument("-n", type=int, default=30, help="moves per configuration (default 30)")
    args = p.parse_args()
    if (problem := kvm_problem()) is not None:
        print(f"skipped: the real KVM cannot run a guest here: {problem}")
        return 0
    print(
        "| vCPUs | guest pause ms median | min | ordinary gap ms | VMM pause us median | min "
        "| kick..parked | save | load | resume..entered | moves | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for vcpus in [int(v) for v in args.vcpus.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-kvm-floor-") as tmp:
            r = trio.run(run, vcpus, args.n, Path(tmp))
        med = {k: statistics.median(v) if v else float("nan") for k, v in r.items()}
        print(
            f"| {vcpus} | {med['guest']:.3f} | {min(r['guest']):.3f} | {med['ordinary']:.3f} "
            f"| {med['vmm']:.0f} | {min(r['vmm']):.0f} | {med['parked']:.0f} | {med['save']:.0f} "
            f"| {med['load']:.0f} | {med['enter']:.0f} | {args.n} | {os.getloadavg()[0]:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
