"""Other processes, as /proc shows them."""

from __future__ import annotations

import contextlib
import os


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a dead child not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True
