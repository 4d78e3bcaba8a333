"""Source and target driven against each other in one process, on the model backend.

Every failure that fault injection (`handoff.migration.faults`) makes a VMM process commit at
a step of the handoff, here without a subprocess: both roles run in one trio nursery over a
real AF_UNIX handoff socket, each with its own `Vmm` (its own `ModelHypervisor`) over one
`ModelKernel`, as two VMM processes on one host. For each step x {crash, hang, garbage, close}
x {the source fails, the target fails} x {plain, sev-es}, the guest ends in at most one VM:
exactly one, unless the source died before its Switchover (then the guest died with it, and the
target must not run a guest it never got). Its serial seq continues on the holder, and no fd
is left open.

A process of its own is what one role needs of the other's in a failure (the fence, the
takeover): each role is given the other's as a `PeerProcess` fake whose kill() is a crash of
that role: its task is cancelled, its end of the connection and its VM closed. A `crash` fault
does the same to the role itself.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from handoff.hv import abi
from handoff.hv.model import ModelHypervisor, ModelKernel
from handoff.machine.config import GuestConfig, HostFlags, Mode
from handoff.machine.vmm import Vmm
from handoff.migration import faults, source, target
from handoff.migration.faults import Faults
from handoff.migration.host import ControlGate, PeerProcess
from handoff.migration.peer import Peer
from handoff.migration.record import HandoffRecord
from handoff.seriallog import read_logs

VCPUS = 2
TIMEOUT = 0.2  # --handoff-timeout: a hang ends within a few of these
ACTIONS = ("crash", "hang", "garbage", "close")
# A source that dies before its Switchover reached the target takes the guest with it (as a
# target that dies after its Resumed does).
GUEST_DIES_WITH_SOURCE = ("hello", "describe", "prepared", "paused")


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open_fds() -> set[int]:
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


class Role:
    """One VMM "process": its host (VmmHost), its task, and what a crash does to it."""

    def __init__(self, name: str, mode: Mode, kernel: ModelKernel, log: Path) -> None:
        policy = abi.SEV_POLICY_ES if mode == "sev-es" else 0
        self.cfg = GuestConfig(
            vcpus=VCPUS, memory=1 << 20, mode=mode, policy=policy, line_every=2, flip_every=1
        )
        self.flags = HostFlags(
            name=name,
            uuid=str(uuid.uuid4()),
            kvm="unused",
            serial_log=str(log),
            handoff_timeout=TIMEOUT,
        )
        self.hypervisor = ModelHypervisor(kernel)
        self.vmm = Vmm(self.cfg, self.flags, hypervisor=self.hypervisor)
        self.record = HandoffRecord()
        self.faults: Faults = InProcessFaults(self)
        self.token: bytes | None = None
        self.nursery: trio.Nursery | None = None
        self.control_sock: socket.socket | None = None
        self.control_path = ""
        self.control_file: tuple[int, int] | None = None
        self.setup_scope: trio.CancelScope | None = None
        self.handoff_pausing = False
        self.stop_requested = False
        self.stop_signal = ""
        self.successor_pidfd: int | None = None
        self.handed_to: tuple[int, int] | None = None
        # The "process":
        self.name = name
        self.scope = trio.CancelScope()
        self.gone = trio.Event()
        self.finished = trio.Event()  # its handoff returned, or it is gone
        self.stop = trio.Event()  # the test is done with its guest
        self.crashed = False
        self.result: bool | None = None
        self.peer: Peer | None = None
        self.dead_inodes: set[tuple[int, int]] = set()  # what only a crash leaves open
        self.other: Role | None = None

    # ---- VmmHost
    @property
    def control(self) -> ControlGate | None:
        return None

    def emit(self, event: str, data: dict[str, Any], at: float | None = None) -> None:
        pass

    def events_held(self, at_most: float = 0.0) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def start_control(self, nursery: trio.Nursery) -> None:
        pass

    def adopt_control(self, have: str) -> None:
        pass

    # ---- the process
    def crash(self) -> None:
        """SIGKILL: the task ends where it is; the kernel closes its end of the connection
        and its VM (`ended` closes the VM once the task has unwound)."""
        if self.crashed or self.gone.is_set():
            return
        self.crashed = True
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.dead_inodes.add(_inode(self.peer.chan.fileno()))
            self.peer.close()
        # What it may hold of the peer's (received: its VM, its memfds, the control socket):
        # the kernel closes those copies with the process; the peer's own stay open.
        other = self.other
        if other is not None:
            held = [*other.vmm.memfds, *([other.vmm.vm.fileno()] if other.vmm.vm else [])]
            if other.control_sock is not None:
                held.append(other.control_sock.fileno())
            self.dead_inodes.update(_inode(fd) for fd in held)
        self.scope.cancel()

    def ended(self) -> None:
        if self.crashed:
            self.vmm.close()
        self.finished.set()
        self.gone.set()


class InProcessFaults(Faults):
    """`crash` ends the role's task instead of this process."""

    def __init__(self, role: Role) -> None:
        super().__init__()
        self.role = role

    async def point(self, role: str, step: str, peer: Peer | None = None) -> None:
        if peer is not None:
            self.role.peer = peer
        if self.armed is not None and self.armed == (role, step, "crash"):
            self.armed = None
            self.role.crash()
            await trio.sleep_forever()
        await super().point(role, step, peer)


class FakeProcess:
    """The peer role as a `PeerProcess`: kill() crashes it; frozen or not, it runs only when
    this role awaits (one thread), so stop() needs no more."""

    def __init__(self, role: Role, pid: int) -> None:
        self.role = role
        self.pid = pid
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def cont(self) -> None:
        self.stopped = False

    def kill(self) -> None:
        self.role.crash()

    async def wait_stopped(self, timeout: float) -> None:
        return

    async def wait_gone(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self.role.gone.wait()
            return True
        return False

    def pidfd(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def opener(role: Role) -> Callable[[int], PeerProcess | None]:
    return lambda pid: FakeProcess(role, pid)


async def until(done: Callable[[], bool], limit: float = 10) -> None:
    with trio.fail_after(limit):
        while not done():
            await trio.sleep(0.002)


def ahead_of(vmm: Vmm, seqs: dict[int, int], lines: int = 3) -> Callable[[], bool]:
    last = vmm.devices.serial.last_seq
    return lambda: all(last.get(i, -1) >= seqs.get(i, -1) + lines for i in range(VCPUS))


async def run_source(src: Role, tgt: Role, path: str) -> None:
    try:
        with src.scope:
            async with trio.open_nursery() as n:
                await src.vmm.launch()
                src.vmm.start(n)
                src.vmm.resume()
                await until(ahead_of(src.vmm, {}))
                src.result = await source.hand_off(src, path, None, None, peer_process=opener(tgt))
                src.finished.set()
                await src.stop.wait()
                n.cancel_scope.cancel()
    finally:
        src.ended()


async def run_target(tgt: Role, src: Role, path: str) -> None:
    try:
        with tgt.scope:
            async with trio.open_nursery() as n:
                tgt.result = await target.take_over(tgt, path, n, peer_process=opener(src))
                tgt.finished.set()
                await tgt.stop.wait()
                n.cancel_scope.cancel()
    finally:
        tgt.ended()


def cases() -> Iterator[Any]:
    for mode in ("plain", "sev-es"):
        for role in faults.ROLES:
            for step in faults.STEPS[role]:
                for action in ACTIONS:
                    spec = f"{role}:{step}:{action}"
                    yield pytest.param(mode, spec, id=f"{mode}-{spec}")


@pytest.mark.parametrize(("mode", "spec"), list(cases()))
async def test_a_failing_peer_leaves_the_guest_in_exactly_one_vm(
    mode: Mode, spec: str, tmp_path: Path
) -> None:
    before = _open_fds()
    kernel = ModelKernel()
    log = tmp_path / "serial.log"
    src = Role("source", mode, kernel, log)
    tgt = Role("target", mode, kernel, log)
    src.other, tgt.other = tgt, src
    failing = src if spec.startswith("source:") else tgt
    failing.faults.arm(spec)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(tmp_path / "qmp.sock"))
    control.listen()
    src.control_sock = control
    path = str(tmp_path / "handoff.sock")
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_target, tgt, src, path)
                nursery.start_soon(run_source, src, tgt, path)
                await src.finished.wait()
                with trio.move_on_after(2 * TIMEOUT):
                    await tgt.finished.wait()
                if not tgt.finished.is_set():
                    # A hung target: after a failed handoff the source kills its successor
                    # (source._reap); after a completed one it holds the guest, paused.
                    assert spec.endswith(":hang") and spec.startswith("target:"), spec
                    if spec == "target:resumed:hang":
                        assert src.result is True
                        await check_holds_context(src, tgt, tgt)
                    tgt.crash()
                    await tgt.gone.wait()
                await check_one_holder(src, tgt, spec)
                src.stop.set()
                tgt.stop.set()
    finally:
        for role in (src, tgt):
            role.vmm.close()
            role.hypervisor.close()
            if role.control_sock is not None:
                role.control_sock.close()
        control.close()

    check_serial(log)
    # No fd left open but what only a crash leaves (the kernel closes a dead process's fds:
    # its dup of the connection, the peer's VM it held), closed here as the kernel would.
    dead = src.dead_inodes | tgt.dead_inodes
    for fd in _open_fds() - before:
        with contextlib.suppress(OSError):
            if _inode(fd) in dead:
                os.close(fd)
    gc.collect()
    kernel.sweep()  # the model kernel frees a VM whose last fd is closed when next asked
    left = [(fd, os.readlink(f"/proc/self/fd/{fd}")) for fd in sorted(_open_fds() - before)]
    assert not left


async def check_one_holder(src: Role, tgt: Role, spec: str) -> None:
    role, step, _action = spec.split(":")
    claims = []
    if src.result is False and not src.crashed:
        claims.append(src)
    if tgt.result is True and not tgt.crashed:
        claims.append(tgt)
    running = [r for r in (src, tgt) if not r.crashed and r.vmm.status == "running"]
    assert claims == running, (spec, src.result, tgt.result, src.crashed, tgt.crashed)
    lost = (role == "source" and step in GUEST_DIES_WITH_SOURCE and src.crashed) or (
        role == "target" and step == "resumed" and tgt.crashed  # (or hung, then killed)
    )
    expected = 0 if lost else 1
    assert len(claims) == expected, (spec, src.result, tgt.result, src.crashed, tgt.crashed)
    if not claims:
        return
    holder = claims[0]
    # The guest runs on there: its seq continues.
    await until(ahead_of(holder.vmm, dict(holder.vmm.devices.serial.last_seq)))
    await holder.vmm.pause()
    await check_holds_context(src, tgt, holder)


async def check_holds_context(src: Role, tgt: Role, holder: Role) -> None:
    """SEV-ES: exactly one VM may still run the guest (KVM_RUN with immediate_exit says EIO
    on any other)."""
    if src.cfg.mode == "sev-es":
        holds = [r for r in (src, tgt) if r.vmm.vm is not None and await r.vmm.holds_context()]
        assert holds == [holder]


def check_serial(log: Path) -> None:
    """One guest, one serial stream: every vCPU's seq contiguous from 0, whichever VMM printed
    it, and no PANIC (the witness's own judgement, handoff.seriallog)."""
    assert read_logs([str(log)]).problems(VCPUS) == []
