"""The VMM's machine on the in-process model kernel: a guest handed from one `Vmm` to another
in one process, as two VMM processes hand it over on one host (no daemon, no subprocess).

Each `Vmm` has its own `ModelHypervisor` (its own mm, as a process has) over one
`ModelKernel`, and the target takes the source's memfds, as SCM_RIGHTS would give them. A plain
guest's registers cross as opaque `VcpuState`s; an SEV-ES guest's move with its encryption
context (`move_enc_context_from`), after which the source's VM no longer holds it, and come
back with `reclaim` (a failed handoff's recovery). Either way the guest's serial seq
continues, one line after the other, whichever VMM prints it.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from handoff.hv import PeerVm, abi
from handoff.hv.model import ModelHypervisor, ModelKernel
from handoff.machine.config import GuestConfig, HostFlags, Mode
from handoff.machine.vmm import Vmm

VCPUS = 2
LINE = re.compile(rb"vcpu=(\d+) seq=(\d+) ")


def config(mode: Mode) -> GuestConfig:
    policy = abi.SEV_POLICY_ES if mode == "sev-es" else 0
    return GuestConfig(
        vcpus=VCPUS, memory=1 << 20, mode=mode, policy=policy, line_every=2, flip_every=1
    )


def flags(name: str, serial_log: Path) -> HostFlags:
    return HostFlags(name=name, uuid=str(uuid.uuid4()), kvm="unused", serial_log=str(serial_log))


async def until(done: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        while not done():
            await trio.sleep(0.001)


def ahead_of(vmm: Vmm, seqs: dict[int, int], lines: int = 3) -> Callable[[], bool]:
    """Every vCPU printed at least `lines` lines on `vmm` past `seqs`."""
    last = vmm.devices.serial.last_seq
    return lambda: all(last.get(i, -1) >= seqs.get(i, -1) + lines for i in range(VCPUS))


@pytest.mark.parametrize("mode", ["plain", "sev-es"])
async def test_a_guest_moves_between_two_vmms_on_one_model_kernel(
    mode: Mode, tmp_path: Path
) -> None:
    kernel = ModelKernel()
    log = tmp_path / "serial.log"
    source = Vmm(config(mode), flags("source", log), hypervisor=ModelHypervisor(kernel))
    target = Vmm(config(mode), flags("target", log), hypervisor=ModelHypervisor(kernel))
    try:
        async with trio.open_nursery() as nursery:
            await source.launch()
            source.start(nursery)
            source.resume()
            await until(ahead_of(source, {}))
            await source.pause()
            assert source.status == "paused"
            states = None if mode == "sev-es" else await source.get_all_states()
            if states is not None:
                assert [s.backend for s in states] == ["kvmstub"] * VCPUS
            devices = source.devices.snapshot()
            paused_at = dict(source.devices.serial.last_seq)

            # The target: the same memfds (as SCM_RIGHTS gives them), a VM of its own.
            await target.prepare_incoming([os.dup(fd) for fd in source.memfds])
            target.start(nursery)
            assert source.vm is not None
            with PeerVm(os.dup(source.vm.fileno())) as source_vm:
                await target.complete_incoming(source_vm, states, devices)
            if mode == "sev-es":
                assert not await source.holds_context()  # the context moved away
            target.resume()
            await until(ahead_of(target, paused_at))
            await target.pause()
            paused_at = dict(target.devices.serial.last_seq)
            if mode == "sev-es":
                # And back, as a source whose target failed after the move takes it back:
                # a fresh VM of its own over the same memfds, the context moved out of the
                # target's (the escrow), the devices as the target left them.
                assert target.vm is not None
                with PeerVm(os.dup(target.vm.fileno())) as escrow:
                    await source.reclaim(escrow, None)
                assert await source.holds_context()
                assert not await target.holds_context()
                source.devices.restore(target.devices.snapshot())
                source.devices.serial.last_seq.update(paused_at)
                source.resume()
                await until(ahead_of(source, paused_at))
                await source.pause()
                paused_at = dict(source.devices.serial.last_seq)
            nursery.cancel_scope.cancel()
    finally:
        source.close()
        target.close()

    # One guest, one serial stream: every vCPU's seq contiguous across the two VMMs.
    text = log.read_bytes()
    assert b"PANIC" not in text
    seen: dict[int, list[int]] = {}
    for m in LINE.finditer(text):
        seen.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    for vcpu in range(VCPUS):
        seq = seen[vcpu]
        assert seq == list(range(seq[0], seq[0] + len(seq))), (vcpu, seq)
        assert seq[0] == 0 and seq[-1] == paused_at[vcpu]
