"""Benchmark: the guest-visible pause of a handoff, against memory size, vCPUs, mode, and a
copy baseline; with the floor (bare trio SEQPACKET and kvmstub round trips) of the same run.

    python tools/bench_handoff.py                      # SEV-ES, 4 vCPUs, 4 GiB, 20 handoffs
    python tools/bench_handoff.py --mode plain --vcpus 1 --memory 256M -n 10
    python tools/bench_handoff.py --sweep [--quick] --json out.json --plot out.png

Per handoff: the guest-visible pause (the largest gap_us each vCPU reported in its first line
after the pause, maximum over vCPUs); the blackout kvmstub measured (each vCPU's last step in
the old VM to its first in the new, maximum over vCPUs: the pause without the stalls around
it that the guest's line also holds; none for the copy baseline); the source-side downtime
(pause to Resumed) and phases from query-handoff; and the total wall time including spawning
the successor. The sweep runs
memory 256 MiB, 4 GiB, 64 GiB, 1 TiB (sparse) and 2 GiB fully populated; vCPUs 1, 4, 16, 64,
256; modes plain, sev, sev-es; and the copy baseline (plain: memory streamed into fresh
memfds during the blackout) at 256 MiB, 2 GiB populated and 4 GiB. Markdown on stdout,
progress on stderr.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import trio

import handoff
import kvmstub
from handoff.machine.config import parse_size
from handoff.system.sched import place_apart
from handoff.testing import VmmProcess
from kvmstub.client import read_stats

TOOLS = Path(__file__).resolve().parent
OBSERVER_QUIET_S = 0.1
HALT_POLL_US = 1000
SIDE_BY_SIDE = "side by side"  # Config.group of configurations run together, in turn
SIDE_BY_SIDE_SETTLE_S = 0.3  # after a handoff, before the next guest continues


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


@dataclass
class Config:
    mode: str = "sev-es"
    vcpus: int = 4
    memory: str = "4G"
    populated: bool = False
    copy: bool = False
    group: str = "single"
    variant: str = ""  # KEY=VALUE of --alternate: the successors' flag in this row

    @property
    def label(self) -> str:
        kind = "copy" if self.copy else "zero-copy"
        pop = " populated" if self.populated else ""
        variant = f" [{self.variant}]" if self.variant else ""
        side = " (side by side)" if self.group == SIDE_BY_SIDE else ""
        return f"{self.mode} {self.vcpus} vCPU {self.memory}{pop} {kind}{variant}{side}"


@dataclass
class Result:
    config: Config
    pauses_ms: list[float] = field(default_factory=list)
    downtimes_ms: list[float] = field(default_factory=list)
    blackouts_ms: list[float] = field(default_factory=list)
    totals_ms: list[float] = field(default_factory=list)
    baseline_gap_ms: list[float] = field(default_factory=list)
    window_gap_ms: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, vals in (
            ("pause", self.pauses_ms),
            ("downtime", self.downtimes_ms),
            ("blackout", self.blackouts_ms),
            ("total", self.totals_ms),
            ("gap", self.baseline_gap_ms),
            ("window", self.window_gap_ms),
        ):
            if vals:
                out[f"{key}_median"] = statistics.median(vals)
                out[f"{key}_p95"] = pct(vals, 0.95)
        return out


def _vmm(cfg: Config, workdir: Path, kvm_sock: Path, name: str, flags: list[str]) -> VmmProcess:
    extra = ["--x-prefault", *flags] if cfg.populated else flags
    return VmmProcess(
        workdir, kvm_sock, name=name, mode=cfg.mode, vcpus=cfg.vcpus, memory=cfg.memory,
        line_every=200, flip_every=50, extra=extra,
    )  # fmt: skip


async def run_config(
    cfg: Config,
    n: int,
    workdir: Path,
    kvm_sock: Path,
    idx: int,
    flags: list[str],
    variants: list[str],
) -> list[Result]:
    """n handoffs of one VMM; with `variants` (KEY=VALUE each), handoff i passes the i-th
    (round robin) to its successor as `--set`, and each variant gets its own Result."""
    results = [Result(replace(cfg, variant=v)) for v in variants or [""]]
    vmm = _vmm(cfg, workdir, kvm_sock, f"b{idx}", flags)
    try:
        vmm.start(timeout=120)
        await vmm.wait_lines(more=2, timeout=60)
        for i in range(n):
            res = results[i % len(results)]
            await _handoff(res, vmm, [res.config.variant] if res.config.variant else [], i, n)
        problems = vmm.report().problems(cfg.vcpus)
        for res in results:
            res.problems = problems
    except Exception as exc:  # a configuration that cannot run is reported, not fatal
        for res in results:
            res.failures.append(f"{type(exc).__name__}: {exc}")
        progress(f"  failed: {exc}")
    finally:
        await vmm.quit()
        vmm.kill_all()
    return results


async def run_side_by_side(
    cfgs: list[Config], n: int, workdir: Path, kvm_sock: Path, idx: int, flags: list[str]
) -> list[Result]:
    """n handoffs of each configuration, taken in turn: one VMM each, the others' guests
    stopped (QMP `stop`) meanwhile, so that every guest runs alone on kvmstub's CPU as in
    `run_config`, and the machine's drift over minutes falls on all of them alike."""
    results = [Result(cfg) for cfg in cfgs]
    vmms = [_vmm(cfg, workdir, kvm_sock, f"b{idx}x{j}", flags) for j, cfg in enumerate(cfgs)]
    try:
        for vmm in vmms:
            vmm.start(timeout=120)
            await vmm.wait_lines(more=1, timeout=60)  # running, and serving QMP
            await vmm.qmp("stop")
        for i in range(n * len(cfgs)):
            res, vmm = results[i % len(cfgs)], vmms[i % len(cfgs)]
            await vmm.qmp("cont")
            # Whole lines after `cont`: neither the line the handoff is measured by nor the
            # ordinary gap may hold the stop (the first line after `cont` does).
            stopped_until = vmm.report().last_seq()
            await vmm.wait_lines(more=3, timeout=60)
            await _handoff(res, vmm, [], i, n * len(cfgs), stopped_until)
            await vmm.qmp("stop")
            # The old VMM of this handoff lingers, then exits: not while the next guest runs.
            await trio.sleep(SIDE_BY_SIDE_SETTLE_S)
        for res, vmm in zip(results, vmms, strict=True):
            res.problems = vmm.report().problems(res.config.vcpus)
    except Exception as exc:  # reported, not fatal
        for res in results:
            res.failures.append(f"{type(exc).__name__}: {exc}")
        progress(f"  failed: {exc}")
    finally:
        for vmm in vmms:
            await vmm.quit()
            vmm.kill_all()
    return results


async def _handoff(
    res: Result,
    vmm: VmmProcess,
    sets: list[str],
    i: int,
    n: int,
    stopped_until: dict[int, int] | None = None,
) -> None:
    """One handoff of `vmm` (`sets`: --set flags for its successor), its figures into `res`.
    `stopped_until`: each vCPU's last line before the guest was last continued (the line
    after it holds the stop, so it is no ordinary gap)."""
    after = stopped_until or {}
    before = vmm.report().last_seq()
    vms_before = {vm["id"] for vm in read_stats(vmm.kvm_socket)["vms"]}
    t0 = time.perf_counter()
    result = await vmm.upgrade(sets, copy_memory=res.config.copy, timeout=300)
    total = (time.perf_counter() - t0) * 1e3
    label = f"  [{i + 1}/{n}] {res.config.label}:"
    if result.get("status") != "completed":
        res.failures.append(str(result.get("error-desc")))
        progress(f"{label} failed: {result.get('error-desc')}")
        return
    seqs = {v: s for v, s in enumerate(result.get("pause-seqs") or []) if s >= 0}
    # Stay off the CPUs while the guest's first lines after the pause are written:
    # the observer must not take them from the VMM and kvmstub it measures.
    await trio.sleep(OBSERVER_QUIET_S)
    report = await vmm.wait_lines(more=2, timeout=60)
    pause = report.max_gap_after(seqs, lines=1) if seqs else None
    ordinary = [
        g for v, entries in report.lines.items() for s, g in entries
        if max(seqs.get(v, 0) - 30, after.get(v, -2) + 1) < s < seqs.get(v, 0) - 1
    ]  # fmt: skip
    # Every gap from the upgrade command to OBSERVER_QUIET_S after the handoff (the
    # successor's start, the pause, deferred work, the old VMM's exit), all vCPUs.
    window = [
        g for v, entries in report.lines.items() for s, g in entries
        if s > before.get(v, -1)
    ]  # fmt: skip
    if window:
        res.window_gap_ms.append(max(window) / 1000)
    res.pauses_ms.append((pause or 0) / 1000)
    res.downtimes_ms.append(float(result.get("downtime", 0.0)))
    blackout = _blackout_ms(vmm.kvm_socket, vms_before)
    if blackout is not None:
        res.blackouts_ms.append(blackout)
    res.totals_ms.append(total)
    res.phases.append(dict(result.get("phases", {})))
    if ordinary:
        res.baseline_gap_ms.append(statistics.median(ordinary) / 1000)
    progress(
        f"{label} pause {res.pauses_ms[-1]:.3f} ms, blackout "
        + (f"{blackout:.3f} ms" if blackout is not None else "-")
        + f", downtime {res.downtimes_ms[-1]:.3f} ms, total {total:.0f} ms"
    )


def _blackout_ms(kvm_socket: str, vms_before: set[int]) -> float | None:
    """The blackout kvmstub measured for the VM the handoff created (the largest over its
    vCPUs, from the last step in the old VM to the first in the new): the pause itself,
    without the stalls around it that the guest's own figure also holds. None for a copy
    handoff (a fresh memfd) or when no new VM has run every vCPU yet."""
    for vm in read_stats(kvm_socket)["vms"]:
        if vm["id"] not in vms_before and vm.get("handoff_gap_us") is not None:
            return float(vm["handoff_gap_us"]) / 1000
    return None


def floor(kvm_sock: Path, workdir: Path) -> tuple[float, float]:
    """Median round trips (µs): bare trio SEQPACKET echo, kvmstub GetApiVersion."""
    spec = importlib.util.spec_from_file_location("bench_roundtrip", TOOLS / "bench_roundtrip.py")
    assert spec and spec.loader
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    echo_path = str(workdir / "echo.sock")
    echo = rt._start([sys.executable, "-c", rt._ECHO_SERVER, echo_path], "ready")
    try:
        echo_us, kvm_us = trio.run(rt._bench, echo_path, str(kvm_sock), 1000, 5)
    finally:
        echo.terminate()
        echo.wait(10)
    return float(echo_us), float(kvm_us)


def sweep_pairs() -> list[list[Config]]:
    """The 1 TiB / 256 MiB comparison, each pair run side by side (`run_side_by_side`)."""
    return [
        [Config(mode, 4, mem, group=SIDE_BY_SIDE) for mem in ("256M", "1T")]
        for mode in ("plain", "sev", "sev-es")
    ]


def sweep_configs(quick: bool) -> list[Config]:
    modes = ["plain", "sev", "sev-es"]
    out: list[Config] = []
    for mode in modes:
        for mem in ["256M", "4G", "64G", "1T"]:
            out.append(Config(mode, 4, mem, group="memory"))
        out.append(Config(mode, 4, "2G", populated=True, group="memory"))
    for mode in modes:
        for n in [1, 4, 16, 64, 256]:
            if quick and n > 64:
                continue
            out.append(Config(mode, n, "256M", group="vcpus"))
    for mem, pop in [("256M", False), ("2G", True), ("4G", False)]:
        out.append(Config("plain", 4, mem, populated=pop, copy=True, group="copy"))
    return out


def table(results: list[Result], echo_us: float, kvm_us: float) -> str:
    lines = [
        f"floor: bare trio SEQPACKET round trip {echo_us:.1f} µs, kvmstub round trip "
        f"{kvm_us:.1f} µs",
        "",
        "| configuration | pause median ms | pause p95 ms | pause in kvmstub RTTs | "
        "blackout median ms | downtime median ms | ordinary gap ms | "
        "worst gap around median ms | total median ms | handoffs | continuity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        if not r.pauses_ms:
            lines.append(f"| {r.config.label} | - | - | - | - | - | - | - | - | 0 | "
                         f"failed: {'; '.join(r.failures)[:80]} |")  # fmt: skip
            continue
        ok = "ok" if not r.problems else "; ".join(r.problems[:2])
        lines.append(
            f"| {r.config.label} | {s['pause_median']:.3f} | {s['pause_p95']:.3f} | "
            f"{s['pause_median'] * 1000 / kvm_us:.0f} | "
            f"{s.get('blackout_median', float('nan')):.3f} | {s['downtime_median']:.3f} | "
            f"{s.get('gap_median', float('nan')):.3f} | "
            f"{s.get('window_median', float('nan')):.3f} | {s['total_median']:.0f} | "
            f"{len(r.pauses_ms)} | {ok} |"
        )
    by = {r.config.label: r for r in results}
    for mem, pop in [("256M", False), ("2G", True), ("4G", False)]:
        pop_s = " populated" if pop else ""
        z = by.get(f"plain 4 vCPU {mem}{pop_s} zero-copy")
        c = by.get(f"plain 4 vCPU {mem}{pop_s} copy")
        if z and c and z.pauses_ms and c.pauses_ms:
            ratio = statistics.median(c.pauses_ms) / statistics.median(z.pauses_ms)
            lines.append(f"\ncopy / zero-copy pause at {mem}{pop_s}: {ratio:.0f}x")
    for group in ("memory", SIDE_BY_SIDE):
        mem = [r for r in results if r.config.group == group and not r.config.populated]
        for mode in ["plain", "sev", "sev-es"]:
            small = next(
                (r for r in mem if r.config.mode == mode and r.config.memory == "256M"), None
            )
            big = next((r for r in mem if r.config.mode == mode and r.config.memory == "1T"), None)
            if small and big and small.pauses_ms and big.pauses_ms:
                ratio = statistics.median(big.pauses_ms) / statistics.median(small.pauses_ms)
                how = " (side by side, in turn)" if group == SIDE_BY_SIDE else ""
                lines.append(f"{mode}: pause at 1 TiB / pause at 256 MiB = {ratio:.2f}{how}")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("--plot needs matplotlib: .venv/bin/pip install matplotlib")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ["plain", "sev", "sev-es"]:
        rs = [
            r for r in results
            if r.config.group == "memory" and r.config.mode == mode and not r.config.populated
            and r.pauses_ms
        ]  # fmt: skip
        if rs:
            xs = [parse_size(r.config.memory) for r in rs]
            ax1.plot(xs, [statistics.median(r.pauses_ms) for r in rs], "o-", label=mode)
        rs = [
            r
            for r in results
            if r.config.group == "vcpus" and r.config.mode == mode and r.pauses_ms
        ]
        if rs:
            xs = [r.config.vcpus for r in rs]
            ax2.plot(xs, [statistics.median(r.pauses_ms) for r in rs], "o-", label=mode)
    cs = [r for r in results if r.config.copy and r.pauses_ms]
    if cs:
        xs = [parse_size(r.config.memory) for r in cs]
        ax1.plot(xs, [statistics.median(r.pauses_ms) for r in cs], "s--", label="plain copy")
    for ax, xl in ((ax1, "guest memory (bytes)"), (ax2, "vCPUs")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("guest-visible pause, median (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_title("pause against memory size (4 vCPUs)")
    ax2.set_title("pause against vCPUs (256 MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", default="sev-es", choices=["plain", "sev", "sev-es"])
    p.add_argument("--vcpus", type=int, default=4)
    p.add_argument("--memory", default="4G")
    p.add_argument("--populated", action="store_true", help="allocate every page first")
    p.add_argument("--copy", action="store_true", help="the copy baseline (plain only)")
    p.add_argument("-n", type=int, default=20, help="handoffs per configuration (default 20)")
    p.add_argument("--sweep", action="store_true", help="the whole sweep (see above)")
    p.add_argument("--quick", action="store_true", help="sweep with 5 handoffs, no 256 vCPUs")
    p.add_argument("--slice-us", type=int, default=None, help="kvmstub's KVM_RUN slice")
    p.add_argument(
        "--quantum-us", type=int, default=None, help="kvmstub's turn per vCPU in KVM_RUN"
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="leave kvmstub and the VMMs to the scheduler on any CPU (default: kvmstub, where "
        "the guest's vCPUs run, on the last CPU; the VMMs and this benchmark on the others)",
    )
    p.add_argument(
        "--halt-poll-us",
        type=int,
        default=None,
        help=f"kvmstub's halt polling (default: {HALT_POLL_US} when pinned, else 0)",
    )
    p.add_argument(
        "--blackout-poll-us",
        type=int,
        default=None,
        help="the new VMM polls for the MOVE's answer (handoff run --blackout-poll-us; "
        f"default: {HALT_POLL_US} when pinned, else 0)",
    )
    p.add_argument(
        "--alternate",
        metavar="KEY=V1,V2,...",
        help="successive handoffs give their successors `--set KEY=V1`, `KEY=V2`, ... in turn, "
        "and the table has a row for each value: a comparison that the machine's drift over "
        "minutes cannot skew. For a flag of the new VMM's side (a flag of the old VMM's side "
        "shows in the next handoff's row)",
    )
    p.add_argument(
        "--versus",
        metavar="MEMORY",
        help="also run the same guest with this much memory, side by side: one VMM each, "
        "handoffs taken in turn, the other guest stopped meanwhile (the sweep does this for "
        "256M against 1T)",
    )
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    args = p.parse_args()
    variants: list[str] = []
    if args.alternate:
        key, sep, values = args.alternate.partition("=")
        if not sep or not key or not values:
            p.error(f"--alternate {args.alternate!r}: use KEY=V1,V2,..., e.g. log-level=info,debug")
        variants = [f"{key}={v}" for v in values.split(",")]
    # What runs alone (one VMM, with --alternate's variants) and what runs side by side.
    runs: list[list[Config]]
    if args.sweep:
        runs = [[cfg] for cfg in sweep_configs(args.quick)] + sweep_pairs()
        n = 5 if args.quick else args.n
    else:
        cfg = Config(args.mode, args.vcpus, args.memory, args.populated, args.copy)
        runs = [[cfg]]
        if args.versus:
            if args.alternate:
                p.error("--versus and --alternate cannot be combined")
            runs = [
                [
                    replace(cfg, group=SIDE_BY_SIDE),
                    replace(cfg, memory=args.versus, group=SIDE_BY_SIDE),
                ]
            ]
        n = args.n
    # Bytecode for every module a VMM imports, as an installed package has it: where
    # PYTHONDONTWRITEBYTECODE is set, each successor compiled what changed since from source.
    for package in (handoff, kvmstub):
        compileall.compile_dir(package.__path__[0], quiet=1)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) > 1
    halt_poll_us = (
        args.halt_poll_us if args.halt_poll_us is not None else (HALT_POLL_US if pin else 0)
    )
    poll_us = (
        args.blackout_poll_us if args.blackout_poll_us is not None else (HALT_POLL_US if pin else 0)
    )
    vmm_flags = ["--blackout-poll-us", str(poll_us)]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as d:
        workdir = Path(d)
        kvm_sock = workdir / "kvm.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(kvm_sock)]
            + (["--slice-us", str(args.slice_us)] if args.slice_us else [])
            + (["--quantum-us", str(args.quantum_us)] if args.quantum_us else [])
            + ["--halt-poll-us", str(halt_poll_us)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # Its own session, as a system service has: with the scheduler's autogroups the
            # CPUs are shared between sessions first, and the guests it runs must not share
            # a group with this observer or a VMM.
            start_new_session=True,
        )
        assert daemon.stdout is not None
        daemon.stdout.readline()
        placement = (
            f"pinned: {place_apart(daemon.pid)}, this benchmark with the VMMs (--no-pin: any CPU)"
            if pin
            else "not pinned: kvmstub and the VMMs on any CPU"
        ) + f"; kvmstub halt polling {halt_poll_us} µs, the VMMs' blackout polling {poll_us} µs"
        progress(placement)
        try:
            echo_us, kvm_us = floor(kvm_sock, workdir)
            progress(f"floor: echo {echo_us:.1f} µs, kvmstub {kvm_us:.1f} µs")
            for i, run in enumerate(runs):
                progress(f"[{i + 1}/{len(runs)}] " + " | ".join(c.label for c in run))
                if len(run) == 1:
                    results += trio.run(
                        run_config, run[0], n, workdir, kvm_sock, i, vmm_flags, variants
                    )
                else:
                    results += trio.run(run_side_by_side, run, n, workdir, kvm_sock, i, vmm_flags)
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    print(table(results, echo_us, kvm_us))
    print(f"\n{placement}")
    if args.json:
        raw = {
            "floor_us": {"echo": echo_us, "kvmstub": kvm_us},
            "placement": placement,
            "results": [{**asdict(r), "summary": r.summary()} for r in results],
        }
        Path(args.json).write_text(json.dumps(raw, indent=1))
    if args.plot:
        plot(results, args.plot)
    lost = [r for r in results if r.problems]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
