"""Hostile neighbours in the file system (issue 14, items 2, 4 and 5): a runtime directory or a
control socket that another uid planted, a successor renamed onto another VM, a name run twice,
and a VMM that must remove only the socket it bound itself.

The tests with another uid run real processes under it (`setpriv`), and are skipped unless
this runs as root."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from handoff.process import runtime
from handoff.process.app import App
from handoff.process.flags import strip_flags
from handoff.qmp.client import QMPClient, QMPConnectionError, QMPError
from handoff.testing import PROGRAM, VmmProcess, pid_alive
from handoff.transport.unix import bind_owned, bind_unix_socket, file_identity

NOBODY = 65534
OTHER_USER = 54321  # a uid with no account: the "ordinary user" who runs `handoff`

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs processes under other uids (setpriv): needs root",
)


def as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-writable sticky directory, as /tmp is (short: socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="hr-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmms(kvmstub_daemon: Any) -> Iterator[list[VmmProcess]]:
    made: list[VmmProcess] = []
    yield made
    for vmm in made:
        vmm.kill_all()


def start(
    made: list[VmmProcess], tmp_path: Path, kvm: Any, name: str, *, by_name: bool = False
) -> VmmProcess:
    """A VM in tmp_path/run; `by_name`: without --control (its path from the runtime dir)."""
    vmm = VmmProcess(tmp_path, kvm.socket, name=name, vcpus=1, memory="32M")
    if by_name:
        vmm.argv = strip_flags(vmm.argv, ["--control"])
    made.append(vmm)
    vmm.start()
    return vmm


def handoff_cli(
    env: dict[str, str], *args: str, prefix: list[str] | None = None, timeout: float = 60
) -> Any:
    return subprocess.run(
        [*(prefix or []), *PROGRAM, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
    )


async def wait_entry(path: Path, pid: int) -> runtime.VmEntry:
    with trio.fail_after(10):
        while True:
            entries = [i.entry for i in runtime.list_vms(str(path.parent))]
            for entry in entries:
                if runtime.entry_path(entry.control) == str(path) and entry.pid == pid:
                    return entry
            await trio.sleep(0.02)


# -- item 2: directories and sockets another uid owns ---------------------------------------------


@needs_root
def test_run_refuses_a_runtime_directory_another_uid_created(
    shared: Path, kvmstub_daemon: Any
) -> None:
    planted = shared / "rt"
    subprocess.run([*as_uid(NOBODY), "mkdir", "-m", "0700", str(planted)], check=True)
    env = {**os.environ, "HANDOFF_RUNTIME_DIR": str(planted)}
    done = handoff_cli(
        env,
        "run",
        "--name",
        "web",
        "--kvm",
        str(kvmstub_daemon.socket),
        "--memory",
        "32M",
        timeout=20,
    )
    assert done.returncode != 0
    assert f"{planted} is owned by uid {NOBODY}" in done.stderr, done.stderr
    assert "HANDOFF_RUNTIME_DIR" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(planted) == []
    assert kvmstub_daemon.stats()["vms"] == []


@needs_root
def test_the_default_runtime_directory_planted_by_another_user_is_refused(
    shared: Path, kvmstub_daemon: Any
) -> None:
    # An ordinary user's default is $XDG_RUNTIME_DIR/handoff: another user made it first.
    subprocess.run([*as_uid(NOBODY), "mkdir", "-m", "0777", str(shared / "handoff")], check=True)
    env = {k: v for k, v in os.environ.items() if k != "HANDOFF_RUNTIME_DIR"}
    env["XDG_RUNTIME_DIR"] = str(shared)
    for args in (["run", "--name", "web", "--kvm", "/nonexistent"], ["status", "web"], ["list"]):
        done = handoff_cli(env, *args, prefix=as_uid(OTHER_USER))
        assert done.returncode != 0, (args, done.stdout)
        assert f"{shared / 'handoff'} is owned by uid {NOBODY}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert os.listdir(shared / "handoff") == []


FAKE_QMP = """
import json, os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb")
    f.write(b'{"QMP": {"version": {}, "capabilities": []}}\\n'); f.flush()
    for line in f:
        req = json.loads(line)
        ret = {"pid": 4242, "status": "running", "name": "FAKE", "id": "FAKE"}
        f.write(json.dumps({"return": ret, "id": req.get("id")}).encode() + b"\\n")
        f.flush()
"""


@needs_root
async def test_clients_refuse_a_control_socket_another_uid_planted(shared: Path) -> None:
    path = shared / "web.qmp"
    fake = subprocess.Popen(
        [*as_uid(NOBODY), sys.executable, "-c", FAKE_QMP, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        assert path.stat().st_uid == NOBODY
        for args in (["status", "--control", str(path)], ["upgrade", "--control", str(path)]):
            done = handoff_cli(dict(os.environ), *args)
            assert done.returncode != 0, done.stdout
            assert f"owned by uid {NOBODY}" in done.stderr, done.stderr
            assert "4242" not in done.stdout + done.stderr and "FAKE" not in done.stdout
        with trio.fail_after(5), pytest.raises(QMPConnectionError, match=f"uid {NOBODY}"):
            await QMPClient.connect(path)
    finally:
        fake.kill()
        fake.wait()


async def test_clients_refuse_a_socket_in_a_directory_others_may_write(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    sock = bind_unix_socket(tmp_path / "ok" / "vm.qmp", socket.SOCK_STREAM)
    try:
        os.rename(tmp_path / "ok" / "vm.qmp", open_dir / "vm.qmp")
        with trio.fail_after(5), pytest.raises(QMPConnectionError, match="others can replace"):
            await QMPClient.connect(open_dir / "vm.qmp")
    finally:
        sock.close()


# -- item 4: a successor never takes another VM's socket or entry ----------------------------------


async def name_and_pid(control: str) -> tuple[str, int]:
    with trio.fail_after(10):
        async with await QMPClient.connect(control) as qmp:
            name = (await qmp.execute("query-name"))["name"]
            pid = (await qmp.execute("query-status"))["pid"]
    return name, pid


@pytest.mark.parametrize("how", ["name=b", "control", "name="])
async def test_an_upgrade_never_takes_over_another_vms_socket_or_entry(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any, how: str
) -> None:
    a = start(vmms, tmp_path, kvmstub_daemon, "a", by_name=True)
    b = start(vmms, tmp_path, kvmstub_daemon, "b", by_name=True)
    # `--set name=` drops --name: the successor would be the default vm0, which runs too.
    vm0 = start(vmms, tmp_path, kvmstub_daemon, "vm0", by_name=True) if how == "name=" else None
    b_pid = await b.pid()
    a_pid = await a.pid()
    b_entry = Path(runtime.entry_path(b.control))
    await wait_entry(b_entry, b_pid)
    sets = {"name=b": ["name=b"], "control": [f"control={b.control}"], "name=": ["name="]}[how]
    try:
        result = await a.upgrade(sets, timeout=60)
    except QMPError as exc:  # refused before anything started: what we want
        assert "pid" in str(exc) or "empty" in str(exc), str(exc)
    else:
        raise AssertionError(f"upgrade with {sets} was not refused: {result}\n{a.log()}")
    await a.settle()
    # b is untouched: its socket answers as b, from its own VMM, and its entry is its own.
    assert await name_and_pid(b.control) == ("b", b_pid)
    entry = runtime.list_vms(str(b_entry.parent))
    assert {e.entry.name: e.entry.pid for e in entry}["b"] == b_pid
    assert await name_and_pid(a.control) == ("a", a_pid)
    if vm0 is not None:
        assert await name_and_pid(vm0.control) == ("vm0", await vm0.pid())


def test_the_successors_move_of_the_control_socket_never_replaces_anything(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    have = run / "a.qmp"
    sock_a, ident_a = bind_owned(have, socket.SOCK_STREAM)
    sleeper = subprocess.Popen(["sleep", "60"])
    opened: list[socket.socket] = [sock_a]

    def successor(want: Path) -> Any:
        app = SimpleNamespace(
            control_sock=sock_a,
            flags=SimpleNamespace(control=str(want)),
            control_path="",
            control_file=None,
        )
        app._move_control = types.MethodType(App._move_control, app)
        App.adopt_control(app, str(have))  # type: ignore[arg-type]
        return app

    try:
        # b: a live VM, its socket answering and its entry naming a live process.
        b_sock, b_ident = bind_owned(run / "b.qmp", socket.SOCK_STREAM)
        opened.append(b_sock)
        runtime.write_entry(str(run / "b.json"), entry_of("b", sleeper.pid, run / "b.qmp"))
        app = successor(run / "b.qmp")
        assert app.control_path == str(have)
        assert file_identity(have) == ident_a == app.control_file
        assert file_identity(run / "b.qmp") == b_ident
        # Its socket removed (rm), its entry alive: the name is still b's.
        os.unlink(run / "b.qmp")
        app = successor(run / "b.qmp")
        assert app.control_path == str(have) and not (run / "b.qmp").exists()
        # A regular file, or a directory, where the socket would go: kept, not replaced.
        (run / "c.qmp").write_text("precious")
        (run / "d.qmp").mkdir()
        for want in (run / "c.qmp", run / "d.qmp"):
            app = successor(want)
            assert app.control_path == str(have)
        assert (run / "c.qmp").read_text() == "precious" and (run / "d.qmp").is_dir()
        # A free name: moved (the same socket file, so still ours to remove).
        app = successor(run / "e.qmp")
        assert app.control_path == str(run / "e.qmp") and not have.exists()
        assert app.control_file == ident_a
    finally:
        sleeper.kill()
        sleeper.wait()
        for sock in opened:
            sock.close()


def entry_of(name: str, pid: int, control: Path) -> runtime.VmEntry:
    return runtime.VmEntry(
        name=name,
        pid=pid,
        pid_start=runtime.process_start_time(pid),
        version="0",
        mode="plain",
        vcpus=1,
        memory=1 << 25,
        control=str(control),
        started=time.time(),
        vmm_started=time.time(),
    )


# -- item 5: one name, one VMM; each VMM removes only its own socket -------------------------------


def run_again(vmm: VmmProcess, *extra: str, timeout: float = 30) -> Any:
    """The same `handoff run` once more (its output), expected to refuse and exit."""
    try:
        return subprocess.run(
            [*vmm.argv, *extra],
            env=vmm.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`handoff run` did not refuse: {exc.stderr!r}") from None


async def test_a_name_whose_vmm_lives_cannot_be_run_twice(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    first = start(vmms, tmp_path, kvmstub_daemon, "d1", by_name=True)
    pid = await first.pid()
    entry_file = Path(runtime.entry_path(first.control))
    before = await wait_entry(entry_file, pid)
    os.unlink(first.control)  # `rm rt/d1.qmp`
    done = run_again(first)
    assert done.returncode != 0
    assert f"already running under pid {pid}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(first.control)
    assert runtime.list_vms(str(entry_file.parent))[0].entry == before
    assert pid_alive(pid)


async def test_a_vmm_removes_only_the_socket_file_it_bound(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    first = start(vmms, tmp_path, kvmstub_daemon, "d1")
    pid = await first.pid()
    await wait_entry(Path(runtime.entry_path(first.control)), pid)
    # Another VMM's socket now sits at the same path (its first was removed meanwhile).
    os.unlink(first.control)
    other, ident = bind_owned(first.control, socket.SOCK_STREAM)
    try:
        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(20):
            while pid_alive(pid):
                await trio.sleep(0.02)
        assert file_identity(first.control) == ident, first.log()
        assert not os.path.exists(runtime.entry_path(first.control))  # its own entry: removed
    finally:
        other.close()


@pytest.mark.parametrize("what", ["file", "directory", "live socket"])
def test_run_never_removes_what_is_not_a_stale_socket(
    tmp_path: Path, kvmstub_daemon: Any, what: str
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, name="x", vcpus=1, memory="32M")
    control = Path(vmm.control)
    control.parent.mkdir(mode=0o700)
    live: socket.socket | None = None
    if what == "file":
        control.write_text("precious")
    elif what == "directory":
        control.mkdir()
        (control / "inside").write_text("precious")
    else:
        live = bind_unix_socket(control, socket.SOCK_STREAM)
    before = file_identity(control)
    try:
        done = run_again(vmm)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert str(control) in done.stderr, done.stderr
        assert file_identity(control) == before
        if what == "file":
            assert control.read_text() == "precious"
        elif what == "directory":
            assert (control / "inside").read_text() == "precious"
        assert kvmstub_daemon.stats()["vms"] == []
    finally:
        if live is not None:
            live.close()


async def test_a_successor_removes_the_socket_it_took_over_when_it_quits(
    vmms: list[VmmProcess], tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = start(vmms, tmp_path, kvmstub_daemon, "web")
    result = await vmm.upgrade()
    assert result["status"] == "completed", vmm.log()
    await vmm.settle()
    await wait_entry(Path(runtime.entry_path(vmm.control)), result["successor-pid"])
    await vmm.quit()
    assert os.listdir(vmm.runtime_dir) == [], vmm.log()
