"""Rollback to the previous release, run from its own source: the last release before the
upgrade's one-time token moved from a file to an inherited fd (`--token-fd`), which that
release does not know. Rolling back to it, and forward again from it, must keep working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from previous_release import PREVIOUS_PROTOCOL, previous_release_program

from handoff.testing import PROGRAM, serial_checked


@pytest.fixture
def previous_release(tmp_path: Path) -> list[str]:
    """A program that runs the previous release's handoff (and its kvmstub client)."""
    return previous_release_program(tmp_path)


# plain: the registers cross as protocol 2's kvm_regs both ways (this release speaks 3).
@pytest.mark.parametrize("mode", ["sev-es", "plain"])
async def test_rollback_to_the_previous_release_and_forward_again(
    vmm_factory: Any, previous_release: list[str], mode: str
) -> None:
    vmm = vmm_factory(mode=mode, vcpus=2)
    await vmm.wait_lines()
    result = await vmm.upgrade([], previous_release)
    assert result["status"] == "completed", vmm.log()
    assert result["protocol"] == PREVIOUS_PROTOCOL
    status = await vmm.qmp("query-status")
    assert status["status"] == "running"
    # Forward again: the previous release spawns this one (with its token in a file).
    result = await vmm.upgrade([], PROGRAM)
    assert result["status"] == "completed", vmm.log()
    await serial_checked(vmm)


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ('echo "  --token-fd FD  read the one-time handoff token"', True),
        ('echo "  --token-file FILE"', False),
        ('echo "no such command" >&2; exit 1', "exited with status 1: is it a handoff program?"),
    ],
)
def test_the_old_vmm_asks_an_exec_program_how_it_takes_its_token(
    tmp_path: Path, script: str, expect: bool | str
) -> None:
    from handoff.errors import HandoffError
    from handoff.process.app import _run_help

    program = tmp_path / "program"
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    if isinstance(expect, bool):
        assert (b"--token-fd" in _run_help([str(program)])) is expect
    else:
        with pytest.raises(HandoffError, match=expect):
            _run_help([str(program)])


def test_this_release_lists_token_fd_in_its_run_help() -> None:
    from handoff.process.app import _run_help

    assert b"--token-fd" in _run_help(PROGRAM)
