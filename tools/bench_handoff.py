"""Benchmark: guest-visible pause and total time of handoffs (upgrades) of a running guest.

    python tools/bench_handoff.py                      # SEV-ES, 4 vCPUs, 4 GiB, 20 handoffs
    python tools/bench_handoff.py --mode plain --vcpus 1 --memory 256M -n 10

For each handoff: the guest-visible pause (the largest gap_us the guest reported in the first
line of each vCPU after the pause, maximum over vCPUs), the source-side downtime (pause to
Resumed) and phases from query-handoff, and the total wall time including spawning the
successor. Prints a Markdown table with medians and p95; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from handoff.testing import VmmProcess


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    kvm_sock = workdir / "kvm.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(kvm_sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert daemon.stdout is not None
    daemon.stdout.readline()
    vmm = VmmProcess(
        workdir, kvm_sock, name="bench", mode=args.mode, vcpus=args.vcpus, memory=args.memory,
        line_every=args.line_every, flip_every=args.flip_every,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        vmm.start()
        await vmm.wait_lines(more=3)
        for i in range(args.n):
            t0 = time.perf_counter()
            result = await vmm.upgrade()
            total = (time.perf_counter() - t0) * 1e3
            if result.get("status") != "completed":
                print(f"handoff {i} failed: {result.get('error-desc')}", file=sys.stderr)
                continue
            seqs = {v: s for v, s in enumerate(result.get("pause-seqs") or []) if s >= 0}
            await vmm.wait_lines(more=2)
            report = vmm.report()
            pause = report.max_gap_after(seqs, lines=1) if seqs else None
            # The guest's ordinary largest gap between lines, for scale: lines well before.
            base = [g for v, e in report.lines.items() for s, g in e if s < seqs.get(v, 0) - 2]
            row = {
                "pause_ms": (pause or 0) / 1000,
                "downtime_ms": result.get("downtime", 0.0),
                "total_ms": total,
                "phases": result.get("phases", {}),
                "baseline_gap_ms": statistics.median(base[-50:]) / 1000 if base else 0.0,
            }
            rows.append(row)
            print(
                f"[{i + 1}/{args.n}] pause {row['pause_ms']:.3f} ms, source-side downtime "
                f"{row['downtime_ms']:.3f} ms, total {total:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
            await trio.sleep(args.interval)
        problems = vmm.report().problems(args.vcpus)
    finally:
        await vmm.quit()
        vmm.kill_all()
        daemon.terminate()
        daemon.wait(timeout=10)
    return {"rows": rows, "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", default="sev-es", choices=["plain", "sev", "sev-es"])
    p.add_argument("--vcpus", type=int, default=4)
    p.add_argument("--memory", default="4G")
    p.add_argument("-n", type=int, default=20, help="handoffs (default 20)")
    p.add_argument("--line-every", type=int, default=200)
    p.add_argument("--flip-every", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between handoffs")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as d:
        out = trio.run(bench, args, Path(d))
    rows = out["rows"]
    if not rows:
        print("no handoff completed", file=sys.stderr)
        return 1
    cols = [
        ("guest-visible pause", "pause_ms"),
        ("source-side downtime", "downtime_ms"),
        ("total incl. spawn", "total_ms"),
        ("ordinary largest gap", "baseline_gap_ms"),
    ]
    print(f"\n{args.mode}, {args.vcpus} vCPUs, {args.memory}, {len(rows)} handoffs\n")
    print("| figure | median ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    for name, key in cols:
        vals = [r[key] for r in rows]
        print(
            f"| {name} | {statistics.median(vals):.3f} | {pct(vals, 0.95):.3f} | {max(vals):.3f} |"
        )
    phases = sorted({k for r in rows for k in r["phases"]}, key=list(rows[0]["phases"]).index)
    for ph in phases:
        vals = [r["phases"].get(ph, 0.0) for r in rows]
        med, p95 = statistics.median(vals), pct(vals, 0.95)
        print(f"| phase {ph} | {med:.3f} | {p95:.3f} | {max(vals):.3f} |")
    print(f"\nguest continuity: {'ok' if not out['problems'] else out['problems'][:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if not out["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
