"""Process hardening with python-prctl: a name that says what the process is, not dumpable
(no ptrace attach by peers of the same uid, no core dump holding guest keys), and
no_new_privs (nothing it executes can gain privileges)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("handoff.hardening")


def harden(name: str) -> dict[str, Any]:
    """Apply the hardening; return what is in force (shown by QMP and checked by tests)."""
    import prctl  # imported here: a C extension that only processes that harden need

    prctl.set_name(name[:15])
    prctl.set_dumpable(False)
    prctl.set_no_new_privs(True)
    return in_force()


def in_force() -> dict[str, Any]:
    import prctl

    return {
        "name": prctl.get_name(),
        "dumpable": bool(prctl.get_dumpable()),
        "no-new-privs": bool(prctl.get_no_new_privs()),
    }
