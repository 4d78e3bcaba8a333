"""The VMM's machine (DESIGN section 7, layer L3): guest memory (memfds), the vCPUs and their
loops, the devices. It knows nothing of handoffs beyond pausing, resuming and its state."""
