"""Between the VMM's objects and the protocol's messages: build and read them.

`protocol` stays pure and knows nothing of configs, devices or records; this module maps
`GuestConfig`, `DeviceState` and the measured timings to and from its messages.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Sequence

import msgspec

from handoff import protocol
from handoff.errors import AuthRefused, Incompatible, PeerFailed
from handoff.hv import VcpuState, abi
from handoff.hv.base import VmState
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.devices import MAX_PARTIAL_LINE, DeviceState
from handoff.transport.unix import OwnedFds


def _features(token: bytes | None) -> tuple[str, ...]:
    return (protocol.TOKEN_FEATURE,) if token is not None else ()


def source_hello(
    conn: protocol.HandoffConnection, flags: HostFlags, token: bytes | None
) -> protocol.Hello:
    return conn.make_hello(
        vm_name=flags.name,
        vm_uuid=uuid.UUID(flags.uuid),
        nonce=secrets.token_bytes(protocol.NONCE_SIZE),
        features=_features(token),
    )


def target_hello(
    conn: protocol.HandoffConnection, flags: HostFlags, token: bytes | None
) -> protocol.Hello:
    """Our answer, with our proof of the token; raises Incompatible (version) or Refused (the
    source's token configuration differs from ours), after which the caller sends the refusal.
    A source without a token is refused here, before it sends any fd."""
    refusal = conn.version_refusal()
    if refusal is not None:
        raise Incompatible(refusal.reason)
    source = conn.peer_hello
    assert source is not None
    has_token = protocol.TOKEN_FEATURE in source.features
    if (token is None) != (not has_token):
        who = "the source" if has_token else "this VMM"
        raise AuthRefused(
            f"{who} requires a handoff token and the other side was given none: "
            "pass the same token to both VMMs"
        )
    proof = b""
    if token is not None:
        proof = protocol.token_proof(token, source.nonce, protocol.Role.TARGET)
    return conn.make_hello(
        vm_name=flags.name,
        vm_uuid=uuid.UUID(flags.uuid),
        nonce=secrets.token_bytes(protocol.NONCE_SIZE),
        features=_features(token),
        proof=proof,
    )


def check_token(conn: protocol.HandoffConnection, token: bytes | None, peer_proof: bytes) -> None:
    """Check the peer's proof against the nonce of our own Hello; raise AuthRefused if bad."""
    assert conn.our_hello is not None and conn.peer_hello is not None
    refusal = protocol.check_peer_token(
        token,
        our_nonce=conn.our_hello.nonce,
        peer_role=conn.our_role.peer,
        peer_features=conn.peer_hello.features,
        peer_proof=peer_proof,
    )
    if refusal is not None:
        raise AuthRefused(refusal.reason)


def source_proof(conn: protocol.HandoffConnection, token: bytes | None) -> bytes:
    if token is None:
        return b""
    assert conn.peer_hello is not None
    return protocol.token_proof(token, conn.peer_hello.nonce, protocol.Role.SOURCE)


HYPERVISOR_FLAG = "hypervisor"


def hypervisor_of(describe: protocol.Describe) -> str:
    """The kernel the source runs the guest on (kvmstub for a release older than the flag)."""
    return describe.host_flags.get(HYPERVISOR_FLAG, "kvmstub")


def describe_from(
    cfg: GuestConfig,
    flags: HostFlags,
    sev: dict[str, int],
    measurement: bytes | None,
    proof: bytes = b"",
    *,
    copy_memory: bool = False,
    handoff_id: str = "",
) -> protocol.Describe:
    slots = tuple(
        protocol.MemfdSlot(slot=s.slot, guest_phys_addr=s.guest_phys_addr, size=s.size, offset=0)
        for s in cfg.slots()
    )
    sev_ctx = None
    if cfg.mode != "plain":
        sev_ctx = protocol.SevContext(
            handle=sev.get("handle", 0),
            state=sev.get("state", abi.SEV_GUEST_STATE_RUNNING),
            measurement=measurement if measurement and len(measurement) == 32 else None,
        )
    host = {
        "name": flags.name,
        "log_level": flags.log_level,
        "control": flags.control or "",
        "serial_log": flags.serial_log or "",
        # The kernel the guest runs on: a guest cannot change kernels in a handoff. A host flag
        # (an older target ignores it; an older source sends none: kvmstub, all it knew).
        HYPERVISOR_FLAG: flags.hypervisor,
    }
    if handoff_id:
        # So that both sides log the handoff under one id. A host flag, which every protocol
        # version carries and an older target ignores.
        host[HANDOFF_ID_FLAG] = handoff_id
    return protocol.Describe(
        vcpus=cfg.vcpus,
        memory_bytes=cfg.memory,
        slots=slots,
        mode=cfg.mode,
        policy=cfg.policy,
        line_every=cfg.line_every,
        flip_every=cfg.flip_every,
        sev=sev_ctx,
        host_flags=host,
        proof=proof,
        copy_memory=copy_memory,
    )


HANDOFF_ID_FLAG = "handoff_id"
_HANDOFF_ID_RE = re.compile(r"^[0-9a-f]{8,32}$")


def handoff_id_of(d: protocol.Describe) -> str | None:
    """The source's id for this handoff, if it sent a well-formed one."""
    hid = d.host_flags.get(HANDOFF_ID_FLAG, "")
    return hid if _HANDOFF_ID_RE.match(hid) else None


def guest_config_of(d: protocol.Describe) -> GuestConfig:
    return GuestConfig(
        vcpus=d.vcpus,
        memory=d.memory_bytes,
        mode=d.mode,
        policy=d.policy,
        line_every=d.line_every,
        flip_every=d.flip_every,
    )


def slots_match(d: protocol.Describe, cfg: GuestConfig) -> str | None:
    """The source's memory layout must be the one our config builds (same slots, offset 0)."""
    ours = [(s.slot, s.guest_phys_addr, s.size, 0) for s in cfg.slots()]
    theirs = [(s.slot, s.guest_phys_addr, s.size, s.offset) for s in d.slots]
    if ours != theirs:
        return f"memory layout differs: ours {ours}, the source's {theirs}"
    return None


def sev_cache_of(d: protocol.Describe) -> dict[str, int]:
    if d.sev is None:
        return {}
    return {"handle": d.sev.handle, "state": d.sev.state, "policy": d.policy}


# Protocol versions 1 and 2 carry a vCPU's state as struct kvm_regs (`protocol.Regs`), which is
# what the kvmstub backend's `VcpuState` holds: its blob is msgpack of kvm_regs as a map, the
# encoding `protocol.Regs` reads and writes. State of another backend cannot cross them.
# Version 3 carries every backend's `VcpuState` as it is (`protocol.VcpuStateWire`).
KVM_REGS_BACKEND = "kvmstub"
KVM_REGS_VERSION = 1
_regs_decoder = msgspec.msgpack.Decoder(protocol.Regs)
_regs_encoder = msgspec.msgpack.Encoder()


def wire_regs(state: VcpuState) -> protocol.Regs:
    """A vCPU's state as protocol 1 and 2 carry it (struct kvm_regs); `Incompatible` for
    state these versions cannot carry."""
    if state.backend != KVM_REGS_BACKEND or state.version != KVM_REGS_VERSION:
        raise Incompatible(
            f"vCPU state of backend {state.backend!r} format {state.version} cannot cross "
            f"protocol 1 or 2, which carry only {KVM_REGS_BACKEND}'s kvm_regs "
            f"(format {KVM_REGS_VERSION})"
        )
    try:
        return _regs_decoder.decode(state.blob)
    except msgspec.DecodeError as exc:
        raise Incompatible(f"vCPU state is not kvm_regs: {exc}") from None


def regs_state(regs: protocol.Regs) -> VcpuState:
    """The kvmstub backend's `VcpuState` for kvm_regs received over protocol 1 or 2."""
    return VcpuState(
        backend=KVM_REGS_BACKEND, version=KVM_REGS_VERSION, blob=_regs_encoder.encode(regs)
    )


#: The seals a version-3 vCPU state memfd must carry: nobody can change it once sent.
VCPU_STATES_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def switchover_from(
    state: DeviceState,
    states: Sequence[VcpuState] | None,
    *,
    version: int,
    inline_max: int = protocol.INLINE_VCPU_STATES_BYTES,
) -> tuple[protocol.Switchover, OwnedFds]:
    """The Switchover for protocol `version`, and the fds to send after the source VM's (a
    sealed memfd of the vCPU states when version 3 would carry more than `inline_max` bytes
    of them inline; none otherwise). The caller sends, then closes those fds."""
    regs: tuple[protocol.Regs, ...] | None = None
    wire: tuple[protocol.VcpuStateWire, ...] | None = None
    memfd_size: int | None = None
    extra = OwnedFds()
    if states is not None:
        if version < protocol.VCPU_STATES_VERSION:
            regs = tuple(wire_regs(s) for s in states)
        else:
            wire = tuple(_wire_state(s) for s in states)
            if sum(len(s.blob) for s in wire) > inline_max:
                data = protocol.encode_vcpu_states(wire)
                extra.append(_sealed_memfd(data))
                wire, memfd_size = None, len(data)
    blobs = {"doorbell": state.doorbell_blob()}
    if version >= protocol.VCPU_STATES_VERSION:
        blobs.update(_extra_blobs(state))
    sw = protocol.Switchover(
        doorbell_sum=sum(state.doorbell_sums) & 0xFFFF_FFFF,
        device_blobs=blobs,
        shared_regions=tuple((gpa, pages) for gpa, pages in state.shared_regions),
        regs=regs,
        vcpu_states=wire,
        vcpu_states_memfd=memfd_size,
        paused_at_ns=time.monotonic_ns(),
    )
    return sw, extra


# Protocol 3's further device blobs: the VM's own kernel state (`hv.VmState`, the real KVM's
# PIT, interrupt controllers and clock) and each vCPU's unfinished serial line, in as many
# "serial<N>" blobs as they need (each at most protocol.MAX_DEVICE_BLOB_BYTES). An older
# release's target never gets them: its guests (kvmstub's) keep neither.
VM_BLOB = "vm"
SERIAL_BLOB = "serial"
MIGRATION_CONTROL_BLOB = "migration-control"  # one byte: the guest's MSR_KVM_MIGRATION_CONTROL


def _extra_blobs(state: DeviceState) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if state.vm_state is not None:
        out[VM_BLOB] = msgspec.msgpack.encode(state.vm_state)
    if state.migration_control is not None:
        out[MIGRATION_CONTROL_BLOB] = bytes([state.migration_control & 1])
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for vcpu, line in state.serial_partial:
        item = (vcpu, line)  # at most MAX_PARTIAL_LINE: the serial device keeps no more
        if size + len(item[1]) + 16 > protocol.MAX_DEVICE_BLOB_BYTES - 16:
            out[f"{SERIAL_BLOB}{len(out)}"] = msgspec.msgpack.encode(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1]) + 16
    if chunk:
        out[f"{SERIAL_BLOB}{len(out)}"] = msgspec.msgpack.encode(chunk)
    if len(out) + 1 > protocol.MAX_DEVICE_BLOBS:
        raise Incompatible("the device state does not fit the protocol's device blobs")
    return out


_partials = msgspec.msgpack.Decoder(list[tuple[int, bytes]])
_vm_state = msgspec.msgpack.Decoder(VmState)


def _state_of_blobs(
    blobs: dict[str, bytes], vcpus: int
) -> tuple[tuple[tuple[int, bytes], ...], VmState | None, int | None]:
    """The unfinished serial lines, the VM state and the guest's migration control the further
    blobs carry (PeerFailed if anything is malformed)."""
    partial: dict[int, bytes] = {}
    vm_state: VmState | None = None
    control: int | None = None
    try:
        for name, blob in blobs.items():
            if name == VM_BLOB:
                vm_state = _vm_state.decode(blob)
            elif name == MIGRATION_CONTROL_BLOB:
                if blob not in (b"\x00", b"\x01"):
                    raise ValueError("the migration control is not one byte 0 or 1")
                control = blob[0]
            elif name.startswith(SERIAL_BLOB):
                for vcpu, line in _partials.decode(blob):
                    if not 0 <= vcpu < vcpus or len(line) > MAX_PARTIAL_LINE or vcpu in partial:
                        raise ValueError(f"an unfinished serial line for vCPU {vcpu} is unusable")
                    partial[vcpu] = line
    except (msgspec.DecodeError, ValueError) as exc:
        raise PeerFailed(f"switchover carried unusable device state: {exc}") from None
    return tuple(sorted(partial.items())), vm_state, control


def _wire_state(state: VcpuState) -> protocol.VcpuStateWire:
    if len(state.blob) > protocol.MAX_VCPU_STATE_BYTES:
        raise Incompatible(
            f"a {len(state.blob)}-byte vCPU state of backend {state.backend!r} exceeds the "
            f"protocol's {protocol.MAX_VCPU_STATE_BYTES}-byte bound"
        )
    return protocol.VcpuStateWire(backend=state.backend, version=state.version, blob=state.blob)


def _sealed_memfd(data: bytes) -> int:
    with OwnedFds(
        [os.memfd_create("handoff-vcpu-states", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)]
    ) as fd:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd[0], view[done:], done)
        fcntl.fcntl(fd[0], fcntl.F_ADD_SEALS, VCPU_STATES_SEALS)
        return fd.pop()


def read_vcpu_states_memfd(fd: int, size: int) -> bytes:
    """The content of a peer's vCPU state memfd, checked before anything is read: a sealed
    memfd (VCPU_STATES_SEALS) of exactly `size` bytes, at most the protocol's bound.
    `PeerFailed` otherwise. The caller owns (and closes) `fd`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PeerFailed("the source's vCPU state fd is not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise PeerFailed("the source's vCPU state fd is not a memfd (it takes no seals)") from None
    if seals & VCPU_STATES_SEALS != VCPU_STATES_SEALS:
        raise PeerFailed(
            f"the source's vCPU state memfd is not sealed (seals {seals:#x}, needed "
            f"{VCPU_STATES_SEALS:#x}): it could change while we read it"
        )
    if st.st_size > protocol.MAX_VCPU_STATES_BYTES or st.st_size != size:
        raise PeerFailed(
            f"the source's vCPU state memfd holds {st.st_size} bytes, Switchover said {size} "
            f"(at most {protocol.MAX_VCPU_STATES_BYTES})"
        )
    chunks: list[bytes] = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    if done != size:
        raise PeerFailed(f"the source's vCPU state memfd ended after {done} of {size} bytes")
    return b"".join(chunks)


def switchover_state(
    sw: protocol.Switchover, describe: protocol.Describe, extra: OwnedFds | None = None
) -> tuple[list[VcpuState] | None, DeviceState]:
    """The vCPU and device state a received Switchover carries. `extra` holds the fds that
    came after the source VM's (the vCPU state memfd, version 3): read here and closed on
    every path. `PeerFailed` if anything is unusable."""
    with extra if extra is not None else OwnedFds() as owned:
        regions = [(int(r[0]), int(r[1])) for r in sw.shared_regions]
        states: list[VcpuState] | None = None
        if sw.regs is not None:
            states = [regs_state(r) for r in sw.regs]
        elif sw.vcpu_states is not None:
            states = [_hv_state(s) for s in sw.vcpu_states]
        elif sw.vcpu_states_memfd is not None:
            if len(owned) != 1:
                raise PeerFailed(
                    f"Switchover said its vCPU states are in a memfd; {len(owned)} fds came "
                    "besides the source VM's"
                )
            data = read_vcpu_states_memfd(owned[0], sw.vcpu_states_memfd)
            try:
                wire = protocol.decode_vcpu_states(data, describe)
            except protocol.RemoteProtocolError as exc:
                raise PeerFailed(str(exc)) from None
            states = [_hv_state(s) for s in wire]
        try:
            sums = DeviceState.sums_from_blob(sw.device_blobs.get("doorbell", b""))
        except ValueError as exc:
            raise PeerFailed(f"switchover carried unusable device state: {exc}") from None
        if sum(sums) & 0xFFFF_FFFF != sw.doorbell_sum:
            raise PeerFailed("switchover's doorbell state does not add up to its declared sum")
        partial, vm_state, control = _state_of_blobs(sw.device_blobs, describe.vcpus)
        return states, DeviceState(
            doorbell_sums=sums,
            shared_regions=regions,
            serial_partial=partial,
            vm_state=vm_state,
            migration_control=control,
        )


def _hv_state(s: protocol.VcpuStateWire) -> VcpuState:
    return VcpuState(backend=s.backend, version=s.version, blob=s.blob)


def resumed_message(
    conn: protocol.HandoffConnection, prepare_ns: int, restore_ns: int, commit_wait_ns: int
) -> protocol.Resumed:
    if (conn.version or 1) < 2:
        return protocol.Resumed()
    return protocol.Resumed(
        timings=protocol.TargetTimings(
            prepare_ns=max(0, prepare_ns),
            restore_ns=max(0, restore_ns),
            commit_wait_ns=max(0, commit_wait_ns),
            resumed_at_ns=time.monotonic_ns(),
        )
    )
