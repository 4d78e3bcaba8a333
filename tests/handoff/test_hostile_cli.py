"""The operator commands under hard faults and hostile use: what `handoff upgrade` says when
the old VMM dies during the handoff (who holds the guest now, checked against what happened),
an unknown VM name, and output into a pipe its reader closed."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.process import ops
from handoff.system.procs import pid_alive
from handoff.testing import PROGRAM, VmmProcess


def run_cli(
    env: dict[str, str], *args: str, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROGRAM, *args], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
        timeout=90, check=False,
    )  # fmt: skip


@pytest.fixture
def web(tmp_path: Path, kvmstub_daemon: Any) -> Iterator[VmmProcess]:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, name="web", mode="sev-es")
    vmm.start()
    try:
        yield vmm
    finally:
        vmm.kill_all()


async def _wait_gone(pids: list[int], timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while any(pid_alive(p) for p in pids):
            await trio.sleep(0.02)


# ---- item 8: after the old VMM's death the CLI says who holds the guest, as it is


async def test_old_vmm_killed_after_switchover_cli_names_the_successor_that_took_the_guest(
    web: VmmProcess,
) -> None:
    old = await web.pid()
    await web.qmp("x-set-fault", spec="source:switchover:crash")
    done = run_cli(web.env, "upgrade", "web")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "keeps running the guest" not in out
    holder = await web.pid()  # whoever answers on the control socket now
    web.pids.append(holder)
    assert holder != old and not pid_alive(old)
    assert (await web.qmp("query-status"))["status"] == "running"
    assert f"the successor (pid {holder}) runs the guest now" in out, out
    assert f"the old VMM (pid {old}) has exited" in out, out
    report = await web.wait_lines(2)
    assert not report.panics


async def test_old_vmm_killed_during_setup_cli_says_no_vmm_runs_the_guest(
    web: VmmProcess,
) -> None:
    old = await web.pid()
    await web.qmp("x-set-fault", spec="source:hello:crash")
    done = run_cli(web.env, "upgrade", "web", "--json")
    assert done.returncode != 0, done.stderr
    result = json.loads(done.stdout)
    successor = result["successor-pid"]
    web.pids.append(successor)
    await _wait_gone([old, successor])
    assert not pid_alive(old) and not pid_alive(successor)
    assert result["guest-holder"] == "none", result
    assert "keeps running the guest" not in result["outcome-desc"]
    assert f"the old VMM (pid {old}) and its successor (pid {successor})" in result["outcome-desc"]
    # And the plain words say the same.
    assert "no VMM runs the guest" in ops.describe_outcome(result)


async def test_successor_killed_right_after_it_reported_resumed_is_not_called_the_holder(
    web: VmmProcess,
) -> None:
    old = await web.pid()
    done = run_cli(web.env, "upgrade", "web", "--set", "x-fault=target:resumed:crash")
    out = done.stdout + done.stderr
    successor = int(out.split("successor pid ")[1].split()[0])
    web.pids.append(successor)
    await _wait_gone([old, successor])
    assert not pid_alive(successor)
    assert done.returncode != 0, out
    assert f"the successor (pid {successor}) has exited" in out, out
    assert "no VMM runs the guest" in out, out


# ---- the outcome logic on its own, with fakes


def _sighting(pid: int = 0, status: str = "running", handoff: str = "completed") -> ops.Sighting:
    answer = {"pid": pid, "status": status, "handoff": handoff} if pid else None
    return ops.Sighting(answer=answer, entry_pid=0)


def test_judge_names_whoever_answers_on_the_control_socket() -> None:
    def alive(pid: int) -> bool:
        return pid in {20}

    got = ops.judge(10, 20, _sighting(20), alive)
    assert got is not None and (got.holder, got.pid) == ("successor", 20)
    assert "the old VMM (pid 10) has exited" in got.text
    got = ops.judge(10, 20, _sighting(10), lambda p: True)
    assert got is not None and (got.holder, got.pid) == ("old", 10)
    got = ops.judge(10, 20, _sighting(30), alive)
    assert got is not None and got.holder == "other" and "pid 30" in got.text


def test_judge_waits_while_a_handoff_is_under_way_or_nothing_is_certain() -> None:
    assert ops.judge(10, 20, _sighting(10, handoff="device"), lambda p: True) is None
    assert ops.judge(10, 20, _sighting(10, status="postmigrate"), lambda p: True) is None
    # Nothing answers, but the successor is alive: it may be taking over.
    assert ops.judge(10, 20, _sighting(), lambda p: p == 20) is None
    # Nothing answers and the successor is unknown (the reply never came): cannot tell.
    assert ops.judge(10, 0, _sighting(), lambda p: False) is None
    # The entry names a live process: it may yet answer.
    seen = ops.Sighting(answer=None, entry_pid=40)
    assert ops.judge(10, 20, seen, lambda p: p == 40) is None


def test_judge_says_the_guest_is_gone_only_when_every_holder_is_dead() -> None:
    got = ops.judge(10, 20, _sighting(), lambda p: False)
    assert got is not None and got.holder == "none"
    assert "the old VMM (pid 10) and its successor (pid 20) have both exited" in got.text


def test_unknown_outcome_says_where_to_look() -> None:
    got = ops.unknown_outcome(10, 20, ops.Sighting(answer=None, entry_pid=0), "/r/web.qmp",
                              lambda p: p == 10, "handoff status web")  # fmt: skip
    assert got.holder == "unknown"
    assert got.text.startswith("outcome unknown: the VMM disconnected")
    assert "handoff status web" in got.text and "log" in got.text
    assert "the old VMM (pid 10) is alive" in got.text


# ---- item 9: an unknown name; a reader that closed the pipe


def test_upgrade_of_an_unknown_name_says_there_is_no_such_vm_and_where_it_looked(
    tmp_path: Path,
) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    env = {**os.environ, "HANDOFF_RUNTIME_DIR": str(rt)}
    for command in ("upgrade", "status"):
        done = run_cli(env, command, "nosuch")
        out = done.stdout + done.stderr
        assert done.returncode != 0
        assert "no VM named nosuch" in out, out
        assert str(rt) in out
        assert "keeps running" not in out and "Traceback" not in out


@pytest.mark.parametrize("command", [["status", "web"], ["list"], ["status", "web", "--json"]])
def test_output_into_a_closed_pipe_exits_quietly(web: VmmProcess, command: list[str]) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before a byte is written: as `| head -0`, deterministically
    try:
        done = run_cli(web.env, *command, stdout=w)
    finally:
        os.close(w)
    assert done.stderr == "", done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell shows for `head` closing early
