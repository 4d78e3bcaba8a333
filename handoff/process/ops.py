"""`handoff upgrade`, `handoff status` and `handoff list`: operator commands that drive a VMM
over QMP or read the runtime directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import msgspec
import trio

from handoff.machine.config import format_size
from handoff.process import runtime
from handoff.qmp.client import QMPClient, QMPConnectionError, QMPError
from handoff.system.sched import waking_without_preempting

PHASE_NAMES = {
    "connect": "connect to successor",
    "hello": "hello (versions, credentials)",
    "prepare": "target prepares VM and vCPUs",
    "pause": "pause vCPUs, snapshot",
    "switchover": "switchover + move context",
    "commit": "commit",
    "resume": "target resumes",
}


@dataclass
class UpgradeSeen:
    """What `upgrade` learned before it ended, however it ended: the old VMM's pid (from
    query-status), whether the upgrade command was sent, and the successor's pid (from its
    reply). Each pid comes with its process's start time, so a reused pid is not mistaken for
    it."""

    old_pid: int = 0
    successor_pid: int = 0
    sent: bool = False
    starts: dict[int, int] = field(default_factory=dict)

    def note(self, pid: int) -> int:
        if pid:
            self.starts[pid] = runtime.process_start_time(pid)
        return pid

    def alive(self, pid: int) -> bool:
        """Whether `pid` still names the process it named when we learned it."""
        return runtime.process_alive(pid, self.starts.get(pid, 0))


async def upgrade(
    control: str,
    sets: Sequence[str] = (),
    exec_argv: Sequence[str] | None = None,
    *,
    timeout: float = 60.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    copy_memory: bool = False,
    on_started: Callable[[dict[str, Any]], None] | None = None,
    seen: UpgradeSeen | None = None,
) -> dict[str, Any]:
    """Ask the VMM at `control` to upgrade itself; return the final HANDOFF event's data
    (status "completed" or "failed") plus the successor's pid ("successor-pid": the peer that
    took the guest as the event names it, else the process the old VMM started). `on_started`
    gets the upgrade command's reply (the successor's pid), `on_event` each HANDOFF event's
    data; `seen` is filled in as the pids become known."""
    seen = seen if seen is not None else UpgradeSeen()
    args: dict[str, Any] = {"set": list(sets)}
    if exec_argv:  # resolved here, where the caller is: the VMM runs elsewhere (its cwd, PATH)
        program = shutil.which(exec_argv[0]) or exec_argv[0]
        args["exec"] = [os.path.abspath(program), *exec_argv[1:]]
    if copy_memory:
        args["copy-memory"] = True
    with trio.fail_after(timeout), waking_without_preempting():
        async with await QMPClient.connect(control) as qmp:
            status = await qmp.execute("query-status")
            seen.old_pid = seen.note(int(status.get("pid") or 0))
            seen.sent = True
            started = await qmp.execute("upgrade", args)
            seen.successor_pid = seen.note(int(started.get("pid") or 0))
            if on_started is not None:
                on_started(started)
            while True:
                event = await qmp.next_event("HANDOFF")
                data = dict(event.data)
                if on_event is not None:
                    on_event(data)
                if data.get("status") in ("completed", "failed"):
                    spawned = int(started.get("pid") or 0)
                    took = 0  # the peer that took the guest, as the old VMM names it
                    if data["status"] == "completed":
                        took = int(data.get("successor-pid") or data.get("peer-pid") or 0)
                    data["successor-pid"] = seen.note(took) or spawned
                    data["spawned-pid"] = spawned
                    data["old-pid"] = seen.old_pid
                    return data


# ---- after the control connection broke: who holds the guest now?

#: How long `handoff upgrade` looks for the guest's holder once the old VMM disconnected (a
#: successor that takes over a dead source answers on the control socket well within this).
PROBE_WAIT = 10.0
PROBE_EVERY = 0.1
PROBE_ANSWER = 1.0  # one try at the control socket (during a blackout nobody accepts)

#: HANDOFF statuses of a handoff still under way.
UNDER_WAY = ("setup", "active", "device")


@dataclass
class Sighting:
    """One look at the VM: what answers on its control socket (pid, VM status, the status of
    its last handoff), or None; and the pid the runtime entry names (0: none)."""

    answer: dict[str, Any] | None
    entry_pid: int


@dataclass
class Outcome:
    """Who holds the guest: "successor", "old", "other" (a process that is neither), "none"
    (every process that could is gone), or "unknown"; its pid; and the words for the operator."""

    holder: str
    pid: int
    text: str


def judge(old: int, successor: int, seen: Sighting, alive: Callable[[int], bool]) -> Outcome | None:
    """The outcome this sighting proves, or None when it proves none yet (look again).

    Proof is either a VMM that answers on the control socket and says it holds the guest, or
    the death of every process that could hold it: the old VMM, its successor (known only from
    the upgrade command's reply) and the process the runtime entry names."""
    if seen.answer is not None:
        pid = int(seen.answer.get("pid") or 0)
        status = str(seen.answer.get("status"))
        if seen.answer.get("handoff") in UNDER_WAY or status == "postmigrate":
            return None  # a handoff is under way, or this VMM handed the guest on: look again
        runs = "runs the guest now" if status == "running" else f"holds the guest ({status})"
        if pid == successor and pid:
            gone = "" if alive(old) else f"; the old VMM (pid {old}) has exited"
            return Outcome("successor", pid, f"the successor (pid {pid}) {runs}{gone}")
        if pid == old and pid:
            return Outcome("old", pid, f"the old VMM (pid {pid}) still {runs.replace(' now', '')}")
        return Outcome(
            "other", pid,
            f"VMM pid {pid} {runs}: neither the old VMM (pid {old}) nor the successor "
            f"(pid {successor or 'unknown'})",
        )  # fmt: skip
    if not successor or alive(old) or alive(successor):
        return None
    if seen.entry_pid and seen.entry_pid not in (old, successor) and alive(seen.entry_pid):
        return None
    return Outcome(
        "none", 0,
        f"no VMM runs the guest: the old VMM (pid {old}) and its successor (pid {successor}) "
        "have both exited and nothing answers on the control socket; the guest is lost",
    )  # fmt: skip


def unknown_outcome(
    old: int,
    successor: int,
    seen: Sighting,
    control: str,
    alive: Callable[[int], bool],
    status_hint: str,
) -> Outcome:
    """What can be said when nothing was proven within PROBE_WAIT."""
    facts = []
    for who, pid in (("the old VMM", old), ("the successor", successor)):
        if pid:
            facts.append(f"{who} (pid {pid}) is {'alive' if alive(pid) else 'gone'}")
    if not successor:
        facts.append("the successor's pid is unknown (no reply to the upgrade command)")
    if seen.entry_pid and seen.entry_pid not in (old, successor):
        state = "alive" if alive(seen.entry_pid) else "gone"
        facts.append(f"the runtime entry names pid {seen.entry_pid} ({state})")
    return Outcome(
        "unknown", 0,
        f"outcome unknown: the VMM disconnected and nothing answered on {control} as the "
        f"guest's holder; {', '.join(facts)}. Look at the VMMs' log (the old VMM's stderr, or "
        f"its journal under systemd) and `{status_hint}`",
    )  # fmt: skip


async def look(control: str) -> Sighting:
    """Ask whoever answers on `control` what it holds; read the runtime entry beside it."""
    answer: dict[str, Any] | None = None
    with trio.move_on_after(PROBE_ANSWER):
        try:
            async with await QMPClient.connect(control) as qmp:
                status = await qmp.execute("query-status")
                handoff = await qmp.execute("query-handoff")
            answer = {
                "pid": status.get("pid"),
                "status": status.get("status"),
                "handoff": handoff.get("status"),
            }
        except (QMPError, OSError):
            pass
    path = runtime.entry_path(control)
    entry_pid = 0
    for item in runtime.list_vms(os.path.dirname(path) or "."):
        if item.path == path:
            entry_pid = item.entry.pid
    return Sighting(answer, entry_pid)


async def find_holder(
    control: str, seen: UpgradeSeen, status_hint: str, wait: float = PROBE_WAIT
) -> Outcome:
    """Who holds the guest after the control connection broke during an upgrade: looked for
    until proven or `wait` has passed."""
    sighting = Sighting(None, 0)
    with trio.move_on_after(wait):
        while True:
            sighting = await look(control)
            outcome = judge(seen.old_pid, seen.successor_pid, sighting, seen.alive)
            if outcome is not None:
                return outcome
            await trio.sleep(PROBE_EVERY)
    return unknown_outcome(
        seen.old_pid, seen.successor_pid, sighting, control, seen.alive, status_hint
    )


async def query(control: str, *commands: str) -> list[Any]:
    async with await QMPClient.connect(control) as qmp:
        return [await qmp.execute(c) for c in commands]


#: What the guest and the two VMMs are doing while a HANDOFF event's status holds.
STATUS_TEXT = {
    "setup": "connecting to the successor: versions, credentials (guest running)",
    "active": "successor builds its VM over the same memory (guest running)",
    "device": "guest paused: switchover, context move, commit",
    "completed": "the successor resumed the guest",
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
    status_hint: str = "",
) -> int:
    """`handoff upgrade`. Reports only what it can verify: the old VMM's own word while it is
    connected ("completed", or "failed" with its recovery), else, once the connection broke or
    the time ran out, who answers on the control socket or which processes are gone."""
    status_hint = status_hint or f"handoff status --control {control}"
    progress = None if as_json else make_progress()
    seen = UpgradeSeen()
    broken = ""
    try:
        data = trio.run(
            lambda: upgrade(
                control,
                sets,
                exec_argv,
                timeout=timeout,
                on_event=progress.event if progress else None,
                on_started=progress.started if progress else None,
                seen=seen,
            )
        )
    except QMPConnectionError as exc:
        data = {"status": "failed", "error-desc": str(exc)}
        broken = "disconnected"
    except QMPError as exc:
        data = {"status": "failed", "error-desc": str(exc)}
        broken = "" if seen.sent else "disconnected"
    except trio.TooSlowError:
        data = {"status": "failed", "error-desc": f"no result within {timeout:g} s"}
        broken = "too slow"
    finally:
        if progress is not None:
            progress.close()
    outcome = _outcome(control, seen, data, broken, status_hint)
    data.setdefault("old-pid", seen.old_pid)
    data.setdefault("successor-pid", seen.successor_pid)
    data["guest-holder"] = outcome.holder
    data["guest-holder-pid"] = outcome.pid
    data["outcome-desc"] = outcome.text
    ok = data.get("status") == "completed" and outcome.holder == "successor"
    if as_json:
        print(json.dumps(data, sort_keys=True))
        return 0 if ok else 1
    if data.get("status") == "completed":
        print(f"upgrade completed: successor pid {data.get('successor-pid')}")
        print(format_phases(data))
        print(
            f"  downtime (source side): {data.get('downtime', 0):.3f} ms, "
            f"total {data.get('total-time', 0):.3f} ms"
        )
        if not ok:
            print(f"  but {outcome.text}", file=sys.stderr)
            return 1
        return 0
    print(describe_outcome(data), file=sys.stderr)
    return 1


def describe_outcome(data: dict[str, Any]) -> str:
    """The words for an upgrade that did not complete (from `upgrade_main`'s result)."""
    return f"upgrade failed: {data.get('error-desc', 'unknown error')}\n  {data['outcome-desc']}"


def _outcome(
    control: str, seen: UpgradeSeen, data: dict[str, Any], broken: str, status_hint: str
) -> Outcome:
    """Who holds the guest after `upgrade` ended with `data` (see upgrade_main)."""
    if data.get("status") == "completed":
        # The old VMM's word: the peer took the guest. Still there? It may have died since.
        pid = int(data.get("successor-pid") or 0)
        if pid and not seen.alive(pid):
            return Outcome(
                "none", 0,
                f"the successor (pid {pid}) has exited since it resumed the guest: no VMM "
                f"runs the guest now (the old VMM handed it on); see the VMMs' log",
            )  # fmt: skip
        spawned = int(data.get("spawned-pid") or 0)
        if spawned and pid != spawned:
            return Outcome(
                "other", pid,
                f"pid {pid} took the guest, not the successor the old VMM started "
                f"(pid {spawned})",
            )  # fmt: skip
        return Outcome("successor", pid, f"the successor (pid {pid}) runs the guest")
    if not seen.sent:
        # Nothing was asked of any VMM: the connection failed before the upgrade command.
        return Outcome("unknown" if broken else "old", seen.old_pid, "no upgrade was started")
    if not broken:
        # The old VMM answered (an error reply, or a "failed" event with its recovery) and is
        # still connected: its word is the proof.
        recovery = data.get("recovery") or "none"
        return Outcome(
            "old", seen.old_pid,
            f"the old VMM (pid {seen.old_pid}) keeps running the guest (recovery: {recovery})",
        )  # fmt: skip
    return trio.run(find_holder, control, seen, status_hint)


def status_main(control: str, as_json: bool) -> int:
    try:
        status, name, handoff, migration = trio.run(
            lambda: query(control, "query-status", "query-name", "query-handoff", "query-migrate")
        )
    except QMPError as exc:
        print(f"handoff status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        out = {"status": status, "name": name, "handoff": handoff, "migration": migration}
        print(json.dumps(out, sort_keys=True))
        return 0
    if migration.get("status") == "held":
        print(
            f"VM {name['name']}: a migrated guest HELD here in doubt (session "
            f"{migration.get('session') or '?'}): received whole, its source's decision never "
            "came. The source delivers it when it reconnects; if the source host is gone, "
            f"fence it, then `handoff resolve {name['name']} --finish --source-fenced` (or "
            "`--give-up`)"
        )
    print(
        f"VM {name['name']}: {status['status']} (pid {status.get('pid')}, "
        f"{status.get('mode')} on {status.get('hypervisor', 'kvmstub')}, "
        f"{status.get('vcpus')} vCPUs, uptime {status.get('uptime')} s)"
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
        "hypervisor": entry.hypervisor,
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
    header = ("NAME", "STATE", "PID", "VERSION", "MODE", "HYPERVISOR", "VCPUS", "MEMORY",
              "UPTIME", "HANDOFFS", "LAST PAUSE")  # fmt: skip
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
                e.hypervisor,
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


# ---- handoff migrate ---------------------------------------------------------------------------


def progress_line(data: dict[str, Any]) -> str:
    """One line of a migration's progress: round, pages sent, rate, remaining, ETA."""
    rate = data.get("rate-pages-per-s") or 0
    mb_s = rate * 4096 / 1e6
    eta = data.get("eta-ms")
    eta_text = "?" if eta is None else f"{eta / 1e3:.1f} s"
    throttle = data.get("cpu-throttle-percentage") or 0
    return (
        f"round {data.get('round', data.get('rounds', 0))}: {data.get('pages', 0)} pages sent "
        f"({data.get('private-pages', 0)} encrypted, {data.get('shared-pages', 0)} shared), "
        f"{mb_s:.1f} MB/s, {data.get('remaining-pages', 0)} pages remaining, ETA {eta_text}"
        + (f", vCPUs throttled {throttle} %" if throttle else "")
    )


def max_throttle(data: Mapping[str, Any]) -> int:
    """The highest vCPU throttle a migration's rounds ran under (0: none)."""
    rounds = data.get("throttle-per-round") or []
    return max((t for t in rounds if isinstance(t, int)), default=0)


async def migrate(
    control: str,
    to: str,
    downtime_limit: float,
    tls: Sequence[str] | None,
    *,
    timeout: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    min_rounds: int = 0,
    target_platforms: Sequence[str] = (),
    extra_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Ask the VMM at `control` to migrate its guest to `to`; return the final MIGRATION
    event's data. SIGINT (Ctrl-C) sends migrate_cancel and waits for the outcome.
    `target_platforms`: the allow-list of target platform ids (empty: any). `extra_args`:
    more QMP `migrate` arguments (auto-converge's: `flags.migrate_args`)."""
    args: dict[str, Any] = {"uri": to, "downtime-limit": downtime_limit, **(extra_args or {})}
    if target_platforms:
        args["target-platforms"] = list(target_platforms)
    if min_rounds:
        args["x-min-rounds"] = min_rounds
    if tls:
        args.update(zip(("tls-cert", "tls-key", "tls-ca"), tls, strict=True))

    async def cancel_on_sigint(task_status: trio.TaskStatus[None]) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                print("\ncancelling the migration (migrate_cancel)", file=sys.stderr, flush=True)
                try:
                    async with await QMPClient.connect(control) as qmp:
                        await qmp.execute("migrate_cancel")
                except QMPError as exc:
                    print(f"could not cancel: {exc.desc}", file=sys.stderr, flush=True)

    try:
        return await _migrate(control, args, timeout, on_event, cancel_on_sigint)
    except BaseExceptionGroup as group:  # the nursery's: raise the one failure as itself
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        raise leaf from None


async def _migrate(
    control: str,
    args: dict[str, Any],
    timeout: float,
    on_event: Callable[[dict[str, Any]], None] | None,
    cancel_on_sigint: Callable[..., Any],
) -> dict[str, Any]:
    final: dict[str, Any] = {}
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_sigint)
            async with await QMPClient.connect(control) as qmp:
                await qmp.execute("migrate", args)
                while not final:
                    data = dict((await qmp.next_event("MIGRATION")).data)
                    if on_event is not None:
                        on_event(data)
                    if data.get("status") in ("completed", "failed", "cancelled"):
                        final = data
            nursery.cancel_scope.cancel()
    return final


def migrate_main(
    control: str,
    to: str,
    downtime_limit: float,
    tls: Sequence[str] | None,
    as_json: bool,
    timeout: float,
    min_rounds: int = 0,
    *,
    target_platforms: Sequence[str] = (),
    extra_args: Mapping[str, Any] | None = None,
) -> int:
    """`handoff migrate`: a live progress line on stderr, the result on stdout."""
    tty = sys.stderr.isatty()

    def show(data: dict[str, Any]) -> None:
        if data.get("status") != "active" or "round" not in data:
            return
        line = progress_line(data)
        if tty:
            print("\r\x1b[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        data = trio.run(
            lambda: migrate(
                control,
                to,
                downtime_limit,
                tls,
                timeout=timeout,
                on_event=show,
                min_rounds=min_rounds,
                target_platforms=target_platforms,
                extra_args=extra_args,
            )
        )
    except QMPError as exc:
        if tty:
            print(file=sys.stderr)
        message = f"migration refused: {exc.desc}"
        if as_json:
            print(json.dumps({"status": "refused", "error": exc.desc}))
        else:
            print(message, file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"no outcome within {timeout:g} s; see `handoff status`", file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    if as_json:
        print(json.dumps(data, sort_keys=True))
    elif data.get("status") == "completed":
        print(
            f"migrated to {data.get('target')}: {data.get('rounds')} rounds, "
            f"{data.get('pages')} pages, pause {data.get('downtime-ms')} ms, total "
            f"{data.get('total-ms')} ms"
            + (f", vCPUs throttled up to {top} %" if (top := max_throttle(data)) else "")
        )
    else:
        print(
            f"migration {data.get('status')}: {data.get('error')} (recovery: "
            f"{data.get('recovery')}); the guest runs here",
            file=sys.stderr,
        )
    return 0 if data.get("status") == "completed" else 1


# ---- handoff resolve ---------------------------------------------------------------------------


def resolve_main(control: str, decision: str, source_fenced: bool, as_json: bool) -> int:
    """`handoff resolve`: the operator's decision for a guest a migration target holds."""

    async def ask() -> dict[str, Any]:
        async with await QMPClient.connect(control) as qmp:
            answer = await qmp.execute(
                "migrate-resolve", {"decision": decision, "source-fenced": source_fenced}
            )
        return dict(answer)

    try:
        data = trio.run(ask)
    except QMPError as exc:
        if as_json:
            print(json.dumps({"status": "refused", "error": exc.desc}))
        else:
            print(f"refused: {exc.desc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"status": "done", **data}, sort_keys=True))
    elif data.get("outcome") == "running":
        print(f"the held guest runs on this target now (session {data.get('session')})")
    else:
        print(f"the held guest was torn down, its ASID freed (session {data.get('session')})")
    return 0
