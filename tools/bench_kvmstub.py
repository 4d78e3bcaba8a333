"""Benchmark of kvmstub's three costs that matter to a VMM, printed as one Markdown table:

1. the round trip of a trivial request (KVM_GET_API_VERSION) next to a bare trio SEQPACKET
   echo measured in the same run, both servers in their own process (tools/bench_roundtrip.py
   does this part; its code is reused here);
2. the KVM_RUN slice rate: KVM_RUNs per second and guest steps per second, for a plain and an
   SEV guest (private pages go through AES-XTS), with 1 and with 4 vCPUs each running in its
   own task on its own fd;
3. MOVE_ENC_CONTEXT_FROM of a launched SEV-ES VM with 1 and with 256 vCPUs: the time of the
   `enable_cap` call (one round trip plus the model's work), median over a chain of moves;
4. one request on each of 256 vCPU fds at once (KVM_GET_REGS, one task each, as a plain VM's
   pause reads its registers): the cost per vCPU of every per-vCPU step of a blackout (the
   kick's exits, the registers, the KVM_RUNs of the resume, the first turns), which decides
   the pause of a guest with many vCPUs.

Aims (issue 2): a round trip within 1.5x of the bare echo; MOVE with 256 vCPUs under 1 ms.

    .venv/bin/python tools/bench_kvmstub.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from kvmstub import client, guest, uapi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_roundtrip  # the round-trip half, shared with that tool

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM


@dataclass
class Row:
    what: str
    figure: str
    note: str = ""


# --- KVM_RUN slice rate ---------------------------------------------------------------------


async def _launch_guest(
    kvm: client.Kvm, params: guest.GuestParams, memfd: int, sev: bool
) -> tuple[client.Vm, list[client.Vcpu]]:
    """A guest with `params.vcpus` vCPUs over `memfd`: plain, or SEV with the image
    encrypted in place (LAUNCH_UPDATE_DATA) and launched to RUNNING."""
    vm = await kvm.create_vm()
    if sev:
        await vm.sev_ioctl(uapi.KVM_SEV_INIT, null_data=True)
    vcpus = [await vm.create_vcpu(i) for i in range(params.vcpus)]
    await vm.set_user_memory_region(0, 0, guest.required_memory(params), memfd)
    if sev:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=0)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=uapi.PAGE_SIZE)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE, handle=0)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
    for i, vcpu in enumerate(vcpus):
        await vcpu.set_regs(guest.initial_regs(i))
    return vm, vcpus


async def _run_loop(
    vcpu: client.Vcpu, doorbell: list[int], seconds: float, counts: list[int]
) -> None:
    """KVM_RUN for `seconds`, serving the guest's doorbell as a VMM does: doorbell[0] is
    the running sum of the seq values this vCPU rang with (kept across calls).
    counts[0] += runs."""
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        exit_ = await vcpu.run()
        runs += 1
        io = exit_.io
        if exit_.exit_reason == uapi.KVM_EXIT_IO and io is not None:
            if io.port == uapi.DOORBELL_OUT_PORT:
                doorbell[0] = (doorbell[0] + int.from_bytes(io.data, "little")) & 0xFFFFFFFF
            elif io.port == uapi.DOORBELL_IN_PORT:
                vcpu.complete_io(doorbell[0].to_bytes(4, "little"))
            elif io.port == uapi.SERIAL_PORT and io.data.startswith(b"PANIC"):
                raise SystemExit(f"guest panicked: {io.data!r}")
        elif exit_.exit_reason != uapi.KVM_EXIT_INTR:
            raise SystemExit(f"unexpected exit {exit_}")
    counts[0] += runs


async def bench_run_rate(kvm: client.Kvm, nr_vcpus: int, sev: bool, seconds: float) -> Row:
    params = guest.GuestParams(vcpus=nr_vcpus)
    memfd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, guest.required_memory(params))
        os.pwrite(memfd, guest.build_launch_image(params), 0)
        vm, vcpus = await _launch_guest(kvm, params, memfd, sev)
        counts = [0]
        doorbells = [[0] for _ in vcpus]
        for vcpu, doorbell in zip(vcpus, doorbells, strict=True):
            await _run_loop(vcpu, doorbell, 0.02, [0])  # boot and warm up
        steps_before = _steps(await kvm.stats())
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for vcpu, doorbell in zip(vcpus, doorbells, strict=True):
                nursery.start_soon(_run_loop, vcpu, doorbell, seconds, counts)
        elapsed = time.perf_counter() - start
        steps = _steps(await kvm.stats()) - steps_before
        for vcpu in vcpus:
            vcpu.close()
        vm.close()
    finally:
        os.close(memfd)
    mode = "SEV" if sev else "plain"
    return Row(
        f"KVM_RUN, {mode} guest, {nr_vcpus} vCPU{'s' if nr_vcpus > 1 else ''}",
        f"{counts[0] / elapsed:,.0f} runs/s; {steps / elapsed:,.0f} guest steps/s",
        f"all vCPUs together, {elapsed:.1f} s; slice 200 us",
    )


def _steps(stats: dict[str, object]) -> int:
    vms = stats["vms"]
    assert isinstance(vms, list)
    return sum(v["steps"] for vm in vms for v in vm["vcpus"])


# --- MOVE -----------------------------------------------------------------------------------


async def _sev_es_vm(kvm: client.Kvm, nr_vcpus: int) -> tuple[client.Vm, list[client.Vcpu]]:
    """A launched SEV-ES VM: ES_INIT, the vCPUs, LAUNCH_START, LAUNCH_UPDATE_VMSA."""
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_ES_INIT, null_data=True)
    vcpus = [await vm.create_vcpu(i) for i in range(nr_vcpus)]
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=uapi.SEV_POLICY_ES)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA, null_data=True)
    return vm, vcpus


async def bench_move(kvm: client.Kvm, nr_vcpus: int, moves: int) -> Row:
    """Median time of MOVE along a chain of `moves` fresh destinations (each with
    `nr_vcpus` vCPUs, created before the clock starts); dead sources are freed."""
    src, src_vcpus = await _sev_es_vm(kvm, nr_vcpus)
    times: list[float] = []
    for _ in range(moves):
        dst = await kvm.create_vm()
        dst_vcpus = [await dst.create_vcpu(i) for i in range(nr_vcpus)]
        start = time.perf_counter()
        await dst.enable_cap(MOVE, src)
        times.append(time.perf_counter() - start)
        for vcpu in src_vcpus:
            vcpu.close()
        src.close()
        src, src_vcpus = dst, dst_vcpus
    for vcpu in src_vcpus:
        vcpu.close()
    src.close()
    median = statistics.median(times)
    return Row(
        f"MOVE, launched SEV-ES VM, {nr_vcpus} vCPU{'s' if nr_vcpus > 1 else ''}",
        f"{median * 1e6:,.0f} us (median of {moves})",
        f"min {min(times) * 1e6:,.0f} us, max {max(times) * 1e6:,.0f} us"
        + ("; aim < 1 ms" if nr_vcpus == 256 else ""),
    )


# --- one request per vCPU, all at once -------------------------------------------------------


async def bench_fan_out(kvm: client.Kvm, nr_vcpus: int, rounds: int) -> Row:
    """Median time for KVM_GET_REGS on every vCPU of a plain VM at once, one task each (as
    `Vmm.get_all_regs` does), and that time per vCPU."""
    vm = await kvm.create_vm()
    vcpus = [await vm.create_vcpu(i) for i in range(nr_vcpus)]
    times: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for vcpu in vcpus:
                nursery.start_soon(vcpu.get_regs)
        times.append(time.perf_counter() - start)
    for vcpu in vcpus:
        vcpu.close()
    vm.close()
    median = statistics.median(times)
    return Row(
        f"KVM_GET_REGS on each of {nr_vcpus} vCPU fds at once",
        f"{median * 1e3:.2f} ms (median of {rounds}); {median / nr_vcpus * 1e6:.1f} us per vCPU",
        f"min {min(times) * 1e3:.2f} ms; every per-vCPU step of a blackout costs about this",
    )


async def _bench_kvmstub(kvm_path: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    kvm = await client.open_kvm(kvm_path)
    for sev in (False, True):
        for nr_vcpus in (1, 4):
            rows.append(await bench_run_rate(kvm, nr_vcpus, sev, args.run_seconds))
    for nr_vcpus in (1, 256):
        rows.append(await bench_move(kvm, nr_vcpus, args.moves))
    rows.append(await bench_fan_out(kvm, 256, args.moves))
    kvm.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="round trips per batch")
    parser.add_argument("--repeat", type=int, default=15, help="round-trip batches (median)")
    parser.add_argument("--run-seconds", type=float, default=2.0, help="per KVM_RUN figure")
    parser.add_argument("--moves", type=int, default=21, help="MOVEs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat, args.run_seconds, args.moves = 200, 3, 0.3, 5

    with tempfile.TemporaryDirectory() as tmp:
        echo_path = os.path.join(tmp, "echo.sock")
        kvm_path = os.path.join(tmp, "kvm.sock")
        echo = bench_roundtrip._start(
            [sys.executable, "-c", bench_roundtrip._ECHO_SERVER, echo_path], "ready"
        )
        daemon = [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", kvm_path]
        kvmstub = bench_roundtrip._start(daemon, "kvmstub: ready")
        try:
            echo_us, kvm_us = trio.run(
                bench_roundtrip._bench, echo_path, kvm_path, args.count, args.repeat
            )
            rows = [
                Row("bare trio SEQPACKET echo round trip", f"{echo_us:.1f} us", "same run"),
                Row(
                    "kvmstub KVM_GET_API_VERSION round trip",
                    f"{kvm_us:.1f} us",
                    f"{kvm_us / echo_us:.2f}x the echo; aim <= 1.5x",
                ),
            ]
            rows += trio.run(_bench_kvmstub, kvm_path, args)
        finally:
            for proc in (echo, kvmstub):
                proc.terminate()
                proc.wait(10)

    print(f"kvmstub benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    print("| measurement | figure | note |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row.what} | {row.figure} | {row.note} |")


if __name__ == "__main__":
    main()
