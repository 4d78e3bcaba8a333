"""The witness guest's contract with its VMM (DESIGN section 5): the ports it talks on and the
memory it needs. Every backend runs the same witness guest (`Hypervisor.witness_image`), so a
machine serves it without knowing which kernel runs it."""

from __future__ import annotations

from guestprog import x86

from .abi import PAGE_SIZE

SERIAL_PORT = 0x3F8  # OUT: the guest's serial lines
DOORBELL_OUT_PORT = 0x510  # OUT: a seq the doorbell adds up
DOORBELL_IN_PORT = 0x511  # IN: the doorbell's sum so far
# OUT u32 (the x86 witness, between lines): idle this vCPU that many microseconds before its
# next KVM_RUN, as a real guest halts between its work
IDLE_PORT = 0x512
MAX_IDLE_US = 1_000_000  # a longer ask is cut to this (the guest is idle, not gone)


def required_memory(vcpus: int) -> int:
    """Bytes of guest RAM (from GPA 0) the witness guest uses on any kernel: kvmstub's (image,
    journals, flip pages) or the real KVM's x86 one (page tables, code, stacks, journals)."""
    return max((1 + 2 * vcpus) * PAGE_SIZE, x86.required_memory(vcpus))
