"""`handoff demo`: the whole story on embedded defaults, verified at the end.

In a temporary directory: start kvmstub, start an SEV-ES VMM (4 vCPUs, 4 GiB), let the guest
run, upgrade three times (one changing log level and serial log path), roll back once to the
first program, and try one handoff that must be refused as incompatible. Then check, from the
guest's own serial lines and from kvmstub: every vCPU's seq contiguous, no PANIC, the same memfd
inode in every VMM (zero copy), ASIDs in use unchanged, no process or socket left behind.

Then across two hosts: two kvmstub daemons (each its own SEV platform under one simulated AMD
root), an SEV guest on host A, a target VMM on host B (`--incoming tcp:127.0.0.3:PORT`, mutual
TLS with certificates from a throwaway CA), `handoff migrate`; verified from both hosts' serial
logs (seq continuous, no PANIC) and from both daemons (one running copy, nothing left on A).

Then, where /dev/kvm works, the same with a real x86 guest on the real KVM (2 vCPUs, 256 MiB):
upgrades, a flag change, a rollback to a release that speaks only protocol 1 (refused before the
pause: a real vCPU's state needs protocol 3), a rollback to the first program, an incompatible
successor; verified from the guest's own lines. Where /dev/kvm does not work, one line says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import trio

from handoff.hv.backends import kvm_problem
from handoff.hv.kvmstub import read_stats
from handoff.process.ops import format_phases, query, upgrade
from handoff.seriallog import read_logs
from handoff.system.procs import pid_alive
from handoff.system.sched import place_apart

RELEASE_1 = [sys.executable, "-m", "handoff.cli"]  # plays the older release (protocol 1)
POLL_US = 1000  # kvmstub's halt polling and the VMMs' blackout polling, CPUs apart


def _release_2() -> list[str]:
    script = shutil.which("handoff")
    return [script] if script else [sys.executable, "-m", "handoff"]


def say(text: str = "") -> None:
    print(text, flush=True)


class _Checks:
    """A demo's checks: each printed as it is made, the failed ones kept for the verdict."""

    failures: list[str]

    def check(self, what: str, ok: bool, detail: str) -> None:
        say(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")
        if not ok:
            self.failures.append(f"{what}: {detail}")

    def verdict(self, part: str, ok_text: str) -> int:
        """DEMO OK, or DEMO FAILED with every failed check; the exit status."""
        if self.failures:
            say(f"\nDEMO FAILED{part}:")
            for f in self.failures:
                say(f"  - {f}")
            return 1
        say(f"\nDEMO OK{part}: {ok_text}")
        return 0


class Demo(_Checks):
    def __init__(self, workdir: str, mode: str, vcpus: int, memory: int) -> None:
        self.dir = workdir
        self.mode = mode
        self.vcpus = vcpus
        self.memory = memory
        self.kvm_sock = os.path.join(workdir, "kvm.sock")
        self.control = os.path.join(workdir, "run", "demo.qmp")
        self.serial_logs = [os.path.join(workdir, "serial-1.log")]
        self.vmm_log = os.path.join(workdir, "vmm.log")
        self.kvmstub: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.inodes: list[list[int]] = []
        self.pauses: list[tuple[str, int | None, float]] = []
        self.failures: list[str] = []
        # With two CPUs or more, run as contrib/systemd advises for a small host: kvmstub and
        # the VMMs on CPUs apart, kvmstub halt polling, a new VMM polling for the MOVE.
        self.apart = len(os.sched_getaffinity(0)) > 1
        self.poll = ["--blackout-poll-us", str(POLL_US)] if self.apart else []

    # ------------------------------------------------------------- processes
    def start_kvmstub(self) -> None:
        self.kvmstub = subprocess.Popen(
            [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", self.kvm_sock]
            + (["--halt-poll-us", str(POLL_US)] if self.apart else []),
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.dir, "kvmstub.log"), "ab"),  # noqa: SIM115
            start_new_session=True,  # its own CPU share, as a system service has
        )
        assert self.kvmstub.stdout is not None
        line = self.kvmstub.stdout.readline().decode().strip()
        if "ready" not in line:
            raise RuntimeError(f"kvmstub did not start: {line!r}")
        say(f"  {line}")
        placement = place_apart(self.kvmstub.pid) if self.apart else None
        if placement:
            say(f"  {placement}; kvmstub halt polling and the VMMs' blackout polling {POLL_US} µs")

    def start_vmm(self) -> int:
        argv = [
            *RELEASE_1, "run", "--name", "demo", "--mode", self.mode,
            "--vcpus", str(self.vcpus), "--memory", str(self.memory),
            "--kvm", self.kvm_sock, "--control", self.control,
            "--serial-log", self.serial_logs[0], "--max-protocol", "1", *self.poll,
        ]  # fmt: skip
        proc = self.spawn_vmm(argv)
        self.first = proc
        return proc.pid

    def say_pauses(self, kind: str) -> None:
        say(f"\n== guest-visible pause per handoff ({kind}from the guest's gap_us)")
        for title, pause, downtime in self.pauses:
            p = "?" if pause is None else f"{pause / 1000:.3f} ms"
            say(f"  {title:55s} {p:>10s}   (source-side {downtime:.3f} ms)")

    def spawn_vmm(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start the first VMM (its output to `vmm_log`) and wait for its control socket."""
        log = open(self.vmm_log, "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the VMM did not start; see {self.vmm_log}")
            time.sleep(0.02)
        return proc

    # ------------------------------------------------------------- steps
    async def stats(self) -> dict[str, Any]:
        return await trio.to_thread.run_sync(read_stats, self.kvm_sock)

    async def wait_lines(self, before: dict[int, int], more: int = 3, timeout: float = 20) -> None:
        with trio.move_on_after(timeout):
            while True:
                last = read_logs(self.serial_logs).last_seq()
                if len(last) >= self.vcpus and all(
                    last.get(v, -1) >= before.get(v, -1) + more for v in range(self.vcpus)
                ):
                    return
                await trio.sleep(0.02)

    async def handoff(
        self,
        title: str,
        sets: Sequence[str] = (),
        exec_argv: Sequence[str] | None = None,
        expect_ok: bool = True,
    ) -> None:
        say(f"\n== {title}")
        before = read_logs(self.serial_logs).last_seq()
        (status,) = await query(self.control, "query-status")
        old_pid = status["pid"]
        data = await upgrade(self.control, sets, exec_argv, timeout=60)
        ok = data.get("status") == "completed"
        if not ok:
            say(f"  refused: {data.get('error-desc')}")
            say(
                f"  recovery: {data.get('recovery') or 'none'}; guest keeps running in pid "
                f"{old_pid}"
            )
            if expect_ok:
                self.failures.append(f"{title}: failed: {data.get('error-desc')}")
            await self.wait_lines(before)
            (status,) = await query(self.control, "query-status")
            if status["pid"] != old_pid or status["status"] != "running":
                self.failures.append(f"{title}: guest not running in the old VMM afterwards")
            return
        if not expect_ok:
            self.failures.append(f"{title}: was expected to be refused but completed")
        new_pid = int(data.get("successor-pid", 0))
        say(f"  pid {old_pid} -> {new_pid}, protocol {data.get('protocol')}")
        say(format_phases(data))
        at_pause = {v: s for v, s in enumerate(data.get("pause-seqs") or []) if s >= 0}
        await self.wait_lines(at_pause or before, more=2)
        report = read_logs(self.serial_logs)
        pause = report.max_gap_after(at_pause, lines=1) if at_pause else None
        say(
            f"  source-side downtime {data.get('downtime', 0):.3f} ms; guest-visible pause "
            f"(largest gap_us the guest reported around it): "
            f"{'?' if pause is None else f'{pause / 1000:.3f} ms'}"
        )
        self.pauses.append((title, pause, float(data.get("downtime", 0))))
        with trio.move_on_after(10):
            while pid_alive(old_pid):
                await trio.sleep(0.05)
        if pid_alive(old_pid):
            self.failures.append(f"{title}: old VMM pid {old_pid} still alive")
        (status, memfds) = await query(self.control, "query-status", "query-memfds")
        if status["pid"] != new_pid:
            self.failures.append(f"{title}: control socket answered by pid {status['pid']}")
        self.pids.append(new_pid)
        self.inodes.append(memfds["inodes"])

    async def run(self) -> int:
        say(f"handoff demo in {self.dir}")
        say("\n== start kvmstub (plays the host kernel: KVM + SEV firmware)")
        self.start_kvmstub()
        stats0 = await self.stats()
        say(
            f"== start an {self.mode} VMM: {self.vcpus} vCPUs, "
            f"{self.memory >> 30} GiB (release 1, protocol 1)"
        )
        pid = self.start_vmm()
        self.pids.append(pid)
        await self.wait_lines({}, more=2)
        (status, memfds, sev) = await query(
            self.control,
            "query-status",
            "query-memfds",
            "query-sev" if self.mode != "plain" else "query-name",
        )
        self.inodes.append(memfds["inodes"])
        stats1 = await self.stats()
        asids_in_use = _asids_used(stats1)
        say(
            f"  VMM pid {pid}: {status['status']}; memfd inodes {memfds['inodes']}; "
            f"ASIDs in use {asids_in_use}"
        )
        if self.mode != "plain":
            say(
                f"  query-sev: handle {sev['handle']}, policy {sev['policy']:#x}, "
                f"state {sev['state']}"
            )

        release_2 = _release_2()
        await self.handoff(
            "upgrade 1: release 1 -> release 2 (protocol 3)", ["max-protocol=3"], release_2
        )
        log2 = os.path.join(self.dir, "serial-2.log")
        self.serial_logs.append(log2)
        await self.handoff(
            "upgrade 2: new flags (log level debug, new serial log)",
            ["log-level=debug", f"serial-log={log2}"],
        )
        await self.handoff("upgrade 3: same program, same flags")
        await self.handoff(
            "rollback: back to release 1 (protocol 1)", ["max-protocol=1"], RELEASE_1
        )
        await self.handoff(
            "incompatible: successor asked for 8 vCPUs", ["vcpus=8"], expect_ok=False
        )

        say("\n== verify")
        self.check_guest()
        stats2 = await self.stats()
        self.check(
            "ASIDs in use unchanged",
            _asids_used(stats2) == asids_in_use,
            f"{asids_in_use} -> {_asids_used(stats2)}",
        )
        await self.quit_and_check()
        stats3 = await self.stats()
        self.check(
            "kvmstub holds no VM and no ASID after quit",
            not stats3.get("vms") and _asids_used(stats3) == _asids_used(stats0),
            f"{len(stats3.get('vms', []))} VMs",
        )
        self.stop_kvmstub()
        left = _sockets(self.dir)
        self.check("no socket left in the file system", not left, ", ".join(left) or "none")
        self.say_pauses("")
        return self.verdict(
            "", "the guest survived every handoff, nothing was copied, nothing leaked."
        )

    def check_guest(self) -> None:
        """The guest's own lines whole, and the same memory in every VMM."""
        report = read_logs(self.serial_logs)
        problems = report.problems(self.vcpus)
        counts = {v: len(e) for v, e in sorted(report.lines.items())}
        self.check(
            "every vCPU's seq contiguous, no PANIC",
            not problems,
            f"lines per vCPU {counts}" if not problems else "; ".join(problems[:5]),
        )
        same = all(i == self.inodes[0] for i in self.inodes)
        self.check(
            "zero copy: the same memfd inode in every VMM",
            same,
            f"{len(self.inodes)} VMMs, inodes {self.inodes[0]}",
        )

    async def quit_and_check(self) -> None:
        await query(self.control, "quit")
        with trio.move_on_after(10):
            while any(pid_alive(p) for p in self.pids):
                await trio.sleep(0.05)
        alive = [p for p in self.pids if pid_alive(p)]
        self.check("no VMM process left after quit", not alive, f"pids {self.pids}")

    def stop_kvmstub(self) -> None:
        if self.kvmstub is not None and self.kvmstub.poll() is None:
            self.kvmstub.send_signal(signal.SIGTERM)
            try:
                self.kvmstub.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kvmstub.kill()
        self.kvmstub = None

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stop_kvmstub()


def _asids_used(stats: dict[str, Any]) -> int:
    asids = stats.get("asids", {})
    return sum(int(v.get("used", 0)) for v in asids.values() if isinstance(v, dict))


def _sockets(root: str) -> list[str]:
    import stat

    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    out.append(os.path.relpath(p, root))
    return out


class CrossHostDemo(_Checks):
    """Cross-host migration of an SEV guest: two kvmstub daemons play two hosts (each its own
    SEV platform, both under one simulated AMD root), the VMMs talk mutual TLS on 127.0.0.2
    and 127.0.0.3 with certificates from a throwaway CA (`handoff.transport.pki`)."""

    VCPUS = 2
    MEMORY = 64 << 20
    HOSTS = {"host-a": "127.0.0.2", "host-b": "127.0.0.3"}

    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, "cross-host")
        self.kvmstubs: dict[str, subprocess.Popen[bytes]] = {}
        self.vmms: list[subprocess.Popen[bytes]] = []
        self.failures: list[str] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def start_kvmstub(self, host: str) -> str:
        os.makedirs(self.path(host), mode=0o700, exist_ok=True)
        sock = self.path(host, "kvm.sock")
        argv = [
            sys.executable, "-m", "kvmstub.cli", "serve", "--socket", sock,
            "--state-dir", self.path(host, "sev-state"), "--amd-root", self.path("amd-root"),
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=open(self.path(host, "kvmstub.log"), "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        self.kvmstubs[host] = proc
        return sock

    def wait_kvmstub(self, host: str) -> None:
        stdout = self.kvmstubs[host].stdout
        assert stdout is not None
        line = stdout.readline().decode().strip()
        if "ready" not in line:
            raise RuntimeError(f"kvmstub of {host} did not start: {line!r}")

    def start_vmm(self, host: str, *extra: str) -> tuple[subprocess.Popen[bytes], str, str]:
        """Start a VMM on `host` (without waiting: `wait_vmm`)."""
        control = self.path(host, "run", "web.qmp")
        serial = self.path(host, "serial.log")
        tls = self.tls[host]
        argv = [
            *_release_2(), "run", "--name", "web", "--mode", "sev",
            "--vcpus", str(self.VCPUS), "--memory", str(self.MEMORY),
            "--kvm", self.path(host, "kvm.sock"), "--control", control, "--serial-log", serial,
            "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca),
            *extra,
        ]  # fmt: skip
        log = open(self.path(host, "vmm.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.vmms.append(proc)
        return proc, control, serial

    async def wait_vmm(self, host: str, proc: subprocess.Popen[bytes], control: str) -> None:
        with trio.move_on_after(30):
            while not os.path.exists(control) and proc.poll() is None:
                await trio.sleep(0.02)
        if not os.path.exists(control):
            raise RuntimeError(f"the VMM on {host} did not start; see {self.path(host)}")

    async def wait_lines(self, logs: list[str], past: dict[int, int], more: int) -> bool:
        with trio.move_on_after(20):
            while True:
                last = read_logs(logs).last_seq()
                if all(last.get(v, -1) >= past.get(v, -1) + more for v in range(self.VCPUS)):
                    return True
                await trio.sleep(0.02)
        return False

    async def run(self) -> int:
        from handoff.process.ops import migrate
        from handoff.transport.pki import make_pki

        t0 = time.monotonic()
        say("\n== cross-host: migrate an SEV guest from host A to host B (SEND/RECEIVE, TLS)")
        os.makedirs(self.path("amd-root"), mode=0o700, exist_ok=True)
        self.tls = make_pki(
            self.path("pki"), {h: [a] for h, a in self.HOSTS.items()}, ca_name="handoff demo"
        )
        socks = {host: self.start_kvmstub(host) for host in self.HOSTS}  # both at once
        for host in self.HOSTS:
            self.wait_kvmstub(host)
        platforms = {
            host: (await trio.to_thread.run_sync(read_stats, sock))["platform"]
            for host, sock in socks.items()
        }
        say(
            "  two kvmstub daemons, two SEV platforms under one simulated AMD root: PDH "
            + ", ".join(f"{h} {p['pdh_fingerprint'][:12]}..." for h, p in platforms.items())
        )
        source, control_a, serial_a = self.start_vmm("host-a")
        port = _free_port(self.HOSTS["host-b"])
        address = f"tcp:{self.HOSTS['host-b']}:{port}"
        target, control_b, serial_b = self.start_vmm(
            "host-b", "--incoming", address, "--sev-sessions", self.path("host-b", "sessions")
        )
        await self.wait_vmm("host-a", source, control_a)
        await self.wait_vmm("host-b", target, control_b)
        await self.wait_lines([serial_a], {}, more=2)
        say(
            f"  host A: VMM pid {source.pid} runs 'web' (sev, {self.VCPUS} vCPUs, "
            f"{self.MEMORY >> 20} MiB); host B: VMM pid {target.pid} waits on {address}"
        )
        allowed = str(platforms["host-b"]["pdh_fingerprint"])
        data = await migrate(
            control_a, address, 300.0, None, timeout=120, target_platforms=[allowed]
        )
        if data.get("status") != "completed":
            self.failures.append(f"migrate: {data.get('status')}: {data.get('error')}")
            say(f"  migration {data.get('status')}: {data.get('error')}")
        else:
            self.check(
                "the owner's allow-list (--target-platform): host B's platform, checked "
                "before SEND_START",
                data.get("target-platform") == allowed,
                f"{str(data.get('target-platform'))[:12]}...",
            )
            say(
                f"  handoff migrate web --to {address}: {data['rounds']} rounds, pages per "
                f"round {data['pages-per-round']} ({data['private-pages']} through "
                f"SEND/RECEIVE_UPDATE_DATA, {data['shared-pages']} shared in plaintext)"
            )
            phases = data.get("phases", {})
            say(
                f"  source-side downtime {data['downtime-ms']:.1f} ms (stop-and-copy "
                f"{phases.get('stop-and-copy', 0):.1f} ms), total {data['total-ms']:.0f} ms"
            )
        with trio.move_on_after(10):
            while source.poll() is None:
                await trio.sleep(0.05)
        at_pause = read_logs([serial_a]).last_seq()
        await self.wait_lines([serial_a, serial_b], at_pause, more=3)
        report = read_logs([serial_a, serial_b])
        on_b = read_logs([serial_b]).lines
        problems = report.problems(self.VCPUS)
        self.check(
            "one guest across two hosts: every vCPU's seq continuous, no PANIC",
            not problems and bool(on_b),
            "; ".join(
                f"vcpu {v}: A {at_pause.get(v)} -> B {on_b[v][0][0]}..{on_b[v][-1][0]}"
                for v in sorted(on_b)
            )
            if not problems and on_b
            else "; ".join(problems[:5]) or "no line on host B",
        )
        pause = report.max_gap_after(at_pause, lines=1)
        if pause is not None:
            say(f"  guest-visible pause (largest gap_us it reported): {pause / 1000:.1f} ms")
        stats_a = await trio.to_thread.run_sync(read_stats, socks["host-a"])
        stats_b = await trio.to_thread.run_sync(read_stats, socks["host-b"])
        states_b = [vm["firmware_state"] for vm in stats_b["vms"]]
        self.check(
            "one running copy: host A holds nothing, host B's guest RUNNING",
            source.returncode == 0 and not stats_a["vms"] and states_b == ["RUNNING"],
            f"source VMM exit {source.returncode}, host A VMs {len(stats_a['vms'])}, "
            f"host B firmware states {states_b}",
        )
        await query(control_b, "quit")
        with trio.move_on_after(10):
            while target.poll() is None:
                await trio.sleep(0.05)
        self.check("the target VMM quit", target.poll() is not None, f"pid {target.pid}")
        self.cleanup()
        left = _sockets(self.dir)
        self.check("no socket left on either host", not left, ", ".join(left) or "none")
        say(f"  (cross-host part: {time.monotonic() - t0:.1f} s)")
        return self.verdict(
            " (cross-host)", "the SEV guest moved hosts; one copy ran at every instant."
        )

    def cleanup(self) -> None:
        for proc in self.vmms:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.vmms = []
        for proc in self.kvmstubs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.kvmstubs = {}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class KvmDemo(Demo):
    """The same story with a real x86 guest on the real /dev/kvm (plain; no kvmstub)."""

    KVM_VCPUS = 2
    KVM_MEMORY = 256 << 20

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir, "plain", self.KVM_VCPUS, self.KVM_MEMORY)
        self.control = os.path.join(workdir, "run", "demo-kvm.qmp")
        self.serial_logs = [os.path.join(workdir, "kvm-serial-1.log")]
        self.vmm_log = os.path.join(workdir, "kvm-vmm.log")

    def start_vmm(self) -> int:
        argv = [
            *RELEASE_1, "run", "--name", "demo-kvm", "--hypervisor", "kvm",
            "--vcpus", str(self.vcpus), "--memory", str(self.memory), "--idle-us", "2000",
            "--line-every", "20000", "--control", self.control,
            "--serial-log", self.serial_logs[0],
        ]  # fmt: skip
        return self.spawn_vmm(argv).pid

    async def run(self) -> int:
        say("\n== the real KVM: a plain x86-64 guest on /dev/kvm (real machine code, CPL3)")
        pid = self.start_vmm()
        self.pids.append(pid)
        await self.wait_lines({}, more=2)
        (status, memfds) = await query(self.control, "query-status", "query-memfds")
        self.inodes.append(memfds["inodes"])
        say(
            f"  VMM pid {pid}: {status['status']} on {status.get('hypervisor')}; "
            f"memfd inodes {memfds['inodes']}"
        )
        await self.handoff("kvm upgrade 1: same program, same flags")
        log2 = os.path.join(self.dir, "kvm-serial-2.log")
        self.serial_logs.append(log2)
        await self.handoff(
            "kvm upgrade 2: new flags (log level debug, new serial log)",
            ["log-level=debug", f"serial-log={log2}"],
        )
        await self.handoff(
            "kvm rollback to a release speaking protocol 1 only: refused before the pause",
            ["max-protocol=1"],
            RELEASE_1,
            expect_ok=False,
        )
        await self.handoff("kvm rollback: back to the first program", [], RELEASE_1)
        await self.handoff(
            "kvm incompatible: successor asked for 8 vCPUs", ["vcpus=8"], expect_ok=False
        )
        say("\n== verify (real KVM)")
        self.check_guest()
        await self.quit_and_check()
        self.say_pauses("real KVM, ")
        return self.verdict(
            " (real KVM)", "the x86 guest survived every handoff, nothing was copied."
        )


def demo_main(workdir: str | None, mode: str, vcpus: int, memory: int) -> int:
    own = workdir is None
    path = workdir or tempfile.mkdtemp(prefix="handoff-demo-")
    os.makedirs(path, exist_ok=True)
    demos: list[Demo | CrossHostDemo] = [Demo(path, mode, vcpus, memory)]
    problem = kvm_problem()
    try:
        status = trio.run(demos[0].run)
        demos.append(CrossHostDemo(path))
        status = max(status, trio.run(demos[-1].run))
        if problem is not None:
            say(f"\n== the real KVM part skipped: {problem}")
            return status
        demos.append(KvmDemo(path))
        return max(status, trio.run(demos[-1].run))
    except Exception as exc:
        say(f"\nDEMO FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for demo in demos:
            demo.cleanup()
        if own:
            shutil.rmtree(path, ignore_errors=True)
