"""Transports under the handoff protocol (DESIGN section 7, layer L1): `base.Connection`, what
the protocol's shell needs of one; `unix` (SEQPACKET, SCM_RIGHTS, SO_PEERCRED, the one safe
binder). Nothing here knows what the bytes mean."""
