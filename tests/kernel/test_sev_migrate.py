"""The kernel's `tools/testing/selftests/kvm/x86/sev_migrate_tests.c`, ported line by line, run
against a real kvmstub daemon over real fds through `kvmstub.client` (reference
kernel-sev-migration.md section 5).

The helpers keep the C names and shapes (`sev_vm_create(es)`, `aux_vm_create(with_vcpus)`,
`__sev_migrate_from` returning the errno, `sev_migrate_from` asserting success, ...), and each
C test is one Python test, so the two files can be read side by side:

    C function                      Python test (the C name, then what it proves)
    main: TEST_REQUIRE(caps)        the `kvm` fixture (tests/kernel/conftest.py)
    test_sev_migrate_from(es)       test_sev_migrate_from_moves_down_a_chain_and_the_dead_
                                        source_gives_eio[sev], [sev-es]
    test_sev_migrate_locking()      test_sev_migrate_locking_never_deadlocks_nor_changes_state
    test_sev_migrate_parameters()   test_sev_migrate_parameters_refusals_are_einval_and_
                                        change_nothing
    test_sev_move_copy()            test_sev_move_copy_mirrors_follow_their_owner_and_any_
                                        free_order_is_safe (parts 1 and 2)
    test_sev_mirror(es)             test_sev_mirror_shares_the_asid_and_allows_only_four_
                                        commands[sev], [sev-es]
    test_sev_mirror_parameters()    test_sev_mirror_parameters_refusals_are_einval_and_
                                        change_nothing
    (not in the C; reference        test_copy_and_move_refuse_mirrors_dead_vms_and_non_vm_fds
     sections 1, 3 and 7)           test_move_checks_come_in_the_kernels_order

Every failure the C expects (`ret == -1 && errno == X`) is asserted with the same errno. On
top, kvmstub's statistics let each test check what the C cannot see: which VM holds the
context and its ASID, that a moved-from VM is dead, a mirror's owner and the owner's mirror
list, that a mirror or a move never takes a second ASID, that a failed call changed nothing,
and (in the `kvm` fixture's teardown) that nothing is left once every fd is closed.

Deliberate differences from the C: the locking test runs 3000 iterations per thread instead of
10000 (the daemon answers one request at a time, so more only costs time), and its threads
each run their own trio loop in this process, as the C's pthreads share one mm.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import pytest
import trio

from kvmstub import client, uapi

SelftestKvm = Any  # tests/kernel/conftest.py
KvmVm = Any  # tests/kernel/conftest.py

NR_MIGRATE_TEST_VCPUS = 4
NR_MIGRATE_TEST_VMS = 3
NR_LOCK_TESTING_THREADS = 3
NR_LOCK_TESTING_ITERATIONS = 3000  # the C runs 10000

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM

# The commands a mirror may issue (reference section 3).
MIRROR_ALLOWED_CMDS = (
    uapi.KVM_SEV_LAUNCH_UPDATE_VMSA,
    uapi.KVM_SEV_GUEST_STATUS,
    uapi.KVM_SEV_DBG_DECRYPT,
    uapi.KVM_SEV_DBG_ENCRYPT,
)

es_param = pytest.mark.parametrize("es", [False, True], ids=["sev", "sev-es"])


# --- the C file's static helpers -----------------------------------------------------------


async def sev_vm_create(kvm: SelftestKvm, es: bool) -> KvmVm:
    vm = await kvm.vm_create_barebones()
    if not es:
        await vm.sev_vm_init()
    else:
        await vm.sev_es_vm_init()

    for i in range(NR_MIGRATE_TEST_VCPUS):
        await vm.vcpu_add(i)

    await vm.sev_vm_launch(uapi.SEV_POLICY_ES if es else 0)

    if es:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    return vm


async def aux_vm_create(kvm: SelftestKvm, with_vcpus: bool) -> KvmVm:
    vm = await kvm.vm_create_barebones()
    if not with_vcpus:
        return vm

    for i in range(NR_MIGRATE_TEST_VCPUS):
        await vm.vcpu_add(i)

    return vm


async def __sev_migrate_from(dst: KvmVm, src: KvmVm) -> int:
    return int(await dst.try_enable_cap(MOVE, src.fd))


async def sev_migrate_from(dst: KvmVm, src: KvmVm) -> None:
    ret = await __sev_migrate_from(dst, src)
    assert ret == 0, f"Migration failed, errno: {errno.errorcode.get(ret, ret)}"


async def __sev_mirror_create(dst: KvmVm, src: KvmVm) -> int:
    return int(await dst.try_enable_cap(COPY, src.fd))


async def sev_mirror_create(dst: KvmVm, src: KvmVm) -> None:
    ret = await __sev_mirror_create(dst, src)
    assert ret == 0, f"Copying context failed, errno: {errno.errorcode.get(ret, ret)}"


async def verify_mirror_allowed_cmds(vm: KvmVm) -> None:
    for cmd_id in range(uapi.KVM_SEV_INIT, uapi.KVM_SEV_NR_MAX):
        # These commands are allowed for mirror VMs, all others are not.
        if cmd_id in MIRROR_ALLOWED_CMDS:
            continue

        # These commands should be disallowed before the data parameter is examined so
        # NULL is OK here.
        ret = await vm.try_sev_ioctl(cmd_id)
        assert ret == errno.EINVAL, f"Should not be able call command: {cmd_id}. errno: {ret}"

    await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0)


# --- what kvmstub's statistics show (no C counterpart) -------------------------------------


async def context_of(kvm: SelftestKvm, vm: KvmVm) -> tuple[str, int, bool]:
    """(mode, ASID, dead) of a VM as kvmstub sees it."""
    info = await kvm.vm_stats(vm)
    assert info is not None, f"{vm} is gone"
    return info["mode"], info["asid"], info["dead"]


async def asids_used(kvm: SelftestKvm) -> tuple[int, int]:
    """(SEV ASIDs, SEV-ES ASIDs) in use."""
    asids = (await kvm.stats())["asids"]
    return asids["sev"]["used"], asids["sev_es"]["used"]


def one_asid(es: bool) -> tuple[int, int]:
    return (0, 1) if es else (1, 0)


# --- the tests -----------------------------------------------------------------------------


@es_param
async def test_sev_migrate_from_moves_down_a_chain_and_the_dead_source_gives_eio(
    kvm: SelftestKvm, es: bool
) -> None:
    """A context moves down a chain of VMs with the same ASID, each source dies, and moving
    into the dead original source fails with EIO (the vm_dead gate, mainline)."""
    if es and not await kvm.have_sev_es():
        pytest.skip("no SEV-ES")
    mode = "sev-es" if es else "sev"

    src_vm = await sev_vm_create(kvm, es)
    asid = (await context_of(kvm, src_vm))[1]
    dst_vms = [await aux_vm_create(kvm, True) for _ in range(NR_MIGRATE_TEST_VMS)]

    await sev_migrate_from(dst_vms[0], src_vm)
    assert await context_of(kvm, src_vm) == ("plain", 0, True)
    assert await context_of(kvm, dst_vms[0]) == (mode, asid, False)
    for i in range(1, NR_MIGRATE_TEST_VMS):
        await sev_migrate_from(dst_vms[i], dst_vms[i - 1])
        assert await context_of(kvm, dst_vms[i - 1]) == ("plain", 0, True)
        assert await context_of(kvm, dst_vms[i]) == (mode, asid, False)
        assert await asids_used(kvm) == one_asid(es)

    # Migrate the guest back to the original VM.
    ret = await __sev_migrate_from(src_vm, dst_vms[NR_MIGRATE_TEST_VMS - 1])
    assert ret == errno.EIO, f"VM that was migrated from should be dead. errno: {ret}"
    assert await context_of(kvm, dst_vms[-1]) == (mode, asid, False)

    # SEV-ES: each vCPU's VMSA went with the context; the dead sources' vCPUs have none.
    if es:
        holder = await kvm.vm_stats(dst_vms[-1])
        assert holder is not None
        assert [v["protected"] for v in holder["vcpus"]] == [True] * NR_MIGRATE_TEST_VCPUS
        for dead in (src_vm, *dst_vms[:-1]):
            info = await kvm.vm_stats(dead)
            assert info is not None
            assert not any(v["protected"] for v in info["vcpus"])

    src_vm.free()
    for i in range(NR_MIGRATE_TEST_VMS):
        dst_vms[i].free()
    await kvm.assert_nothing_left()


async def test_sev_migrate_locking_never_deadlocks_nor_changes_state(kvm: SelftestKvm) -> None:
    """Three threads hammering moves between three SEV VMs never deadlock, never crash the
    daemon and never change anything: every call fails (self, or destination already SEV,
    or contention), every VM keeps its own context and ASID, and no lock stays held."""
    vms = [await sev_vm_create(kvm, False) for _ in range(NR_LOCK_TESTING_THREADS)]
    before = [await context_of(kvm, vm) for vm in vms]
    source_fds = [vm.fd for vm in vms]
    results: list[dict[int, int]] = [{} for _ in range(NR_LOCK_TESTING_THREADS)]

    async def locking_test_thread(vm_fd: int, errnos: dict[int, int]) -> None:
        # This thread's own copy of its VM fd, used by this thread's trio loop only.
        vm = client.Vm.from_fd(os.dup(vm_fd))
        try:
            with trio.fail_after(60):  # a deadlock fails the test instead of hanging it
                for i in range(NR_LOCK_TESTING_ITERATIONS):
                    j = i % NR_LOCK_TESTING_THREADS
                    ret = await ioctl_errno(vm.enable_cap(MOVE, source_fds[j]))
                    errnos[ret] = errnos.get(ret, 0) + 1
        finally:
            vm.close()

    def thread_main(vm: KvmVm, errnos: dict[int, int]) -> None:
        trio.run(locking_test_thread, vm.fd, errnos)

    threads = [
        threading.Thread(target=thread_main, args=(vms[i], results[i]), daemon=True)
        for i in range(NR_LOCK_TESTING_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        await trio.to_thread.run_sync(thread.join, 90)
        assert not thread.is_alive(), "a locking thread is stuck: deadlock"

    for errnos in results:
        assert sum(errnos.values()) == NR_LOCK_TESTING_ITERATIONS, errnos
        assert set(errnos) <= {errno.EINVAL, errno.EBUSY}, errnos
    assert kvm.daemon.alive()
    assert [await context_of(kvm, vm) for vm in vms] == before
    assert all(mode == "sev" and asid and not dead for mode, asid, dead in before)
    assert len({asid for _, asid, _ in before}) == NR_LOCK_TESTING_THREADS
    assert await asids_used(kvm) == (NR_LOCK_TESTING_THREADS, 0)

    # No lock was left behind (a stuck migration_in_progress would answer EBUSY for ever):
    # each VM still moves.
    for vm, (_, asid, _) in zip(vms, before, strict=True):
        dst = await aux_vm_create(kvm, True)
        await sev_migrate_from(dst, vm)
        assert await context_of(kvm, dst) == ("sev", asid, False)

    for vm in vms:
        vm.free()


async def test_sev_migrate_parameters_refusals_are_einval_and_change_nothing(
    kvm: SelftestKvm,
) -> None:
    """Every refused move gives EINVAL and changes nothing: a source without SEV, a
    destination already SEV (either way round), an SEV-ES vCPU count mismatch, and an SEV-ES
    source whose vCPUs have no VMSA."""
    vm_no_vcpu = await kvm.vm_create_barebones()
    vm_no_sev = await aux_vm_create(kvm, True)
    ret = await __sev_migrate_from(vm_no_vcpu, vm_no_sev)
    assert ret == errno.EINVAL, f"Migrations require SEV enabled. errno: {ret}"

    if await kvm.have_sev_es():
        sev_vm = await sev_vm_create(kvm, False)
        sev_es_vm = await sev_vm_create(kvm, True)
        sev_es_vm_no_vmsa = await kvm.vm_create_barebones()
        await sev_es_vm_no_vmsa.sev_es_vm_init()
        await sev_es_vm_no_vmsa.vcpu_add(1)
        before = [
            await context_of(kvm, vm)
            for vm in (vm_no_vcpu, vm_no_sev, sev_vm, sev_es_vm, sev_es_vm_no_vmsa)
        ]

        ret = await __sev_migrate_from(sev_vm, sev_es_vm)
        assert ret == errno.EINVAL, f"Should not be able migrate to SEV enabled VM. errno: {ret}"

        ret = await __sev_migrate_from(sev_es_vm, sev_vm)
        assert ret == errno.EINVAL, f"Should not be able migrate to SEV enabled VM. errno: {ret}"

        ret = await __sev_migrate_from(vm_no_vcpu, sev_es_vm)
        assert ret == errno.EINVAL, f"SEV-ES migrations require same number of vCPUS. {ret}"

        ret = await __sev_migrate_from(vm_no_vcpu, sev_es_vm_no_vmsa)
        assert ret == errno.EINVAL, f"SEV-ES migrations require UPDATE_VMSA. errno: {ret}"

        # Not in the C: with the counts equal (1 and 1), the missing VMSA alone is refused
        # (reference section 1 step 8d; step 6 above is refused by the count, 8c).
        vm_one_vcpu = await kvm.vm_create_barebones()
        await vm_one_vcpu.vcpu_add(0)
        ret = await __sev_migrate_from(vm_one_vcpu, sev_es_vm_no_vmsa)
        assert ret == errno.EINVAL, f"SEV-ES migrations require UPDATE_VMSA. errno: {ret}"
        assert await context_of(kvm, vm_one_vcpu) == ("plain", 0, False)

        after = [
            await context_of(kvm, vm)
            for vm in (vm_no_vcpu, vm_no_sev, sev_vm, sev_es_vm, sev_es_vm_no_vmsa)
        ]
        assert after == before, "a refused move changed a VM"
        assert await asids_used(kvm) == (1, 2)

        sev_vm.free()
        sev_es_vm.free()
        sev_es_vm_no_vmsa.free()
        vm_one_vcpu.free()

    vm_no_vcpu.free()
    vm_no_sev.free()
    await kvm.assert_nothing_left()


@es_param
async def test_sev_mirror_shares_the_asid_and_allows_only_four_commands(
    kvm: SelftestKvm, es: bool
) -> None:
    """A mirror shares its owner's context and ASID without taking one, can finish its own
    vCPUs (LAUNCH_UPDATE_VMSA for SEV-ES), is refused with EINVAL every command outside the
    allowlist {LAUNCH_UPDATE_VMSA, GUEST_STATUS, DBG_DECRYPT, DBG_ENCRYPT} before its data is
    read, and keeps the owner alive after the owner's fd is closed."""
    if es and not await kvm.have_sev_es():
        pytest.skip("no SEV-ES")

    src_vm = await sev_vm_create(kvm, es)
    dst_vm = await aux_vm_create(kvm, False)

    await sev_mirror_create(dst_vm, src_vm)

    # Check that we can complete creation of the mirror VM.
    for i in range(NR_MIGRATE_TEST_VCPUS):
        await dst_vm.vcpu_add(i)

    if es:
        await dst_vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)

    await verify_mirror_allowed_cmds(dst_vm)

    # What the C cannot see: the mirror shares the owner's ASID and handle, took no ASID
    # of its own, and pins the owner (fd + vCPUs + the mirror's reference).
    owner = await kvm.vm_stats(src_vm)
    mirror = await kvm.vm_stats(dst_vm)
    assert owner is not None and mirror is not None
    assert mirror["mode"] == "mirror" and mirror["owner"] == src_vm.id
    assert (mirror["asid"], mirror["handle"]) == (owner["asid"], owner["handle"])
    assert owner["mirrors"] == [dst_vm.id]
    assert owner["refcount"] == 1 + NR_MIGRATE_TEST_VCPUS + 1
    assert await asids_used(kvm) == one_asid(es)
    if es:
        assert all(v["protected"] for v in mirror["vcpus"])

    src_vm.free()
    # The owner's fds are closed, but the mirror still holds it: context and ASID stay.
    owner = await kvm.settle_refcount(src_vm, 1)
    assert owner["asid"] == mirror["asid"] and owner["mirrors"] == [dst_vm.id]
    assert await asids_used(kvm) == one_asid(es)
    await dst_vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, handle=0)

    dst_vm.free()
    await kvm.assert_nothing_left()


async def test_sev_mirror_parameters_refusals_are_einval_and_change_nothing(
    kvm: SelftestKvm,
) -> None:
    """Every refused COPY gives EINVAL and changes nothing: to itself, from a VM without
    SEV, into a VM with vCPUs, and into a VM already SEV or SEV-ES."""
    sev_vm = await sev_vm_create(kvm, False)
    vm_with_vcpu = await aux_vm_create(kvm, True)
    vm_no_vcpu = await aux_vm_create(kvm, False)
    before = [await context_of(kvm, vm) for vm in (sev_vm, vm_with_vcpu, vm_no_vcpu)]

    ret = await __sev_mirror_create(sev_vm, sev_vm)
    assert ret == errno.EINVAL, f"Should not be able copy context to self. errno: {ret}"

    ret = await __sev_mirror_create(vm_no_vcpu, vm_with_vcpu)
    assert ret == errno.EINVAL, f"Copy context requires SEV enabled. errno: {ret}"

    ret = await __sev_mirror_create(vm_with_vcpu, sev_vm)
    assert ret == errno.EINVAL, f"SEV copy context requires no vCPUS on the destination. {ret}"

    if await kvm.have_sev_es():
        sev_es_vm = await sev_vm_create(kvm, True)
        es_before = await context_of(kvm, sev_es_vm)

        ret = await __sev_mirror_create(sev_vm, sev_es_vm)
        assert ret == errno.EINVAL, f"Should not be able copy context to SEV enabled VM. {ret}"

        ret = await __sev_mirror_create(sev_es_vm, sev_vm)
        assert ret == errno.EINVAL, f"Should not be able copy context to SEV-ES enabled VM. {ret}"

        assert await context_of(kvm, sev_es_vm) == es_before
        sev_es_vm.free()

    after = [await context_of(kvm, vm) for vm in (sev_vm, vm_with_vcpu, vm_no_vcpu)]
    assert after == before, "a refused copy changed a VM"
    info = await kvm.vm_stats(sev_vm)
    assert info is not None and info["mirrors"] == []

    sev_vm.free()
    vm_with_vcpu.free()
    vm_no_vcpu.free()
    await kvm.assert_nothing_left()


async def test_sev_move_copy_mirrors_follow_their_owner_and_any_free_order_is_safe(
    kvm: SelftestKvm,
) -> None:
    """Mirrors and owners move independently: a mirror moves and stays its owner's mirror,
    an owner moves and takes its mirror list, and teardown is safe in either order (owner
    fds first, part 1; mirrors first, part 2) with one ASID throughout, freed last."""
    # Part 1.
    sev_vm = await sev_vm_create(kvm, False)
    dst_vm = await aux_vm_create(kvm, True)
    dst2_vm = await aux_vm_create(kvm, True)
    dst3_vm = await aux_vm_create(kvm, True)
    mirror_vm = await aux_vm_create(kvm, False)
    dst_mirror_vm = await aux_vm_create(kvm, False)
    dst2_mirror_vm = await aux_vm_create(kvm, False)
    dst3_mirror_vm = await aux_vm_create(kvm, False)
    asid = (await context_of(kvm, sev_vm))[1]

    async def assert_owner(owner: KvmVm, mirror: KvmVm) -> None:
        """`mirror` is the only mirror of `owner`, and both hold the one ASID."""
        o, m = await kvm.vm_stats(owner), await kvm.vm_stats(mirror)
        assert o is not None and m is not None
        assert (o["mode"], o["asid"], o["mirrors"]) == ("sev", asid, [mirror.id])
        assert (m["mode"], m["asid"], m["owner"]) == ("mirror", asid, owner.id)
        assert await asids_used(kvm) == (1, 0)

    await sev_mirror_create(mirror_vm, sev_vm)
    await assert_owner(sev_vm, mirror_vm)

    await sev_migrate_from(dst_mirror_vm, mirror_vm)
    await assert_owner(sev_vm, dst_mirror_vm)
    assert await context_of(kvm, mirror_vm) == ("plain", 0, True)
    await sev_migrate_from(dst_vm, sev_vm)
    await assert_owner(dst_vm, dst_mirror_vm)
    assert await context_of(kvm, sev_vm) == ("plain", 0, True)

    await sev_migrate_from(dst2_vm, dst_vm)
    await assert_owner(dst2_vm, dst_mirror_vm)
    await sev_migrate_from(dst2_mirror_vm, dst_mirror_vm)
    await assert_owner(dst2_vm, dst2_mirror_vm)

    await sev_migrate_from(dst3_mirror_vm, dst2_mirror_vm)
    await assert_owner(dst2_vm, dst3_mirror_vm)
    await sev_migrate_from(dst3_vm, dst2_vm)
    await assert_owner(dst3_vm, dst3_mirror_vm)

    dst_vm.free()
    sev_vm.free()
    dst2_vm.free()
    dst3_vm.free()
    # dst3's fds are closed, but dst3_mirror pins it: the context and ASID live on.
    owner = await kvm.settle_refcount(dst3_vm, 1)
    assert (owner["asid"], owner["mirrors"]) == (asid, [dst3_mirror_vm.id])
    await kvm.settle_gone(dst_vm, sev_vm, dst2_vm)
    mirror_vm.free()
    dst_mirror_vm.free()
    dst2_mirror_vm.free()
    await kvm.settle_gone(mirror_vm, dst_mirror_vm, dst2_mirror_vm)
    assert await asids_used(kvm) == (1, 0)
    dst3_mirror_vm.free()  # its destruction finally destroys dst3
    # The kernel's cgroup accounting leaks here, and kvmstub follows it: MOVE charges the
    # destination when the caller's misc cgroup differs from the source's, and a mirror has
    # none (NULL), so moving `mirror_vm` charged dst_mirror_vm; later mirror moves carry
    # that charge, and sev_vm_destroy of a mirror returns before any uncharge. One SEV
    # charge per chain of mirror moves stays with the cgroup (reference section 1 step 6).
    kvm.leaked_misc_charges["sev"] += 1
    await kvm.assert_nothing_left()

    # Run a similar test but destroy mirrors before mirrored VMs to ensure destruction is
    # done safely.
    sev_vm = await sev_vm_create(kvm, False)
    dst_vm = await aux_vm_create(kvm, True)
    mirror_vm = await aux_vm_create(kvm, False)
    dst_mirror_vm = await aux_vm_create(kvm, False)
    asid = (await context_of(kvm, sev_vm))[1]

    await sev_mirror_create(mirror_vm, sev_vm)

    await sev_migrate_from(dst_mirror_vm, mirror_vm)
    await sev_migrate_from(dst_vm, sev_vm)
    await assert_owner(dst_vm, dst_mirror_vm)

    mirror_vm.free()
    dst_mirror_vm.free()
    await kvm.settle_gone(mirror_vm, dst_mirror_vm)
    info = await kvm.vm_stats(dst_vm)
    assert info is not None and (info["asid"], info["mirrors"]) == (asid, [])
    dst_vm.free()
    sev_vm.free()
    kvm.leaked_misc_charges["sev"] += 1  # the mirror move leaks one SEV charge, as above
    await kvm.assert_nothing_left()


# --- small utilities ----------------------------------------------------------------------


async def ioctl_errno(call: Any) -> int:
    """0 if the ioctl succeeded, else its errno."""
    try:
        await call
    except OSError as e:
        assert e.errno is not None
        return e.errno
    return 0


# --- beyond the C: refusals of reference sections 1, 3 and 7 it does not exercise -----------


def closed_fd_number() -> int:
    """A number that is not an open fd of this process."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


async def test_copy_and_move_refuse_mirrors_dead_vms_and_non_vm_fds(kvm: SelftestKvm) -> None:
    """COPY from a mirror (no mirror of a mirror) and from a moved-from VM, and MOVE into a
    mirror, are EINVAL; a source fd that is not a VM (a memfd) or not open is EBADF; a
    mirror may not register or unregister encrypted regions (EINVAL). Nothing changes."""
    sev_vm = await sev_vm_create(kvm, False)
    mirror_vm = await aux_vm_create(kvm, False)
    await sev_mirror_create(mirror_vm, sev_vm)
    moved_from = await sev_vm_create(kvm, False)
    holder = await aux_vm_create(kvm, True)
    await sev_migrate_from(holder, moved_from)
    fresh = await aux_vm_create(kvm, False)
    vms = (sev_vm, mirror_vm, moved_from, holder, fresh)
    before = [await kvm.vm_stats(vm) for vm in vms]

    assert await __sev_mirror_create(fresh, mirror_vm) == errno.EINVAL
    assert await __sev_migrate_from(mirror_vm, holder) == errno.EINVAL
    assert await __sev_mirror_create(fresh, moved_from) == errno.EINVAL

    memfd = os.memfd_create("not-a-vm", os.MFD_CLOEXEC)
    try:
        for cap in (MOVE, COPY):
            assert await fresh.try_enable_cap(cap, memfd) == errno.EBADF
            assert await fresh.try_enable_cap(cap, closed_fd_number()) == errno.EBADF
    finally:
        os.close(memfd)

    reg = mirror_vm.vm.memory_encrypt_reg_region(0, uapi.PAGE_SIZE)
    assert await ioctl_errno(reg) == errno.EINVAL
    unreg = mirror_vm.vm.memory_encrypt_unreg_region(0, uapi.PAGE_SIZE)
    assert await ioctl_errno(unreg) == errno.EINVAL

    assert [await kvm.vm_stats(vm) for vm in vms] == before, "a refusal changed a VM"


async def test_move_checks_come_in_the_kernels_order(kvm: SelftestKvm) -> None:
    """With several faults at once the first check wins (reference section 7): the
    destination gate (dead: EIO) before the flags (EINVAL) before the source fd (EBADF)
    before the SEV checks (EINVAL)."""
    moved_from = await sev_vm_create(kvm, False)
    holder = await aux_vm_create(kvm, True)
    await sev_migrate_from(holder, moved_from)
    plain = await aux_vm_create(kvm, False)
    memfd = os.memfd_create("not-a-vm", os.MFD_CLOEXEC)
    try:
        for cap in (MOVE, COPY):
            # dead destination, flags set, source not a VM: the gate
            call = moved_from.vm.enable_cap(cap, memfd, flags=1)
            assert await ioctl_errno(call) == errno.EIO
            # live destination, flags set, source not a VM: the flags
            assert await ioctl_errno(plain.vm.enable_cap(cap, memfd, flags=1)) == errno.EINVAL
            # destination already SEV, source not a VM: the fd
            assert await holder.try_enable_cap(cap, memfd) == errno.EBADF
    finally:
        os.close(memfd)
