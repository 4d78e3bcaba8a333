"""Benchmark: the kernel's own share of a real-KVM handoff's pause, per vCPU, on this host.

    python tools/bench_kvm_ioctls.py                  # 1, 4 and 256 vCPUs
    python tools/bench_kvm_ioctls.py --vcpus 1,4 -n 200

What no handoff can skip, measured alone: with the x86 witness paused on one VM of the real
/dev/kvm, in ONE thread of ONE process and nothing else in the way,

- the completion run (KVM_RUN with immediate_exit: the exit in flight finished, no guest
  instruction; every vCPU takes one before its state is read),
- the save: every GET ioctl of one vCPU's state (`LinuxVcpu.read_state`: straight ctypes calls
  into a blob laid out once, the GIL released),
- the load: every SET ioctl of that state into a vCPU of a second VM over the same memfds
  (`LinuxVcpu.load_state`),

each repeated `-n` times per vCPU (medians); and every vCPU saved and loaded in one go, on one
thread and split over two threads (best of 5), which says whether this host's kernel runs
different vCPUs' state ioctls in parallel. Then, per vCPU count, the sum of these that any
handoff of that many vCPUs must spend in the kernel (`kernel floor`), serially and as if the
host's CPUs shared it perfectly, beside the issue's target for the guest-visible pause. Not
counted, though also unavoidable: the kick's signal and the vCPU thread's wake-up, the first
KVM_RUN's entry, the message between the VMMs, and the guest's own ordinary gap between two
lines (which the guest-visible pause contains; `tools/bench_kvm_floor.py` prints it).

And, for one busy vCPU, the other two kernel costs of every pause: the kick (a signal to the
vCPU thread until its KVM_RUN returns EINTR) and the first KVM_RUN after the state is loaded
(entry to first exit) on a fresh VM, as every handoff's target is, against a VM that ran the
guest before (both include one guest step and its exit): the difference is what the kernel
spends mapping the guest's memory into a VM that never ran it (on this nested host, shadow
paging: a fault per page the guest touches).

Why per vCPU count: some SET ioctls grow with the VM's vCPU count (KVM_SET_LAPIC recomputes the
VM's APIC map over every vCPU), so 256 vCPUs are measured on a VM that has 256.

Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

from handoff.hv import linux_abi as abi
from handoff.hv.backends import kvm_problem
from handoff.hv.base import VcpuState
from handoff.hv.linux import LinuxVcpu, _c_ioctl_held, open_linux
from handoff.machine import vmm as vmm_module
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.vmm import Vmm

TARGETS_MS = {1: 0.5, 4: 1.0, 256: 40.0}  # the guest-visible pause targets


def _median_us(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def _completion(vcpu: LinuxVcpu) -> Callable[[], None]:
    """KVM_RUN with immediate_exit set, as the pause issues it (`_complete_only`)."""
    fd = vcpu.fileno()
    run = vcpu._run
    request = abi.KVM_RUN

    def once() -> None:
        run[abi.RUN_IMMEDIATE_EXIT] = 1
        if _c_ioctl_held(fd, request, 0) >= 0:
            raise RuntimeError("KVM_RUN with immediate_exit ran the guest")

    return once


def _save_load(
    src: list[LinuxVcpu], dst: list[LinuxVcpu], states: list[VcpuState], lo: int, hi: int
) -> None:
    for i in range(lo, hi):
        src[i].read_state()
        dst[i].load_state(states[i])


def _split(src: list[LinuxVcpu], dst: list[LinuxVcpu], states: list[VcpuState]) -> None:
    half = len(src) // 2
    other = threading.Thread(target=_save_load, args=(src, dst, states, half, len(src)))
    other.start()
    _save_load(src, dst, states, 0, half)
    other.join()


def _wall_ms(fn: Callable[[], None], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return min(times) / 1e6


async def measure(vcpus: int, n: int, work: Path) -> dict[str, float]:
    cfg = GuestConfig(
        vcpus=vcpus, memory=256 << 20, mode="plain", policy=0, line_every=1, flip_every=1
    )

    def flags(name: str) -> HostFlags:
        return HostFlags(
            name=name,
            uuid=str(uuid.uuid4()),
            kvm="",
            hypervisor="kvm",
            serial_log=str(work / "serial.log"),
        )

    a = Vmm(cfg, flags("a"), hypervisor=open_linux())
    b = Vmm(cfg, flags("b"), hypervisor=open_linux())
    try:
        async with trio.open_nursery() as nursery:
            await a.launch()
            a.start(nursery)
            a.resume()
            await b.prepare_incoming([os.dup(fd) for fd in a.memfds])
            await trio.sleep(0.3)  # the witness runs: its state is a running guest's
            await a.pause()
            src = [v for v in a.vcpus if isinstance(v, LinuxVcpu)]
            dst = [v for v in b.vcpus if isinstance(v, LinuxVcpu)]
            # A few vCPUs of the VM stand for all (each costs the same; the VM's size is
            # what changes KVM_SET_LAPIC's cost, and that is the VM's, not the sample's).
            sample = sorted({0, vcpus // 2, vcpus - 1})
            reps = max(5, n // len(sample)) if vcpus > 4 else n
            complete, save, load = [], [], []
            for i in sample:
                complete.append(_median_us(_completion(src[i]), reps))
                save.append(_median_us(src[i].read_state, reps))
                state = src[i].read_state()
                load.append(_median_us(lambda i=i, s=state: dst[i].load_state(s), reps))  # type: ignore[misc]
            # Every vCPU saved then loaded, on one thread and split over two (each vCPU's
            # ioctls take only that vCPU's mutex: does the kernel here run them in parallel?)
            states = [v.read_state() for v in src]
            one = _wall_ms(lambda: _save_load(src, dst, states, 0, len(src)))
            two = _wall_ms(lambda: _split(src, dst, states))
            nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()
    return {
        "all_one_thread": one,
        "all_two_threads": two,
        "complete": statistics.median(complete),
        "save": statistics.median(save),
        "load": statistics.median(load),
    }


async def kick_and_first_run(moves: int, work: Path) -> dict[str, float]:
    """One vCPU, busy: the kick until the vCPU thread's KVM_RUN returned (`times`: kick, out),
    over `moves` pauses; then the first KVM_RUN after a state load, entry to first exit, on a
    VM that never ran the guest (each handoff's target) and on one that ran it before, beside
    no more. Exits go to the event loop here (none served on the
    vCPU thread), so that the first one is recorded."""
    vmm_module._CPUS = 0
    cfg = GuestConfig(vcpus=1, memory=256 << 20, mode="plain", policy=0, line_every=1, flip_every=1)

    def make(name: str) -> Vmm:
        flags = HostFlags(
            name=name, uuid=str(uuid.uuid4()), kvm="", hypervisor="kvm",
            serial_log=str(work / "serial.log"),
        )  # fmt: skip
        return Vmm(cfg, flags, hypervisor=open_linux())

    async def first_run(src: Vmm, dst: Vmm) -> float:
        await src.pause()
        await dst.load_incoming(await src.get_all_states(), await src.snapshot_devices())
        dst.resume()
        times: dict[str, int] = dst.vcpus[0].times  # type: ignore[attr-defined]
        with trio.fail_after(5):
            while "first_exit" not in times:
                await trio.sleep(0.0002)
        return (times["first_exit"] - times["enter"]) / 1000

    kicks: list[float] = []
    fresh: list[float] = []
    warm: list[float] = []
    vmms = [make("a")]
    try:
        async with trio.open_nursery() as nursery:
            await vmms[0].launch()
            vmms[0].start(nursery)
            vmms[0].resume()
            for _ in range(moves):
                await trio.sleep(0.01)
                await vmms[0].pause()
                times = vmms[0].vcpus[0].times  # type: ignore[attr-defined]
                kicks.append((times["out"] - times["kick"]) / 1000)
                vmms[0].resume()
            for i in range(moves):  # a fresh VM each time, as a handoff's target
                new = make(f"f{i}")
                vmms.append(new)
                await new.prepare_incoming([os.dup(fd) for fd in vmms[-2].memfds])
                new.start(nursery)
                fresh.append(await first_run(vmms[-2], new))
                await trio.sleep(0.01)
            old, new = vmms[-2], vmms[-1]
            for _ in range(moves):  # then back and forth between two VMs that ran it
                warm.append(await first_run(new, old))
                old, new = new, old
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        for vmm in vmms:
            vmm.close()
    return {
        "kick": statistics.median(kicks),
        "fresh": statistics.median(fresh),
        "warm": statistics.median(warm),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vcpus", default="1,4,256", help="vCPU counts (default 1,4,256)")
    p.add_argument("-n", type=int, default=200, help="repetitions per measure (default 200)")
    args = p.parse_args()
    if (problem := kvm_problem()) is not None:
        print(f"skipped: the real KVM cannot run a guest here: {problem}")
        return 0
    cpus = os.cpu_count() or 1
    print(
        "| vCPUs | completion run us/vCPU | save us/vCPU | load us/vCPU | kernel floor ms, "
        f"serial | kernel floor ms, {cpus} CPUs shared perfectly | target ms (guest-visible) "
        "| every vCPU saved+loaded, 1 thread ms | the same on 2 threads ms | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vcpus in [int(v) for v in args.vcpus.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-kvm-ioctls-") as tmp:
            r = trio.run(measure, vcpus, args.n, Path(tmp))
        per_vcpu = r["complete"] + r["save"] + r["load"]
        serial = per_vcpu * vcpus / 1000
        shared = serial / min(cpus, vcpus)
        target = TARGETS_MS.get(vcpus)
        print(
            f"| {vcpus} | {r['complete']:.1f} | {r['save']:.1f} | {r['load']:.1f} "
            f"| {serial:.3f} | {shared:.3f} | {target if target is not None else '-'} "
            f"| {r['all_one_thread']:.3f} | {r['all_two_threads']:.3f} "
            f"| {os.getloadavg()[0]:.1f} |",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-kvm-ioctls-") as tmp:
        k = trio.run(kick_and_first_run, min(args.n, 30), Path(tmp))
    print(
        "\n| 1 vCPU, busy | kick until KVM_RUN returned us | first KVM_RUN after a load, "
        "entry to first exit, fresh VM us | the same, VM that ran the guest before us "
        "| fresh minus warm us |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| medians | {k['kick']:.0f} | {k['fresh']:.0f} | {k['warm']:.0f} "
        f"| {k['fresh'] - k['warm']:.0f} |"
    )
    return 0


if __name__ == "__main__":
    ctypes.set_errno(0)
    sys.exit(main())
