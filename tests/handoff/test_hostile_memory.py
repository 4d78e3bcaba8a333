"""The largest guest handoff accepts can be handed off, and a larger one is refused clearly.

Guest memory is sparse memfds, so a 64 TiB guest costs nothing until it is touched. What did
cost: kvmstub (one process standing in for the kernel) mapped every slot of every VM into its
own 128 TiB address space, so during a handoff of a 64 TiB guest (its slots mapped for the old
VM and again for the new one) mmap failed with ENOMEM and the guest could never be upgraded;
two large VMs on one host could not even both boot.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handoff.machine import config
from handoff.testing import PROGRAM, VmmProcess
from kvmstub.memory import GuestMemory
from kvmstub.uapi import PAGE_SIZE

TiB = 1 << 40


def test_the_maximum_is_64_tib_and_a_larger_size_names_the_limit_and_why() -> None:
    assert config.parse_size("64T") == config.MAX_MEMORY == 64 * TiB
    with pytest.raises(config.ConfigError) as info:
        config.parse_size("65T")
    message = str(info.value)
    assert "'65T'" in message and "64T" in message
    assert "64 memory slots of 1T" in message  # why: the memfds one handoff message carries


def test_run_with_too_much_memory_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PROGRAM, "run", "--name", "big", "--memory", "65T", "--kvm", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HANDOFF_RUNTIME_DIR": str(tmp_path / "run")},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--memory" in done.stderr and "at most 64T" in done.stderr


def test_slots_beyond_the_daemons_address_space_are_reached_without_a_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When mmap is out of address space (ENOMEM) the slot is still set, and read and
    written through pread/pwrite; the same page cache the VMM sees."""
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4 * PAGE_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)

    def no_address_space(*args: Any, **kwargs: Any) -> mmap.mmap:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_address_space)  # kvmstub.memory calls mmap.mmap
    mem = GuestMemory()
    try:
        mem.set_region(0, 0, 0, 4 * PAGE_SIZE, fd, 0)
        mem.write(PAGE_SIZE + 1, b"guest")
        assert os.pread(fd, 5, PAGE_SIZE + 1) == b"guest"
        assert mem.read(PAGE_SIZE + 1, 5) == b"guest"
    finally:
        mem.close()
        os.close(fd)


async def test_two_64_tib_guests_boot_on_one_host_and_each_is_upgraded(
    vmm_factory: Callable[..., VmmProcess],
    upgrade: Callable[..., Any],
    serial_check: Callable[..., Any],
) -> None:
    """The largest size handoff accepts, twice on one kvmstub: four 64 TiB VMs in the daemon
    during the second handoff (two guests, each on its old and new VM until the old one
    goes). Before, the second guest could not boot and neither could be upgraded."""
    big = config.format_size(config.MAX_MEMORY)
    first = vmm_factory(memory=big, mode="sev-es", vcpus=2)
    second = vmm_factory(memory=big, mode="plain", vcpus=1)
    for vmm in (first, second):
        await upgrade(vmm)
    for vmm in (first, second):
        await serial_check(vmm)
