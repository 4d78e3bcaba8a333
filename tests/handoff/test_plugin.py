"""handoff.testing as users meet it: an installed pytest plugin (entry point `pytest11`), used by a
test file of their own with no conftest of ours in sight."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

MORE_USER_TESTS = """

async def test_an_incompatible_successor_is_refused(vmm_factory, upgrade, serial_check):
    vm = vmm_factory(mode="plain", vcpus=1)
    result = await upgrade(vm, "vcpus=2", expect="failed")
    assert "vcpus" in result["error-desc"]
    await serial_check(vm)
"""


def readme_example() -> str:
    """The example test the README shows its readers (run here, so that it cannot rot)."""
    text = README.read_text()
    section = text[text.index("## Your own handoff tests") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_plugin_is_registered_under_the_pytest11_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("handoff.testing") == "handoff.testing.plugin"


def test_a_users_own_handoff_tests_run_on_the_plugin_fixtures_alone(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    example = readme_example()
    assert len(example.strip().splitlines()) <= 10
    (tmp_path / "test_mine.py").write_text(example + MORE_USER_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_listening_is_true_only_between_listen_and_close(tmp_path: Path) -> None:
    """What the harness waits for before it connects: the socket's file appears at bind(2),
    and a connect before listen(2) is refused."""
    import socket

    from handoff.testing import listening

    path = tmp_path / "s.sock"
    assert not listening(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    assert path.exists() and not listening(path)
    sock.listen(1)
    assert listening(path)
    sock.close()
    assert not listening(path)
