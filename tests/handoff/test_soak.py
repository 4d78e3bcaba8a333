"""The short soak: back-to-back upgrades of guests on one kvmstub, concurrently, lose no step and
leak nothing. `python tools/soak.py` runs the long one (1000 upgrades)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "tools" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


async def test_concurrent_back_to_back_upgrades_lose_no_step_and_grow_no_fds(
    tmp_path: Path,
) -> None:
    soak = load_soak()
    result = await soak.soak(9, 3, tmp_path, timeout=10.0)
    print(soak.report(result, 1e9))
    assert result.upgrades == 9, result.failed
    assert result.failed == []
    assert result.problems == []  # every vCPU's seq contiguous from 0
    assert result.panics == 0
    assert result.lines > 0
    assert result.leaks == []  # no VM, ASID, fd, process or handoff directory left
    for series in result.series:
        if series.unit == "fds":
            first, last = series.points[0][1], series.points[-1][1]
            assert last <= first, (series.name, series.points)
