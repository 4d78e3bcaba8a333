"""The hypervisor seam of cross-host SEV migration, on two in-process model kernels (two
hosts, two SEV platforms under one simulated AMD root): the dirty log sees the guest's writes,
every populated page crosses (private pages through SEND/RECEIVE_UPDATE_DATA, shared ones as
the memfd's plaintext), and the guest carries on on the other host with its serial seq
contiguous. The machine and the roles use only `handoff.hv`; kvmstub appears here only to
build the two hosts."""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from handoff.hv import (
    NoSevMigration,
    abi,
    batch_done,
    batch_index,
    fw_error,
    migration_vm,
    sev_platform,
)
from handoff.hv.model import ModelHypervisor, ModelKernel
from handoff.machine.config import GuestConfig, HostFlags
from handoff.machine.vmm import Vmm, bitmap_pages
from handoff.migration.remote_source import MigrateOptions, next_throttle, throttle_problem
from handoff.transport.tcp import TlsFiles
from kvmstub.model import Host
from kvmstub.platform import AmdRoot, Platform, PlatformKeys

VCPUS = 2
LINE = re.compile(rb"vcpu=(\d+) seq=(\d+) ")
ROOT = AmdRoot()  # made on first use, once for the module


def host_kernel() -> ModelKernel:
    return ModelKernel(Host(platform=Platform(PlatformKeys.generate(), ROOT)))


def config(policy: int = 0) -> GuestConfig:
    return GuestConfig(
        vcpus=VCPUS, memory=1 << 20, mode="sev", policy=policy, line_every=2, flip_every=1
    )


def flags(name: str, serial_log: Path) -> HostFlags:
    return HostFlags(name=name, uuid=str(uuid.uuid4()), kvm="unused", serial_log=str(serial_log))


async def until(done: Callable[[], bool]) -> None:
    with trio.fail_after(20):
        while not done():
            await trio.sleep(0.001)


def ahead_of(vmm: Vmm, seqs: dict[int, int], lines: int = 3) -> Callable[[], bool]:
    last = vmm.devices.serial.last_seq
    return lambda: all(last.get(i, -1) >= seqs.get(i, -1) + lines for i in range(VCPUS))


def shared_pages(vmm: Vmm) -> set[int]:
    return {gpa + i * abi.PAGE_SIZE for gpa, n in vmm.devices.shared.regions() for i in range(n)}


async def copy_pages(
    source: Vmm, target: Vmm, pages: list[int], shared: set[int]
) -> tuple[int, int]:
    assert source.vm is not None and target.vm is not None
    src = migration_vm(source.vm, "kvmstub")
    dst = migration_vm(target.vm, "kvmstub")
    private = plain = 0
    for gpa in pages:
        if gpa in shared:
            target.write_page(gpa, source.read_page(gpa))
            plain += 1
        else:
            header, data = await src.sev_send_update_data(gpa)
            assert data != source.read_page(gpa)  # transport ciphertext, not the memfd's
            await dst.sev_receive_update_data(gpa, header, data)
            private += 1
    return private, plain


async def test_an_sev_guest_crosses_two_model_hosts_through_the_seam(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    a, b = ModelHypervisor(host_kernel()), ModelHypervisor(host_kernel())
    source = Vmm(config(), flags("source", log), hypervisor=a)
    target = Vmm(config(), flags("target", log), hypervisor=b)
    try:
        async with trio.open_nursery() as nursery:
            await source.launch()
            assert source.vm is not None
            await source.set_dirty_logging(True)
            assert await source.dirty_pages() == []  # the launch is the firmware's write
            source.start(nursery)
            source.resume()
            await until(ahead_of(source, {}))

            await target.prepare_incoming_sev()
            assert target.vm is not None
            pdh, plat = await sev_platform(b).sev_pdh_cert_export()
            amd = await sev_platform(b).sev_amd_cert_chain()
            src = migration_vm(source.vm, a.name)
            session, policy = await src.sev_send_start(pdh, plat, amd)
            source_pdh, _ = await sev_platform(a).sev_pdh_cert_export()
            dst = migration_vm(target.vm, b.name)
            await dst.sev_receive_start(source_pdh, session, policy)
            assert (await src.sev_guest_status())["state"] == abi.SEV_GUEST_STATE_SUPDATE

            # Round 1 (the guest runs on): every populated page, then what it dirtied.
            populated = source.populated_pages()
            assert 0 < len(populated) < 256  # sparse: only what the guest touched
            sent_as = shared_pages(source)
            await copy_pages(source, target, populated, sent_as)
            await until(ahead_of(source, dict(source.devices.serial.last_seq)))
            dirty = await source.dirty_pages()
            assert dirty, "the guest's journal writes are in the dirty log"
            assert set(dirty) <= set(populated)

            await source.pause()
            dirty += await source.dirty_pages()  # what it wrote since round 1, and since
            now = shared_pages(source)  # read after the dirty log (Sean's order)
            # The pages written since round 1, the guest paused; a page whose status changed
            # since it was sent goes again whether or not it was written (a conversion).
            again = sorted(set(dirty) | (now ^ sent_as))
            await copy_pages(source, target, again, now)
            states = await source.get_all_states()
            devices = await source.snapshot_devices()
            paused_at = dict(source.devices.serial.last_seq)
            await src.sev_send_finish()
            assert (await src.sev_guest_status())["state"] == abi.SEV_GUEST_STATE_SENT
            source.vcpus[0].unkick()  # not a paused vCPU's EINTR: the firmware's refusal
            with pytest.raises(OSError) as info:
                await source.vcpus[0].run()
            assert info.value.errno == errno.EIO  # a SENT guest never runs again

            await dst.sev_receive_finish()
            assert (await dst.sev_guest_status())["state"] == abi.SEV_GUEST_STATE_RUNNING
            await target.set_all_states(states)
            target.devices.restore(devices)
            target.start(nursery)
            target.resume()
            await until(ahead_of(target, paused_at))
            await target.pause()
            nursery.cancel_scope.cancel()
    finally:
        source.close()
        target.close()
    text = log.read_bytes()
    assert b"PANIC" not in text
    seen: dict[int, list[int]] = {}
    for m in LINE.finditer(text):
        seen.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    for vcpu in range(VCPUS):
        seq = seen[vcpu]
        assert seq == list(range(len(seq))), (vcpu, seq)


async def test_send_start_under_nosend_fails_in_the_firmware_and_the_guest_runs_on(
    tmp_path: Path,
) -> None:
    a, b = ModelHypervisor(host_kernel()), ModelHypervisor(host_kernel())
    source = Vmm(config(policy=abi.SEV_POLICY_NOSEND), flags("s", tmp_path / "l"), hypervisor=a)
    try:
        await source.launch()
        assert source.vm is not None
        pdh, plat = await sev_platform(b).sev_pdh_cert_export()
        amd = await sev_platform(b).sev_amd_cert_chain()
        with pytest.raises(OSError) as info:
            await migration_vm(source.vm, a.name).sev_send_start(pdh, plat, amd)
        assert info.value.errno == errno.EIO and fw_error(info.value) == 7  # POLICY_FAILURE
        status = await migration_vm(source.vm, a.name).sev_guest_status()
        assert status["state"] == abi.SEV_GUEST_STATE_RUNNING
    finally:
        source.close()


def test_a_backend_without_sev_migration_is_refused_by_name() -> None:
    class Plain:
        name = "kvm"

    with pytest.raises(NoSevMigration, match="kvm backend has no SEV SEND/RECEIVE"):
        migration_vm(Plain(), "kvm")  # type: ignore[arg-type]
    with pytest.raises(NoSevMigration, match="no SEV platform"):
        sev_platform(Plain())  # type: ignore[arg-type]


class _Msr:
    def __init__(self, index: int, data: int) -> None:
        self.index, self.data = index, data


class _WrmsrExit:
    exit_reason = 30  # KVM_EXIT_X86_WRMSR
    io = None
    hypercall = None

    def __init__(self, index: int, data: int) -> None:
        self.msr = _Msr(index, data)


async def test_the_guest_writing_0_to_migration_control_blocks_migration_again(
    tmp_path: Path,
) -> None:
    """Checklist: MSR_KVM_MIGRATION_CONTROL back to 0 re-blocks migration (Steve Rutherford's
    reboot window, reference section 5 item 1); 1 allows it."""
    from handoff.hv import MSR_KVM_MIGRATION_CONTROL
    from handoff.machine.vmm import VcpuRunner
    from handoff.migration.remote_source import MigrationFailed, check_migratable

    source = Vmm(config(), flags("s", tmp_path / "l"), hypervisor=ModelHypervisor(host_kernel()))
    try:
        await source.launch()
        source.migration_allowed = False  # as a VMM that offered the MSR sees a booting guest
        with pytest.raises(MigrationFailed, match="has not enabled migration"):
            check_migratable(source)
        runner = VcpuRunner(source, 0)
        assert runner._serve(_WrmsrExit(MSR_KVM_MIGRATION_CONTROL, 1))  # type: ignore[arg-type]
        assert source.migration_allowed is True
        check_migratable(source)
        runner._serve(_WrmsrExit(MSR_KVM_MIGRATION_CONTROL, 0))  # type: ignore[arg-type]
        with pytest.raises(MigrationFailed, match="wrote 0 to MSR_KVM_MIGRATION_CONTROL"):
            check_migratable(source)
    finally:
        source.close()


def test_a_round_sends_again_every_page_whose_status_changed_since_it_was_sent() -> None:
    """Checklist: shared-regions correctness under churn. A conversion the guest announced
    after the page was sent (with no write since: its contents are lost to it, reference
    section 2) makes the target read the page the other way, so the page goes again in its
    new form; a written page goes again; a page neither written nor converted does not."""
    from handoff.migration.remote_source import pages_to_send

    p = [i * 4096 for i in range(6)]
    sent = {p[0], p[1], p[2], p[3]}
    sent_shared = {p[1], p[3]}
    shared_now = {p[0], p[3]}  # p0 private -> shared, p1 shared -> private, p3 still shared
    dirty = {p[4]}
    assert pages_to_send(dirty, sent, sent_shared, shared_now) == [p[0], p[1], p[4]]
    assert pages_to_send(set(), sent, sent_shared, {p[1], p[3]}) == []


def test_bitmap_pages_names_every_set_bit_and_nothing_past_the_slot() -> None:
    npages = (64 << 30) // abi.PAGE_SIZE  # a 64 GiB slot: a 2 MiB bitmap
    bitmap = bytearray(npages // 8)
    pages = [0, 63, 64, 511, 512, 32767, 32768, npages // 3, npages - 1]
    for page in pages:
        bitmap[page // 8] |= 1 << page % 8
    base = 0x1_0000_0000
    assert bitmap_pages(bitmap, npages, base) == [base + p * abi.PAGE_SIZE for p in pages]
    tail = bytearray(b"\xff" * 16)  # 100 pages in whole 64-bit words: bits 100..127 unused
    assert bitmap_pages(tail, 100, 0) == [p * abi.PAGE_SIZE for p in range(100)]
    assert bitmap_pages(bytearray(npages // 8), npages, 0) == []


# --- auto-converge: the vCPU throttle ----------------------------------------------------------


async def test_a_throttled_vcpu_sleeps_and_lifting_the_throttle_wakes_it(tmp_path: Path) -> None:
    # At 99 % a vCPU runs a 10 ms timeslice, then sleeps 990 ms: while every vCPU sleeps the
    # guest makes no exit at all. Lifting the throttle (what the end of a migration does)
    # wakes them at once; a pause does not wait out a throttle sleep either.
    vmm = Vmm(config(), flags("s", tmp_path / "l"), hypervisor=ModelHypervisor(host_kernel()))
    try:
        async with trio.open_nursery() as nursery:
            await vmm.launch()
            vmm.start(nursery)
            vmm.resume()
            await until(ahead_of(vmm, {}))
            with pytest.raises(ValueError, match="0 to 99"):
                vmm.set_throttle(100)
            vmm.set_throttle(99)
            await until(lambda: all(r.throttle_sleep is not None for r in vmm.runners))
            exits = [r.exits for r in vmm.runners]
            await trio.sleep(0.05)
            assert [r.exits for r in vmm.runners] == exits  # asleep, all of them

            asleep_until = min(r.throttle_sleep.deadline for r in vmm.runners if r.throttle_sleep)
            vmm.set_throttle(0)
            await until(lambda: all(r.exits > e for r, e in zip(vmm.runners, exits, strict=True)))
            assert trio.current_time() < asleep_until  # woken by the lift, not by the time
            assert all(r.throttle_sleep is None for r in vmm.runners)

            vmm.set_throttle(99)
            await until(lambda: all(r.throttle_sleep is not None for r in vmm.runners))
            scope = vmm.runners[0].throttle_sleep
            assert scope is not None
            await vmm.pause()
            assert trio.current_time() < scope.deadline  # parked before the sleep was over
            assert all(r.parked for r in vmm.runners)
            nursery.cancel_scope.cancel()
    finally:
        vmm.close()


def test_the_throttle_starts_at_the_initial_step_and_grows_to_the_cap() -> None:
    opts = MigrateOptions(
        "tcp:127.0.0.1:1",
        TlsFiles(Path("c"), Path("k"), Path("a")),
        throttle_initial=30,
        throttle_increment=25,
        throttle_max=90,
    )
    steps = [0]
    for _ in range(5):
        steps.append(next_throttle(steps[-1], opts))
    assert steps == [0, 30, 55, 80, 90, 90]
    with pytest.raises(ValueError, match="exceeds"):
        MigrateOptions("tcp:127.0.0.1:1", opts.tls, throttle_initial=95, throttle_max=90)


@pytest.mark.parametrize(
    ("initial", "increment", "maximum", "problem"),
    [
        (20, 10, 99, None),
        (0, 10, 99, "'cpu-throttle-initial' must be a whole percentage from 1 to 99, not 0"),
        (20, 100, 99, "'cpu-throttle-increment' must be a whole percentage from 1 to 99"),
        (20, 10, 99.5, "'max-cpu-throttle' must be a whole percentage"),
        (True, 10, 99, "'cpu-throttle-initial' must be a whole percentage"),
        (50, 10, 40, "'cpu-throttle-initial' (50 %) exceeds 'max-cpu-throttle' (40 %)"),
    ],
)
def test_auto_converge_settings_are_checked_with_a_reason(
    initial: object, increment: object, maximum: object, problem: str | None
) -> None:
    said = throttle_problem(initial, increment, maximum)
    assert said == problem if problem is None else problem in str(said)


async def test_a_batch_of_page_commands_fails_at_the_entry_a_single_call_would(
    tmp_path: Path,
) -> None:
    """`sev_send_update_data_batch` and `sev_receive_update_data_batch` are the single
    commands in order: a failure names its entry (`batch_index`), what ran before it is
    kept (`batch_done`), and nothing after it runs."""
    a, b = ModelHypervisor(host_kernel()), ModelHypervisor(host_kernel())
    source = Vmm(config(), flags("source", tmp_path / "s"), hypervisor=a)
    target = Vmm(config(), flags("target", tmp_path / "t"), hypervisor=b)
    try:
        await source.launch()
        await target.prepare_incoming_sev()
        assert source.vm is not None and target.vm is not None
        src, dst = migration_vm(source.vm, a.name), migration_vm(target.vm, b.name)
        pdh, plat = await sev_platform(b).sev_pdh_cert_export()
        session, policy = await src.sev_send_start(
            pdh, plat, await sev_platform(b).sev_amd_cert_chain()
        )
        await dst.sev_receive_start(
            (await sev_platform(a).sev_pdh_cert_export())[0], session, policy
        )
        pages = [(200 + i) * abi.PAGE_SIZE for i in range(4)]  # private, not the guest's own
        for gpa in pages:
            os.pwrite(source.memfds[0], os.urandom(abi.PAGE_SIZE), gpa)
        packets = await src.sev_send_update_data_batch(pages)
        stream = [(gpa, h, d) for gpa, (h, d) in zip(pages, packets, strict=True)]
        gpa, h, d = stream[2]
        tampered = [*stream[:2], (gpa, h, bytes([d[0] ^ 1]) + d[1:]), *stream[3:]]
        before = target.read_page(gpa)
        with pytest.raises(OSError) as info:
            await dst.sev_receive_update_data_batch(tampered)
        assert batch_index(info.value) == 2 and fw_error(info.value) == 0xB  # BAD_MEASUREMENT
        assert target.read_page(gpa) == before and target.read_page(pages[3]) == bytes(4096)
        await dst.sev_receive_update_data_batch(stream[2:])  # the session carries on
        with pytest.raises(OSError) as info:
            await src.sev_send_update_data_batch([pages[0], 1 << 40, pages[1]])
        assert batch_index(info.value) == 1 and len(batch_done(info.value)) == 1
    finally:
        source.close()
        target.close()


async def test_a_target_whose_source_falls_silent_in_a_round_gives_up_and_tears_down(
    tmp_path: Path,
) -> None:
    """The target's page stream waits `answer_timeout` for each read, as for every other
    message: a source that stops in the middle of a round (its host hung) is given up, and
    the half-received guest torn down (the recovery table's row for a timeout in PRECOPY)."""
    from handoff.migration.remote_source import describe
    from handoff.migration.remote_target import BurntSessions, RemoteTarget
    from handoff.protocol import remote
    from handoff.testing.tls import make_pki
    from handoff.transport import tcp

    a, b = ModelHypervisor(host_kernel()), ModelHypervisor(host_kernel())
    source = Vmm(config(), flags("source", tmp_path / "s.log"), hypervisor=a)
    target = Vmm(config(), flags("target", tmp_path / "t.log"), hypervisor=b)
    pki = make_pki(tmp_path / "pki", {"source": ["127.0.0.1"], "target": ["127.0.0.1"]})
    burnt = BurntSessions(str(tmp_path / "burnt" / "sessions"))
    ended: list[bool] = []
    try:
        await source.launch()
        assert source.vm is not None
        src = migration_vm(source.vm, a.name)
        listener = await tcp.listen("tcp:127.0.0.1:0", pki["target"])
        async with listener, trio.open_nursery() as nursery:
            receiver = RemoteTarget(
                target, "vm", str(uuid.uuid4()), listener, burnt, nursery, answer_timeout=0.3
            )

            async def receive() -> None:
                ended.append(await receiver.run())

            nursery.start_soon(receive)
            conn = remote.RemoteConnection(remote.Role.SOURCE, guest=describe(source))
            async with await tcp.connect(str(listener.address), pki["source"]) as channel:

                async def say(message: remote.Message) -> None:
                    await channel.send(conn.send(message))

                await say(conn.make_hello(vm_name="vm", vm_uuid=uuid.uuid4()))
                conn.receive(await channel.receive())
                await say(conn.describe())
                chain = conn.receive(await channel.receive())
                assert isinstance(chain, remote.PlatformChain)
                session, policy = await src.sev_send_start(
                    chain.pdh, chain.plat_certs, chain.amd_certs
                )
                source_pdh, _ = await sev_platform(a).sev_pdh_cert_export()
                await say(remote.SendStart(session=session, source_pdh=source_pdh, policy=policy))
                await say(remote.Round(round=1, shared_regions=()))
                gpas = source.populated_pages()[:2]
                await say(conn.encrypted_pages(gpas, await src.sev_send_update_data_batch(gpas)))
                with trio.fail_after(10):  # then nothing more: the target gives up
                    while not ended:
                        await trio.sleep(0.01)
    finally:
        source.close()
        target.close()
    assert ended == [False]
    assert "the source sent nothing for 0.3 s" in receiver.error
    assert receiver.outcome == "torn-down" and target.vm is None
