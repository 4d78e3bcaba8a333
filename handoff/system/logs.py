"""The VMM's logs: text or JSON lines on stderr, journald priorities under systemd, and the one
summary line every handoff logs.

- `--log-format text`: `2025-01-01 12:00:00,000 handoff[PID] INFO handoff.app: message`
  (loggers keep the modules' short names).
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
from typing import Any, TextIO

import msgspec

__all__ = ["FORMATS", "journald_stream", "setup"]

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
