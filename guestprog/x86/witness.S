/*
 * The witness guest for a real x86-64 vCPU (DESIGN section 5), one copy of this code shared by
 * every vCPU. It runs in long mode at CPL3 (IOPL 3, so IN/OUT are legal and still exit to the
 * VMM), entered straight from KVM_SET_SREGS/KVM_SET_REGS: no GDT, IDT or kernel of its own.
 * Any fault is therefore a triple fault, which the VMM sees as KVM_EXIT_SHUTDOWN.
 *
 * Layout and entry state: guestprog/x86/__init__.py. On entry r15 = vCPU index, r14 = this
 * vCPU's data page, rsp = the top of that page; every other register is 0.
 *
 * Registers that carry the guest's state across exits (and so across a handoff):
 *   rbx  seq: lines written so far          xmm0  seq again (low quadword): lost XSAVE state
 *   r8d  the doorbell sum this guest expects r9   chain value of the last journal record
 *   r10  steps taken so far (journal index)  r11   r15 ^ INVARIANT: lost general registers
 *   r12  TSC at the last step                r13   largest gap between two steps (TSC ticks)
 *   rbp  steps left before the next line     r14, r15  see above (r14 is checked too)
 * Each step checks the TSC went forward, the invariants, xmm0 == rbx and the previous journal
 * record, then chains the next record. A step and each exit are ticks: gap_us is the largest
 * time between two ticks since the previous line (less the idle the guest asked for), so it
 * holds any pause of the vCPU, in the guest or at one of its exits. Each line: OUT seq to the doorbell, IN the sum and
 * compare, then "vcpu=<i> seq=<n> gap_us=<g>\n" to the serial port (4 bytes per OUT) and,
 * in idle mode, one OUT of the idle time (microseconds) to the idle port.
 */
	.intel_syntax noprefix
	.code64
	.text

	/* parameter block at GPA 0 (guestprog.x86.Params) */
	.set P_VCPUS,       0x08
	.set P_LINE_EVERY,  0x0c
	.set P_IDLE_US,     0x10
	.set P_TSC_KHZ,     0x14
	.set P_IDLE_TICKS,  0x18

	/* ports (handoff.hv.witness) */
	.set SERIAL,        0x3f8
	.set DOORBELL_OUT,  0x510
	.set DOORBELL_IN,   0x511
	.set IDLE_PORT,     0x512

	/* per-vCPU data: a data page (variables, line buffer, stack) then a journal page */
	.set PERCPU_BASE,   0x10000
	.set PERCPU_SHIFT,  13
	.set V_CREDIT,      0x00        /* idle ticks not to count as a gap (u64) */
	.set V_DIGITS_END,  0x40        /* put_dec builds its digits backwards below this */
	.set V_LINE,        0x100       /* the serial line is built here */
	.set JOURNAL,       0x1000      /* 256 records of {u64 step, u64 chain} */

	.set INVARIANT,     0x5749544e45535321
	.set CHAIN_SEED,    0x243f6a8885a308d3
	.set CHAIN_MUL,     0x9e3779b97f4a7c15

entry:
	mov	r11, INVARIANT
	xor	r11, r15
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r12, rax
	mov	r9, CHAIN_SEED
	xor	r9, r15
	pxor	xmm0, xmm0
	mov	qword ptr [r14 + V_CREDIT], 0

line:
	mov	ebp, dword ptr ds:P_LINE_EVERY
step:
	call	check_step
	dec	ebp
	jnz	step

	/* the doorbell: add seq, read the sum back */
	mov	eax, ebx
	mov	dx, DOORBELL_OUT
	out	dx, eax
	call	tick
	add	r8d, ebx
	mov	dx, DOORBELL_IN
	in	eax, dx
	mov	ecx, eax
	call	tick
	cmp	ecx, r8d
	jne	panic_device

	call	write_line
	inc	rbx
	paddq	xmm0, xmmword ptr [rip + one]

	mov	eax, dword ptr ds:P_IDLE_US
	test	eax, eax
	jz	line
	mov	rcx, qword ptr ds:P_IDLE_TICKS
	mov	qword ptr [r14 + V_CREDIT], rcx
	mov	dx, IDLE_PORT
	out	dx, eax
	call	tick
	jmp	line

/* The time since the last tick (a step or an exit) is a gap: the TSC must not have gone back;
 * the largest gap (less idle the guest asked for) is kept in r13. Clobbers rax only. */
tick:
	push	rcx
	push	rdx
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	rcx, rax
	sub	rcx, r12
	jb	panic_tsc
	mov	r12, rax
	sub	rcx, qword ptr [r14 + V_CREDIT]
	jae	1f
	xor	ecx, ecx
1:	mov	qword ptr [r14 + V_CREDIT], 0
	cmp	rcx, r13
	jbe	2f
	mov	r13, rcx
2:	pop	rdx
	pop	rcx
	ret

/* One step: a tick, the checks, then the next journal record. Clobbers rax, rcx, rdx. */
check_step:
	call	tick
	mov	rax, INVARIANT
	xor	rax, r15
	cmp	rax, r11
	jne	panic_regs
	mov	rax, r15
	shl	rax, PERCPU_SHIFT
	add	rax, PERCPU_BASE
	cmp	rax, r14
	jne	panic_regs

	movq	rax, xmm0
	cmp	rax, rbx
	jne	panic_xmm

	test	r10, r10
	jz	3f
	lea	rax, [r10 - 1]
	mov	ecx, eax
	and	ecx, 255
	shl	ecx, 4
	cmp	qword ptr [r14 + rcx + JOURNAL], rax
	jne	panic_journal
	cmp	qword ptr [r14 + rcx + JOURNAL + 8], r9
	jne	panic_journal
3:
	mov	rax, r9
	xor	rax, r10
	mov	rcx, CHAIN_MUL
	imul	rax, rcx
	rol	rax, 29
	mov	r9, rax
	mov	ecx, r10d
	and	ecx, 255
	shl	ecx, 4
	mov	qword ptr [r14 + rcx + JOURNAL], r10
	mov	qword ptr [r14 + rcx + JOURNAL + 8], r9
	inc	r10
	ret

/* "vcpu=<r15> seq=<rbx> gap_us=<r13 in us>\n" to the serial port; r13 starts again from 0, so
 * the gaps of this line's own exits count for the next line. Clobbers rax, rcx, rdx, rsi,
 * rdi. */
write_line:
	lea	rdi, [r14 + V_LINE]
	lea	rsi, [rip + s_vcpu]
	mov	ecx, s_seq - s_vcpu
	rep	movsb
	mov	rax, r15
	call	put_dec
	lea	rsi, [rip + s_seq]
	mov	ecx, s_gap - s_seq
	rep	movsb
	mov	rax, rbx
	call	put_dec
	lea	rsi, [rip + s_gap]
	mov	ecx, s_end - s_gap
	rep	movsb
	mov	rax, r13
	mov	ecx, 1000
	mul	rcx
	mov	ecx, dword ptr ds:P_TSC_KHZ
	div	rcx
	xor	r13d, r13d
	call	put_dec
	mov	byte ptr [rdi], 10
	inc	rdi
	lea	rsi, [r14 + V_LINE]
	mov	rcx, rdi
	sub	rcx, rsi
	/* rcx bytes at rsi, four per OUT: KVM exits once per OUTS element (its emulator runs
	 * `rep outs` one element per exit), so dwords take a quarter of the exits. Each exit is
	 * a tick: a pause at any of them shows in gap_us. */
	mov	dx, SERIAL
	mov	rdi, rcx
4:	cmp	rdi, 4
	jb	5f
	outsd
	call	tick
	sub	rdi, 4
	jmp	4b
5:	test	dil, 2
	jz	6f
	outsw
	call	tick
6:	test	dil, 1
	jz	7f
	outsb
	call	tick
7:	ret

/* rax in decimal at rdi, rdi advanced past it. Clobbers rax, rcx, rdx, rsi. */
put_dec:
	lea	rsi, [r14 + V_DIGITS_END]
	mov	ecx, 10
1:	xor	edx, edx
	div	rcx
	add	dl, '0'
	dec	rsi
	mov	byte ptr [rsi], dl
	test	rax, rax
	jnz	1b
	lea	rcx, [r14 + V_DIGITS_END]
	sub	rcx, rsi
	rep	movsb
	ret

panic_tsc:
	lea	rsi, [rip + m_tsc]
	mov	ecx, m_regs - m_tsc
	jmp	panic
panic_regs:
	lea	rsi, [rip + m_regs]
	mov	ecx, m_xmm - m_regs
	jmp	panic
panic_xmm:
	lea	rsi, [rip + m_xmm]
	mov	ecx, m_journal - m_xmm
	jmp	panic
panic_journal:
	lea	rsi, [rip + m_journal]
	mov	ecx, m_device - m_journal
	jmp	panic
panic_device:
	lea	rsi, [rip + m_device]
	mov	ecx, m_end - m_device
/* "PANIC <reason>\n", then shut down: HLT at CPL3 faults, and with no IDT that is a triple
 * fault (KVM_EXIT_SHUTDOWN). Should the fault not stop it, it stays here. */
panic:
	mov	dx, SERIAL
	rep	outsb
8:	hlt
	jmp	8b

s_vcpu:	.ascii "vcpu="
s_seq:	.ascii " seq="
s_gap:	.ascii " gap_us="
s_end:
m_tsc:	.ascii "PANIC tsc\n"
m_regs:	.ascii "PANIC regs\n"
m_xmm:	.ascii "PANIC xmm\n"
m_journal: .ascii "PANIC journal\n"
m_device: .ascii "PANIC device\n"
m_end:
	.balign 16
one:	.quad 1, 0
