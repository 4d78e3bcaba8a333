"""End to end: real VMM processes on a real kvmstub daemon, handing a running guest over.

Each test judges the guest by its own serial lines (seq contiguous per vCPU, no PANIC) and
kvmstub by its stats (one live VM holds the guest; ASIDs conserved).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.testing import PROGRAM, VmmProcess, serial_checked

MODES = ["plain", "sev", "sev-es"]


def live_guest_vms(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """VMs that could run the guest: not dead and (for SEV modes) holding a context."""
    return [vm for vm in stats["vms"] if not vm["dead"] and vm["vcpus"]]


def asids_used(stats: dict[str, Any]) -> int:
    return sum(int(v["used"]) for v in stats["asids"].values())


# `vmm_factory` (VMMs named vm0, vm1, ... on the test's kvmstub daemon, all killed afterwards)
# comes from our pytest plugin, handoff.testing; so does the guest check below.


async def assert_guest_whole(vmm: VmmProcess) -> None:
    await serial_checked(vmm)


@pytest.mark.parametrize("mode", MODES)
async def test_chain_of_ten_handoffs_keeps_guest_whole_and_memory_in_place(
    vmm_factory: Any, kvmstub_daemon: Any, mode: str
) -> None:
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    memfds0 = await vmm.qmp("query-memfds")
    asids0 = asids_used(kvmstub_daemon.stats())
    for i in range(10):
        before = await vmm.qmp("query-memfds")
        result = await vmm.upgrade()
        assert result["status"] == "completed", (i, result, vmm.log())
        after = await vmm.qmp("query-memfds")
        assert after["inodes"] == memfds0["inodes"]
        # The handoff itself allocates no guest page (the guest may touch a few meanwhile).
        assert after["blocks"][0] - before["blocks"][0] < 64
        await assert_guest_whole(vmm)
    # Old VMMs linger a moment before they exit (and, in plain mode, release their VM).
    assert len(await vmm.settle()) == 1
    with trio.move_on_after(5):
        while len(live_guest_vms(kvmstub_daemon.stats())) > 1:
            await trio.sleep(0.02)
    stats = kvmstub_daemon.stats()
    assert asids_used(stats) == asids0
    assert len(live_guest_vms(stats)) == 1
    assert len(await vmm.settle()) == 1
    await vmm.quit()
    assert vmm.alive_pids() == []
    assert not os.path.exists(vmm.control)


def new_vms(stats: dict[str, Any], before: set[int]) -> list[dict[str, Any]]:
    return [vm for vm in stats["vms"] if vm["id"] not in before]


@pytest.mark.parametrize("mode", MODES)
async def test_kvmstub_measures_the_blackout_each_handoff_gave_the_guest(
    vmm_factory: Any, kvmstub_daemon: Any, mode: str
) -> None:
    """kvmstub times each vCPU from its last step in the old VM to its first in the new one:
    the pause itself, which the guest's own figure (the largest gap in the serial line that
    spans the pause) contains."""
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    stats = kvmstub_daemon.stats()
    assert [vm["handoff_gap_us"] for vm in stats["vms"]] == [None]  # launched, not taken over
    for _ in range(2):
        before = {vm["id"] for vm in kvmstub_daemon.stats()["vms"]}
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        report = await vmm.wait_lines(more=2)
        (new,) = new_vms(kvmstub_daemon.stats(), before)
        assert new["handoff_gap_vcpus"] == 2
        seen_by_guest = report.max_gap_after(dict(enumerate(result["pause-seqs"])), lines=1)
        assert 0 < new["handoff_gap_us"] <= seen_by_guest


async def test_one_tib_sparse_guest_hands_off(vmm_factory: Any) -> None:
    vmm = vmm_factory(mode="sev-es", vcpus=2, memory="1T")
    await vmm.wait_lines()
    result = await vmm.upgrade()
    assert result["status"] == "completed", vmm.log()
    memfds = await vmm.qmp("query-memfds")
    assert memfds["slots"] == [1 << 40]
    assert memfds["blocks"][0] < 1024  # a few pages, not a terabyte
    await assert_guest_whole(vmm)


async def test_copy_memory_baseline_moves_a_plain_guest_into_fresh_memory(
    vmm_factory: Any, kvmstub_daemon: Any
) -> None:
    vmm = vmm_factory(mode="plain", vcpus=2, memory="32M")
    await vmm.wait_lines()
    before = await vmm.qmp("query-memfds")
    vms = {vm["id"] for vm in kvmstub_daemon.stats()["vms"]}
    result = await vmm.upgrade(copy_memory=True)
    assert result["status"] == "completed", vmm.log()
    after = await vmm.qmp("query-memfds")
    assert after["inodes"] != before["inodes"]  # a copy, by construction
    await assert_guest_whole(vmm)
    # Fresh memory is another guest as far as kvmstub can tell: no blackout measured.
    (new,) = new_vms(kvmstub_daemon.stats(), vms)
    assert new["handoff_gap_us"] is None


async def test_copy_memory_is_refused_for_an_encrypted_guest(vmm_factory: Any) -> None:
    from handoff.qmp.client import QMPError

    vmm = vmm_factory(mode="sev", vcpus=1)
    with pytest.raises(QMPError, match="copy-memory"):
        await vmm.qmp("upgrade", **{"copy-memory": True})
    assert (await vmm.qmp("query-status"))["status"] == "running"


async def test_flag_change_applies_new_log_level_and_serial_log(
    vmm_factory: Any, tmp_path: Path
) -> None:
    vmm = vmm_factory(mode="sev", vcpus=2)
    await vmm.wait_lines()
    new_log = str(tmp_path / "second-serial.log")
    result = await vmm.upgrade(["log-level=debug", f"serial-log={new_log}"])
    assert result["status"] == "completed", vmm.log()
    await vmm.wait_lines()
    assert os.path.getsize(new_log) > 0
    await assert_guest_whole(vmm)


async def test_rollback_to_a_release_speaking_the_older_protocol(vmm_factory: Any) -> None:
    vmm = vmm_factory(mode="sev-es", vcpus=2)
    await vmm.wait_lines()
    result = await vmm.upgrade(["max-protocol=1"], PROGRAM)
    assert result["status"] == "completed", vmm.log()
    assert result["protocol"] == 1
    # And forward again from the old release: it negotiates down to 1 as well.
    result = await vmm.upgrade(["max-protocol=2"])
    assert result["status"] == "completed", vmm.log()
    assert result["protocol"] == 1
    await assert_guest_whole(vmm)


async def test_incompatible_successor_is_refused_and_source_keeps_running(
    vmm_factory: Any,
) -> None:
    vmm = vmm_factory(mode="sev-es", vcpus=2)
    await vmm.wait_lines()
    pid = await vmm.pid()
    result = await vmm.upgrade(["vcpus=4"])
    assert result["status"] == "failed"
    assert "vcpus: 4 here, 2 in the running VM" in result["error-desc"]
    assert await vmm.pid() == pid
    assert (await vmm.qmp("query-status"))["status"] == "running"
    await assert_guest_whole(vmm)


async def test_bad_set_value_is_refused_before_any_successor_starts(vmm_factory: Any) -> None:
    from handoff.qmp.client import QMPError

    vmm = vmm_factory(mode="plain", vcpus=1)
    with pytest.raises(QMPError, match="--vcpus 'banana' is not a whole number"):
        await vmm.qmp("upgrade", set=["vcpus=banana"])
    with pytest.raises(QMPError, match="KEY=VALUE"):
        await vmm.qmp("upgrade", set=["log-level"])
    assert vmm.alive_pids() == [await vmm.pid()]
    assert (await vmm.qmp("query-status"))["status"] == "running"


async def test_second_handoff_while_one_is_in_progress_is_refused(vmm_factory: Any) -> None:
    from handoff.qmp.client import QMPClient, QMPError

    vmm = vmm_factory(mode="plain", vcpus=1)
    await vmm.wait_lines()
    await vmm.qmp("x-set-fault", spec="source:prepared:hang")
    async with await QMPClient.connect(vmm.control) as qmp:
        await qmp.execute("upgrade", {"set": ["handoff-timeout=1"]})
        with pytest.raises(QMPError, match="already in progress"):
            await qmp.execute("upgrade", {"set": []})
    # Disarm by killing the hung handoff: the whole process is the source; quit does it.
    vmm.kill_all()


TARGET_KILL_STEPS = ["describe", "prepared", "switchover", "moved", "commit"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step", TARGET_KILL_STEPS)
async def test_target_killed_at_each_step_leaves_guest_in_the_source(
    vmm_factory: Any, kvmstub_daemon: Any, mode: str, step: str
) -> None:
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    pid = await vmm.pid()
    asids0 = asids_used(kvmstub_daemon.stats())
    result = await vmm.upgrade([f"x-fault=target:{step}:crash"])
    assert result["status"] == "failed", vmm.log()
    assert await vmm.pid() == pid
    await assert_guest_whole(vmm)
    stats = kvmstub_daemon.stats()
    assert len(live_guest_vms(stats)) == 1
    assert asids_used(stats) == asids0
    assert await vmm.settle() == [pid]  # a crashed successor may take a moment to exit


@pytest.mark.parametrize("mode", MODES)
async def test_source_killed_after_switchover_target_takes_over(
    vmm_factory: Any, kvmstub_daemon: Any, mode: str
) -> None:
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    pid = await vmm.pid()
    await vmm.qmp("x-set-fault", spec="source:switchover:crash")
    with pytest.raises(Exception):  # noqa: B017 - the QMP connection dies with the source
        await vmm.upgrade()
    # The successor's pid is not returned to us (the source died); find it by the socket.
    for _ in range(200):
        try:
            new_pid = await vmm.pid()
        except Exception:
            new_pid = 0
        if new_pid and new_pid != pid:
            break
        import trio

        await trio.sleep(0.05)
    assert new_pid and new_pid != pid, vmm.log()
    vmm.pids.append(new_pid)
    await assert_guest_whole(vmm)
    assert len(live_guest_vms(kvmstub_daemon.stats())) == 1


async def test_peer_with_another_uid_is_refused_before_any_fd_crosses(
    vmm_factory: Any, tmp_path: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("dropping to nobody needs root")
    vmm = vmm_factory(mode="plain", vcpus=1)
    await vmm.wait_lines()
    pid = await vmm.pid()
    # A target run by nobody: the source checks SO_PEERCRED before it sends anything.
    import subprocess
    import sys
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="handoff-nobody-"))  # in /tmp: reachable by nobody
    os.chown(sock_dir, 65534, 65534)
    path = sock_dir / "in.sock"
    code = (
        "import os,socket,time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.bind({str(path)!r}); s.listen()\n"
        "c,_=s.accept(); c.settimeout(5)\n"
        "import array\n"
        "try:\n"
        "  msg, anc, flags, _ = c.recvmsg(65536, socket.CMSG_SPACE(64*4))\n"
        "  print('fds' if anc else 'nofds', len(msg), flush=True)\n"
        "except Exception as e: print('err', e, flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if path.exists():
                break
            import trio

            await trio.sleep(0.02)
        with pytest.raises(Exception, match="uid"):
            await vmm.qmp("handoff", uri=f"unix:{path}")
            for _ in range(100):
                h = await vmm.qmp("query-handoff")
                if h["status"] == "failed":
                    raise RuntimeError(h["error-desc"])
                await trio.sleep(0.02)
        out, _ = child.communicate(timeout=10)
        assert "fds" not in out.split()
    finally:
        child.kill()
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)
    assert await vmm.pid() == pid
    await assert_guest_whole(vmm)


@pytest.mark.parametrize("mode", ["plain", "sev-es"])
async def test_a_handoff_polling_for_the_move_keeps_the_guest_whole(
    vmm_factory: Any, mode: str
) -> None:
    """`--blackout-poll-us`: the new VMM polls for the MOVE's answer (plain mode has no MOVE
    and polls for nothing); the successor inherits the flag and polls in the next handoff."""
    vmm = vmm_factory(mode=mode, vcpus=2, extra=["--blackout-poll-us", "500"])
    await vmm.wait_lines()
    for _ in range(2):
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        await assert_guest_whole(vmm)


@pytest.fixture
def every_cpu_busy() -> Iterator[None]:
    """A busy loop on every CPU, each leading a session of its own (so an autogroup of its
    own, as another service's process has): a host with no CPU to spare."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in os.sched_getaffinity(0)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


async def test_a_handoff_on_a_host_with_every_cpu_busy_completes(
    vmm_factory: Any, every_cpu_busy: None
) -> None:
    """The successor prepares at nice 19, but not for long: lowered from its first instant
    and for as long as it took, it got so little CPU here that its old VMM stopped waiting
    for its socket (--handoff-timeout: 15 s by default, 10 here), and every handoff on a busy
    host failed. Here its socket appears after 2 to 3 s (0.7 s never lowered, 10 to 15 s
    lowered for as long as it took)."""
    vmm = vmm_factory(mode="sev-es", vcpus=1, extra=["--handoff-timeout", "10"])
    await vmm.wait_lines()
    result = await vmm.upgrade()
    assert result["status"] == "completed", vmm.log()
    await assert_guest_whole(vmm)


async def test_many_vcpus_move_by_sealed_memfd_in_protocol_3_and_by_regs_on_rollback(
    vmm_factory: Any,
) -> None:
    # A threshold of 0 sends every vCPU state in a sealed memfd (protocol 3): the path that
    # real x86 state (~10 KiB a vCPU) takes with many vCPUs.
    vmm = vmm_factory(mode="plain", vcpus=64, memory="64M", extra=["--vcpu-states-inline-max", "0"])
    await vmm.wait_lines()
    result = await vmm.upgrade()
    assert result["status"] == "completed", vmm.log()
    assert result["protocol"] == 3
    await assert_guest_whole(vmm)
    # Rollback to a release speaking protocol 2: kvm_regs again, inline.
    result = await vmm.upgrade(["max-protocol=2"])
    assert result["status"] == "completed", vmm.log()
    assert result["protocol"] == 2
    await assert_guest_whole(vmm)


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
async def test_the_guests_migration_gate_survives_an_upgrade(vmm_factory: Any, mode: str) -> None:
    """MSR_KVM_MIGRATION_CONTROL: the guest allows migration at boot; the filter and CPUID that
    bring its writes to the VMM are the VM's and vCPUs', which a MOVE does not carry, so the
    successor sets them again and takes the value from the Switchover."""
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    assert (await vmm.qmp("query-status"))["migration-allowed"] is True
    for _ in range(2):
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        assert (await vmm.qmp("query-status"))["migration-allowed"] is True
    await assert_guest_whole(vmm)


async def test_a_plain_guest_has_no_migration_gate_before_or_after_an_upgrade(
    vmm_factory: Any,
) -> None:
    vmm = vmm_factory(mode="plain", vcpus=1)
    await vmm.wait_lines()
    assert (await vmm.qmp("query-status"))["migration-allowed"] is None
    assert (await vmm.upgrade())["status"] == "completed"
    assert (await vmm.qmp("query-status"))["migration-allowed"] is None
