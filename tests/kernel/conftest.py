"""The selftest library for tests/kernel: what the kernel's `tools/testing/selftests/kvm/lib/`
(kvm_util.c, x86/sev.c) gives `sev_migrate_tests.c`, over a real kvmstub daemon.

    async def test_x(kvm):                           # SelftestKvm: one /dev/kvm open
        vm = await kvm.vm_create_barebones()          # KvmVm: struct kvm_vm
        await vm.sev_vm_init()                        # KVM_SEV_INIT (sev_es_vm_init: ES_INIT)
        await vm.vcpu_add(0)                          # __vm_vcpu_add
        await vm.sev_vm_launch(policy=0)              # LAUNCH_START, GUEST_STATUS (+ VMSA)
        assert await vm.try_sev_ioctl(cmd) == errno.EINVAL        # __vm_sev_ioctl
        assert await vm.try_enable_cap(cap, src.fd) == errno.EIO  # __vm_enable_cap
        vm.free()                                     # kvm_vm_free: close the fds
        info = await kvm.vm_stats(vm)                 # kvmstub's view, the C cannot see it

    def test_y(real_kvm):                            # rawkvm.RealKvm: the host's /dev/kvm,
        vm = real_kvm.create_vm()                     # raw ioctls; skipped where unusable

Failures are errnos (0 for success), as the C reads `ret == -1 && errno == X`. Each test
gets a fresh daemon; on teardown every VM is freed and the daemon must be empty: no VM, no
ASID in use, no firmware guest, no model warning, and no misc cgroup charge beyond those a
test declares in `kvm.leaked_misc_charges` (the kernel leaks one when a mirror is moved).

Test modules cannot import this file (two conftest.py share the name), so they name these
types `Any`, as tests/kvmstub does for tests/conftest.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import rawkvm
import trio

from kvmstub import client, uapi

KvmstubDaemon = Any  # tests/conftest.py's class

SETTLE_TIMEOUT = 10.0
"""How long the daemon may take to notice closed fds (it sees a hangup, then releases)."""


async def ioctl_errno(call: Awaitable[object]) -> int:
    """0 if the ioctl succeeded, else its errno: the C's `ret == -1 && errno == X`."""
    try:
        await call
    except OSError as e:
        assert e.errno is not None, f"an OSError without errno: {e!r}"
        return e.errno
    return 0


class KvmVm:
    """struct kvm_vm of the selftest library: a VM fd, its vCPU fds and kvmstub's id for it
    (what `kvmstub stats` calls it)."""

    def __init__(self, vm: client.Vm, vm_id: int) -> None:
        self.vm = vm
        self.id = vm_id
        self.vcpus: list[client.Vcpu] = []

    @property
    def fd(self) -> int:
        """vm->fd: what `__vm_enable_cap(dst, cap, src->fd)` passes."""
        return self.vm.fileno()

    @property
    def freed(self) -> bool:
        return self.vm.closed

    async def vcpu_add(self, vcpu_id: int) -> client.Vcpu:
        """__vm_vcpu_add: KVM_CREATE_VCPU; the vCPU fd stays open until `free`."""
        vcpu = await self.vm.create_vcpu(vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    async def sev_ioctl(self, cmd: int, **fields: int | bytes) -> dict[str, int | bytes]:
        """vm_sev_ioctl: the command must succeed. No fields is the C's NULL `data`."""
        if not fields:
            return await self.vm.sev_ioctl(cmd, null_data=True)
        struct: dict[str, Any] = fields  # (mypy: none of them is `null_data`)
        return await self.vm.sev_ioctl(cmd, **struct)

    async def try_sev_ioctl(self, cmd: int, **fields: int | bytes) -> int:
        """__vm_sev_ioctl: 0 or the errno. No fields is the C's NULL `data`."""
        return await ioctl_errno(self.sev_ioctl(cmd, **fields))

    async def enable_cap(self, cap: int, *args: int | client.Vm) -> None:
        """vm_enable_cap: KVM_ENABLE_CAP must succeed."""
        await self.vm.enable_cap(cap, *args)

    async def try_enable_cap(self, cap: int, *args: int | client.Vm) -> int:
        """__vm_enable_cap: 0 or the errno. For MOVE/COPY, args[0] is the source's fd."""
        return await ioctl_errno(self.vm.enable_cap(cap, *args))

    async def sev_vm_init(self) -> None:
        """sev_vm_init for the default VM type: open /dev/sev, KVM_SEV_INIT."""
        await self.sev_ioctl(uapi.KVM_SEV_INIT)

    async def sev_es_vm_init(self) -> None:
        """sev_es_vm_init for the default VM type: KVM_SEV_ES_INIT."""
        await self.sev_ioctl(uapi.KVM_SEV_ES_INIT)

    async def sev_vm_launch(self, policy: int) -> None:
        """sev_vm_launch (lib/x86/sev.c): LAUNCH_START; GUEST_STATUS must echo the policy
        and be in LAUNCH_UPDATE; no memslots to encrypt; LAUNCH_UPDATE_VMSA if ES."""
        await self.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
        status = await self.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0)
        assert status["policy"] == policy
        assert status["state"] == uapi.SEV_GUEST_STATE_LUPDATE
        if policy & uapi.SEV_POLICY_ES:
            await self.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)

    def free(self) -> None:
        """kvm_vm_free: close the vCPU fds and the VM fd. No ioctl is issued, so a dead VM
        frees like any other. kvmstub releases the VM when its last reference goes."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()

    def __repr__(self) -> str:
        return f"<KvmVm id={self.id} vcpus={len(self.vcpus)}{' freed' if self.freed else ''}>"


class SelftestKvm:
    """One open /dev/kvm (a kvmstub connection), the VMs made through it, and the
    daemon's statistics."""

    def __init__(self, daemon: KvmstubDaemon, kvm: client.Kvm) -> None:
        self.daemon = daemon
        self.client = kvm
        self.vms: list[KvmVm] = []
        # misc cgroup charges the kernel never gives back (see test_sev_move_copy): the
        # emptiness check expects exactly these once every fd is closed.
        self.leaked_misc_charges = {"sev": 0, "sev_es": 0}

    async def vm_create_barebones(self) -> KvmVm:
        """vm_create_barebones: KVM_CREATE_VM of the default type, no memslots, no vCPUs.
        kvmstub's id for it is the one VM id the daemon did not have before."""
        before = {vm["id"] for vm in (await self.stats())["vms"]}
        vm = await self.client.create_vm()
        new = {vm["id"] for vm in (await self.stats())["vms"]} - before
        assert len(new) == 1, f"cannot tell which VM is new: {sorted(new)}"
        kvm_vm = KvmVm(vm, new.pop())
        self.vms.append(kvm_vm)
        return kvm_vm

    async def stats(self) -> dict[str, Any]:
        """`kvmstub stats --json`."""
        return await self.client.stats()

    async def vm_stats(self, vm: KvmVm) -> dict[str, Any] | None:
        """kvmstub's view of `vm` (mode, asid, dead, owner, mirrors, refcount, vCPUs), or
        None once it is destroyed."""
        for info in (await self.stats())["vms"]:
            if info["id"] == vm.id:
                return dict(info)
        return None

    async def settle(
        self, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Poll the statistics until `predicate` holds (the daemon releases closed fds
        asynchronously); returns them. Fails after SETTLE_TIMEOUT seconds."""
        with trio.move_on_after(SETTLE_TIMEOUT):
            while True:
                stats = await self.stats()
                if predicate(stats):
                    return stats
                await trio.sleep(0.005)
        raise AssertionError(f"kvmstub never got to: {what}\nlast stats: {stats}")

    async def settle_refcount(self, vm: KvmVm, refcount: int) -> dict[str, Any]:
        """Wait until `vm` holds exactly `refcount` references; returns its statistics."""

        def reached(stats: dict[str, Any]) -> bool:
            return any(v["id"] == vm.id and v["refcount"] == refcount for v in stats["vms"])

        stats = await self.settle(reached, f"VM {vm.id} with refcount {refcount}")
        return next(v for v in stats["vms"] if v["id"] == vm.id)

    async def settle_gone(self, *vms: KvmVm) -> dict[str, Any]:
        """Wait until every VM in `vms` is destroyed; returns the statistics."""
        ids = {vm.id for vm in vms}
        return await self.settle(
            lambda stats: not ids & {v["id"] for v in stats["vms"]},
            f"VMs {sorted(ids)} destroyed",
        )

    async def settle_empty(self) -> dict[str, Any]:
        """Wait until the daemon holds no VM; returns the statistics."""
        return await self.settle(lambda stats: not stats["vms"], "no VM left")

    async def assert_nothing_left(self) -> None:
        """Once every fd is closed: no VM, ASID, firmware guest or cgroup charge remains."""
        assert_nothing_left(await self.settle_empty(), self.leaked_misc_charges)

    async def have_sev_es(self) -> bool:
        """The C's `have_sev_es = kvm_cpu_has(X86_FEATURE_SEV_ES)`: SEV-ES ASIDs exist."""
        return bool((await self.stats())["asids"]["sev_es"]["total"])


def assert_nothing_left(stats: dict[str, Any], leaked_misc_charges: dict[str, int]) -> None:
    """All fds are closed: no VM, ASID, firmware guest or model warning remains, and the
    misc cgroups hold only the charges the kernel is known to leak."""
    assert stats["vms"] == []
    assert stats["asids"]["sev"]["used"] == 0
    assert stats["asids"]["sev_es"]["used"] == 0
    assert stats["firmware_guests"] == 0
    for cgroup, usage in stats["misc_cgroups"].items():
        assert usage == leaked_misc_charges, f"misc cgroup {cgroup}: unexpected charges"
    assert stats["warnings"] == []


@pytest.fixture
async def kvm(kvmstub_daemon: KvmstubDaemon) -> AsyncIterator[SelftestKvm]:
    """/dev/kvm of a fresh daemon that must support MOVE and COPY (the C's TEST_REQUIRE).
    On teardown: every VM freed, then nothing may be left in the daemon."""
    kvm = SelftestKvm(kvmstub_daemon, await client.open_kvm(kvmstub_daemon.socket))
    assert await kvm.client.check_extension(uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM) > 0
    assert await kvm.client.check_extension(uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM) > 0
    try:
        yield kvm
    finally:
        for vm in kvm.vms:
            vm.free()
    await kvm.assert_nothing_left()
    kvm.client.close()
    assert kvmstub_daemon.alive(), "the kvmstub daemon died during the test"


@pytest.fixture
def real_kvm() -> Iterator[rawkvm.RealKvm]:
    """The host's real /dev/kvm (raw ioctls, tests/kernel/rawkvm.py); the test is skipped
    where it is missing or KVM_CREATE_VM fails. Every fd made through it is closed after."""
    kvm = rawkvm.usable_kvm()
    if isinstance(kvm, str):
        pytest.skip(f"no usable /dev/kvm here: {kvm}")
    try:
        yield kvm
    finally:
        kvm.close()
