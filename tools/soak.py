"""Soak: many back-to-back upgrades of running guests, several VMs on one kvmstub at once.

    python tools/soak.py                       # 1000 upgrades over 3 VMs (plain, sev, sev-es)
    python tools/soak.py -n 300 --vms 4 --json soak.json
    python tools/soak.py -n 12 --vms 2         # the short version `make test` runs

The VMs upgrade in rounds: in each round every VM hands its guest to a successor at the same
time; when all have finished and the old processes are gone, the round is sampled (kvmstub's
RSS and open fds, each VM's current VMM's open fds). At the end every guest's serial log is
judged: every vCPU's seq contiguous from 0 (no step lost or repeated), no PANIC.

It reports the failed upgrades, seq problems and PANICs (all must be 0) and, for each sampled
figure, first and last value and a least-squares slope per 100 upgrades: nothing may grow.
Open fds must end where they began (exactly: every fd is accounted for); RSS may wander with
the allocator but not trend (slope below --max-rss-slope-kib per 100 upgrades). After the VMs
quit kvmstub must hold no VM, no ASID and its starting fds. Exit status 0 only if all holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos import Daemon, asids_used

from handoff.testing import VmmProcess

MODES = ("plain", "sev", "sev-es")


@dataclass
class Series:
    """One sampled figure over the run: (upgrades done, value)."""

    name: str
    unit: str
    points: list[tuple[int, float]] = field(default_factory=list)

    def slope_per_100(self) -> float:
        if len(self.points) < 2 or len({x for x, _ in self.points}) < 2:
            return 0.0
        xs, ys = zip(*self.points, strict=True)
        return statistics.linear_regression(xs, ys).slope * 100

    def summary(self) -> dict[str, Any]:
        first, last = self.points[0][1], self.points[-1][1]
        return {
            "name": self.name,
            "unit": self.unit,
            "first": first,
            "last": last,
            "min": min(y for _, y in self.points),
            "max": max(y for _, y in self.points),
            "slope_per_100": round(self.slope_per_100(), 3),
        }


@dataclass
class SoakResult:
    upgrades: int = 0
    failed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    panics: int = 0
    lines: int = 0
    gaps_us: list[int] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def passed(self, max_rss_slope_kib: float) -> bool:
        fds_grew = [
            s.name
            for s in self.series
            if s.unit == "fds" and s.points and s.points[-1][1] > s.points[0][1]
        ]
        rss_grew = [
            s.name for s in self.series if s.unit == "KiB" and s.slope_per_100() > max_rss_slope_kib
        ]
        return not (
            self.failed or self.problems or self.panics or self.leaks or fds_grew or rss_grew
        )


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(
    n: int, vm_count: int, workdir: Path, *, timeout: float = 10.0, progress: bool = False
) -> SoakResult:
    """Run about `n` upgrades (whole rounds over `vm_count` VMs) and judge them."""
    result = SoakResult()
    daemon = Daemon(workdir)
    vms: list[VmmProcess] = []
    t0 = time.monotonic()
    try:
        fds0 = daemon.open_fds()  # before a stats connection of ours adds one
        asids0 = asids_used(daemon.stats())
        for i in range(vm_count):
            vmm = VmmProcess(
                workdir, daemon.socket, name=f"soak{i}", mode=MODES[i % len(MODES)], vcpus=2,
                memory="16M", line_every=100, flip_every=25,
                extra=["--handoff-timeout", f"{timeout:g}"],
            )  # fmt: skip
            await trio.to_thread.run_sync(vmm.start)
            vms.append(vmm)
        for vmm in vms:
            await vmm.wait_lines(more=2)

        kv_rss = Series("kvmstub RSS", "KiB")
        kv_fds = Series("kvmstub fds", "fds")
        vmm_fds = [Series(f"{v.name} ({v.mode}) VMM fds", "fds") for v in vms]
        result.series = [kv_rss, kv_fds, *vmm_fds]

        async def sample() -> None:
            last, same = -1, 0
            for _ in range(100):  # settle: closes reach the daemon a moment later
                now = open_fds(daemon.process.pid)
                same, last = (same + 1 if now == last else 0), now
                if same >= 3:
                    break
                await trio.sleep(0.02)
            kv_rss.points.append((result.upgrades, rss_kib(daemon.process.pid)))
            kv_fds.points.append((result.upgrades, open_fds(daemon.process.pid)))
            for vmm, series in zip(vms, vmm_fds, strict=True):
                series.points.append((result.upgrades, open_fds(vmm.alive_pids()[-1])))

        async def upgrade_one(vmm: VmmProcess) -> None:
            data = await vmm.upgrade(timeout=timeout * 6 + 30)
            if data.get("status") != "completed":
                result.failed.append(f"{vmm.name}: {data.get('error-desc', data)}")
                return
            result.upgrades += 1
            if len(await vmm.settle(timeout=timeout + 10)) != 1:
                result.failed.append(f"{vmm.name}: the old VMM did not exit")

        await sample()
        rounds = max(1, n // vm_count)
        for r in range(rounds):
            async with trio.open_nursery() as nursery:
                for vmm in vms:
                    nursery.start_soon(upgrade_one, vmm)
            await sample()
            if result.failed:
                break
            if progress and (r + 1) % 10 == 0:
                print(
                    f"  {result.upgrades} upgrades, kvmstub {kv_fds.points[-1][1]:.0f} fds "
                    f"{kv_rss.points[-1][1]:.0f} KiB",
                    file=sys.stderr,
                    flush=True,
                )

        for vmm in vms:
            report = await vmm.wait_lines(more=2)
            result.problems += [f"{vmm.name}: {p}" for p in report.problems(vmm.vcpus)]
            result.panics += len(report.panics)
            result.lines += sum(len(v) for v in report.lines.values())
            result.gaps_us += [gap for v in report.lines.values() for _, gap in v]
        for vmm in vms:
            await vmm.quit()
            if vmm.alive_pids():
                result.leaks.append(f"{vmm.name}: VMM processes left: {vmm.alive_pids()}")
        # Count the daemon's fds before each stats request: a stats connection of our own is
        # one more fd in the daemon until it has seen us hang up.
        with trio.move_on_after(10):
            while True:
                fds = open_fds(daemon.process.pid)
                if fds == fds0 and not daemon.stats()["vms"]:
                    break
                await trio.sleep(0.05)
        await trio.sleep(0.1)  # our last stats connection's hang-up reaches the daemon
        fds = open_fds(daemon.process.pid)
        stats = daemon.stats()
        if stats["vms"]:
            result.leaks.append(f"kvmstub still has VMs: {stats['vms']}")
        if asids_used(stats) != asids0:
            result.leaks.append(f"ASIDs in use {asids_used(stats)}, were {asids0}")
        if fds != fds0:
            result.leaks.append(f"kvmstub holds {fds} fds, held {fds0} before")
        left = [p for p in Path(tempfile.gettempdir()).glob("handoff-soak*-*")]
        if left:
            result.leaks.append(f"handoff directories left: {left[:5]}")
    finally:
        for vmm in vms:
            vmm.kill_all()
        daemon.stop()
        result.seconds = round(time.monotonic() - t0, 1)
    return result


def report(result: SoakResult, max_rss_slope_kib: float) -> str:
    gaps = sorted(result.gaps_us)
    lines = [
        f"upgrades completed     {result.upgrades}",
        f"upgrades failed        {len(result.failed)}",
        f"serial lines judged    {result.lines}",
        f"seq lost or repeated   {len(result.problems)}",
        f"PANICs                 {result.panics}",
    ]
    if gaps:
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
        lines.append(f"guest gap_us           median {statistics.median(gaps):.0f}, p99 {p99}, "
                     f"max {gaps[-1]}")  # fmt: skip
    lines += ["", "| figure | first | last | min | max | slope per 100 upgrades |"]
    lines.append("|---|---|---|---|---|---|")
    for s in result.series:
        d = s.summary()
        lines.append(
            f"| {d['name']} ({d['unit']}) | {d['first']:.0f} | {d['last']:.0f} | "
            f"{d['min']:.0f} | {d['max']:.0f} | {d['slope_per_100']:+.2f} |"
        )
    lines.append("")
    for item in result.failed + result.problems + result.leaks:
        lines.append(f"  {item}")
    verdict = "PASS" if result.passed(max_rss_slope_kib) else "FAIL"
    lines.append(f"{verdict}: {result.upgrades} upgrades in {result.seconds:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="upgrades in all (default 1000)")
    parser.add_argument("--vms", type=int, default=3, help="VMs upgrading at once (default 3)")
    parser.add_argument("--timeout", type=float, default=10.0, help="--handoff-timeout (s)")
    parser.add_argument(
        "--max-rss-slope-kib",
        type=float,
        default=256.0,
        help="largest kvmstub RSS trend accepted, KiB per 100 upgrades (default 256)",
    )
    parser.add_argument("--json", default="", help="write the figures to this file")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    os.environ["TMPDIR"] = str(workdir)  # the successors' private directories, checked at the end
    tempfile.tempdir = None
    print(f"soak: {args.n} upgrades over {args.vms} VMs", file=sys.stderr, flush=True)
    result = trio.run(lambda: soak(args.n, args.vms, workdir, timeout=args.timeout, progress=True))
    print(report(result, args.max_rss_slope_kib))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "upgrades": result.upgrades,
                    "failed": result.failed,
                    "problems": result.problems,
                    "panics": result.panics,
                    "series": [s.summary() | {"points": s.points} for s in result.series],
                    "seconds": result.seconds,
                },
                indent=1,
            )
        )
    ok = result.passed(args.max_rss_slope_kib)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
