"""`handoff upgrade` as an operator runs it: live progress per step, or one JSON result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from handoff.testing import PROGRAM, VmmProcess


def run_cli(vmm: VmmProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROGRAM, *args], env=vmm.env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_upgrade_prints_each_step_as_it_happens_then_phases_or_one_json_result(
    tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, name="web", mode="sev-es")
    vmm.start()
    try:
        done = run_cli(vmm, "upgrade", "web")
        assert done.returncode == 0, done.stderr + vmm.log()
        lines = done.stdout.splitlines()
        steps = [line.split("ms  ", 1)[1] for line in lines if "ms  " in line]
        assert steps[0].startswith("successor pid ")
        assert [s.split(":")[0] for s in steps[1:]] == ["setup", "active", "device", "completed"]
        pid = int(steps[0].split()[2])
        vmm.pids.append(pid)
        assert f"upgrade completed: successor pid {pid}" in lines
        assert any(line.split()[:2] == ["pause", "vCPUs,"] for line in lines)
        assert any(line.strip().startswith("downtime (source side):") for line in lines)

        done = run_cli(vmm, "upgrade", "web", "--set", "vcpus=4", "--json")
        assert done.returncode == 1
        (line,) = done.stdout.splitlines()  # one JSON object and nothing else on stdout
        result = json.loads(line)
        assert result["status"] == "failed"
        assert result["recovery"] == "none"
        assert "vcpus: 4 here, 2 in the running VM" in result["error-desc"]
        assert await vmm.pid() == pid
    finally:
        vmm.kill_all()


def test_upgrade_of_a_vm_that_is_not_there_fails_with_the_reason() -> None:
    done = subprocess.run(
        [*PROGRAM, "upgrade", "--control", "/nonexistent/x.qmp", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["status"] == "failed"
    assert "cannot connect to the control socket /nonexistent/x.qmp" in result["error-desc"]


def test_a_vmm_loads_every_module_it_will_run_when_it_starts() -> None:
    # An upgrade in place replaces the package on disk under a running VMM; it must not pick up
    # the new release's source/target/cli halfway through its life.
    code = (
        "import sys, handoff.process.app; print(' '.join(m for m in sys.modules if 'handoff' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert {
        "handoff.migration.source",
        "handoff.migration.target",
        "handoff.process.flags",
        "handoff.system.logs",
    } <= loaded
