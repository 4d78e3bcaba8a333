"""Benchmark: cross-host SEV live migration between two kvmstub hosts on this machine.

    python tools/bench_migrate.py                 # every table below
    python tools/bench_migrate.py --quick         # smaller populated guest for throughput
    python tools/bench_migrate.py --only 4        # one table
    python tools/bench_migrate.py --only 4 --runs 15   # table 4 with 15 runs of each guest

Two `kvmstub serve` daemons (two SEV platforms under one simulated AMD root), the source VMM
and the target VMM (`--incoming tcp:127.0.0.3:PORT`) with mutual TLS, and QMP `migrate`:

1. downtime (source paused -> target Resumed, as the source measures it) for an idle-ish
   1 GiB SEV guest (the witness guest keeps writing its journal and flip pages);
2. convergence with a guest that dirties more (more vCPUs: each writes its journal page every
   step and converts a page every --flip-every steps): rounds, pages per round and the vCPU
   throttle of auto-converge per round; 32 vCPUs once more without auto-converge;
3. a 64 GiB sparse guest against a 1 GiB guest with the same populated pages: total time,
   pre-copy and stop-and-copy, in alternation;
4. private-page throughput through SEND/RECEIVE_UPDATE_DATA: end to end (a guest with that
   many populated private pages, `migrate` between the two VMMs over TLS), MB/s of the first
   pre-copy round and the CPU time per page of each of the four processes (where the time
   goes), and what part of it the running guest took; for two guests:
   busy (kvmstub's guest spins its vCPUs, taking every turn the daemon gives it, on the same
   two cores) and idle (it idles 50 ms after each line, as real guests halt; see GUESTS),
   --runs of each (3 by default) by turns, a summary table of every run and the lowest,
   median and highest rate of each guest first; then in this process,
   through `handoff.hv`, one page per request and in pipelined batches, with the time of
   each part.

Markdown on stdout, progress on stderr. Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from handoff.qmp.client import QMPClient
from handoff.testing import KvmstubDaemon, VmmProcess, start_kvmstub_daemon
from handoff.testing.tls import make_pki
from handoff.transport.tcp import TlsFiles

TARGET_HOST = "127.0.0.3"
POLL_S = 0.002


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((TARGET_HOST, 0))
        return int(s.getsockname()[1])


def tls(files: TlsFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


class Bench:
    def __init__(self, work: Path, flip_every: int = 10) -> None:
        self.work = work
        self.flip_every = flip_every  # table 4's guest: steps between two page conversions
        root = work / "amd-root"
        root.mkdir(mode=0o700)
        self.pki = make_pki(work / "pki", {"source": ["127.0.0.2"], "target": [TARGET_HOST]})
        self.daemons: list[KvmstubDaemon] = []
        for host in ("a", "b"):
            d = work / host
            d.mkdir(mode=0o700)
            (d / "state").mkdir(mode=0o700)
            self.daemons.append(
                start_kvmstub_daemon(d, "--state-dir", str(d / "state"), "--amd-root", str(root))
            )
        self.vmms: list[VmmProcess] = []
        self.n = 0

    def close(self) -> None:
        for vmm in self.vmms:
            vmm.kill_all()
        for d in self.daemons:
            d.stop()

    async def migrate(
        self,
        *,
        memory: str,
        vcpus: int = 2,
        flip_every: int = 10,
        extra: tuple[str, ...] = (),
        args: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        self.n += 1
        common = dict(
            name="vm", mode="sev", vcpus=vcpus, memory=memory, line_every=200,
            flip_every=flip_every,
        )  # fmt: skip
        src_dir, dst_dir = self.work / f"s{self.n}", self.work / f"t{self.n}"
        src_dir.mkdir()
        dst_dir.mkdir()
        source = VmmProcess(
            src_dir, self.daemons[0].socket, extra=(*tls(self.pki["source"]), *extra), **common
        )
        address = f"tcp:{TARGET_HOST}:{free_port()}"
        target = VmmProcess(
            dst_dir,
            self.daemons[1].socket,
            extra=("--incoming", address, *tls(self.pki["target"])),
            **common,
        )
        self.vmms += [source, target]
        try:
            source.start(timeout=120)
            await source.wait_lines(2)
            target.start(timeout=120)
            data = await _migrate(source.control, address, args)
            if data["status"] != "completed":
                raise RuntimeError(f"migration {data}\n{source.log()}\n{target.log()}")
            return data
        finally:
            source.kill_all()
            target.kill_all()


async def _migrate(
    control: str, address: str, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """QMP `migrate` to `address` (50 ms downtime limit, and `args`), then the MIGRATION
    event that ends it: its data (status completed, failed or cancelled)."""
    async with await QMPClient.connect(control) as qmp:
        await qmp.execute("migrate", {"uri": address, "downtime-limit": 50, **(args or {})})
        while True:
            data = dict((await qmp.next_event("MIGRATION")).data)
            if data.get("status") in ("completed", "failed", "cancelled"):
                return data


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _guest_steps(daemon: KvmstubDaemon) -> int:
    """Guest steps so far of every vCPU in the daemon (its only VM: the source guest)."""
    return sum(v["steps"] for vm in daemon.stats()["vms"] for v in vm["vcpus"])


async def _follow_steps(daemon: KvmstubDaemon, last: list[int]) -> None:
    """Keep `last[0]` at the guest's steps until cancelled: the source VM is gone from its
    daemon once the migration completes, so its last count is the last one read (every
    10 ms, a stats request each; the guest is paused for the stop-and-copy anyway)."""
    while True:
        with contextlib.suppress(OSError):
            last[0] = max(last[0], _guest_steps(daemon))
        await trio.sleep(0.01)


def _populate(pid: int, pages: int) -> None:
    """Write `pages` pages of the VMM's guest memory (slot 0, from 1 MiB up) through
    /proc/PID/fd, as a guest that used its memory would have: they are then populated and
    private (the memfd of an SEV guest holds what the memory controller stores)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        with contextlib.suppress(OSError):
            if "slot0" not in os.readlink(path):
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                for i in range(pages):
                    os.pwrite(fd, os.urandom(16) * 256, (256 + i) * 4096)
            finally:
                os.close(fd)
            return
    raise RuntimeError(f"no guest memory found in process {pid}")


#: Table 4's guests. Busy: kvmstub's witness guest as it runs by default, every vCPU taking
#: guest steps whenever the daemon gives it a turn (a line every 200 steps; a page
#: conversion every --flip-every steps). Idle: the same guest asking to idle 50 ms after each
#: line of 10 steps (`--idle-us`, as the real KVM's witness does), a conversion every 50
#: steps (the guest's default): a guest with a little work now and then. Each line costs
#: four exits (serial, doorbell out and in, the idle), a round trip between the VMM and the
#: daemon each, about as much CPU as its ten steps; with 10 ms the "idle" guest still took a
#: third of a core.
GUESTS: dict[str, dict[str, Any]] = {
    "busy": {"line_every": 200, "flip_every": None, "extra": ()},
    "idle": {"line_every": 10, "flip_every": 50, "extra": ("--idle-us", "50000")},
}


async def end_to_end(bench: Bench, pages: int, guest: str = "busy") -> dict[str, Any]:
    """`handoff migrate` of a guest with `pages` populated private pages (and its own), two
    VMMs over mutual TLS: the result, the wall time of the migration and the CPU seconds
    each of the four processes spent in it. `guest`: one of GUESTS. (Each host pinned to a
    CPU of its own, as two machines, measured no different from both sharing both CPUs,
    run by run: 2026-12-07, the note of the cross-host migration issue.)"""
    bench.n += 1
    kind = GUESTS[guest]
    common: dict[str, Any] = dict(
        name="vm", mode="sev", vcpus=2, memory=f"{pages * 4 // 1024 + 64}M",
        line_every=kind["line_every"], flip_every=kind["flip_every"] or bench.flip_every,
    )  # fmt: skip
    src_dir, dst_dir = bench.work / f"s{bench.n}", bench.work / f"t{bench.n}"
    src_dir.mkdir()
    dst_dir.mkdir()
    source = VmmProcess(
        src_dir,
        bench.daemons[0].socket,
        extra=(*kind["extra"], *tls(bench.pki["source"])),
        **common,
    )
    address = f"tcp:{TARGET_HOST}:{free_port()}"
    target = VmmProcess(
        dst_dir,
        bench.daemons[1].socket,
        extra=("--incoming", address, *kind["extra"], *tls(bench.pki["target"])),
        **common,
    )
    bench.vmms += [source, target]
    try:
        source.start(timeout=120)
        await source.wait_lines(2)
        assert source.process is not None
        _populate(source.process.pid, pages)
        target.start(timeout=120)
        assert target.process is not None
        procs = {
            "kvmstub A (source host: SEND_UPDATE_DATA, and the guest runs there)": (
                bench.daemons[0].process.pid
            ),
            "source VMM (batches, frames, TLS)": source.process.pid,
            "target VMM (TLS, frame checks, batches)": target.process.pid,
            "kvmstub B (target host: RECEIVE_UPDATE_DATA)": bench.daemons[1].process.pid,
        }
        # The guest runs on the source: what its host's processes spend on it alone.
        idle = {name: _cpu_seconds(pid) for name, pid in procs.items()}
        steps_idle = _guest_steps(bench.daemons[0])
        await trio.sleep(1.0)
        before = {name: _cpu_seconds(pid) for name, pid in procs.items()}
        steps_before = _guest_steps(bench.daemons[0])
        idle = {name: before[name] - idle[name] for name in procs}
        last_steps = [steps_before]
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_follow_steps, bench.daemons[0], last_steps)
            data = await _migrate(source.control, address)
            nursery.cancel_scope.cancel()
        wall = time.perf_counter() - t0
        cpu = {name: _cpu_seconds(pid) - before[name] for name, pid in procs.items()}
        steps = {"alone": steps_before - steps_idle, "migrating": last_steps[0] - steps_before}
        if data["status"] != "completed":
            raise RuntimeError(f"migration {data}\n{source.log()}\n{target.log()}")
        return {
            "result": data, "wall": wall, "cpu": cpu, "idle": idle, "steps": steps,
            "guest": guest,
        }  # fmt: skip
    finally:
        source.kill_all()
        target.kill_all()


async def throughput(bench: Bench, pages: int, runs: int = 3) -> str:
    """Private pages through SEND_UPDATE_DATA -> frame -> RECEIVE_UPDATE_DATA: end to end
    (two VMMs, TLS, the guest running on the source), with the CPU time of each process per
    page; then in this process through `handoff.hv` (both daemons do the firmware's crypto),
    one page per request as before and in batches, with the time of each part."""
    out = []
    results = [await end_to_end(bench, pages, guest) for _ in range(runs) for guest in GUESTS]
    summary: list[list[Any]] = []
    rates: dict[str, list[float]] = {guest: [] for guest in GUESTS}
    for run in results:
        r = run["result"]
        precopy_s = r["phases"]["precopy"] / 1e3
        sent = r["pages-per-round"][0]
        rows: list[list[Any]] = [
            [
                name,
                round(seconds, 2),
                round(seconds / r["pages"] * 1e6, 1),
                f"{run['idle'][name]:.0%}",
            ]
            for name, seconds in run["cpu"].items()
        ]
        total = sum(run["cpu"].values())
        idle = sum(run["idle"].values())
        rows.append(
            ["all four", round(total, 2), round(total / r["pages"] * 1e6, 1), f"{idle:.0%}"]
        )
        rate = sent * 4096 / 1e6 / precopy_s
        rates[run["guest"]].append(rate)
        summary.append(
            [
                run["guest"],
                f"{rate:.1f}",
                round(total / r["pages"] * 1e6, 1),
                round(_guest_step_cost(run) * run["steps"]["migrating"] / r["pages"] * 1e6, 1),
            ]
        )
        out.append(
            f"\n## Private-page throughput end to end: {rate:.1f} MB/s "
            f"(pre-copy round 1: {sent} pages in {precopy_s:.2f} s of {run['wall']:.2f} s; "
            f"two VMMs, mutual TLS, the {run['guest']} guest running)\n\n"
            + table(["process", "CPU seconds", "µs per page", "CPU before, guest alone"], rows)
            + "\n\n"
            + _guest_share(run, total, r["pages"])
        )
    out.insert(
        0,
        "\n## Private-page throughput end to end, run by run (details below)\n\n"
        + table(
            ["guest", "MB/s", "CPU µs a page, all four", "of which the guest"],
            summary,
        )
        + "\n\n"
        + table(
            ["guest", "runs", "MB/s lowest", "median", "highest"],
            [
                [guest, len(r), f"{min(r):.1f}", f"{statistics.median(r):.1f}", f"{max(r):.1f}"]
                for guest, r in rates.items()
            ],
        ),
    )
    out.append(await in_process(bench, pages))
    return "\n".join(out)


def _guest_share(run: dict[str, Any], total: float, pages: int) -> str:
    """The guest's part of the migration's CPU. Between its idles (the busy guest never
    idles) each vCPU in KVM_RUN runs guest steps on the daemon's CPU, taking turns with the
    daemon's requests (here the firmware's SEND_UPDATE_DATA), and its exits are served by the
    source VMM. So the guest competes with the migration for this host's two cores. Its cost
    per step is read in the second before the migration (the two source-side processes' CPU
    over the steps taken then) and applied to the steps it took during the migration."""
    steps = run["steps"]
    if not steps["alone"]:
        return "(the guest took no steps in the second before: its share is not known)"
    per_step = _guest_step_cost(run)
    guest = per_step * steps["migrating"]
    own = total - guest
    return (
        f"The guest took {steps['migrating']} steps during the migration "
        f"({steps['alone']} in the second before, alone, at {per_step * 1e6:.2f} µs of "
        f"CPU a step): about {guest:.2f} CPU seconds, {guest / pages * 1e6:.1f} µs a page. "
        f"The migration's own work: {own:.2f} CPU seconds, {own / pages * 1e6:.1f} µs a page."
    )


def _guest_step_cost(run: dict[str, Any]) -> float:
    """CPU seconds per guest step in the second before the migration: the source's kvmstub
    and VMM over the steps taken then (0 when it took none)."""
    steps = run["steps"]
    if not steps["alone"]:
        return 0.0
    source_side = [name for name in run["idle"] if name.startswith(("kvmstub A", "source VMM"))]
    return sum(run["idle"][name] for name in source_side) / steps["alone"]


async def in_process(bench: Bench, pages: int) -> str:
    import uuid as uuid_

    from handoff.hv import migration_vm, sev_platform
    from handoff.machine.config import GuestConfig, HostFlags
    from handoff.machine.vmm import Vmm
    from handoff.migration.remote_source import BATCH_PAGES, describe
    from handoff.protocol import remote

    cfg = GuestConfig(
        vcpus=1,
        memory=pages * 4096 + (1 << 20),
        mode="sev",
        policy=0,
        line_every=200,
        flip_every=50,
    )
    vmms = [
        Vmm(cfg, HostFlags(name=f"bench{i}", uuid=str(uuid_.uuid4()), kvm=str(d.socket)))
        for i, d in enumerate(bench.daemons)
    ]
    source, target = vmms
    try:
        await source.launch()
        for i in range(pages):  # populated, as a guest that used its memory
            os.pwrite(source.memfds[0], os.urandom(16) * 256, (256 + i) * 4096)
        await target.prepare_incoming_sev()
        assert source.vm and target.vm and source.hypervisor and target.hypervisor
        src, dst = migration_vm(source.vm, "kvmstub"), migration_vm(target.vm, "kvmstub")
        pdh, plat = await sev_platform(target.hypervisor).sev_pdh_cert_export()
        amd = await sev_platform(target.hypervisor).sev_amd_cert_chain()
        session, policy = await src.sev_send_start(pdh, plat, amd)
        source_pdh, _ = await sev_platform(source.hypervisor).sev_pdh_cert_export()
        await dst.sev_receive_start(source_pdh, session, policy)
        guest = describe(source)
        s_conn = remote.RemoteConnection(remote.Role.SOURCE, guest=guest)
        t_conn = remote.RemoteConnection(remote.Role.TARGET)
        hello = s_conn.make_hello(vm_name="b", vm_uuid=uuid_.uuid4())
        t_conn.receive(s_conn.send(hello))
        s_conn.receive(t_conn.send(t_conn.make_hello(vm_name="b", vm_uuid=uuid_.uuid4())))
        t_conn.receive(s_conn.send(guest))
        s_conn.receive(t_conn.send(remote.platform_chain(pdh, plat, amd)))
        start = remote.SendStart(session=session, source_pdh=source_pdh, policy=policy)
        t_conn.receive(s_conn.send(start))
        t_conn.receive(s_conn.send(remote.Round(round=1)))
        gpas = [(256 + i) * 4096 for i in range(pages)]
        single = gpas[: pages // 4]
        results = []

        # One page per request, as before batching.
        send_s = recv_s = frame_s = 0.0
        t0 = time.perf_counter()
        for gpa in single:
            a = time.perf_counter()
            header, data = await src.sev_send_update_data(gpa)
            b = time.perf_counter()
            message = t_conn.receive(s_conn.send(s_conn.encrypted_pages([gpa], [(header, data)])))
            c = time.perf_counter()
            assert isinstance(message, remote.EncryptedPages)
            await dst.sev_receive_update_data(gpa, message.headers, message.data)
            d = time.perf_counter()
            send_s, frame_s, recv_s = send_s + b - a, frame_s + c - b, recv_s + d - c
        results.append(("one page per request, serial", len(single), time.perf_counter() - t0,
                        send_s, frame_s, recv_s))  # fmt: skip

        # Batches, pipelined as the VMMs do: SEND of the next batch while the target
        # RECEIVEs the previous one.
        rest = gpas[len(single) :]
        busy = {"send": 0.0, "frame": 0.0, "recv": 0.0}
        ready_in, ready = trio.open_memory_channel[remote.EncryptedPages](2)

        async def fetch() -> None:
            async with ready_in:
                for i in range(0, len(rest), BATCH_PAGES):
                    batch = rest[i : i + BATCH_PAGES]
                    a = time.perf_counter()
                    packets = await src.sev_send_update_data_batch(batch)
                    b = time.perf_counter()
                    frame = s_conn.send(s_conn.encrypted_pages(batch, packets))
                    received = t_conn.receive(frame)
                    c = time.perf_counter()
                    busy["send"] += b - a
                    busy["frame"] += c - b
                    await ready_in.send(received)  # type: ignore[arg-type]

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            async for received in ready:
                a = time.perf_counter()
                await dst.sev_receive_update_data_batch(received.packets())
                busy["recv"] += time.perf_counter() - a
        wall = time.perf_counter() - t0
        how = f"batches of {BATCH_PAGES}, pipelined"
        results.append((how, len(rest), wall, busy["send"], busy["frame"], busy["recv"]))
    finally:
        for vmm in vmms:
            vmm.close()
    out = []
    for how, count, total, send_s, frame_s, recv_s in results:
        parts = [
            ("SEND_UPDATE_DATA (requests to kvmstub A and back)", send_s),
            ("protocol frames: encode, check, decode", frame_s),
            ("RECEIVE_UPDATE_DATA (requests to kvmstub B and back)", recv_s),
        ]
        rows: list[list[Any]] = [
            [name, round(t, 3), round(t / count * 1e6, 1), f"{t / total:.0%}"] for name, t in parts
        ]
        out.append(
            f"\n## Private pages in this process: {how}: {count} pages, "
            f"{count * 4096 / 1e6 / total:.1f} MB/s ({total:.2f} s; no TLS; the parts overlap "
            "when pipelined)\n\n" + table(["part", "seconds", "µs per page", "share of wall"], rows)
        )
    return "\n".join(out)


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


async def main(quick: bool, only: int | None = None, flip_every: int = 10, runs: int = 3) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        bench = Bench(Path(tmp), flip_every)
        try:
            if only == 4:
                pages = 4096 if quick else 16384
                say(f"4. private-page throughput: {pages} populated private pages")
                print(await throughput(bench, pages, runs))
                return
            say("1. downtime, idle 1 GiB SEV guest")
            rows = []
            for _ in range(5):
                r = await bench.migrate(memory="1G")
                rows.append(r)
            print("## Downtime: 1 GiB SEV guest (source paused to target Resumed)\n")
            print(
                table(
                    ["run", "downtime ms", "stop-and-copy ms", "commit ms", "rounds", "pages"],
                    [
                        [
                            i + 1,
                            r["downtime-ms"],
                            r["phases"].get("stop-and-copy"),
                            r["phases"].get("commit"),
                            r["rounds"],
                            r["pages"],
                        ]
                        for i, r in enumerate(rows)
                    ],
                )
            )
            say("2. convergence with more dirtying vCPUs")
            rows2 = []
            for vcpus, converge in ((2, True), (8, True), (32, True), (32, False)):
                r = await bench.migrate(
                    memory="256M", vcpus=vcpus, flip_every=2, args={"auto-converge": converge}
                )
                rows2.append(
                    [
                        vcpus,
                        "on" if converge else "off",
                        r["rounds"],
                        r["pages-per-round"],
                        r.get("throttle-per-round"),
                        r["downtime-ms"],
                        r["total-ms"],
                    ]
                )
            print("\n## Convergence (flip every 2 steps; each vCPU dirties 2 pages; 50 ms limit)\n")
            header = ["vCPUs", "auto-converge", "rounds", "pages per round", "throttle % per round"]
            print(table([*header, "downtime ms", "total ms"], rows2))

            say("3. 64 GiB sparse vs 1 GiB, same populated pages")
            rows3 = []
            for memory in ("1G", "64G") * 3:
                r = await bench.migrate(memory=memory)
                phases = r["phases"]
                rows3.append(
                    [
                        memory,
                        r["pages"],
                        r["total-ms"],
                        phases.get("precopy"),
                        phases.get("stop-and-copy"),
                    ]
                )
            print("\n## Cost follows populated memory, not size\n")
            header = ["memory", "pages sent", "total ms", "pre-copy ms", "stop-and-copy ms"]
            print(table(header, rows3))

            pages = 4096 if quick else 16384
            say(f"4. private-page throughput: {pages} populated private pages")
            print(await throughput(bench, pages, runs))
        finally:
            bench.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", type=int, choices=[4], help="only this table")
    parser.add_argument(
        "--flip-every",
        type=int,
        default=10,
        help="table 4's guest converts a page between shared and private every N steps, a "
        "hypercall exit each (default 10, five times the guest's default of 50)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="table 4: migrations of each guest, taken by turns (default 3)",
    )
    ns = parser.parse_args()
    if ns.runs < 1:
        parser.error("--runs takes a count of 1 or more")
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    started = time.perf_counter()
    trio.run(main, ns.quick, ns.only, ns.flip_every, ns.runs)
    say(f"done in {time.perf_counter() - started:.0f} s")
