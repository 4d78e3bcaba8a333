"""Logs: text or JSON lines, journald priority prefixes when stderr is the journal stream, and
one summary line per handoff on each side."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from handoff.migration.record import HandoffRecord, handoff_summary
from handoff.system import logs
from handoff.testing import VmmProcess


def journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def record(status: str = "completed", **kw: Any) -> HandoffRecord:
    rec = HandoffRecord()
    rec.begin("source")
    rec.peer_pid = 4242
    rec.protocol = 2
    rec.phases = {"connect": 1.5, "pause": 0.25}
    rec.finish(status, kw.get("error", ""), kw.get("recovery", ""))
    rec.downtime_ms = 1.234
    return rec


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_journal_stream_is_recognised_only_when_it_names_our_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = tmp_path / "stderr", tmp_path / "elsewhere"
    mine.touch()
    other.touch()
    with open(mine, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_env(mine)["JOURNAL_STREAM"])
        assert logs.journald_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", journal_env(other)["JOURNAL_STREAM"])
        assert not logs.journald_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.journald_stream(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.journald_stream(stream)


def test_journald_lines_carry_the_syslog_priority_of_their_level() -> None:
    logger, stream = capture(logs.TextFormatter(journald=True))
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("two\nlines")
    logger.critical("c")
    assert stream.getvalue().splitlines() == [
        f"<7>DEBUG {logger.name}: d",
        f"<6>INFO {logger.name}: i",
        f"<4>WARNING {logger.name}: w",
        f"<3>ERROR {logger.name}: two",
        "<3>lines",
        f"<2>CRITICAL {logger.name}: c",
    ]


def test_json_lines_are_one_object_each_with_level_logger_pid_vm_and_message() -> None:
    logger, stream = capture(logs.JsonFormatter(journald=False, vm="web"))
    logger.warning("disk %s", "full")
    line = json.loads(stream.getvalue())
    assert line["level"] == "warning"
    assert line["logger"] == logger.name
    assert line["pid"] == os.getpid()
    assert line["vm"] == "web"
    assert line["msg"] == "disk full"
    assert isinstance(line["ts"], float)


def test_a_handoff_summary_is_one_line_naming_id_peers_phases_and_pause() -> None:
    logger, stream = capture(logs.TextFormatter(journald=False))
    rec = record()
    handoff_summary(logger, "web", rec)
    (line,) = stream.getvalue().splitlines()
    assert f"INFO {logger.name}: handoff {rec.id} completed: vm web, " in line
    assert f"source pid {os.getpid()} -> target pid 4242, role source, protocol 2, " in line
    assert "pause 1.234 ms" in line
    assert line.endswith("phases connect=1.500 pause=0.250")


def test_a_failed_handoff_summary_is_an_error_with_recovery_and_reason_in_json() -> None:
    logger, stream = capture(logs.JsonFormatter(journald=True, vm="web"))
    rec = record("failed", error="target died", recovery="reclaim")
    handoff_summary(logger, "web", rec)
    text = stream.getvalue()
    assert text.startswith("<3>{")
    line = json.loads(text[3:])
    assert line["level"] == "error"
    assert line["msg"].endswith(", recovery reclaim: target died")
    summary = line["handoff"]
    assert summary["id"] == rec.id
    assert (summary["status"], summary["recovery"], summary["error"]) == (
        "failed", "reclaim", "target died",
    )  # fmt: skip
    assert (summary["source-pid"], summary["target-pid"]) == (os.getpid(), 4242)
    assert summary["phases"] == {"connect": 1.5, "pause": 0.25}


async def test_vmms_under_journald_log_json_with_priorities_and_one_summary_per_side(
    tmp_path: Path, kvmstub_daemon: Any
) -> None:
    vmm = VmmProcess(tmp_path, kvmstub_daemon.socket, extra=["--log-format", "json"])
    vmm.log_path.touch()
    vmm.env.update(journal_env(vmm.log_path))
    vmm.start()
    try:
        result = await vmm.upgrade()
        assert result["status"] == "completed", vmm.log()
        successor = result["successor-pid"]
        assert await vmm.settle() == [successor]
        lines = vmm.log_path.read_text().splitlines()
        assert lines
        records = []
        for line in lines:
            assert line[0] == "<" and line[2] == ">", line
            records.append((int(line[1]), json.loads(line[3:])))
        assert all(
            prio == logs.SYSLOG_PRIORITY[getattr(logging, r["level"].upper())]
            for prio, r in records
        )
        summaries = [r["handoff"] for _, r in records if "handoff" in r]
        assert sorted(s["role"] for s in summaries) == ["source", "target"]
        assert {(s["source-pid"], s["target-pid"]) for s in summaries} == {(vmm.pids[0], successor)}
        source = next(s for s in summaries if s["role"] == "source")
        assert source["id"] == result["id"]
        assert source["pause-ms"] == result["downtime"]
        assert list(source["phases"]) == list(result["phases"])
    finally:
        vmm.kill_all()
