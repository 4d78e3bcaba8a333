"""Oversized buffers through the client's ioctls on a kvmstub daemon: the errno a VMM sees is
the kernel's (arch/x86/kvm/svm/sev.c), ENOMEM for SEND_UPDATE_DATA's kzalloc above
KMALLOC_MAX_SIZE and EINVAL for a blob psp_copy_user_blob refuses (above 16 KiB), each before
the firmware runs: a plain errno, no `fw_error`. The order, case by case, is
tests/kvmstub/test_sev_oversized_buffers.py.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from kvmstub import client, uapi
from kvmstub.uapi import PAGE_SIZE

KvmstubDaemon = Any  # tests/conftest.py's class
KMALLOC_MAX_SIZE = 4 << 20  # x86: 1 << (MAX_PAGE_ORDER + PAGE_SHIFT)


async def expect_errno(code: int, call: Any) -> None:
    with pytest.raises(OSError) as info:
        await call
    err: Any = info.value
    assert err.errno == code, err
    assert getattr(err, "fw_error", None) in (None, 0), err  # not the firmware's


async def test_oversized_migration_buffers_fail_with_the_kernels_errno_before_the_firmware(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, PAGE_SIZE)
    try:
        async with await client.open_kvm(kvmstub_daemon.socket) as kvm:
            vm = await kvm.create_vm()
            await vm.sev_ioctl(uapi.KVM_SEV_INIT)
            await vm.set_user_memory_region(0, 0, PAGE_SIZE, ram)
            await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=0)
            await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=PAGE_SIZE)
            await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE)
            await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
            # RUNNING: the firmware would answer INVALID_GUEST_STATE to any of these.
            await expect_errno(
                errno.ENOMEM, vm.sev_send_update_data(0, hdr_len=KMALLOC_MAX_SIZE + 1)
            )
            fields: dict[str, Any] = {"hdr_uaddr": 1, "hdr_len": 52, "guest_uaddr": 0}
            fields |= {"guest_len": PAGE_SIZE, "trans_uaddr": 1, "trans_len": KMALLOC_MAX_SIZE + 1}
            await expect_errno(errno.ENOMEM, vm.sev_ioctl(uapi.KVM_SEV_SEND_UPDATE_DATA, **fields))
            big = b"x" * (uapi.SEV_FW_BLOB_MAX_SIZE + 1)
            pdh, chain = await kvm.sev_pdh_cert_export()
            amd = await kvm.sev_amd_cert_chain()
            await expect_errno(errno.EINVAL, vm.sev_send_start(big, chain, amd))
            await expect_errno(errno.EINVAL, vm.sev_send_start(pdh, big, amd))
            await expect_errno(errno.EINVAL, vm.sev_send_start(pdh, chain, big))
            await expect_errno(errno.EINVAL, vm.sev_receive_update_data(0, big, b"t" * PAGE_SIZE))
            status = await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
            assert status["state"] == uapi.SEV_GUEST_STATE_RUNNING
            vm.close()
    finally:
        os.close(ram)
