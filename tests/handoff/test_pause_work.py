"""Regression guard for the pause (issue: performance): the work done while the guest is
paused must not grow with guest memory, and at most linearly with vCPUs.

Counts, not times: kvmstub requests and protocol messages made inside the pause, as the
source and the target record them (query-handoff), for a few sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from handoff.testing import VmmProcess


async def pause_counts(tmp_path: Path, kvm: Any, name: str, **kw: Any) -> tuple[int, int, int]:
    vmm = VmmProcess(tmp_path, kvm, name=name, **kw)
    try:
        vmm.start()
        await vmm.wait_lines(more=1)
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        target = await vmm.qmp("query-handoff")
        assert target["role"] == "target"
        return (
            result["requests-in-pause"],
            target["requests-in-pause"],
            result["messages-in-pause"] + target["messages-in-pause"],
        )
    finally:
        await vmm.quit()
        vmm.kill_all()


@pytest.mark.parametrize("mode", ["plain", "sev-es"])
async def test_pause_work_does_not_grow_with_memory_size(
    tmp_path: Path, kvmstub_daemon: Any, mode: str
) -> None:
    small = await pause_counts(tmp_path, kvmstub_daemon.socket, "small", mode=mode,
                               vcpus=2, memory="16M")  # fmt: skip
    huge = await pause_counts(tmp_path, kvmstub_daemon.socket, "huge", mode=mode,
                              vcpus=2, memory="1T")  # fmt: skip
    # Settling a pending exit is one request per vCPU that has one: allow that jitter only.
    assert abs(small[0] - huge[0]) <= 2
    assert small[1:] == huge[1:]


@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es"])
async def test_pause_work_grows_at_most_linearly_with_vcpus(
    tmp_path: Path, kvmstub_daemon: Any, mode: str
) -> None:
    counts = {}
    for n in (1, 2, 4, 8):
        counts[n] = await pause_counts(tmp_path, kvmstub_daemon.socket, f"v{n}", mode=mode,
                                       vcpus=n, memory="16M")  # fmt: skip
    for n in (2, 4, 8):
        src, tgt, msgs = counts[n]
        # Source: at most a settle and a register read per vCPU, plus a constant.
        assert src <= 2 * n + 2, counts
        # Target: one MOVE, or one register write per vCPU (plain, sev), plus a constant.
        assert tgt <= n + 2, counts
        # Messages: Switchover, Moved, Commit, Resumed on each side, whatever the size.
        assert msgs == counts[1][2] == 8, counts


def test_the_collector_is_paused_for_the_blackout_and_back_unless_kept_off() -> None:
    """A source keeps it off after a completed handoff (it only lingers and exits then);
    after a failed one, and for a target, it is back as it was."""
    import gc

    from handoff.machine.vmm import collector_paused

    assert gc.isenabled()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled()
        with collector_paused() as pause:
            pause.keep_off = True
        assert not gc.isenabled()
        with collector_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
