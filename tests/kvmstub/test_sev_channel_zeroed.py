"""The transport channel's keys are zeroed when the channel closes (reference
sev-live-migration.md section 1.2: "SEND_FINISH, SEND_CANCEL, RECEIVE_FINISH all zero the
channel (TEK/TIK)"; AMD-ASPFW sev_channel.c `sev_channel_close`: secure_memzero of the whole
sev_trusted_channel_t, master secret, TEK, TIK and nonce), and when DECOMMISSION drops a
guest in the middle of a migration. Each test holds the channel and the packet cipher made
under it from before the close and finds every key buffer they hold zero afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from test_sev_send_receive import (  # the model's two-platform migration helpers
    PAGES,
    host_under,
    launched,
    receive_page,
    receiver,
    send_page,
    send_start_fields,
    sev,
    start_receive,
)

from kvmstub import uapi
from kvmstub.model import Channel, Host, Vm
from kvmstub.uapi import PAGE_SIZE

U = uapi


@dataclass
class Open:
    """A migration with one page sent and received: both channels in use."""

    src_host: Host
    dst_host: Host
    src: Vm
    dst: Vm


@pytest.fixture
def open_channels(memfds: Callable[[], int]) -> Open:
    src_host, dst_host = host_under(), host_under()
    src = launched(src_host, memfds())
    out = sev(src, U.KVM_SEV_SEND_START, send_start_fields(dst_host))
    dst = receiver(dst_host, memfds())
    start_receive(dst, src_host, out)
    receive_page(dst, 0, *send_page(src, 0))
    return Open(src_host, dst_host, src, dst)


def channel_of(host: Host, vm: Vm) -> Channel:
    channel = host.firmware.contexts[vm.sev.handle].channel
    assert channel is not None
    return channel


def key_buffers(channel: Channel) -> dict[str, bytes | bytearray]:
    """Every key buffer the channel holds. Its packet cipher (made at the first packet)
    holds none: only its IVs, which are public, and the native keys, OpenSSL contexts (the
    TEK's key schedule, the SHA-256 states of HMAC's keyed blocks of the TIK) that OpenSSL
    cleanses when they are freed: with the cipher, which the channel drops at the close
    (`assert_dropped`)."""
    buffers = {
        name: value for name, value in vars(channel).items() if isinstance(value, bytes | bytearray)
    }
    cipher = channel.packets()
    held = {
        name
        for name in type(cipher).__slots__
        if isinstance(getattr(cipher, name), bytes | bytearray)
    }
    assert held == {"_ivs"}
    assert type(cipher._keys).__name__ == "PacketKeys"
    return buffers


def assert_zeroed(buffers: dict[str, bytes | bytearray]) -> None:
    assert {"tek", "tik"} <= buffers.keys()
    for name, value in buffers.items():
        assert len(value) == 16 and value == bytes(16), f"{name} survived the close"


def assert_dropped(channel: Channel) -> None:
    """The channel let go of its packet cipher, and with it the keyed HMAC states."""
    assert channel._packets is None


def test_the_channel_holds_only_the_tek_and_tik_no_nonce_or_master_secret(
    open_channels: Open,
) -> None:
    """SEND_START and RECEIVE_START keep the transport keys only: the session's nonce and the
    master secret, KEK and KIK derived from it are not kept past the command."""
    for host, vm in (
        (open_channels.src_host, open_channels.src),
        (open_channels.dst_host, open_channels.dst),
    ):
        buffers = key_buffers(channel_of(host, vm))
        assert {k for k in buffers if not k.startswith("cipher")} == {"tek", "tik"}
        assert all(value != bytes(16) for value in buffers.values())  # live keys meanwhile


@pytest.mark.parametrize(
    "command",
    [U.KVM_SEV_SEND_FINISH, U.KVM_SEV_SEND_CANCEL],
    ids=["SEND_FINISH", "SEND_CANCEL"],
)
def test_send_finish_and_send_cancel_zero_the_source_channel(
    open_channels: Open, command: int
) -> None:
    ctx = open_channels.src_host.firmware.contexts[open_channels.src.sev.handle]
    channel = channel_of(open_channels.src_host, open_channels.src)
    buffers = key_buffers(channel)
    sev(open_channels.src, command)
    assert ctx.channel is None
    assert_zeroed(buffers)
    assert_dropped(channel)


def test_receive_finish_zeroes_the_target_channel(open_channels: Open) -> None:
    for i in range(1, PAGES):
        receive_page(open_channels.dst, i * PAGE_SIZE, *send_page(open_channels.src, i * PAGE_SIZE))
    ctx = open_channels.dst_host.firmware.contexts[open_channels.dst.sev.handle]
    channel = channel_of(open_channels.dst_host, open_channels.dst)
    buffers = key_buffers(channel)
    sev(open_channels.dst, U.KVM_SEV_RECEIVE_FINISH)
    assert ctx.channel is None and ctx.state == U.SEV_GUEST_STATE_RUNNING
    assert_zeroed(buffers)
    assert_dropped(channel)


def test_decommission_in_the_middle_of_a_migration_zeroes_both_channels(
    open_channels: Open,
) -> None:
    """The VMs closed with their channels open (source SUPDATE, target RUPDATE): the last put
    deactivates and DECOMMISSIONs each guest, and its channel goes zeroed with it."""
    channels = [
        channel_of(open_channels.src_host, open_channels.src),
        channel_of(open_channels.dst_host, open_channels.dst),
    ]
    held = [key_buffers(channel) for channel in channels]
    for host, vm in (
        (open_channels.src_host, open_channels.src),
        (open_channels.dst_host, open_channels.dst),
    ):
        vm.put()
        assert host.firmware.contexts == {}
    for buffers, channel in zip(held, channels, strict=True):
        assert_zeroed(buffers)
        assert_dropped(channel)


def test_a_send_cancelled_guest_sends_again_under_fresh_keys(
    open_channels: Open, memfds: Callable[[], int]
) -> None:
    """The zeroed channel is gone, not reused: the next SEND_START opens a new one, whose
    packets the new target takes."""
    old = key_buffers(channel_of(open_channels.src_host, open_channels.src))
    sev(open_channels.src, U.KVM_SEV_SEND_CANCEL)
    other = host_under()
    out = sev(open_channels.src, U.KVM_SEV_SEND_START, send_start_fields(other))
    new = channel_of(open_channels.src_host, open_channels.src)
    assert new.tek != bytes(16) and new.tek is not old["tek"]
    dst = receiver(other, memfds())
    start_receive(dst, open_channels.src_host, out)
    receive_page(dst, 0, *send_page(open_channels.src, 0))
    assert_zeroed(old)
