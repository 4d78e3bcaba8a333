"""Read the guest's serial lines back and judge them: the guest is its own witness.

Every vCPU prints `vcpu=<i> seq=<n> gap_us=<g>` with `seq` counting 0, 1, 2, ... for the
guest's whole life, and `PANIC <reason>` on any inconsistency it detects. So a lost or repeated
step shows as a gap or repeat in `seq`, and `gap_us` is the pause the guest itself saw.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

LINE_RE = re.compile(r"^vcpu=(\d+) seq=(\d+) gap_us=(\d+)$")


@dataclass
class SerialReport:
    lines: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # vcpu -> (seq, gap)
    panics: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)

    def problems(self, vcpus: int | None = None) -> list[str]:
        """Every break of continuity, every PANIC; empty when the guest is whole."""
        out = [f"guest panicked: {p}" for p in self.panics]
        ids = range(vcpus) if vcpus is not None else sorted(self.lines)
        for v in ids:
            seqs = [s for s, _ in self.lines.get(v, [])]
            if not seqs:
                out.append(f"vcpu {v}: no serial lines")
                continue
            if seqs[0] != 0:
                out.append(f"vcpu {v}: first seq is {seqs[0]}, not 0")
            for a, b in itertools.pairwise(seqs):
                if b != a + 1:
                    kind = "repeated" if b <= a else "lost"
                    out.append(f"vcpu {v}: seq {a} followed by {b} ({kind})")
        return out

    def last_seq(self) -> dict[int, int]:
        return {v: entries[-1][0] for v, entries in self.lines.items() if entries}

    def max_gap_after(self, before: dict[int, int], lines: int = 2) -> int | None:
        """The largest gap_us the guest reported in the first `lines` lines of each vCPU after
        the seqs in `before`: the pause it saw around something done between the two reads."""
        best: int | None = None
        for v, last in before.items():
            for seq, gap in self.lines.get(v, []):
                if last < seq <= last + lines:
                    best = gap if best is None else max(best, gap)
        return best


def parse(text_lines: Iterable[str], report: SerialReport | None = None) -> SerialReport:
    report = report or SerialReport()
    for raw in text_lines:
        line = raw.rstrip("\n")
        if not line:
            continue
        m = LINE_RE.match(line)
        if m:
            v, seq, gap = (int(x) for x in m.groups())
            report.lines.setdefault(v, []).append((seq, gap))
        elif line.startswith("PANIC"):
            report.panics.append(line)
        else:
            report.garbage.append(line)
    return report


class SerialTail:
    """Follows growing serial logs, parsing only what was appended since the last read (a
    reader that re-parsed whole logs would take a CPU from the guest it watches)."""

    def __init__(self) -> None:
        self._report = SerialReport()
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, str] = {}

    def read(self, paths: Iterable[str]) -> SerialReport:
        """Everything in `paths` so far, in order: a snapshot the next read does not change.
        A line still being written waits for its newline."""
        for path in paths:
            try:
                with open(path, encoding="ascii", errors="replace") as f:
                    f.seek(self._offsets.get(path, 0))
                    text = self._partial.pop(path, "") + f.read()
                    self._offsets[path] = f.tell()
            except FileNotFoundError:
                continue
            complete, _, rest = text.rpartition("\n")
            if rest:
                self._partial[path] = rest
            if complete:
                parse(complete.split("\n"), self._report)
        r = self._report
        return SerialReport(
            {v: list(entries) for v, entries in r.lines.items()}, list(r.panics), list(r.garbage)
        )


def read_logs(paths: Iterable[str]) -> SerialReport:
    """Parse several logs in order (a handoff may change the serial log path)."""
    report = SerialReport()
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                parse(f, report)
        except FileNotFoundError:
            continue
    return report
