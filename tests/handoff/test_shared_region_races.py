"""Sean Christopherson's shared-region races against the source's choice of pages per round.

Reference sev-live-migration.md section 2 ("Races Sean wrote into the ABI") and section 5.2:
(1) the guest makes the hypercall after writing the page; (2) the host reads the list before
the dirty log, so the list is stale; (3) the guest bails out after telling the host, so the host
migrates the page as shared. The rule: the host reads the list *after* the dirty log and treats
any page whose status changed in the round as dirty (the guest treats a page's contents as lost
the instant it announces a conversion).

`handoff.migration.remote_source` decides what a round sends with `pages_to_send` (the dirty
pages and those whose status changed since they were sent) and how with `_batches` (shared or
private by the round's list, `shared_pages(regions)`). These tests drive those functions and the
VMM's real list (`devices.SharedRegions`, changed only through `map_gpa_range`, as the
hypercall does) in the order `RemoteSource._precopy_and_stop` uses them: the dirty log is read
at the end of a round (`_peek_dirty`), the list at the start of the next, then the pages are
read and sent; the last round runs with the guest paused. Guest steps are placed between these
host steps, deterministically, and at the end every page must be on the target with the type
the guest's final list gives it and its latest contents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from handoff.hv import abi
from handoff.machine.devices import SharedRegions
from handoff.migration.remote_source import _batches, pages_to_send, shared_pages, within_memory

PAGE = abi.PAGE_SIZE
PAGES = [i * PAGE for i in range(4)]
P = PAGES[1]  # the page the guest converts

#: Where a guest step may fall in a pre-copy round, in the host's order.
BEFORE_LIST = "after the dirty log, before the list"  # end of the last round .. list read
AFTER_LIST = "after the list, before the pages are read"
AFTER_SEND = "after the pages are sent, before the dirty log"
POINTS = (BEFORE_LIST, AFTER_LIST, AFTER_SEND)

PickPages = Callable[[set[int], set[int], set[int], set[int]], list[int]]


@dataclass
class Guest:
    """The guest's side: its pages' contents (a version per page), its shared-region list as
    the VMM keeps it, and the dirty log."""

    shared: SharedRegions = field(default_factory=SharedRegions)
    version: dict[int, int] = field(default_factory=lambda: dict.fromkeys(PAGES, 0))
    dirty: set[int] = field(default_factory=set)

    def write(self, gpa: int) -> None:
        self.version[gpa] += 1
        self.dirty.add(gpa)

    def announce(self, gpa: int, *, shared: bool) -> None:
        """MAP_GPA_RANGE for one page. The conversion itself writes no data page (the C-bit
        is in the guest's page tables), so it leaves no mark in the dirty log."""
        attrs = 0 if shared else abi.MAP_GPA_RANGE_ENCRYPTED
        assert self.shared.map_gpa_range(gpa, 1, attrs) == 0

    def step(self, what: str, gpa: int = P) -> None:
        if what == "write":
            self.write(gpa)
        else:
            self.announce(gpa, shared=what == "share")

    def read_dirty_log(self) -> set[int]:
        """KVM_GET_DIRTY_LOG: the pages written since the last read, and the log cleared."""
        out, self.dirty = self.dirty, set()
        return out


@dataclass
class Source:
    """The source's bookkeeping across rounds, and what the target holds: per page, (shared,
    version) of the last frame it received."""

    pick: PickPages = pages_to_send
    sent: set[int] = field(default_factory=set)
    sent_shared: set[int] = field(default_factory=set)
    target: dict[int, tuple[bool, int]] = field(default_factory=dict)
    log: list[tuple[int, int, bool]] = field(default_factory=list)  # (round, gpa, shared)

    def round(
        self, n: int, guest: Guest, todo: set[int], at: Callable[[str], None] | None = None
    ) -> None:
        at = at or (lambda _point: None)
        at(BEFORE_LIST)
        shared_now = shared_pages(guest.shared.regions())  # after the dirty log
        pages = self.pick(todo, self.sent, self.sent_shared, shared_now)
        at(AFTER_LIST)
        for shared, gpas in _batches(pages, shared_now):
            for gpa in gpas:  # read now: SEND_UPDATE_DATA or the memfd's plaintext
                self.target[gpa] = (shared, guest.version[gpa])
                self.log.append((n, gpa, shared))
                self.sent.add(gpa)
                if shared:
                    self.sent_shared.add(gpa)
                else:
                    self.sent_shared.discard(gpa)
        at(AFTER_SEND)


def migrate(
    steps: Iterable[tuple[int, str, str]], rounds: int = 2, pick: PickPages = pages_to_send
) -> tuple[Guest, Source]:
    """`rounds` pre-copy rounds and the stop-and-copy round; each guest step (round, point,
    what) happens at its point of its round, in the order given."""
    guest, source = Guest(), Source(pick=pick)
    steps = list(steps)
    todo = set(PAGES)  # round 1: every populated page
    guest.read_dirty_log()  # logging starts now
    for n in range(1, rounds + 1):

        def at(point: str, n: int = n) -> None:
            for r, p, what in steps:
                if (r, p) == (n, point):
                    guest.step(what)

        source.round(n, guest, todo, at)
        todo = guest.read_dirty_log()
    # Stop and copy: the guest is paused, nothing changes any more.
    todo |= guest.read_dirty_log()
    source.round(rounds + 1, guest, todo)
    return guest, source


def wrong_pages(guest: Guest, source: Source) -> dict[int, tuple[tuple[bool, int], ...]]:
    """Pages the target holds with another type than the guest's final list, or old data."""
    final_shared = shared_pages(guest.shared.regions())
    out: dict[int, tuple[tuple[bool, int], ...]] = {}
    for gpa in PAGES:
        want = (gpa in final_shared, guest.version[gpa])
        if source.target.get(gpa) != want:
            out[gpa] = (source.target.get(gpa, (False, -1)), want)
    return out


def dirty_only(dirty: set[int], sent: set[int], sent_shared: set[int], now: set[int]) -> list[int]:
    """The rule without its second half: only the dirty log decides (a negative control)."""
    return sorted(dirty)


# ---- race 2: the list and the dirty log of one round ----------------------------------------


def test_race_2_a_conversion_and_write_after_the_list_was_read_go_again_with_the_new_type() -> None:
    """P was written in round 1, so round 2 sends it. The guest makes P shared and writes it
    after round 2 read the list: round 2 sends P by the list it read (private), and the next
    round, which reads the list after the dirty log that saw the write, sends it shared."""
    guest, source = migrate(
        [(1, AFTER_SEND, "write"), (2, AFTER_LIST, "share"), (2, AFTER_LIST, "write")]
    )
    assert (2, P, False) in source.log and (3, P, True) in source.log
    assert wrong_pages(guest, source) == {}


def test_race_2_a_conversion_between_the_dirty_log_and_the_list_is_read_in_the_same_round() -> None:
    """Read in this order, a conversion that falls between the two reads is already in the
    list: the page goes with its new type in that round (its status changed, though the dirty
    log that round used had not seen the write), and never again as private; the write,
    in the next dirty log, sends it once more."""
    guest, source = migrate([(2, BEFORE_LIST, "share"), (2, BEFORE_LIST, "write")])
    assert [entry for entry in source.log if entry[1] == P] == [
        (1, P, False),
        (2, P, True),
        (3, P, True),
    ]
    assert wrong_pages(guest, source) == {}


def test_race_2_a_conversion_without_a_write_after_the_list_is_caught_by_the_status_rule() -> None:
    """No write, so no dirty bit: only the "status changed since sent" half of the rule
    sends P again, shared. Without it the target keeps P private."""
    steps = [(2, AFTER_LIST, "share")]
    guest, source = migrate(steps)
    assert (3, P, True) in source.log
    assert wrong_pages(guest, source) == {}
    guest, naive = migrate(steps, pick=dirty_only)
    assert wrong_pages(guest, naive) == {P: ((False, 0), (True, 0))}


# ---- race 3: the guest announces a conversion and bails out ----------------------------------


def test_race_3_a_guest_that_announces_shared_then_bails_out_back_to_private_gets_it_private() -> (
    None
):
    """Round 2 reads a list where P is shared and sends it in plaintext; then the guest bails
    out and announces P private again, writing nothing. P is not dirty, but its status changed
    since it was sent: it goes again through SEND_UPDATE_DATA. With the dirty log alone the
    target would keep the plaintext copy, as shared. (P is written in round 1 so that the
    dirty log alone also sends it in round 2.)"""
    steps = [(1, AFTER_SEND, "write"), (2, BEFORE_LIST, "share"), (2, AFTER_SEND, "private")]
    guest, source = migrate(steps)
    assert [entry for entry in source.log if entry[1] == P] == [
        (1, P, False),
        (2, P, True),
        (3, P, False),
    ]
    assert wrong_pages(guest, source) == {}
    guest, naive = migrate(steps, pick=dirty_only)
    assert wrong_pages(guest, naive) == {P: ((True, 1), (False, 1))}


def test_race_3_a_guest_that_announces_shared_and_never_converts_has_it_migrated_as_shared() -> (
    None
):
    """The bail-out the ABI leaves to the guest: it told the host P is shared and stopped
    there. The host migrates P as its list says, shared (in plaintext); the guest must have
    treated P's contents as lost when it announced (section 2's rule)."""
    guest, source = migrate([(1, AFTER_SEND, "share")])
    assert source.target[P] == (True, 0)
    assert shared_pages(guest.shared.regions()) == {P}
    assert wrong_pages(guest, source) == {}


def test_race_3_an_announcement_undone_within_one_round_sends_nothing_more() -> None:
    # Shared and back before the list is read: the list never showed it, nothing changed.
    guest, source = migrate([(2, BEFORE_LIST, "share"), (2, BEFORE_LIST, "private")])
    assert [entry for entry in source.log if entry[1] == P] == [(1, P, False)]
    assert wrong_pages(guest, source) == {}


# ---- every placement of a few steps ----------------------------------------------------------

WHATS = ("share", "private", "write")
SLOTS = [(n, point) for n in (1, 2) for point in POINTS]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_any_placement_of_conversions_and_writes_leaves_every_page_right_on_the_target(
    count: int,
) -> None:
    """Every sequence of `count` guest steps on P (share, private, write), each at any point
    of the two pre-copy rounds (in order), ends with the target holding every page with the
    final list's type and its last contents. With the dirty log alone some of the same
    placements leave a page of the wrong type (the control: the placements reach the races)."""
    runs = naive_wrong = 0
    for whats in itertools.product(WHATS, repeat=count):
        for slots in itertools.combinations_with_replacement(SLOTS, count):
            steps = [(n, point, what) for (n, point), what in zip(slots, whats, strict=True)]
            guest, source = migrate(steps)
            assert wrong_pages(guest, source) == {}, steps
            runs += 1
            guest, naive = migrate(steps, pick=dirty_only)
            naive_wrong += bool(wrong_pages(guest, naive))
    assert runs == len(WHATS) ** count * len(
        list(itertools.combinations_with_replacement(SLOTS, count))
    )
    assert naive_wrong > 0


# ---- a list that reaches past the guest's memory ----------------------------------------------

SLOT = 8 * PAGE
MEMORY = [(0, SLOT), (SLOT, 2 * SLOT)]  # two slots side by side


@pytest.mark.parametrize(
    ("regions", "expected"),
    [
        ([(2 * PAGE, 3)], [(2 * PAGE, 3)]),  # inside one slot: as it is
        ([(6 * PAGE, 4)], [(6 * PAGE, 2), (SLOT, 2)]),  # across the border: one run a slot
        ([(15 * PAGE, 1 << 40)], [(15 * PAGE, 1)]),  # past the end: cut at it
        ([(2 * SLOT, 5), (1 << 50, 1)], []),  # outside: not the migration's
        ([(0, 1 << 40)], [(0, 8), (SLOT, 8)]),
    ],
)
def test_the_list_a_migration_takes_is_cut_to_the_guests_memory(
    regions: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    assert within_memory(regions, MEMORY) == expected


def test_a_guest_that_declares_2_to_the_40_pages_shared_costs_a_migration_only_its_memory() -> None:
    """One hypercall may declare 2^40 pages shared (KVM passes any count that does not wrap):
    the round's shared pages are those of the guest's memory, not 2^40 of them."""
    shared = SharedRegions()
    assert shared.map_gpa_range(SLOT - PAGE, 1 << 40, abi.MAP_GPA_RANGE_PAGE_SZ_4K) == 0
    pages = shared_pages(within_memory(shared.regions(), MEMORY))
    assert pages == {SLOT - PAGE, *(SLOT + i * PAGE for i in range(8))}
