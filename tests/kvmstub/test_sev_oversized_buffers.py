"""Oversized buffers in KVM's SEND/RECEIVE ioctls: each ENOMEM and EINVAL the kernel gives, at
its place in the kernel's order (arch/x86/kvm/svm/sev.c; reference sev-live-migration.md
section 1.6):

- sev_send_start: the length query (session_len 0) -> session_len > SEV_FW_BLOB_MAX_SIZE
  EINVAL (with the buffer checks) -> kzalloc(session_len) (never too large by then) ->
  psp_copy_user_blob of pdh_cert, plat_certs, amd_certs (each > SEV_FW_BLOB_MAX_SIZE: EINVAL)
  -> the firmware.
- sev_send_update_data: the length query (hdr_len or trans_len 0) -> EINVAL for the buffers
  and a range crossing a page -> sev_pin_memory -> kzalloc(hdr_len), kzalloc(trans_len)
  (> KMALLOC_MAX_SIZE: ENOMEM) -> sev_issue_cmd (through kvm_sev_info.fd) -> the firmware.
- sev_receive_start / sev_receive_update_data: psp_copy_user_blob of each blob (> 16 KiB:
  EINVAL; memdup_user of at most 16 KiB is never too large) before sev_pin_memory and the
  firmware.

One size past each limit fails in the kernel; the limit itself passes it, and the firmware
judges what it is given.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from test_sev_send_receive import (  # the model's two-platform migration helpers
    PAGES,
    expect_errno,
    expect_fw,
    host_under,
    launched,
    page_of,
    receive_page,
    receiver,
    send_page,
    send_start_fields,
    sev,
    start_receive,
    state,
)

from kvmstub import uapi
from kvmstub.model import KMALLOC_MAX_SIZE, Host, Vm
from kvmstub.uapi import PAGE_SIZE

U = uapi
BLOB_MAX = U.SEV_FW_BLOB_MAX_SIZE  # psp_copy_user_blob's limit, 16 KiB


@dataclass
class Two:
    src_host: Host
    dst_host: Host
    src: Vm


@pytest.fixture
def two(memfds: Callable[[], int]) -> Two:
    """A launched guest (RUNNING) on one platform and another platform to send it to."""
    src_host, dst_host = host_under(), host_under()
    return Two(src_host, dst_host, launched(src_host, memfds()))


def test_kmalloc_max_size_is_the_x86_kernels() -> None:
    # KMALLOC_MAX_SIZE = 1 << (MAX_PAGE_ORDER + PAGE_SHIFT) = 1 << (10 + 12) (include/linux/slab.h)
    assert KMALLOC_MAX_SIZE == 1 << (10 + 12)


# --------------------------------------------------------------------------------------------
# SEND_START


def test_send_start_oversized_buffers_are_einval_after_the_query_and_before_the_firmware(
    memfds: Callable[[], int],
) -> None:
    src_host, dst_host = host_under(), host_under()
    # NOSEND: whatever reaches the firmware fails there (POLICY_FAILURE), so an EINVAL below
    # is the kernel's, given before the command was issued.
    vm = launched(src_host, memfds(), policy=U.SEV_POLICY_NOSEND)
    good = send_start_fields(dst_host)

    def send_start(**fields: int | bytes) -> dict[str, int | bytes]:
        return sev(vm, U.KVM_SEV_SEND_START, good | fields)

    big = b"x" * (BLOB_MAX + 1)
    # The length query comes first: oversized blobs are not looked at.
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: send_start(session_len=0, pdh_cert=big))
    assert err.fields == {"policy": 0, "session_len": 128}
    # Then session_len, with the buffer checks; then each certificate blob in turn.
    expect_errno(errno.EINVAL, lambda: send_start(session_len=BLOB_MAX + 1))
    expect_errno(errno.EINVAL, lambda: send_start(session_len=BLOB_MAX + 1, session_uaddr=0))
    expect_errno(errno.EINVAL, lambda: send_start(pdh_cert=big))
    expect_errno(errno.EINVAL, lambda: send_start(plat_certs=big))
    expect_errno(errno.EINVAL, lambda: send_start(amd_certs=big))
    # At the limit the kernel passes them on; the firmware judges (NOSEND comes before the
    # certificates, after the session length).
    at_limit = b"x" * BLOB_MAX
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: send_start(session_len=BLOB_MAX))
    for name in ("pdh_cert", "plat_certs", "amd_certs"):
        expect_fw(U.SEV_RET_POLICY_FAILURE, partial(send_start, **{name: at_limit}))
    assert state(vm) == U.SEV_GUEST_STATE_RUNNING


# --------------------------------------------------------------------------------------------
# SEND_UPDATE_DATA


def send_update(vm: Vm, **fields: int | bytes) -> dict[str, int | bytes]:
    base: dict[str, int | bytes] = {"hdr_uaddr": 1, "hdr_len": 52, "guest_uaddr": 0}
    base |= {"guest_len": PAGE_SIZE, "trans_uaddr": 1, "trans_len": PAGE_SIZE}
    return sev(vm, U.KVM_SEV_SEND_UPDATE_DATA, base | fields)


def test_send_update_data_oversized_buffers_are_enomem_in_the_kernels_order(two: Two) -> None:
    vm = two.src
    too_big = KMALLOC_MAX_SIZE + 1
    # Before SEND_START, so the firmware would refuse anything (INVALID_GUEST_STATE): the
    # kernel's allocations fail before the command is issued.
    expect_errno(errno.ENOMEM, lambda: send_update(vm, hdr_len=too_big))
    expect_errno(errno.ENOMEM, lambda: send_update(vm, trans_len=too_big))
    expect_fw(U.SEV_RET_INVALID_GUEST_STATE, lambda: send_update(vm))
    sev(vm, U.KVM_SEV_SEND_START, send_start_fields(two.dst_host))
    # The length query comes first: a zero length asks, whatever the other says.
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: send_update(vm, hdr_len=0, trans_len=too_big))
    assert err.fields == {"hdr_len": 52, "trans_len": 0}
    err = expect_fw(U.SEV_RET_INVALID_LEN, lambda: send_update(vm, trans_len=0, hdr_len=too_big))
    assert err.fields["hdr_len"] == 52
    # Then the buffers and the page: EINVAL before any allocation.
    for missing in ("hdr_uaddr", "trans_uaddr", "guest_len"):
        expect_errno(errno.EINVAL, partial(send_update, vm, hdr_len=too_big, **{missing: 0}))
    expect_errno(errno.EINVAL, lambda: send_update(vm, guest_uaddr=16, hdr_len=too_big))
    # Then the pin (an unbacked page: ENOMEM of its own), then the two allocations.
    unbacked = expect_errno(
        errno.ENOMEM, lambda: send_update(vm, guest_uaddr=PAGES * PAGE_SIZE, hdr_len=too_big)
    )
    assert "not backed" in str(unbacked)
    expect_errno(errno.ENOMEM, lambda: send_update(vm, hdr_len=too_big))
    expect_errno(errno.ENOMEM, lambda: send_update(vm, trans_len=too_big, hdr_len=too_big))
    # Nothing happened: the guest is still in SUPDATE and its next packet goes through.
    assert state(vm) == U.SEV_GUEST_STATE_SUPDATE
    hdr, trans = send_page(vm, 0)
    assert len(hdr) == 52 and len(trans) == PAGE_SIZE


def assert_the_rest_migrates(two: Two, dst: Vm) -> None:
    """Page 0 received (through the buffers under test): the other pages go the usual way,
    both sides finish, and the target reads page 0's plaintext back."""
    for i in range(1, PAGES):
        receive_page(dst, i * PAGE_SIZE, *send_page(two.src, i * PAGE_SIZE))
    sev(two.src, U.KVM_SEV_SEND_FINISH)
    sev(dst, U.KVM_SEV_RECEIVE_FINISH)
    got = sev(dst, U.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 0, "len": PAGE_SIZE})["data"]
    assert got == page_of(0)


def test_send_update_data_buffers_of_kmalloc_max_size_go_through(
    two: Two, memfds: Callable[[], int]
) -> None:
    """At KMALLOC_MAX_SIZE the allocations succeed: the firmware writes its 52-byte header and
    the page's ciphertext at the front of the zeroed buffers, and the target takes them."""
    out = sev(two.src, U.KVM_SEV_SEND_START, send_start_fields(two.dst_host))
    dst = receiver(two.dst_host, memfds())
    start_receive(dst, two.src_host, out)
    big = send_update(two.src, hdr_len=KMALLOC_MAX_SIZE, trans_len=KMALLOC_MAX_SIZE)
    hdr, trans = big["hdr"], big["trans"]
    assert isinstance(hdr, bytes) and isinstance(trans, bytes)
    assert len(hdr) == len(trans) == KMALLOC_MAX_SIZE
    assert hdr[52:] == bytes(KMALLOC_MAX_SIZE - 52)
    assert trans[PAGE_SIZE:] == bytes(KMALLOC_MAX_SIZE - PAGE_SIZE)
    receive_page(dst, 0, hdr[:52], trans[:PAGE_SIZE])
    assert_the_rest_migrates(two, dst)


def test_send_update_data_without_a_dev_sev_fd_fails_its_allocations_before_the_command(
    two: Two, memfds: Callable[[], int]
) -> None:
    """sev_issue_cmd, where a missing /dev/sev fd fails (EBADF), runs after the buffer checks,
    the pin and the allocations: a VM that only did KVM_SEV_INIT gets their errors first."""
    vm = receiver(two.src_host, memfds())
    too_big = KMALLOC_MAX_SIZE + 1
    expect_errno(errno.EINVAL, lambda: send_update(vm, hdr_uaddr=0))
    expect_errno(errno.EINVAL, lambda: send_update(vm, guest_uaddr=16))
    expect_errno(errno.ENOMEM, lambda: send_update(vm, guest_uaddr=PAGES * PAGE_SIZE))
    expect_errno(errno.ENOMEM, lambda: send_update(vm, hdr_len=too_big))
    expect_errno(errno.EBADF, lambda: send_update(vm))
    expect_errno(errno.EBADF, lambda: send_update(vm, hdr_len=0))  # the query issues it too


# --------------------------------------------------------------------------------------------
# RECEIVE_START and RECEIVE_UPDATE_DATA


def test_receive_start_oversized_blobs_are_einval_before_the_firmware(
    two: Two, memfds: Callable[[], int]
) -> None:
    out = sev(two.src, U.KVM_SEV_SEND_START, send_start_fields(two.dst_host))
    pdh, session = two.src_host.firmware.platform.pdh_cert, out["session"]
    assert isinstance(session, bytes)
    dst = receiver(two.dst_host, memfds())

    def receive_start(**fields: int | bytes) -> dict[str, int | bytes]:
        base: dict[str, int | bytes] = {"handle": 0, "policy": 0, "pdh": pdh, "session": session}
        return sev(dst, U.KVM_SEV_RECEIVE_START, base | fields)

    big = b"x" * (BLOB_MAX + 1)
    expect_errno(errno.EINVAL, lambda: receive_start(pdh=big))
    expect_errno(errno.EINVAL, lambda: receive_start(session=big))
    expect_errno(errno.EINVAL, lambda: receive_start(pdh=big, session=b"x"))
    # At the limit they reach the firmware, which wants 128 and 2084 bytes.
    at_limit = b"x" * BLOB_MAX
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive_start(session=at_limit))
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive_start(pdh=at_limit))
    assert two.dst_host.firmware.contexts == {} and dst.sev.handle == 0
    receive_start()
    assert state(dst) == U.SEV_GUEST_STATE_RUPDATE


def test_receive_update_data_oversized_blobs_are_einval_before_the_pin_and_the_firmware(
    two: Two, memfds: Callable[[], int]
) -> None:
    out = sev(two.src, U.KVM_SEV_SEND_START, send_start_fields(two.dst_host))
    hdr, trans = send_page(two.src, 0)
    dst = receiver(two.dst_host, memfds())

    def receive(**fields: int | bytes) -> None:
        base: dict[str, int | bytes] = {
            "hdr": hdr,
            "guest_uaddr": 0,
            "guest_len": PAGE_SIZE,
            "trans": trans,
        }
        sev(dst, U.KVM_SEV_RECEIVE_UPDATE_DATA, base | fields)

    big = b"x" * (BLOB_MAX + 1)
    # No RECEIVE_START yet (no /dev/sev fd, no RUPDATE): the blobs are refused before that
    # matters, and before an unbacked page is pinned.
    unbacked = PAGES * PAGE_SIZE
    for fields in (
        {"hdr": big},
        {"trans": big},
        {"hdr": big, "guest_uaddr": unbacked},
        {"trans": big, "guest_uaddr": unbacked},
    ):
        expect_errno(errno.EINVAL, partial(receive, **fields))
    expect_errno(errno.ENOMEM, lambda: receive(guest_uaddr=unbacked))  # the pin
    expect_errno(errno.EBADF, receive)  # the command: this VM has no /dev/sev fd yet
    start_receive(dst, two.src_host, out)
    for fields in ({"hdr": big}, {"trans": big}):
        expect_errno(errno.EINVAL, partial(receive, **fields))
    # At the limit the kernel copies them in: the firmware wants trans_len == guest_len and
    # reads the header's first 52 bytes, so a padded header goes through.
    expect_fw(U.SEV_RET_INVALID_LEN, lambda: receive(trans=trans.ljust(BLOB_MAX, b"\0")))
    receive(hdr=hdr.ljust(BLOB_MAX, b"\0"))
    assert_the_rest_migrates(two, dst)
