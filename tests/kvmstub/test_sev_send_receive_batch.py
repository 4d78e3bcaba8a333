"""KVM_MEMORY_ENCRYPT_OPs submitted together (`wire.SevIoctlBatch`, the client's
`sev_ioctl_batch` and the page helpers over it) are the same as that many single calls: the
same results, the same error at the same entry (errno, firmware status, message), the same
firmware and memory state after a failure, and the entries after a failed one never run.

Two hosts (two daemons in this process, two SEV platforms under one simulated AMD root) and
a launched guest; a target VM receives the stream through batches, a twin target VM receives
the same stream one page at a time (a target platform accepts one stream twice: reference
section 1.3, RECEIVE_START), and the two are compared.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kvmstub import client, daemon, uapi, wire
from kvmstub.model import Host, Vm
from kvmstub.platform import AmdRoot, Platform, PlatformKeys
from kvmstub.uapi import PAGE_SIZE

PAGES = 40  # more than one request carries: 40 packets are about 170 KiB
ROOT = AmdRoot()


def page_of(i: int) -> bytes:
    return (f"batched page {i} ".encode() * 300)[:PAGE_SIZE]


def memfd() -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGES * PAGE_SIZE)
    return fd


@dataclass
class Hosts:
    source: client.Kvm
    target: client.Kvm
    fds: list[int]


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[Hosts]:
    async with trio.open_nursery() as nursery:
        kvms = []
        for name in ("a", "b"):
            host = Host(platform=Platform(PlatformKeys.generate(), ROOT))
            path = await nursery.start(daemon.serve, tmp_path / f"{name}.sock", host)
            kvms.append(await client.open_kvm(path))
        made = Hosts(kvms[0], kvms[1], [])
        try:
            yield made
        finally:
            for kvm in kvms:
                kvm.close()
            for fd in made.fds:
                os.close(fd)
            nursery.cancel_scope.cancel()


async def launched(h: Hosts) -> client.Vm:
    fd = memfd()
    h.fds.append(fd)
    for i in range(PAGES):
        os.pwrite(fd, page_of(i), i * PAGE_SIZE)
    vm = await h.source.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    await vm.set_user_memory_region(0, 0, PAGES * PAGE_SIZE, fd)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=0)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=PAGES * PAGE_SIZE)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
    return vm


async def receiver(h: Hosts, session: bytes, policy: int) -> tuple[client.Vm, int]:
    fd = memfd()
    h.fds.append(fd)
    vm = await h.target.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    await vm.set_user_memory_region(0, 0, PAGES * PAGE_SIZE, fd)
    source_pdh, _ = await h.source.sev_pdh_cert_export()
    await vm.sev_receive_start(source_pdh, session, policy)
    return vm, fd


async def send_start(h: Hosts, src: client.Vm) -> tuple[bytes, int]:
    pdh, chain = await h.target.sev_pdh_cert_export()
    return await src.sev_send_start(pdh, chain, await h.target.sev_amd_cert_chain())


def failure(exc: BaseException) -> tuple[Any, ...]:
    assert isinstance(exc, OSError)
    return exc.errno, getattr(exc, "fw_error", None), exc.strerror


async def test_a_batch_of_sends_is_the_pages_one_by_one(hosts: Hosts) -> None:
    src = await launched(hosts)
    session, policy = await send_start(hosts, src)
    packets = await src.sev_send_update_data_batch([i * PAGE_SIZE for i in range(PAGES)])
    assert [(len(h), len(t)) for h, t in packets] == [(52, PAGE_SIZE)] * PAGES
    assert len({h[4:20] for h, _ in packets}) == PAGES  # a fresh IV per packet, as per call
    one_by_one, _ = await receiver(hosts, session, policy)
    for i, (hdr, trans) in enumerate(packets):
        await one_by_one.sev_receive_update_data(i * PAGE_SIZE, hdr, trans)
    together, _ = await receiver(hosts, session, policy)
    await together.sev_receive_update_data_batch(
        [(i * PAGE_SIZE, hdr, trans) for i, (hdr, trans) in enumerate(packets)]
    )
    for dst in (one_by_one, together):
        await dst.sev_receive_finish()
        for i in range(PAGES):
            out = await dst.sev_ioctl(
                uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=i * PAGE_SIZE, len=PAGE_SIZE
            )
            assert out["data"] == page_of(i)


async def test_a_failing_send_stops_the_batch_with_the_single_calls_error(hosts: Hosts) -> None:
    src = await launched(hosts)
    await send_start(hosts, src)
    outside = PAGES * PAGE_SIZE  # no memory slot backs it: sev_pin_memory's ENOMEM
    with pytest.raises(OSError) as single:
        await src.sev_send_update_data(outside)
    with pytest.raises(OSError) as batched:
        await src.sev_send_update_data_batch([0, PAGE_SIZE, outside, 2 * PAGE_SIZE])
    assert failure(batched.value) == failure(single.value)
    assert single.value.errno == errno.ENOMEM
    assert batched.value.batch_index == 2  # type: ignore[attr-defined]
    done = batched.value.batch_done  # type: ignore[attr-defined]
    assert [(len(h), len(t)) for h, t in done] == [(52, PAGE_SIZE)] * 2
    # A firmware failure too: SEND_UPDATE_DATA after SEND_CANCEL is INVALID_GUEST_STATE.
    await src.sev_send_cancel()
    with pytest.raises(OSError) as single:
        await src.sev_send_update_data(0)
    with pytest.raises(OSError) as batched:
        await src.sev_send_update_data_batch([0, PAGE_SIZE])
    assert failure(batched.value) == failure(single.value)
    assert single.value.fw_error == uapi.SEV_RET_INVALID_GUEST_STATE  # type: ignore[attr-defined]
    assert batched.value.batch_index == 0  # type: ignore[attr-defined]


async def test_a_tampered_packet_mid_batch_fails_there_and_the_rest_never_runs(
    hosts: Hosts,
) -> None:
    src = await launched(hosts)
    session, policy = await send_start(hosts, src)
    packets = [
        (i * PAGE_SIZE, *await src.sev_send_update_data(i * PAGE_SIZE)) for i in range(PAGES)
    ]
    bad = PAGES - 5  # in the second request of the batch: its index counts from the first
    gpa, hdr, trans = packets[bad]
    stream = list(packets)
    stream[bad] = (gpa, hdr, bytes([trans[0] ^ 1]) + trans[1:])

    batched, batched_fd = await receiver(hosts, session, policy)
    single, single_fd = await receiver(hosts, session, policy)
    before = [os.pread(fd, PAGES * PAGE_SIZE, 0) for fd in (batched_fd, single_fd)]

    with pytest.raises(OSError) as in_batch:
        await batched.sev_receive_update_data_batch(stream)
    assert in_batch.value.batch_index == bad  # type: ignore[attr-defined]
    one_by_one: OSError | None = None
    for at, (g, h, t) in enumerate(stream):
        try:
            await single.sev_receive_update_data(g, h, t)
        except OSError as exc:
            one_by_one = exc
            assert at == bad
            break
    assert one_by_one is not None
    assert failure(in_batch.value) == failure(one_by_one)
    assert one_by_one.fw_error == uapi.SEV_RET_BAD_MEASUREMENT  # type: ignore[attr-defined]

    # The same state after the failure: pages before written, the refused one and those
    # after it untouched in memory, both still RUPDATE with the session's keys.
    for vm, fd, old in ((batched, batched_fd, before[0]), (single, single_fd, before[1])):
        now = os.pread(fd, PAGES * PAGE_SIZE, 0)
        for i in range(PAGES):
            page = slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
            assert (now[page] == old[page]) is (i >= bad), i
        status = await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
        assert status["state"] == uapi.SEV_GUEST_STATE_RUPDATE
        # The rest, correct this time, is received as if nothing had happened.
        await vm.sev_receive_update_data_batch(packets[bad:])
        await vm.sev_receive_finish()
        for i in range(PAGES):
            out = await vm.sev_ioctl(
                uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=i * PAGE_SIZE, len=PAGE_SIZE
            )
            assert out["data"] == page_of(i)


async def test_a_batch_carries_any_commands_and_answers_each(hosts: Hosts) -> None:
    src = await launched(hosts)
    out = await src.sev_ioctl_batch([(uapi.KVM_SEV_GUEST_STATUS, {})] * 2)
    assert [o["state"] for o in out] == [uapi.SEV_GUEST_STATE_RUNNING] * 2
    # A NULL data pointer (fields None) in a batch is what it is in a single call.
    with pytest.raises(OSError) as single:
        await src.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE, null_data=True)
    with pytest.raises(OSError) as batched:
        await src.sev_ioctl_batch(
            [(uapi.KVM_SEV_GUEST_STATUS, {}), (uapi.KVM_SEV_LAUNCH_MEASURE, None)]
        )
    assert failure(batched.value) == failure(single.value)
    assert batched.value.batch_index == 1  # type: ignore[attr-defined]
    assert len(batched.value.batch_done) == 1  # type: ignore[attr-defined]
    # More entries than one request carries: split, in order, each one answered.
    answers = await src.sev_ioctl_batch([(uapi.KVM_SEV_GUEST_STATUS, {})] * (wire.MAX_BATCH + 3))
    assert len(answers) == wire.MAX_BATCH + 3
    assert await src.sev_ioctl_batch([]) == []


async def test_a_batch_on_a_vcpu_fd_is_an_unknown_ioctl(hosts: Hosts) -> None:
    src = await launched(hosts)
    vcpu = await src.create_vcpu(0)
    try:
        request = wire.SevIoctlBatch(1, (wire.SevBatchEntry(uapi.KVM_SEV_GUEST_STATUS, {}),))
        with pytest.raises(OSError) as info:
            await vcpu._call(request, wire.BatchReply)
        assert info.value.errno == errno.EINVAL  # kvm_arch_vcpu_ioctl's default
    finally:
        vcpu.close()


@pytest.mark.parametrize(
    ("bug", "code"), [(ValueError, errno.EINVAL), (RuntimeError, errno.EFAULT)]
)
async def test_a_model_exception_mid_batch_is_answered_as_for_a_single_call(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch, bug: type[Exception], code: int
) -> None:
    """What the model should never raise (not an OSError) becomes the same error reply in a
    batch as for one call, at that entry, and the entries after it do not run."""
    src = await launched(hosts)
    real = Vm.sev_ioctl
    calls: list[int] = []

    def buggy(self: Vm, mm: int, cmd: int, fields: dict[str, int | bytes] | None) -> Any:
        calls.append(cmd)
        if cmd == uapi.KVM_SEV_DBG_DECRYPT:
            raise bug("a bug in the model")
        return real(self, mm, cmd, fields)

    monkeypatch.setattr(Vm, "sev_ioctl", buggy)
    decrypt = (uapi.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 0, "len": 16})
    with pytest.raises(OSError) as single:
        await src.sev_ioctl(decrypt[0], **decrypt[1])
    status: tuple[int, dict[str, int | bytes] | None] = (uapi.KVM_SEV_GUEST_STATUS, {})
    calls.clear()
    with pytest.raises(OSError) as batched:
        await src.sev_ioctl_batch([status, decrypt, status])
    assert failure(batched.value) == failure(single.value)
    assert single.value.errno == code and "a bug in the model" in single.value.strerror
    assert batched.value.batch_index == 1  # type: ignore[attr-defined]
    assert calls == [uapi.KVM_SEV_GUEST_STATUS, uapi.KVM_SEV_DBG_DECRYPT]
