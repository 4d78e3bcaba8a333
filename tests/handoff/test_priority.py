"""handoff.system.sched: how an old VMM gets off the CPUs once its guest has gone (its own nice
always, its session's autogroup only when the session is its own), and how a waiter stops
preempting others for a while."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AUTOGROUP = Path("/proc/self/autogroup")

needs_autogroups = pytest.mark.skipif(
    not AUTOGROUP.exists(), reason="this kernel has no scheduler autogroups"
)

# Every test runs its own "shell": a process leading a fresh session, so a fresh autogroup
# at nice 0, whatever the test runner's own (a CI runner's session may never have called
# setsid(2); the kernel then shows it no autogroup at all). The shell starts the probe in
# its own session or in a new one, and prints its group's nice before and after, and what
# the probe printed.
SHELL = """
import subprocess, sys
from handoff.system.sched import autogroup_nice
before = autogroup_nice()
probe = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True,
                       check=True, start_new_session=sys.argv[2] == "new")
print(before, autogroup_nice(), probe.stdout)
"""

YIELDS = """
import os
from handoff.system.sched import autogroup_nice, yield_cpus
yield_cpus()
print(os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice())
"""


def _in_a_shell(probe: str, *, session: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SHELL, probe, session],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        start_new_session=True,
    )
    return done.stdout.split()


@needs_autogroups
def test_a_vmm_sharing_its_session_lowers_only_itself() -> None:
    """Started from a shell, a test runner or a benchmark, the VMM shares the session's
    autogroup with them (and maybe with kvmstub): lowering it would slow them all."""
    before, after, nice, group_nice = _in_a_shell(YIELDS, session="same")
    assert before == "0"
    assert nice == "19"
    assert group_nice == "0"
    assert after == "0"


@needs_autogroups
def test_a_vmm_leading_its_session_lowers_its_autogroup_too() -> None:
    before, after, nice, group_nice = _in_a_shell(YIELDS, session="new")
    assert (nice, group_nice) == ("19", "19")
    assert before == after == "0"


def test_the_root_group_reads_as_none_and_is_left_alone(tmp_path: Path) -> None:
    """The kernel prints nothing for a process in the root autogroup, and refuses to set
    its nice: nothing is lowered, nothing is restored, nothing fails."""
    from handoff.system import sched

    empty = tmp_path / "autogroup"
    empty.write_text("")
    saved = sched._AUTOGROUP
    sched._AUTOGROUP = str(empty)
    try:
        assert sched.autogroup_nice() is None
        assert sched._lowered_from is None
        sched.lower_while_preparing()
        assert sched._lowered_from is None
        sched.restore_for_blackout()
    finally:
        sched._AUTOGROUP = saved


def test_waking_without_preempting_is_batch_meanwhile_and_undone_after() -> None:
    from handoff.system.sched import waking_without_preempting

    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with waking_without_preempting():
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(RuntimeError), waking_without_preempting():
        raise RuntimeError("a failure inside")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


PREPARING = """
from handoff.system import sched
before = sched.autogroup_nice()
sched.lower_while_preparing()
lowered = sched.autogroup_nice()
sched.restore_for_blackout()
print(before, lowered, sched.autogroup_nice())
"""


@needs_autogroups
def test_a_successor_prepares_at_nice_19_and_is_back_for_the_blackout() -> None:
    # in a new session, as its old VMM spawns it
    _, _, before, lowered, after = _in_a_shell(PREPARING, session="new")
    assert lowered == "19"
    assert after == before == "0"


BOUNDED = """
import signal, time
from handoff.system import sched
sched.lower_while_preparing(at_most_s=0.2)
lowered = sched.autogroup_nice()
time.sleep(1.0)  # the alarm comes in the middle; the sleep goes on after its handler
print(lowered, sched.autogroup_nice(), sched._lowered_from, signal.getitimer(signal.ITIMER_REAL)[0])
"""


@needs_autogroups
def test_a_successor_slow_to_prepare_is_lowered_no_longer_than_the_bound() -> None:
    """On a host whose CPUs are all busy, nice 19 leaves a successor so little CPU that its
    old VMM gave up waiting for its socket: past the bound it is back at its priority."""
    _, _, lowered, after, remembered, timer = _in_a_shell(BOUNDED, session="new")
    assert (lowered, after, remembered, timer) == ("19", "0", "None", "0.0")


RESTORED = """
import signal
from handoff.system import sched
sched.lower_while_preparing()
armed = signal.getitimer(signal.ITIMER_REAL)[0] > 0
sched.restore_for_blackout()
print(armed, signal.getitimer(signal.ITIMER_REAL)[0], sched.autogroup_nice())
"""


@needs_autogroups
def test_restoring_in_time_disarms_the_bound() -> None:
    _, _, armed, timer, after = _in_a_shell(RESTORED, session="new")
    assert (armed, timer, after) == ("True", "0.0", "0")


@needs_autogroups
def test_a_target_started_from_a_shell_leaves_its_sessions_priority_alone() -> None:
    shell_before, shell_after, *probe = _in_a_shell(PREPARING, session="same")
    assert probe == ["0", "0", "0"]
    assert shell_before == shell_after == "0"


ENTRY = """
import sys, types
from handoff.system import sched
calls = []
def spy():
    calls.append(("lower", "trio" in sys.modules))
    real()
real, sched.lower_while_preparing = sched.lower_while_preparing, spy
# The command itself is not run: only what happens before it.
sys.modules["handoff.cli"] = types.SimpleNamespace(main=lambda: calls.append(("cli", None)) or 0)
sys.argv = ["handoff"] + sys.argv[1:]
import handoff.__main__
handoff.__main__.main()
print(calls, sched.autogroup_nice())
"""


@needs_autogroups
@pytest.mark.parametrize("incoming", [True, False])
def test_the_handoff_command_lowers_a_new_vmm_before_its_imports(incoming: bool) -> None:
    """`handoff run --incoming` (how an old VMM starts its successor, `python -m handoff`)
    goes to nice 19 before trio and the rest are imported (about 100 ms of CPU beside the
    old VMM), then runs the command; any other command keeps its priority."""
    args = ["run", "--name", "probe"] + (["--incoming", "unix:/x.sock"] if incoming else [])
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        start_new_session=True,
    )
    if incoming:
        assert done.stdout.split() == ["[('lower',", "False),", "('cli',", "None)]", "19"]
    else:
        assert done.stdout.split() == ["[('cli',", "None)]", "0"]


PLACE = """
import json, os, subprocess, sys
from handoff.system.sched import place_apart
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
try:
    cpus = sorted(os.sched_getaffinity(0))
    said = place_apart(other.pid)
    print(json.dumps([cpus, said, sorted(os.sched_getaffinity(0)),
                      sorted(os.sched_getaffinity(other.pid))]))
finally:
    other.kill()
"""


def test_place_apart_gives_kvmstub_the_last_cpu_and_the_caller_the_others() -> None:
    """`sched.place_apart` (the benchmark and the demo): in a process of its own, so that the
    test runner keeps its CPUs. With one CPU it does nothing."""
    done = subprocess.run(
        [sys.executable, "-c", PLACE], capture_output=True, text=True, check=True, timeout=60
    )
    cpus, said, mine, its = json.loads(done.stdout)
    if len(cpus) < 2:
        assert said is None and mine == its == cpus
        return
    assert its == cpus[-1:] and mine == cpus[:-1]
    assert said == (
        f"kvmstub (the guest's vCPUs) on CPU {cpus[-1]}, "
        f"the VMMs on CPU {','.join(map(str, cpus[:-1]))}"
    )
