"""The messages between kvmstub clients and the daemon: one msgspec Struct per datagram.

Every KVM object a client holds (the system fd, a VM, a vCPU) is one end of a SOCK_SEQPACKET
socket; an ioctl is one request datagram sent on that fd and one reply datagram read back on
it. Requests and replies are msgpack-encoded tagged unions (array-like Structs, so the tag is
the first array element and the request `id`, echoed in the reply, the second). A request that
names an fd argument (the source VM of a MOVE/COPY, the memfd of a memory slot) carries it as
SCM_RIGHTS with the datagram, never as a number: `declared_fds()` says how many it may carry.

Every integer is bounded here (`msgspec.Meta`), so a decoded request is already within the
kernel struct's field widths; the model still does the kernel's own checks. This module does
no I/O and imports only `kvmstub.uapi`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from kvmstub import uapi

# One datagram, either way. Stays below the default unix socket send buffer (net.core.
# wmem_default, 208 KiB), which caps a SEQPACKET datagram, so no setsockopt is needed.
MAX_DATAGRAM: Final = 128 * 1024
# A reply too big for one datagram (statistics of many VMs with many vCPUs, a long
# DBG_DECRYPT) travels in a memfd attached to a `Spilled` reply, up to this size.
MAX_SPILLED: Final = 64 * 1024 * 1024
# The most ioctls one `SevIoctlBatch` carries (a page's RECEIVE_UPDATE_DATA is about 4.2 KiB:
# the datagram bounds a batch of those to about 30).
MAX_BATCH: Final = 64
# Ancillary space a receiver reserves for fds: more than any request declares (1), so that
# "too many fds" is seen and refused instead of being silently cut (MSG_CTRUNC).
MAX_FDS_RECEIVED: Final = 8

U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1

# msgpack carries at most 2**64-1, and msgspec cannot express an upper bound beyond int64, so
# "ge=0" is the whole u64 bound; the encoder refuses anything larger with OverflowError.
U64 = Annotated[int, msgspec.Meta(ge=0)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
Blob = Annotated[bytes, msgspec.Meta(max_length=MAX_DATAGRAM)]
FieldName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
SevFields = Annotated[dict[FieldName, U64 | Blob], msgspec.Meta(max_length=32)]
EnableCapArgs = Annotated[tuple[U64, ...], msgspec.Meta(max_length=4)]  # struct kvm_enable_cap
ArgIndex = Annotated[int, msgspec.Meta(ge=0, le=3)]
U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
# A dirty bitmap in a reply (spilled to a memfd when large): only the runs that may be non-zero
# are sent, each at least one 64-bit word.
Bitmap = Annotated[bytes, msgspec.Meta(max_length=MAX_SPILLED)]
DirtyRuns = Annotated[tuple[tuple[U64, Bitmap], ...], msgspec.Meta(max_length=MAX_SPILLED // 8)]
MsrBitmap = Annotated[bytes, msgspec.Meta(max_length=uapi.KVM_MSR_FILTER_MAX_BITMAP_SIZE)]
Errno = Annotated[int, msgspec.Meta(ge=1, le=4095)]
Message = Annotated[str, msgspec.Meta(max_length=4096)]

# KVM_ENABLE_CAP capabilities whose args[0] is an fd (reference section 0).
FD_ARG_CAPS: Final = frozenset(
    {uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM, uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM}
)


class WireRegs(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """struct kvm_regs on the wire: `uapi.Regs` with every register bounded to 64 bits."""

    rax: U64 = 0
    rbx: U64 = 0
    rcx: U64 = 0
    rdx: U64 = 0
    rsi: U64 = 0
    rdi: U64 = 0
    rsp: U64 = 0
    rbp: U64 = 0
    r8: U64 = 0
    r9: U64 = 0
    r10: U64 = 0
    r11: U64 = 0
    r12: U64 = 0
    r13: U64 = 0
    r14: U64 = 0
    r15: U64 = 0
    rip: U64 = 0
    rflags: U64 = 0x2


def regs_to_wire(regs: uapi.Regs) -> WireRegs:
    return WireRegs(*msgspec.structs.astuple(regs))


def regs_from_wire(regs: WireRegs) -> uapi.Regs:
    return uapi.Regs(*msgspec.structs.astuple(regs))


# --- requests -------------------------------------------------------------------------------


class Request(msgspec.Struct, array_like=True, tag=True, forbid_unknown_fields=True):
    """Base of every request; `id` is chosen by the client and echoed in the reply."""

    id: U64


# System fd ("/dev/kvm")
class GetApiVersion(Request):
    """KVM_GET_API_VERSION -> Ok(result=12)."""


class CheckExtension(Request):
    """KVM_CHECK_EXTENSION -> Ok(result). Also valid on a VM fd, as in the kernel."""

    cap: U64


class CreateVm(Request):
    """KVM_CREATE_VM -> NewObject("vm") with the VM fd attached."""

    vm_type: U64 = 0


class Stats(Request):
    """kvmstub's own: the model's statistics -> StatsReply."""


class SevIssueCmd(Request):
    """The /dev/sev ioctl SEV_ISSUE_CMD (struct sev_issue_cmd): platform command `cmd` with
    its struct's fields by their kernel names -> Ok(fields); a firmware failure is EIO with
    `fw_error`. kvmstub serves /dev/sev on the same socket as /dev/kvm (one host)."""

    cmd: U32
    fields: SevFields | None = None


# VM fd
class CreateVcpu(Request):
    """KVM_CREATE_VCPU -> NewObject("vcpu") with the vCPU fd attached."""

    vcpu_id: U32


class SetUserMemoryRegion(Request):
    """KVM_SET_USER_MEMORY_REGION. The memfd travels with the request when `has_fd`;
    `offset` (into the memfd) stands for userspace_addr, which the daemon cannot see."""

    slot: U32
    flags: U32
    guest_phys_addr: U64
    memory_size: U64
    offset: U64 = 0
    has_fd: bool = True


class GetDirtyLog(Request):
    """KVM_GET_DIRTY_LOG (struct kvm_dirty_log: slot) -> DirtyLogReply."""

    slot: U32


class ClearDirtyLog(Request):
    """KVM_CLEAR_DIRTY_LOG (struct kvm_clear_dirty_log). `bitmap` is what dirty_bitmap
    points to: ALIGN(num_pages, 64) / 8 bytes are read (fewer: EFAULT). One datagram caps
    it at 128 KiB, a million pages per call: clear a larger log in parts, as the kernel's
    64-page alignment allows."""

    slot: U32
    first_page: U64
    num_pages: U32
    bitmap: Blob = b""


class EnableCap(Request):
    """KVM_ENABLE_CAP. If `fd_arg` is set, args[fd_arg] is an fd and the fd itself travels
    with the request (the number in args is only the client's own, for logs)."""

    cap: U32
    flags: U32 = 0
    args: EnableCapArgs = ()
    fd_arg: ArgIndex | None = None


class WireMsrFilterRange(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """struct kvm_msr_filter_range; `bitmap` is what its pointer points to."""

    flags: U32
    nmsrs: U32
    base: U32
    bitmap: MsrBitmap = b""


class SetMsrFilter(Request):
    """KVM_X86_SET_MSR_FILTER (struct kvm_msr_filter): flags and up to 16 ranges."""

    flags: U32 = 0
    ranges: Annotated[
        tuple[WireMsrFilterRange, ...], msgspec.Meta(max_length=uapi.KVM_MSR_FILTER_MAX_RANGES)
    ] = ()


class SevIoctl(Request):
    """KVM_MEMORY_ENCRYPT_OP: struct kvm_sev_cmd. `fields` None is the kernel's NULL
    `data` pointer; otherwise the command's struct fields by their kernel names."""

    cmd: U32
    fields: SevFields | None = None


class SevBatchEntry(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One KVM_MEMORY_ENCRYPT_OP of a `SevIoctlBatch`: what a `SevIoctl` carries."""

    cmd: U32
    fields: SevFields | None = None


class SevIoctlBatch(Request):
    """kvmstub's own submission of several KVM_MEMORY_ENCRYPT_OPs on this VM fd in one
    datagram, as a VMM thread would issue them one after another (io_uring's idea). The daemon
    runs each entry exactly as the `SevIoctl` it stands for (the same checks, errno, firmware
    status and side effects), in order, and stops at the first that fails -> `BatchReply`.
    It saves the round trip per ioctl, which is a cost of simulating the kernel in another
    process (a real ioctl is a system call): the kernel's semantics stay one ioctl at a time
    (SEND/RECEIVE_UPDATE_DATA still move one page each)."""

    entries: Annotated[tuple[SevBatchEntry, ...], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class RegRegion(Request):
    """KVM_MEMORY_ENCRYPT_REG_REGION (struct kvm_enc_region)."""

    addr: U64
    size: U64


class UnregRegion(Request):
    """KVM_MEMORY_ENCRYPT_UNREG_REGION (struct kvm_enc_region)."""

    addr: U64
    size: U64


# vCPU fd
class WireCpuidEntry(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """struct kvm_cpuid_entry2."""

    function: U32
    index: U32 = 0
    flags: U32 = 0
    eax: U32 = 0
    ebx: U32 = 0
    ecx: U32 = 0
    edx: U32 = 0


class SetCpuid2(Request):
    """KVM_SET_CPUID2. More entries than the kernel's 256 still decode (up to 1024), so
    that the model answers E2BIG as the kernel does."""

    entries: Annotated[tuple[WireCpuidEntry, ...], msgspec.Meta(max_length=1024)] = ()


class Run(Request):
    """KVM_RUN. `io_data` (the IN bytes), `hypercall_ret` and `msr_error` (kvm_run.msr.error
    after an MSR exit) complete the previous exit, as a VMM writes them into kvm_run before
    re-entering; `immediate_exit` is kvm_run's flag."""

    immediate_exit: bool = False
    io_data: Blob | None = None
    hypercall_ret: U64 | None = None
    msr_error: U8 | None = None


class GetRegs(Request):
    """KVM_GET_REGS -> RegsReply."""


class SetRegs(Request):
    """KVM_SET_REGS."""

    regs: WireRegs


AnyRequest = (
    GetApiVersion
    | CheckExtension
    | CreateVm
    | Stats
    | SevIssueCmd
    | CreateVcpu
    | SetUserMemoryRegion
    | GetDirtyLog
    | ClearDirtyLog
    | EnableCap
    | SetMsrFilter
    | SevIoctl
    | SevIoctlBatch
    | RegRegion
    | UnregRegion
    | SetCpuid2
    | Run
    | GetRegs
    | SetRegs
)

# Which requests each kind of fd understands. The daemon answers any other request as the
# kernel answers an ioctl its file does not know (see the daemon for the errno per kind).
SYSTEM_REQUESTS: Final[frozenset[type[Request]]] = frozenset(
    {GetApiVersion, CheckExtension, CreateVm, Stats, SevIssueCmd}
)
VM_REQUESTS: Final[frozenset[type[Request]]] = frozenset(
    {
        CheckExtension,
        CreateVcpu,
        SetUserMemoryRegion,
        GetDirtyLog,
        ClearDirtyLog,
        EnableCap,
        SetMsrFilter,
        SevIoctl,
        SevIoctlBatch,
        RegRegion,
        UnregRegion,
    }
)
VCPU_REQUESTS: Final[frozenset[type[Request]]] = frozenset({SetCpuid2, Run, GetRegs, SetRegs})


def declared_fds(request: Request) -> int:
    """How many fds `request` may carry as SCM_RIGHTS (at most; fewer is an absent fd)."""
    if isinstance(request, SetUserMemoryRegion):
        return 1 if request.has_fd else 0
    if isinstance(request, EnableCap):
        return 0 if request.fd_arg is None else 1
    return 0


# --- replies --------------------------------------------------------------------------------


class Reply(msgspec.Struct, array_like=True, tag=True):
    """Base of every reply; `id` echoes the request's."""

    id: U64


class Ok(Reply):
    """Success. `result` is the ioctl's return value; `fields` the output fields of a
    KVM_MEMORY_ENCRYPT_OP command (e.g. GUEST_STATUS -> policy, state, handle)."""

    result: int = 0
    fields: SevFields | None = None


class NewObject(Reply):
    """A new VM or vCPU: its fd is attached to this datagram (SCM_RIGHTS)."""

    kind: Literal["vm", "vcpu"]


class RunReply(Reply):
    exit: uapi.RunExit


class RegsReply(Reply):
    regs: WireRegs


class DirtyLogReply(Reply):
    """KVM_GET_DIRTY_LOG's bitmap: `size` bytes (the slot's ALIGN(npages, 64) / 8), zero
    but for `runs`, (byte offset, bytes) in increasing order (`uapi.DirtyLog`): only the
    runs travel, so a large slot's log costs what the guest dirtied."""

    size: U64
    runs: DirtyRuns = ()


class StatsReply(Reply):
    stats: dict[str, Any]


class Spilled(Reply):
    """The reply did not fit a datagram: a memfd attached to this one holds it, encoded
    (at most MAX_SPILLED bytes)."""


class Error(Reply):
    """The ioctl failed with `errno`. A SEV firmware failure is EIO with `fw_error` set to the
    SEV status code (kvm_sev_cmd.error), and `fields` the output fields the kernel copies back
    even so (the length of a query, SEND_START's policy and session_len)."""

    errno: Errno
    message: Message = ""
    fw_error: U32 | None = None
    fields: SevFields | None = None


class BatchReply(Reply):
    """The answer to a `SevIoctlBatch`: one `Ok` for each entry that ran, in order, and, if
    one failed, its `Error` last; the entries after it did not run."""

    results: tuple[Ok | Error, ...]


AnyReply = (
    Ok
    | NewObject
    | RunReply
    | RegsReply
    | DirtyLogReply
    | StatsReply
    | Spilled
    | Error
    | BatchReply
)


# --- encoding -------------------------------------------------------------------------------


class WireError(ValueError):
    """A datagram that is not a valid message; the text says why."""


_encoder: Final = msgspec.msgpack.Encoder()
_request_decoder: Final[msgspec.msgpack.Decoder[AnyRequest]] = msgspec.msgpack.Decoder(AnyRequest)
_reply_decoder: Final[msgspec.msgpack.Decoder[AnyReply]] = msgspec.msgpack.Decoder(AnyReply)

encode = _encoder.encode


def decode_request(data: bytes | memoryview) -> AnyRequest:
    """Decode one request datagram. Raises WireError for anything that is not a request."""
    try:
        return _request_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError) as e:
        # RecursionError: msgspec's answer to absurdly nested input.
        raise WireError(f"malformed request: {e}") from None


def decode_reply(data: bytes | memoryview) -> AnyReply:
    """Decode one reply datagram. Raises WireError for anything that is not a reply."""
    try:
        return _reply_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError) as e:
        raise WireError(f"malformed reply: {e}") from None


def request_id_of(data: bytes | memoryview) -> int:
    """The id of a request that could not be decoded, if its first bytes hold one; else 0.

    Reads only the head (array header, tag string, id), so it works on a truncated datagram
    too, and the refusal of an oversized request still reaches the request's caller.
    """
    head = bytes(data[:64])
    try:
        pos = _skip_array_header(head, 0)
        pos = _skip_str(head, pos)
        return _read_uint(head, pos)
    except (IndexError, ValueError):
        return 0


def _skip_array_header(head: bytes, pos: int) -> int:
    first = head[pos]
    if 0x90 <= first <= 0x9F:  # fixarray
        return pos + 1
    width = {0xDC: 2, 0xDD: 4}.get(first)  # array 16 / 32
    if width is None:
        raise ValueError("not an array")
    return pos + 1 + width


def _skip_str(head: bytes, pos: int) -> int:
    first = head[pos]
    if 0xA0 <= first <= 0xBF:  # fixstr
        return pos + 1 + (first & 0x1F)
    width = {0xD9: 1, 0xDA: 2, 0xDB: 4}.get(first)  # str 8 / 16 / 32
    if width is None:
        raise ValueError("not a string")
    length = int.from_bytes(head[pos + 1 : pos + 1 + width], "big")
    return pos + 1 + width + length


def _read_uint(head: bytes, pos: int) -> int:
    first = head[pos]
    if first <= 0x7F:  # positive fixint
        return first
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(first)  # uint 8 / 16 / 32 / 64
    if width is None or pos + 1 + width > len(head):
        raise ValueError("not an unsigned integer")
    return int.from_bytes(head[pos + 1 : pos + 1 + width], "big")
