"""The witness guest's programs (DESIGN sections 5 and 7, layer L0): what runs inside the VM.

`guestprog.x86` is the real x86-64 witness for /dev/kvm: its memory layout, its parameter
block, its entry state, and its machine code (assembled from `x86/witness.S`, committed as
bytes with their listing). This package imports nothing of handoff or kvmstub: it is the guest,
and the VMM only reads its contract from here.
"""
