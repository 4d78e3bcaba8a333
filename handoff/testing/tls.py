"""A test PKI for cross-host migration: `handoff.transport.pki`, under the name tests and tools
have always imported (`make_pki`, `make_ca`, `issue`, `Authority`)."""

from __future__ import annotations

from handoff.transport.pki import Authority, issue, make_ca, make_pki

__all__ = ["Authority", "issue", "make_ca", "make_pki"]
