"""handoff.seriallog: SerialTail follows growing serial logs and agrees with read_logs.

The logs are written here by appending bytes, in pieces that may end anywhere (mid-line too),
as a VMM's serial device and the file system may show them to a reader.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from handoff.seriallog import SerialReport, SerialTail, read_logs

# Two vCPUs, interleaved, with a PANIC, garbage, a blank line, non-ASCII bytes and CRLF.
CONTENT = (
    b"vcpu=0 seq=0 gap_us=10\n"
    b"vcpu=1 seq=0 gap_us=11\n"
    b"booting the guest\n"
    b"vcpu=0 seq=1 gap_us=12\n"
    b"\n"
    b"vcpu=1 seq=1 gap_us=2500\r\n"
    b"vcpu=0 seq=2 gap_us=\xff13\n"
    b"PANIC doorbell sum 7 != 8\n"
    b"vcpu=1 seq=2 gap_us=14\n"
    b"vcpu=0 seq=3 gap_us=15\n"
)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def whole_lines(data: bytes) -> bytes:
    """What a reader that waits for line ends has seen of `data` (a lone CR ends a line too:
    the logs are read with universal newlines)."""
    return data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]


def report_of(tmp_path: Path, data: bytes) -> SerialReport:
    """read_logs over `data` written to a file of its own."""
    path = tmp_path / "reference.log"
    path.write_bytes(data)
    return read_logs([str(path)])


@pytest.mark.parametrize("piece", [1, 5, 23, 64, len(CONTENT)])
def test_read_piece_by_piece_gives_what_read_logs_gives_for_the_whole_lines_so_far(
    tmp_path: Path, piece: int
) -> None:
    log = tmp_path / "serial.log"
    log.touch()
    tail = SerialTail()
    for end in range(piece, len(CONTENT) + piece, piece):
        append(log, CONTENT[end - piece : end])
        assert tail.read([str(log)]) == report_of(tmp_path, whole_lines(CONTENT[:end]))
    final = tail.read([str(log)])
    assert final == read_logs([str(log)])
    assert final.lines == {
        0: [(0, 10), (1, 12), (3, 15)],
        1: [(0, 11), (1, 2500), (2, 14)],
    }
    assert final.panics == ["PANIC doorbell sum 7 != 8"]
    assert final.garbage == ["booting the guest", "vcpu=0 seq=2 gap_us=\ufffd13"]


def test_a_line_split_across_two_writes_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=5\nvcpu=0 seq=1 ga")
    tail = SerialTail()
    first = tail.read([str(log)])
    assert first.lines == {0: [(0, 5)]}
    assert first.garbage == []  # the half line is neither a line nor garbage yet
    assert tail.read([str(log)]) == first  # and stays held while nothing more arrives
    append(log, b"p_us=7\n")
    second = tail.read([str(log)])
    assert second.lines == {0: [(0, 5), (1, 7)]}
    assert second.garbage == []
    assert second.problems() == []


def test_a_crlf_split_between_its_two_bytes_gives_one_line(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=5\r")
    tail = SerialTail()
    assert tail.read([str(log)]).lines == {0: [(0, 5)]}
    append(log, b"\nvcpu=0 seq=1 gap_us=6\r\n")
    report = tail.read([str(log)])
    assert report == read_logs([str(log)])
    assert report.lines == {0: [(0, 5), (1, 6)]}
    assert report.garbage == []


def test_a_panic_line_is_reported_as_a_problem(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=1\nPANIC seq went back")
    tail = SerialTail()
    assert tail.read([str(log)]).panics == []  # not whole yet
    append(log, b"wards\nvcpu=0 seq=1 gap_us=1\n")
    report = tail.read([str(log)])
    assert report.panics == ["PANIC seq went backwards"]
    assert report.problems() == ["guest panicked: PANIC seq went backwards"]
    assert report == read_logs([str(log)])


def test_garbage_lines_are_kept_apart_and_do_not_break_continuity(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=1\nvcpu=0 seq=x gap_us=1\n")
    tail = SerialTail()
    tail.read([str(log)])
    append(log, b"vcpu=0 seq=1 gap_us=1 trailing\n\x00\x01 noise\nvcpu=0 seq=1 gap_us=3\n")
    report = tail.read([str(log)])
    assert report.garbage == [
        "vcpu=0 seq=x gap_us=1",
        "vcpu=0 seq=1 gap_us=1 trailing",
        "\x00\x01 noise",
    ]
    assert report.lines == {0: [(0, 1), (1, 3)]}
    assert report.problems() == []
    assert report == read_logs([str(log)])


def test_lost_and_repeated_seqs_show_as_problems_as_with_read_logs(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=1\nvcpu=0 seq=1 gap_us=1\n")
    tail = SerialTail()
    tail.read([str(log)])
    append(log, b"vcpu=0 seq=3 gap_us=1\nvcpu=0 seq=3 gap_us=1\n")
    report = tail.read([str(log)])
    assert report.problems() == [
        "vcpu 0: seq 1 followed by 3 (lost)",
        "vcpu 0: seq 3 followed by 3 (repeated)",
    ]
    assert report == read_logs([str(log)])


def test_reading_again_with_nothing_new_parses_nothing_twice(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, CONTENT)
    tail = SerialTail()
    first = tail.read([str(log)])
    for _ in range(3):
        assert tail.read([str(log)]) == first
    assert first == read_logs([str(log)])


def test_two_paths_are_followed_in_order_when_the_log_path_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "serial-0.log", tmp_path / "serial-1.log"
    paths = [str(old), str(new)]
    append(old, b"vcpu=0 seq=0 gap_us=1\nvcpu=0 seq=1 gap_us=1\n")
    tail = SerialTail()
    assert tail.read(paths[:1]).lines == {0: [(0, 1), (1, 1)]}
    # The handoff: the old VMM writes its last line, the successor writes to the new path.
    append(old, b"vcpu=0 seq=2 gap_us=1\n")
    append(new, b"vcpu=0 seq=3 gap_us=2400\nvcpu=0 seq=4 gap")
    report = tail.read(paths)
    assert report.lines == {0: [(0, 1), (1, 1), (2, 1), (3, 2400)]}
    append(new, b"_us=1\nPANIC after the handoff\n")
    report = tail.read(paths)
    assert report == read_logs(paths)
    assert report.lines[0] == [(0, 1), (1, 1), (2, 1), (3, 2400), (4, 1)]
    assert report.panics == ["PANIC after the handoff"]
    assert report.max_gap_after({0: 2}) == 2400


def test_missing_files_are_skipped_and_read_from_their_start_once_they_appear(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "serial-0.log", tmp_path / "serial-1.log"
    paths = [str(old), str(new)]
    tail = SerialTail()
    assert tail.read(paths) == SerialReport()  # neither exists yet
    append(old, b"vcpu=0 seq=0 gap_us=1\n")
    assert tail.read(paths).lines == {0: [(0, 1)]}  # the new one is still missing
    append(new, b"vcpu=0 seq=1 gap_us=1\n")
    report = tail.read(paths)
    assert report.lines == {0: [(0, 1), (1, 1)]}
    assert report == read_logs(paths)


def test_a_snapshot_is_not_changed_by_later_reads(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=1\nPANIC one\nnoise\n")
    tail = SerialTail()
    snapshot = tail.read([str(log)])
    kept = copy.deepcopy(snapshot)
    append(log, b"vcpu=0 seq=1 gap_us=1\nvcpu=1 seq=0 gap_us=1\nPANIC two\nmore noise\n")
    later = tail.read([str(log)])
    assert snapshot == kept
    assert later.lines == {0: [(0, 1), (1, 1)], 1: [(0, 1)]}
    assert later.panics == ["PANIC one", "PANIC two"]
    assert later.garbage == ["noise", "more noise"]


def test_changing_a_snapshot_does_not_change_the_next_read(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    append(log, b"vcpu=0 seq=0 gap_us=1\nPANIC one\nnoise\n")
    tail = SerialTail()
    snapshot = tail.read([str(log)])
    snapshot.lines[0].append((99, 99))
    snapshot.lines[7] = [(0, 0)]
    snapshot.panics.clear()
    snapshot.garbage.append("added by the caller")
    assert tail.read([str(log)]) == read_logs([str(log)])
