"""The few numbers of the kernel's KVM ABI that a VMM's machine reads: exit reasons, port I/O
directions, the one hypercall it serves. They are the kernel's (include/uapi/linux/kvm.h,
Documentation/virt/kvm/x86/hypercalls.rst), so every backend reports exits in them."""

from __future__ import annotations

# kvm_run.exit_reason
EXIT_UNKNOWN = 0
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_HLT = 5
EXIT_SHUTDOWN = 8
EXIT_INTR = 10

# kvm_run.io.direction
IO_IN = 0
IO_OUT = 1

# The hypercall a guest flips page encryption with (KVM_CAP_EXIT_HYPERCALL hands it to us)
HC_MAP_GPA_RANGE = 12
ENOSYS = 1000  # -KVM_ENOSYS is what the guest gets for a hypercall nobody serves

U64_MASK = (1 << 64) - 1
PAGE_SIZE = 4096

# kvm_map_gpa_range attributes (the hypercall's third argument)
MAP_GPA_RANGE_PAGE_SZ_4K = 0
MAP_GPA_RANGE_ENCRYPTED = 1 << 4
EINVAL = 22  # -KVM_EINVAL: a MAP_GPA_RANGE the VMM refuses

# SEV firmware ABI: guest policy bits and GUEST_STATUS states
SEV_POLICY_ES = 1 << 2
SEV_POLICY_NOSEND = 1 << 3
SEV_GUEST_STATE_UNINIT = 0
SEV_GUEST_STATE_LUPDATE = 1
SEV_GUEST_STATE_LSECRET = 2
SEV_GUEST_STATE_RUNNING = 3
SEV_GUEST_STATE_SUPDATE = 4
SEV_GUEST_STATE_RUPDATE = 5
SEV_GUEST_STATE_SENT = 6
