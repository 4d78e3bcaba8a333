"""Chaos at CI size, and hung peers: no fault at any step, and no peer that stops answering,
loses the guest or holds it paused beyond the configured limit.

`tools/chaos.py --quick` runs here (every fault action, every step of both roles, the three
modes, two seeded SIGKILLs), and its kvm set (`--quick --hypervisor kvm`: a plain guest on the
real /dev/kvm, where that can run one); `python tools/chaos.py [--hypervisor kvm]` runs the
full matrix.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from handoff.hv.backends import kvm_problem
from handoff.migration.faults import ACTIONS, STEPS
from handoff.testing import VmmProcess

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1.0  # --handoff-timeout of the hung-peer tests, in seconds
# What recovery may add to the limit: fencing (SIGKILL, wait for the exit), moving the context
# back, resuming. A property of the code path, far below any multiple of the limit.
MARGIN_S = 4.0


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "tools" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_quick_matrix_covers_every_action_every_step_and_every_mode() -> None:
    chaos = load_chaos()
    cases = chaos.quick_cases(seed=1)
    faults = [c for c in cases if c.action != "sigkill"]
    assert {c.action for c in faults} == set(ACTIONS)
    for role in ("source", "target"):
        assert {c.step for c in faults if c.role == role} == set(STEPS[role])
    assert {c.mode for c in cases} == {"plain", "sev", "sev-es"}
    assert {c.role for c in cases if c.action == "sigkill"} == {"source", "target"}


def test_full_matrix_is_every_mode_step_and_action() -> None:
    chaos = load_chaos()
    cases = chaos.fault_cases(chaos.MODES)
    assert len(cases) == 3 * sum(len(s) for s in STEPS.values()) * len(ACTIONS)
    assert len(set(cases)) == len(cases)
    kills = chaos.kill_cases(chaos.MODES, 4, seed=3)
    assert kills == chaos.kill_cases(chaos.MODES, 4, seed=3)  # seeded: reproducible


def test_quick_chaos_loses_no_guest_and_leaks_nothing() -> None:
    chaos = load_chaos()
    outcomes = chaos.run_cases(chaos.quick_cases(seed=1), jobs=2, timeout=5.0)
    print(chaos.table(outcomes))
    bad = [
        (o.case.label, o.verdict, o.problems, o.leaks)
        for o in outcomes
        if o.verdict not in ("survived", "holder-died") or o.leaks
    ]
    assert bad == []
    # Every recovery path of the design was taken at least once.
    paths = {o.recovery for o in outcomes if o.verdict == "survived"}
    assert {"committed", "rollback", "reclaim", "takeover"} <= paths


# --- the real /dev/kvm ------------------------------------------------------------------------


def test_kvm_quick_matrix_is_a_plain_guest_on_kvm_at_every_step_that_differs() -> None:
    chaos = load_chaos()
    cases = chaos.kvm_quick_cases(seed=1)
    assert {(c.mode, c.hypervisor) for c in cases} == {("plain", "kvm")}
    faults = [c for c in cases if c.action != "sigkill"]
    assert {c.step for c in faults if c.role == "target"} == set(STEPS["target"])
    # The source's hello and describe refuse alike on both kernels (the kvmstub set has them).
    assert {c.step for c in faults if c.role == "source"} == set(STEPS["source"]) - {
        "hello",
        "describe",
    }
    assert {c.role for c in cases if c.action == "sigkill"} == {"source", "target"}
    full = chaos.fault_cases(chaos.KVM_MODES, "kvm")
    assert len(full) == sum(len(s) for s in STEPS.values()) * len(ACTIONS)
    assert {c.hypervisor for c in full} == {"kvm"}


@pytest.mark.skipif(kvm_problem() is not None, reason="the real KVM cannot run a guest here")
def test_quick_chaos_on_the_real_kvm_loses_no_guest_where_the_rules_promise_it() -> None:
    chaos = load_chaos()
    outcomes = chaos.run_cases(chaos.kvm_quick_cases(seed=1), jobs=2, timeout=5.0)
    print(chaos.table(outcomes))
    bad = [
        (o.case.label, o.verdict, o.problems, o.leaks)
        for o in outcomes
        if o.verdict not in ("survived", "holder-died") or o.leaks
    ]
    assert bad == []
    # The guest is gone only where its one holder died: for a fault, the source in its pause.
    died = {o.case.label for o in outcomes if o.verdict == "holder-died"}
    faults = {o.case.label for o in outcomes if o.case.action != "sigkill"}
    assert died & faults == {"plain@kvm source:paused:crash"}
    paths = {o.recovery for o in outcomes if o.verdict == "survived"}
    assert {"committed", "refused", "rollback", "takeover"} <= paths


# --- hung peers -------------------------------------------------------------------------------


@pytest.fixture
def vmms(tmp_path: Path, kvmstub_daemon: Any) -> Iterator[Callable[..., VmmProcess]]:
    made: list[VmmProcess] = []

    def make(**kwargs: Any) -> VmmProcess:
        vmm = VmmProcess(
            tmp_path, kvmstub_daemon.socket, name=f"h{len(made)}",
            extra=["--handoff-timeout", f"{TIMEOUT:g}"], **kwargs,
        )  # fmt: skip
        made.append(vmm)
        vmm.start()
        return vmm

    yield make
    for vmm in made:
        vmm.kill_all()


async def pause_seen_by_guest(vmm: VmmProcess) -> int:
    """The largest gap_us the guest reported in its first lines after the handoff's pause."""
    record = await vmm.qmp("query-handoff")
    at_pause = dict(enumerate(record["pause-seqs"]))
    report = await vmm.wait_lines(more=3)
    assert report.problems(vmm.vcpus) == [], vmm.log()
    gap = report.max_gap_after(at_pause, lines=1)
    assert gap is not None
    return gap


@pytest.mark.parametrize(
    ("mode", "step"),
    [("plain", "switchover"), ("sev", "moved"), ("sev-es", "moved"), ("sev-es", "commit")],
)
async def test_hung_target_is_fenced_and_cannot_hold_the_guest_paused_beyond_the_limit(
    vmms: Callable[..., VmmProcess], kvmstub_daemon: Any, mode: str, step: str
) -> None:
    vmm = vmms(mode=mode, vcpus=2)
    await vmm.wait_lines()
    pid = await vmm.pid()
    target, path = vmm.start_target("--x-fault", f"target:{step}:hang")
    result = await vmm.hand_off_to(path)
    assert result["status"] == "failed", vmm.log()
    assert "within 1 s" in result["error-desc"]
    # sev, sev-es: after Moved the context is in the target's VM and comes back from escrow.
    assert result["recovery"] == ("reclaim" if step != "switchover" and mode != "plain" else
                                  "rollback")  # fmt: skip
    assert await vmm.pid() == pid
    # Fenced: the hung target was killed, not left holding our escrowed VM.
    assert target.wait(5) == -signal.SIGKILL
    assert await pause_seen_by_guest(vmm) < (TIMEOUT + MARGIN_S) * 1e6
    stats = kvmstub_daemon.stats()
    assert len([vm for vm in stats["vms"] if not vm["dead"] and vm["vcpus"]]) == 1


@pytest.mark.parametrize("step", ["paused", "moved"])
async def test_source_stuck_in_its_own_blackout_takes_the_guest_back_at_the_limit(
    vmms: Callable[..., VmmProcess], step: str
) -> None:
    vmm = vmms(mode="sev-es", vcpus=2)
    await vmm.wait_lines()
    pid = await vmm.pid()
    await vmm.qmp("x-set-fault", spec=f"source:{step}:hang")
    target, path = vmm.start_target()
    result = await vmm.hand_off_to(path)
    assert result["status"] == "failed", vmm.log()
    assert result["recovery"] == ("rollback" if step == "paused" else "reclaim")
    assert await vmm.pid() == pid
    assert await pause_seen_by_guest(vmm) < (TIMEOUT + MARGIN_S) * 1e6
    # The target gave up on its own (a source that is alive keeps the guest) or was fenced.
    assert target.wait(10) != 0
