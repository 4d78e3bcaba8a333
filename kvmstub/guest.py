"""The guest program (DESIGN.md section 5): what runs inside a vCPU during KVM_RUN.

Deterministic, one program per vCPU. All of a vCPU's state is in its registers and in guest
memory, so whoever moves the registers (plain, sev) or the VMSA (sev-es) moves the guest, and
a lost, repeated or rewound step shows: as a gap or repeat in `seq`, a broken journal chain
(`PANIC journal`), a wrong doorbell sum (`PANIC device`) or a flip page in the wrong form
(`PANIC memory`).

Memory layout (page = 4 KiB, GPA = page number * 4096):
    page 0                launch image: magic and GuestParams (private); the guest reads its
                          idle time there again after each line (no register is left for it)
    page 1 + i            journal of vCPU i (private)
    page 1 + vcpus + i    the page vCPU i flips between private and shared

Register map (struct kvm_regs):
    rip   program counter: one of the RIP_* addresses below
    rax   accumulator: IN data and hypercall return values land here, as on x86; the
          idle request's microseconds go out from it, as OUT's operand does
    rbx   vCPU index (set by `initial_regs`)
    rcx   journal step: steps run since boot
    rdx   journal chain head: 64-bit hash of the last record written
    rsi   seq of the next serial line
    rdi   doorbell sum the guest expects: sum of the seq values sent, mod 2**32
    rsp   largest gap between two steps since the previous line (ns)
    rbp   clock of the last step (ns)
    r8    GPA of this vCPU's journal page
    r9    GPA of this vCPU's flip page
    r10   line_every
    r11   flip_every
    r12   steps left until the next line (0: a line is due)
    r13   steps left until the next flip (0: a flip is due)
    r14   flips done: even = flip page private, odd = shared
    r15   PANIC reason code while the PANIC line is being written
    rflags  untouched (0x2)

Migration control (reference sev-live-migration.md section 2, as Linux guests do it since
v5.16): when CPUID 0x40000001 (behind the "KVMKVMKVM" signature at 0x40000000) has
KVM_FEATURE_MIGRATION_CONTROL, vCPU 0 writes KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL
at boot, once its pages are set up, and a vCPU that shuts down (after PANIC) writes 0 to it
first, as Linux's kvm_guest_cpu_offline does. KVM implements no such MSR: the write reaches
the VMM as a KVM_EXIT_X86_WRMSR exit when it asked for one (an MSR filter, or unknown MSRs
through KVM_CAP_X86_USER_SPACE_MSR); otherwise the guest takes #GP, which it ignores, as
Linux's wrmsr fixup does. Without the CPUID bit (no KVM_SET_CPUID2, the default) the guest
never touches the MSR.

An exit that waits for the VMM (OUT, IN, hypercall, WRMSR) leaves rip at its instruction; `complete`
finishes it and moves rip on, as KVM does on the next KVM_RUN. An exit that is never
completed (registers taken without the completing KVM_RUN) is executed again, exactly as an
x86 vCPU re-executes an I/O instruction that KVM did not skip.

Untrusted input (registers from KVM_SET_REGS, IN data, hypercall results, memory contents)
never raises anything but OSError: nonsense registers make the guest panic or triple-fault
(KVM_EXIT_SHUTDOWN), as nonsense would on hardware.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from typing import Protocol

import msgspec

from kvmstub.uapi import (
    DOORBELL_IN_PORT,
    DOORBELL_OUT_PORT,
    IDLE_PORT,
    KVM_ENOSYS,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_X86_WRMSR,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SIZE,
    SERIAL_PORT,
    U64_MASK,
    HypercallExit,
    IoExit,
    Regs,
    RunExit,
)

MAX_VCPUS = 4096
"""KVM_MAX_VCPUS on x86: the most vCPUs a launch image may name."""

IMAGE_MAGIC = b"HOGUEST1"
JOURNAL_MAGIC = b"HOJOURNL"
_FLIP_MAGIC = b"HOFLIPPG"

LINE_PATTERN = re.compile(rb"vcpu=(\d+) seq=(\d+) gap_us=(\d+)\n")
"""A serial line of the guest, exactly: vcpu index, seq, gap in microseconds."""

PANIC_IMAGE = 1
PANIC_JOURNAL = 2
PANIC_DEVICE = 3
PANIC_MEMORY = 4
PANIC_REASONS = {
    PANIC_IMAGE: "image",
    PANIC_JOURNAL: "journal",
    PANIC_DEVICE: "device",
    PANIC_MEMORY: "memory",
}

# The program. rip is one of these "instruction addresses".
RIP_RESET = 0xFFF0  # boot: load the image, write the journal genesis and the flip page
RIP_STEP = 0x1000  # one step: gap, journal check and record, line/flip countdowns
RIP_LINE = 0x1100  # OUT 0x3f8: the serial line (waits for completion)
RIP_LINE_DONE = 0x1108  # start a new gap window
RIP_DOORBELL_OUT = 0x1110  # OUT 0x510: seq (waits)
RIP_DOORBELL_IN = 0x1120  # IN 0x511: the device's sum into rax (waits)
RIP_DOORBELL_CHECK = 0x1130  # compare the sum; seq += 1
RIP_IDLE = 0x1140  # OUT 0x512: idle_us from the image, if any (waits)
RIP_IDLE_DONE = 0x1148  # the idle is not a gap: credit it to the clock of the last step
RIP_FLIP = 0x1200  # check the flip page, then ask for the conversion
RIP_VMCALL = 0x1210  # MAP_GPA_RANGE hypercall (waits)
RIP_VMCALL_DONE = 0x1218  # on success rewrite the page in its new form
RIP_PANIC = 0x1300  # OUT 0x3f8: "PANIC <reason>" (waits)
RIP_SHUTDOWN = 0x1308  # going down: clear MSR_KVM_MIGRATION_CONTROL if the CPU has it
RIP_HALT = 0x1310  # halted: KVM_EXIT_SHUTDOWN for ever
RIP_MIGRATION_READY = 0x1400  # WRMSR MSR_KVM_MIGRATION_CONTROL <- 1, at boot (may wait)
RIP_MIGRATION_OFF = 0x1410  # WRMSR MSR_KVM_MIGRATION_CONTROL <- 0, before halting (may wait)

_KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0" in ebx, ecx, edx

_IMAGE = struct.Struct("<8sQQQ")  # magic, vcpus, line_every, flip_every
_IMAGE_IDLE = struct.Struct("<Q")  # idle_us, after _IMAGE (0 in images made before it)
_RECORD = struct.Struct("<8sQQQ")  # magic, vcpu, step, chain hash
_LINK = struct.Struct("<QQ")  # (previous hash, step): what the next hash is taken of
_JOURNAL_TAIL = bytes(PAGE_SIZE - _RECORD.size)
_U32 = 0xFFFFFFFF

MAX_STEPS_PER_SLICE = 1 << 16
"""A slice also ends after this many steps, so a clock that stalls cannot hang KVM_RUN."""

INTR_EXIT = RunExit(KVM_EXIT_INTR)
"""The exit of a slice that ran out (or was interrupted): always this very object."""
_SHUTDOWN = RunExit(KVM_EXIT_SHUTDOWN)
_DOORBELL_IN_EXIT = RunExit(KVM_EXIT_IO, io=IoExit(KVM_EXIT_IO_IN, DOORBELL_IN_PORT, 4, 1))


class GuestParams(msgspec.Struct, frozen=True):
    """What the launch image tells the guest: its vCPU count, how often to report/flip, and
    how long to idle after each line (`idle_us`, 0: never). An idle is a request to the VMM,
    as the real KVM's x86 witness makes it (OUT of the microseconds, a u32, to port 0x512):
    the vCPU then waits in the VMM, as a real guest halts until its next timer tick, and
    takes no CPU meanwhile."""

    vcpus: int
    line_every: int = 200
    flip_every: int = 50
    idle_us: int = 0


def build_launch_image(params: GuestParams) -> bytes:
    """The launch image: one page, placed at GPA 0 and measured at launch.

    Raises:
        ValueError: vcpus outside 1..MAX_VCPUS, line_every / flip_every below 1, or
            idle_us outside 0..2**32-1 (what the idle port's u32 carries).
    """
    if not 1 <= params.vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, got {params.vcpus}")
    if not 1 <= params.line_every <= U64_MASK or not 1 <= params.flip_every <= U64_MASK:
        raise ValueError("line_every and flip_every must be at least 1")
    if not 0 <= params.idle_us <= _U32:
        raise ValueError(f"idle_us must be 0 to 2**32-1 microseconds, not {params.idle_us}")
    head = _IMAGE.pack(
        IMAGE_MAGIC, params.vcpus, params.line_every, params.flip_every
    ) + _IMAGE_IDLE.pack(params.idle_us)
    return head + bytes(PAGE_SIZE - len(head))


def initial_regs(vcpu_index: int) -> Regs:
    """The registers a VMM sets on vCPU `vcpu_index` before launch: the reset vector and
    the vCPU's index (its APIC id, as far as this guest cares)."""
    return Regs(rbx=vcpu_index, rip=RIP_RESET)


def required_memory(params: GuestParams) -> int:
    """Bytes of guest RAM (from GPA 0) the program uses: image, journals, flip pages."""
    return (1 + 2 * params.vcpus) * PAGE_SIZE


class PageAccess(Protocol):
    """Guest page access, given by the model: `private` pages go through the VEK."""

    def read_page(self, gpa: int, private: bool) -> bytes: ...

    def write_page(self, gpa: int, data: bytes, private: bool) -> None: ...


class CpuAccess(Protocol):
    """KVM's side of the instructions that are not memory accesses, given by the model:
    CPUID (answered from the vCPU's KVM_SET_CPUID2 table), WRMSR and VMCALL. `wrmsr` and
    `hypercall` return the exit for the VMM to serve, or, when KVM handled the instruction
    itself, whether the WRMSR succeeded (False: #GP) / the hypercall's value for RAX."""

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]: ...

    def wrmsr(self, index: int, value: int) -> RunExit | bool: ...

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int) -> RunExit | int: ...


def _migration_control(cpu: CpuAccess | None) -> bool:
    """kvm_para_has_feature(KVM_FEATURE_MIGRATION_CONTROL), as Linux's guest asks it."""
    if cpu is None:
        return False
    eax, ebx, ecx, edx = cpu.cpuid(0x40000000, 0)
    if (ebx, ecx, edx) != _KVM_SIGNATURE or eax < 0x40000001:
        return False
    return bool(cpu.cpuid(0x40000001, 0)[0] >> KVM_FEATURE_MIGRATION_CONTROL & 1)


def _chain(prev: int, step: int) -> int:
    digest = hashlib.blake2b(_LINK.pack(prev, step), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def genesis_hash(vcpu_index: int) -> int:
    """The head of vCPU `vcpu_index`'s journal chain at boot (step 0)."""
    return _chain(int.from_bytes(JOURNAL_MAGIC, "little"), vcpu_index & U64_MASK)


def journal_page(vcpu_index: int, step: int, head: int) -> bytes:
    """The journal page as the guest leaves it after `step`, with chain head `head`."""
    return _RECORD.pack(JOURNAL_MAGIC, vcpu_index, step, head) + _JOURNAL_TAIL


def flip_pattern(vcpu_index: int, flips: int) -> bytes:
    """The contents of vCPU `vcpu_index`'s flip page after `flips` conversions."""
    seed = struct.pack("<8sQQ", _FLIP_MAGIC, vcpu_index, flips)
    return hashlib.blake2b(seed, digest_size=64).digest() * (PAGE_SIZE // 64)


def _idle_us(image: bytes) -> int:
    """The launch image's idle_us, as the guest reads it after each line (a u32 on the
    port: anything above that, or a short page, reads as no idle)."""
    if len(image) < _IMAGE.size + _IMAGE_IDLE.size:
        return 0
    value: int = _IMAGE_IDLE.unpack_from(image, _IMAGE.size)[0]
    return value if value <= _U32 else 0


def _io_out(port: int, size: int, data: bytes) -> RunExit:
    return RunExit(
        KVM_EXIT_IO,
        io=IoExit(KVM_EXIT_IO_OUT, port, size, len(data) // size, data),
    )


def complete(
    regs: Regs,
    pending: RunExit | None,
    io_data: bytes | None,
    hypercall_ret: int | None,
    msr_error: int | None = None,
) -> Regs:
    """Finish the exit `pending` (what the last KVM_RUN returned), as KVM does at the start
    of the next KVM_RUN: IN data goes into rax, a hypercall's return value into rax, and rip
    moves past the instruction. A WRMSR's `msr_error` (kvm_run.msr.error) makes it #GP,
    which this guest ignores, so it moves on either way.

    A no-op when nothing is pending, or when rip is not at the instruction that produced
    `pending` (the exit was completed already, or the registers were replaced).
    IN data is taken as the kernel takes it: size*count bytes, short data padded with zeros;
    a missing hypercall return value (the VMM never wrote kvm_run.hypercall.ret) is 0.
    """
    if pending is None:
        return regs
    rip = regs.rip & U64_MASK
    io = pending.io
    if pending.exit_reason == KVM_EXIT_IO and io is not None:
        out = io.direction == KVM_EXIT_IO_OUT
        if out and io.port == SERIAL_PORT and rip == RIP_LINE:
            return msgspec.structs.replace(regs, rip=RIP_LINE_DONE)
        if out and io.port == SERIAL_PORT and rip == RIP_PANIC:
            return msgspec.structs.replace(regs, rip=RIP_SHUTDOWN)
        if out and io.port == DOORBELL_OUT_PORT and rip == RIP_DOORBELL_OUT:
            return msgspec.structs.replace(regs, rip=RIP_DOORBELL_IN)
        if out and io.port == IDLE_PORT and rip == RIP_IDLE:
            return msgspec.structs.replace(regs, rip=RIP_IDLE_DONE)
        if not out and io.port == DOORBELL_IN_PORT and rip == RIP_DOORBELL_IN:
            # IN eax: 4 bytes, zero-extended into rax
            data = bytes(io_data[:4]) if io_data is not None else b""
            value = int.from_bytes(data.ljust(4, b"\0"), "little")
            return msgspec.structs.replace(regs, rip=RIP_DOORBELL_CHECK, rax=value)
    elif (
        pending.exit_reason == KVM_EXIT_HYPERCALL
        and pending.hypercall is not None
        and rip == RIP_VMCALL
    ):
        ret = (hypercall_ret or 0) & U64_MASK
        return msgspec.structs.replace(regs, rip=RIP_VMCALL_DONE, rax=ret)
    elif pending.exit_reason == KVM_EXIT_X86_WRMSR and pending.msr is not None:
        # complete_fast_msr_access: msr.error 0 skips the WRMSR, anything else is #GP,
        # which this guest ignores (Linux's wrmsr fixup): either way on to the next one.
        if rip == RIP_MIGRATION_READY:
            return msgspec.structs.replace(regs, rip=RIP_STEP)
        if rip == RIP_MIGRATION_OFF:
            return msgspec.structs.replace(regs, rip=RIP_HALT)
    return regs


def run_slice(
    regs: Regs,
    mem: PageAccess,
    *,
    now_ns: int,
    budget_ns: int,
    clock: Callable[[], int],
    exit_hypercall: bool = False,
    interrupted: Callable[[], bool] | None = None,
    cpu: CpuAccess | None = None,
) -> tuple[Regs, RunExit, int]:
    """Run the guest from `regs` until it exits to the VMM or the slice is spent.

    Args:
        regs: the vCPU's registers (completed: call `complete` first).
        mem: guest page access.
        now_ns: clock() when KVM_RUN started; the slice ends once clock() - now_ns
            reaches budget_ns (at least one step runs per slice, so the guest progresses).
        clock: monotonic nanoseconds; the guest measures its own pauses with it.
        exit_hypercall: KVM_CAP_EXIT_HYPERCALL enables MAP_GPA_RANGE exits; without it the
            hypercall returns -KVM_ENOSYS and the guest keeps the page as it is. Only
            looked at without `cpu`.
        interrupted: checked between steps; when it says True the slice ends at once with
            KVM_EXIT_INTR (the stand-in for a signal kicking the vCPU thread out of the guest).
        cpu: KVM's CPUID, WRMSR and hypercall handling (the model's). Without it, CPUID
            reads all zeros (no migration control) and the hypercall follows
            `exit_hypercall`.

    Returns:
        (new registers, the exit, steps run). The exit is KVM_EXIT_IO,
        KVM_EXIT_HYPERCALL or KVM_EXIT_X86_WRMSR for the VMM to serve, KVM_EXIT_INTR when
        the slice ran out, and KVM_EXIT_SHUTDOWN once the guest has halted (after PANIC)
        or triple-faulted.

    Raises:
        OSError: what `mem` raises (EFAULT for unbacked memory), and only when the slice
            made no progress: after progress the slice ends early with KVM_EXIT_INTR and
            the next KVM_RUN meets the fault first, so registers and memory always agree.
    """
    m = U64_MASK
    pc = regs.rip & m
    rax = regs.rax & m
    vcpu = regs.rbx & m
    step = regs.rcx & m
    head = regs.rdx & m
    seq = regs.rsi & m
    dsum = regs.rdi & _U32
    gap_max = regs.rsp & m
    last = regs.rbp & m
    jgpa = regs.r8 & m & ~(PAGE_SIZE - 1)
    fgpa = regs.r9 & m & ~(PAGE_SIZE - 1)
    line_every = regs.r10 & m
    flip_every = regs.r11 & m
    line_left = regs.r12 & m
    flip_left = regs.r13 & m
    flips = regs.r14 & m
    reason = regs.r15 & m
    steps = 0
    exit_ = INTR_EXIT
    read_page = mem.read_page
    write_page = mem.write_page
    record = _RECORD.pack
    start = (
        pc,
        rax,
        step,
        head,
        seq,
        dsum,
        gap_max,
        last,
        jgpa,
        fgpa,
        line_every,
        flip_every,
        line_left,
        flip_left,
        flips,
        reason,
    )

    # Every branch changes the locals only after its memory writes succeeded, so on an
    # OSError the locals are a consistent state to hand back.
    try:
        while True:
            if pc == RIP_STEP:
                t = clock()
                if steps and (
                    t - now_ns >= budget_ns
                    or steps >= MAX_STEPS_PER_SLICE
                    or (interrupted is not None and interrupted())
                ):
                    break
                page = read_page(jgpa, True)
                if page != record(JOURNAL_MAGIC, vcpu, step, head) + _JOURNAL_TAIL:
                    pc, reason = RIP_PANIC, PANIC_JOURNAL
                    continue
                nstep = (step + 1) & m
                nhead = _chain(head, nstep)
                write_page(jgpa, record(JOURNAL_MAGIC, vcpu, nstep, nhead) + _JOURNAL_TAIL, True)
                step, head = nstep, nhead
                gap = t - last
                if gap > gap_max:
                    gap_max = gap
                last = t & m
                steps += 1
                if line_left:
                    line_left -= 1
                if flip_left:
                    flip_left -= 1
                if not line_left:
                    line_left = line_every
                    pc = RIP_LINE
                elif not flip_left:
                    pc = RIP_FLIP
                continue

            if pc == RIP_LINE:
                line = f"vcpu={vcpu} seq={seq} gap_us={gap_max // 1000}\n".encode()
                exit_ = _io_out(SERIAL_PORT, 1, line)
                break
            if pc == RIP_LINE_DONE:
                gap_max = 0
                pc = RIP_DOORBELL_OUT
                continue
            if pc == RIP_DOORBELL_OUT:
                exit_ = _io_out(DOORBELL_OUT_PORT, 4, (seq & _U32).to_bytes(4, "little"))
                break
            if pc == RIP_DOORBELL_IN:
                exit_ = _DOORBELL_IN_EXIT
                break
            if pc == RIP_DOORBELL_CHECK:
                expected = (dsum + seq) & _U32
                if rax & _U32 != expected:
                    pc, reason = RIP_PANIC, PANIC_DEVICE
                    continue
                dsum = expected
                seq = (seq + 1) & m
                pc = RIP_IDLE
                continue
            if pc == RIP_IDLE:
                idle_us = _idle_us(read_page(0, True))
                if idle_us:
                    rax = idle_us  # OUT's operand, read again when the OUT completes
                    exit_ = _io_out(IDLE_PORT, 4, idle_us.to_bytes(4, "little"))
                    break
                pc = RIP_FLIP if not flip_left else RIP_STEP
                continue
            if pc == RIP_IDLE_DONE:
                # The time asked for is not a pause of the guest's: the next step's gap
                # counts only what the idle took beyond it (a handoff meanwhile shows).
                last = (last + (rax & _U32) * 1000) & m
                pc = RIP_FLIP if not flip_left else RIP_STEP
                continue

            if pc == RIP_FLIP:
                page = read_page(fgpa, not flips & 1)
                if page != flip_pattern(vcpu, flips):
                    pc, reason = RIP_PANIC, PANIC_MEMORY
                    continue
                flip_left = flip_every
                if exit_hypercall or cpu is not None:
                    pc = RIP_VMCALL
                else:
                    rax = -KVM_ENOSYS & m
                    pc = RIP_STEP
                continue
            if pc == RIP_VMCALL:
                to_private = (flips + 1) & 1 == 0
                attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if to_private else KVM_MAP_GPA_RANGE_DECRYPTED
                if cpu is None:
                    exit_ = RunExit(
                        KVM_EXIT_HYPERCALL,
                        hypercall=HypercallExit(KVM_HC_MAP_GPA_RANGE, (fgpa, 1, attrs, 0, 0, 0)),
                    )
                    break
                answer = cpu.hypercall(KVM_HC_MAP_GPA_RANGE, fgpa, 1, attrs, 0)
                if isinstance(answer, RunExit):
                    exit_ = answer
                    break
                rax = answer & m  # KVM answered itself (-KVM_ENOSYS, -KVM_EINVAL)
                pc = RIP_VMCALL_DONE
                continue
            if pc == RIP_VMCALL_DONE:
                if rax == 0:  # converted: the page now reads as garbage until rewritten
                    nflips = (flips + 1) & m
                    write_page(fgpa, flip_pattern(vcpu, nflips), not nflips & 1)
                    flips = nflips
                pc = RIP_STEP
                continue

            if pc == RIP_PANIC:
                text = f"PANIC {PANIC_REASONS.get(reason, 'unknown')}\n".encode()
                exit_ = _io_out(SERIAL_PORT, 1, text)
                break
            if pc == RIP_RESET:
                image = read_page(0, True)
                if len(image) < _IMAGE.size:
                    pc, reason = RIP_PANIC, PANIC_IMAGE
                    continue
                magic, vcpus, lines, flips_every = _IMAGE.unpack_from(image)
                if (
                    magic != IMAGE_MAGIC
                    or not 1 <= vcpus <= MAX_VCPUS
                    or vcpu >= vcpus
                    or not lines
                    or not flips_every
                ):
                    pc, reason = RIP_PANIC, PANIC_IMAGE
                    continue
                j = (1 + vcpu) * PAGE_SIZE
                f = (1 + vcpus + vcpu) * PAGE_SIZE
                genesis = genesis_hash(vcpu)
                write_page(j, journal_page(vcpu, 0, genesis), True)
                write_page(f, flip_pattern(vcpu, 0), True)
                jgpa, fgpa, line_every, flip_every = j, f, lines, flips_every
                line_left, flip_left = lines, flips_every
                step, head, seq, dsum, flips, gap_max, rax = 0, genesis, 0, 0, 0, 0, 0
                last = clock() & m
                pc = RIP_MIGRATION_READY if vcpu == 0 and _migration_control(cpu) else RIP_STEP
                continue
            if pc == RIP_HALT:
                exit_ = _SHUTDOWN
                break
            if pc == RIP_SHUTDOWN:
                pc = RIP_MIGRATION_OFF if _migration_control(cpu) else RIP_HALT
                continue
            if pc in (RIP_MIGRATION_READY, RIP_MIGRATION_OFF):
                ready = pc == RIP_MIGRATION_READY
                done = RIP_STEP if ready else RIP_HALT
                value = KVM_MIGRATION_READY if ready else 0
                written = cpu.wrmsr(MSR_KVM_MIGRATION_CONTROL, value) if cpu is not None else False
                if isinstance(written, RunExit):
                    exit_ = written
                    break
                pc = done  # written by KVM, or #GP (ignored)
                continue
            # Anything else is not code: a triple fault, as on hardware.
            pc = RIP_HALT
    except OSError:
        if start == (
            pc,
            rax,
            step,
            head,
            seq,
            dsum,
            gap_max,
            last,
            jgpa,
            fgpa,
            line_every,
            flip_every,
            line_left,
            flip_left,
            flips,
            reason,
        ):
            raise
        exit_ = INTR_EXIT

    new = Regs(
        rax=rax,
        rbx=vcpu,
        rcx=step,
        rdx=head,
        rsi=seq,
        rdi=dsum,
        rsp=gap_max,
        rbp=last,
        r8=jgpa,
        r9=fgpa,
        r10=line_every,
        r11=flip_every,
        r12=line_left,
        r13=flip_left,
        r14=flips,
        r15=reason,
        rip=pc,
        rflags=regs.rflags & m,
    )
    return new, exit_, steps
