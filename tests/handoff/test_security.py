"""Security of the handoff (SECURITY.md): who may reach the sockets, who may take part, what the
token adds, and the hardening each VMM applies to itself.

Each test runs real VMM processes on a real kvmstub daemon. The peer-uid tests need root (to
run a process as nobody) and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff.qmp.client import QMPClient
from handoff.testing import VmmProcess

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="running a peer as nobody needs root")


@pytest.fixture
def vmms(tmp_path: Path, kvmstub_daemon: Any) -> Iterator[Callable[..., VmmProcess]]:
    made: list[VmmProcess] = []

    def make(**kwargs: Any) -> VmmProcess:
        vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, name=f"s{len(made)}", **kwargs)
        made.append(vmm)
        vmm.start()
        return vmm

    yield make
    for vmm in made:
        vmm.kill_all()


def token_file(directory: Path, name: str, token: bytes | None = None) -> str:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, token or secrets.token_hex(32).encode())
    os.close(fd)
    return str(path)


def live_vms(daemon: Any) -> list[dict[str, Any]]:
    return [vm for vm in daemon.stats()["vms"] if not vm["dead"] and vm["vcpus"]]


# --- the sockets in the file system ------------------------------------------------------------


async def test_control_and_handoff_sockets_are_0600_in_directories_of_mode_0700(
    vmms: Callable[..., VmmProcess],
) -> None:
    vmm = vmms(mode="plain", vcpus=1)
    await vmm.wait_lines()
    control = Path(vmm.control)
    assert stat.S_IMODE(control.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    # The successor's private directory, socket and one-time token, seen while it waits.
    await vmm.qmp("x-set-fault", spec="source:hello:hang")
    async with await QMPClient.connect(vmm.control) as qmp:
        started = await qmp.execute("upgrade", {"set": ["handoff-timeout=2"]})
        sock = Path(started["uri"][len("unix:") :])
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert sock.parent.stat().st_uid == os.getuid()
        # The one-time token is in no file and on no command line: it came down a pipe.
        assert [p.name for p in sock.parent.iterdir()] == ["incoming.sock"]
        argv = Path(f"/proc/{started['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"--token-file" not in argv and b"--token-fd" in argv
        assert not any(len(arg) >= 32 and arg.isalnum() for arg in argv)


def test_target_refuses_to_listen_in_a_directory_others_can_reach(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "handoff.cli", "run", "--kvm", "/nonexistent",
         "--control", str(tmp_path / "c.qmp"), "--incoming", f"unix:{shared / 'in.sock'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"socket directory {shared} has mode 0755" in done.stderr
    assert "chmod 700" in done.stderr
    assert not (shared / "in.sock").exists()


# --- peer credentials, on the target's side (test_e2e covers the source's) ---------------------

_FOREIGN_SOURCE = """
import json, os, secrets, socket, sys, uuid
import prctl
from handoff import protocol
path = sys.argv[1]
prctl.set_keepcaps(True)
os.setgid(65534); os.setuid(65534)
# Reach the 0700 directory anyway (as an attacker with DAC override would): what is tested is
# the target's own SO_PEERCRED check, the layer below the directory's mode.
prctl.cap_effective.dac_override = True
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect(path)
conn = protocol.HandoffConnection(protocol.Role.SOURCE)
try:
    s.send(conn.send(conn.make_hello(vm_name="s0", vm_uuid=uuid.uuid4(),
                                      nonce=secrets.token_bytes(32))))
except BrokenPipeError:
    pass  # refused at once: the refusal still waits to be read
try:
    data, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
except ConnectionResetError:  # closed with our Hello unread: reported before its Refuse
    data, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
msg = protocol.decode(data) if data else None
print(json.dumps({"fds": sum(len(p) // 4 for _, _, p in anc), "type": type(msg).__name__,
                  "code": getattr(msg, "code", None), "reason": getattr(msg, "reason", None)}))
"""


@needs_root
@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allowed-by-flag"])
async def test_target_checks_the_sources_uid_before_any_fd_crosses(
    vmms: Callable[..., VmmProcess], kvmstub_daemon: Any, allowed: bool
) -> None:
    vmm = vmms(mode="plain", vcpus=1)
    await vmm.wait_lines()
    flags = ["--allow-uid", str(NOBODY)] if allowed else []
    target, path = vmm.start_target("--handoff-timeout", "3", *flags)
    done = subprocess.run(
        [sys.executable, "-c", _FOREIGN_SOURCE, path], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["fds"] == 0
    if allowed:
        assert seen["type"] == "Hello"  # past the uid check, on to the protocol
    else:
        assert (seen["type"], seen["code"]) == ("Refuse", "credentials")
        assert "runs as uid 65534" in seen["reason"]
        assert f"--allow-uid {NOBODY}" in seen["reason"]
        assert target.wait(20) == 1
        assert "may not take part in this handoff" in vmm.log()
    assert len(live_vms(kvmstub_daemon)) == 1  # only the running guest's VM; none built for it
    target.kill()
    report = await vmm.wait_lines()
    assert report.problems(vmm.vcpus) == []


# --- the token ---------------------------------------------------------------------------------


async def test_same_token_completes_a_handoff_to_an_operator_started_target(
    vmms: Callable[..., VmmProcess], kvmstub_daemon: Any, tmp_path: Path
) -> None:
    token = token_file(tmp_path, "token")
    vmm = vmms(mode="sev-es", vcpus=2, extra=["--token-file", token])
    await vmm.wait_lines()
    target, path = vmm.start_target("--token-file", token)
    result = await vmm.hand_off_to(path)
    assert result["status"] == "completed", vmm.log()
    assert (await vmm.pid()) == target.pid
    report = await vmm.wait_lines()
    assert report.problems(vmm.vcpus) == []
    assert len(live_vms(kvmstub_daemon)) == 1


@pytest.mark.parametrize(
    ("source_token", "target_token", "says"),
    [
        ("a", "b", "token"),
        (None, "b", "requires a handoff token"),
        ("a", None, "token"),
    ],
    ids=["different", "source-has-none", "target-has-none"],
)
async def test_a_wrong_or_missing_token_is_refused_before_any_fd_crosses(
    vmms: Callable[..., VmmProcess],
    kvmstub_daemon: Any,
    tmp_path: Path,
    source_token: str | None,
    target_token: str | None,
    says: str,
) -> None:
    extra = ["--token-file", token_file(tmp_path, source_token)] if source_token else []
    vmm = vmms(mode="sev", vcpus=2, extra=extra)
    await vmm.wait_lines()
    pid = await vmm.pid()
    flags = ["--token-file", token_file(tmp_path, f"t-{target_token}")] if target_token else []
    target, path = vmm.start_target("--handoff-timeout", "3", *flags)
    result = await vmm.hand_off_to(path)
    assert result["status"] == "failed"
    assert says in result["error-desc"]
    assert result.get("recovery") == "none"  # refused in the Hello exchange, never paused
    assert target.wait(20) == 1
    # The target never built a VM: no Describe (and so no memfd) reached it.
    assert "handoff refused or failed before switchover" in vmm.log()
    assert len(kvmstub_daemon.stats()["vms"]) == 1
    assert await vmm.pid() == pid
    assert (await vmm.qmp("query-status"))["status"] == "running"
    report = await vmm.wait_lines()
    assert report.problems(vmm.vcpus) == []


# --- process hardening -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def test_every_vmm_of_a_chain_is_named_not_dumpable_and_no_new_privs(
    vmms: Callable[..., VmmProcess],
) -> None:
    vmm = vmms(mode="sev-es", vcpus=1)
    await vmm.wait_lines()
    for _ in range(2):  # the first VMM, then a successor that took over
        status = await vmm.qmp("query-status")
        assert status["hardening"] == {
            "name": f"handoff:{vmm.name}",
            "dumpable": False,
            "no-new-privs": True,
        }
        pid = status["pid"]
        assert Path(f"/proc/{pid}/comm").read_text().strip() == f"handoff:{vmm.name}"
        assert proc_status(pid)["NoNewPrivs"] == "1"
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()


_DUMPABLE_PROBE = """
import os, sys, time
import prctl, trio
from kvmstub import cli
os.setgid(65534); os.setuid(65534)
prctl.set_dumpable(True)  # as if started by that user: a change of uid clears it
if sys.argv[1] == "kvmstub":
    sys.exit(cli.main(["serve", "--socket", sys.argv[2]]))
print("ready", flush=True)
time.sleep(60)
"""


@needs_root
def test_kvmstub_is_named_not_dumpable_and_no_new_privs() -> None:
    """A non-dumpable process's /proc files belong to root whatever its uid (the kernel's
    task_dump_owner): so kvmstub run as nobody shows its hardening, beside a control process
    of the same uid that did not harden itself."""
    directory = Path(tempfile.mkdtemp(prefix="kvmstub-sec-"))
    os.chown(directory, NOBODY, NOBODY)
    sock = str(directory / "kvm.sock")
    probes = {
        kind: subprocess.Popen(
            [sys.executable, "-c", _DUMPABLE_PROBE, kind, sock], stdout=subprocess.PIPE, text=True
        )
        for kind in ("control", "kvmstub")
    }
    try:
        for proc in probes.values():
            assert proc.stdout is not None and proc.stdout.readline()
        control, kvmstub = probes["control"].pid, probes["kvmstub"].pid
        assert os.stat(f"/proc/{control}/status").st_uid == NOBODY  # dumpable: its own
        assert os.stat(f"/proc/{kvmstub}/status").st_uid == 0  # not dumpable
        assert Path(f"/proc/{kvmstub}/comm").read_text().strip() == "kvmstub"
        assert proc_status(kvmstub)["NoNewPrivs"] == "1"
        assert proc_status(control)["NoNewPrivs"] == "0"
    finally:
        probes["control"].kill()
        probes["kvmstub"].terminate()
        assert probes["kvmstub"].wait(15) == 0
        for proc in probes.values():
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        os.rmdir(directory)
