"""The previous release, run from its own source in git history: what a rollback starts.

It is the last release before the upgrade's one-time token moved from a file to an inherited
fd (`--token-fd`); it speaks handoff protocol 2 at most and knows kvmstub only (no
`--hypervisor`, no `--idle-us`). `previous_release_program(directory)` builds a program that
runs it (its handoff and its kvmstub client), and skips the test where the checkout has no
such history:

    @pytest.fixture
    def previous_release(tmp_path: Path) -> list[str]:
        return previous_release_program(tmp_path)
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

PREVIOUS_RELEASE = "5592034"  # protocol 2; takes its token with --token-file only
PREVIOUS_PROTOCOL = 2
ROOT = Path(__file__).resolve().parents[1]


def previous_release_program(directory: Path) -> list[str]:
    """A program (argv) in `directory` that runs the previous release's `handoff`; skips the
    calling test where git or that commit is not at hand."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the previous release's source is not at hand")
    known = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
        capture_output=True,
    )
    if known.returncode != 0:
        pytest.skip(f"release {PREVIOUS_RELEASE} is not in this clone's history")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "handoff", "kvmstub"],
        capture_output=True,
        check=True,
    ).stdout
    source = directory / "previous-release"
    source.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    program = directory / "handoff-previous"
    program.write_text(f'#!/bin/sh\nPYTHONPATH={source} exec {sys.executable} -P -m handoff "$@"\n')
    program.chmod(0o755)
    return [str(program)]
