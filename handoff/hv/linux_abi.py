"""The numbers and struct layouts of the Linux KVM API (x86-64) that `handoff.hv.linux` uses.

Taken from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h (ioctl numbers as the
kernel encodes them for x86-64; sizes are the structs' sizes there). See the reference on the
real /dev/kvm, section 2, for which state each one moves.
"""

from __future__ import annotations

import struct

KVM_API_VERSION = 12

# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_MSR_INDEX_LIST = 0xC004AE02
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05

# VM ioctls
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_CREATE_IRQCHIP = 0xAE60
KVM_GET_IRQCHIP = 0xC208AE62
KVM_SET_IRQCHIP = 0x8208AE63  # encoded _IOR, historically
KVM_CREATE_PIT2 = 0x4040AE77
KVM_SET_CLOCK = 0x4030AE7B
KVM_GET_CLOCK = 0x8030AE7C
KVM_GET_PIT2 = 0x8070AE9F
KVM_SET_PIT2 = 0x4070AEA0
KVM_ENABLE_CAP = 0x4068AEA3

# vCPU ioctls
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_MSRS = 0xC008AE88
KVM_SET_MSRS = 0x4008AE89
KVM_GET_LAPIC = 0x8400AE8E
KVM_SET_LAPIC = 0x4400AE8F
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_MP_STATE = 0x8004AE98
KVM_SET_MP_STATE = 0x4004AE99
KVM_GET_VCPU_EVENTS = 0x8040AE9F
KVM_SET_VCPU_EVENTS = 0x4040AEA0
KVM_GET_DEBUGREGS = 0x8080AEA1
KVM_SET_DEBUGREGS = 0x4080AEA2
KVM_GET_TSC_KHZ = 0xAEA3
KVM_GET_XSAVE = 0x9000AEA4
KVM_SET_XSAVE = 0x5000AEA5
KVM_GET_XCRS = 0x8188AEA6
KVM_SET_XCRS = 0x4188AEA7
KVM_KVMCLOCK_CTRL = 0xAEAD
KVM_GET_SREGS2 = 0x8140AECC
KVM_SET_SREGS2 = 0x4140AECD
KVM_GET_XSAVE2 = 0x9000AECF
KVM_SET_DEVICE_ATTR = 0x4018AEE1
KVM_GET_DEVICE_ATTR = 0x4018AEE2
KVM_HAS_DEVICE_ATTR = 0x4018AEE3

# KVM_CHECK_EXTENSION
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_PIT2 = 33
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_SREGS2 = 200
KVM_CAP_XSAVE2 = 208
KVM_CAP_VM_TSC_CONTROL = 214

# struct sizes
REGS_SIZE = 144
SREGS_SIZE = 312
SREGS2_SIZE = 320
XSAVE_SIZE = 4096
XCRS_SIZE = 392
EVENTS_SIZE = 64
MP_STATE_SIZE = 4
DEBUGREGS_SIZE = 128
LAPIC_SIZE = 1024
CLOCK_SIZE = 48
IRQCHIP_SIZE = 520
PIT2_SIZE = 112
CPUID_ENTRY_SIZE = 40
MSR_ENTRY_SIZE = 16

# kvm_run
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32  # {u8 direction, u8 size, u16 port, u32 count, u64 data_offset}
RUN_HYPERCALL = 32  # {u64 nr, u64 args[6], u64 ret, ...}
RUN_HYPERCALL_RET = 32 + 56
RUN_INTERNAL = 32  # {u32 suberror, u32 ndata, u64 data[16]}
RUN_FAIL_ENTRY = 32  # {u64 hardware_entry_failure_reason, u32 cpu}
IO_STRUCT = struct.Struct("<BBHIQ")

EXIT_FAIL_ENTRY = 9
EXIT_INTERNAL_ERROR = 17

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 4
KVM_CLOCK_HOST_TSC = 8
CLOCK_STRUCT = struct.Struct("<QII Q Q 16x")  # clock, flags, pad0, realtime, host_tsc, pad

# KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET (Documentation/virt/kvm/devices/vcpu.rst section 4)
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0
DEVICE_ATTR = struct.Struct("<IIQQ")  # flags, group, attr, addr

KVM_PIT_SPEAKER_DUMMY = 1
KVM_TSS_ADDRESS = 0xFFFBD000

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

# kvm_mp_state
MP_STATE_RUNNABLE = 0

# struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l, g, avl
# u8 each, unusable u8, padding u8
SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
DTABLE = struct.Struct("<QH6x")  # base, limit, padding
# struct kvm_sregs after the 8 segments (cs ds es fs gs ss tr ldt) and gdt, idt
SREGS_CONTROL = struct.Struct("<QQQQQQQ")  # cr0 cr2 cr3 cr4 cr8 efer apic_base
SREGS_SEGMENTS = 0
SREGS_GDT = 192
SREGS_IDT = 208
SREGS_CONTROL_AT = 224
REGS = struct.Struct("<18Q")  # rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags
