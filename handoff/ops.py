"""`handoff upgrade`, `handoff status` and `handoff list`: operator commands that drive a VMM
over QMP or read the runtime directory."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import msgspec
import trio

from . import runtime
from .config import format_size
from .qmp_client import QMPClient, QMPError
from .sched import waking_without_preempting

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
    on_started: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Ask the VMM at `control` to upgrade itself; return the final HANDOFF event's data
    (status "completed" or "failed") plus the successor's pid. `on_started` gets the upgrade
    command's reply (the successor's pid), `on_event` each HANDOFF event's data."""
    args: dict[str, Any] = {"set": list(sets)}
    if exec_argv:
        args["exec"] = list(exec_argv)
    if copy_memory:
        args["copy-memory"] = True
    with trio.fail_after(timeout), waking_without_preempting():
        async with await QMPClient.connect(control) as qmp:
            started = await qmp.execute("upgrade", args)
            if on_started is not None:
                on_started(started)
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


#: What the guest and the two VMMs are doing while a HANDOFF event's status holds.
STATUS_TEXT = {
    "setup": "connecting to the successor: versions, credentials (guest running)",
    "active": "successor builds its VM over the same memory (guest running)",
    "device": "guest paused: switchover, context move, commit",
    "completed": "successor runs the guest",
    "failed": "handoff failed",
}


class PlainProgress:
    """One line per step of an upgrade, as it happens, with the time since the command."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.t0 = time.perf_counter()

    def _line(self, text: str) -> None:
        ms = (time.perf_counter() - self.t0) * 1e3
        print(f"  {ms:9.1f} ms  {text}", file=self.out, flush=True)

    def started(self, reply: dict[str, Any]) -> None:
        self._line(f"successor pid {reply.get('pid')} started, listening on {reply.get('uri')}")

    def event(self, data: dict[str, Any]) -> None:
        status = str(data.get("status"))
        self._line(f"{status}: {STATUS_TEXT.get(status, status)}")

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    """The same steps on a terminal: a spinner on the running step, a tick on each done one."""

    def __init__(self) -> None:
        from rich.console import Console

        super().__init__()
        self.console = Console()
        self.spinner = self.console.status("starting the successor")
        self.spinner.start()
        self.current = "starting the successor"

    def _line(self, text: str) -> None:
        ms = (time.perf_counter() - self.t0) * 1e3
        self.console.print(f"[green]\u2713[/green] {self.current} [dim]{ms:.1f} ms[/dim]")
        self.current = text
        self.spinner.update(text)

    def event(self, data: dict[str, Any]) -> None:
        status = str(data.get("status"))
        if status in ("completed", "failed"):
            ms = (time.perf_counter() - self.t0) * 1e3
            mark = "[green]\u2713[/green]" if status == "completed" else "[red]\u2717[/red]"
            self.close()  # first: a transient spinner erases its own line when it stops
            self.console.print(f"{mark} {self.current} [dim]{ms:.1f} ms[/dim]")
            return
        super().event(data)

    def close(self) -> None:
        self.spinner.stop()


def make_progress() -> PlainProgress:
    """Rich when it is installed and stdout is a terminal, else plain lines."""
    if sys.stdout.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()


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
    progress = None if as_json else make_progress()
    try:
        data = trio.run(
            lambda: upgrade(
                control,
                sets,
                exec_argv,
                timeout=timeout,
                on_event=progress.event if progress else None,
                on_started=progress.started if progress else None,
            )
        )
    except QMPError as exc:
        data = {"status": "failed", "error-desc": str(exc)}
    except trio.TooSlowError:
        data = {"status": "failed", "error-desc": f"no result within {timeout:g} s"}
    finally:
        if progress is not None:
            progress.close()
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
