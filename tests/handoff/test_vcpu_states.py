"""Protocol 3's vCPU states between the VMM's objects and the wire (handoff.migration.messages):
inline when small, else a sealed memfd sent as Switchover's second fd, which the target checks
(a memfd, sealed, of the declared size within the bound) before reading it, and always closes.
Versions 1 and 2 keep carrying kvm_regs."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile

import pytest

from handoff import protocol
from handoff.errors import Incompatible, PeerFailed
from handoff.hv import VcpuState
from handoff.machine.devices import DeviceState
from handoff.migration import messages
from handoff.protocol import Describe, MemfdSlot, Regs, Switchover
from handoff.transport.unix import OwnedFds

VCPUS = 4
DEVICES = DeviceState(doorbell_sums=(1, 2), shared_regions=[(0x3000, 1)])


def describe(vcpus: int = VCPUS) -> Describe:
    return Describe(
        vcpus=vcpus,
        memory_bytes=1 << 20,
        slots=(MemfdSlot(slot=0, guest_phys_addr=0, size=1 << 20, offset=0),),
        mode="plain",
        policy=0,
        line_every=200,
        flip_every=50,
    )


def kvm_states(n: int = VCPUS) -> list[VcpuState]:
    return [messages.regs_state(Regs(rax=i, rip=0x1000 + i, rflags=0x202)) for i in range(n)]


def opaque_states(n: int = VCPUS, size: int = 10 * 1024) -> list[VcpuState]:
    return [VcpuState(backend="linux-kvm", version=7, blob=bytes([i]) * size) for i in range(n)]


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def memfd_with(data: bytes, seals: int = messages.VCPU_STATES_SEALS) -> int:
    fd = os.memfd_create("test-states", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize("version", [1, 2])
def test_v1_and_v2_carry_kvm_regs_and_read_back_the_same_states(version: int) -> None:
    states = kvm_states()
    sw, extra = messages.switchover_from(DEVICES, states, version=version)
    assert len(extra) == 0 and sw.nfds() == 1
    assert sw.regs is not None and sw.vcpu_states is None and sw.vcpu_states_memfd is None
    got, devices = messages.switchover_state(sw, describe())
    assert got == states and devices == DEVICES


def test_v1_and_v2_cannot_carry_another_backends_state() -> None:
    with pytest.raises(Incompatible, match="cannot cross protocol 1 or 2"):
        messages.switchover_from(DEVICES, opaque_states(), version=2)


def test_v3_carries_small_states_inline() -> None:
    states = opaque_states(size=100)
    sw, extra = messages.switchover_from(DEVICES, states, version=3)
    assert len(extra) == 0 and sw.nfds() == 1 and sw.regs is None
    got, _ = messages.switchover_state(sw, describe())
    assert got == states


def test_v3_sends_large_states_in_a_sealed_memfd_that_reads_back_and_is_closed() -> None:
    states = opaque_states(n=64, size=10 * 1024)  # 640 KiB: far beyond one datagram
    before = open_fds()
    sw, extra = messages.switchover_from(DEVICES, states, version=3)
    with extra:
        assert sw.vcpu_states is None and sw.vcpu_states_memfd is not None
        assert sw.nfds() == 2 and len(extra) == 1
        seals = fcntl.fcntl(extra[0], fcntl.F_GET_SEALS)
        assert seals & messages.VCPU_STATES_SEALS == messages.VCPU_STATES_SEALS
        # What the target receives: a dup of the fd (SCM_RIGHTS), owned and closed by the read.
        received = OwnedFds([os.dup(extra[0])])
        got, _ = messages.switchover_state(sw, describe(64), received)
        assert got == states and len(received) == 0
    assert open_fds() == before


def test_a_small_threshold_forces_the_memfd_and_the_machine_accepts_it() -> None:
    states = kvm_states()
    sw, extra = messages.switchover_from(DEVICES, states, version=3, inline_max=0)
    with extra:
        assert sw.vcpu_states_memfd is not None
        source = protocol.HandoffConnection(protocol.Role.SOURCE)
        target = protocol.HandoffConnection(protocol.Role.TARGET)
        _advance_to_prepared(source, target)
        assert target.receive(source.send(sw), 2) == sw
        got, _ = messages.switchover_state(sw, describe(), OwnedFds([os.dup(extra[0])]))
        assert got == states


def _advance_to_prepared(
    source: protocol.HandoffConnection, target: protocol.HandoffConnection
) -> None:
    import uuid

    vm = uuid.uuid4()
    nonce = b"n" * protocol.NONCE_SIZE
    target.receive(source.send(source.make_hello(vm_name="g", vm_uuid=vm, nonce=nonce)))
    target_hello = target.make_hello(vm_name="g", vm_uuid=vm, nonce=nonce)
    source.receive(target.send(target_hello))
    d = describe()
    target.receive(source.send(d), d.nfds())
    source.receive(target.send(protocol.Prepared()), 1)


def _memfd_switchover(size: int) -> Switchover:
    return Switchover(
        doorbell_sum=3,
        device_blobs={"doorbell": DEVICES.doorbell_blob()},
        regs=None,
        vcpu_states_memfd=size,
        paused_at_ns=1,
    )


def _refused(sw: Switchover, fd: int, match: str) -> None:
    owned = OwnedFds([fd])
    with pytest.raises(PeerFailed, match=match):
        messages.switchover_state(sw, describe(), owned)
    assert len(owned) == 0
    with pytest.raises(OSError):  # closed (EBADF): nothing has opened another fd since
        os.fstat(fd)


def test_an_unsealed_memfd_is_refused_and_closed() -> None:
    data = protocol.encode_vcpu_states(messages._wire_state(s) for s in kvm_states())
    _refused(_memfd_switchover(len(data)), memfd_with(data, seals=0), "not sealed")
    partly = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    _refused(_memfd_switchover(len(data)), memfd_with(data, seals=partly), "not sealed")


def test_a_memfd_of_another_size_than_declared_is_refused_and_closed() -> None:
    data = protocol.encode_vcpu_states(messages._wire_state(s) for s in kvm_states())
    _refused(_memfd_switchover(len(data) - 1), memfd_with(data), "holds")


def test_a_memfd_beyond_the_bound_is_refused_without_reading_it() -> None:
    fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, protocol.MAX_VCPU_STATES_BYTES + 1)  # sparse: nothing is written
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, messages.VCPU_STATES_SEALS)
    _refused(_memfd_switchover(protocol.MAX_VCPU_STATES_BYTES), fd, "at most")


def test_garbage_or_the_wrong_count_in_a_sealed_memfd_is_refused() -> None:
    _refused(_memfd_switchover(8), memfd_with(b"\xc1" * 8), "malformed")
    data = protocol.encode_vcpu_states(messages._wire_state(s) for s in kvm_states(VCPUS + 1))
    _refused(_memfd_switchover(len(data)), memfd_with(data), "holds 5 states")


def test_an_fd_that_is_not_a_memfd_is_refused_and_closed() -> None:
    a, b = socket.socketpair()
    b.close()
    _refused(_memfd_switchover(10), a.detach(), "not a memfd")
    r, w = os.pipe()
    os.close(w)
    _refused(_memfd_switchover(10), r, "not a memfd")
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 10)
        f.flush()
        _refused(_memfd_switchover(10), os.dup(f.fileno()), "not a memfd|not sealed")


def test_a_memfd_switchover_without_its_fd_is_refused() -> None:
    with pytest.raises(PeerFailed, match="0 fds came"):
        messages.switchover_state(_memfd_switchover(10), describe(), OwnedFds())
