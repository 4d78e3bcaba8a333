"""The console scripts work in an install without the `test` extra.

Each test runs the programs with pytest, hypothesis, pytest-trio and qemu.qmp made unimportable
(a directory of modules that raise ImportError, first on PYTHONPATH, so every child process the
programs start sees the same), the way an operator's install without the extra would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TEST_ONLY = ("pytest", "_pytest", "pytest_trio", "hypothesis", "qemu")


@pytest.fixture
def without_test_extra(tmp_path: Path) -> dict[str, str]:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in TEST_ONLY:
        (shadow / f"{name}.py").write_text(
            f"raise ImportError('{name} is a test-only extra, not installed here')\n"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_the_shadow_really_hides_pytest(without_test_extra: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import pytest"],
        env=without_test_extra,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "test-only extra" in proc.stderr


def test_every_product_module_imports_without_the_test_extra(
    without_test_extra: dict[str, str],
) -> None:
    script = """
import importlib, pkgutil, handoff, kvmstub
for pkg in (handoff, kvmstub):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name == "handoff.testing.plugin" or info.name.endswith(".__main__"):
            continue  # the pytest plugin: test-only by definition (the harness is not)
        importlib.import_module(info.name)
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=without_test_extra,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "argv",
    [
        ["handoff", "--help"],
        ["handoff", "run", "--help"],
        ["handoff", "upgrade", "--help"],
        ["handoff", "status", "--help"],
        ["handoff", "list", "--help"],
        ["handoff", "demo", "--help"],
        ["kvmstub", "--help"],
    ],
)
def test_console_scripts_answer_help_without_the_test_extra(
    without_test_extra: dict[str, str], argv: list[str]
) -> None:
    program = Path(sys.executable).parent / argv[0]
    proc = subprocess.run(
        [str(program), *argv[1:]],
        env=without_test_extra,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_handoff_demo_runs_without_the_test_extra(
    without_test_extra: dict[str, str], tmp_path: Path
) -> None:
    """The whole demo (kvmstub, a VMM, its upgrades and rollback), small and plain."""
    program = Path(sys.executable).parent / "handoff"
    proc = subprocess.run(
        [str(program), "demo", "--mode", "plain", "--vcpus", "1", "--memory", "64M"],
        env=without_test_extra,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DEMO OK" in proc.stdout
