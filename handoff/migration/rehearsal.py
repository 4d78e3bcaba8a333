"""The blackout's code, run once before it is needed.

Measured in a fresh VMM process on the real KVM (a nested 2-CPU host), each piece of the
blackout took 2 to 10 times longer the first time it ran than the next: reading a vCPU's state
234 us against 112 (the kernel's first use of a fresh vCPU, the interpreter's specialisation of
the code, cold caches), building a Switchover 63 against 11, checking a state 47 against 4. A
new VMM runs its target part of the blackout once in its life, and a VMM its source part once:
always the first time, always inside the pause. So a VMM runs them here first, on its own VM
while no vCPU runs yet (a launched VMM before its first KVM_RUN, a new VMM before `Prepared`):
every vCPU's and the VM's state read, carried through a Switchover as a source builds it,
encoded, decoded and checked as a target does, and loaded back, which changes nothing.

On the real KVM only, and for plain guests: kvmstub's requests are served by another process
that stays warm, and an SEV guest's vCPUs hold nothing to read before its launch or move.
"""

from __future__ import annotations

import msgspec

from handoff import protocol
from handoff.hv.backends import KVM
from handoff.machine.vmm import Vmm
from handoff.migration import messages


async def rehearse(vmm: Vmm, *, inline_max: int, describe: protocol.Describe | None) -> None:
    """Rehearse the blackout on `vmm`'s idle VM (no vCPU in KVM_RUN); `describe`, a target's,
    adds the target's part (decode, check, load)."""
    if vmm.flags.hypervisor != KVM or vmm.cfg.mode != "plain" or vmm.vm is None:
        return
    states = await vmm.get_all_states()
    switchover, fds = messages.switchover_from(
        await vmm.snapshot_devices(),
        states,
        version=protocol.VCPU_STATES_VERSION,
        inline_max=inline_max,
    )
    data = msgspec.msgpack.encode(switchover)
    if describe is None:
        fds.close()
        return
    protocol.decode(data)
    loaded, devices = messages.switchover_state(switchover, describe, fds)
    assert vmm.hypervisor is not None
    for state in loaded or ():
        vmm.hypervisor.check_state(state)
    if loaded is not None:
        await vmm.set_all_states(loaded)
    if devices.vm_state is not None:
        await vmm.vm.set_vm_state(devices.vm_state)
