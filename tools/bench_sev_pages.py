"""Benchmark: the kvmstub daemon's CPU per private page for batched SEND_UPDATE_DATA (the source
host's daemon) and RECEIVE_UPDATE_DATA (the target host's daemon).

    python tools/bench_sev_pages.py [--pages 4096] [--repeats 5] [--batches 16,64]

Two hosts in this process (two SEV platforms under one simulated AMD root), a launched SEV
guest on the first whose RAM is a shrink-sealed memfd logging dirty pages (as the VMM sets
it up for a migration), SEND_START towards the second and RECEIVE_START there. Then each
side is driven through the daemon's own request path, without the socket: the request
datagram as the client encodes it (`wire.SevIoctlBatch` of `--batches` pages at a time, as
many as the client's chunking puts in one datagram: about 29 RECEIVE_UPDATE_DATAs; 16 is
the source VMM's batch, 64 the most one request carries), the daemon's decode,
its batch execution (`Daemon._sev_batch`, each entry one KVM_MEMORY_ENCRYPT_OP through the
model) and its reply encoding, with the memfd a reply too large for a datagram spills into
(a SEND reply of more than about 30 pages).

Printed: CPU microseconds per page (time.process_time, the best of the repeats) and the
wall time per page beside it, for each side. Figures only: nothing here asserts a speed.

    python tools/bench_sev_pages.py --socket [--pages 4096] [--repeats 5] [--batches 30]

measures the same through the socket instead: two `kvmstub serve` daemons (run from the
current directory's kvmstub), a guest set up through `kvmstub.client` as a VMM would (no vCPU
runs), and the pages sent to the first and received by the second, one request of `--batches`
pages at a time as the VMMs send them. Printed: each daemon's CPU per page (utime + stime
from /proc, the best of the repeats): the model's work plus the request path around it
(the wait, recvmsg, decode, encode, send and trio's scheduling); the in-process figures above
are the model's part. (Each VEK is keyed once, natively, so a page costs the same the first
time it moves and every time after.)
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import trio

from kvmstub import client, daemon, memory, uapi, wire
from kvmstub.model import Host, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

PID = os.getpid()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sev(vm: Vm, cmd: int, fields: dict[str, int | bytes] | None = None) -> dict[str, int | bytes]:
    return vm.sev_ioctl(PID, cmd, fields)


def guest_ram(pages: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, pages * PAGE_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def vm_with_ram(host: Host, fd: int, pages: int) -> Vm:
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    flags = uapi.KVM_MEM_LOG_DIRTY_PAGES
    vm.set_user_memory_region(PID, 0, flags, 0, pages * PAGE_SIZE, fd, 0)
    return vm


def setup(pages: int) -> tuple[Host, Vm, Host, Vm, list[int]]:
    say("making the AMD root and two platforms ...")
    root = AmdRoot()
    src_host = Host(platform=Platform(PlatformKeys.generate(), root))
    dst_host = Host(platform=Platform(PlatformKeys.generate(), root))
    src_fd, dst_fd = guest_ram(pages), guest_ram(pages)
    for i in range(pages):
        os.pwrite(src_fd, (f"page {i} ".encode() * 512)[:PAGE_SIZE], i * PAGE_SIZE)
    src = vm_with_ram(src_host, src_fd, pages)
    sev(src, uapi.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": 0})
    sev(src, uapi.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": pages * PAGE_SIZE})
    sev(src, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    sev(src, uapi.KVM_SEV_LAUNCH_FINISH)
    pdh = dst_host.firmware.platform.pdh_cert
    chain = dst_host.sev_issue_cmd(
        uapi.SEV_PDH_CERT_EXPORT,
        {
            "pdh_cert_address": 1,
            "pdh_cert_len": 0x1000,
            "cert_chain_address": 1,
            "cert_chain_len": 0x2000,
        },
    )["cert_chain"]
    amd = dst_host.sev_issue_cmd(uapi.KVMSTUB_SEV_AMD_CERT_CHAIN, None)["amd_certs"]
    assert isinstance(chain, bytes) and isinstance(amd, bytes)
    out = sev(
        src,
        uapi.KVM_SEV_SEND_START,
        {
            "pdh_cert": pdh,
            "plat_certs": chain,
            "amd_certs": amd,
            "session_uaddr": 1,
            "session_len": 128,
        },
    )
    dst = vm_with_ram(dst_host, dst_fd, pages)
    source_pdh = src_host.firmware.platform.pdh_cert
    sev(
        dst,
        uapi.KVM_SEV_RECEIVE_START,
        {"handle": 0, "policy": out["policy"], "pdh": source_pdh, "session": out["session"]},
    )
    return src_host, src, dst_host, dst, [src_fd, dst_fd]


def serve_one(d: daemon.Daemon, vm: Vm, datagram: bytes) -> bytes:
    """The daemon's work on one request datagram: decode, the batch, encode (and the spill
    of a reply larger than a datagram, as `Daemon._send` does)."""
    request = wire.decode_request(memoryview(datagram))
    assert isinstance(request, wire.SevIoctlBatch)
    data = d._encode(d._sev_batch(vm, request, PID))
    if len(data) > wire.MAX_DATAGRAM:
        os.close(daemon._spill(data))
        data = wire.encode(wire.Spilled(request.id))
    return data


def timed(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best CPU seconds and best wall seconds of `work` over `repeats` runs, each starting
    with no VEK keyed (the key schedule counted once per run)."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        memory._HOST_XTS.clear()
        c0, w0 = time.process_time(), time.perf_counter()
        work()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu, wall


def requests_of(
    entries: list[tuple[int, dict[str, int | bytes] | None]], batch: int
) -> list[bytes]:
    """The request datagrams of `entries`, `batch` at a time, as the client splits them
    further (`client._chunks`: what one datagram holds)."""
    out: list[bytes] = []
    for at in range(0, len(entries), batch):
        for chunk in client._chunks(entries[at : at + batch]):
            entries_ = tuple(wire.SevBatchEntry(cmd, fields) for cmd, fields in chunk)
            out.append(wire.encode(wire.SevIoctlBatch(len(out), entries_)))
    return out


async def main(pages: int, repeats: int, batches: list[int]) -> None:
    src_host, src, dst_host, dst, fds = setup(pages)
    async with trio.open_nursery() as nursery:
        d_src, d_dst = daemon.Daemon(src_host, nursery), daemon.Daemon(dst_host, nursery)
        send_entries: list[tuple[int, dict[str, int | bytes] | None]] = [
            (
                uapi.KVM_SEV_SEND_UPDATE_DATA,
                client._send_update_fields(i * PAGE_SIZE, PAGE_SIZE, 52),
            )
            for i in range(pages)
        ]
        packets: list[tuple[int, bytes, bytes]] = []
        for datagram in requests_of(send_entries, wire.MAX_BATCH):
            request = wire.decode_request(datagram)
            assert isinstance(request, wire.SevIoctlBatch)
            reply = d_src._sev_batch(src, request, PID)
            for ok in reply.results:
                assert isinstance(ok, wire.Ok) and ok.fields is not None, ok
                hdr, trans = ok.fields["hdr"], ok.fields["trans"]
                assert isinstance(hdr, bytes) and isinstance(trans, bytes)
                packets.append((len(packets) * PAGE_SIZE, hdr, trans))
        receive_entries: list[tuple[int, dict[str, int | bytes] | None]] = [
            (
                uapi.KVM_SEV_RECEIVE_UPDATE_DATA,
                {"hdr": hdr, "guest_uaddr": gpa, "guest_len": len(trans), "trans": trans},
            )
            for gpa, hdr, trans in packets
        ]
        for datagram in requests_of(receive_entries, wire.MAX_BATCH):  # all verify and land
            answer = wire.decode_reply(serve_one(d_dst, dst, datagram))
            assert isinstance(answer, wire.BatchReply)
            assert all(isinstance(r, wire.Ok) for r in answer.results), answer.results[-1]

        say(f"{pages} pages, {repeats} repeats ...")
        rows = []
        for batch in batches:
            for name, d, vm, entries in (
                ("SEND_UPDATE_DATA (source daemon)", d_src, src, send_entries),
                ("RECEIVE_UPDATE_DATA (target daemon)", d_dst, dst, receive_entries),
            ):
                requests = requests_of(entries, batch)

                def work(
                    d: daemon.Daemon = d, vm: Vm = vm, requests: list[bytes] = requests
                ) -> None:
                    for datagram in requests:
                        serve_one(d, vm, datagram)

                cpu, wall = timed(work, repeats)
                rows.append((name, batch, pages / len(requests), cpu, wall))
        print(f"\n## kvmstub daemon CPU per private page ({pages} pages, best of {repeats})\n")
        print("| side | batch asked | pages per request | CPU µs per page | wall µs per page |")
        print("|---|---|---|---|---|")
        for name, batch, per, cpu, wall in rows:
            print(
                f"| {name} | {batch} | {per:.1f} | {cpu / pages * 1e6:.1f} "
                f"| {wall / pages * 1e6:.1f} |"
            )
        nursery.cancel_scope.cancel()
    for fd in fds:
        os.close(fd)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_daemon(directory: str, root: str) -> tuple[subprocess.Popen[str], str]:
    sock = os.path.join(directory, "kvm.sock")
    state = os.path.join(directory, "state")
    os.mkdir(state, 0o700)
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", sock, "--state-dir", state,
         "--amd-root", root],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("kvmstub: ready "):
            return process, sock
    process.wait()
    raise RuntimeError(f"kvmstub exited with {process.returncode}")


async def _sev_vm(kvm: client.Kvm, fd: int, pages: int) -> client.Vm:
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    await vm.set_user_memory_region(0, 0, pages * PAGE_SIZE, fd, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    return vm


async def through_socket(pages: int, repeats: int, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sev-pages-") as tmp:
        root = os.path.join(tmp, "amd-root")
        os.mkdir(root, 0o700)
        daemons = []
        for host in ("a", "b"):
            os.mkdir(os.path.join(tmp, host), 0o700)
            daemons.append(_start_daemon(os.path.join(tmp, host), root))
        fds = [guest_ram(pages), guest_ram(pages)]
        try:
            for i in range(pages):
                os.pwrite(fds[0], (f"page {i} ".encode() * 512)[:PAGE_SIZE], i * PAGE_SIZE)
            kvm_a = await client.open_kvm(daemons[0][1])
            kvm_b = await client.open_kvm(daemons[1][1])
            src = await _sev_vm(kvm_a, fds[0], pages)
            await src.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=0)
            await src.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=pages * PAGE_SIZE)
            await src.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
            await src.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
            pdh, plat = await kvm_b.sev_pdh_cert_export()
            session, policy = await src.sev_send_start(pdh, plat, await kvm_b.sev_amd_cert_chain())
            dst = await _sev_vm(kvm_b, fds[1], pages)
            await dst.sev_receive_start((await kvm_a.sev_pdh_cert_export())[0], session, policy)
            gpas = [i * PAGE_SIZE for i in range(pages)]
            batches = [gpas[i : i + batch] for i in range(0, pages, batch)]
            packets = [
                [
                    (gpa, h, d)
                    for gpa, (h, d) in zip(b, await src.sev_send_update_data_batch(b), strict=True)
                ]
                for b in batches
            ]
            for p in packets:
                await dst.sev_receive_update_data_batch(p)
            say(f"{pages} pages through the socket, {len(batches)} requests, {repeats} repeats ...")
            pid_a, pid_b = daemons[0][0].pid, daemons[1][0].pid
            cpu_a = cpu_b = wall_a = wall_b = float("inf")
            for _ in range(repeats):
                c, w = _cpu_seconds(pid_a), time.perf_counter()
                for b in batches:
                    await src.sev_send_update_data_batch(b)
                cpu_a = min(cpu_a, _cpu_seconds(pid_a) - c)
                wall_a = min(wall_a, time.perf_counter() - w)
                c, w = _cpu_seconds(pid_b), time.perf_counter()
                for p in packets:
                    await dst.sev_receive_update_data_batch(p)
                cpu_b = min(cpu_b, _cpu_seconds(pid_b) - c)
                wall_b = min(wall_b, time.perf_counter() - w)
            for f in (src, dst, kvm_a, kvm_b):
                await f.aclose()
        finally:
            for fd in fds:
                os.close(fd)
            for process, _ in daemons:
                process.terminate()
                process.wait()
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK") / pages
    print(f"\n## kvmstub daemons through the socket ({pages} pages, {batch} a request, best of "
          f"{repeats}; CPU in ticks of {tick_us:.1f} us a page)\n")  # fmt: skip
    print("| daemon | CPU µs per page | wall µs per page (the client's round trip) |")
    print("|---|---|---|")
    print(f"| A: SEND_UPDATE_DATA | {cpu_a / pages * 1e6:.1f} | {wall_a / pages * 1e6:.1f} |")
    print(f"| B: RECEIVE_UPDATE_DATA | {cpu_b / pages * 1e6:.1f} | {wall_b / pages * 1e6:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--batches",
        default="16,64",
        help="pages per batch to measure, comma-separated (16: the source VMM's batch; 64: "
        "the most a SevIoctlBatch carries, whose SEND reply spills to a memfd)",
    )
    parser.add_argument(
        "--socket",
        action="store_true",
        help="through two kvmstub daemons and their sockets (one batch size: the first)",
    )
    ns = parser.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    if ns.socket:
        trio.run(through_socket, ns.pages, ns.repeats, batches[0])
    else:
        trio.run(main, ns.pages, ns.repeats, batches)
