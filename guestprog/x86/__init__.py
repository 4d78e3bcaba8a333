"""The x86-64 witness guest for a real KVM: memory layout, parameter block, entry state.

The machine code is `witness.S` (GNU as), committed assembled in `code.py`
(`tools/gen_x86_witness.py` regenerates it). It runs in long mode at CPL3, entered straight
from KVM_SET_SREGS and KVM_SET_REGS, so it runs natively even where KVM emulates guest CPL0
(nested PVM hosts: reference/real-kvm.md section 1). Serial lines, doorbell and idle requests
are port I/O (IOPL 3); a failed check writes `PANIC <reason>` and triple-faults.

Guest-physical memory (every address identity-mapped, 2 MiB pages, user-accessible):

    0x0000  parameter block (`Params`, little endian):
              0x00 u64 magic b"WITNESS1"
              0x08 u32 vcpus
              0x0c u32 line_every   steps per line (>= 1)
              0x10 u32 idle_us      microseconds to idle after each line (0: busy)
              0x14 u32 tsc_khz      the guest TSC's frequency (KVM_GET_TSC_KHZ)
              0x18 u64 idle_ticks   idle_us in TSC ticks, not counted in gap_us
    0x1000  code (entry at its first byte)
    0x2000  PML4, 0x3000 PDPT, 0x4000 PD: the first GiB in 2 MiB pages
    0x10000 + i * 0x2000   vCPU i's data page: idle credit at +0, digits below +0x40,
                           line buffer at +0x100, stack down from +0x1000
    0x10000 + i * 0x2000 + 0x1000   vCPU i's journal: 256 records {u64 step, u64 chain}

The launch image is the first `IMAGE_SIZE` bytes (parameters, code, page tables); the per-vCPU
pages start zeroed. `required_memory(vcpus)` is what the guest touches.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from guestprog.x86.code import CODE, LISTING

__all__ = [
    "CODE",
    "CODE_GPA",
    "ENTRY_RFLAGS",
    "IDLE_PORT",
    "IMAGE_SIZE",
    "LISTING",
    "PAGE_SIZE",
    "Params",
    "Segment",
    "SystemRegisters",
    "build_image",
    "entry_registers",
    "required_memory",
    "system_registers",
]

PAGE_SIZE = 4096
MAGIC = b"WITNESS1"
PARAMS_GPA = 0x0
CODE_GPA = 0x1000
PML4_GPA = 0x2000
PDPT_GPA = 0x3000
PD_GPA = 0x4000
IMAGE_SIZE = 0x5000
PERCPU_BASE = 0x10000
PERCPU_SIZE = 0x2000
JOURNAL_OFFSET = 0x1000
MAPPED = 1 << 30  # what the page tables map

SERIAL_PORT = 0x3F8
DOORBELL_OUT_PORT = 0x510
DOORBELL_IN_PORT = 0x511
IDLE_PORT = 0x512  # OUT u32: idle this vCPU for that many microseconds before its next run

MAX_VCPUS = (MAPPED - PERCPU_BASE) // PERCPU_SIZE
_PARAMS = struct.Struct("<8sIIIIQ")

# Control registers of the entry state (reference/real-kvm.md section 4)
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
ENTRY_RFLAGS = 0x3002  # IOPL 3 (IN/OUT legal at CPL3), IF 0, the reserved bit 1

_PTE_P, _PTE_RW, _PTE_US, _PTE_PS = 1, 2, 4, 0x80


@dataclass(frozen=True)
class Params:
    """The guest's parameter block, written by the image builder."""

    vcpus: int
    line_every: int
    idle_us: int
    tsc_khz: int

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ValueError(f"the x86 witness runs 1 to {MAX_VCPUS} vCPUs, not {self.vcpus}")
        if not 1 <= self.line_every < 1 << 32:
            raise ValueError(f"line_every must be 1 to 2**32-1 steps, not {self.line_every}")
        if not 0 <= self.idle_us < 1 << 32:
            raise ValueError(f"idle_us must be 0 to 2**32-1 microseconds, not {self.idle_us}")
        # gap_us divides ticks * 1000 by tsc_khz: above 1000 the quotient always fits.
        if not 1000 < self.tsc_khz < 1 << 32:
            raise ValueError(f"tsc_khz {self.tsc_khz} is not a TSC frequency in kHz")

    @property
    def idle_ticks(self) -> int:
        return self.idle_us * self.tsc_khz // 1000

    def pack(self) -> bytes:
        return _PARAMS.pack(
            MAGIC, self.vcpus, self.line_every, self.idle_us, self.tsc_khz, self.idle_ticks
        )


def required_memory(vcpus: int) -> int:
    """Bytes of guest RAM from GPA 0 the x86 witness uses with `vcpus` vCPUs."""
    return PERCPU_BASE + vcpus * PERCPU_SIZE


def percpu_gpa(index: int) -> int:
    return PERCPU_BASE + index * PERCPU_SIZE


def journal_gpa(index: int) -> int:
    return percpu_gpa(index) + JOURNAL_OFFSET


def build_image(params: Params) -> bytes:
    """The launch image (GPA 0 up to `IMAGE_SIZE`): parameters, code, page tables."""
    image = bytearray(IMAGE_SIZE)
    packed = params.pack()
    image[PARAMS_GPA : PARAMS_GPA + len(packed)] = packed
    image[CODE_GPA : CODE_GPA + len(CODE)] = CODE
    struct.pack_into("<Q", image, PML4_GPA, PDPT_GPA | _PTE_P | _PTE_RW | _PTE_US)
    struct.pack_into("<Q", image, PDPT_GPA, PD_GPA | _PTE_P | _PTE_RW | _PTE_US)
    for i in range(MAPPED >> 21):
        entry = (i << 21) | _PTE_P | _PTE_RW | _PTE_US | _PTE_PS
        struct.pack_into("<Q", image, PD_GPA + 8 * i, entry)
    return bytes(image)


def entry_registers(index: int) -> dict[str, int]:
    """vCPU `index`'s general registers at entry (names as in struct kvm_regs; others 0)."""
    top = percpu_gpa(index) + PAGE_SIZE
    return {
        "rip": CODE_GPA,
        "rsp": top,
        "rflags": ENTRY_RFLAGS,
        "r14": percpu_gpa(index),
        "r15": index,
    }


@dataclass(frozen=True)
class Segment:
    """One struct kvm_segment."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (the kernel's field name)
    g: int
    avl: int = 0
    unusable: int = 0


@dataclass(frozen=True)
class SystemRegisters:
    """What KVM_SET_SREGS is given at entry: flat segments, paging, long mode, CPL3."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    cr0: int
    cr3: int
    cr4: int
    efer: int


def system_registers() -> SystemRegisters:
    """Every vCPU's system registers at entry. The code segment is 64-bit with DPL 3 (CPL3);
    data segments are DPL 3. No GDT or IDT exists in guest memory: nothing reloads a segment,
    and a fault (the PANIC path's HLT) is meant to end in a triple fault."""
    code = Segment(base=0, limit=0xFFFFFFFF, selector=0x1B, type=11, present=1, dpl=3,
                   db=0, s=1, l=1, g=1)  # fmt: skip
    data = Segment(base=0, limit=0xFFFFFFFF, selector=0x23, type=3, present=1, dpl=3,
                   db=1, s=1, l=0, g=1)  # fmt: skip
    tr = Segment(base=0, limit=0xFFFF, selector=0x08, type=11, present=1, dpl=0,
                 db=0, s=0, l=0, g=0)  # fmt: skip
    ldt = Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, dpl=0,
                  db=0, s=0, l=0, g=0)  # fmt: skip
    return SystemRegisters(
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tr, ldt=ldt,
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3=PML4_GPA,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA,
    )  # fmt: skip
