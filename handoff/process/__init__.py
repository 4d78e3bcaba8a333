"""The VMM process (DESIGN section 7, layer L6): its lifecycle (`app`), the run flags
(`flags`), the runtime directory (`runtime`), and the operator commands that drive it (`ops`)."""
