"""What one handoff did, phase by phase: shown by `query-handoff`, logged, and benchmarked."""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any


class HandoffRecord:
    """Phases are named spans in milliseconds; `downtime` is the source's pause to the
    target's `Resumed` as seen by the source (the guest reports its own pause in `gap_us`)."""

    def __init__(self) -> None:
        self.id = ""
        self.status = "none"
        self.role = ""
        self.peer_pid = 0
        self.started = 0.0
        self.phases: dict[str, float] = {}
        self.total_ms = 0.0
        self.downtime_ms = 0.0
        self.setup_ms = 0.0
        self.error = ""
        self.recovery = ""
        self.protocol = 0
        self.workdir = ""
        self._t0 = 0.0
        self._mark = 0.0
        self.requests_in_pause = 0
        self.messages_in_pause = 0
        self.pause_seqs: dict[int, int] = {}
        # The blackout's steps as CLOCK_MONOTONIC ns (comparable between the two VMMs of a
        # host): this side's marks, and what its backend timed per vCPU and for the VM.
        self.steps: dict[str, Any] = {}

    def begin(self, role: str) -> None:
        self.__init__()  # type: ignore[misc]
        self.id = uuid.uuid4().hex[:12]
        self.role = role
        self.status = "setup"
        self.started = time.time()
        self._t0 = self._mark = time.perf_counter()

    def phase(self, name: str) -> None:
        """Close the span running since the previous mark under `name`."""
        now = time.perf_counter()
        self.phases[name] = round((now - self._mark) * 1e3, 3)
        self._mark = now

    def finish(self, status: str, error: str = "", recovery: str = "") -> None:
        self.status = status
        self.error = error
        self.recovery = recovery
        self.total_ms = round((time.perf_counter() - self._t0) * 1e3, 3)

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "role": self.role,
            "total-time": self.total_ms,
            "downtime": self.downtime_ms,
            "setup-time": self.setup_ms,
            "phases": dict(self.phases),
            "protocol": self.protocol,
            "requests-in-pause": self.requests_in_pause,
            "messages-in-pause": self.messages_in_pause,
        }
        if self.pause_seqs:
            out["pause-seqs"] = [
                self.pause_seqs.get(v, -1) for v in range(max(self.pause_seqs) + 1)
            ]
        if self.steps:
            out["steps"] = self.steps
        if self.peer_pid:
            out["peer-pid"] = self.peer_pid
        if self.error:
            out["error-desc"] = self.error
        if self.recovery:
            out["recovery"] = self.recovery
        return out


def handoff_summary(log: logging.Logger, vm: str, rec: HandoffRecord) -> None:
    """Log the one summary line of a handoff that ended (completed or failed), on either side.

    The line names the handoff's id, the VM, both peers' pids (source -> target), this side's
    role, the protocol version, the pause this side measured, the total, and every phase; a
    failure adds the recovery and the reason. In JSON the same facts are in `handoff`.
    """
    me = os.getpid()
    source, target = (me, rec.peer_pid) if rec.role == "source" else (rec.peer_pid, me)
    phases = " ".join(f"{name}={ms:.3f}" for name, ms in rec.phases.items())
    text = (
        f"handoff {rec.id} {rec.status}: vm {vm}, source pid {source} -> target pid {target}, "
        f"role {rec.role}, protocol {rec.protocol}, pause {rec.downtime_ms:.3f} ms, "
        f"total {rec.total_ms:.3f} ms, phases {phases or '-'}"
    )
    if rec.recovery:
        text += f", recovery {rec.recovery}"
    if rec.error:
        text += f": {rec.error}"
    fields = {
        "handoff": {
            "id": rec.id,
            "vm": vm,
            "status": rec.status,
            "role": rec.role,
            "source-pid": source,
            "target-pid": target,
            "protocol": rec.protocol,
            "pause-ms": rec.downtime_ms,
            "total-ms": rec.total_ms,
            "phases": dict(rec.phases),
            "recovery": rec.recovery,
            "error": rec.error,
            "at": round(time.time(), 6),
        }
    }
    level = logging.INFO if rec.status == "completed" else logging.ERROR
    log.log(level, "%s", text, extra={"fields": fields})
