"""The VMM's logs: text or JSON lines on stderr, journald priorities under systemd, and the one
summary line every handoff logs.

- `--log-format text`: `2025-01-01 12:00:00,000 handoff[PID] INFO handoff.app: message`.
- `--log-format json`: one object per line: `ts` (seconds since the epoch), `level`, `logger`,
  `pid`, `vm`, `msg`, plus structured fields a call adds (a handoff summary adds `handoff`).
- Under systemd, when stderr is the journal stream (`$JOURNAL_STREAM` names its device and
  inode), each line starts with `<N>`, its syslog priority, which journald stores as the entry's
  priority; the timestamp is left to journald.

`handoff_summary` is what source and target call when a handoff ends, so that both sides (and
every outcome) log one line of the same shape:

    handoff 3f2a9c1d7e4b completed: vm web, source pid 4711 -> target pid 4712, role source,
    protocol 2, pause 1.838 ms, total 170.150 ms, phases connect=164.697 hello=0.823 ...
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

if TYPE_CHECKING:
    from .record import HandoffRecord

__all__ = ["FORMATS", "handoff_summary", "journald_stream", "setup"]

FORMATS = ("text", "json")

#: logging level -> syslog priority (sd-daemon(3): the `<N>` prefix journald reads).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_json = msgspec.json.Encoder()


def _priority(levelno: int) -> int:
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


def journald_stream(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is the journal stream systemd connected us to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class TextFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        pid = os.getpid()
        if journald:  # journald stamps the time and knows the unit and pid
            super().__init__("%(levelname)s %(name)s: %(message)s")
        else:
            super().__init__(f"%(asctime)s handoff[{pid}] %(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            prefix = f"<{_priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, journald: bool, vm: str) -> None:
        super().__init__()
        self.journald = journald
        self.vm = vm

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "vm": self.vm,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        text = _json.encode(out).decode()
        if self.journald:
            text = f"<{_priority(record.levelno)}>{text}"
        return text


def setup(level: str, fmt: str = "text", vm: str = "") -> None:
    """Configure the root logger: `level` (debug, info, ...), `fmt` text or json, on stderr."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    journald = journald_stream()
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    formatter = JsonFormatter(journald, vm) if fmt == "json" else TextFormatter(journald)
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


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
