"""kvmstub.client against a real daemon: the ioctl surface, errors as fcntl.ioctl raises
them, exit completions, concurrency and cancellation on one fd."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from typing import Any

import pytest
import trio
import trio.testing

from kvmstub import client, guest, uapi, wire

KvmstubDaemon = Any  # tests/conftest.py's class

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
COPY = uapi.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM


async def open_kvm(kvmstub_daemon: KvmstubDaemon) -> client.Kvm:
    return await client.open_kvm(kvmstub_daemon.socket)


async def sev_vm(kvm: client.Kvm, *, policy: int = 0, vcpus: int = 0) -> client.Vm:
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    for i in range(vcpus):
        await vm.create_vcpu(i)  # dropped: the vCPU fd closes, its VM reference goes
    await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=policy)
    return vm


class PlainGuest:
    """The guest program in a plain VM, driven by a minimal VMM loop: the doorbell device
    sums the guest's seq values, the serial port collects lines."""

    def __init__(self, vm: client.Vm, vcpu: client.Vcpu, memfd: int) -> None:
        self.vm, self.vcpu, self.memfd = vm, vcpu, memfd
        self.doorbell_sum = 0
        self.serial = b""
        self.hypercalls = 0

    @classmethod
    async def boot(cls, kvm: client.Kvm, params: guest.GuestParams) -> PlainGuest:
        memfd = os.memfd_create("guest-ram")
        os.ftruncate(memfd, guest.required_memory(params))
        os.pwrite(memfd, guest.build_launch_image(params), 0)
        vm = await kvm.create_vm()
        await vm.set_user_memory_region(0, 0, guest.required_memory(params), memfd)
        vcpu = await vm.create_vcpu(0)
        await vcpu.set_regs(guest.initial_regs(0))
        return cls(vm, vcpu, memfd)

    async def run_until(self, reason: int, *, wrong_sum: bool = False) -> uapi.RunExit:
        for _ in range(10_000):
            exit_ = await self.vcpu.run()
            io = exit_.io
            if io is not None and io.port == uapi.DOORBELL_OUT_PORT:
                self.doorbell_sum = (self.doorbell_sum + int.from_bytes(io.data, "little")) % (
                    1 << 32
                )
            elif io is not None and io.port == uapi.DOORBELL_IN_PORT:
                value = (self.doorbell_sum + (1 if wrong_sum else 0)) % (1 << 32)
                self.vcpu.complete_io(value.to_bytes(4, "little"))
            elif io is not None and io.port == uapi.SERIAL_PORT:
                self.serial += io.data
            elif exit_.hypercall is not None:
                self.hypercalls += 1
                self.vcpu.complete_hypercall(0)
            if exit_.exit_reason == reason:
                return exit_
        raise AssertionError(f"no exit {reason} in 10000 runs")

    async def run_until_doorbell_in(self) -> None:
        """Run until the guest stops at its doorbell IN: an exit whose completion (the IN
        data, answered by run_until) the next KVM_RUN hands in."""
        while True:
            exit_ = await self.run_until(uapi.KVM_EXIT_IO)
            assert exit_.io is not None
            if exit_.io.port == uapi.DOORBELL_IN_PORT:
                return


# --- the system fd ---------------------------------------------------------------------------


async def test_get_api_version_is_12(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    assert await kvm.get_api_version() == 12


async def test_check_extension_reports_move_copy_and_exit_hypercall(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    assert await kvm.check_extension(MOVE) == 1
    assert await kvm.check_extension(COPY) == 1
    assert await kvm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) == 1 << uapi.KVM_HC_MAP_GPA_RANGE
    assert await kvm.check_extension(123456) == 0


async def test_created_objects_are_real_fds_and_this_process_is_the_creator(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    vcpu = await vm.create_vcpu(0)
    for obj in (kvm, vm, vcpu):
        assert socket.socket(fileno=os.dup(obj.fileno())).type == socket.SOCK_SEQPACKET
    (info,) = (await kvm.stats())["vms"]
    assert info["creator"] == os.getpid()
    assert [v["id"] for v in info["vcpus"]] == [0]


# --- errors as the kernel gives them ---------------------------------------------------------


async def test_failures_raise_oserror_with_the_kernels_errno(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    await vm.create_vcpu(0)
    with pytest.raises(FileExistsError) as exists:  # what fcntl.ioctl raises for EEXIST
        await vm.create_vcpu(0)
    assert exists.value.errno == errno.EEXIST
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 1 << 16)
    with pytest.raises(OSError) as misaligned:
        await vm.set_user_memory_region(0, 0x123, 4096, memfd)
    assert misaligned.value.errno == errno.EINVAL
    assert misaligned.value.fw_error is None  # type: ignore[attr-defined]
    with pytest.raises(OSError) as no_sev:
        await vm.memory_encrypt_reg_region(0, 4096)
    assert no_sev.value.errno == errno.ENOTTY
    os.close(memfd)


async def test_a_firmware_failure_is_eio_with_the_sev_status_code(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    with pytest.raises(OSError) as info:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=1 << 6)  # reserved bit
    assert info.value.errno == errno.EIO
    assert info.value.fw_error == uapi.SEV_RET_INVALID_PARAM  # type: ignore[attr-defined]


# --- SEV commands and caps -------------------------------------------------------------------


async def test_sev_ioctl_returns_the_commands_output_fields(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    assert await vm.sev_ioctl(uapi.KVM_SEV_INIT) == {}
    started = await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=uapi.SEV_POLICY_NODBG)
    status = await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
    assert status == {
        "handle": started["handle"],
        "policy": uapi.SEV_POLICY_NODBG,
        "state": uapi.SEV_GUEST_STATE_LUPDATE,
    }


async def test_null_data_sends_the_kernels_null_pointer(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    owner = await sev_vm(kvm)
    mirror = await kvm.create_vm()
    await mirror.enable_cap(COPY, owner)
    with pytest.raises(OSError) as refused:  # not on the mirror allowlist
        await mirror.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, null_data=True)
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(OSError) as null:  # allowed, then copy_to_user(NULL) fails
        await mirror.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, null_data=True)
    assert null.value.errno == errno.EFAULT
    assert (await mirror.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS))["state"] == 1
    with pytest.raises(TypeError):
        await mirror.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS, null_data=True, handle=1)


async def test_enable_cap_takes_the_source_as_a_vm_or_as_an_int_fd(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    first = await sev_vm(kvm)
    second = await kvm.create_vm()
    third = await kvm.create_vm()
    assert await second.enable_cap(MOVE, first) == 0
    assert await third.enable_cap(MOVE, os.dup(second.fileno())) == 0
    modes = {vm["id"]: (vm["mode"], vm["dead"]) for vm in (await kvm.stats())["vms"]}
    assert sorted(modes.values()) == [("plain", True), ("plain", True), ("sev", False)]
    assert await third.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12) == 0
    with pytest.raises(TypeError):
        await third.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, first)
    with pytest.raises(TypeError):
        await third.enable_cap(MOVE, 1, 2, 3, 4, 5)


async def test_enable_cap_checks_flags_before_the_fd_as_the_kernel_does(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    dst = await kvm.create_vm()
    closed = os.dup(0)
    os.close(closed)
    with pytest.raises(OSError) as flags:
        await dst.enable_cap(MOVE, closed, flags=1)
    assert flags.value.errno == errno.EINVAL  # reference section 1: step 2 before step 3
    with pytest.raises(OSError) as bad_fd:
        await dst.enable_cap(MOVE, closed)
    assert bad_fd.value.errno == errno.EBADF


# --- vCPUs -----------------------------------------------------------------------------------


async def test_registers_set_are_the_registers_read(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vcpu = await (await kvm.create_vm()).create_vcpu(0)
    regs = uapi.Regs(rax=1, rbx=(1 << 64) - 1, rip=0x1000, rflags=0x202)
    await vcpu.set_regs(regs)
    assert await vcpu.get_regs() == regs


async def test_run_delivers_the_io_completion_to_the_guest(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    params = guest.GuestParams(vcpus=1, line_every=3, flip_every=10**9)
    good = await PlainGuest.boot(kvm, params)
    await good.run_until(uapi.KVM_EXIT_IO)
    for _ in range(3):  # three serial lines, each after a doorbell round
        before = good.serial.count(b"\n")
        while good.serial.count(b"\n") == before:
            await good.run_until(uapi.KVM_EXIT_IO)
    assert good.serial.startswith(b"vcpu=0 seq=0 gap_us=")
    assert b"PANIC" not in good.serial
    # A wrong IN answer reaches the guest too: it notices the sum and panics.
    bad = await PlainGuest.boot(kvm, params)
    await bad.run_until(uapi.KVM_EXIT_SHUTDOWN, wrong_sum=True)
    assert b"PANIC device" in bad.serial


async def test_run_delivers_the_hypercall_return_to_the_guest(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=10**9, flip_every=2))
    await g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
    await g.run_until(uapi.KVM_EXIT_HYPERCALL)
    await g.run_until(uapi.KVM_EXIT_HYPERCALL)
    assert g.hypercalls == 2
    assert b"PANIC" not in g.serial


async def test_immediate_exit_raises_eintr_after_taking_the_pending_completion(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=2, flip_every=10**9))
    await g.run_until_doorbell_in()
    with pytest.raises(InterruptedError):
        await g.vcpu.run(immediate_exit=True)
    regs = await g.vcpu.get_regs()
    assert regs.rip == guest.RIP_DOORBELL_CHECK  # the IN completed, the guest did not run
    assert regs.rax == g.doorbell_sum
    await g.run_until(uapi.KVM_EXIT_IO)
    assert b"PANIC" not in g.serial


async def test_immediate_exit_in_the_kvm_run_page_acts_like_the_flag(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=2, flip_every=10**9))
    await g.run_until_doorbell_in()
    g.vcpu.kvm_run.immediate_exit = True  # written in shared memory, no request
    for _ in range(3):  # every KVM_RUN until it is cleared
        with pytest.raises(InterruptedError):
            await g.vcpu.run()
    regs = await g.vcpu.get_regs()
    assert regs.rip == guest.RIP_DOORBELL_CHECK  # the IN completed once, the guest did not run
    assert regs.rax == g.doorbell_sum
    g.vcpu.kvm_run.immediate_exit = False
    await g.run_until(uapi.KVM_EXIT_IO)
    assert b"PANIC" not in g.serial


@pytest.mark.kvmstub_args("--slice-us", "1000000")  # a 1 s slice
async def test_a_kick_ends_a_slice_in_flight_at_the_next_guest_step(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    params = guest.GuestParams(vcpus=1, line_every=10**6, flip_every=10**6)
    g = await PlainGuest.boot(kvm, params)
    exits: list[uapi.RunExit] = []
    started = time.monotonic_ns()

    async def run_once() -> None:
        exits.append(await g.vcpu.run())

    with trio.fail_after(20):  # a hang guard, not a speed figure
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_once)
            await trio.sleep(0.2)  # the run is in flight inside the daemon's long slice
            g.vcpu.kvm_run.immediate_exit = True
    assert [e.exit_reason for e in exits] == [uapi.KVM_EXIT_INTR]
    g.vcpu.kvm_run.immediate_exit = False
    # The guest's own clock (rbp: the time of its last step) says the slice stopped before
    # its 1 s budget ran out: the kick, not the budget, ended it.
    last_step = (await g.vcpu.get_regs()).rbp
    assert started < last_step < started + 1_000_000_000


async def test_a_loop_of_runs_sees_its_cancellation(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=10**6, flip_every=10**6))
    runs = 0
    with trio.move_on_after(0.3) as scope:
        while True:  # no checkpoint of its own: only the client's calls can raise Cancelled
            await g.vcpu.run()
            runs += 1
    assert scope.cancelled_caught
    assert runs > 0


async def test_start_run_sends_now_and_run_takes_its_exit_with_the_completion(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=2, flip_every=10**9))
    await g.run_until_doorbell_in()
    requests = client.requests_made()
    assert g.vcpu.start_run()  # carries the IN answer run_until completed, as run() would
    assert g.vcpu.run_in_flight
    assert client.requests_made() == requests + 1
    assert not g.vcpu.start_run()  # one at a time
    exit_ = await g.vcpu.run()  # takes the started run's exit: no second request
    assert client.requests_made() == requests + 1
    assert not g.vcpu.run_in_flight
    assert exit_.exit_reason in (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_INTR, uapi.KVM_EXIT_HYPERCALL)
    for _ in range(3):
        await g.run_until(uapi.KVM_EXIT_IO)
    assert b"PANIC" not in g.serial  # the guest got the right sum through start_run


async def test_other_calls_wait_for_a_started_run_to_be_taken(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=10**6, flip_every=10**6))
    assert g.vcpu.start_run()
    with pytest.raises(RuntimeError, match="in flight"):
        await g.vcpu.run(immediate_exit=True)
    got: list[uapi.Regs] = []

    async def read_regs() -> None:
        got.append(await g.vcpu.get_regs())

    with trio.fail_after(20):  # a hang guard
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_regs)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # queued behind the run in flight, as behind vcpu->mutex
            exit_ = await g.vcpu.run()
    assert exit_.exit_reason == uapi.KVM_EXIT_INTR  # the slice ran out
    assert got and got[0].rcx > 0  # its own reply (regs after guest steps), not the exit


@pytest.mark.kvmstub_args("--slice-us", "1000000")  # a 1 s slice
async def test_start_run_declines_a_busy_or_closed_fd(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=10**6, flip_every=10**6))
    declined: list[bool] = []

    async def busy() -> None:
        # Holds the fd until its exit comes: the kick below ends it with KVM_EXIT_INTR, or
        # with EINTR when the kick is there before the guest's first step.
        with contextlib.suppress(InterruptedError):
            await g.vcpu.run()

    with trio.fail_after(20):  # a hang guard
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            await trio.testing.wait_all_tasks_blocked()
            # The run is in flight for its whole 1 s slice however slow the host is (with
            # the default slice of 200 us a loaded host answered it before this line).
            declined.append(g.vcpu.start_run())
            g.vcpu.kvm_run.immediate_exit = True  # the kick ends it at the next guest step
    g.vcpu.kvm_run.immediate_exit = False
    assert declined == [False]
    assert not g.vcpu.run_in_flight
    g.vcpu.close()
    assert not g.vcpu.start_run()


# --- one fd, many tasks --------------------------------------------------------------------


async def test_concurrent_tasks_on_one_fd_each_get_their_own_reply(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    results: dict[int, int] = {}

    async def create(i: int) -> None:
        vcpu = await vm.create_vcpu(i)
        results[i] = len((await kvm.stats())["vms"][0]["vcpus"])
        vcpu.close()

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(create, i)
    assert sorted(results) == list(range(32))


async def test_vcpus_run_concurrently_on_their_own_fds(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    params = guest.GuestParams(vcpus=4, line_every=5, flip_every=10**9)
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, guest.required_memory(params))
    os.pwrite(memfd, guest.build_launch_image(params), 0)
    vm = await kvm.create_vm()
    await vm.set_user_memory_region(0, 0, guest.required_memory(params), memfd)
    vcpus = [await vm.create_vcpu(i) for i in range(4)]
    lines: dict[int, bytes] = {i: b"" for i in range(4)}

    async def loop(i: int, vcpu: client.Vcpu) -> None:
        await vcpu.set_regs(guest.initial_regs(i))
        total = 0
        while lines[i].count(b"\n") < 3:
            exit_ = await vcpu.run()
            io = exit_.io
            if io is not None and io.port == uapi.DOORBELL_OUT_PORT:
                total = (total + int.from_bytes(io.data, "little")) % (1 << 32)
            elif io is not None and io.port == uapi.DOORBELL_IN_PORT:
                vcpu.complete_io(total.to_bytes(4, "little"))
            elif io is not None and io.port == uapi.SERIAL_PORT:
                lines[i] += io.data

    async with trio.open_nursery() as nursery:
        for i, vcpu in enumerate(vcpus):
            nursery.start_soon(loop, i, vcpu)
    for i in range(4):
        assert lines[i].startswith(f"vcpu={i} seq=0 ".encode())


async def test_a_call_cancelled_after_sending_still_reads_its_reply(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    got: list[client.Vcpu] = []

    async def create_then_cancelled(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            got.append(await vm.create_vcpu(0))  # the reply is read despite the cancel

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(create_then_cancelled, scopes)
        await trio.testing.wait_all_tasks_blocked()  # it sent and waits for the reply
        scopes[0].cancel()
    assert len(got) == 1 and not got[0].closed
    vcpu = await vm.create_vcpu(1)  # the next call on the fd gets its own reply
    assert [v["id"] for v in (await kvm.stats())["vms"][0]["vcpus"]] == [0, 1]
    vcpu.close()


# --- lifetime of the Python objects ------------------------------------------------------------


async def test_a_closed_object_raises_ebadf(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    vm.close()
    vm.close()  # idempotent, as the client's own bookkeeping
    with pytest.raises(OSError) as info:
        await vm.create_vcpu(0)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError):
        vm.fileno()


async def test_async_with_closes_the_fd(kvmstub_daemon: KvmstubDaemon) -> None:
    async with await open_kvm(kvmstub_daemon) as kvm:
        async with await kvm.create_vm() as vm:
            fd = vm.fileno()
            async with await vm.create_vcpu(0) as vcpu:
                assert not vcpu.closed
        assert vm.closed and vcpu.closed
        with pytest.raises(OSError):
            os.fstat(fd)
    assert kvm.closed


async def test_vm_from_fd_wraps_a_vm_fd_received_over_scm_rights(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    src = await sev_vm(kvm)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(a, [b"vm"], [src.fileno()])
    _, fds, _, _ = socket.recv_fds(b, 16, 1)
    received = client.Vm.from_fd(fds[0])
    dst = await kvm.create_vm()
    await dst.enable_cap(MOVE, received)
    # Same process, so the wrapped fd also works for ioctls; the VM is dead after the move.
    with pytest.raises(OSError) as info:
        await received.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS)
    assert info.value.errno == errno.EIO
    a.close()
    b.close()


async def test_an_oversized_request_is_refused_before_sending(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await sev_vm(kvm)
    with pytest.raises(OSError) as info:
        await vm.sev_ioctl(uapi.KVM_SEV_DBG_ENCRYPT, dst_uaddr=0, data=b"x" * wire.MAX_DATAGRAM)
    assert info.value.errno == errno.EINVAL
    assert (await vm.sev_ioctl(uapi.KVM_SEV_GUEST_STATUS))["state"] == 1  # fd still in step


async def test_a_daemon_that_goes_away_makes_every_call_eio(kvmstub_daemon: KvmstubDaemon) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    vm = await kvm.create_vm()
    kvmstub_daemon.stop()
    for call in (kvm.get_api_version, lambda: vm.create_vcpu(0)):
        with pytest.raises(OSError) as info:
            await call()
        assert info.value.errno == errno.EIO


def test_read_stats_is_the_blocking_stats_request(kvmstub_daemon: KvmstubDaemon) -> None:
    stats = client.read_stats(kvmstub_daemon.socket)
    assert stats["vms"] == []
    assert stats["asids"]["sev_es"]["free"] == 99


# --- what the daemon measures of a handoff -----------------------------------------------------


async def _take_over(kvm: client.Kvm, old: PlainGuest, params: guest.GuestParams) -> PlainGuest:
    """A second VM over the same memory with the old vCPU's registers, as a plain handoff
    makes one (the old vCPU stopped at a slice's end, so no exit is pending)."""
    await old.run_until(uapi.KVM_EXIT_INTR)
    regs = await old.vcpu.get_regs()
    vm = await kvm.create_vm()
    await vm.set_user_memory_region(0, 0, guest.required_memory(params), old.memfd)
    vcpu = await vm.create_vcpu(0)
    await vcpu.set_regs(regs)
    new = PlainGuest(vm, vcpu, old.memfd)
    new.doorbell_sum = old.doorbell_sum
    return new


async def test_a_vm_that_takes_a_guest_over_reports_the_blackout_its_vcpus_saw(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    """From each vCPU's last step in the old VM to its first in the VM mapping the same
    memory: the pause itself, reported by `kvmstub stats` as handoff_gap_us."""
    kvm = await open_kvm(kvmstub_daemon)
    params = guest.GuestParams(vcpus=1)
    old = await PlainGuest.boot(kvm, params)
    new = await _take_over(kvm, old, params)
    await trio.sleep(0.02)  # the blackout, as long as the VMMs make it
    await new.run_until(uapi.KVM_EXIT_IO)
    first, second = (await kvm.stats())["vms"]
    assert (first["handoff_gap_us"], first["handoff_gap_vcpus"]) == (None, 0)
    assert second["handoff_gap_vcpus"] == 1
    assert second["handoff_gap_us"] >= 20_000


async def test_no_blackout_is_reported_once_the_old_vm_is_gone(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    """A VM whose predecessor was gone before it ran (its VMM died, or the guest restarts
    from its memory) did not take a running guest over: nothing to report."""
    kvm = await open_kvm(kvmstub_daemon)
    params = guest.GuestParams(vcpus=1)
    old = await PlainGuest.boot(kvm, params)
    new = await _take_over(kvm, old, params)
    old.vcpu.close()
    old.vm.close()
    with trio.fail_after(10):
        while len((await kvm.stats())["vms"]) > 1:
            await trio.sleep(0.005)
    await new.run_until(uapi.KVM_EXIT_IO)
    assert [vm["handoff_gap_us"] for vm in (await kvm.stats())["vms"]] == [None]


async def test_a_halt_polling_daemon_runs_guests_as_any_other(
    kvmstub_dir: Any, kvmstub_factory: Any
) -> None:
    """`kvmstub serve --halt-poll-us`: the run queue empties at every exit here (one vCPU),
    and each next KVM_RUN is found by the poll rather than by a wake-up."""
    daemon = kvmstub_factory(kvmstub_dir, "--halt-poll-us", "200")
    kvm = await client.open_kvm(daemon.socket)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=20))
    for _ in range(3):
        await g.run_until(uapi.KVM_EXIT_IO)
    assert g.serial.count(b"\n") >= 1


class _Waits:
    """Counts the client's sleeps in the event loop for a reply (trio's wait_readable)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = trio.lowlevel.wait_readable

        async def counted(sock: Any) -> None:
            self.count += 1
            await real(sock)

        monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)


async def test_inside_polling_a_reply_is_awaited_without_sleeping(
    kvmstub_daemon: KvmstubDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`client.polling`: the MOVE of a handoff's blackout is answered while its caller polls
    the fd, never sleeping in the event loop; outside the block, calls sleep as before."""
    kvm = await open_kvm(kvmstub_daemon)
    source = await sev_vm(kvm)
    target = await kvm.create_vm()
    waits = _Waits(monkeypatch)
    with client.polling(10.0):
        assert await target.enable_cap(MOVE, source) == 0
        assert await kvm.get_api_version() == uapi.KVM_API_VERSION
    assert waits.count == 0
    assert await kvm.get_api_version() == uapi.KVM_API_VERSION
    assert waits.count == 1


async def test_polling_past_its_time_sleeps_for_the_reply(
    kvmstub_daemon: KvmstubDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply slower than the poll (a guest slice here) is still taken, by sleeping for it."""
    kvm = await open_kvm(kvmstub_daemon)
    g = await PlainGuest.boot(kvm, guest.GuestParams(vcpus=1, line_every=20))
    waits = _Waits(monkeypatch)
    with client.polling(1e-9):
        await g.run_until(uapi.KVM_EXIT_IO)
    assert waits.count >= 1


async def test_polling_nests_is_per_thread_and_zero_changes_nothing(
    kvmstub_daemon: KvmstubDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvm = await open_kvm(kvmstub_daemon)
    seen: list[float] = []
    with client.polling(0.5):
        with client.polling(0.25):
            assert client._POLLING.seconds == 0.25
            await trio.to_thread.run_sync(lambda: seen.append(client._POLLING.seconds))
        assert client._POLLING.seconds == 0.5
    assert seen == [0.0]  # another thread (its own event loop) does not poll
    assert client._POLLING.seconds == 0.0
    waits = _Waits(monkeypatch)
    with client.polling(0), client.polling(-1):
        await kvm.get_api_version()
    assert waits.count == 1
