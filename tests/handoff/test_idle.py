"""The witness guest's idle port (DESIGN section 5): between lines the guest asks its VMM to
idle it (an OUT of microseconds to `witness.IDLE_PORT`; the real KVM's x86 guest by default,
kvmstub's with --idle-us); the vCPU then sleeps in the VMM, not in the kernel, until that time
has passed, and a pause (a handoff) does not wait for it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from handoff.hv import abi, witness
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.vmm import RunGate, VcpuRunner, Vmm
from handoff.testing import serial_checked


@dataclass
class Io:
    direction: int
    port: int
    size: int
    count: int
    data: bytes


@dataclass
class Exit:
    exit_reason: int
    io: Io | None = None
    hypercall: None = None


class IdlingVcpu:
    """A vCPU whose guest asks to idle `idle_us` after every run; records when it ran."""

    index = 0
    run_in_flight = False

    def __init__(self, idle_us: int) -> None:
        self.idle_us = idle_us
        self.runs: list[float] = []
        self.settles = 0

    async def run(self, *, immediate_exit: bool = False) -> Exit:
        if immediate_exit:
            self.settles += 1
            raise InterruptedError(4, "kicked")
        self.runs.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        data = self.idle_us.to_bytes(4, "little")
        return Exit(abi.EXIT_IO, Io(abi.IO_OUT, witness.IDLE_PORT, 4, 1, data))

    def kick(self) -> None: ...
    def unkick(self) -> None: ...

    def serve_exits_on_thread(self, handler: object) -> bool:
        return False  # every exit comes to the loop, as kvmstub's do

    def wait_returned(self, timeout: float) -> bool:
        return True


def machine(tmp_path: Path, vcpu: IdlingVcpu) -> Vmm:
    cfg = GuestConfig(vcpus=1, memory=1 << 20, mode="plain", policy=0, line_every=1, flip_every=1)
    flags = HostFlags(name="idle", uuid=str(uuid.uuid4()), kvm="unused")
    vmm = Vmm(cfg, flags)
    vmm.vcpus = [vcpu]  # type: ignore[list-item]
    return vmm


async def test_the_vcpu_sleeps_the_asked_time_between_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    vcpu = IdlingVcpu(idle_us=2000)
    vmm = machine(tmp_path, vcpu)
    runner, gate = VcpuRunner(vmm, 0), RunGate(1)
    async with trio.open_nursery() as n:
        n.start_soon(runner.loop, gate)
        gate.resume()
        await trio.sleep(0.0101)
        n.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(vcpu.runs, vcpu.runs[1:], strict=False)]
    assert len(vcpu.runs) == 6
    assert all(abs(g - 0.002) < 1e-6 for g in gaps)


async def test_a_pause_does_not_wait_for_an_idle_vcpu_to_wake(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    vcpu = IdlingVcpu(idle_us=witness.MAX_IDLE_US * 5)  # cut to MAX_IDLE_US
    vmm = machine(tmp_path, vcpu)
    runner, gate = VcpuRunner(vmm, 0), RunGate(1)
    async with trio.open_nursery() as n:
        n.start_soon(runner.loop, gate)
        gate.resume()
        await trio.sleep(0.1)
        t0 = trio.current_time()
        await gate.pause()
        assert trio.current_time() == t0  # parked at once, the idle cut short
        assert vcpu.settles == 1  # the OUT's completion delivered without running the guest
        gate.resume()
        await trio.sleep(0.01)
        assert len(vcpu.runs) == 2  # it runs again at the resume, not a second later
        n.cancel_scope.cancel()


IDLE_US = 20_000


async def test_kvmstubs_guest_idles_as_asked_and_a_handoff_keeps_it_whole(
    vmm_factory: Any, kvmstub_daemon: Any
) -> None:
    # A line every 2 steps and 20 ms of idle after each: each vCPU prints at most one line
    # per 20 ms of wall time, where a busy guest prints hundreds.
    vmm = vmm_factory(mode="sev", vcpus=2, line_every=2, extra=["--idle-us", str(IDLE_US)])
    await vmm.wait_lines(2)
    for _ in range(2):
        before = vmm.report().last_seq()
        t0 = time.monotonic()
        after = (await vmm.wait_lines(5)).last_seq()
        elapsed_us = (time.monotonic() - t0) * 1e6
        for vcpu in range(2):
            new = after[vcpu] - before[vcpu]
            # (One line may have been on its way when the count began.)
            assert 5 <= new <= elapsed_us / IDLE_US + 2, (vcpu, new, elapsed_us)
        result = await vmm.upgrade()
        assert result["status"] == "completed", (result, vmm.log())
        await serial_checked(vmm)
    assert len(await vmm.settle()) == 1
