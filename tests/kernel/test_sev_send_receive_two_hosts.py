"""Cross-host SEV migration between two kvmstub daemons (two hosts, two SEV platforms, one
simulated AMD root in a temporary directory), through the client's ioctls, as a VMM pair
drives it (reference sev-live-migration.md sections 1.1-1.6). The firmware checks one by one
are tests/kvmstub/test_sev_send_receive.py; this file proves the kernel-ioctl path end to end:
PDH_CERT_EXPORT on the target's /dev/sev, SEND_* on the source VM, RECEIVE_* on the target
VM, the query convention's EIO with the length filled in, firmware errors as EIO with the
status in `fw_error`, and that a platform keeps its identity across a daemon restart.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmstub import client, uapi
from kvmstub.uapi import PAGE_SIZE

KvmstubDaemon = Any  # tests/conftest.py's class
PAGES = 3


def page_of(i: int) -> bytes:
    return (f"guest page {i} says hello ".encode() * 200)[:PAGE_SIZE]


def start_host(
    factory: Callable[..., KvmstubDaemon], tmp: Path, name: str, root: Path
) -> KvmstubDaemon:
    sock_dir = tmp / name
    sock_dir.mkdir(mode=0o700)
    return factory(sock_dir, "--state-dir", str(tmp / f"state-{name}"), "--amd-root", str(root))


async def launched_guest(kvm: client.Kvm, memfd: int, policy: int = 0) -> client.Vm:
    """An SEV guest whose PAGES pages are launched (encrypted in place) and RUNNING."""
    for i in range(PAGES):
        os.pwrite(memfd, page_of(i), i * PAGE_SIZE)
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    await vm.set_user_memory_region(0, 0, PAGES * PAGE_SIZE, memfd)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=PAGES * PAGE_SIZE)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
    return vm


def memfd() -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGES * PAGE_SIZE)
    return fd


async def move_pages(src: client.Vm, dst: client.Vm, dst_ram: int) -> None:
    """Every page through SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA, then SEND_FINISH and
    RECEIVE_FINISH: the target reads each page's plaintext back (DBG_DECRYPT) while its
    memfd (`dst_ram`) holds ciphertext."""
    for i in range(PAGES):
        hdr, trans = await src.sev_send_update_data(i * PAGE_SIZE)
        assert len(hdr) == 52 and len(trans) == PAGE_SIZE
        await dst.sev_receive_update_data(i * PAGE_SIZE, hdr, trans)
    await src.sev_send_finish()
    await dst.sev_receive_finish()
    for i in range(PAGES):
        out = await dst.sev_ioctl(uapi.KVM_SEV_DBG_DECRYPT, src_uaddr=i * PAGE_SIZE, len=PAGE_SIZE)
        assert out["data"] == page_of(i)
        assert os.pread(dst_ram, PAGE_SIZE, i * PAGE_SIZE) != page_of(i)


def firmware_states(daemon: KvmstubDaemon) -> dict[int, str | None]:
    return {vm["id"]: vm["firmware_state"] for vm in daemon.stats()["vms"]}


async def test_a_launched_guest_migrates_between_two_daemons_through_the_client_ioctls(
    tmp_path: Path, kvmstub_factory: Callable[..., KvmstubDaemon]
) -> None:
    root = tmp_path / "amd-root"
    source_host = start_host(kvmstub_factory, tmp_path, "source", root)
    target_host = start_host(kvmstub_factory, tmp_path, "target", root)
    src_ram, dst_ram = memfd(), memfd()
    try:
        async with (
            await client.open_kvm(source_host.socket) as kvm_a,
            await client.open_kvm(target_host.socket) as kvm_b,
        ):
            src = await launched_guest(kvm_a, src_ram, policy=uapi.SEV_POLICY_SEV)
            # The target hands its PDH and chains to the source (section 1.4).
            pdh, chain = await kvm_b.sev_pdh_cert_export()
            amd = await kvm_b.sev_amd_cert_chain()
            session, policy = await src.sev_send_start(pdh, chain, amd)
            assert len(session) == 128 and policy == uapi.SEV_POLICY_SEV
            source_pdh, _ = await kvm_a.sev_pdh_cert_export()
            dst = await kvm_b.create_vm()
            await dst.sev_ioctl(uapi.KVM_SEV_INIT)
            await dst.set_user_memory_region(0, 0, PAGES * PAGE_SIZE, dst_ram)
            handle = await dst.sev_receive_start(source_pdh, session, policy)
            assert handle > 0
            await move_pages(src, dst, dst_ram)
            status = await dst.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
            assert status["state"] == uapi.SEV_GUEST_STATE_RUNNING
            # The source is SENT: nothing more to send, and its vCPU can never run.
            assert set(firmware_states(source_host).values()) == {"SENT"}
            assert set(firmware_states(target_host).values()) == {"RUNNING"}
            with pytest.raises(OSError) as info:
                await src.sev_send_cancel()
            assert (info.value.errno, info.value.fw_error) == (  # type: ignore[attr-defined]
                errno.EIO,
                uapi.SEV_RET_INVALID_GUEST_STATE,
            )
            vcpu = await src.create_vcpu(0)
            with pytest.raises(OSError) as info:
                await vcpu.run()
            assert info.value.errno == errno.EIO
            vcpu.close()
            src.close()
            dst.close()
    finally:
        os.close(src_ram)
        os.close(dst_ram)
    a, b = source_host.stats()["platform"], target_host.stats()["platform"]
    assert a["amd_root_fingerprint"] == b["amd_root_fingerprint"] is not None
    assert a["pdh_fingerprint"] != b["pdh_fingerprint"]


async def test_the_query_convention_is_eio_with_the_length_filled_in(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    ram = memfd()
    try:
        async with await client.open_kvm(kvmstub_daemon.socket) as kvm:
            with pytest.raises(OSError) as info:
                await kvm.sev_issue_cmd(uapi.SEV_PDH_CERT_EXPORT, pdh_cert_len=0)
            err: Any = info.value
            assert (err.errno, err.fw_error) == (errno.EIO, uapi.SEV_RET_INVALID_LEN)
            assert err.fields == {"pdh_cert_len": 2084, "cert_chain_len": 3 * 2084}
            vm = await launched_guest(kvm, ram)
            with pytest.raises(OSError) as info:
                await vm.sev_ioctl(uapi.KVM_SEV_SEND_START, session_len=0)
            err = info.value
            assert (err.errno, err.fw_error) == (errno.EIO, uapi.SEV_RET_INVALID_LEN)
            assert err.fields["session_len"] == 128
            with pytest.raises(OSError) as info:
                await vm.sev_ioctl(uapi.KVM_SEV_SEND_UPDATE_DATA, hdr_len=0, trans_len=0)
            err = info.value
            assert (err.fw_error, err.fields["hdr_len"]) == (uapi.SEV_RET_INVALID_LEN, 52)
            for cmd in (uapi.KVM_SEV_SEND_UPDATE_VMSA, uapi.KVM_SEV_RECEIVE_UPDATE_VMSA):
                with pytest.raises(OSError) as info:
                    await vm.sev_ioctl(cmd, hdr_len=0)
                assert info.value.errno == errno.EINVAL
            status = await kvm.sev_platform_status()
            assert status["state"] == uapi.SEV_STATE_WORKING and status["guest_count"] == 1
            vm.close()
    finally:
        os.close(ram)


async def test_a_target_under_another_amd_root_is_refused_as_an_invalid_certificate(
    tmp_path: Path, kvmstub_factory: Callable[..., KvmstubDaemon]
) -> None:
    source_host = start_host(kvmstub_factory, tmp_path, "source", tmp_path / "root-1")
    stranger = start_host(kvmstub_factory, tmp_path, "stranger", tmp_path / "root-2")
    ram = memfd()
    try:
        async with (
            await client.open_kvm(source_host.socket) as kvm_a,
            await client.open_kvm(stranger.socket) as kvm_b,
        ):
            src = await launched_guest(kvm_a, ram, policy=uapi.SEV_POLICY_SEV)
            pdh, chain = await kvm_b.sev_pdh_cert_export()
            amd = await kvm_b.sev_amd_cert_chain()
            with pytest.raises(OSError) as info:
                await src.sev_send_start(pdh, chain, amd)
            err: Any = info.value
            # amd_cert_validate_ark: not this firmware's AMD root -> INVALID_CERTIFICATE.
            assert (err.errno, err.fw_error) == (errno.EIO, uapi.SEV_RET_INVALID_CERTIFICATE)
            assert err.fields["policy"] == 0
            status = await src.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
            assert status["state"] == uapi.SEV_GUEST_STATE_RUNNING  # nothing started
            src.close()
    finally:
        os.close(ram)


def test_a_restarted_daemon_keeps_its_pdh_and_stats_show_the_platform(
    tmp_path: Path, kvmstub_factory: Callable[..., KvmstubDaemon]
) -> None:
    root = tmp_path / "amd-root"
    first = start_host(kvmstub_factory, tmp_path, "host", root)
    before = first.stats()["platform"]
    assert first.stop() == 0
    (tmp_path / "host-again").mkdir(mode=0o700)
    again = kvmstub_factory(
        tmp_path / "host-again",
        "--state-dir",
        str(tmp_path / "state-host"),
        "--amd-root",
        str(root),
    )
    after = again.stats()["platform"]
    assert after["pdh_fingerprint"] == before["pdh_fingerprint"]
    assert after["oca_fingerprint"] == before["oca_fingerprint"]
    assert after["amd_root_fingerprint"] == before["amd_root_fingerprint"] is not None
    assert after["state"] == "INIT" and after["api"] == f"{uapi.SEV_API_MAJOR}.{uapi.SEV_API_MINOR}"
    for name in ("state-host", "amd-root"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o700
    # `kvmstub stats --json` prints the same identity.
    out = subprocess.run(
        [sys.executable, "-m", "kvmstub.cli", "stats", "--socket", str(again.socket), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["platform"]["pdh_fingerprint"] == before["pdh_fingerprint"]


def test_serve_refuses_a_state_directory_others_can_reach(
    tmp_path: Path, serve_refused: Callable[..., str]
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    assert "chmod 700" in serve_refused(tmp_path / "kvm.sock", "--state-dir", str(state))
