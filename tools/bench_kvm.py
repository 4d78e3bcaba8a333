"""Benchmark: the pause of a handoff on the real /dev/kvm, and where it goes, step by step.

    python tools/bench_kvm.py                          # every configuration below, 20 handoffs
    python tools/bench_kvm.py --only 1,4 -n 30 --json out.json
    python tools/bench_kvm.py --alternate 'vcpu-states-inline-max=0,65536'

The guest is the x86 witness (`guestprog.x86`), plain, on `handoff run --hypervisor kvm`.
Configurations (`--only`):

    1       1 vCPU, 256 MiB, busy (--idle-us 0)
    4       4 vCPUs, 256 MiB, busy
    256     256 vCPUs, 256 MiB, idle between lines (--idle-us, so that the host stays usable)
    memory  4 vCPUs busy, 64 GiB sparse and 256 MiB side by side (one VMM each, handoffs in
            turn, the other guest stopped meanwhile)
    copy    4 vCPUs busy, 2 GiB populated: zero-copy and the --copy-memory baseline side by side

Per handoff: the guest-visible pause (the largest gap_us each vCPU reported in its first two
lines after the pause, the maximum over vCPUs: the witness's gap is the longest time between
two of its ticks, a step or an exit, so it holds the pause whatever the line length, and a
line's own exits count for the next line), beside the ordinary gap (the median gap_us of the
lines before the pause: one exit served, under this host's load); the pause as
the two VMMs timed it (the source's kick to the last vCPU entering KVM_RUN on the target, both
in CLOCK_MONOTONIC, which the two processes share; and to the last vCPU's KVM_RUN issued, "to
go", which leaves out the vCPU threads' wait for a CPU where vCPUs outnumber CPUs); and the
steps, from both VMMs' records
(query-handoff `steps`, the source's in its HANDOFF event):

    kick      the kick until the vCPU's KVM_RUN returned (per vCPU), `parked` until every
              vCPU task is parked (the completion runs included)
    save      get_state (per vCPU), `save all` for every vCPU, `devices` (VM state, devices)
    transfer  Switchover built (`encode`), sent, until the target holds it (`to target`),
              read and checked there (`decode`)
    restore   set_state (per vCPU), `restore all` (every vCPU, the VM state, devices)
    handshake Moved -> Commit -> Resumed, until the target resumes
    first run the resume's KVM_RUN issued (`go`, from Resumed sent) and entered (per vCPU)

Markdown on stdout, progress on stderr. Kills every VMM it started.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

import handoff
from handoff.testing import VmmProcess

OBSERVER_QUIET_S = 0.1
SETTLE_S = 0.3  # after a handoff in a side-by-side run, before the next guest continues
IDLE_US_MANY = 20000  # the 256-vCPU guest's idle between lines


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Config:
    name: str
    vcpus: int
    memory: str
    idle_us: int = 0
    populated: bool = False
    copy: bool = False
    variant: str = ""  # KEY=VALUE of --alternate given to the successors in this row
    tree: str = ""  # run handoff from this source tree (PYTHONPATH), not this one

    @property
    def label(self) -> str:
        pop = " populated" if self.populated else ""
        kind = " copy" if self.copy else ""
        idle = f" idle {self.idle_us} us" if self.idle_us else " busy"
        var = f" [{self.variant}]" if self.variant else ""
        tree = f" ({os.path.basename(self.tree.rstrip('/'))})" if self.tree else ""
        return f"{self.vcpus} vCPU {self.memory}{pop}{idle}{kind}{var}{tree}"


@dataclass
class Result:
    config: Config
    guest_ms: list[float] = field(default_factory=list)  # the guest's own gap_us
    vmm_ms: list[float] = field(default_factory=list)  # source kick .. last vCPU entered
    vmm_go_ms: list[float] = field(default_factory=list)  # .. last vCPU's KVM_RUN issued
    downtime_ms: list[float] = field(default_factory=list)  # source: pause .. Resumed
    ordinary_ms: list[float] = field(default_factory=list)  # the guest's gap_us before it
    steps: list[dict[str, float]] = field(default_factory=list)  # per handoff, in us
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average per handoff


def _us(a: int | None, b: int | None) -> float | None:
    if a is None or b is None:
        return None
    return (b - a) / 1000


def _stats(name: str, values: list[float | None], out: dict[str, float]) -> None:
    """`name` as the median and the largest over vCPUs."""
    vals = [v for v in values if v is not None]
    if vals:
        out[name] = statistics.median(vals)
        out[name + " max"] = max(vals)


def breakdown(source: dict[str, Any], target: dict[str, Any]) -> dict[str, float]:
    """The blackout's steps in microseconds, from both sides' `steps` records."""
    s, t = source.get("source", {}), target.get("target", {})
    sv = [v or {} for v in source.get("vcpus", [])]
    tv = [v or {} for v in target.get("vcpus", [])]
    svm, tvm = source.get("vm") or {}, target.get("vm") or {}
    out: dict[str, float] = {}
    _stats("kick", [_us(v.get("kick"), v.get("out")) for v in sv], out)
    for key, a, b, side in (
        ("parked", "kick", "parked", s),
        ("save all", "parked", "saved", s),
        ("devices", "saved", "devices", s),
        ("encode", "devices", "encoded", s),
        ("send", "encoded", "sent", s),
        ("decode", "switchover", "decoded", t),
        ("restore all", "decoded", "restored", t),
        ("moved->commit", "moved", "commit", t),
        ("commit->resumed", "commit", "resumed", t),
    ):
        v = _us(side.get(a), side.get(b))
        if v is not None:
            out[key] = v
    _stats("save", [_us(v.get("save0"), v.get("save1")) for v in sv], out)
    v = _us(svm.get("save0"), svm.get("save1"))
    if v is not None:
        out["vm save"] = v
    v = _us(s.get("encoded"), t.get("switchover"))
    if v is not None:
        out["to target"] = v
    _stats("restore", [_us(v.get("restore0"), v.get("restore1")) for v in tv], out)
    v = _us(tvm.get("restore0"), tvm.get("restore1"))
    if v is not None:
        out["vm restore"] = v
    v = _us(t.get("moved"), t.get("restored"))
    _stats("go", [_us(t.get("resumed"), v.get("go")) for v in tv], out)
    _stats("enter", [_us(v.get("go"), v.get("enter")) for v in tv], out)
    enters = [v["enter"] for v in tv if "enter" in v]
    gos = [v["go"] for v in tv if "go" in v]
    kicks = [v["kick"] for v in sv if "kick" in v]
    if enters and kicks:
        out["vmm pause"] = (max(enters) - min(kicks)) / 1000
    if gos and kicks:
        out["vmm pause to go"] = (max(gos) - min(kicks)) / 1000
    return out


def _vmm(cfg: Config, workdir: Path, name: str, line_every: int) -> VmmProcess:
    extra = ["--hypervisor", "kvm", "--idle-us", str(cfg.idle_us)]
    if cfg.populated:
        extra.append("--x-prefault")
    env = {"PYTHONPATH": cfg.tree} if cfg.tree else None
    vmm = VmmProcess(
        workdir, workdir / "no-kvmstub.sock", name=name, mode="plain", vcpus=cfg.vcpus,
        memory=cfg.memory, line_every=line_every, extra=extra, env=env,
    )  # fmt: skip
    STARTED.append(vmm)
    return vmm


STARTED: list[VmmProcess] = []
"""Every VMM this run made: killed at the end whatever happened (`main`)."""


async def _handoff(
    res: Result, vmm: VmmProcess, label: str, stopped_until: dict[int, int] | None = None
) -> None:
    cfg = res.config
    sets = [cfg.variant] if cfg.variant else []
    result = await vmm.upgrade(sets, copy_memory=cfg.copy, timeout=300)
    if result.get("status") != "completed":
        res.failures.append(str(result.get("error-desc")))
        progress(f"{label} failed: {result.get('error-desc')}")
        return
    res.load.append(os.getloadavg()[0])
    seqs = {v: q for v, q in enumerate(result.get("pause-seqs") or []) if q >= 0}
    await trio.sleep(OBSERVER_QUIET_S)  # off the CPUs while the guest's first lines come
    report = await vmm.wait_lines(more=2, timeout=60)
    target = await vmm.qmp("query-handoff")
    del stopped_until
    # The witness counts the gaps of a line's own exits (its OUTs) for the next line: a pause
    # while it wrote line N+1 shows in line N+2.
    gap = report.max_gap_after(seqs, lines=2) if seqs else None
    res.guest_ms.append((gap or 0) / 1000)
    ordinary = [
        g for v, entries in report.lines.items() for q, g in entries
        if seqs.get(v, 0) - 30 < q < seqs.get(v, 0) - 1
    ]  # fmt: skip
    if ordinary:
        res.ordinary_ms.append(statistics.median(ordinary) / 1000)
    res.downtime_ms.append(float(result.get("downtime", 0.0)))
    steps = breakdown(result.get("steps", {}), target.get("steps", {}))
    res.steps.append(steps)
    if "vmm pause" in steps:
        res.vmm_ms.append(steps["vmm pause"] / 1000)
    if "vmm pause to go" in steps:
        res.vmm_go_ms.append(steps["vmm pause to go"] / 1000)
    progress(
        f"{label} guest {res.guest_ms[-1]:.3f} ms, vmm {steps.get('vmm pause', 0) / 1000:.3f} "
        f"ms, downtime {res.downtime_ms[-1]:.3f} ms"
    )


async def run_alone(
    cfg: Config, variants: list[str], n: int, workdir: Path, idx: int, line_every: int
) -> list[Result]:
    results = [Result(Config(**{**asdict(cfg), "variant": v})) for v in variants or [""]]
    vmm = _vmm(cfg, workdir, f"k{idx}", line_every)
    try:
        vmm.start(timeout=120)
        await vmm.wait_lines(more=2, timeout=60)
        for i in range(n * len(results)):
            res = results[i % len(results)]
            await _handoff(res, vmm, f"  [{i + 1}/{n * len(results)}] {res.config.label}:")
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
    cfgs: list[Config], n: int, workdir: Path, idx: int, line_every: int
) -> list[Result]:
    """n handoffs of each configuration in turn, one VMM each, the others stopped meanwhile:
    the host's drift falls on all of them alike."""
    results = [Result(c) for c in cfgs]
    vmms = [_vmm(c, workdir, f"k{idx}x{j}", line_every) for j, c in enumerate(cfgs)]
    try:
        for vmm in vmms:
            vmm.start(timeout=120)
            await vmm.wait_lines(more=1, timeout=60)
            await vmm.qmp("stop")
        total = n * len(cfgs)
        for i in range(total):
            res, vmm = results[i % len(cfgs)], vmms[i % len(cfgs)]
            await vmm.qmp("cont")
            await vmm.wait_lines(more=3, timeout=60)
            await _handoff(res, vmm, f"  [{i + 1}/{total}] {res.config.label}:")
            await vmm.qmp("stop")
            await trio.sleep(SETTLE_S)  # the old VMM lingers, then exits: not in the next one
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


STEP_COLUMNS = [
    "kick", "kick max", "parked", "save", "save max", "save all", "vm save", "devices", "encode",
    "send", "to target", "decode", "restore", "restore max", "restore all", "vm restore",
    "moved->commit", "commit->resumed", "go", "go max", "enter", "enter max",
]  # fmt: skip


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: list[Result]) -> str:
    lines = [
        "| configuration | guest pause median ms | p90 | ordinary gap ms | VMM pause median ms | "
        "p90 | VMM pause to go median ms | source downtime median ms | handoffs | load | "
        "continuity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = "ok" if not r.problems and not r.failures else "; ".join(r.problems + r.failures)[:80]
        lines.append(
            f"| {r.config.label} | {_median(r.guest_ms):.3f} | {_q(r.guest_ms, 0.9):.3f} | "
            f"{_median(r.ordinary_ms):.3f} | "
            f"{_median(r.vmm_ms):.3f} | {_q(r.vmm_ms, 0.9):.3f} | {_median(r.vmm_go_ms):.3f} | "
            f"{_median(r.downtime_ms):.3f} | "
            f"{len(r.guest_ms)} | {_median(r.load):.1f} | {ok} |"
        )
    lines += [
        "",
        "Steps, microseconds, medians over handoffs (per-vCPU steps: the median vCPU, and "
        "`max` the slowest):",
        "",
        "| configuration | " + " | ".join(STEP_COLUMNS) + " |",
        "|---|" + "---|" * len(STEP_COLUMNS),
    ]
    for r in results:
        cells = [_median([s[c] for s in r.steps if c in s]) for c in STEP_COLUMNS]
        lines.append(f"| {r.config.label} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    by = {
        (r.config.memory, r.config.copy, r.config.populated): r
        for r in results
        if not r.config.tree
    }
    small, big = by.get(("256M", False, False)), by.get(("64G", False, False))
    if small and big and small.guest_ms and big.guest_ms:
        lines.append(
            f"\n64 GiB / 256 MiB (side by side): guest pause "
            f"{_median(big.guest_ms) / _median(small.guest_ms):.2f}x, VMM pause "
            f"{_median(big.vmm_ms) / _median(small.vmm_ms):.2f}x"
        )
    zero, copy = by.get(("2G", False, True)), by.get(("2G", True, True))
    if zero and copy and zero.guest_ms and copy.guest_ms:
        lines.append(
            f"copy / zero-copy at 2 GiB populated: guest pause "
            f"{_median(copy.guest_ms) / _median(zero.guest_ms):.0f}x, source downtime "
            f"{_median(copy.downtime_ms) / _median(zero.downtime_ms):.0f}x"
        )
    return "\n".join(lines)


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=20, help="handoffs per configuration (default 20)")
    p.add_argument("--only", default="1,4,256,memory,copy", help="configurations, by name")
    p.add_argument("--line-every", type=int, default=1, help="the witness's steps per line")
    p.add_argument("--idle-us-many", type=int, default=IDLE_US_MANY, help="256 vCPUs' idle")
    p.add_argument("--copy-n", type=int, default=5, help="handoffs of the copy configuration")
    p.add_argument(
        "--alternate",
        metavar="KEY=V1,V2",
        help="successive handoffs of the single-VMM configurations give their successors "
        "`--set KEY=V1`, `KEY=V2`, ... in turn, with a row each",
    )
    p.add_argument(
        "--versus-tree",
        metavar="DIR",
        help="also run each configuration on the handoff of another source tree (a checkout of "
        "an older commit), side by side with this one: one VMM each, handoffs in turn",
    )
    p.add_argument("--json", help="write the raw figures here")
    args = p.parse_args()
    # A SIGTERM (a timeout's, a CI's) ends the run like Ctrl-C, and `STARTED` are killed
    # then: left alone, a busy guest kept a CPU after the benchmark was gone.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _main(args)
    finally:
        for vmm in STARTED:
            vmm.kill_all()


def _main(args: argparse.Namespace) -> int:
    variants = []
    if args.alternate:
        key, _, values = args.alternate.partition("=")
        variants = [f"{key}={v}" for v in values.split(",")]
    only = set(args.only.split(","))
    for package in (handoff,):
        compileall.compile_dir(package.__path__[0], quiet=1)
    results: list[Result] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-kvm-") as d:
        work = Path(d)
        plan: list[tuple[str, Any]] = []
        if "1" in only:
            plan.append(("alone", Config("1", 1, "256M")))
        if "4" in only:
            plan.append(("alone", Config("4", 4, "256M")))
        if "256" in only:
            plan.append(("alone", Config("256", 256, "256M", idle_us=args.idle_us_many)))
        if "memory" in only:
            plan.append(("pair", [Config("memory", 4, "256M"), Config("memory", 4, "64G")]))
        if "copy" in only:
            plan.append(
                (
                    "pair",
                    [
                        Config("copy", 4, "2G", populated=True),
                        Config("copy", 4, "2G", populated=True, copy=True),
                    ],
                )
            )
        if args.versus_tree:
            tree = os.path.abspath(args.versus_tree)
            plan = [
                ("pair", [c2 for c in (what if how == "pair" else [what])
                          for c2 in (Config(**{**asdict(c), "tree": tree}), c)])
                for how, what in plan
            ]  # fmt: skip
        for i, (how, what) in enumerate(plan):
            if how == "alone":
                progress(f"[{i + 1}/{len(plan)}] {what.label}")
                results += trio.run(run_alone, what, variants, args.n, work, i, args.line_every)
            else:
                n = args.copy_n if any(c.copy for c in what) else args.n
                progress(f"[{i + 1}/{len(plan)}] " + " | ".join(c.label for c in what))
                results += trio.run(run_side_by_side, what, n, work, i, args.line_every)
    print(table(results))
    print(f"\n{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
