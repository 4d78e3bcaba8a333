"""`handoff upgrade`, `handoff status` and `handoff list`: operator commands that drive a VMM
over QMP or read the runtime directory."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from . import runtime
from .config import format_size
from .qmp_client import QMPClient, QMPError

PHASE_NAMES = {
    "connect": "connect to successor",
    "hello": "hello (versions, credentials)",
    "prepare": "target prepares VM and vCPUs",
    "pause": "pause vCPUs, snapshot",
    "switchover": "switchover + move context",
    "commit": "commit",
    "resume": "target resumes",
}


async def upgrade(
    control: str,
    sets: Sequence[str] = (),
    exec_argv: Sequence[str] | None = None,
    *,
    timeout: float = 60.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    copy_memory: bool = False,
) -> dict[str, Any]:
    """Ask the VMM at `control` to upgrade itself; return the final HANDOFF event's data
    (status "completed" or "failed") plus the successor's pid."""
    args: dict[str, Any] = {"set": list(sets)}
    if exec_argv:
        args["exec"] = list(exec_argv)
    if copy_memory:
        args["copy-memory"] = True
    with trio.fail_after(timeout):
        async with await QMPClient.connect(control) as qmp:
            started = await qmp.execute("upgrade", args)
            while True:
                event = await qmp.next_event("HANDOFF")
                data = dict(event.data)
                if on_event is not None:
                    on_event(data)
                if data.get("status") in ("completed", "failed"):
                    data["successor-pid"] = started.get("pid", 0)
                    return data


async def query(control: str, *commands: str) -> list[Any]:
    async with await QMPClient.connect(control) as qmp:
        return [await qmp.execute(c) for c in commands]


def _print_progress(data: dict[str, Any]) -> None:
    status = data.get("status")
    if status in ("completed", "failed"):
        return
    print(f"  {status}", file=sys.stderr, flush=True)


def format_phases(data: dict[str, Any]) -> str:
    lines = []
    for name, ms in (data.get("phases") or {}).items():
        lines.append(f"    {PHASE_NAMES.get(name, name):34s} {ms:9.3f} ms")
    return "\n".join(lines)


def upgrade_main(
    control: str,
    sets: Sequence[str],
    exec_argv: Sequence[str] | None,
    as_json: bool,
    timeout: float,
) -> int:
    try:
        data = trio.run(
            lambda: upgrade(
                control,
                sets,
                exec_argv,
                timeout=timeout,
                on_event=None if as_json else _print_progress,
            )
        )
    except QMPError as exc:
        data = {"status": "failed", "error-desc": str(exc)}
    except trio.TooSlowError:
        data = {"status": "failed", "error-desc": f"no result within {timeout:g} s"}
    ok = data.get("status") == "completed"
    if as_json:
        print(json.dumps(data, sort_keys=True))
        return 0 if ok else 1
    if ok:
        print(f"upgrade completed: successor pid {data.get('successor-pid')}")
        print(format_phases(data))
        print(
            f"  downtime (source side): {data.get('downtime', 0):.3f} ms, "
            f"total {data.get('total-time', 0):.3f} ms"
        )
        return 0
    recovery = data.get("recovery") or "none"
    print(f"upgrade failed: {data.get('error-desc', 'unknown error')}", file=sys.stderr)
    print(f"  the old VMM keeps running the guest (recovery: {recovery})", file=sys.stderr)
    return 1


def status_main(control: str, as_json: bool) -> int:
    try:
        status, name, handoff = trio.run(
            lambda: query(control, "query-status", "query-name", "query-handoff")
        )
    except QMPError as exc:
        print(f"handoff status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"status": status, "name": name, "handoff": handoff}, sort_keys=True))
        return 0
    print(
        f"VM {name['name']}: {status['status']} (pid {status.get('pid')}, "
        f"{status.get('mode')}, {status.get('vcpus')} vCPUs, uptime {status.get('uptime')} s)"
    )
    if handoff.get("status", "none") != "none":
        print(
            f"last handoff {handoff.get('id')}: {handoff['status']} as {handoff.get('role')}, "
            f"downtime {handoff.get('downtime')} ms, total {handoff.get('total-time')} ms"
        )
        if handoff.get("error-desc"):
            print(f"  error: {handoff['error-desc']}")
    else:
        print("no handoff yet in this VMM")
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def listing_json(item: runtime.VmListing) -> dict[str, Any]:
    entry = item.entry
    out: dict[str, Any] = {
        "name": entry.name,
        "state": "alive" if item.alive else "stale",
        "pid": entry.pid,
        "version": entry.version,
        "mode": entry.mode,
        "vcpus": entry.vcpus,
        "memory": entry.memory,
        "uptime": round(item.uptime, 3) if item.alive else None,
        "started": entry.started,
        "handoffs": entry.handoffs,
        "control": entry.control,
        "entry": item.path,
    }
    if entry.last_handoff is not None:
        out["last-handoff"] = msgspec.to_builtins(entry.last_handoff)
    return out


def list_main(directory: str, as_json: bool, prune: bool) -> int:
    """`handoff list`: every VM with an entry in the runtime directory."""
    removed = runtime.prune(directory) if prune else []
    items = runtime.list_vms(directory)
    if as_json:
        print(
            json.dumps(
                {
                    "runtime-dir": directory,
                    "vms": [listing_json(i) for i in items],
                    "pruned": [listing_json(i) for i in removed],
                },
                sort_keys=True,
            )
        )
        return 0
    for item in removed:
        print(f"removed stale entry {item.entry.name} (VMM pid {item.entry.pid} is gone)")
    if not items:
        if not removed:
            print(f"no VMs in {directory}")
        return 0
    header = ("NAME", "STATE", "PID", "VERSION", "MODE", "VCPUS", "MEMORY", "UPTIME",
              "HANDOFFS", "LAST PAUSE")  # fmt: skip
    rows = [header]
    for item in items:
        e = item.entry
        last = e.last_handoff
        if last is None:
            pause = "-"
        elif last.status == "completed":
            pause = f"{last.pause_ms:.3f} ms"
        else:
            pause = f"failed ({last.recovery or 'none'})"
        rows.append(
            (
                e.name,
                "alive" if item.alive else "stale (VMM gone)",
                str(e.pid),
                e.version,
                e.mode,
                str(e.vcpus),
                format_size(e.memory),
                _duration(item.uptime) if item.alive else "-",
                str(e.handoffs),
                pause,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if any(not i.alive for i in items):
        print("stale entries: their VMM exited without cleaning up; remove with --prune")
    return 0
