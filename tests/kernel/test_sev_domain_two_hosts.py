"""Guest policy DOMAIN between kvmstub daemons, through the client's ioctls (reference
sev-live-migration.md sections 1.3 and 1.6): two hosts the owner put in one domain (`kvmstub
serve --oca-key FILE`, the same file) and a third that owns itself, all under one simulated
AMD root. A DOMAIN guest migrates to the host that shares its platform's OCA; toward the other
SEND_START fails with EIO and POLICY_FAILURE in `error`, and the guest runs on at the source.
The firmware checks one by one are tests/kvmstub/test_sev_send_receive.py and
tests/kvmstub/test_sev_owner_domain.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_sev_send_receive_two_hosts import (  # the ioctl-level migration helpers
    PAGES,
    launched_guest,
    memfd,
    move_pages,
)

from handoff.testing import KvmstubDaemon, spawn_kvmstub_daemon, write_oca_key
from kvmstub import client, uapi
from kvmstub.uapi import PAGE_SIZE


@pytest.fixture
def domain_hosts(tmp_path: Path) -> Iterator[dict[str, KvmstubDaemon]]:
    """Three daemons started side by side: `source` and `peer` given one OCA key file,
    `stranger` with an OCA of its own. Each is stopped afterwards and must exit 0, its socket
    gone."""
    oca = write_oca_key(tmp_path / "owner-oca.pem")
    owned = ("--oca-key", str(oca))
    pending = {}
    for name, extra in (("source", owned), ("peer", owned), ("stranger", ())):
        directory = tmp_path / name
        directory.mkdir(mode=0o700)
        pending[name] = spawn_kvmstub_daemon(
            directory,
            "--state-dir",
            str(tmp_path / f"state-{name}"),
            "--amd-root",
            str(tmp_path / "amd-root"),
            *extra,
        )
    started: dict[str, KvmstubDaemon] = {}
    try:
        for name, ready in pending.items():
            started[name] = ready()
        yield started
    finally:
        for daemon in started.values():
            daemon.stop_and_check()


async def test_a_domain_guest_migrates_within_its_owners_domain_and_nowhere_else(
    domain_hosts: dict[str, KvmstubDaemon],
) -> None:
    source, peer, stranger = (domain_hosts[n] for n in ("source", "peer", "stranger"))
    ids = {name: d.stats()["platform"] for name, d in domain_hosts.items()}
    assert ids["source"]["oca_fingerprint"] == ids["peer"]["oca_fingerprint"]
    assert ids["stranger"]["oca_fingerprint"] != ids["source"]["oca_fingerprint"]
    assert len({p["pdh_fingerprint"] for p in ids.values()}) == 3  # three platforms
    assert len({p["amd_root_fingerprint"] for p in ids.values()}) == 1  # one AMD root
    src_ram, dst_ram = memfd(), memfd()
    try:
        async with (
            await client.open_kvm(source.socket) as kvm_a,
            await client.open_kvm(peer.socket) as kvm_b,
            await client.open_kvm(stranger.socket) as kvm_c,
        ):
            src = await launched_guest(kvm_a, src_ram, uapi.SEV_POLICY_DOMAIN)

            # Toward another owner's platform: its chain verifies (same AMD root, its own
            # OCA signs its PEK), but its OCA is not ours -> POLICY_FAILURE (section 1.3).
            pdh, chain = await kvm_c.sev_pdh_cert_export()
            amd = await kvm_c.sev_amd_cert_chain()
            with pytest.raises(OSError) as info:
                await src.sev_send_start(pdh, chain, amd)
            err: Any = info.value
            assert (err.errno, err.fw_error) == (errno.EIO, uapi.SEV_RET_POLICY_FAILURE)
            assert err.fields == {"policy": 0, "session_len": 128}  # written back regardless
            status = await src.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
            assert status["state"] == uapi.SEV_GUEST_STATE_RUNNING  # nothing started
            assert [vm["firmware_state"] for vm in source.stats()["vms"]] == ["RUNNING"]
            assert stranger.stats()["vms"] == []

            # Toward the owner's other host: the whole migration, and the guest reads the same.
            pdh, chain = await kvm_b.sev_pdh_cert_export()
            amd = await kvm_b.sev_amd_cert_chain()
            session, policy = await src.sev_send_start(pdh, chain, amd)
            assert policy == uapi.SEV_POLICY_DOMAIN
            source_pdh, _ = await kvm_a.sev_pdh_cert_export()
            dst = await kvm_b.create_vm()
            await dst.sev_ioctl(uapi.KVM_SEV_INIT)
            await dst.set_user_memory_region(0, 0, PAGES * PAGE_SIZE, dst_ram)
            await dst.sev_receive_start(source_pdh, session, policy)
            await move_pages(src, dst, dst_ram)
            status = await dst.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
            assert (status["state"], status["policy"]) == (
                uapi.SEV_GUEST_STATE_RUNNING,
                uapi.SEV_POLICY_DOMAIN,
            )
            assert [vm["firmware_state"] for vm in source.stats()["vms"]] == ["SENT"]
            src.close()
            dst.close()
    finally:
        os.close(src_ram)
        os.close(dst_ram)
