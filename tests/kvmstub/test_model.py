"""Unit tests of kvmstub.model: the kernel's KVM + SEV rules driven directly, no daemon.

Helpers follow the kernel selftest (sev_migrate_tests.c) so a reader can hold them side by
side: `sev_vm_create`, `aux_vm_create`, `migrate`, `mirror`. The first part needs no guest
memory; the part after "Guest memory and KVM_RUN" maps memfds and runs the guest program.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from kvmstub import guest, uapi
from kvmstub.memory import xts_decrypt
from kvmstub.model import (
    FIRMWARE_TRANSITIONS,
    KVM_EXIT_FAIL_ENTRY,
    KVM_MAX_VCPU_IDS,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    MIRROR_ALLOWED_CMDS,
    Host,
    SevFwError,
    Vm,
)
from kvmstub.uapi import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
    KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM,
    PAGE_SIZE,
    Regs,
)

PID = 1000  # the VMM that creates the VMs
OTHER = 2000  # another process holding the same fds
NR_VCPUS = 4  # NR_MIGRATE_TEST_VCPUS
MOVE = KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
ES = uapi.SEV_POLICY_ES


# --------------------------------------------------------------------------------------------
# helpers


class FakeClock:
    """A monotonic clock that advances 1 us per reading: runs are deterministic."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


def make_host(**kwargs: Any) -> Host:
    kwargs.setdefault("clock", FakeClock())
    return Host(**kwargs)


def sev(vm: Vm, cmd: int, fields: dict[str, int | bytes] | None = None) -> dict[str, int | bytes]:
    return vm.sev_ioctl(PID, cmd, fields)


def sev_vm_create(host: Host, es: bool, *, vcpus: int = NR_VCPUS, policy: int | None = None) -> Vm:
    """The selftest's sev_vm_create: INIT, vCPUs, LAUNCH_START, GUEST_STATUS, and for ES
    LAUNCH_UPDATE_VMSA twice (once in sev_vm_launch, once more in sev_vm_create)."""
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_ES_INIT if es else uapi.KVM_SEV_INIT)
    for i in range(vcpus):
        vm.create_vcpu(PID, i)
    want = (ES if es else 0) if policy is None else policy
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"handle": 0, "policy": want})
    status = sev(vm, uapi.KVM_SEV_GUEST_STATUS, {})
    assert status["policy"] == want
    assert status["state"] == uapi.SEV_GUEST_STATE_LUPDATE
    if es:
        sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    return vm


def aux_vm_create(host: Host, with_vcpus: bool, *, vcpus: int = NR_VCPUS, mm: int = PID) -> Vm:
    vm = host.create_vm(mm)
    for i in range(vcpus if with_vcpus else 0):
        vm.create_vcpu(mm, i)
    return vm


def cross_cgroup_host(**kwargs: Any) -> Host:
    """A host where PID runs in misc cgroup /old and PID + 1 in /new."""
    cgroups = {PID: "/old", PID + 1: "/new"}
    return make_host(cgroup_of=lambda mm: cgroups[mm], **kwargs)


def migrate(dst: Vm, src: Vm | int | None, *, mm: int = PID, flags: int = 0) -> int:
    return dst.enable_cap(mm, MOVE, flags, [src])


def mirror(dst: Vm, src: Vm | int | None, *, mm: int = PID, flags: int = 0) -> int:
    return dst.enable_cap(mm, COPY, flags, [src])


def expect_errno(code: int, call: Callable[[], object]) -> OSError:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == code, f"{info.value} (wanted {errno.errorcode[code]})"
    return info.value


def expect_fw(fw_error: int, call: Callable[[], object]) -> SevFwError:
    with pytest.raises(SevFwError) as info:
        call()
    assert info.value.errno == errno.EIO
    assert info.value.fw_error == fw_error, str(info.value)
    return info.value


def free(vm: Vm) -> None:
    """kvm_vm_free: close the VM fd and every vCPU fd, nothing else."""
    for vcpu in list(vm.vcpus):
        if vcpu.fd_open:
            vcpu.put()
    vm.put()


def snapshot(host: Host) -> Any:
    """Everything a MOVE or COPY could change, to prove a failure changed nothing."""
    vms = {}
    for vm in host.vms.values():
        s = vm.sev
        vms[vm.id] = (
            vm.dead,
            vm.refcount,
            vm.created_vcpus,
            vm.online_vcpus,
            s.active,
            s.es_active,
            s.asid,
            s.handle,
            s.fd,
            s.policy,
            s.pages_locked,
            [id(r) for r in s.regions_list],
            [m.id for m in s.mirror_vms],
            s.enc_context_owner.id if s.enc_context_owner else None,
            s.misc_cg,
            s.migration_in_progress,
            s.vmsa_features,
            s.ghcb_version,
            [(v.vcpu_id, id(v.vmsa), v.guest_state_protected, v.regs) for v in vm.vcpus],
        )
    contexts = {h: (c.state, c.asid, c.policy) for h, c in host.firmware.contexts.items()}
    cgroups = {cg: dict(u) for cg, u in host.cgroups.usage.items() if any(u.values())}
    return vms, host.stats()["asids"], cgroups, contexts, list(host.warnings)


# --------------------------------------------------------------------------------------------
# /dev/kvm


def test_api_version_is_12() -> None:
    assert make_host().get_api_version() == 12


def test_check_extension_reports_move_copy_and_the_hypercall_bitmask() -> None:
    host = make_host()
    assert host.check_extension(COPY) == 1
    assert host.check_extension(MOVE) == 1
    assert host.check_extension(KVM_CAP_EXIT_HYPERCALL) == 1 << uapi.KVM_HC_MAP_GPA_RANGE
    assert host.check_extension(123456) == 0


def test_default_asid_pool_is_an_epyc_milan_split() -> None:
    asids = make_host().stats()["asids"]
    assert asids["sev_es"]["total"] == 99
    assert asids["sev"]["total"] == 410
    assert asids["sev"]["free"] == 410


def test_create_vm_accepts_default_and_sev_types_and_refuses_the_rest() -> None:
    host = make_host()
    assert host.create_vm(PID).vm_type == 0
    assert host.create_vm(PID, KVM_X86_SEV_VM).vm_type == KVM_X86_SEV_VM
    assert host.create_vm(PID, KVM_X86_SEV_ES_VM).vm_type == KVM_X86_SEV_ES_VM
    expect_errno(errno.EINVAL, lambda: host.create_vm(PID, 1))  # SW_PROTECTED
    expect_errno(errno.EINVAL, lambda: host.create_vm(PID, 4))  # SNP
    no_es = make_host(sev_es_asids=0)
    expect_errno(errno.EINVAL, lambda: no_es.create_vm(PID, KVM_X86_SEV_ES_VM))


# --------------------------------------------------------------------------------------------
# the mm / vm_dead gate (reference section 4)


def test_every_vm_and_vcpu_call_from_another_process_is_eio() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False)
    vcpu = vm.vcpus[0]
    calls: list[Callable[[], object]] = [
        lambda: vm.create_vcpu(OTHER, 9),
        lambda: vm.sev_ioctl(OTHER, uapi.KVM_SEV_GUEST_STATUS, {}),
        lambda: vm.enable_cap(OTHER, KVM_CAP_EXIT_HYPERCALL, 0, [0]),
        lambda: vm.set_user_memory_region(OTHER, 0, 0, 0, PAGE_SIZE, -1, 0),
        lambda: vm.reg_region(OTHER, 0, PAGE_SIZE),
        lambda: vm.unreg_region(OTHER, 0, PAGE_SIZE),
        lambda: vcpu.get_regs(OTHER),
        lambda: vcpu.set_regs(OTHER, Regs()),
        lambda: vcpu.run(OTHER),
    ]
    before = snapshot(host)
    for call in calls:
        expect_errno(errno.EIO, call)
    assert snapshot(host) == before


def test_a_moved_from_vm_answers_eio_to_its_own_creator() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    migrate(aux_vm_create(host, True), src)
    assert src.dead
    expect_errno(errno.EIO, lambda: sev(src, uapi.KVM_SEV_GUEST_STATUS, {}))
    expect_errno(errno.EIO, lambda: src.create_vcpu(PID, 7))
    expect_errno(errno.EIO, lambda: src.vcpus[0].get_regs(PID))
    expect_errno(errno.EIO, lambda: src.vcpus[0].run(PID))


# --------------------------------------------------------------------------------------------
# vCPUs


def test_create_vcpu_counts_and_takes_a_vm_reference() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    vcpu = vm.create_vcpu(PID, 5)
    assert (vcpu.vcpu_id, vcpu.index) == (5, 0)
    assert (vm.created_vcpus, vm.online_vcpus, vm.refcount) == (1, 1, 2)
    vm.put()  # the VM fd: the vCPU still holds the VM
    assert vm.id in host.vms
    vcpu.put()
    assert vm.id not in host.vms and vm.destroyed


def test_create_vcpu_refuses_a_duplicate_id_with_eexist() -> None:
    vm = make_host().create_vm(PID)
    vm.create_vcpu(PID, 3)
    expect_errno(errno.EEXIST, lambda: vm.create_vcpu(PID, 3))
    assert (vm.created_vcpus, vm.online_vcpus, vm.refcount) == (1, 1, 2)


@pytest.mark.parametrize("vcpu_id", [KVM_MAX_VCPU_IDS, -1, 1 << 40])
def test_create_vcpu_refuses_an_id_out_of_range_with_einval(vcpu_id: int) -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: vm.create_vcpu(PID, vcpu_id))
    assert vm.created_vcpus == 0


def test_set_regs_then_get_regs_round_trips_for_plain_and_sev() -> None:
    host = make_host()
    for vm in (aux_vm_create(host, True), sev_vm_create(host, es=False)):
        regs = Regs(rax=1, rbx=2, rip=0x1000)
        vm.vcpus[0].set_regs(PID, regs)
        assert vm.vcpus[0].get_regs(PID) == regs


def test_sev_es_registers_are_refused_once_the_vmsa_is_encrypted() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_ES_INIT)
    vcpu = vm.create_vcpu(PID, 0)
    vcpu.set_regs(PID, Regs(rbx=7))
    assert vcpu.get_regs(PID) == Regs(rbx=7)  # not protected yet
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": ES})
    sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert vcpu.guest_state_protected
    assert vcpu.vmsa is not None and vcpu.vmsa.regs == Regs(rbx=7)
    expect_errno(errno.EINVAL, lambda: vcpu.get_regs(PID))
    expect_errno(errno.EINVAL, lambda: vcpu.set_regs(PID, Regs()))


def test_vcpu_put_twice_is_a_programming_error() -> None:
    vm = make_host().create_vm(PID)
    vcpu = vm.create_vcpu(PID, 0)
    vcpu.put()
    with pytest.raises(RuntimeError):
        vcpu.put()


# --------------------------------------------------------------------------------------------
# KVM_ENABLE_CAP basics


def test_enable_cap_with_flags_is_einval_even_before_a_bad_fd() -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: migrate(vm, None, flags=1))
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 1, [0]))


def test_enable_cap_of_an_unknown_capability_is_einval() -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(PID, 99999, 0, [0]))


def test_exit_hypercall_takes_only_the_map_gpa_range_bit_and_is_remembered() -> None:
    vm = make_host().create_vm(PID)
    bit = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [bit | 1]))
    expect_errno(errno.EINVAL, lambda: vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [1 << 11]))
    assert vm.exit_hypercall == 0
    assert vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [bit]) == 0
    assert vm.exit_hypercall == bit
    assert vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [0]) == 0
    assert vm.exit_hypercall == 0


# --------------------------------------------------------------------------------------------
# MOVE_ENC_CONTEXT_FROM: each check in the kernel's order (reference sections 1 and 7)


def test_move_gate_eio_comes_before_the_flags_check() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    expect_errno(errno.EIO, lambda: migrate(dst, src, mm=OTHER, flags=1))


def test_move_into_a_dead_vm_is_eio_before_the_flags_check() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    migrate(dst, src)
    expect_errno(errno.EIO, lambda: migrate(src, dst, flags=1))


@pytest.mark.parametrize("arg", [None, 0, 7])
def test_move_from_something_that_is_not_a_vm_is_ebadf(arg: int | None) -> None:
    host = make_host()
    dst = aux_vm_create(host, True)
    before = snapshot(host)
    expect_errno(errno.EBADF, lambda: migrate(dst, arg))
    expect_errno(errno.EBADF, lambda: dst.enable_cap(PID, MOVE, 0, []))
    assert snapshot(host) == before


def test_move_from_self_is_einval_before_the_busy_check() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False)
    vm.sev.migration_in_progress = True  # would be EBUSY if looked at
    expect_errno(errno.EINVAL, lambda: migrate(vm, vm))
    assert vm.sev.migration_in_progress  # not ours to release


def test_move_with_the_destination_busy_is_ebusy_before_the_sev_checks() -> None:
    host = make_host()
    plain = aux_vm_create(host, True)  # not SEV: would be EINVAL if looked at
    dst = aux_vm_create(host, True)
    dst.sev.migration_in_progress = True
    before = snapshot(host)
    expect_errno(errno.EBUSY, lambda: migrate(dst, plain))
    assert snapshot(host) == before


def test_move_with_the_source_busy_is_ebusy_and_releases_the_destination() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    src.sev.migration_in_progress = True
    expect_errno(errno.EBUSY, lambda: migrate(dst, src))
    assert not dst.sev.migration_in_progress
    src.sev.migration_in_progress = False
    assert migrate(dst, src) == 0


def test_move_between_vm_types_is_einval() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = host.create_vm(PID, KVM_X86_SEV_VM)
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: migrate(dst, src))
    assert snapshot(host) == before


def test_move_requires_an_sev_source_and_a_non_sev_destination() -> None:
    host = make_host()
    vm_no_vcpu = host.create_vm(PID)
    vm_no_sev = aux_vm_create(host, True)
    sev_vm = sev_vm_create(host, es=False)
    other_sev = sev_vm_create(host, es=False)
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: migrate(vm_no_vcpu, vm_no_sev))  # src not SEV
    expect_errno(errno.EINVAL, lambda: migrate(sev_vm, other_sev))  # dst already SEV
    assert snapshot(host) == before


def test_move_from_a_moved_from_vm_is_einval() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    migrate(aux_vm_create(host, True), src)
    expect_errno(errno.EINVAL, lambda: migrate(aux_vm_create(host, True), src))


def test_move_sev_checks_come_before_the_cgroup_charge() -> None:
    host = make_host(cgroup_of=lambda mm: "/tenant")
    host.cgroups.set_max("/tenant", "sev", 0)  # every charge would fail with EBUSY
    src = host.create_vm(PID)  # not SEV
    dst = aux_vm_create(host, True)
    expect_errno(errno.EINVAL, lambda: migrate(dst, src))


def test_move_across_cgroups_over_the_limit_is_ebusy_before_the_vcpu_checks() -> None:
    host = cross_cgroup_host()
    src = sev_vm_create(host, es=True)
    dst = host.create_vm(PID + 1)  # 0 vCPUs: the ES count check would say EINVAL
    host.cgroups.set_max("/new", "sev", 0)
    before = snapshot(host)
    expect_errno(errno.EBUSY, lambda: migrate(dst, src, mm=PID + 1))
    assert snapshot(host) == before


def test_move_of_sev_es_across_cgroups_with_no_sev_capacity_is_einval() -> None:
    # Section 1 step 6 observation: dst.es_active is still false when the charge is made,
    # so an SEV-ES move across cgroups charges the SEV resource, whose capacity is 0 here.
    host = cross_cgroup_host(sev_asids=0, sev_es_asids=4)
    src = sev_vm_create(host, es=True)
    dst = aux_vm_create(host, True, mm=PID + 1)
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: migrate(dst, src, mm=PID + 1))
    assert snapshot(host) == before


def test_move_with_vcpu_creation_in_flight_is_ebusy_before_the_es_count_check() -> None:
    host = make_host()
    src = sev_vm_create(host, es=True)
    dst = host.create_vm(PID)  # 0 vCPUs vs 4: EINVAL if the count were checked first
    dst.created_vcpus += 1  # a KVM_CREATE_VCPU that has not finished
    before = snapshot(host)
    expect_errno(errno.EBUSY, lambda: migrate(dst, src))
    assert snapshot(host) == before
    dst.created_vcpus -= 1
    src.created_vcpus += 1  # the source's in-flight creation counts as well
    expect_errno(errno.EBUSY, lambda: migrate(dst, src))


def test_move_of_plain_sev_with_vcpu_creation_in_flight_is_ebusy() -> None:
    # 8a comes before 8b's early return for a non-ES source.
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    dst.created_vcpus += 1
    before = snapshot(host)
    expect_errno(errno.EBUSY, lambda: migrate(dst, src))
    assert snapshot(host) == before


def test_move_that_fails_after_the_charge_gives_the_charge_back() -> None:
    host = cross_cgroup_host()
    src = sev_vm_create(host, es=True)
    dst = host.create_vm(PID + 1)  # 0 vCPUs: the ES count check fails after the charge
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: migrate(dst, src, mm=PID + 1))
    assert snapshot(host) == before
    assert host.cgroups.usage["/new"] == {"sev": 0, "sev_es": 0}
    assert dst.sev.misc_cg is None


def test_move_of_sev_es_needs_equal_vcpu_counts_and_that_check_comes_first() -> None:
    host = make_host()
    sev_es_vm = sev_vm_create(host, es=True)
    vm_no_vcpu = host.create_vm(PID)
    expect_errno(errno.EINVAL, lambda: migrate(vm_no_vcpu, sev_es_vm))
    # Selftest step 6: no VMSA *and* a count mismatch: the count check fires first.
    no_vmsa = host.create_vm(PID)
    sev(no_vmsa, uapi.KVM_SEV_ES_INIT)
    no_vmsa.create_vcpu(PID, 1)
    error = expect_errno(errno.EINVAL, lambda: migrate(vm_no_vcpu, no_vmsa))
    assert "vCPUs" in str(error)


def test_move_of_sev_es_without_launch_update_vmsa_is_einval() -> None:
    host = make_host()
    no_vmsa = host.create_vm(PID)
    sev(no_vmsa, uapi.KVM_SEV_ES_INIT)
    no_vmsa.create_vcpu(PID, 1)
    dst = aux_vm_create(host, True, vcpus=1)
    before = snapshot(host)
    error = expect_errno(errno.EINVAL, lambda: migrate(dst, no_vmsa))
    assert "VMSA" in str(error)
    assert snapshot(host) == before


def test_move_of_plain_sev_ignores_vcpu_counts() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = host.create_vm(PID)
    assert migrate(dst, src) == 0


def test_the_selftest_locking_loop_changes_nothing() -> None:
    # test_sev_migrate_locking without threads: every call fails (self, or dst already SEV).
    host = make_host()
    vms = [sev_vm_create(host, es=False) for _ in range(3)]
    before = snapshot(host)
    for i, j in itertools.product(range(3), repeat=2):
        expect_errno(errno.EINVAL, partial(migrate, vms[i], vms[j]))
    assert snapshot(host) == before


# --------------------------------------------------------------------------------------------
# MOVE: what moves, what is cleared, what becomes of the source (reference section 2)


@pytest.mark.parametrize("es", [False, True])
def test_move_transfers_the_context_and_clears_the_source(es: bool) -> None:
    host = make_host()
    src = sev_vm_create(host, es=es)
    src.sev.vmsa_features = 0x40  # as if INIT2 had set it: must be copied
    src.sev.ap_jump_table = 0x1234
    asid, handle, policy = src.sev.asid, src.sev.handle, src.sev.policy
    vmsas = [v.vmsa for v in src.vcpus]
    dst = aux_vm_create(host, True)
    assert migrate(dst, src) == 0
    d, s = dst.sev, src.sev
    assert (d.active, d.asid, d.handle, d.es_active) == (True, asid, handle, es)
    assert d.vmsa_features == 0x40 and s.vmsa_features == 0x40
    assert (s.active, s.asid, s.handle, s.es_active, s.pages_locked) == (False, 0, 0, False, 0)
    # Not transferred: fd, policy, ghcb_version, ap_jump_table.
    assert (d.fd, d.policy, d.ghcb_version, d.ap_jump_table) == (False, 0, 0, 0)
    assert s.policy == policy
    assert src.dead and not dst.dead
    assert dst.mode == ("sev-es" if es else "sev") and src.mode == "plain"
    # The firmware context is untouched and still bound to the same ASID.
    ctx = host.firmware.contexts[handle]
    assert (ctx.asid, ctx.state) == (asid, uapi.SEV_GUEST_STATE_LUPDATE)
    if es:
        assert [v.vmsa for v in dst.vcpus] == vmsas
        assert all(v.guest_state_protected for v in dst.vcpus)
        assert all(v.vmsa is None and not v.guest_state_protected for v in src.vcpus)
        expect_errno(errno.EINVAL, lambda: dst.vcpus[0].get_regs(PID))
    else:
        assert all(not v.guest_state_protected for v in dst.vcpus)


def test_firmware_commands_from_a_move_destination_fail_ebadf() -> None:
    # Section 2 observation: dst.fd stays 0, so sev_issue_cmd has no /dev/sev to use.
    host = make_host()
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    migrate(dst, src)
    expect_errno(errno.EBADF, lambda: sev(dst, uapi.KVM_SEV_GUEST_STATUS, {}))
    expect_errno(errno.EBADF, lambda: sev(dst, uapi.KVM_SEV_LAUNCH_MEASURE, {}))
    expect_errno(errno.EBADF, lambda: sev(dst, uapi.KVM_SEV_LAUNCH_FINISH))
    assert host.firmware.contexts[dst.sev.handle].state == uapi.SEV_GUEST_STATE_LUPDATE


@pytest.mark.parametrize("es", [False, True])
def test_selftest_migrate_from_chain_then_back_into_the_dead_source_is_eio(es: bool) -> None:
    host = make_host()
    src = sev_vm_create(host, es=es)
    dsts = [aux_vm_create(host, True) for _ in range(3)]
    migrate(dsts[0], src)
    migrate(dsts[1], dsts[0])
    migrate(dsts[2], dsts[1])
    expect_errno(errno.EIO, lambda: migrate(src, dsts[2]))
    kind = "sev_es" if es else "sev"
    assert host.stats()["asids"][kind]["used"] == 1
    free(src)
    for vm in dsts:
        free(vm)
    assert host.stats()["asids"][kind]["used"] == 0
    assert host.firmware.contexts == {} and host.vms == {}


def test_move_into_dead_ok_lets_the_guest_go_back_but_not_run_there() -> None:
    host = make_host(move_into_dead_ok=True)
    src = sev_vm_create(host, es=False)
    dst = aux_vm_create(host, True)
    migrate(dst, src)
    assert migrate(src, dst) == 0  # [S7]: succeeds
    assert src.sev.active and dst.dead
    # Sean's plan keeps vm_dead for vCPU creation and vCPU ioctls.
    expect_errno(errno.EIO, lambda: src.create_vcpu(PID, 9))
    expect_errno(errno.EIO, lambda: src.vcpus[0].get_regs(PID))


def test_asids_are_conserved_when_one_sev_es_guest_moves_through_five_vms() -> None:
    host = make_host(sev_asids=1, sev_es_asids=1)
    vms = [sev_vm_create(host, es=True)]
    for _ in range(5):
        dst = aux_vm_create(host, True)
        migrate(dst, vms[-1])
        vms.append(dst)
        asids = host.stats()["asids"]["sev_es"]
        assert (asids["used"], asids["free"]) == (1, 0)
        assert sum(1 for vm in vms if vm.sev.asid) == 1
        assert host.cgroups.usage["/"] == {"sev": 0, "sev_es": 1}
    # The single SEV-ES ASID is taken: a second SEV-ES guest cannot start.
    other = host.create_vm(PID)
    expect_errno(errno.EBUSY, lambda: sev(other, uapi.KVM_SEV_ES_INIT))
    for vm in vms[:-1]:
        free(vm)
    assert host.stats()["asids"]["sev_es"]["used"] == 1  # the live holder keeps it
    free(vms[-1])
    assert host.stats()["asids"]["sev_es"] == {
        "total": 1,
        "used": 0,
        "free": 1,
        "reclaim_pending": 1,
    }
    assert host.cgroups.usage["/"] == {"sev": 0, "sev_es": 0}
    # Reused after the flush that sev_alloc_asid does when the range is exhausted.
    sev(other, uapi.KVM_SEV_ES_INIT)
    assert other.sev.asid == 1 and host.asids.flushes == 1


# --------------------------------------------------------------------------------------------
# misc cgroup charging (section 1 step 6)


def test_move_in_the_same_cgroup_charges_nothing() -> None:
    host = make_host()
    src = sev_vm_create(host, es=False)
    assert host.cgroups.usage["/"] == {"sev": 1, "sev_es": 0}
    dst = aux_vm_create(host, True)
    migrate(dst, src)
    assert host.cgroups.usage["/"] == {"sev": 1, "sev_es": 0}
    assert (dst.sev.misc_cg, src.sev.misc_cg) == ("/", None)
    free(src)
    free(dst)
    assert host.cgroups.usage["/"] == {"sev": 0, "sev_es": 0}
    assert host.warnings == []


def test_move_across_cgroups_moves_the_charge() -> None:
    host = cross_cgroup_host()
    src = sev_vm_create(host, es=False)
    dst = host.create_vm(PID + 1)
    migrate(dst, src, mm=PID + 1)
    usage = host.cgroups.usage
    assert (usage["/old"]["sev"], usage["/new"]["sev"], usage["/"]["sev"]) == (0, 1, 1)
    dst.put()
    assert (usage["/new"]["sev"], usage["/"]["sev"]) == (0, 0)


def test_sev_es_move_across_cgroups_charges_sev_as_the_kernel_does() -> None:
    # Section 1 step 6 observation: the charge and the source's uncharge both use SEV.
    host = cross_cgroup_host()
    src = sev_vm_create(host, es=True)
    dst = aux_vm_create(host, True, mm=PID + 1)
    migrate(dst, src, mm=PID + 1)
    usage = host.cgroups.usage
    assert usage["/old"] == {"sev": -1, "sev_es": 1}
    assert usage["/new"] == {"sev": 1, "sev_es": 0}
    assert any("negative" in w for w in host.warnings)


def test_moving_a_mirror_charges_the_callers_cgroup_and_nothing_uncharges_it() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=False)
    mirror_vm = host.create_vm(PID)
    mirror(mirror_vm, owner)
    assert host.cgroups.usage["/"]["sev"] == 1  # a mirror is not charged
    dst_mirror = host.create_vm(PID)
    migrate(dst_mirror, mirror_vm)  # src.misc_cg is NULL, never equal to the caller's
    assert host.cgroups.usage["/"]["sev"] == 2
    for vm in (mirror_vm, dst_mirror, owner):
        free(vm)
    assert host.stats()["asids"]["sev"]["used"] == 0
    assert host.cgroups.usage["/"]["sev"] == 1  # the kernel's leak, kept


# --------------------------------------------------------------------------------------------
# COPY_ENC_CONTEXT_FROM (section 3)


def test_copy_checks_in_order_gate_flags_fd_self_busy() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=False)
    dst = host.create_vm(PID)
    before = snapshot(host)
    expect_errno(errno.EIO, lambda: mirror(dst, owner, mm=OTHER, flags=1))
    expect_errno(errno.EINVAL, lambda: mirror(dst, None, flags=1))
    expect_errno(errno.EBADF, lambda: mirror(dst, 3))
    owner.sev.migration_in_progress = True
    expect_errno(errno.EINVAL, lambda: mirror(owner, owner))
    expect_errno(errno.EBUSY, lambda: mirror(dst, owner))
    owner.sev.migration_in_progress = False
    assert snapshot(host) == before


def test_selftest_mirror_parameters_are_all_einval() -> None:
    host = make_host()
    sev_vm = sev_vm_create(host, es=False)
    vm_with_vcpu = aux_vm_create(host, True)
    vm_no_vcpu = aux_vm_create(host, False)
    sev_es_vm = sev_vm_create(host, es=True)
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: mirror(sev_vm, sev_vm))  # self
    expect_errno(errno.EINVAL, lambda: mirror(vm_no_vcpu, vm_with_vcpu))  # src not SEV
    expect_errno(errno.EINVAL, lambda: mirror(vm_with_vcpu, sev_vm))  # dst has vCPUs
    expect_errno(errno.EINVAL, lambda: mirror(sev_vm, sev_es_vm))  # dst already SEV
    expect_errno(errno.EINVAL, lambda: mirror(sev_es_vm, sev_vm))
    assert snapshot(host) == before


def test_copy_from_a_mirror_or_from_a_moved_from_vm_is_einval() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=False)
    first = host.create_vm(PID)
    mirror(first, owner)
    expect_errno(errno.EINVAL, lambda: mirror(host.create_vm(PID), first))
    moved = sev_vm_create(host, es=False)
    migrate(aux_vm_create(host, True), moved)
    expect_errno(errno.EINVAL, lambda: mirror(host.create_vm(PID), moved))


def test_copy_makes_a_mirror_that_pins_its_owner() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=True)
    owner.sev.ap_jump_table = 0x99
    mirror_vm = host.create_vm(PID)
    assert mirror(mirror_vm, owner) == 0
    m, o = mirror_vm.sev, owner.sev
    assert m.enc_context_owner is owner and o.mirror_vms == [mirror_vm]
    assert (m.active, m.asid, m.handle, m.fd, m.es_active) == (True, o.asid, o.handle, True, True)
    assert (m.ap_jump_table, m.policy, m.misc_cg, m.need_init) == (0, 0, None, False)
    assert owner.refcount == 1 + NR_VCPUS + 1  # fd, vCPU fds, the mirror
    assert mirror_vm.mode == "mirror"
    assert host.stats()["asids"]["sev_es"]["used"] == 1  # no ASID of its own


@pytest.mark.parametrize("es", [False, True])
def test_selftest_mirror_allows_only_the_allowlist(es: bool) -> None:
    host = make_host()
    src = sev_vm_create(host, es=es)
    dst = host.create_vm(PID)
    mirror(dst, src)
    for i in range(NR_VCPUS):
        dst.create_vcpu(PID, i)
    if es:
        sev(dst, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        assert all(v.guest_state_protected for v in dst.vcpus)
    for cmd in range(uapi.KVM_SEV_NR_MAX):
        if cmd in MIRROR_ALLOWED_CMDS:
            continue
        expect_errno(errno.EINVAL, partial(sev, dst, cmd, None))
    status = sev(dst, uapi.KVM_SEV_GUEST_STATUS, {})
    assert status["handle"] == src.sev.handle
    free(src)
    assert src.id in host.vms  # the mirror pins it
    assert host.firmware.contexts  # its SEV teardown waits for the mirror
    free(dst)
    assert host.vms == {} and host.firmware.contexts == {}


def test_a_mirror_cannot_register_or_unregister_regions() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=False)
    mirror_vm = host.create_vm(PID)
    mirror(mirror_vm, owner)
    expect_errno(errno.EINVAL, lambda: mirror_vm.reg_region(PID, 0, PAGE_SIZE))
    expect_errno(errno.EINVAL, lambda: mirror_vm.unreg_region(PID, 0, PAGE_SIZE))
    plain = host.create_vm(PID)
    expect_errno(errno.ENOTTY, lambda: plain.reg_region(PID, 0, PAGE_SIZE))
    expect_errno(errno.ENOTTY, lambda: plain.unreg_region(PID, 0, PAGE_SIZE))


def test_move_into_a_mirror_is_einval() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=False)
    mirror_vm = host.create_vm(PID)
    mirror(mirror_vm, owner)
    expect_errno(errno.EINVAL, lambda: migrate(mirror_vm, sev_vm_create(host, es=False)))


def _owner_invariants(host: Host) -> None:
    """One live owner per ASID; mirrors point at it; its refcount counts its mirrors."""
    owners = [vm for vm in host.vms.values() if vm.mode in ("sev", "sev-es")]
    assert len({vm.sev.asid for vm in owners}) == len(owners)
    for vm in host.vms.values():
        owner = vm.sev.enc_context_owner
        if owner is not None:
            assert vm in owner.sev.mirror_vms and vm.sev.asid == owner.sev.asid
    for vm in owners:
        fds = (0 if vm.destroyed else 1) + sum(v.fd_open for v in vm.vcpus)
        assert vm.refcount >= fds + len(vm.sev.mirror_vms)


def test_selftest_move_copy_part_one() -> None:
    host = make_host()
    sev_vm = sev_vm_create(host, es=False)
    dst_vm, dst2_vm, dst3_vm = (aux_vm_create(host, True) for _ in range(3))
    mirror_vm, dst_mirror, dst2_mirror, dst3_mirror = (aux_vm_create(host, False) for _ in "abcd")
    asid = sev_vm.sev.asid

    mirror(mirror_vm, sev_vm)
    migrate(dst_mirror, mirror_vm)
    assert sev_vm.sev.mirror_vms == [dst_mirror] and sev_vm.refcount == 1 + NR_VCPUS + 1
    migrate(dst_vm, sev_vm)
    assert dst_mirror.sev.enc_context_owner is dst_vm
    assert (sev_vm.refcount, dst_vm.refcount) == (1 + NR_VCPUS, 1 + NR_VCPUS + 1)
    migrate(dst2_vm, dst_vm)
    migrate(dst2_mirror, dst_mirror)
    migrate(dst3_mirror, dst2_mirror)
    migrate(dst3_vm, dst2_vm)
    _owner_invariants(host)
    assert dst3_vm.sev.mirror_vms == [dst3_mirror]
    assert dst3_mirror.sev.enc_context_owner is dst3_vm

    for vm in (dst_vm, sev_vm, dst2_vm, dst3_vm):
        free(vm)
    assert dst3_vm.id in host.vms  # dst3_mirror pins it
    assert asid in host.asids.in_use
    for vm in (mirror_vm, dst_mirror, dst2_mirror):
        free(vm)
    assert asid in host.asids.in_use
    free(dst3_mirror)  # finally destroys dst3
    assert asid not in host.asids.in_use
    assert host.vms == {} and host.firmware.contexts == {} and host.warnings == []


def test_selftest_move_copy_part_two_destroys_mirrors_first() -> None:
    host = make_host()
    sev_vm = sev_vm_create(host, es=False)
    dst_vm = aux_vm_create(host, True)
    mirror_vm, dst_mirror = host.create_vm(PID), host.create_vm(PID)
    mirror(mirror_vm, sev_vm)
    migrate(dst_mirror, mirror_vm)
    migrate(dst_vm, sev_vm)
    for vm in (mirror_vm, dst_mirror, dst_vm, sev_vm):
        free(vm)
    assert host.vms == {} and host.firmware.contexts == {}
    assert host.stats()["asids"]["sev"]["used"] == 0


def _three_vms_with_two_mirrors(host: Host) -> dict[str, Vm]:
    owner = sev_vm_create(host, es=False, vcpus=0)
    m1, m2 = host.create_vm(PID), host.create_vm(PID)
    mirror(m1, owner)
    mirror(m2, owner)
    return {"owner": owner, "m1": m1, "m2": m2}


@pytest.mark.parametrize("order", list(itertools.permutations(["owner", "m1", "m2"])))
def test_mirror_lifetimes_in_any_close_order_free_the_asid_once_after_the_last(
    order: tuple[str, ...],
) -> None:
    host = make_host()
    vms = _three_vms_with_two_mirrors(host)
    asid, handle = vms["owner"].sev.asid, vms["owner"].sev.handle
    for i, name in enumerate(order):
        vms[name].put()
        last = i == len(order) - 1
        assert (asid in host.asids.in_use) is not last
        assert (handle in host.firmware.contexts) is not last
    assert host.vms == {} and host.warnings == []
    assert host.cgroups.usage["/"] == {"sev": 0, "sev_es": 0}


def test_destroying_a_moved_from_vm_tears_nothing_down() -> None:
    host = make_host()
    src = sev_vm_create(host, es=True)
    dst = aux_vm_create(host, True)
    migrate(dst, src)
    free(src)
    ctx = host.firmware.contexts[dst.sev.handle]
    assert ctx.asid == dst.sev.asid and dst.sev.asid in host.asids.in_use
    free(dst)
    assert host.firmware.contexts == {} and not host.asids.in_use


# --------------------------------------------------------------------------------------------
# KVM_MEMORY_ENCRYPT_OP: dispatch order and INIT


def test_sev_ioctl_without_sev_on_the_host_is_enotty() -> None:
    host = make_host(sev_asids=0, sev_es_asids=0)
    vm = host.create_vm(PID)
    expect_errno(errno.ENOTTY, lambda: sev(vm, uapi.KVM_SEV_INIT))
    expect_errno(errno.ENOTTY, lambda: sev(vm, 77))


def test_es_init_without_sev_es_is_enotty_and_init_without_sev_asids_is_enotty() -> None:
    no_es = make_host(sev_es_asids=0)
    expect_errno(errno.ENOTTY, lambda: sev(no_es.create_vm(PID), uapi.KVM_SEV_ES_INIT))
    only_es = make_host(sev_asids=0, sev_es_asids=2)
    expect_errno(errno.ENOTTY, lambda: sev(only_es.create_vm(PID), uapi.KVM_SEV_INIT))


@pytest.mark.parametrize(
    "cmd",
    [
        uapi.KVM_SEV_SEND_UPDATE_VMSA,
        uapi.KVM_SEV_RECEIVE_UPDATE_VMSA,
        uapi.KVM_SEV_CERT_EXPORT,
        23,
        99,
        uapi.KVM_SEV_NR_MAX,
        1000,
    ],
)
def test_sev_ioctl_without_a_handler_is_einval(cmd: int) -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: sev(vm, cmd, {}))


@pytest.mark.parametrize(
    "cmd",
    [
        uapi.KVM_SEV_LAUNCH_START,
        uapi.KVM_SEV_LAUNCH_UPDATE_DATA,
        uapi.KVM_SEV_LAUNCH_UPDATE_VMSA,
        uapi.KVM_SEV_LAUNCH_SECRET,
        uapi.KVM_SEV_LAUNCH_MEASURE,
        uapi.KVM_SEV_LAUNCH_FINISH,
        uapi.KVM_SEV_GUEST_STATUS,
        uapi.KVM_SEV_DBG_DECRYPT,
        uapi.KVM_SEV_DBG_ENCRYPT,
        uapi.KVM_SEV_GET_ATTESTATION_REPORT,
        uapi.KVM_SEV_SEND_START,
        uapi.KVM_SEV_SEND_UPDATE_DATA,
        uapi.KVM_SEV_SEND_FINISH,
        uapi.KVM_SEV_SEND_CANCEL,
        uapi.KVM_SEV_RECEIVE_START,
        uapi.KVM_SEV_RECEIVE_FINISH,
        uapi.KVM_SEV_SNP_LAUNCH_START,
        uapi.KVM_SEV_SNP_LAUNCH_FINISH,
    ],
)
def test_commands_that_need_an_sev_guest_are_enotty_on_a_plain_vm(cmd: int) -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.ENOTTY, lambda: sev(vm, cmd, {}))


def test_receive_update_data_and_snp_launch_update_say_einval_on_a_plain_vm() -> None:
    vm = make_host().create_vm(PID)
    expect_errno(errno.EINVAL, lambda: sev(vm, uapi.KVM_SEV_RECEIVE_UPDATE_DATA, {}))
    expect_errno(errno.EINVAL, lambda: sev(vm, uapi.KVM_SEV_SNP_LAUNCH_UPDATE, {}))


def test_sev_init_twice_or_after_vcpus_is_einval() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    before = snapshot(host)
    expect_errno(errno.EINVAL, lambda: sev(vm, uapi.KVM_SEV_INIT))
    expect_errno(errno.EINVAL, lambda: sev(vm, uapi.KVM_SEV_ES_INIT))
    assert snapshot(host) == before
    late = aux_vm_create(host, True)
    expect_errno(errno.EINVAL, lambda: sev(late, uapi.KVM_SEV_INIT))
    assert not late.sev.active and late.sev.asid == 0


def test_sev_init_takes_the_asid_range_of_its_kind() -> None:
    host = make_host(sev_asids=2, sev_es_asids=3)
    plain, es = host.create_vm(PID), host.create_vm(PID)
    sev(plain, uapi.KVM_SEV_INIT)
    sev(es, uapi.KVM_SEV_ES_INIT)
    assert plain.sev.asid == 4 and es.sev.asid == 1  # min_sev_asid = 4
    assert (plain.sev.ghcb_version, es.sev.ghcb_version) == (0, 1)
    assert host.cgroups.usage["/"] == {"sev": 1, "sev_es": 1}


def test_sev_init_with_no_free_asid_is_ebusy_and_changes_nothing() -> None:
    host = make_host(sev_asids=1, sev_es_asids=1)
    sev(host.create_vm(PID), uapi.KVM_SEV_INIT)
    vm = host.create_vm(PID)
    before = snapshot(host)
    expect_errno(errno.EBUSY, lambda: sev(vm, uapi.KVM_SEV_INIT))
    assert snapshot(host) == before
    assert not vm.sev.active and vm.sev.misc_cg is None


def test_sev_init_over_the_cgroup_limit_is_ebusy() -> None:
    host = make_host()
    host.cgroups.set_max("/", "sev", 0)
    vm = host.create_vm(PID)
    expect_errno(errno.EBUSY, lambda: sev(vm, uapi.KVM_SEV_INIT))
    assert not host.asids.in_use


def test_init2_needs_an_sev_vm_type_and_checks_its_fields() -> None:
    host = make_host()
    expect_errno(errno.EINVAL, lambda: sev(host.create_vm(PID), uapi.KVM_SEV_INIT2, {}))
    typed = host.create_vm(PID, KVM_X86_SEV_ES_VM)
    expect_errno(errno.EINVAL, lambda: sev(typed, uapi.KVM_SEV_INIT))  # legacy INIT refused
    expect_errno(errno.EFAULT, lambda: sev(typed, uapi.KVM_SEV_INIT2, None))
    expect_errno(errno.EINVAL, lambda: sev(typed, uapi.KVM_SEV_INIT2, {"flags": 1}))
    expect_errno(errno.EINVAL, lambda: sev(typed, uapi.KVM_SEV_INIT2, {"ghcb_version": 3}))
    expect_errno(errno.EINVAL, lambda: sev(typed, uapi.KVM_SEV_INIT2, {"vmsa_features": 1}))
    sev(typed, uapi.KVM_SEV_INIT2, {})
    assert typed.mode == "sev-es" and typed.sev.ghcb_version == 2
    expect_errno(errno.EINVAL, lambda: sev(typed, uapi.KVM_SEV_INIT2, {}))  # need_init gone
    plain_typed = host.create_vm(PID, KVM_X86_SEV_VM)
    expect_errno(errno.EINVAL, lambda: sev(plain_typed, uapi.KVM_SEV_INIT2, {"ghcb_version": 1}))


def test_commands_that_read_their_data_are_efault_with_null_data() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False)
    for cmd in (
        uapi.KVM_SEV_LAUNCH_START,
        uapi.KVM_SEV_LAUNCH_UPDATE_DATA,
        uapi.KVM_SEV_LAUNCH_MEASURE,
        uapi.KVM_SEV_DBG_DECRYPT,
        uapi.KVM_SEV_DBG_ENCRYPT,
    ):
        expect_errno(errno.EFAULT, partial(sev, vm, cmd, None))
    # GUEST_STATUS asks the firmware first, then cannot write the answer.
    expect_errno(errno.EFAULT, lambda: sev(vm, uapi.KVM_SEV_GUEST_STATUS, None))


# --------------------------------------------------------------------------------------------
# firmware: launch, policy, state machine (section 6)


def test_launch_flow_walks_the_firmware_states() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=True)

    def state() -> int:
        return int(sev(vm, uapi.KVM_SEV_GUEST_STATUS, {})["state"])

    assert state() == uapi.SEV_GUEST_STATE_LUPDATE
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_FINISH))
    sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    assert state() == uapi.SEV_GUEST_STATE_LSECRET
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {}))
    sev(vm, uapi.KVM_SEV_LAUNCH_FINISH)
    assert state() == uapi.SEV_GUEST_STATE_RUNNING
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA))
    assert state() == uapi.SEV_GUEST_STATE_RUNNING


def test_launch_update_vmsa_is_enotty_for_plain_sev() -> None:
    vm = sev_vm_create(make_host(), es=False)
    expect_errno(errno.ENOTTY, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA))


def test_a_second_launch_update_vmsa_succeeds_and_is_measured_again() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_ES_INIT)
    vm.create_vcpu(PID, 0)
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": ES})
    ctx = host.firmware.contexts[vm.sev.handle]
    sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    once = ctx.digest()
    sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
    assert ctx.digest() != once
    assert vm.vcpus[0].guest_state_protected


def test_launch_start_with_an_es_policy_on_an_sev_vm_fails_and_leaves_no_context() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    expect_fw(
        uapi.SEV_RET_POLICY_FAILURE, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": ES})
    )
    assert host.firmware.contexts == {} and vm.sev.handle == 0 and not vm.sev.fd
    es_vm = host.create_vm(PID)
    sev(es_vm, uapi.KVM_SEV_ES_INIT)
    expect_fw(uapi.SEV_RET_POLICY_FAILURE, lambda: sev(es_vm, uapi.KVM_SEV_LAUNCH_START, {}))
    assert host.firmware.contexts == {}


@pytest.mark.parametrize(
    ("policy", "fw_error"),
    [
        (1 << 6, uapi.SEV_RET_INVALID_PARAM),  # reserved
        (1 << 15, uapi.SEV_RET_INVALID_PARAM),
        (0xFF << 16, uapi.SEV_RET_POLICY_FAILURE),  # needs API 255.0
        (
            (uapi.SEV_API_MAJOR << 16) | ((uapi.SEV_API_MINOR + 1) << 24),
            uapi.SEV_RET_POLICY_FAILURE,
        ),
    ],
)
def test_launch_start_policy_checks(policy: int, fw_error: int) -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    expect_fw(fw_error, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": policy}))
    assert host.firmware.contexts == {}


def test_launch_start_accepts_the_firmwares_own_api_version_as_minimum() -> None:
    host = make_host()
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    policy = (uapi.SEV_API_MAJOR << 16) | (uapi.SEV_API_MINOR << 24)
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": policy})
    assert sev(vm, uapi.KVM_SEV_GUEST_STATUS, {})["policy"] == policy


def test_a_second_launch_start_finds_the_asid_owned_and_keeps_the_first_context() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False, vcpus=0)
    first = vm.sev.handle
    expect_fw(uapi.SEV_RET_ASID_OWNED, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_START, {}))
    assert vm.sev.handle == first and list(host.firmware.contexts) == [first]


def test_an_es_policy_without_sev_es_on_the_platform_is_unsupported() -> None:
    host = make_host(sev_es_asids=0)
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    expect_fw(uapi.SEV_RET_UNSUPPORTED, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": ES}))


def test_key_sharing_needs_equal_policies_and_noks_clear() -> None:
    host = make_host()
    first = sev_vm_create(host, es=False, vcpus=0)
    noks = sev_vm_create(host, es=False, vcpus=0, policy=uapi.SEV_POLICY_NOKS)

    def launch(handle: int, policy: int) -> dict[str, int | bytes]:
        vm = host.create_vm(PID)
        sev(vm, uapi.KVM_SEV_INIT)
        return sev(vm, uapi.KVM_SEV_LAUNCH_START, {"handle": handle, "policy": policy})

    shared = launch(first.sev.handle, 0)
    assert shared["handle"] not in (0, first.sev.handle)
    fw = host.firmware
    assert fw.contexts[int(shared["handle"])].vek == fw.contexts[first.sev.handle].vek
    expect_fw(uapi.SEV_RET_POLICY_FAILURE, lambda: launch(first.sev.handle, uapi.SEV_POLICY_NODBG))
    expect_fw(uapi.SEV_RET_POLICY_FAILURE, lambda: launch(noks.sev.handle, uapi.SEV_POLICY_NOKS))
    expect_fw(uapi.SEV_RET_INVALID_GUEST, lambda: launch(999, 0))


def test_fresh_launches_get_distinct_64_byte_veks() -> None:
    host = make_host()
    a, b = sev_vm_create(host, es=False, vcpus=0), sev_vm_create(host, es=False, vcpus=0)
    vek_a, vek_b = (host.firmware.contexts[vm.sev.handle].vek for vm in (a, b))
    assert len(vek_a) == 64 and vek_a != vek_b


def test_launch_measure_is_the_sev_api_hmac_over_the_launch_digest() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=True, policy=ES | uapi.SEV_POLICY_NOKS)
    ctx = host.firmware.contexts[vm.sev.handle]
    digest = ctx.digest()
    out = sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    measurement, mnonce = out["measurement"], out["mnonce"]
    assert isinstance(measurement, bytes) and isinstance(mnonce, bytes)
    assert len(measurement) == 32 and len(mnonce) == 16
    mac = hmac.HMAC(ctx.tik, hashes.SHA256())
    mac.update(bytes([0x04, uapi.SEV_API_MAJOR, uapi.SEV_API_MINOR, uapi.SEV_BUILD]))
    mac.update((ES | uapi.SEV_POLICY_NOKS).to_bytes(4, "little") + digest + mnonce)
    mac.verify(measurement)


def test_launch_secret_checks_the_state_then_cannot_verify() -> None:
    vm = sev_vm_create(make_host(), es=False)
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_SECRET, {}))
    sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    expect_fw(uapi.SEV_RET_BAD_MEASUREMENT, lambda: sev(vm, uapi.KVM_SEV_LAUNCH_SECRET, {}))


def test_send_and_receive_commands_check_the_firmware_state() -> None:
    # The whole SEND/RECEIVE flow and its checks: tests/kvmstub/test_sev_send_receive.py.
    host = make_host()
    vm = sev_vm_create(host, es=False)  # LUPDATE
    # The session-length query answers before the state is looked at (section 1.3 order).
    query = expect_fw(uapi.SEV_RET_INVALID_LEN, lambda: sev(vm, uapi.KVM_SEV_SEND_START, {}))
    assert query.fields == {"policy": 0, "session_len": 128}
    pdh, chain = host.firmware.platform.pdh_cert_export()
    fields: dict[str, int | bytes] = {
        "pdh_cert": pdh,
        "plat_certs": chain,
        "amd_certs": b"a",
        "session_uaddr": 1,
        "session_len": 128,
    }
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_SEND_START, fields))
    for cmd in (uapi.KVM_SEV_SEND_FINISH, uapi.KVM_SEV_SEND_CANCEL):
        expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, partial(sev, vm, cmd))
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, uapi.KVM_SEV_RECEIVE_FINISH))
    nosend = sev_vm_create(host, es=False, policy=uapi.SEV_POLICY_NOSEND)
    sev(nosend, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    sev(nosend, uapi.KVM_SEV_LAUNCH_FINISH)
    expect_fw(uapi.SEV_RET_POLICY_FAILURE, lambda: sev(nosend, uapi.KVM_SEV_SEND_START, fields))
    receiver = sev_vm_create(host, es=False)
    expect_errno(errno.EINVAL, lambda: sev(receiver, uapi.KVM_SEV_RECEIVE_START, {}))
    short: dict[str, int | bytes] = {"pdh": b"p", "session": b"s"}
    expect_fw(uapi.SEV_RET_INVALID_LEN, lambda: sev(receiver, uapi.KVM_SEV_RECEIVE_START, short))


# Firmware commands that need no guest memory or certificates: driven straight at the firmware.
_TABLE_DRIVEN = (
    "LAUNCH_UPDATE_VMSA",
    "LAUNCH_MEASURE",
    "LAUNCH_FINISH",
    "SEND_FINISH",
    "SEND_CANCEL",
    "RECEIVE_FINISH",
    "GUEST_STATUS",
    "ACTIVATE",
)


def _all_transitions() -> Iterator[tuple[str, int, int | None]]:
    for command in _TABLE_DRIVEN:
        for state in uapi.SEV_GUEST_STATE_NAMES:
            if state != uapi.SEV_GUEST_STATE_UNINIT:
                yield command, state, FIRMWARE_TRANSITIONS[command].get(state)


def test_firmware_table_is_the_reference_state_machine() -> None:
    t, s = FIRMWARE_TRANSITIONS, uapi
    assert t["LAUNCH_START"] == {s.SEV_GUEST_STATE_UNINIT: s.SEV_GUEST_STATE_LUPDATE}
    assert t["LAUNCH_MEASURE"] == {s.SEV_GUEST_STATE_LUPDATE: s.SEV_GUEST_STATE_LSECRET}
    assert t["LAUNCH_FINISH"] == {s.SEV_GUEST_STATE_LSECRET: s.SEV_GUEST_STATE_RUNNING}
    assert t["SEND_START"] == {s.SEV_GUEST_STATE_RUNNING: s.SEV_GUEST_STATE_SUPDATE}
    assert t["SEND_FINISH"] == {s.SEV_GUEST_STATE_SUPDATE: s.SEV_GUEST_STATE_SENT}
    assert t["SEND_CANCEL"] == {s.SEV_GUEST_STATE_SUPDATE: s.SEV_GUEST_STATE_RUNNING}
    assert t["RECEIVE_START"] == {s.SEV_GUEST_STATE_UNINIT: s.SEV_GUEST_STATE_RUPDATE}
    assert t["RECEIVE_FINISH"] == {s.SEV_GUEST_STATE_RUPDATE: s.SEV_GUEST_STATE_RUNNING}
    assert s.SEV_GUEST_STATE_SENT not in t["ACTIVATE"]  # anti-cloning


@pytest.mark.parametrize(("command", "state", "after"), list(_all_transitions()))
def test_firmware_commands_follow_the_table_in_every_state(
    command: str, state: int, after: int | None
) -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False, vcpus=0)
    fw = host.firmware
    handle = vm.sev.handle
    ctx = fw.contexts[handle]
    ctx.state = state
    calls: dict[str, Callable[[], object]] = {
        "LAUNCH_MEASURE": lambda: fw.launch_measure(handle),
        "LAUNCH_FINISH": lambda: fw.launch_finish(handle),
        "LAUNCH_UPDATE_VMSA": lambda: fw.launch_update_vmsa(handle, bytes(PAGE_SIZE)),
        "SEND_FINISH": lambda: fw.send_finish(handle),
        "SEND_CANCEL": lambda: fw.send_cancel(handle),
        "RECEIVE_FINISH": lambda: fw.receive_finish(handle),
        "GUEST_STATUS": lambda: fw.guest_status(handle),
        "ACTIVATE": lambda: fw.activate(handle, vm.sev.asid),
    }
    call = calls[command]
    if after is None:
        expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, call)
        assert ctx.state == state
    else:
        call()
        assert ctx.state == after


def test_a_sent_guest_can_never_be_activated_again() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False, vcpus=0)
    fw, handle = host.firmware, vm.sev.handle
    fw.contexts[handle].state = uapi.SEV_GUEST_STATE_SUPDATE
    fw.send_finish(handle)
    fw.deactivate(handle)
    expect_fw(uapi.SEV_RET_INVALID_GUEST_STATE, lambda: fw.activate(handle, vm.sev.asid))
    assert sev(vm, uapi.KVM_SEV_GUEST_STATUS, {})["state"] == uapi.SEV_GUEST_STATE_SENT


def test_decommission_of_an_active_guest_is_refused() -> None:
    host = make_host()
    vm = sev_vm_create(host, es=False, vcpus=0)
    expect_fw(uapi.SEV_RET_ACTIVE, lambda: host.firmware.decommission(vm.sev.handle))


def test_sev_fw_error_is_an_eio_oserror_that_survives_pickling() -> None:
    import pickle

    error = SevFwError(uapi.SEV_RET_POLICY_FAILURE, "nope")
    assert isinstance(error, OSError) and error.errno == errno.EIO
    again = pickle.loads(pickle.dumps(error))
    assert (again.errno, again.fw_error, again.strerror) == (errno.EIO, 7, "nope")


def test_stats_describe_vms_asids_and_firmware_states() -> None:
    host = make_host()
    owner = sev_vm_create(host, es=True)
    mirror_vm = host.create_vm(PID)
    mirror(mirror_vm, owner)
    stats = host.stats()
    by_id = {vm["id"]: vm for vm in stats["vms"]}
    o, m = by_id[owner.id], by_id[mirror_vm.id]
    assert (o["mode"], o["firmware_state"], o["creator"], o["dead"]) == (
        "sev-es",
        "LUPDATE",
        PID,
        False,
    )
    assert o["refcount"] == 1 + NR_VCPUS + 1 and o["mirrors"] == [mirror_vm.id]
    assert [v["id"] for v in o["vcpus"]] == list(range(NR_VCPUS))
    assert all(v["protected"] and v["steps"] == 0 for v in o["vcpus"])
    assert (m["mode"], m["owner"], m["asid"]) == ("mirror", owner.id, owner.sev.asid)
    assert stats["asids"]["sev_es"]["used"] == 1 and stats["firmware_guests"] == 1


# --------------------------------------------------------------------------------------------
# Guest memory and KVM_RUN (needs kvmstub.memory and kvmstub.guest)


class Memfd:
    """Guest RAM as a VMM owns it: a memfd the test can read behind the guest's back."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size

    def read(self, gpa: int, length: int) -> bytes:
        return os.pread(self.fd, length, gpa)

    def write(self, gpa: int, data: bytes) -> None:
        os.pwrite(self.fd, data, gpa)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def memfd() -> Iterator[Callable[[int], Memfd]]:
    made: list[Memfd] = []

    def make(size: int) -> Memfd:
        made.append(Memfd(size))
        return made[-1]

    yield make
    for m in made:
        m.close()


PARAMS = guest.GuestParams(vcpus=2, line_every=20, flip_every=7)


def launch_guest(
    host: Host,
    ram: Memfd,
    mode: str,
    *,
    policy: int | None = None,
    params: guest.GuestParams = PARAMS,
) -> Vm:
    """A VMM's launch: VM, memory, vCPUs with initial registers, and for SEV modes the
    launch sequence with the image encrypted in place."""
    vm = host.create_vm(PID)
    if mode != "plain":
        sev(vm, uapi.KVM_SEV_ES_INIT if mode == "sev-es" else uapi.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [1 << uapi.KVM_HC_MAP_GPA_RANGE])
    ram.write(0, guest.build_launch_image(params))
    for i in range(params.vcpus):
        vm.create_vcpu(PID, i).set_regs(PID, guest.initial_regs(i))
    if mode != "plain":
        want = (ES if mode == "sev-es" else 0) if policy is None else policy
        sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": want})
        sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": PAGE_SIZE})
        if mode == "sev-es":
            sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_VMSA)
        sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {})
        sev(vm, uapi.KVM_SEV_LAUNCH_FINISH)
    return vm


class Vmm:
    """The host side of the guest's devices: serial lines and the doorbell sums, per vCPU."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.sums: dict[int, int] = {}
        self.pending: dict[int, dict[str, Any]] = {}

    def run(self, vm: Vm, index: int, lines: int) -> None:
        """Run vCPU `index` until it has written `lines` more serial lines."""
        vcpu = vm.vcpus[index]
        want = len(self.lines) + lines
        while len(self.lines) < want:
            exit_ = vcpu.run(PID, **self.pending.pop(index, {}))
            if exit_.exit_reason == uapi.KVM_EXIT_IO:
                io = exit_.io
                assert io is not None
                if io.port == uapi.SERIAL_PORT:
                    assert not io.data.startswith(b"PANIC"), io.data
                    self.lines.append(io.data)
                elif io.direction == uapi.KVM_EXIT_IO_OUT:
                    value = int.from_bytes(io.data, "little")
                    self.sums[index] = (self.sums.get(index, 0) + value) % (1 << 32)
                else:
                    data = self.sums.get(index, 0).to_bytes(4, "little")
                    self.pending[index] = {"io_data": data}
            elif exit_.exit_reason == uapi.KVM_EXIT_HYPERCALL:
                self.pending[index] = {"hypercall_ret": 0}
            else:
                assert exit_.exit_reason == uapi.KVM_EXIT_INTR, exit_

    def pause(self, vm: Vm, index: int) -> None:
        """Complete a pending exit without running the guest (immediate_exit)."""
        expect_errno(
            errno.EINTR,
            lambda: vm.vcpus[index].run(PID, immediate_exit=True, **self.pending.pop(index, {})),
        )


def seqs(lines: list[bytes], vcpu: int) -> list[int]:
    out = []
    for line in lines:
        match = guest.LINE_PATTERN.fullmatch(line)
        assert match is not None, line
        if int(match.group(1)) == vcpu:
            out.append(int(match.group(2)))
    return out


@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es"])
def test_guest_runs_and_reports_contiguous_seq(memfd: Callable[[int], Memfd], mode: str) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, mode)
    vmm = Vmm()
    for _ in range(3):
        vmm.run(vm, 0, 1)
        vmm.run(vm, 1, 1)
    assert seqs(vmm.lines, 0) == [0, 1, 2] and seqs(vmm.lines, 1) == [0, 1, 2]
    steps = [v["steps"] for v in host.stats()["vms"][0]["vcpus"]]
    assert all(s >= 3 * PARAMS.line_every for s in steps)


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_private_pages_are_ciphertext_in_the_memfd(
    memfd: Callable[[int], Memfd], mode: str
) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, mode)
    Vmm().run(vm, 0, 1)
    vek = host.firmware.contexts[vm.sev.handle].vek
    image = guest.build_launch_image(PARAMS)
    assert ram.read(0, PAGE_SIZE) != image
    assert xts_decrypt(vek, 0, ram.read(0, PAGE_SIZE)) == image
    journal = ram.read(PAGE_SIZE, PAGE_SIZE)
    assert guest.JOURNAL_MAGIC not in journal
    assert xts_decrypt(vek, PAGE_SIZE, journal).startswith(guest.JOURNAL_MAGIC)


def test_plain_guest_memory_is_plaintext(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "plain")
    Vmm().run(vm, 0, 1)
    assert ram.read(PAGE_SIZE, 8) == guest.JOURNAL_MAGIC


def test_launch_update_data_measures_the_plaintext(memfd: Callable[[int], Memfd]) -> None:
    import hashlib

    host = make_host()
    ram = memfd(4 * PAGE_SIZE)
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": 0})
    ram.write(0, b"A" * PAGE_SIZE + b"B" * PAGE_SIZE)
    sev(vm, uapi.KVM_SEV_LAUNCH_UPDATE_DATA, {"uaddr": 0, "len": 2 * PAGE_SIZE})
    ctx = host.firmware.contexts[vm.sev.handle]
    assert ctx.digest() == hashlib.sha256(b"A" * PAGE_SIZE + b"B" * PAGE_SIZE).digest()
    assert xts_decrypt(ctx.vek, PAGE_SIZE, ram.read(PAGE_SIZE, PAGE_SIZE)) == b"B" * PAGE_SIZE


def test_launch_update_data_checks_range_backing_alignment_and_state(
    memfd: Callable[[int], Memfd],
) -> None:
    host = make_host()
    ram = memfd(2 * PAGE_SIZE)
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    sev(vm, uapi.KVM_SEV_LAUNCH_START, {"policy": 0})
    update = uapi.KVM_SEV_LAUNCH_UPDATE_DATA
    expect_errno(errno.EINVAL, lambda: sev(vm, update, {"uaddr": 0, "len": 0}))
    expect_errno(errno.ENOMEM, lambda: sev(vm, update, {"uaddr": PAGE_SIZE, "len": 2 * PAGE_SIZE}))
    expect_fw(uapi.SEV_RET_INVALID_LEN, lambda: sev(vm, update, {"uaddr": 0, "len": 16}))
    expect_fw(uapi.SEV_RET_INVALID_ADDRESS, lambda: sev(vm, update, {"uaddr": 16, "len": 16}))
    sev(vm, uapi.KVM_SEV_LAUNCH_MEASURE, {})
    expect_fw(
        uapi.SEV_RET_INVALID_GUEST_STATE, lambda: sev(vm, update, {"uaddr": 0, "len": PAGE_SIZE})
    )


def test_dbg_decrypt_and_encrypt_cross_pages(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "sev")
    image = guest.build_launch_image(PARAMS)
    out = sev(vm, uapi.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 0, "len": 40})
    assert out["data"] == image[:40]
    payload = bytes(range(200))
    sev(vm, uapi.KVM_SEV_DBG_ENCRYPT, {"dst_uaddr": 2 * PAGE_SIZE - 100, "data": payload})
    out = sev(vm, uapi.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 2 * PAGE_SIZE - 100, "len": 200})
    assert out["data"] == payload
    vek = host.firmware.contexts[vm.sev.handle].vek
    assert xts_decrypt(vek, PAGE_SIZE, ram.read(PAGE_SIZE, PAGE_SIZE))[-100:] == payload[:100]
    decrypt = uapi.KVM_SEV_DBG_DECRYPT
    expect_errno(errno.EINVAL, lambda: sev(vm, decrypt, {"src_uaddr": 0, "len": 0}))
    expect_errno(errno.ENOMEM, lambda: sev(vm, decrypt, {"src_uaddr": ram.size, "len": 1}))


def test_dbg_on_a_nodbg_guest_is_a_policy_failure(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "sev", policy=uapi.SEV_POLICY_NODBG)
    before = ram.read(0, ram.size)
    expect_fw(
        uapi.SEV_RET_POLICY_FAILURE,
        lambda: sev(vm, uapi.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 0, "len": 16}),
    )
    expect_fw(
        uapi.SEV_RET_POLICY_FAILURE,
        lambda: sev(vm, uapi.KVM_SEV_DBG_ENCRYPT, {"dst_uaddr": 0, "data": b"x" * 16}),
    )
    assert ram.read(0, ram.size) == before


def test_mirror_dbg_uses_the_owners_context(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    owner = launch_guest(host, ram, "sev")
    helper = host.create_vm(PID)
    mirror(helper, owner)
    helper.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    out = sev(helper, uapi.KVM_SEV_DBG_DECRYPT, {"src_uaddr": 0, "len": 8})
    assert out["data"] == guest.IMAGE_MAGIC


def test_reg_region_pins_pages_that_move_with_the_context(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(4 * PAGE_SIZE)
    src = host.create_vm(PID)
    sev(src, uapi.KVM_SEV_INIT)
    src.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    expect_errno(errno.EINVAL, lambda: src.reg_region(PID, 0, 0))
    expect_errno(errno.ENOMEM, lambda: src.reg_region(PID, 0, 5 * PAGE_SIZE))
    src.reg_region(PID, 100, 2 * PAGE_SIZE)  # unaligned: touches 3 pages
    assert src.sev.pages_locked == 3
    dst = host.create_vm(PID)
    migrate(dst, src)
    assert (dst.sev.pages_locked, src.sev.pages_locked) == (3, 0)
    assert [(r.addr, r.size) for r in dst.sev.regions_list] == [(100, 2 * PAGE_SIZE)]
    assert src.sev.regions_list == []
    expect_errno(errno.EINVAL, lambda: dst.unreg_region(PID, 100, PAGE_SIZE))
    dst.unreg_region(PID, 100, 2 * PAGE_SIZE)
    assert dst.sev.pages_locked == 0 and dst.sev.regions_list == []


def test_owner_destroy_unpins_its_regions(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(2 * PAGE_SIZE)
    vm = host.create_vm(PID)
    sev(vm, uapi.KVM_SEV_INIT)
    vm.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    vm.reg_region(PID, 0, 2 * PAGE_SIZE)
    vm.put()
    assert vm.sev.pages_locked == 0 and vm.sev.regions_list == [] and vm.memory is None


def test_immediate_exit_completes_the_pending_exit_and_returns_eintr(
    memfd: Callable[[int], Memfd],
) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "plain")
    vmm = Vmm()
    vcpu = vm.vcpus[0]
    while True:  # run to the doorbell IN
        exit_ = vcpu.run(PID, **vmm.pending.pop(0, {}))
        io = exit_.io
        if io is not None and io.port == uapi.DOORBELL_OUT_PORT:
            vmm.sums[0] = int.from_bytes(io.data, "little")
        if io is not None and io.direction == uapi.KVM_EXIT_IO_IN:
            break
    pending = vcpu.pending
    assert pending == exit_
    steps = vcpu.steps
    expect_errno(
        errno.EINTR, lambda: vcpu.run(PID, immediate_exit=True, io_data=(0).to_bytes(4, "little"))
    )
    assert vcpu.pending is None and vcpu.steps == steps
    assert vcpu.get_regs(PID).rip == guest.RIP_DOORBELL_CHECK
    expect_errno(errno.EINTR, lambda: vcpu.run(PID, immediate_exit=True))  # nothing pending


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_a_guest_moved_mid_run_continues_its_seq_on_the_new_vm(
    memfd: Callable[[int], Memfd], mode: str
) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    src = launch_guest(host, ram, mode)
    vmm = Vmm()
    for _ in range(2):
        vmm.run(src, 0, 1)
        vmm.run(src, 1, 1)
    for i in range(PARAMS.vcpus):
        vmm.pause(src, i)
    regs = [v.get_regs(PID) for v in src.vcpus] if mode == "sev" else None
    # The new VMM: its own VM over the same memfd, then the move (and regs for sev).
    dst = host.create_vm(PID)
    dst.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    dst.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [1 << uapi.KVM_HC_MAP_GPA_RANGE])
    for i in range(PARAMS.vcpus):
        dst.create_vcpu(PID, i)
    migrate(dst, src)
    if regs is not None:
        for vcpu, r in zip(dst.vcpus, regs, strict=True):
            vcpu.set_regs(PID, r)
    expect_errno(errno.EIO, lambda: src.vcpus[0].run(PID))  # at most one VMM runs it
    for _ in range(2):
        vmm.run(dst, 0, 1)
        vmm.run(dst, 1, 1)
    assert seqs(vmm.lines, 0) == [0, 1, 2, 3] and seqs(vmm.lines, 1) == [0, 1, 2, 3]


def test_run_without_memory_is_efault(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    vm = host.create_vm(PID)
    vcpu = vm.create_vcpu(PID, 0)
    vcpu.set_regs(PID, guest.initial_regs(0))
    expect_errno(errno.EFAULT, lambda: vcpu.run(PID))
    ram = memfd(PAGE_SIZE)  # the image page only: the journal is not backed
    ram.write(0, guest.build_launch_image(guest.GuestParams(vcpus=1)))
    vm.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    expect_errno(errno.EFAULT, lambda: vcpu.run(PID))


def test_run_before_the_guest_can_enter_is_fail_entry(memfd: Callable[[int], Memfd]) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    no_launch = host.create_vm(PID)
    sev(no_launch, uapi.KVM_SEV_INIT)
    no_launch.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    assert no_launch.create_vcpu(PID, 0).run(PID).exit_reason == KVM_EXIT_FAIL_ENTRY
    no_vmsa = host.create_vm(PID)
    sev(no_vmsa, uapi.KVM_SEV_ES_INIT)
    no_vmsa.set_user_memory_region(PID, 0, 0, 0, ram.size, ram.fd, 0)
    vcpu = no_vmsa.create_vcpu(PID, 0)
    sev(no_vmsa, uapi.KVM_SEV_LAUNCH_START, {"policy": ES})
    assert vcpu.run(PID).exit_reason == KVM_EXIT_FAIL_ENTRY


def test_without_exit_hypercall_the_guest_never_exits_for_map_gpa_range(
    memfd: Callable[[int], Memfd],
) -> None:
    host = make_host()
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "plain")
    vm.enable_cap(PID, KVM_CAP_EXIT_HYPERCALL, 0, [0])
    vcpu = vm.vcpus[0]
    vmm = Vmm()
    reasons = set()
    while len(vmm.lines) < 3:
        exit_ = vcpu.run(PID, **vmm.pending.pop(0, {}))
        reasons.add(exit_.exit_reason)
        io = exit_.io
        if io is not None and io.port == uapi.SERIAL_PORT:
            vmm.lines.append(io.data)
        elif io is not None and io.direction == uapi.KVM_EXIT_IO_OUT:
            vmm.sums[0] = (vmm.sums.get(0, 0) + int.from_bytes(io.data, "little")) % (1 << 32)
        elif io is not None:
            vmm.pending[0] = {"io_data": vmm.sums.get(0, 0).to_bytes(4, "little")}
    assert uapi.KVM_EXIT_HYPERCALL not in reasons
    assert seqs(vmm.lines, 0) == [0, 1, 2]


# --- KVM_RUN in turns (enter + run_for) and MOVE's step 7 as a generator -------------------


def test_run_for_spends_the_slice_in_turns_and_a_kick_at_entry_runs_no_step(
    memfd: Callable[[int], Memfd],
) -> None:
    host = make_host(slice_ns=10_000)  # FakeClock: 1 µs per reading, so a few steps a turn
    ram = memfd(guest.required_memory(PARAMS))
    vm = launch_guest(host, ram, "plain")
    vcpu = vm.vcpus[0]
    vcpu.run(PID)  # boot: the reset vector
    assert vcpu.enter(PID) is None  # in the guest: a new slice of guest time
    turns = 0
    while (exit_ := vcpu.run_for(2_000)) is None:
        turns += 1
    assert turns >= 1  # the slice took several turns
    assert vcpu.pending is exit_
    # A kick pending when the vCPU's turn comes: the guest does not run at all.
    assert vcpu.enter(PID, io_data=b"\0\0\0\0") is None
    steps = vcpu.steps
    assert vcpu.run_for(2_000, interrupted=lambda: True) is guest.INTR_EXIT
    assert vcpu.steps == steps and vcpu.pending is guest.INTR_EXIT


def test_move_stops_at_step_7_with_the_vcpus_to_lock_destination_first() -> None:
    host = make_host()
    src = sev_vm_create(host, es=True)
    dst = aux_vm_create(host, True)
    steps = dst.enable_cap_steps(PID, MOVE, 0, [src])
    assert next(steps) == [*dst.vcpus, *src.vcpus]
    # Held at step 7: both VMs are in a migration (another MOVE gets EBUSY), nothing moved yet.
    assert dst.sev.migration_in_progress and src.sev.migration_in_progress
    assert not dst.sev.active and src.sev.active
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert done.value.value == 0
    assert dst.sev.active and src.dead and not src.sev.migration_in_progress


def test_move_interrupted_at_step_7_changes_nothing() -> None:
    # The killable vCPU locks give EINTR and everything unwinds, the cgroup charge included.
    host = cross_cgroup_host()
    src = sev_vm_create(host, es=True)
    dst = aux_vm_create(host, True, mm=PID + 1)
    before = snapshot(host)
    steps = dst.enable_cap_steps(PID + 1, MOVE, 0, [src])
    next(steps)
    assert host.cgroups.usage["/new"]["sev"] == 1  # charged at step 6
    steps.close()
    assert snapshot(host) == before
    assert host.cgroups.usage["/new"] == {"sev": 0, "sev_es": 0}
    assert migrate(dst, src, mm=PID + 1) == 0  # and a MOVE after it goes through
