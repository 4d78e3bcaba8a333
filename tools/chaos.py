"""Chaos: make handoffs fail at every step in every way, and prove the guest survives.

    python tools/chaos.py                  # the full matrix: 3 modes x every step x every action,
                                           # plus seeded SIGKILLs of either process
    python tools/chaos.py --quick          # a CI-sized subset (what `make test` runs)
    python tools/chaos.py --modes sev-es --kills 40 --seed 7 --jobs 2
    python tools/chaos.py --hypervisor kvm # the same for a plain guest on the real /dev/kvm
                                           # (--quick too); sev modes run on kvmstub only

Each case starts a VMM running a guest on a private kvmstub daemon, arms a fault (the hidden
`--x-fault ROLE:STEP:ACTION` flag on the successor, or QMP `x-set-fault` on the source) or a
SIGKILL of the source or the target at a seeded random moment, runs `upgrade`, and then judges:

- the guest runs in exactly one VMM: one process of the chain is alive, it answers on the
  control socket, and kvmstub shows exactly one live VM with vCPUs, created by that process
  (for sev and sev-es it holds the ASID and the firmware handle);
- the guest is whole: every vCPU's seq is contiguous across the handoff and goes on, no PANIC;
- nothing leaks: after the survivor quits, kvmstub has no VM, its ASIDs in use and its open
  fds are back to what they were before the case, no VMM process is left, and no socket file
  (control socket, handoff socket, the successor's private directory) remains.

Two cases kill the only process that holds the guest outside the handoff's critical section:
the source before it sent `Switchover` (it was running, or pausing, the guest itself) and the
target after it sent `Resumed` (the source has let go). No VMM can survive its own death there,
so the guest is gone by design; those cases are counted as `holder-died` and still must leave
nothing behind. A case counts as `lost` when the guest is gone, broken or doubled although a
process that could hold it survived: any such case fails the run.

On the real /dev/kvm (`--hypervisor kvm`) the kernel cannot be asked which VM runs the guest,
so the guest and the processes are the judges. It runs in exactly one VMM: one process of the
chain is alive and answers on the control socket, and the guest's serial lines go on with every
vCPU's seq contiguous and no PANIC (two VMMs running it at once, both appending to its serial
log, would show as repeated or interleaved seq). Nothing leaks: the survivor holds as many fds
as the old VMM held before the handoff (its own count, after a rollback), no process of the
chain is left once it quits, and no socket file or successor directory remains. The verdicts
are kvmstub's.

The recovery column is the path the survivor reports (query-handoff's `recovery`, or
`committed` for a completed handoff): refused (before the pause), rollback, reclaim, takeover.
Exit status: 0 only when no case was lost, leaked, or failed to reach its fault.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from handoff.migration.faults import ACTIONS, STEPS
from handoff.qmp.client import QMPClient, QMPError
from handoff.system.procs import pid_alive
from handoff.testing import VmmProcess
from kvmstub import client

MODES = ("plain", "sev", "sev-es")
HYPERVISORS = ("kvmstub", "kvm")
KVM_MODES = ("plain",)  # what the real /dev/kvm runs here: no SEV firmware
# The kvm guest's pace: a line every 20 steps and 2 ms idle after each, so lines come quickly
# while each VMM leaves the host's CPUs mostly to the other worker.
KVM_LINE_EVERY = 20
KVM_IDLE_US = 2000
# Upgrade started; Describe sent; the pause began. The "device" event is delivered as the
# blackout ends (App.events_held), so its kills hit the resume's tail and the old VMM's exit;
# the "active" window (Describe to the pause is milliseconds) covers the blackout itself.
KILL_ANCHORS = ("spawn", "active", "device")
# How long after each anchor a kill may come, in ms. kvmstub: the successor starts in about a
# second; Describe to the pause takes milliseconds; the blackout about one (more on a loaded
# host). kvm: the successor starts in one to two seconds; the target's preparation (a VM, its
# vCPUs, their CPUID, the memory slot) takes 20 to 50 ms before a blackout of a few.
KILL_WINDOWS_MS = {
    "kvmstub": {"spawn": 1200.0, "active": 15.0, "device": 4.0},
    "kvm": {"spawn": 2500.0, "active": 60.0, "device": 8.0},
}


@dataclass(frozen=True)
class Case:
    """One handoff with one thing going wrong."""

    mode: str
    role: str  # the process the fault or the kill hits: "source" or "target"
    step: str  # fault: the protocol step; kill: the anchor event the delay counts from
    action: str  # a faults.ACTIONS entry, or "sigkill"
    delay_ms: float = 0.0  # kills only
    hypervisor: str = "kvmstub"  # or "kvm": the real /dev/kvm (plain mode only)

    @property
    def guest(self) -> str:
        """The mode, and the kernel when it is not kvmstub: "plain", "plain@kvm"."""
        return self.mode if self.hypervisor == "kvmstub" else f"{self.mode}@{self.hypervisor}"

    @property
    def label(self) -> str:
        if self.action == "sigkill":
            return f"{self.guest} kill {self.role} {self.step}+{self.delay_ms:.0f}ms"
        return f"{self.guest} {self.role}:{self.step}:{self.action}"

    @property
    def spec(self) -> str:
        return f"{self.role}:{self.step}:{self.action}"

    def holder_dies_by_design(self) -> bool:
        """A fault that kills or freezes the only holder of the guest outside the handoff's
        critical section (see the module docstring)."""
        if self.action == "sigkill":
            return False  # decided from what the survivor saw (see judge)
        dies = self.action in ("crash", "exit")
        if self.role == "source":
            return dies and self.step in ("hello", "describe", "prepared", "paused")
        return self.step == "resumed" and self.action in ("crash", "exit", "hang")


@dataclass
class Outcome:
    case: Case
    verdict: str = "lost"  # survived | holder-died | lost | not-reached
    recovery: str = ""
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    max_gap_us: int | None = None
    seconds: float = 0.0
    attempts: int = 1


def fault_cases(modes: Sequence[str], hypervisor: str = "kvmstub") -> list[Case]:
    return [
        Case(mode, role, step, action, hypervisor=hypervisor)
        for mode in modes
        for role in ("source", "target")
        for step in STEPS[role]
        for action in ACTIONS
    ]


def kill_cases(
    modes: Sequence[str], count: int, seed: int, hypervisor: str = "kvmstub"
) -> list[Case]:
    """`count` SIGKILLs per mode, alternating source and target, at seeded moments after one
    of the anchors (the successor's spawn: it may still be starting; Describe sent: the target
    is preparing; the pause: the blackout)."""
    rng = random.Random(seed)
    windows = KILL_WINDOWS_MS[hypervisor]
    out = []
    for mode in modes:
        for i in range(count):
            anchor = KILL_ANCHORS[rng.randrange(len(KILL_ANCHORS))]
            delay = round(rng.uniform(0, windows[anchor]), 1)
            role = ("source", "target")[i % 2]
            out.append(Case(mode, role, anchor, "sigkill", delay, hypervisor))
    return out


def quick_cases(seed: int) -> list[Case]:
    """Every action at least once, every step of both roles at least once, all three modes,
    and two kills: a subset sized for CI."""
    picks = [
        ("plain", "target", "hello", "garbage"),
        ("sev", "target", "describe", "crash"),
        ("sev-es", "target", "prepared", "extra-fds"),
        ("sev-es", "target", "switchover", "exit"),
        ("sev", "target", "moved", "hang"),
        ("sev-es", "target", "commit", "crash"),
        ("plain", "target", "resumed", "close"),
        ("plain", "source", "hello", "truncated"),
        ("sev-es", "source", "describe", "close"),
        ("sev", "source", "prepared", "garbage"),
        ("sev-es", "source", "paused", "hang"),
        ("sev-es", "source", "switchover", "crash"),
        ("plain", "source", "moved", "extra-fds"),
        ("sev", "source", "commit", "exit"),
    ]
    cases = [Case(*p) for p in picks]
    rng = random.Random(seed)
    cases.append(Case("sev-es", "source", "device", "sigkill", round(rng.uniform(0, 4), 1)))
    cases.append(Case("sev", "target", "device", "sigkill", round(rng.uniform(0, 4), 1)))
    return cases


def kvm_quick_cases(seed: int) -> list[Case]:
    """A CI-sized subset for a plain guest on the real /dev/kvm: every step of both roles but
    the source's first two (refused alike on both kernels): the windows where the rules promise
    survival (the target failing before Resumed, the source after Switchover), one by-design
    loss (the source dying in its pause), and a kill of each process in the blackout's tail.
    No hang: each costs a --handoff-timeout, and tests/handoff/test_kvm.py hangs the target
    before and after Commit."""
    picks = [
        ("target", "hello", "garbage"),
        ("target", "describe", "crash"),
        ("target", "prepared", "extra-fds"),
        ("target", "switchover", "exit"),
        ("target", "moved", "truncated"),
        ("target", "commit", "crash"),
        ("target", "resumed", "close"),
        ("source", "prepared", "garbage"),
        ("source", "paused", "crash"),
        ("source", "switchover", "crash"),
        ("source", "moved", "exit"),
        ("source", "commit", "close"),
    ]
    cases = [Case("plain", *p, hypervisor="kvm") for p in picks]
    rng = random.Random(seed)
    for role in ("source", "target"):
        cases.append(Case("plain", role, "device", "sigkill", round(rng.uniform(0, 4), 1), "kvm"))
    return cases


# ------------------------------------------------------------------------------------ kvmstub


class Daemon:
    """A private `kvmstub serve` for one worker."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "kvm.sock"
        self.log = open(directory / "kvmstub.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", str(self.socket)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("kvmstub: ready"):
            raise RuntimeError(f"kvmstub did not start: {line!r}")

    def stats(self) -> dict[str, Any]:
        return client.read_stats(self.socket)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def asids_used(stats: dict[str, Any]) -> int:
    return sum(int(v["used"]) for v in stats["asids"].values())


def live_guest_vms(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """VMs that could run the guest: not dead, with vCPUs."""
    return [vm for vm in stats["vms"] if not vm["dead"] and vm["vcpus"]]


# ------------------------------------------------------------------------------------ one case


@dataclass
class Before:
    """What a case's leak checks compare with, read before its handoff."""

    kvmstub_fds: int = 0
    asids: int = 0
    vmm_fds: int = 0  # the old VMM's, on the real /dev/kvm


class Runner:
    """Runs cases one after another: on one kvmstub daemon, or on the real /dev/kvm (no daemon:
    a case of `hypervisor` "kvm" only)."""

    def __init__(self, workdir: Path, timeout: float, hypervisor: str = "kvmstub") -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.hypervisor = hypervisor
        self.daemon = Daemon(workdir) if hypervisor == "kvmstub" else None
        self.count = 0

    def restart_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = Daemon(self.workdir)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    async def run(self, case: Case) -> Outcome:
        """Run one case; again (twice at most) when it never got to its fault or its kill
        because an earlier step timed out (a loaded host, not a verdict), with a longer
        timeout. What stopped an attempt short is said on stderr."""
        base = self.timeout
        try:
            for attempt in range(3):
                self.timeout = base * (1 + attempt)  # a slower host gets longer
                outcome = await self._run_once(case)
                outcome.attempts = attempt + 1
                if outcome.verdict != "not-reached":
                    break
                if attempt < 2:
                    print(f"  again ({outcome.problems[0]}): {case.label}", file=sys.stderr)
        finally:
            self.timeout = base
        return outcome

    async def _run_once(self, case: Case) -> Outcome:
        self.count += 1
        kind = "c" if self.daemon is not None else "k"  # one worker may run both kinds
        name = f"{kind}{os.getpid()}x{self.count}"
        out = Outcome(case)
        t0 = time.monotonic()
        casedir = self.workdir / name
        casedir.mkdir()
        if case.hypervisor != self.hypervisor:
            raise ValueError(f"{case.label}: this runner runs {self.hypervisor} cases")
        if self.daemon is not None:
            vmm = VmmProcess(
                casedir, self.daemon.socket, name=name, mode=case.mode, vcpus=2, memory="8M",
                line_every=60, flip_every=15, extra=["--handoff-timeout", f"{self.timeout:g}"],
            )  # fmt: skip
        else:  # the real /dev/kvm: the kvmstub socket argument goes unused
            vmm = VmmProcess(
                casedir, casedir / "no-kvmstub.sock", name=name, mode=case.mode, vcpus=2,
                memory="8M", line_every=KVM_LINE_EVERY, flip_every=15,
                extra=["--hypervisor", "kvm", "--idle-us", str(KVM_IDLE_US),
                       "--handoff-timeout", f"{self.timeout:g}"],
            )  # fmt: skip
        try:
            await self._run(case, vmm, out)
        except Exception as exc:  # the harness itself broke: count it, show it
            out.verdict = "lost"
            out.problems.append(f"harness: {exc!r}\n{traceback.format_exc(limit=3)}")
        finally:
            vmm.kill_all()
            self._reap(vmm)
        out.seconds = round(time.monotonic() - t0, 2)
        if out.verdict != "lost" and not out.leaks:
            shutil.rmtree(casedir, ignore_errors=True)
        else:
            out.problems.append(f"logs kept in {casedir}")
        return out

    async def _run(self, case: Case, vmm: VmmProcess, out: Outcome) -> None:
        base = Before()
        if self.daemon is not None:
            stats0 = self.daemon.stats()
            if stats0["vms"]:
                self.restart_daemon()  # an earlier case leaked; start this one clean
                stats0 = self.daemon.stats()
            base.kvmstub_fds = await self._quiet_fds()
            base.asids = asids_used(stats0)

        await trio.to_thread.run_sync(vmm.start)
        await vmm.wait_lines(more=2)
        source_pid = await vmm.pid()
        if self.daemon is None:
            base.vmm_fds = await _quiet_process_fds(source_pid)
        sets: list[str] = []
        if case.action != "sigkill":
            if case.role == "source":
                await vmm.qmp("x-set-fault", spec=case.spec)
            else:
                sets.append(f"x-fault={case.spec}")
        before = vmm.report().last_seq()

        events = await self._upgrade(case, vmm, sets, source_pid)
        final = next((e for e in reversed(events) if e.get("status") in _FINAL), {})

        if case.holder_dies_by_design():
            # Wait for the peer to finish (the target gives up on a dead source; the source
            # exits after Resumed); a holder that hangs is stuck for good: end it.
            with trio.move_on_after(self.timeout * 8 + 15):
                while pid_alive(source_pid) or (case.action != "hang" and vmm.alive_pids()):
                    await trio.sleep(0.05)
            vmm.kill_all()
            with trio.move_on_after(10):
                while vmm.alive_pids():
                    await trio.sleep(0.02)
            alive = vmm.alive_pids()
        else:
            alive = await self._settle(vmm)
        log = vmm.log_path.read_text(errors="replace")
        if case.action != "sigkill" and f"fault injection: {case.role} at {case.step}" not in log:
            out.verdict = "not-reached"
            out.problems.append(f"the fault never fired; handoff ended {final}")
        if case.action == "sigkill" and not _kill_came(case, events):
            out.verdict = "not-reached"
            out.problems.append(
                f"the kill never came (no {case.step} event); handoff ended {final}"
            )

        if len(alive) > 1:
            out.problems.append(f"{len(alive)} VMM processes alive: {alive}")
        elif len(alive) == 1:
            await self._judge_survivor(vmm, alive[0], before, base, out)
        else:
            self._judge_no_survivor(case, log, final, out)

        await self._judge_cleanup(vmm, base, out)

    async def _upgrade(
        self, case: Case, vmm: VmmProcess, sets: list[str], source_pid: int
    ) -> list[dict[str, Any]]:
        """Run `upgrade` (and the kill, if any); return the HANDOFF events the source sent."""
        events: list[dict[str, Any]] = []
        with trio.move_on_after(self.timeout * 8 + 20):  # a hung source answers no more
            try:
                async with await QMPClient.connect(vmm.control) as qmp:
                    started = await qmp.execute("upgrade", {"set": sets})
                    target_pid = int(started["pid"])
                    vmm.pids.append(target_pid)
                    victim = source_pid if case.role == "source" else target_pid
                    async with trio.open_nursery() as nursery:
                        if case.action == "sigkill" and case.step == "spawn":
                            nursery.start_soon(_kill_after, victim, case.delay_ms)
                        while True:
                            try:
                                data = dict((await qmp.next_event("HANDOFF")).data)
                            except QMPError:
                                break  # the source died (a crash, a kill) and the connection
                            events.append(data)
                            if case.action == "sigkill" and data.get("status") == case.step:
                                nursery.start_soon(_kill_after, victim, case.delay_ms)
                            if data.get("status") in _FINAL:
                                break
            except QMPError:
                pass  # the source died before it answered
        return events

    async def _settle(self, vmm: VmmProcess) -> list[int]:
        """Let the failure rules run their course: until no process is left, or one that runs
        the guest and has finished its handoff (a target still waiting for a source that
        died, or a source on its way out after a completed handoff, is not settled)."""
        with trio.move_on_after(self.timeout * 8 + 15):
            while True:
                alive = vmm.alive_pids()
                if not alive:
                    return alive
                if len(alive) == 1:
                    with contextlib.suppress(QMPError, trio.TooSlowError, OSError):
                        with trio.fail_after(2):
                            status = await vmm.qmp("query-status")
                            record = await vmm.qmp("query-handoff")
                        if (
                            status["pid"] == alive[0]
                            and status["status"] == "running"
                            and record["status"] in _FINAL
                        ):
                            return alive
                await trio.sleep(0.05)
        return vmm.alive_pids()

    async def _judge_survivor(
        self, vmm: VmmProcess, pid: int, before: dict[int, int], base: Before, out: Outcome
    ) -> None:
        try:
            with trio.fail_after(10):
                status = await vmm.qmp("query-status")
                record = await vmm.qmp("query-handoff")
        except (QMPError, trio.TooSlowError) as exc:
            out.problems.append(f"the surviving VMM {pid} does not answer: {exc}")
            return
        if status["pid"] != pid:
            out.problems.append(f"control socket answered by {status['pid']}, alive is {pid}")
        if status["status"] != "running":
            out.problems.append(f"surviving VMM is {status['status']}, not running")
        out.recovery = _recovery_name(record)
        report = await vmm.wait_lines(more=3, timeout=15)
        out.problems += report.problems(vmm.vcpus)
        last = report.last_seq()
        if any(last.get(v, -1) < before.get(v, -1) + 3 for v in range(vmm.vcpus)):
            out.problems.append(f"the guest does not go on: seqs {before} then {last}")
        out.max_gap_us = report.max_gap_after(before, lines=3)
        if self.daemon is not None:
            stats = self.daemon.stats()
            live = live_guest_vms(stats)
            if len(live) != 1:
                out.problems.append(f"{len(live)} live VMs with vCPUs in kvmstub: {live}")
            elif live[0]["creator"] != pid:
                out.problems.append(f"the live VM was created by {live[0]['creator']}, not {pid}")
            elif vmm.mode != "plain" and not (live[0]["asid"] and live[0]["handle"]):
                out.problems.append(f"the live VM holds no SEV context: {live[0]}")
        else:
            # No kernel to ask: the serial log is the witness. Two VMMs writing it at once
            # would interleave lines as well as repeat seqs.
            out.problems += [f"not a serial line: {line!r}" for line in report.garbage[:3]]
            fds = await _quiet_process_fds(pid, expect=base.vmm_fds)
            if fds != base.vmm_fds:
                out.leaks.append(
                    f"the surviving VMM {pid} holds {fds} fds, the old one held {base.vmm_fds} "
                    f"before the handoff: {_fd_names(pid)}"
                )
        if not out.problems:
            out.verdict = "survived"

    def _judge_no_survivor(self, case: Case, log: str, final: dict[str, Any], out: Outcome) -> None:
        if self.daemon is not None:
            deadline = time.monotonic() + 5
            while live_guest_vms(stats := self.daemon.stats()) and time.monotonic() < deadline:
                time.sleep(0.02)
            if live_guest_vms(stats):
                out.problems.append(f"no VMM alive but kvmstub has live VMs: {stats['vms']}")
                return
        if case.action != "sigkill":
            by_design = case.holder_dies_by_design()
        elif case.role == "source":
            # The target never took the source's VM over (it had not received it, or had not
            # even been reached): the source was the only holder.
            by_design = "taking over" not in log
        else:
            # The source saw Resumed: the target was the only holder when it died.
            by_design = final.get("status") == "completed"
        if by_design:
            out.verdict = "holder-died"
            out.recovery = "-"
        else:
            out.problems.append(f"no VMM holds the guest; the handoff ended {final}")

    async def _judge_cleanup(self, vmm: VmmProcess, base: Before, out: Outcome) -> None:
        with trio.move_on_after(15):
            await vmm.quit()
        with trio.move_on_after(10):
            while vmm.alive_pids():
                await trio.sleep(0.05)
        if vmm.alive_pids():
            out.leaks.append(f"VMM processes left: {vmm.alive_pids()}")
            vmm.kill_all()
        if self.daemon is not None:
            await self._judge_kvmstub_cleanup(base, out)
        sockets = [str(p) for p in vmm.dir.rglob("*") if p.is_socket()]
        if out.verdict == "holder-died":
            # A VMM killed while it held the guest leaves its control socket: nobody is left to
            # remove it (the next `handoff run` on that path replaces a socket nobody answers).
            sockets = [s for s in sockets if s != vmm.control]
        sockets += glob.glob(os.path.join(tempfile.gettempdir(), f"handoff-{vmm.name}-*"))
        if sockets:
            out.leaks.append(f"left in the file system: {sockets}")

    async def _judge_kvmstub_cleanup(self, base: Before, out: Outcome) -> None:
        assert self.daemon is not None
        with trio.move_on_after(10):
            while self.daemon.stats()["vms"]:
                await trio.sleep(0.05)
        stats = self.daemon.stats()
        if stats["vms"]:
            out.leaks.append(f"kvmstub still has VMs: {stats['vms']}")
        if asids_used(stats) != base.asids:
            out.leaks.append(f"ASIDs in use {asids_used(stats)}, were {base.asids}")
        fds = await self._quiet_fds(expect=base.kvmstub_fds)
        if fds != base.kvmstub_fds:
            out.leaks.append(f"kvmstub holds {fds} fds, held {base.kvmstub_fds} before")

    async def _quiet_fds(self, expect: int | None = None) -> int:
        """The daemon's fd count once it stops changing (closes are processed lazily)."""
        assert self.daemon is not None
        return await _quiet_process_fds(self.daemon.process.pid, expect)

    def _reap(self, vmm: VmmProcess) -> None:
        for pid in vmm.pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        for path in glob.glob(os.path.join(tempfile.gettempdir(), f"handoff-{vmm.name}-*")):
            shutil.rmtree(path, ignore_errors=True)


_FINAL = ("completed", "failed")


def _recovery_name(record: dict[str, Any]) -> str:
    if record.get("role") == "target":
        return record.get("recovery") or "committed"
    recovery = record.get("recovery") or ""
    return {"none": "refused", "": "?"}.get(recovery, recovery)


def _process_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1  # gone


async def _quiet_process_fds(pid: int, expect: int | None = None) -> int:
    """How many fds `pid` holds once the count stops changing (or is `expect`): a process
    closes what a handoff left it a moment later, and a client of its control socket (ours)
    comes and goes."""
    last, same = -1, 0
    with trio.move_on_after(5):
        while same < 5:
            now = _process_fds(pid)
            if expect is not None and now == expect:
                return now
            same = same + 1 if now == last else 0
            last = now
            await trio.sleep(0.02)
    return _process_fds(pid)


def _fd_names(pid: int) -> list[str]:
    """What `pid`'s fds are (for the report of a leak)."""
    out = []
    with contextlib.suppress(OSError):
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                out.append(f"{fd}={os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return out


def _kill_came(case: Case, events: Sequence[dict[str, Any]]) -> bool:
    """Whether a kill case's anchor came (a kill after the spawn always comes): a handoff that
    failed on its own before it, on a loaded host, tested nothing."""
    return case.step == "spawn" or any(e.get("status") == case.step for e in events)


async def _kill_after(pid: int, delay_ms: float) -> None:
    await trio.sleep(delay_ms / 1000)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ running


def _worker(cases: list[Case], timeout: float, workdir: str, verbose: bool) -> list[Outcome]:
    os.environ["TMPDIR"] = workdir  # successors' private directories land here, checked per case
    tempfile.tempdir = None
    directory = Path(tempfile.mkdtemp(prefix="w", dir=workdir))
    runners: dict[str, Runner] = {}
    results: list[Outcome] = []

    async def main() -> None:
        for case in cases:
            if case.hypervisor not in runners:
                runners[case.hypervisor] = Runner(directory, timeout, case.hypervisor)
            outcome = await runners[case.hypervisor].run(case)
            results.append(outcome)
            if verbose or outcome.verdict in ("lost", "not-reached") or outcome.leaks:
                print(_line(outcome), file=sys.stderr, flush=True)

    try:
        trio.run(main)
    finally:
        for runner in runners.values():
            runner.stop()
    return results


def _line(o: Outcome) -> str:
    extra = "; ".join(o.problems + o.leaks)
    return f"  {o.verdict:11s} {o.recovery:9s} {o.seconds:6.1f}s  {o.case.label}  {extra}"


def run_cases(
    cases: Sequence[Case], *, jobs: int = 2, timeout: float = 5.0, verbose: bool = False
) -> list[Outcome]:
    """Run the cases on `jobs` workers (each a process with its own kvmstub daemon, for the
    cases on kvmstub)."""
    workdir = tempfile.mkdtemp(prefix="chaos-")
    shards: list[list[Case]] = [list(cases[i::jobs]) for i in range(jobs)]
    try:
        if jobs == 1:
            return _worker(shards[0], timeout, workdir, verbose)
        with ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(_worker, s, timeout, workdir, verbose) for s in shards if s]
            return [o for f in futures for o in f.result()]
    finally:
        if not any(Path(workdir).rglob("*-vmm.log")):
            shutil.rmtree(workdir, ignore_errors=True)


def table(outcomes: Sequence[Outcome]) -> str:
    """Cases, survived, holder-died, lost (and leaks), and the recovery paths, per mode and
    role of the fault."""
    paths = ["committed", "refused", "rollback", "reclaim", "takeover"]
    head = ["mode", "hits", "cases", "survived", "holder-died", "lost", "leaks", *paths]
    rows = []
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        kind = f"{o.case.role} kill" if o.case.action == "sigkill" else f"{o.case.role} fault"
        groups.setdefault((o.case.guest, kind), []).append(o)
    for key in [*sorted(groups), ("all", "")]:
        group = list(outcomes) if key[0] == "all" else groups[key]
        verdicts = Counter(o.verdict for o in group)
        recov = Counter(o.recovery for o in group if o.verdict == "survived")
        rows.append(
            [
                key[0],
                key[1],
                str(len(group)),
                str(verdicts["survived"]),
                str(verdicts["holder-died"]),
                str(verdicts["lost"] + verdicts["not-reached"]),
                str(sum(1 for o in group if o.leaks)),
                *(str(recov[p]) for p in paths),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def passed(outcomes: Sequence[Outcome]) -> bool:
    return all(o.verdict in ("survived", "holder-died") and not o.leaks for o in outcomes)


def _select(args: argparse.Namespace) -> Iterator[Case]:
    if args.quick:
        yield from (
            kvm_quick_cases(args.seed) if args.hypervisor == "kvm" else quick_cases(args.seed)
        )
        return
    yield from fault_cases(args.modes, args.hypervisor)
    yield from kill_cases(args.modes, args.kills, args.seed, args.hypervisor)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=None, help="default: every mode there"
    )
    parser.add_argument(
        "--hypervisor",
        choices=HYPERVISORS,
        default="kvmstub",
        help="the kernel the guests run on: kvmstub (default), or kvm, the real /dev/kvm "
        "(plain guests only)",
    )
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL cases per mode")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--jobs", type=int, default=2, help="cases run in parallel")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="--handoff-timeout of the VMMs (s)"
    )
    parser.add_argument("--only", default="", help="run only cases whose label contains this")
    parser.add_argument("--json", default="", help="write every outcome to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    allowed = KVM_MODES if args.hypervisor == "kvm" else MODES
    if args.modes is None:
        args.modes = list(allowed)
    elif not set(args.modes) <= set(allowed):
        parser.error(
            f"--hypervisor {args.hypervisor} runs {', '.join(allowed)} guests only "
            "(sev and sev-es need kvmstub's SEV firmware)"
        )
    if args.hypervisor == "kvm":
        from handoff.hv.backends import kvm_problem

        problem = kvm_problem()
        if problem is not None:
            parser.error(f"--hypervisor kvm: {problem}")
    cases = [c for c in _select(args) if args.only in c.label]
    print(f"chaos: {len(cases)} cases on {args.jobs} workers", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    outcomes = run_cases(cases, jobs=args.jobs, timeout=args.timeout, verbose=args.verbose)
    print(table(outcomes))
    bad = [o for o in outcomes if o.verdict in ("lost", "not-reached") or o.leaks]
    for o in bad:
        print(_line(o))
    print(
        f"\n{len(outcomes)} cases in {time.monotonic() - t0:.0f} s: "
        f"{'PASS' if passed(outcomes) else 'FAIL'} ({len(bad)} lost, leaked or not reached)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0 if passed(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
