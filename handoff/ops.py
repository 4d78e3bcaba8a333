"""`handoff upgrade` and `handoff status`: operator commands that drive a VMM over QMP."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

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
