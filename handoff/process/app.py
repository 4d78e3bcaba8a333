"""`handoff run`: one VMM process, from boot (or takeover) to exit.

It wires the machine (`vmm`), the QMP control server (`control`), and the two roles of the
handoff (`source`, `target`). The control socket is created once, by the first VMM of a VM;
every successor receives the listening socket itself in the handoff and serves it from the
resume on, so its path never changes for clients.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import trio

from handoff import __version__
from handoff.errors import HandoffError, Refused
from handoff.hv import abi
from handoff.hv.backends import KVMSTUB
from handoff.machine.config import GuestConfig, HostFlags, format_size, read_token, read_token_fd
from handoff.machine.vmm import Vmm, freeze_startup_objects
from handoff.migration.faults import Faults, FaultSpecError
from handoff.migration.record import HandoffRecord
from handoff.migration.rehearsal import rehearse
from handoff.migration.remote_source import (
    THROTTLE_INCREMENT,
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    MigrateOptions,
    MigrationFailed,
    RemoteSource,
    check_migratable,
    throttle_problem,
)
from handoff.migration.remote_target import BurntSessions, RemoteTarget
from handoff.migration.source import hand_off
from handoff.migration.target import take_over
from handoff.process import runtime
from handoff.process.flags import (
    RemoteFlags,
    apply_sets,
    check_run_args,
    checking_parser,
    host_flags,
    is_tcp_incoming,
    strip_flags,
)
from handoff.protocol import remote
from handoff.qmp.server import ControlServer, QMPCommandError
from handoff.system import hardening, logs, notify
from handoff.transport import tcp

# Everything (source, target and cli too) is imported at start, not when first needed: a VMM
# runs for months, and by the time it hands off the package on disk may be a newer release (that
# is what an upgrade in place looks like). This process must run only the release it started as.
from handoff.transport.unix import (
    bind_owned,
    check_directory,
    file_identity,
    rename_noreplace,
    socket_answers,
    unix_uri_path,
    unlink_if_same,
)

log = logging.getLogger("handoff.app")

SEV_STATES = {
    abi.SEV_GUEST_STATE_UNINIT: "uninit",
    abi.SEV_GUEST_STATE_LUPDATE: "launch-update",
    abi.SEV_GUEST_STATE_LSECRET: "launch-secret",
    abi.SEV_GUEST_STATE_RUNNING: "running",
    abi.SEV_GUEST_STATE_SUPDATE: "send-update",
    abi.SEV_GUEST_STATE_RUPDATE: "receive-update",
    abi.SEV_GUEST_STATE_SENT: "sent",
}


#: STATUS= lines sent to systemd as a handoff passes these HANDOFF event states.
HANDOFF_STATUS_LINES = {
    "active": "the target is preparing its VM (guest running)",
    "device": "guest paused, switching over to the target",
}


EVENTS_HELD_AT_MOST = 0.05
"""Seconds events raised inside the blackout may be held back (App.events_held)."""


def bind_control(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """The QMP listening socket, created by the first VMM of a VM, and the identity of its file
    (to remove only that file at exit). The same binder as the handoff socket's: the directory
    is created 0700 or must be ours and private, the socket is 0600 from bind, and nothing but
    a stale socket is ever removed. A name whose entry names a live VMM is refused."""
    owner = runtime.live_owner(path)
    if owner is not None:
        raise HandoffError(
            f"VM {owner.name!r} is already running under pid {owner.pid} (its entry "
            f"{runtime.entry_path(path)}, control socket {path}); stop it first, or choose "
            "another --name or --control"
        )
    return bind_owned(path, socket.SOCK_STREAM)


class App:
    """The VMM process: its machine, its control server, and its handoffs."""

    def __init__(
        self,
        cfg: GuestConfig,
        flags: HostFlags,
        program: Sequence[str],
        run_args: Sequence[str],
        remote: RemoteFlags | None = None,
    ) -> None:
        self.cfg = cfg
        self.flags = flags
        self.remote = remote or RemoteFlags(tls=None, sev_sessions="")
        # The cross-host migration under way (this VMM its source), or the last one's result.
        self.migration: RemoteSource | None = None
        self.migration_result: dict[str, Any] | None = None
        self.migration_sent = False  # SEND_FINISH done: this VMM never runs the guest again
        # The target of a cross-host migration while it waits (for migrate-resolve).
        self.incoming: RemoteTarget | None = None
        self.operator_resolved = False
        self.program = list(program)
        self.run_args = list(run_args)
        self.vmm = Vmm(cfg, flags)
        self.control: ControlServer | None = None
        self.control_sock: socket.socket | None = None
        self.control_file: tuple[int, int] | None = None  # (st_dev, st_ino) of its socket file
        self.control_path = flags.control or ""
        self.record = HandoffRecord()
        self.faults = Faults(flags.fault)
        # The operator's token for `handoff {uri}` (and for the handoff this VMM receives).
        self.token: bytes | None = None
        if flags.token_fd is not None:  # a successor: its old VMM's one-time token, on a pipe
            self.token = read_token_fd(flags.token_fd)
        elif flags.token_file:
            self.token = read_token(flags.token_file)
        self.handoff_busy = False
        self.finished = trio.Event()
        self.exit_code = 0
        self.started = time.time()
        self.hardening: dict[str, Any] = {}
        self.successor: subprocess.Popen[bytes] | None = None
        # A pidfd of the successor we spawned, taken before it could be reaped: only that very
        # process may take the guest (see source._check_successor).
        self.successor_pidfd: int | None = None
        self.nursery: trio.Nursery | None = None
        self.ready = False  # the guest runs here (READY=1 sent)
        self.stop_requested = False  # a signal asked us to stop during a handoff
        self.stop_signal = ""  # its name, for the logs and the handoff's error
        # Set by the source while its handoff's setup runs (a stop then cancels it), and once
        # the guest is about to be paused (a stop then waits for the outcome: see
        # _stop_during_handoff); and, once it handed the guest on, who took it (pid, pidfd).
        self.setup_scope: trio.CancelScope | None = None
        self.handoff_pausing = False
        self.handed_to: tuple[int, int] | None = None
        self.handed_off = False  # the guest went on to a successor: exit without finalizing
        self._held_events: list[tuple[str, dict[str, Any], float]] | None = None

    # --------------------------------------------------------------- lifecycle
    async def main(self, incoming: str | None) -> int:
        try:
            return await self._main(incoming)
        finally:
            # Inside trio: closing kvmstub fds wakes tasks that may still wait on them.
            self.cleanup(
                # Only the process serving the control socket removes it: not a source that
                # handed it on, nor a target that never took it over (the source still serves).
                remove_control=(self.record.role == "target") == (self.record.status == "completed")
            )

    async def _main(self, incoming: str | None) -> int:
        try:
            self.hardening = hardening.harden(f"handoff:{self.flags.name}")
        except Exception as exc:  # a missing prctl must not stop a VM; say so
            log.warning("process hardening unavailable: %s", exc)
        if incoming is None:
            await self.launch()
        checking_parser()  # built now, not inside an upgrade command (see its docstring)
        freeze_startup_objects()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self._watch_signals)
            if incoming is None:
                self.start_running(nursery)
            elif is_tcp_incoming(incoming):
                if not await self.receive_migration(incoming, nursery):
                    nursery.cancel_scope.cancel()
                    return 1
            else:
                ok = await take_over(self, incoming, nursery)
                if not ok:
                    nursery.cancel_scope.cancel()
                    return 1
            nursery.start_soon(self._watch_context)
            await trio.lowlevel.checkpoint()  # vCPU tasks first (see target.take_over)
            await self.publish_entry()
            await trio.lowlevel.checkpoint()
            ready = ["READY=1", f"STATUS=guest running ({self.cfg.mode})"]
            if incoming is not None:
                # Past the commit point the guest is ours: claim the service now, so that it
                # stays up even if the old VMM dies before it hands MAINPID= over itself.
                ready.insert(1, f"MAINPID={os.getpid()}")
            notify.notify(*ready)
            self.ready = True
            if self.stop_requested:
                self.shutdown(0)
            await self.finished.wait()
            nursery.cancel_scope.cancel()
        return self.exit_code

    async def launch(self) -> None:
        self._t_launch = time.perf_counter()
        await self.vmm.launch()
        await rehearse(self.vmm, inline_max=self.flags.vcpu_states_inline_max, describe=None)
        assert self.flags.control is not None
        self.control_sock, self.control_file = bind_control(self.flags.control)

    def start_running(self, nursery: trio.Nursery) -> None:
        t0 = self._t_launch
        self.start_control(nursery)
        self.vmm.start(nursery)
        self.vmm.resume()
        log.info(
            "guest %s running: %s, %d vCPUs, %s, launched in %.1f ms; control %s",
            self.flags.name,
            self.cfg.mode,
            self.cfg.vcpus,
            format_size(self.cfg.memory),
            (time.perf_counter() - t0) * 1e3,
            self.flags.control,
        )

    async def receive_migration(self, incoming: str, nursery: trio.Nursery) -> bool:
        """The target of a cross-host SEV migration: our own control socket (another host's
        VMM has its own), then wait for a source on `incoming` (mutual TLS). True once the
        guest runs here."""
        assert self.flags.control is not None and self.remote.tls is not None
        # Listening before the control socket answers: a caller that waits for that socket
        # (a test, an orchestrator) can connect to the migration address at once.
        listener = await tcp.listen(incoming, self.remote.tls)
        try:
            self.control_sock, self.control_file = bind_control(self.flags.control)
        except BaseException:
            await listener.aclose()
            raise
        self.vmm.status = "inmigrate"
        self.start_control(nursery)
        log.info("waiting for a cross-host migration on %s", listener.address)
        target = RemoteTarget(
            self.vmm,
            self.flags.name,
            self.flags.uuid,
            listener,
            BurntSessions(self.remote.sev_sessions),
            nursery,
            emit=lambda data: self.emit("MIGRATION", data),
            answer_timeout=self.flags.handoff_timeout,
        )
        self.incoming = target
        try:
            running = await target.run()
        finally:
            self.incoming = None
            await listener.aclose()
        if self.operator_resolved and not running:
            await trio.sleep(HANDED_OFF_LINGER)  # the operator's answer first, then exit
        self.record.role = "target"
        self.record.status = "completed" if running else "failed"
        if not running:
            log.error("no guest was received: %s", target.error or target.outcome)
        return running

    def adopt_control(self, have: str) -> None:
        """Serve the received listening socket; if our --control names another path, move the
        socket file there (a rename keeps the same listening socket). `have` is where the source
        served it (a socket's own name is stale once renamed, so the source tells us).

        The move never replaces anything: not another live VM's socket or entry (a successor
        started with another VM's name or --control keeps the socket where it is, and says whose
        the other path is), nor anything that appeared there meanwhile (a no-replace rename). A
        stale socket with no live entry is removed first, as `handoff run` would."""
        sock = self.control_sock
        want = self.flags.control
        self.control_path = have or want or ""
        if sock is not None and want and have and os.path.abspath(have) != os.path.abspath(want):
            self._move_control(have, want)
        if sock is not None:
            # What this VMM removes at exit: that very socket file, never one put there later.
            self.control_file = file_identity(self.control_path) if self.control_path else None

    def _move_control(self, have: str, want: str) -> None:
        owner = runtime.live_owner(want)
        if owner is not None:
            log.warning(
                "not moving the control socket to %s: it is VM %r's, run by pid %d; it stays at %s",
                want,
                owner.name,
                owner.pid,
                have,
            )
            return
        try:
            check_directory(os.path.dirname(os.path.abspath(want)))
            os.makedirs(os.path.dirname(os.path.abspath(want)), mode=0o700, exist_ok=True)
            if socket_answers(want):
                raise FileExistsError(f"{want} is taken (a socket something answers on, or a file)")
            unlink_if_same(want, file_identity(want))  # a stale socket, as `handoff run` removes
            rename_noreplace(have, want)
        except (OSError, Refused) as exc:
            log.warning(
                "could not move the control socket to %s (%s); it stays at %s", want, exc, have
            )
            return
        self.control_path = want
        log.info("control socket moved from %s to %s", have, want)

    def start_control(self, nursery: trio.Nursery) -> None:
        assert self.control_sock is not None
        self.control = ControlServer(self.control_sock, self.handlers())
        nursery.start_soon(self.control.serve)

    def emit(self, event: str, data: dict[str, Any], at: float | None = None) -> None:
        """A QMP event for every client (and a STATUS= line for some HANDOFF ones), now, or
        when `events_held` ends; `at` (time.time()) stamps it, by default now."""
        if self._held_events is not None:
            self._held_events.append((event, data, time.time() if at is None else at))
            return
        if self.control is not None:
            self.control.emit(event, data, at)
        if event == "HANDOFF" and data.get("status") in HANDOFF_STATUS_LINES:
            # The source's own STATUS= lines cover the start and the end of a handoff.
            notify.notify(
                f"STATUS=handoff {data.get('id', '')}: " + HANDOFF_STATUS_LINES[data["status"]]
            )

    @contextlib.contextmanager
    def events_held(self, at_most: float = EVENTS_HELD_AT_MOST) -> Iterator[None]:
        """Events raised meanwhile are delivered when it ends, or once it has lasted `at_most`
        seconds, in order, each stamped with the time it was raised. For the blackout: a QMP
        client (an operator's `handoff upgrade` following the HANDOFF events) or the service
        manager woken by one took a CPU from the two VMMs and kvmstub for 100 to 300 us of
        it, whatever its own priority (the scheduler shares CPUs between sessions first). A
        blackout that lasts (a hung target) is still reported while it lasts."""
        held: list[tuple[str, dict[str, Any], float]] = []
        self._held_events = held
        if self.nursery is not None:
            self.nursery.start_soon(self._release_events, held, at_most)
        try:
            yield
        finally:
            self._flush_events(held)

    async def _release_events(
        self, held: list[tuple[str, dict[str, Any], float]], after: float
    ) -> None:
        await trio.sleep(after)
        self._flush_events(held)

    def _flush_events(self, held: list[tuple[str, dict[str, Any], float]]) -> None:
        if self._held_events is held:
            self._held_events = None
        events = list(held)
        held.clear()
        for event, data, at in events:
            self.emit(event, data, at)

    async def _watch_context(self) -> None:
        await self.vmm.context_lost.wait()
        if self.record.status in ("device", "completed"):
            return  # our own handoff moved it: expected
        # KVM_RUN says EIO both when another VM took the context and when kvmstub is gone:
        # only in the second case has kvmstub closed our connections.
        if await self._kvmstub_gone():
            log.error(
                "kvmstub (%s) is gone: it closed this VMM's connections, and the guest it ran "
                "with them; exiting",
                self.flags.kvm,
            )
        else:
            log.error("this VM lost the guest's context (another VMM holds it now); exiting")
        self.exit_code = 3
        self.finished.set()

    async def _kvmstub_gone(self, within: float = 0.5) -> bool:
        """Whether kvmstub hung up on this VMM's VM fd (the daemon exited or was killed).
        A dying daemon's fds close one by one: the vCPU's that reported EIO may close a
        moment before this one, so it is given `within` seconds to hang up too."""
        vm = self.vmm.vm
        if vm is None:
            return False
        try:
            poller = select.poll()
            poller.register(vm.fileno(), select.POLLRDHUP)
        except OSError:
            return False
        hung_up = select.POLLHUP | select.POLLRDHUP | select.POLLERR
        with trio.move_on_after(within):
            while not any(ev & hung_up for _, ev in poller.poll(0)):
                await trio.sleep(0.01)
            return True
        return False

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        """SIGTERM (systemctl stop) and SIGINT stop the VM cleanly, wherever the guest is:
        during a handoff's setup they cancel it (the guest never left) and stop it here; once
        the guest was paused for a handoff they wait for its outcome, so that a stop never
        cuts a handoff between its commit and its end, and then stop the guest where it runs:
        here, or in the successor (the stop is passed on to it)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.handoff_busy:
                    self.stop_requested, self.stop_signal = True, name
                    self._stop_during_handoff(name)
                elif self.handed_to is not None:
                    self.pass_stop_on(name)
                elif not self.ready:
                    log.warning(
                        "%s while the guest is not running here yet: stopping it once it is", name
                    )
                    self.stop_requested, self.stop_signal = True, name
                else:
                    log.info("%s: stopping the VM", name)
                    self.shutdown(0)

    def _stop_during_handoff(self, name: str) -> None:
        if self.migration is not None:
            # A cross-host migration: cancelled before its commit point (the guest stays and
            # stops here); past it, the guest is the target's and this VMM ends with it.
            cancelled = self.migration.cancel(f"{name}: the VMM is stopping")
            log.warning(
                "%s during a migration: %s",
                name,
                "cancelling it; the guest stays here and stops with this VMM"
                if cancelled
                else "past its commit point: the guest runs on the target",
            )
            return
        if not self.handoff_pausing:
            log.warning(
                "%s during a handoff's setup: cancelling the handoff; the guest stays here "
                "and stops with this VMM",
                name,
            )
            if self.setup_scope is not None:
                self.setup_scope.cancel()  # (not started yet: the source checks at its start)
        else:
            log.warning(
                "%s during a handoff, after the guest was paused for it: waiting for its "
                "outcome; the guest stops where it then runs (passed on to the successor if "
                "it took the guest, here if not)",
                name,
            )

    def pass_stop_on(self, name: str) -> None:
        """Stop the guest in the successor that took it from us (SIGTERM through a pidfd)."""
        assert self.handed_to is not None
        pid, pidfd = self.handed_to
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except OSError as exc:
            log.warning(
                "%s: could not pass the stop on to the successor (pid %d): %s", name, pid, exc
            )
            return
        log.warning(
            "%s after the handoff: passed the stop on to the successor (pid %d), which runs the "
            "guest now and stops it",
            name,
            pid,
        )

    def shutdown(self, code: int = 0) -> None:
        notify.notify("STOPPING=1")
        self.exit_code = code
        self.finished.set()

    def cleanup(self, remove_control: bool) -> None:
        if self.control is not None:
            self.control.close_clients()
        if self.control_sock is not None:
            if remove_control and self.control_path:
                runtime.remove_entry(runtime.entry_path(self.control_path), os.getpid())
                # Only the socket file this VMM bound or took over: never one that another
                # VMM put at the same path meanwhile, nor anything that is not that socket.
                unlink_if_same(self.control_path, self.control_file)
            self.control_sock.close()
            self.control_sock = None
        self.vmm.close()

    # --------------------------------------------------------------- runtime directory
    async def publish_entry(self) -> None:
        """Write (or, after a handoff, take over) this VM's entry beside its control socket."""
        if not self.control_path:
            return
        now = time.time()
        rec = self.record
        took_over = rec.role == "target" and rec.recovery == "takeover"

        def change(old: runtime.VmEntry | None) -> runtime.VmEntry | None:
            if (
                old is not None
                and old.pid not in (os.getpid(), rec.peer_pid)
                and runtime.process_alive(old.pid, old.pid_start)
            ):
                # Another live VMM's entry (its socket was removed, or ours was put beside it):
                # never overwrite it; `handoff run` refuses such a name before it starts.
                log.warning(
                    "not writing the runtime entry beside %s: it is VM %r's, run by pid %d",
                    self.control_path,
                    old.name,
                    old.pid,
                )
                return None
            keep = old if old is not None and old.name == self.flags.name else None
            handoffs = keep.handoffs if keep is not None else 0
            last = keep.last_handoff if keep is not None else None
            if took_over:  # the source died after switchover: it will not report; we do
                handoffs += 1
                last = self._last_handoff()
            return runtime.VmEntry(
                name=self.flags.name,
                pid=os.getpid(),
                pid_start=runtime.process_start_time(os.getpid()),
                version=__version__,
                mode=self.cfg.mode,
                hypervisor=self.flags.hypervisor,
                vcpus=self.cfg.vcpus,
                memory=self.cfg.memory,
                control=os.path.abspath(self.control_path),
                started=keep.started if keep is not None else self.started,
                vmm_started=now,
                handoffs=handoffs,
                last_handoff=last,
            )

        await self._update_entry(change)

    async def record_handoff(self) -> None:
        """As the source of a handoff that ended (either way): note it in the VM's entry."""
        if not self.control_path:
            return
        completed = self.record.status == "completed"

        def change(old: runtime.VmEntry | None) -> runtime.VmEntry | None:
            if old is None or old.name != self.flags.name:
                return None
            return msgspec.structs.replace(
                old, handoffs=old.handoffs + completed, last_handoff=self._last_handoff()
            )

        await self._update_entry(change)

    def _last_handoff(self) -> runtime.LastHandoff:
        rec = self.record
        source = rec.role == "source"
        return runtime.LastHandoff(
            id=rec.id,
            status=rec.status,
            at=time.time(),
            pause_ms=rec.downtime_ms,
            total_ms=rec.total_ms,
            from_pid=os.getpid() if source else rec.peer_pid,
            to_pid=rec.peer_pid if source else os.getpid(),
            protocol=rec.protocol,
            recovery=rec.recovery,
            error=rec.error,
        )

    async def _update_entry(
        self, change: Callable[[runtime.VmEntry | None], runtime.VmEntry | None]
    ) -> None:
        """Without blocking the loop: the entry's lock may be held by the other VMM of a
        handoff (niced after it), and the vCPUs must keep being served meanwhile."""
        path = runtime.entry_path(self.control_path)
        try:
            await runtime.update_entry_async(path, change)
        except (OSError, trio.TooSlowError) as exc:  # a convenience: never a reason to stop
            log.warning("could not update the runtime entry %s: %s", path, exc or "lock busy")

    # --------------------------------------------------------------- QMP
    def handlers(self) -> dict[str, Any]:
        return {
            "query-status": self.qmp_query_status,
            "query-name": self.qmp_query_name,
            "query-sev": self.qmp_query_sev,
            "query-handoff": self.qmp_query_handoff,
            "query-memfds": self.qmp_query_memfds,
            "stop": self.qmp_stop,
            "cont": self.qmp_cont,
            "handoff": self.qmp_handoff,
            "upgrade": self.qmp_upgrade,
            "quit": self.qmp_quit,
            "x-set-fault": self.qmp_set_fault,
            "migrate": self.qmp_migrate,
            "migrate_cancel": self.qmp_migrate_cancel,
            "query-migrate": self.qmp_query_migrate,
            "migrate-resolve": self.qmp_migrate_resolve,
        }

    async def qmp_query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "running": self.vmm.status == "running",
            "singlestep": False,
            "status": self.vmm.status,
            "pid": os.getpid(),
            "version": __version__,
            "mode": self.cfg.mode,
            "hypervisor": self.flags.hypervisor,
            "vcpus": self.cfg.vcpus,
            "memory": self.cfg.memory,
            "uptime": round(time.time() - self.started, 3),
            "hardening": self.hardening,
            # The guest's output the serial log could not take (a full disk, an I/O error).
            "serial-log": self.vmm.devices.serial.status(),
            # MSR_KVM_MIGRATION_CONTROL as the guest wrote it (None: not offered to it).
            "migration-allowed": self.vmm.migration_allowed,
        }

    async def qmp_query_name(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"name": self.flags.name}

    async def qmp_query_sev(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.mode == "plain":
            raise QMPCommandError("SEV feature is not available")
        state = self.vmm.sev.get("state", abi.SEV_GUEST_STATE_RUNNING)
        hypervisor = self.vmm.hypervisor
        major, minor, build = (0, 0, 0) if hypervisor is None else hypervisor.sev_api
        return {
            "enabled": True,
            "api-major": major,
            "api-minor": minor,
            "build-id": build,
            "policy": self.cfg.policy,
            "state": SEV_STATES.get(state, "uninit"),
            "handle": self.vmm.sev.get("handle", 0),
            "sev-type": "sev",
            "es": self.cfg.mode == "sev-es",
        }

    async def qmp_query_handoff(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**self.record.to_qmp(), "hypervisor": self.flags.hypervisor}

    async def qmp_query_memfds(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "inodes": self.vmm.memfd_inodes(),
            "blocks": self.vmm.memfd_blocks(),
            "slots": [s.size for s in self.cfg.slots()],
        }

    async def qmp_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.handoff_busy:
            raise QMPCommandError("a handoff is in progress; try again when it has finished")
        await self.vmm.pause()
        self.emit("STOP", {})
        return {}

    async def qmp_cont(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.handoff_busy:
            raise QMPCommandError("a handoff is in progress; try again when it has finished")
        if self.migration_sent:
            raise QMPCommandError(
                "the guest was migrated: SEND_FINISH made this copy SENT, and it never runs "
                "here again; it runs on the target (or waits there for Commit)"
            )
        if self.record.role == "source" and self.record.status == "completed":
            # Resuming here would run a second copy of a guest that the successor runs now.
            raise QMPCommandError(
                f"the guest was handed off to the successor (pid {self.record.peer_pid}), "
                "which runs it now; this VMM is exiting: send 'cont' to the successor"
            )
        if self.vmm.status in ("guest-panicked", "shutdown"):
            raise QMPCommandError(f"the guest is {self.vmm.status}; it cannot continue")
        self.vmm.resume()
        self.emit("RESUME", {})
        return {}

    async def qmp_set_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = args.get("spec")
        if spec is not None and not isinstance(spec, str):
            raise QMPCommandError("'spec' must be ROLE:STEP:ACTION or absent (to disarm)")
        try:
            self.faults.arm(spec)
        except FaultSpecError as exc:
            raise QMPCommandError(str(exc)) from None
        return {}

    async def qmp_quit(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.handoff_busy:
            raise QMPCommandError("a handoff is in progress; quit when it has finished")
        self.shutdown(0)
        return {}

    def _begin_handoff(self) -> None:
        if self.handoff_busy:
            raise QMPCommandError(
                f"a handoff is already in progress (status {self.record.status}); "
                "wait for it to finish"
            )
        if self.vmm.status != "running":
            raise QMPCommandError(
                f"the guest is {self.vmm.status}: only a running guest can be handed off"
            )
        self.handoff_busy = True

    async def qmp_handoff(self, args: dict[str, Any]) -> dict[str, Any]:
        path = unix_uri_path(args.get("uri"))
        if path is None:
            raise QMPCommandError("'uri' must be unix:PATH, the target's handoff socket")
        copy_memory = self._copy_memory_arg(args)
        self._begin_handoff()
        assert self.nursery is not None
        self.nursery.start_soon(self._run_handoff, path, None, self.token, copy_memory)
        return {}

    async def qmp_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Migrate the guest to another host's VMM (`uri`: tcp:HOST:PORT). Answers at once;
        MIGRATION events follow (status active with the round's figures, then completed,
        failed or cancelled). Refused here, before anything is sent, for a guest that cannot
        migrate between hosts (plain, SEV-ES, NOSEND)."""
        uri = args.get("uri")
        if not isinstance(uri, str):
            raise QMPCommandError("'uri' must be tcp:HOST:PORT, the target VMM's --incoming")
        try:
            tcp.parse_address(uri)
        except tcp.AddressError as exc:
            raise QMPCommandError(str(exc)) from None
        try:
            check_migratable(self.vmm)
        except MigrationFailed as exc:
            raise QMPCommandError(str(exc)) from None
        limit = args.get("downtime-limit", 300)
        if not isinstance(limit, int | float) or isinstance(limit, bool) or limit < 1:
            raise QMPCommandError("'downtime-limit' must be a number of milliseconds >= 1")
        tls = self.remote.tls
        files = [args.get(k) for k in ("tls-cert", "tls-key", "tls-ca")]
        if any(files):
            if not all(isinstance(f, str) and os.path.isabs(f) for f in files):
                raise QMPCommandError("'tls-cert', 'tls-key', 'tls-ca': all three, absolute")
            tls = tcp.TlsFiles(*(Path(str(f)) for f in files))
        if tls is None:
            raise QMPCommandError(
                "this VMM has no TLS credentials for migration: start it with --tls-cert, "
                "--tls-key and --tls-ca, or give them to migrate"
            )
        tamper = args.get("x-tamper-page")
        record = args.get("x-record-frames")
        cut = args.get("x-break")
        breaks = ("after-received", "after-send-finish")
        if cut not in (None, *breaks, *(f"kill-{b}" for b in breaks)):
            raise QMPCommandError(
                "'x-break' must be [kill-]after-received or [kill-]after-send-finish"
            )
        min_rounds = args.get("x-min-rounds", 0)
        if not isinstance(min_rounds, int) or not 0 <= min_rounds <= remote_max_rounds():
            raise QMPCommandError("'x-min-rounds' must be a small number of rounds")
        if tamper is not None and not isinstance(tamper, int):
            raise QMPCommandError("'x-tamper-page' must be a page's sequence number")
        if record is not None and not (isinstance(record, str) and os.path.isabs(record)):
            raise QMPCommandError("'x-record-frames' must be an absolute path")
        platforms = args.get("target-platforms", [])
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise QMPCommandError("'target-platforms' must be a list of platform ids")
        if len(platforms) > remote.MAX_ALLOWED_PLATFORMS:
            raise QMPCommandError(
                f"'target-platforms' holds {len(platforms)} ids; at most "
                f"{remote.MAX_ALLOWED_PLATFORMS}"
            )
        try:
            command_list = tuple(remote.parse_platform_id(p) for p in platforms)
        except ValueError as exc:
            raise QMPCommandError(f"'target-platforms': {exc}") from None
        link = args.get("x-link-pages-per-s", 0)
        if not isinstance(link, int | float) or isinstance(link, bool) or not 0 <= link <= 1e9:
            raise QMPCommandError("'x-link-pages-per-s' must be a rate in pages per second")
        converge = self._auto_converge_args(args)
        self._begin_handoff()
        opts = MigrateOptions(
            address=uri,
            target_platforms=(self.remote.target_platforms, command_list),
            tls=tls,
            downtime_limit_ms=float(limit),
            answer_timeout=self.flags.handoff_timeout,
            x_tamper_page=tamper,
            x_record_frames=record,
            x_min_rounds=min_rounds,
            x_break=cut,
            x_link_pages_per_s=float(link),
            **converge,
        )
        self.migration = RemoteSource(
            self.vmm,
            self.flags.name,
            self.flags.uuid,
            opts,
            emit=lambda data: self.emit("MIGRATION", data),
        )
        assert self.nursery is not None
        self.nursery.start_soon(self._run_migration, self.migration)
        return {}

    @staticmethod
    def _auto_converge_args(args: dict[str, Any]) -> dict[str, Any]:
        """`migrate`'s auto-converge arguments (QEMU's names), checked, as MigrateOptions
        fields: 'auto-converge' (default true), 'cpu-throttle-initial' (20),
        'cpu-throttle-increment' (10), 'max-cpu-throttle' (99)."""
        on = args.get("auto-converge", True)
        if not isinstance(on, bool):
            raise QMPCommandError("'auto-converge' must be true or false")
        names = ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle")
        given = [name for name in names if name in args]
        if not on and given:
            raise QMPCommandError(
                f"'{given[0]}' sets auto-converge's throttle, which 'auto-converge': false "
                "turns off: give one or the other"
            )
        initial, increment, maximum = (
            args.get(name, default)
            for name, default in zip(
                names, (THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX), strict=True
            )
        )
        problem = throttle_problem(initial, increment, maximum)
        if problem is not None:
            raise QMPCommandError(problem)
        return {
            "auto_converge": on,
            "throttle_initial": initial,
            "throttle_increment": increment,
            "throttle_max": maximum,
        }

    async def qmp_migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        migration = self.migration
        if migration is None:
            raise QMPCommandError("no migration is in progress")
        if not migration.cancel():
            raise QMPCommandError(
                "the migration is past its commit point (SEND_FINISH): the guest can only "
                "run on the target now; it cannot be cancelled"
            )
        return {}

    async def qmp_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration is not None:
            return self.migration.result.to_qmp()
        incoming = self.incoming
        if incoming is not None and incoming.held is not None and incoming.channel is None:
            # A target holding a received guest in doubt: see migrate-resolve.
            session = incoming.held.session_id
            return {"status": "held", "session": session.hex() if session else ""}
        return self.migration_result or {"status": "none"}

    async def qmp_migrate_resolve(self, args: dict[str, Any]) -> dict[str, Any]:
        """The operator's decision for a guest this target holds in doubt (it said Received,
        and its source's decision never came): "finish" (RECEIVE_FINISH and run it here) or
        "give-up" (tear it down). Only once the source host is fenced: a source that resumed
        the guest and a target that finishes it run two copies. "finish" needs
        "source-fenced": true, the operator's word for it."""
        incoming = self.incoming
        if incoming is None:
            raise QMPCommandError(
                "this VMM is not the target of a cross-host migration (handoff run "
                "--incoming tcp:...): it holds no received guest"
            )
        decision = args.get("decision")
        if decision not in ("finish", "give-up"):
            raise QMPCommandError("'decision' must be finish or give-up")
        fenced = args.get("source-fenced", False)
        if not isinstance(fenced, bool):
            raise QMPCommandError("'source-fenced' must be true or false")
        if decision == "finish" and not fenced:
            raise QMPCommandError(
                "finish only once the source host is fenced (powered off, or cut off for good "
                "by its operator): a source that resumed the guest and this target would run "
                "two copies; say so with 'source-fenced': true"
            )
        session = incoming.held.session_id if incoming.held is not None else None
        try:
            outcome = await incoming.operator_resolve(decision)
        except HandoffError as exc:
            raise QMPCommandError(str(exc)) from None
        self.operator_resolved = True
        return {"outcome": outcome, "session": session.hex() if session else ""}

    async def _run_migration(self, migration: RemoteSource) -> None:
        try:
            result = await migration.run()
        finally:
            self.migration_sent = self.migration_sent or migration.sent
            self.handoff_busy = False
            self.migration = None
        self.migration_result = result.to_qmp()
        if result.status == "completed":
            log.info(
                "the guest migrated to %s (%d rounds, %d pages, pause %.1f ms); exiting",
                result.target,
                result.rounds,
                result.pages,
                result.downtime_ms,
            )
            self.ready = False
            await trio.sleep(HANDED_OFF_LINGER)
            self.handed_off = True
            self.exit_code = 0
            self.finished.set()
        elif migration.sent:
            # SENT: the firmware never runs this copy again, and neither do we.
            log.error("migration ended after SEND_FINISH without the target's word: %s", result)
        else:
            log.warning(
                "migration to %s failed: %s; the guest runs here", result.target, result.error
            )
            if self.stop_requested:
                self.shutdown(0)

    def _copy_memory_arg(self, args: dict[str, Any]) -> bool:
        value = args.get("copy-memory", False)
        if not isinstance(value, bool):
            raise QMPCommandError("'copy-memory' must be true or false")
        if value and self.cfg.mode != "plain":
            raise QMPCommandError(
                f"'copy-memory' is for plain guests; this guest is {self.cfg.mode}, whose "
                "memory only moves by reference"
            )
        return value

    async def qmp_upgrade(self, args: dict[str, Any]) -> dict[str, Any]:
        sets = args.get("set", [])
        exec_argv = args.get("exec")
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise QMPCommandError("'set' must be a list of KEY=VALUE strings")
        if exec_argv is not None and (
            not isinstance(exec_argv, list)
            or not exec_argv
            or not all(isinstance(s, str) for s in exec_argv)
        ):
            raise QMPCommandError("'exec' must be a non-empty list: PROGRAM ARGS...")
        for item in sets:
            _check_set(item)
        self._check_successor_place(sets)
        if exec_argv is not None:
            _check_exec_program(exec_argv[0])
        copy_memory = self._copy_memory_arg(args)
        self._begin_handoff()
        token = secrets.token_hex(32).encode()
        try:
            # In a thread: the parent of a vfork()ed child waits until it has exec()ed, about
            # half a millisecond during which the guest's exits would wait for this loop.
            path, proc = await trio.to_thread.run_sync(self.spawn_successor, sets, exec_argv, token)
        except Exception as exc:
            self.handoff_busy = False
            raise QMPCommandError(f"could not start the successor: {exc}") from exc
        assert self.nursery is not None
        self.nursery.start_soon(self._run_handoff, path, proc, token, copy_memory)
        return {"pid": proc.pid, "uri": f"unix:{path}"}

    def _check_successor_place(self, sets: Sequence[str]) -> None:
        """A successor must not take another VM's name, control socket or entry: refuse (before
        anything starts) a --set that empties the name or the control path, or that would move
        the control socket onto a path another live VM (or anything else) holds. The
        successor's own move is no-replace too (target._rename_control)."""
        for item in sets:
            key, _, value = item.partition("=")
            key = key.strip().lstrip("-")
            if key in ("name", "control") and not value.strip():
                raise QMPCommandError(
                    f"--set {item!r}: an empty {key} would give the successor the default "
                    f"{'name (vm0)' if key == 'name' else 'control path'}, another VM's perhaps; "
                    f"give a {key}, or leave it out to keep this VM's"
                )
        if not any(("name".startswith(k) or "control".startswith(k)) and k for k in _keys(sets)):
            return
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = checking_parser().parse_args(
                    ["run", *apply_sets(strip_flags(self.run_args, UPGRADE_FLAGS), sets)]
                )
            want = host_flags(ns).control
        except (SystemExit, HandoffError, ValueError):
            return  # a bad --set: check_run_args says what is wrong with it
        if not want or os.path.abspath(want) == os.path.abspath(self.control_path or want):
            return
        owner = runtime.live_owner(want)
        if owner is not None:
            raise QMPCommandError(
                f"the successor's control socket {want} is VM {owner.name!r}'s, run by pid "
                f"{owner.pid}: it would take over that VM's socket and entry; choose another "
                "name or --control"
            )
        if socket_answers(want):
            raise QMPCommandError(
                f"the successor's control socket {want} is taken (something answers there, or "
                "it is not a socket); choose another name or --control"
            )

    # --------------------------------------------------------------- handoff
    def spawn_successor(
        self, sets: Sequence[str], exec_argv: Sequence[str] | None, token: bytes
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """Start the successor, listening in a private directory, with a one-time token that
        only the two of us know. The token goes down a pipe the successor inherits (never a
        file, nor its command line, which every process may read), and the source accepts no
        peer but this very process (its pid, checked through a pidfd taken here): a process
        of the same uid that races for its socket cannot take the guest."""
        run_args = strip_flags(self.run_args, UPGRADE_FLAGS)
        run_args = apply_sets(run_args, sets)
        if exec_argv is None:
            check_run_args(run_args)  # the same program: refuse a bad --set before starting
        program = list(exec_argv) if exec_argv else self.program
        workdir = tempfile.mkdtemp(prefix=f"handoff-{self.flags.name}-")
        path = os.path.join(workdir, "incoming.sock")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(write_end, token)  # 64 bytes: far below a pipe's buffer, never blocks
            os.close(write_end)
            write_end = -1
            help_text = None if exec_argv is None else _run_help(program)
            on_kvmstub = self.flags.hypervisor == KVMSTUB
            if help_text is not None and not on_kvmstub and b"--hypervisor" not in help_text:
                raise HandoffError(
                    f"{program[0]} is a release without --hypervisor (older than real-KVM "
                    f"support): it cannot take a guest on {self.flags.hypervisor}; nothing "
                    "was started, the guest keeps running here"
                )
            if help_text is None or b"--token-fd" in help_text:
                token_args = ["--token-fd", str(read_end)]
            else:
                token_args = ["--token-file", _legacy_token_file(workdir, token, program[0])]
            argv = [
                *program, "run", *run_args, "--uuid", self.flags.uuid,
                "--incoming", f"unix:{path}", *token_args,
            ]  # fmt: skip
            log.info("starting successor: %s", " ".join(argv))
            proc = subprocess.Popen(
                argv, start_new_session=True, stdin=subprocess.DEVNULL, pass_fds=(read_end,)
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        try:
            pidfd = os.pidfd_open(proc.pid)  # not reaped yet: it is this child, alive or a zombie
        except OSError:
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.successor = proc
        self.successor_pidfd = pidfd
        self.record.workdir = workdir
        return path, proc

    async def _run_handoff(
        self,
        path: str,
        proc: subprocess.Popen[bytes] | None,
        token: bytes | None,
        copy_memory: bool = False,
    ) -> None:
        try:
            ok = await hand_off(self, path, proc, token, copy_memory)
        finally:
            self.handoff_busy = False
            self.setup_scope = None
            self.handoff_pausing = False
            if self.successor_pidfd is not None:
                os.close(self.successor_pidfd)
                self.successor_pidfd = None
        if ok and self.stop_requested and self.handed_to is not None:
            self.pass_stop_on(self.stop_signal)  # at once: the guest must not run on there
        elif not ok and self.stop_requested and proc is not None:
            await _end_successor(proc, self.record.workdir)  # before we go: it holds nothing
        await self.record_handoff()
        if ok:
            # Not shutdown(): the service goes on in the successor, so no STOPPING=1 (not even
            # on a signal now). The source sent MAINPID=<successor>; exit once systemd read it.
            self.ready = False
            await notify.barrier(timeout=2.0)
            # Exiting takes a CPU for milliseconds: not while the successor serves the guest's
            # first exits on a small host. The guest is not ours any more; nothing waits on us.
            await trio.sleep(HANDED_OFF_LINGER)
            self.handed_off = True
            self.exit_code = 0
            self.finished.set()
        elif self.stop_requested:
            self.shutdown(0)


#: Flags of a successor's command line that the upgrade itself sets (or must not pass on).
def _run_help(program: Sequence[str]) -> bytes:
    """What `program` (an `upgrade --exec` successor, perhaps an older release) says to
    `run --help`: whether it takes its one-time token on an inherited fd (--token-fd) and can
    run a guest on the real KVM (--hypervisor). Asked in the setup, while the guest runs (one
    start of the program, a few hundred ms of CPU)."""
    try:
        proc = subprocess.run(
            [*program, "run", "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HandoffError(f"{program[0]} run --help did not answer ({exc})") from None
    if proc.returncode != 0:
        raise HandoffError(
            f"{program[0]} run --help exited with status {proc.returncode}: is it a handoff "
            "program? " + proc.stderr.decode(errors="replace").strip()[-300:]
        )
    return proc.stdout


def _legacy_token_file(workdir: str, token: bytes, program: str) -> str:
    """The token for a successor of a release that reads it only from a file: a 0600 file in
    the successor's private directory (0700), which it removes once it has read it. A process
    of our uid could read it meanwhile, but the token alone takes no guest: we hand ours only
    to the very child we start (its pid, checked through a pidfd, `source._check_successor`)."""
    path = os.path.join(workdir, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token)
    finally:
        os.close(fd)
    log.warning(
        "%s does not take its one-time token on an inherited fd (a release older than this "
        "one): its token is in a 0600 file in its private directory for this handoff",
        program,
    )
    return path


UPGRADE_FLAGS = ("--incoming", "--uuid", "--token-file", "--token-fd")


def _keys(sets: Sequence[str]) -> list[str]:
    return [item.partition("=")[0].strip().lstrip("-") for item in sets]


def _check_set(item: str) -> None:
    """Refuse a `--set` that would name a flag the upgrade itself sets (or `help`, which
    would only print the successor's help into this VMM's log), before anything starts.
    A key names every flag it abbreviates, as the successor's parser would read it."""
    key = item.partition("=")[0].strip().lstrip("-")
    if not key:
        return  # apply_sets says what is wrong with it
    if "help".startswith(key):
        raise QMPCommandError(
            f"--set {item!r}: the successor would only print its help (into this VMM's log) "
            "and exit; see `handoff run --help` for the flags --set may change"
        )
    for flag in UPGRADE_FLAGS:
        if flag[2:].startswith(key):
            raise QMPCommandError(
                f"--set {item!r}: {flag} is set by the upgrade itself (for the successor it "
                "starts); it cannot be changed with --set"
            )


def _check_exec_program(program: str) -> None:
    """The program of `handoff upgrade --exec` must be an absolute path to an executable file:
    a relative one would resolve against this VMM's working directory, not the caller's."""
    if not os.path.isabs(program):
        raise QMPCommandError(
            f"'exec' program {program!r} is not an absolute path: it would resolve against "
            "the running VMM's working directory; give its full path (`handoff upgrade` "
            "resolves a relative one against the caller's directory)"
        )
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        what = "is not an executable file" if os.path.exists(program) else "does not exist"
        raise QMPCommandError(
            f"'exec' program {program} {what}; nothing was started, the guest keeps running here"
        )


async def _end_successor(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Kill a successor that failed to take the guest (so holds none of it) and remove its
    private directory, now: this VMM is stopping, and would not wait to reap it later."""
    if proc.poll() is None:
        proc.kill()
        with trio.move_on_after(5):
            while proc.poll() is None:
                await trio.sleep(0.01)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def remote_max_rounds() -> int:
    return 5000  # below protocol.remote.MAX_ROUNDS, with the stop-and-copy round to spare


HANDED_OFF_LINGER = 0.1
"""Seconds a VMM that handed its guest on waits before it exits (see App._run_handoff)."""


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's finalization: a VMM that handed its guest on has
    closed its fds already, and tearing down every object would take a CPU for about 8 ms
    (measured on 2 cores) from the successor and kvmstub. Logs and streams are flushed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def run_main(
    cfg: GuestConfig,
    flags: HostFlags,
    incoming: str | None,
    program: Sequence[str],
    run_args: Sequence[str],
    remote: RemoteFlags | None = None,
) -> int:
    logs.setup(flags.log_level, flags.log_format, flags.name)
    app = App(cfg, flags, program, run_args, remote)
    try:
        code = trio.run(app.main, incoming)
        if app.handed_off:
            exit_now(code)
    except (HandoffError, OSError, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if isinstance(leaf, HandoffError):
            log.error("%s", leaf)
        elif isinstance(leaf, OSError):
            log.error("cannot run the VM: %s", leaf)
        else:
            log.exception("the VMM failed")
        code = 1
    return code
