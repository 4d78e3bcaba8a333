"""kvmstub.wire alone: every message round-trips, every bound holds, garbage is a WireError."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmstub import uapi, wire

REQUESTS: list[wire.Request] = [
    wire.GetApiVersion(1),
    wire.CheckExtension(2, uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM),
    wire.CreateVm(3, 0),
    wire.Stats(4),
    wire.CreateVcpu(5, 3),
    wire.SetUserMemoryRegion(6, 0, 0, 0x1000, 0x10000, offset=0x2000),
    wire.SetUserMemoryRegion(7, 1, 0, 0, 0, has_fd=False),
    wire.EnableCap(8, uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, 0, (9,), fd_arg=0),
    wire.EnableCap(9, uapi.KVM_CAP_EXIT_HYPERCALL, 0, (1 << 12,)),
    wire.SevIoctl(10, uapi.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": 4}),
    wire.SevIoctl(11, uapi.KVM_SEV_DBG_ENCRYPT, {"dst_uaddr": 0, "data": b"\x00" * 64}),
    wire.SevIoctl(12, uapi.KVM_SEV_GUEST_STATUS, None),
    wire.RegRegion(13, 0, 4096),
    wire.UnregRegion(14, 0, 4096),
    wire.Run(15),
    wire.Run(16, immediate_exit=True, io_data=b"\x01\x02\x03\x04", hypercall_ret=wire.U64_MAX),
    wire.GetRegs(17),
    wire.SetRegs(18, wire.regs_to_wire(uapi.Regs(rax=1, rip=wire.U64_MAX))),
    wire.SevIssueCmd(19, uapi.SEV_PDH_CERT_EXPORT, {"pdh_cert_len": 0, "cert_chain_len": 0}),
    wire.SevIssueCmd(20, uapi.SEV_PLATFORM_STATUS, None),
]

REPLIES: list[wire.Reply] = [
    wire.Ok(1),
    wire.Ok(2, 12),
    wire.Ok(3, 0, {"handle": 1, "policy": 4, "state": 1, "measurement": b"m" * 32}),
    wire.NewObject(4, "vm"),
    wire.NewObject(5, "vcpu"),
    wire.RunReply(6, uapi.RunExit(uapi.KVM_EXIT_INTR)),
    wire.RunReply(
        7,
        uapi.RunExit(uapi.KVM_EXIT_IO, io=uapi.IoExit(uapi.KVM_EXIT_IO_OUT, 0x3F8, 1, 3, b"abc")),
    ),
    wire.RunReply(
        8,
        uapi.RunExit(
            uapi.KVM_EXIT_HYPERCALL,
            hypercall=uapi.HypercallExit(uapi.KVM_HC_MAP_GPA_RANGE, (0x1000, 1, 16, 0, 0, 0)),
        ),
    ),
    wire.RegsReply(9, wire.regs_to_wire(uapi.Regs(rbx=7))),
    wire.StatsReply(10, {"vms": [], "asids": {"sev": {"total": 1}}}),
    wire.Spilled(13),
    wire.Error(11, 5, "dead"),
    wire.Error(12, 5, "firmware", fw_error=uapi.SEV_RET_POLICY_FAILURE),
    wire.Error(13, 5, "query", fw_error=uapi.SEV_RET_INVALID_LEN, fields={"session_len": 128}),
]

# Dirty logging, the MSR filter and its exits, CPUID.
REQUESTS += [
    wire.GetDirtyLog(30, 1),
    wire.ClearDirtyLog(31, 1, 64, 128, b"\xff" * 16),
    wire.SetMsrFilter(
        32,
        uapi.KVM_MSR_FILTER_DEFAULT_ALLOW,
        (wire.WireMsrFilterRange(uapi.KVM_MSR_FILTER_WRITE, 1, 0x4B564D08, bytes(8)),),
    ),
    wire.SetCpuid2(33, (wire.WireCpuidEntry(0x40000001, eax=1 << 17),)),
    wire.Run(34, msr_error=1),
]
REPLIES += [
    wire.DirtyLogReply(30, 8, ((0, b"\x01\x80"), (4, bytes(4)))),
    wire.RunReply(
        31,
        uapi.RunExit(
            uapi.KVM_EXIT_X86_WRMSR,
            msr=uapi.MsrExit(uapi.KVM_MSR_EXIT_REASON_FILTER, 0x4B564D08, 1),
        ),
    ),
]

# Several KVM_MEMORY_ENCRYPT_OPs in one submission, and the answer per entry.
REQUESTS += [
    wire.SevIoctlBatch(
        40,
        (
            wire.SevBatchEntry(uapi.KVM_SEV_RECEIVE_UPDATE_DATA, {"hdr": bytes(52), "trans": b""}),
            wire.SevBatchEntry(uapi.KVM_SEV_GUEST_STATUS),
        ),
    )
]
REPLIES += [
    wire.BatchReply(40, (wire.Ok(40, 0, {"hdr": bytes(52)}), wire.Error(40, 5, "", 0xB))),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_type_round_trips_and_fits_a_datagram(request_: wire.Request) -> None:
    data = wire.encode(request_)
    assert len(data) <= wire.MAX_DATAGRAM
    assert wire.decode_request(data) == request_
    assert wire.request_id_of(data) == request_.id


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_type_round_trips(reply: wire.Reply) -> None:
    assert wire.decode_reply(wire.encode(reply)) == reply


def test_the_union_covers_every_request_class_and_each_is_valid_on_some_fd() -> None:
    classes = set(wire.Request.__subclasses__())
    assert classes == {type(r) for r in REQUESTS}
    for cls in classes:
        assert cls in wire.SYSTEM_REQUESTS | wire.VM_REQUESTS | wire.VCPU_REQUESTS
    assert not wire.SYSTEM_REQUESTS & wire.VCPU_REQUESTS


def test_only_fd_carrying_requests_declare_fds() -> None:
    declared = {type(r).__name__: wire.declared_fds(r) for r in REQUESTS if wire.declared_fds(r)}
    assert declared == {"SetUserMemoryRegion": 1, "EnableCap": 1}
    assert wire.declared_fds(wire.SetUserMemoryRegion(1, 0, 0, 0, 0, has_fd=False)) == 0
    assert wire.declared_fds(wire.EnableCap(1, uapi.KVM_CAP_EXIT_HYPERCALL)) == 0


def test_regs_convert_both_ways_unchanged() -> None:
    regs = uapi.Regs(*range(1, len(uapi.REG_NAMES) + 1))
    assert wire.regs_from_wire(wire.regs_to_wire(regs)) == regs


def _raw(tag: str, *fields: Any) -> bytes:
    return msgspec.msgpack.encode([tag, *fields])


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_raw("CreateVcpu", 1, -1), "negative vcpu id"),
        (_raw("CreateVcpu", 1, 1 << 32), "vcpu id wider than u32"),
        (_raw("CheckExtension", -1, 0), "negative request id"),
        (_raw("RegRegion", 1, -4096, 4096), "negative address"),
        (_raw("EnableCap", 1, 206, 0, [1, 2, 3, 4, 5]), "five enable_cap args"),
        (_raw("EnableCap", 1, 206, 0, [1], 4), "fd_arg beyond args[3]"),
        (_raw("SevIoctl", 1, 2, {"policy": -1}), "negative field"),
        (_raw("SevIoctl", 1, 2, {"": 1}), "empty field name"),
        (_raw("SevIoctl", 1, 2, {"x" * 65: 1}), "field name too long"),
        (_raw("SevIoctl", 1, 2, {f"f{i}": i for i in range(33)}), "too many fields"),
        (_raw("SevIoctl", 1, 2, {"policy": "4"}), "field of the wrong type"),
        (_raw("SevIoctlBatch", 1, []), "an empty batch"),
        (_raw("SevIoctlBatch", 1, [[2, None]] * 65), "a batch of more than MAX_BATCH"),
        (_raw("SevIoctlBatch", 1, [[2, {"policy": -1}]]), "a batch entry's negative field"),
        (_raw("SevIoctlBatch", 1, [[2, None, 3]]), "a batch entry with an extra field"),
        (_raw("Run", 1, False, None, -1), "negative hypercall ret"),
        (_raw("SetRegs", 1, [-1]), "negative register"),
        (_raw("GetApiVersion", 1, 2), "a field the request does not have"),
        (_raw("NoSuchIoctl", 1), "unknown tag"),
        (_raw("Ok", 1), "a reply sent as a request"),
        (msgspec.msgpack.encode({"GetApiVersion": 1}), "not an array"),
        (b"\x91" * 100_000 + b"\x00", "absurd nesting"),
        (b"", "empty datagram"),
        (b"\xc1", "reserved msgpack byte"),
        (wire.encode(wire.SetUserMemoryRegion(6, 0, 0, 0, 4096))[:-3], "truncated"),
    ],
)
def test_out_of_bounds_or_malformed_requests_are_wire_errors(data: bytes, why: str) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_request(data)


def test_the_id_of_a_bad_request_is_recovered_when_it_has_one() -> None:
    assert wire.request_id_of(_raw("CreateVcpu", 77, -1)) == 77
    assert wire.request_id_of(_raw("NoSuchIoctl", 78, "x")) == 78
    assert wire.request_id_of(b"\xc1garbage") == 0
    assert wire.request_id_of(_raw("CreateVcpu", -5)) == 0
    big = wire.encode(wire.SevIoctl(1 << 40, 18, {"data": b"x" * 1000}))
    assert wire.request_id_of(big[:30]) == 1 << 40  # a truncated datagram keeps its id
    assert wire.request_id_of(msgspec.msgpack.encode(["x" * 40, 9])) == 9  # a str 8 tag


def test_integers_wider_than_msgpack_cannot_be_encoded() -> None:
    with pytest.raises(OverflowError):
        wire.encode(wire.RegRegion(1, 1 << 64, 0))


@given(st.binary(max_size=512))
def test_random_bytes_decode_to_a_request_or_a_wire_error(data: bytes) -> None:
    try:
        request = wire.decode_request(data)
    except wire.WireError:
        return
    assert isinstance(request, wire.Request)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.binary(max_size=16)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@given(
    st.sampled_from([cls.__name__ for cls in wire.Request.__subclasses__()]),
    st.lists(_values, max_size=8),
)
def test_tagged_arrays_of_any_values_decode_to_that_request_or_a_wire_error(
    tag: str, fields: list[Any]
) -> None:
    try:
        request = wire.decode_request(_raw(tag, *fields))
    except wire.WireError:
        return
    assert type(request).__name__ == tag
