"""handoff.sched: how an old VMM gets off the CPUs once its guest has gone (its own nice
always, its session's autogroup only when the session is its own), and how a waiter stops
preempting others for a while."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

AUTOGROUP = Path("/proc/self/autogroup")

needs_autogroups = pytest.mark.skipif(
    not AUTOGROUP.exists(), reason="this kernel has no scheduler autogroups"
)

PROBE = """
import os
from handoff.sched import yield_cpus
yield_cpus()
print(os.getpriority(os.PRIO_PROCESS, 0))
print(open("/proc/self/autogroup").read().split()[-1])
"""


def _probe(*, new_session: bool) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        start_new_session=new_session,
    )
    nice, group_nice = done.stdout.split()
    return int(nice), int(group_nice)


def _group_nice() -> int:
    return int(AUTOGROUP.read_text().split()[-1])


@needs_autogroups
def test_a_vmm_sharing_its_session_lowers_only_itself() -> None:
    """Started from a shell, a test runner or a benchmark, the VMM shares the session's
    autogroup with them (and maybe with kvmstub): lowering it would slow them all."""
    before = _group_nice()
    nice, group_nice = _probe(new_session=False)
    assert nice == 19
    assert group_nice == before
    assert _group_nice() == before


@needs_autogroups
def test_a_vmm_leading_its_session_lowers_its_autogroup_too() -> None:
    before = _group_nice()
    nice, group_nice = _probe(new_session=True)
    assert nice == 19
    assert group_nice == 19
    assert _group_nice() == before


def test_waking_without_preempting_is_batch_meanwhile_and_undone_after() -> None:
    from handoff.sched import waking_without_preempting

    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with waking_without_preempting():
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(RuntimeError), waking_without_preempting():
        raise RuntimeError("a failure inside")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


PREPARING = """
from handoff import sched
def group():
    return open("/proc/self/autogroup").read().split()[-1]
before = group()
sched.lower_while_preparing()
lowered = group()
sched.restore_for_blackout()
print(before, lowered, group())
"""


@needs_autogroups
def test_a_successor_prepares_at_nice_19_and_is_back_for_the_blackout() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PREPARING],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        start_new_session=True,  # as its old VMM spawns it
    )
    before, lowered, after = done.stdout.split()
    assert lowered == "19"
    assert after == before


@needs_autogroups
def test_a_target_started_from_a_shell_leaves_its_sessions_priority_alone() -> None:
    before = _group_nice()
    done = subprocess.run(
        [sys.executable, "-c", PREPARING], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == [str(before)] * 3
