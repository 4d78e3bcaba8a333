"""The VMM's answer to KVM_HC_MAP_GPA_RANGE: the shared-region list of handoff.machine.devices.

KVM checks only the address and the page count before it exits to the VMM (page aligned, at
least one page, no wrap: kvmstub.model.emulate_hypercall, tests/kvmstub/test_migration_control);
the attributes are the VMM's to check (reference sev-live-migration.md section 2, Linux's
Documentation/virt/kvm/x86/hypercalls.rst section 8): bits 3:0 the preferred page size (0 = 4
KiB, 1 = 2 MiB, 2 = 1 GiB, "etc."), a hint, bit 4 encrypted, bits 63:5 must be zero; the count
is of 4 KiB pages whatever the hint. What the VMM returns goes to the
guest's RAX (`hypercall.ret`): 0, or -KVM_EINVAL for a request it refuses, which then changes
nothing. No daemon: `SharedRegions` is driven directly, as the vCPU thread drives it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.hv import abi
from handoff.machine.devices import Devices, DeviceState, SharedRegions
from kvmstub import uapi

PAGE = abi.PAGE_SIZE
ENC = abi.MAP_GPA_RANGE_ENCRYPTED
DEC = 0  # decrypted (shared), 4 KiB
EINVAL = -abi.EINVAL


def with_shared(*runs: tuple[int, int]) -> SharedRegions:
    regions = SharedRegions()
    for gpa, npages in runs:
        assert regions.map_gpa_range(gpa, npages, DEC) == 0
    return regions


def test_the_answers_are_linuxs_kvm_errno_values() -> None:
    # include/uapi/linux/kvm_para.h: KVM_EINVAL is EINVAL (22), KVM_ENOSYS 1000; the guest
    # reads them negated, as a u64 in RAX.
    assert abi.EINVAL == uapi.KVM_EINVAL == 22
    assert abi.ENOSYS == uapi.KVM_ENOSYS == 1000
    assert abi.HC_MAP_GPA_RANGE == uapi.KVM_HC_MAP_GPA_RANGE == 12
    assert abi.MAP_GPA_RANGE_ENCRYPTED == uapi.KVM_MAP_GPA_RANGE_ENCRYPTED == 1 << 4
    assert abi.MAP_GPA_RANGE_PAGE_SZ_4K == uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K == 0
    assert EINVAL & abi.U64_MASK == (1 << 64) - 22


def test_a_4k_decrypt_makes_pages_shared_and_an_encrypt_makes_them_private_again() -> None:
    regions = SharedRegions()
    assert regions.map_gpa_range(0x10000, 4, DEC) == 0
    assert regions.map_gpa_range(0x20000, 1, DEC) == 0
    assert regions.regions() == [(0x10000, 4), (0x20000, 1)]
    assert regions.map_gpa_range(0x11000, 2, ENC) == 0  # the middle of a run
    assert regions.regions() == [(0x10000, 1), (0x13000, 1), (0x20000, 1)]
    assert regions.map_gpa_range(0x11000, 2, DEC) == 0  # adjacent runs join
    assert regions.regions() == [(0x10000, 4), (0x20000, 1)]
    assert regions.map_gpa_range(0, 1 << 20, ENC) == 0  # all of the first 4 GiB private
    assert regions.regions() == []


@pytest.mark.parametrize("bit", range(5, 64))
def test_any_must_be_zero_bit_of_the_attributes_is_refused_and_changes_nothing(bit: int) -> None:
    for base in (DEC, ENC):
        regions = with_shared((0x3000, 2))
        assert regions.map_gpa_range(0x8000, 1, base | 1 << bit) == EINVAL
        assert regions.map_gpa_range(0x3000, 1, base | 1 << bit) == EINVAL
        assert regions.regions() == [(0x3000, 2)]


@pytest.mark.parametrize("size", range(16), ids=lambda s: f"page-size-{s}")
def test_the_preferred_page_size_is_a_hint_and_the_count_is_of_4k_pages(size: int) -> None:
    """Bits 3:0 are the guest's preferred page size (2 MiB = 1, 1 GiB = 2, "etc."): a hint for
    how the host maps the range. The count is of 4 KiB pages whatever it says, and the list
    changes exactly as for a 4 KiB request (QEMU ignores the hint too; Linux's guest,
    kvm_sev_hc_page_enc_status, passes KVM_MAP_GPA_RANGE_PAGE_SZ_4K)."""
    regions = with_shared((0x200000, 512))
    assert regions.map_gpa_range(0x200000, 3, ENC | size) == 0  # not a 2 MiB multiple: fine
    assert regions.map_gpa_range(0x600000, 1, DEC | size) == 0
    assert regions.regions() == [(0x203000, 509), (0x600000, 1)]


@pytest.mark.parametrize(
    ("gpa", "npages"),
    [(0x1001, 1), (0x1800, 1), (0x1000, 0), (0x1000, -1), (0x1000, (1 << 40) + 1)],
    ids=["unaligned-1", "unaligned-half", "no-pages", "negative", "too-many"],
)
def test_a_bad_address_or_count_is_refused_and_changes_nothing(gpa: int, npages: int) -> None:
    # KVM refuses the first three before exiting; the VMM checks again, as it must for any
    # userspace exit it is handed.
    regions = with_shared((0x1000, 1))
    assert regions.map_gpa_range(gpa, npages, DEC) == EINVAL
    assert regions.map_gpa_range(gpa, npages, ENC) == EINVAL
    assert regions.regions() == [(0x1000, 1)]


def test_the_largest_request_accepted_is_answered_without_walking_its_pages() -> None:
    """A guest may ask for 2^40 pages in one hypercall (KVM passes any count that does not
    wrap): the VMM answers it as a range, not page by page (which would hold the vCPU, and
    the devices, for hours and fill the host's memory)."""
    regions = SharedRegions()
    assert regions.map_gpa_range(0, 1 << 40, DEC) == 0
    assert regions.regions() == [(0, 1 << 40)]
    assert regions.map_gpa_range(PAGE, (1 << 40) - 2, ENC) == 0
    assert regions.regions() == [(0, 1), (((1 << 40) - 1) * PAGE, 1)]


def test_a_snapshot_carries_the_list_and_the_successor_answers_from_it() -> None:
    old = Devices(None, 1)
    old.shared.map_gpa_range(0x5000, 3, DEC)
    state = old.snapshot()
    assert state.shared_regions == [(0x5000, 3)]
    new = Devices(None, 1, DeviceState((0,), state.shared_regions))
    assert new.shared.map_gpa_range(0x6000, 1, ENC) == 0
    assert new.shared.regions() == [(0x5000, 1), (0x7000, 1)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40),  # first page
            st.integers(-1, 12),  # page count (some refused)
            st.sampled_from([DEC, ENC, DEC | 1, ENC | 2, ENC | 1 << 5, ENC | 1 << 63]),
        ),
        max_size=30,
    )
)
def test_the_list_is_what_the_accepted_requests_made_shared_page_by_page(
    ops: list[tuple[int, int, int]],
) -> None:
    regions = SharedRegions()
    shared: set[int] = set()
    for first, npages, attrs in ops:
        ok = npages > 0 and not attrs >> 5  # bits 3:0, the page size, are only a hint
        assert regions.map_gpa_range(first * PAGE, npages, attrs) == (0 if ok else EINVAL)
        if ok:
            pages = {(first + i) * PAGE for i in range(npages)}
            shared = shared - pages if attrs & ENC else shared | pages
    runs = regions.regions()
    assert {gpa + i * PAGE for gpa, n in runs for i in range(n)} == shared
    # Sorted, disjoint, not touching (each run as long as it can be), none empty.
    assert all(n > 0 for _gpa, n in runs)
    assert all(a + n * PAGE < b for (a, n), (b, _m) in itertools.pairwise(runs))
