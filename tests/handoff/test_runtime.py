"""The runtime directory: per-VM entries, their takeover across handoffs, `handoff list`,
and `handoff upgrade NAME` / `handoff status NAME` without paths."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from handoff import __version__
from handoff.process import runtime
from handoff.testing import PROGRAM, VmmProcess

# -- entries, without a VMM ------------------------------------------------------------------------


def entry(name: str = "vm0", pid: int | None = None, **kw: Any) -> runtime.VmEntry:
    pid = os.getpid() if pid is None else pid
    fields: dict[str, Any] = {
        "name": name,
        "pid": pid,
        "pid_start": runtime.process_start_time(pid),
        "version": "0.1.0",
        "mode": "sev-es",
        "vcpus": 2,
        "memory": 1 << 28,
        "control": f"/nonexistent/{name}.qmp",
        "started": 1000.0,
        "vmm_started": 1000.0,
    }
    fields.update(kw)
    return runtime.VmEntry(**fields)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_entry_sits_beside_the_control_socket_under_the_same_name() -> None:
    assert runtime.entry_path("/run/handoff/web.qmp") == "/run/handoff/web.json"
    assert runtime.entry_path("/tmp/x/control") == "/tmp/x/control.json"


def test_updates_from_both_sides_of_a_handoff_merge_in_either_order(tmp_path: Path) -> None:
    path = str(tmp_path / "vm0.json")
    runtime.write_entry(path, entry(pid=1, started=5.0))
    last = runtime.LastHandoff(id="h1", status="completed", at=9.0, pause_ms=1.5)

    def target(old: runtime.VmEntry | None) -> runtime.VmEntry:
        assert old is not None
        return entry(
            pid=2, started=old.started, handoffs=old.handoffs, last_handoff=old.last_handoff
        )

    def source(old: runtime.VmEntry | None) -> runtime.VmEntry | None:
        assert old is not None
        return msgspec.structs.replace(old, handoffs=old.handoffs + 1, last_handoff=last)

    for order in ((target, source), (source, target)):
        runtime.write_entry(path, entry(pid=1, started=5.0))
        for change in order:
            assert runtime.update_entry(path, change)
        listed = runtime.list_vms(str(tmp_path))
        assert [item.entry.pid for item in listed] == [2]
        assert listed[0].entry.started == 5.0
        assert listed[0].entry.handoffs == 1
        assert listed[0].entry.last_handoff == last


def test_an_entry_is_removed_only_by_the_process_that_owns_it(tmp_path: Path) -> None:
    path = str(tmp_path / "vm0.json")
    runtime.write_entry(path, entry(pid=os.getpid()))
    assert not runtime.remove_entry(path, os.getpid() + 1)
    assert os.path.exists(path)
    assert runtime.remove_entry(path, os.getpid())
    assert not os.path.exists(path)


def test_an_entry_whose_pid_is_gone_or_reused_is_stale(tmp_path: Path) -> None:
    runtime.write_entry(str(tmp_path / "a.json"), entry("a"))
    runtime.write_entry(str(tmp_path / "b.json"), entry("b", pid=dead_pid()))
    # Same pid as a live process, but another start time: the pid was reused.
    runtime.write_entry(str(tmp_path / "c.json"), entry("c", pid_start=1))
    (tmp_path / "notes.txt").write_text("not an entry")
    (tmp_path / "broken.json").write_text("{")
    listed = {item.entry.name: item.alive for item in runtime.list_vms(str(tmp_path))}
    assert listed == {"a": True, "b": False, "c": False}


def test_prune_removes_stale_entries_and_dead_sockets_but_nothing_alive(tmp_path: Path) -> None:
    live_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live_sock.bind(str(tmp_path / "live.qmp"))
    live_sock.listen()
    dead_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead_sock.bind(str(tmp_path / "dead.qmp"))
    dead_sock.close()  # the file stays; nothing listens
    gone = dead_pid()
    runtime.write_entry(
        str(tmp_path / "live.json"), entry("live", control=str(tmp_path / "live.qmp"))
    )
    runtime.write_entry(
        str(tmp_path / "dead.json"), entry("dead", pid=gone, control=str(tmp_path / "dead.qmp"))
    )
    # A stale entry whose socket path was reused by a live server: the socket stays.
    runtime.write_entry(
        str(tmp_path / "old.json"), entry("old", pid=gone, control=str(tmp_path / "live.qmp"))
    )
    removed = sorted(item.entry.name for item in runtime.prune(str(tmp_path)))
    assert removed == ["dead", "old"]
    assert sorted(os.listdir(tmp_path)) == ["live.json", "live.qmp"]
    live_sock.close()


# -- with real VMMs ------------------------------------------------------------------------------


@pytest.fixture
def vmms(tmp_path: Path, kvmstub_daemon: Any) -> Iterator[list[VmmProcess]]:
    made: list[VmmProcess] = []
    yield made
    for vmm in made:
        vmm.kill_all()


def start(made: list[VmmProcess], tmp_path: Path, kvm: Any, name: str, **kw: Any) -> VmmProcess:
    vmm = VmmProcess(tmp_path, kvm.socket, name=name, **kw)
    made.append(vmm)
    vmm.start()
    return vmm


def handoff_cli(vmm: VmmProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `handoff ARGS` as an operator would, with only the runtime directory in the env."""
    return subprocess.run(
        [*PROGRAM, *args], env=vmm.env, capture_output=True, text=True, timeout=60, check=False
    )


async def wait_entry(vmm: VmmProcess, pid: int) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            for item in listing(vmm)["vms"]:
                if item["name"] == vmm.name and item["pid"] == pid:
                    return item
            await trio.sleep(0.02)


def listing(vmm: VmmProcess, *flags: str) -> dict[str, Any]:
    done = handoff_cli(vmm, "list", "--json", *flags)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


async def test_list_shows_each_vm_with_pid_version_shape_and_uptime(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    web = start(vmms, tmp_path, kvmstub_daemon, "web", mode="sev-es", vcpus=2, memory="64M")
    db = start(vmms, tmp_path, kvmstub_daemon, "db", mode="plain", vcpus=1, memory="32M")
    await wait_entry(web, await web.pid())
    item = await wait_entry(db, await db.pid())
    assert item["state"] == "alive"
    assert (item["version"], item["mode"], item["vcpus"], item["memory"]) == (
        __version__, "plain", 1, 32 << 20,
    )  # fmt: skip
    assert item["uptime"] >= 0
    assert item["handoffs"] == 0
    assert "last-handoff" not in item
    assert [v["name"] for v in listing(web)["vms"]] == ["db", "web"]
    text = handoff_cli(web, "list").stdout
    assert text.splitlines()[0].split()[:4] == ["NAME", "STATE", "PID", "VERSION"]
    assert any(line.split()[:2] == ["web", "alive"] for line in text.splitlines())


async def test_upgrade_and_status_by_name_and_the_successor_takes_over_the_entry(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = start(vmms, tmp_path, kvmstub_daemon, "web", mode="sev-es", vcpus=2)
    old_pid = await vmm.pid()
    before = await wait_entry(vmm, old_pid)
    done = handoff_cli(vmm, "upgrade", "web", "--json")
    assert done.returncode == 0, done.stderr + vmm.log()
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    new_pid = result["successor-pid"]
    vmm.pids.append(new_pid)
    await vmm.settle()
    after = await wait_entry(vmm, new_pid)
    with trio.fail_after(10):  # the source adds the pause once it has its Resumed
        while "last-handoff" not in after:
            await trio.sleep(0.02)
            after = await wait_entry(vmm, new_pid)
    assert after["started"] == before["started"]
    assert after["handoffs"] == 1
    last = after["last-handoff"]
    assert last["id"] == result["id"]
    assert last["pause-ms"] == result["downtime"]
    assert (last["from-pid"], last["to-pid"]) == (old_pid, new_pid)
    status = handoff_cli(vmm, "status", "web", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["pid"] == new_pid


async def test_quit_removes_the_entry_and_the_socket(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = start(vmms, tmp_path, kvmstub_daemon, "web")
    await wait_entry(vmm, await vmm.pid())
    await vmm.quit()
    assert sorted(os.listdir(vmm.runtime_dir)) == []


async def test_a_killed_vmm_is_listed_stale_and_prune_removes_it(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = start(vmms, tmp_path, kvmstub_daemon, "web")
    pid = await vmm.pid()
    await wait_entry(vmm, pid)
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(10):
        while vmm.alive_pids():
            await trio.sleep(0.02)
    assert [v["state"] for v in listing(vmm)["vms"]] == ["stale"]
    text = handoff_cli(vmm, "list").stdout
    assert "stale" in text and "--prune" in text
    pruned = listing(vmm, "--prune")
    assert [v["name"] for v in pruned["pruned"]] == ["web"]
    assert pruned["vms"] == []
    assert os.listdir(vmm.runtime_dir) == []
