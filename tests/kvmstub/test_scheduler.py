"""kvmstub's run queue against a real daemon: vCPUs in KVM_RUN take turns on the daemon's CPU
(one quantum each), so one vCPU's slice never holds out another vCPU or an ioctl; a vCPU in
KVM_RUN holds its vcpu->mutex, so its other ioctls wait for the run; MOVE waits at reference
section 1 step 7 for the running vCPUs of both VMs, while its earlier checks still fail at
once; a run whose vCPU fd goes away is dropped without harm; `--quantum-us`.

No test measures speed: progress and order are read from the daemon (vCPU steps in its
statistics, registers, which reply comes first); timeouts only guard against hangs.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from test_daemon import Raw  # a kvmstub fd driven by hand on a blocking socket

from kvmstub import client, guest, uapi, wire

KvmstubDaemon = Any  # tests/conftest.py's class

MOVE = uapi.KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM
INTR = uapi.KVM_EXIT_INTR
NEVER = 1 << 40  # line_every / flip_every: the guest never exits by itself
GUARD = 10.0  # seconds: a hang guard, never a speed figure
LONG_SLICE = pytest.mark.kvmstub_args("--slice-us", "1000000")  # 1 s of guest time per run


# --- helpers --------------------------------------------------------------------------------


async def guest_vm(
    kvm: client.Kvm, nr_vcpus: int, *, sev: bool = False
) -> tuple[client.Vm, list[client.Vcpu], int]:
    """A VM running the guest program on `nr_vcpus` vCPUs that never exit by themselves:
    plain, or SEV (INIT, LAUNCH_START, the image encrypted in place, MEASURE, FINISH).
    Returns the VM, its vCPUs and the VM's id in the daemon's statistics."""
    params = guest.GuestParams(vcpus=nr_vcpus, line_every=NEVER, flip_every=NEVER)
    vm = await kvm.create_vm()
    vm_id = (await kvm.stats())["vms"][-1]["id"]
    if sev:
        await vm.sev_ioctl(uapi.KVM_SEV_INIT)
    vcpus = [await vm.create_vcpu(i) for i in range(nr_vcpus)]
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, guest.required_memory(params))
    os.pwrite(memfd, guest.build_launch_image(params), 0)
    await vm.set_user_memory_region(0, 0, guest.required_memory(params), memfd)
    os.close(memfd)  # the daemon keeps its own copy
    if sev:
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_START, handle=0, policy=0)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uaddr=0, len=uapi.PAGE_SIZE)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_MEASURE, handle=0)
        await vm.sev_ioctl(uapi.KVM_SEV_LAUNCH_FINISH)
    for i, vcpu in enumerate(vcpus):
        await vcpu.set_regs(guest.initial_regs(i))
    return vm, vcpus, vm_id


async def vm_info(kvm: client.Kvm, vm_id: int) -> dict[str, Any]:
    (info,) = [vm for vm in (await kvm.stats())["vms"] if vm["id"] == vm_id]
    return info


async def steps(kvm: client.Kvm, vm_id: int) -> list[int]:
    """Guest steps each vCPU of the VM has run so far (the daemon's count)."""
    return [v["steps"] for v in (await vm_info(kvm, vm_id))["vcpus"]]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    with trio.fail_after(GUARD):
        while not await condition():
            await trio.sleep(0.01)


async def progress(kvm: client.Kvm, vm_id: int, vcpus: list[int]) -> list[int]:
    """Wait until each of `vcpus` has run more guest steps than now; returns the counts."""
    before = await steps(kvm, vm_id)
    now: list[int] = before

    async def advanced() -> bool:
        nonlocal now
        now = await steps(kvm, vm_id)
        return all(now[i] > before[i] for i in vcpus)

    await until(advanced)
    return now


def raw_copy(obj: client.Vm | client.Vcpu) -> Raw:
    """Another fd of the same open file (os.dup): it shares the socket's reply queue."""
    return Raw(socket.socket(fileno=os.dup(obj.fileno())))


def answered(raw: Raw) -> bool:
    return bool(select.select([raw.sock], [], [], 0)[0])


def raw_move(dst: Raw, src: client.Vm, request_id: int) -> None:
    """KVM_ENABLE_CAP(MOVE) sent by hand, so that a test can wait for its reply with a
    timeout (the client reads every reply it asked for, shielded from cancellation)."""
    request = wire.EnableCap(request_id, MOVE, 0, (src.fileno(),), fd_arg=0)
    dst.send(wire.encode(request), [src.fileno()])


async def errno_of(call: Awaitable[object]) -> int:
    try:
        await call
    except OSError as e:
        assert e.errno is not None
        return e.errno
    return 0


# --- time sharing ---------------------------------------------------------------------------


@LONG_SLICE
async def test_two_vcpus_in_kvm_run_both_progress_and_other_requests_are_served(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    _vm, vcpus, vm_id = await guest_vm(kvm, 3)
    exits: dict[int, uapi.RunExit] = {}

    async def run(i: int) -> None:
        exits[i] = await vcpus[i].run()

    async with trio.open_nursery() as nursery:
        for i in (0, 1):
            nursery.start_soon(run, i)
        await progress(kvm, vm_id, [0, 1])
        await progress(kvm, vm_id, [0, 1])  # and on: they take turns, neither holds the CPU
        # Served between quanta, not after a 1 s slice: both runs are still going.
        assert await kvm.check_extension(MOVE) == 1
        assert await vcpus[2].get_regs() == guest.initial_regs(2)  # the idle third vCPU
        assert (await steps(kvm, vm_id))[2] == 0
        assert exits == {}
        for vcpu in vcpus[:2]:
            vcpu.kvm_run.immediate_exit = True
    assert [exits[0].exit_reason, exits[1].exit_reason] == [INTR, INTR]
    for i in (0, 1):
        assert (await vcpus[i].get_regs()).rcx > 0  # the guest's own step counter


# --- vcpu->mutex ----------------------------------------------------------------------------


@LONG_SLICE
async def test_a_vcpu_ioctl_on_another_copy_of_the_fd_waits_for_the_run(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    _vm, (vcpu,), vm_id = await guest_vm(kvm, 1)
    runner, other = raw_copy(vcpu), raw_copy(vcpu)
    runner.send(wire.encode(wire.Run(1)))
    await progress(kvm, vm_id, [0])
    other.send(wire.encode(wire.GetRegs(2)))
    await trio.sleep(0.05)
    await progress(kvm, vm_id, [0])  # the run goes on with the GET_REGS in the daemon
    assert not answered(runner)  # no reply, to either request: GET_REGS waits for the mutex
    vcpu.kvm_run.immediate_exit = True
    first, _ = runner.receive()  # replies go to whichever copy reads
    second, _ = runner.receive()
    assert isinstance(first, wire.RunReply) and first.id == 1, first
    assert first.exit.exit_reason == INTR
    assert isinstance(second, wire.RegsReply) and second.id == 2, second
    # GET_REGS saw the registers the run left, not a state in the middle of it.
    assert wire.regs_from_wire(second.regs) == await vcpu.get_regs()
    assert second.regs.rcx > 0
    runner.close()
    other.close()


# --- MOVE at step 7 -------------------------------------------------------------------------


@LONG_SLICE
async def test_move_waits_for_the_running_source_vcpu_and_early_checks_fail_at_once(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, (vcpu,), src_id = await guest_vm(kvm, 1, sev=True)
    already_sev = await kvm.create_vm()
    await already_sev.sev_ioctl(uapi.KVM_SEV_INIT)
    dst = await kvm.create_vm()
    dst_id = (await kvm.stats())["vms"][-1]["id"]
    done: dict[str, Any] = {}

    async def run() -> None:
        done["run"] = await vcpu.run()

    async def move() -> None:
        done["move"] = await dst.enable_cap(MOVE, src)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await progress(kvm, src_id, [0])
        # Checks before step 7 do not wait for the run.
        assert await errno_of(dst.enable_cap(MOVE, src, flags=1)) == errno.EINVAL  # step 2
        assert await errno_of(already_sev.enable_cap(MOVE, src)) == errno.EINVAL  # step 5
        assert done == {}
        nursery.start_soon(move)
        await progress(kvm, src_id, [0])  # the guest runs on; the MOVE waits at step 7 ...
        # ... holding the migration flags of both VMs (step 4): another MOVE gets EBUSY.
        assert await errno_of((await kvm.create_vm()).enable_cap(MOVE, src)) == errno.EBUSY
        assert (await vm_info(kvm, dst_id))["mode"] == "plain"
        assert not (await vm_info(kvm, src_id))["dead"]
        assert done == {}
        vcpu.kvm_run.immediate_exit = True
    assert done["run"].exit_reason == INTR
    assert done["move"] == 0
    assert (await vm_info(kvm, dst_id))["mode"] == "sev"
    assert (await vm_info(kvm, src_id))["dead"]
    vcpu.kvm_run.immediate_exit = False
    assert await errno_of(vcpu.run()) == errno.EIO  # the source is dead


# --- a run whose fd goes away ---------------------------------------------------------------


@LONG_SLICE
async def test_a_run_whose_vcpu_fd_is_closed_is_dropped_and_the_rest_runs_on(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, vcpus, src_id = await guest_vm(kvm, 2, sev=True)
    orphan = raw_copy(vcpus[0])
    orphan.send(wire.encode(wire.Run(1)))
    exits: list[uapi.RunExit] = []

    async def run() -> None:
        exits.append(await vcpus[1].run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await progress(kvm, src_id, [0, 1])
        refcount = (await vm_info(kvm, src_id))["refcount"]
        orphan.close()
        vcpus[0].close()  # every copy: the daemon releases the fd under the queued run

        async def released() -> bool:
            return (await vm_info(kvm, src_id))["refcount"] == refcount - 1

        await until(released)
        frozen = (await steps(kvm, src_id))[0]
        await progress(kvm, src_id, [1])  # vCPU 1 runs on ...
        await progress(kvm, src_id, [1])
        assert (await steps(kvm, src_id))[0] == frozen  # ... vCPU 0 no longer does
        assert await kvm.check_extension(MOVE) == 1
        assert exits == []
        # A MOVE now waits for vCPU 1 only, not for the dropped run.
        dst = await kvm.create_vm()
        move_result: list[int] = []

        async def move() -> None:
            move_result.append(await dst.enable_cap(MOVE, src))

        nursery.start_soon(move)
        await progress(kvm, src_id, [1])
        assert move_result == []
        vcpus[1].kvm_run.immediate_exit = True
    assert [e.exit_reason for e in exits] == [INTR]
    assert move_result == [0]
    info = await vm_info(kvm, src_id)
    assert info["dead"] and [v["id"] for v in info["vcpus"]] == [0, 1]
    assert info["vcpus"][0]["steps"] == frozen
    stats = await kvm.stats()
    assert stats["warnings"] == []
    assert stats["asids"]["sev"]["used"] == 1
    vcpus[1].close()
    src.close()  # the last reference to the source: it goes, vCPU 0 (never released) too

    async def only_dst_left() -> bool:
        return [vm["mode"] for vm in (await kvm.stats())["vms"]] == ["sev"]

    await until(only_dst_left)
    assert "Traceback" not in kvmstub_daemon.log()


@LONG_SLICE
async def test_a_move_waiting_for_a_run_goes_on_when_the_runs_fd_is_closed(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    src, (vcpu,), src_id = await guest_vm(kvm, 1, sev=True)
    dst = await kvm.create_vm()
    runner, mover = raw_copy(vcpu), raw_copy(dst)
    try:
        runner.send(wire.encode(wire.Run(1)))
        await progress(kvm, src_id, [0])
        raw_move(mover, src, 7)
        # The MOVE holds the migration flags (it is past step 4) and waits at step 7.
        assert await errno_of((await kvm.create_vm()).enable_cap(MOVE, src)) == errno.EBUSY
        assert not answered(mover)
        runner.close()
        vcpu.close()  # the run is dropped: nothing holds vCPU 0 any more
        with trio.move_on_after(1.0):  # hangup seen within ~50 ms; this only bounds a hang
            await trio.lowlevel.wait_readable(mover.sock)
        assert answered(mover), "MOVE still waiting for the mutex of a dropped run"
        reply, _ = mover.receive()
        assert isinstance(reply, wire.Ok) and reply.id == 7, reply
    finally:
        mover.close()


# --- the command line -----------------------------------------------------------------------


def test_quantum_us_0_is_refused_with_the_range_and_help_names_the_flag() -> None:
    serve = [sys.executable, "-m", "kvmstub.cli", "serve", "--socket", "/nonexistent/x"]
    result = subprocess.run(
        [*serve, "--quantum-us", "0"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--quantum-us" in result.stderr
    assert "out of range: use 1..1000000" in result.stderr
    result = subprocess.run([*serve, "--help"], capture_output=True, text=True, timeout=30)
    assert "--quantum-us" in result.stdout


@pytest.mark.kvmstub_args("--quantum-us", "5")
async def test_a_5_us_quantum_runs_two_guests_to_their_exits(
    kvmstub_daemon: KvmstubDaemon,
) -> None:
    kvm = await client.open_kvm(kvmstub_daemon.socket)
    params = guest.GuestParams(vcpus=2, line_every=3, flip_every=NEVER)
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, guest.required_memory(params))
    os.pwrite(memfd, guest.build_launch_image(params), 0)
    vm = await kvm.create_vm()
    await vm.set_user_memory_region(0, 0, guest.required_memory(params), memfd)
    os.close(memfd)
    first_exit: dict[int, uapi.RunExit] = {}

    async def run_to_an_exit(i: int) -> None:
        vcpu = await vm.create_vcpu(i)
        await vcpu.set_regs(guest.initial_regs(i))
        with trio.fail_after(GUARD):
            while (exit_ := await vcpu.run()).exit_reason == INTR:
                pass
        first_exit[i] = exit_
        vcpu.close()

    async with trio.open_nursery() as nursery:
        for i in (0, 1):
            nursery.start_soon(run_to_an_exit, i)
    for i in (0, 1):
        io = first_exit[i].io
        assert io is not None and io.port == uapi.SERIAL_PORT  # its first line, after 3 steps
        assert io.data.startswith(f"vcpu={i} seq=0 ".encode())


# --- kicks ----------------------------------------------------------------------------------


class _FakeEnd:
    def __init__(self) -> None:
        self.kick = False

    def kicked(self) -> bool:
        return self.kick


class _FakeVcpu:
    """A vCPU in KVM_RUN whose guest never exits by itself: one step per turn."""

    def __init__(self) -> None:
        self.turns = 0
        self.steps = 0

    def run_for(self, budget_ns: int, interrupted: Callable[[], bool]) -> uapi.RunExit | None:
        self.turns += 1
        if interrupted():
            return guest.INTR_EXIT
        self.steps += 1
        return None


class _Answers:
    """The daemon, as far as the CPU uses it."""

    host_clock = staticmethod(time.monotonic_ns)

    def __init__(self) -> None:
        self.ended: list[tuple[int, int]] = []
        self.blackouts = self  # (first steps are not what these tests look at)

    def first_step(self, end: Any, vcpu: Any, started_ns: int) -> None:
        pass

    def end_run(self, run: Any, reply: wire.RunReply) -> None:
        self.ended.append((run.rid, reply.exit.exit_reason))


def test_a_kick_found_at_one_turn_ends_every_kicked_run_without_waiting_for_their_turns() -> None:
    """A kick stands for a signal to each vCPU thread: on a host with a CPU per vCPU they all
    leave the guest together, so the vCPUs kicked by then leave with the first one found,
    without a guest step, while the others keep their places."""
    from kvmstub import daemon

    answers = _Answers()
    cpu = daemon._Cpu(answers, 10_000)  # type: ignore[arg-type]
    runs = [daemon._InRun(_FakeEnd(), _FakeVcpu(), rid) for rid in range(4)]  # type: ignore[arg-type]
    for run in runs:
        cpu.add(run)
    assert cpu.take_turn(runs[1], 10_000)  # not kicked: a guest step, still in KVM_RUN
    for i in (0, 2, 3):
        runs[i].end.kick = True  # type: ignore[attr-defined]
    cpu.end_kicked()  # what the run queue does once a turn has found its vCPU kicked
    assert sorted(answers.ended) == [(0, INTR), (2, INTR), (3, INTR)]
    for i in (0, 2, 3):
        assert runs[i].vcpu.steps == 0  # type: ignore[attr-defined]
    assert runs[1].vcpu.steps == 1  # type: ignore[attr-defined]
    assert cpu.quantum_ns() == 10_000
    cpu.end_kicked()  # nothing more to end; the unkicked run stays queued
    assert len(answers.ended) == 3
    runs[1].end.kick = True  # type: ignore[attr-defined]
    cpu.end_kicked()
    assert sorted(answers.ended)[1] == (1, INTR)


class _Polled(_Answers):
    """The daemon as the halt poll sees it: its clock (set by the test) and its count of
    requests served."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.requests_served = 0
        self.host_clock = lambda: self.now  # type: ignore[method-assign, assignment]


async def _rounds(n: int = 5) -> None:
    for _ in range(n):
        await trio.lowlevel.checkpoint()


async def test_halt_polling_looks_for_work_until_quiet_for_its_whole_window() -> None:
    """As KVM's halt_poll_ns: with no vCPU to run the CPU keeps looking for work, and every
    request served meanwhile (the MOVE inside a handoff's blackout, say) starts the window
    again; only a window without any lets it sleep."""
    from kvmstub import daemon

    polled = _Polled()
    cpu = daemon._Cpu(polled, 10_000, halt_poll_ns=1000)  # type: ignore[arg-type]
    found: list[bool] = []

    async def poll() -> None:
        found.append(await cpu._poll())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await _rounds()
        polled.now, polled.requests_served = 900, 1  # a request: a new window from 900
        await _rounds()
        polled.now = 1800
        await _rounds()
        assert found == []  # quiet for 900 of its 1000
        polled.now = 1901
        await _rounds()
        assert found == [False]  # quiet for the whole window: sleep

        nursery.start_soon(poll)
        await _rounds()
        cpu.add(daemon._InRun(_FakeEnd(), _FakeVcpu(), 1))  # type: ignore[arg-type]
        await _rounds()
        assert found == [False, True]  # a vCPU to run: no sleep


async def test_without_halt_polling_the_cpu_sleeps_at_once() -> None:
    from kvmstub import daemon

    cpu = daemon._Cpu(_Polled(), 10_000)  # type: ignore[arg-type]
    assert await cpu._poll() is False
