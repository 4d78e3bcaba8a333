"""Benchmark of the guest's hot path: the cost of one guest step and of one page
encryption / decryption, over a real memfd with a VEK (private pages), as KVM_RUN pays it.

Run: .venv/bin/python tools/bench_guest_step.py
"""

from __future__ import annotations

import fcntl
import os
import time

from kvmstub import guest
from kvmstub.memory import GuestMemory, xts_decrypt, xts_encrypt
from kvmstub.uapi import KVM_EXIT_INTR, PAGE_SIZE


class _Private:
    """PageAccess over GuestMemory, as the model gives it to the guest."""

    def __init__(self, mem: GuestMemory, vek: bytes | None) -> None:
        self.mem = mem
        self.vek = vek

    def read_page(self, gpa: int, private: bool) -> bytes:
        return self.mem.read_page(gpa, self.vek if private else None)

    def write_page(self, gpa: int, data: bytes, private: bool) -> None:
        self.mem.write_page(gpa, data, self.vek if private else None)


def _memory(params: guest.GuestParams, *, sealed: bool) -> tuple[GuestMemory, int]:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, guest.required_memory(params))
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    mem = GuestMemory()
    mem.set_region(0, 0, 0, guest.required_memory(params), fd, 0)
    return mem, fd


def _per_call(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def bench_steps(*, vek: bytes | None, sealed: bool, steps: int = 200_000) -> float:
    """Microseconds per guest step (journal read, check, chain, write), no exits."""
    params = guest.GuestParams(vcpus=1, line_every=1 << 40, flip_every=1 << 40)
    mem, fd = _memory(params, sealed=sealed)
    access = _Private(mem, vek)
    mem.write_page(0, guest.build_launch_image(params), vek)
    regs = guest.initial_regs(0)
    done = 0
    start = time.perf_counter()
    while done < steps:
        now = time.monotonic_ns()
        regs, exit_, n = guest.run_slice(
            regs,
            access,
            now_ns=now,
            budget_ns=10_000_000,
            clock=time.monotonic_ns,
            exit_hypercall=True,
        )
        assert exit_.exit_reason == KVM_EXIT_INTR, exit_
        done += n
    elapsed = time.perf_counter() - start
    mem.close()
    os.close(fd)
    return elapsed / done * 1e6


def main() -> None:
    vek = os.urandom(64)
    page = os.urandom(PAGE_SIZE)
    mem, fd = _memory(guest.GuestParams(vcpus=1), sealed=True)
    cases: list[tuple[str, object]] = [
        ("xts_encrypt (fresh cipher)", lambda: xts_encrypt(vek, 4096, page)),
        ("xts_decrypt (fresh cipher)", lambda: xts_decrypt(vek, 4096, page)),
        ("write_page private (VEK keyed)", lambda: mem.write_page(4096, page, vek)),
        ("read_page private (VEK keyed)", lambda: mem.read_page(4096, vek)),
        ("write_page shared", lambda: mem.write_page(4096, page, None)),
        ("read_page shared", lambda: mem.read_page(4096, None)),
    ]
    for name, fn in cases:
        print(f"{name:45s} {_per_call(fn, 100_000):6.2f} us/page")
    mem.close()
    os.close(fd)
    for sealed in (True, False):
        path = "mmap (F_SEAL_SHRINK)" if sealed else "pread/pwrite (unsealed)"
        for label, key in (("private", vek), ("no SEV", None)):
            name = f"guest step, {label}, {path}"
            print(f"{name:45s} {bench_steps(vek=key, sealed=sealed):6.2f} us/step")


if __name__ == "__main__":
    main()
