"""The kernel's user API as kvmstub speaks it: constants with the kernel's names and numbers,
and the plain data that crosses the user/kernel boundary (registers, exits).

Numbers follow include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h and
include/uapi/linux/psp-sev.h. Nothing here does I/O.
"""

from __future__ import annotations

import errno

import msgspec

KVM_API_VERSION = 12

# KVM_CHECK_EXTENSION / KVM_ENABLE_CAP
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0] (include/uapi/linux/kvm.h)
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_HLT = 5
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTR = 10
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# Hypercalls (Documentation/virt/kvm/x86/hypercalls.rst)
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
KVM_ENOSYS = 1000
KVM_EINVAL = 22
KVM_EPERM = 1

# kvm_run.msr.reason, and KVM_CAP_X86_USER_SPACE_MSR args[0] (include/uapi/linux/kvm.h)
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = (
    KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER
)

# KVM_X86_SET_MSR_FILTER (arch/x86/include/uapi/asm/kvm.h)
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY

# Paravirtual CPUID leaves and MSRs (arch/x86/include/uapi/asm/kvm_para.h)
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1 << 0

# KVM_SET_CPUID2 (arch/x86/include/uapi/asm/kvm.h, arch/x86/include/asm/kvm_host.h)
KVM_MAX_CPUID_ENTRIES = 256
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

# KVM_SET_USER_MEMORY_REGION flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_USER_MEM_SLOTS = 32764
PAGE_SIZE = 4096

# enum sev_cmd_id (reference section 0)
KVM_SEV_INIT = 0
KVM_SEV_ES_INIT = 1
KVM_SEV_LAUNCH_START = 2
KVM_SEV_LAUNCH_UPDATE_DATA = 3
KVM_SEV_LAUNCH_UPDATE_VMSA = 4
KVM_SEV_LAUNCH_SECRET = 5
KVM_SEV_LAUNCH_MEASURE = 6
KVM_SEV_LAUNCH_FINISH = 7
KVM_SEV_SEND_START = 8
KVM_SEV_SEND_UPDATE_DATA = 9
KVM_SEV_SEND_UPDATE_VMSA = 10
KVM_SEV_SEND_FINISH = 11
KVM_SEV_RECEIVE_START = 12
KVM_SEV_RECEIVE_UPDATE_DATA = 13
KVM_SEV_RECEIVE_UPDATE_VMSA = 14
KVM_SEV_RECEIVE_FINISH = 15
KVM_SEV_GUEST_STATUS = 16
KVM_SEV_DBG_DECRYPT = 17
KVM_SEV_DBG_ENCRYPT = 18
KVM_SEV_CERT_EXPORT = 19
KVM_SEV_GET_ATTESTATION_REPORT = 20
KVM_SEV_SEND_CANCEL = 21
KVM_SEV_INIT2 = 22
KVM_SEV_SNP_LAUNCH_START = 100
KVM_SEV_SNP_LAUNCH_UPDATE = 101
KVM_SEV_SNP_LAUNCH_FINISH = 102
KVM_SEV_NR_MAX = 103

# Guest policy bits (reference section 6)
SEV_POLICY_NODBG = 1 << 0
SEV_POLICY_NOKS = 1 << 1
SEV_POLICY_ES = 1 << 2
SEV_POLICY_NOSEND = 1 << 3
SEV_POLICY_DOMAIN = 1 << 4
SEV_POLICY_SEV = 1 << 5

# Firmware guest states (sev_guest.c state_tbl_sev)
SEV_GUEST_STATE_UNINIT = 0
SEV_GUEST_STATE_LUPDATE = 1
SEV_GUEST_STATE_LSECRET = 2
SEV_GUEST_STATE_RUNNING = 3
SEV_GUEST_STATE_SUPDATE = 4
SEV_GUEST_STATE_RUPDATE = 5
SEV_GUEST_STATE_SENT = 6
SEV_GUEST_STATE_NAMES = {
    0: "UNINIT",
    1: "LUPDATE",
    2: "LSECRET",
    3: "RUNNING",
    4: "SUPDATE",
    5: "RUPDATE",
    6: "SENT",
}

# Platform states (psp-sev.h SEV_STATE_*)
SEV_STATE_UNINIT = 0
SEV_STATE_INIT = 1
SEV_STATE_WORKING = 2
SEV_STATE_NAMES = {0: "UNINIT", 1: "INIT", 2: "WORKING"}

# /dev/sev SEV_ISSUE_CMD commands (psp-sev.h enum sev_cmd ... the user API ids)
SEV_FACTORY_RESET = 0
SEV_PLATFORM_STATUS = 1
SEV_PEK_GEN = 2
SEV_PEK_CSR = 3
SEV_PDH_GEN = 4
SEV_PDH_CERT_EXPORT = 5
SEV_PEK_CERT_IMPORT = 6
SEV_GET_ID = 7
SEV_GET_ID2 = 8
SEV_MAX = 9
# kvmstub's own, outside the kernel's range: the AMD chain (ASK || ARK) that AMD's key server
# hands out for a chip, which a VMM needs for SEND_START. Not a kernel or firmware command.
KVMSTUB_SEV_AMD_CERT_CHAIN = 0x1000
SEV_FW_BLOB_MAX_SIZE = 0x4000

# SEV firmware status codes (psp-sev.h enum sev_ret_code)
SEV_RET_SUCCESS = 0x00
SEV_RET_INVALID_PLATFORM_STATE = 0x01
SEV_RET_INVALID_GUEST_STATE = 0x02
SEV_RET_INAVLID_CONFIG = 0x03
SEV_RET_INVALID_LEN = 0x04
SEV_RET_ALREADY_OWNED = 0x05
SEV_RET_INVALID_CERTIFICATE = 0x06
SEV_RET_POLICY_FAILURE = 0x07
SEV_RET_INACTIVE = 0x08
SEV_RET_INVALID_ADDRESS = 0x09
SEV_RET_BAD_SIGNATURE = 0x0A
SEV_RET_BAD_MEASUREMENT = 0x0B
SEV_RET_ASID_OWNED = 0x0C
SEV_RET_INVALID_ASID = 0x0D
SEV_RET_WBINVD_REQUIRED = 0x0E
SEV_RET_DFFLUSH_REQUIRED = 0x0F
SEV_RET_INVALID_GUEST = 0x10
SEV_RET_INVALID_COMMAND = 0x11
SEV_RET_ACTIVE = 0x12
SEV_RET_UNSUPPORTED = 0x15
SEV_RET_INVALID_PARAM = 0x16

# Ports of the guest's devices (DESIGN.md section 5)
SERIAL_PORT = 0x3F8
DOORBELL_OUT_PORT = 0x510
DOORBELL_IN_PORT = 0x511
IDLE_PORT = 0x512  # OUT u32: the witness guest idles that many microseconds (its VMM waits)

# Firmware API version the stub reports (LAUNCH_MEASURE, policy API_MAJOR/MINOR checks)
SEV_API_MAJOR = 1
SEV_API_MINOR = 55
SEV_BUILD = 21


class Regs(msgspec.Struct, frozen=True):
    """struct kvm_regs (x86): the general purpose registers, rip and rflags."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


REG_NAMES = tuple(Regs.__struct_fields__)
U64_MASK = (1 << 64) - 1


class IoExit(msgspec.Struct, frozen=True):
    """kvm_run.io: a port I/O exit. `data` holds size*count bytes for OUT; for IN it is
    empty and the VMM hands the bytes back with the next KVM_RUN."""

    direction: int
    port: int
    size: int
    count: int
    data: bytes = b""


class HypercallExit(msgspec.Struct, frozen=True):
    """kvm_run.hypercall: the VMM hands `ret` back with the next KVM_RUN."""

    nr: int
    args: tuple[int, int, int, int, int, int]
    longmode: int = 1


class MsrExit(msgspec.Struct, frozen=True):
    """kvm_run.msr, for KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: `reason` is one
    KVM_MSR_EXIT_REASON_* bit, `data` the value a WRMSR writes. The VMM answers with
    kvm_run.msr.error (non-zero: the guest gets #GP) and, for RDMSR, msr.data."""

    reason: int
    index: int
    data: int = 0
    error: int = 0


class MsrFilterRange(msgspec.Struct, frozen=True):
    """struct kvm_msr_filter_range (KVM_X86_SET_MSR_FILTER): for the accesses in `flags`
    (KVM_MSR_FILTER_READ / WRITE) to MSRs base..base+nmsrs-1, bit i of `bitmap` set lets
    KVM handle MSR base+i, clear filters it (to userspace, with KVM_MSR_EXIT_REASON_FILTER
    enabled; else #GP). `bitmap` is BITS_TO_LONGS(nmsrs) longs: 8 bytes per 64 MSRs.

    To see the guest's writes of MSR_KVM_MIGRATION_CONTROL and nothing else:
    `MsrFilterRange(KVM_MSR_FILTER_WRITE, 1, MSR_KVM_MIGRATION_CONTROL, bytes(8))` in a
    default-allow filter, with KVM_CAP_X86_USER_SPACE_MSR(KVM_MSR_EXIT_REASON_FILTER)."""

    flags: int
    nmsrs: int
    base: int
    bitmap: bytes = b""


class CpuidEntry(msgspec.Struct, frozen=True):
    """struct kvm_cpuid_entry2 (KVM_SET_CPUID2)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def kvm_cpuid_leaves(features: int) -> tuple[CpuidEntry, CpuidEntry]:
    """The two paravirtual leaves a VMM puts in KVM_SET_CPUID2 for a KVM guest: the
    signature leaf 0x40000000 ("KVMKVMKVM", highest leaf 0x40000001) and the features leaf
    0x40000001 with `features` (a mask of 1 << KVM_FEATURE_*) in EAX."""
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
    return (
        CpuidEntry(KVM_CPUID_SIGNATURE, eax=KVM_CPUID_FEATURES, ebx=ebx, ecx=ecx, edx=edx),
        CpuidEntry(KVM_CPUID_FEATURES, eax=features & 0xFFFFFFFF),
    )


class RunExit(msgspec.Struct, frozen=True):
    """What KVM_RUN returns: kvm_run.exit_reason plus the member of the union it names."""

    exit_reason: int
    io: IoExit | None = None
    hypercall: HypercallExit | None = None
    msr: MsrExit | None = None


_ZEROS = bytes(64 * 1024)


class DirtyLog(msgspec.Struct, frozen=True):
    """What KVM_GET_DIRTY_LOG copies out to `kvm_dirty_log.dirty_bitmap`: the slot's whole
    bitmap, `size` bytes (ALIGN(npages, 64) / 8; bit i of byte i // 8 is page i), given as
    the `runs` that may be non-zero: (byte offset, bytes) in increasing order, apart, within
    `size`. Every byte outside them is zero. So a 64 GiB slot's 2 MiB log costs what the
    guest dirtied to build, carry and place, while the caller still gets the whole bitmap.
    """

    size: int
    runs: tuple[tuple[int, bytes], ...] = ()

    def problem(self) -> str | None:
        """Why these runs do not describe a bitmap of `size` bytes (None: they do)."""
        end = 0
        for offset, data in self.runs:
            if offset < end:
                return f"dirty log run at byte {offset} overlaps or precedes byte {end}"
            end = offset + len(data)
        if end > self.size:
            return f"dirty log runs end at byte {end}, past the bitmap's {self.size}"
        return None

    def to_bytes(self) -> bytes:
        """The whole bitmap."""
        out = bytearray(self.size)
        for offset, data in self.runs:
            out[offset : offset + len(data)] = data
        return bytes(out)

    def copy_to(self, buffer: bytearray | memoryview) -> None:
        """copy_to_user of the bitmap into `buffer` (the caller's dirty_bitmap): every one of
        its `size` bytes is written. A shorter buffer gets what fits, then EFAULT, as a copy
        that faults part way: the log was read (and, without manual protection, cleared) all
        the same, as in the kernel.

        Raises:
            OSError: EFAULT for a buffer shorter than `size`.
        """
        view = memoryview(buffer).cast("B")
        n = min(self.size, len(view))
        for at in range(0, n, len(_ZEROS)):  # from a zero block in cache, not 2 MiB made anew
            view[at : min(at + len(_ZEROS), n)] = _ZEROS[: n - at]
        for offset, data in self.runs:
            if offset >= n:
                break
            take = min(len(data), n - offset)
            view[offset : offset + take] = data[:take]
        if n < self.size:
            raise OSError(
                errno.EFAULT, f"the dirty bitmap is {self.size} bytes; the buffer holds {n}"
            )
