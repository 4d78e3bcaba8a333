"""CPU scheduling for the processes around a handoff. On a small host the guest-visible pause
is decided as much by who has a CPU at each instant as by the work done: the old VMM, the new
VMM, kvmstub and an operator's `handoff upgrade` all want one during the blackout."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
from collections.abc import Iterator, Sequence


def yield_cpus() -> None:
    """Lowest CPU priority for a VMM that has handed its guest on. Nice alone is not enough:
    with the scheduler's autogroups (the default on desktop and many server kernels) every
    session shares the CPUs as one group whatever its tasks' nice, and the successor runs in
    its own session; a running old VMM then kept the successor's first vCPU exits waiting
    for milliseconds. So the autogroup is lowered too (a process may always lower its own),
    but only when this VMM leads its session: the autogroup is the whole session's, and a
    VMM started from an operator's shell, a test runner or a benchmark shares it with them
    and perhaps with kvmstub, whose guests would then all run at nice 19."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if _leads_session():
        _set_autogroup_nice(19)


_AUTOGROUP = "/proc/self/autogroup"


def autogroup_nice() -> int | None:
    """This session's autogroup nice; None where the kernel has no autogroups or shows
    none for this process: it prints nothing for the root group, which holds every process
    whose session never called setsid(2) (a CI runner's, for one)."""
    try:
        with open(_AUTOGROUP) as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup_nice(nice: int) -> bool:
    """Set this session's autogroup nice (any value >= 0 needs no privilege); False if the
    kernel has no autogroups or refused (EINVAL for the root group)."""
    try:
        with open(_AUTOGROUP, "w") as f:
            f.write(str(nice))
    except OSError:
        return False
    return True


def _leads_session() -> bool:
    try:
        return os.getsid(0) == os.getpid()
    except OSError:
        return False


@contextlib.contextmanager
def waking_without_preempting() -> Iterator[None]:
    """SCHED_BATCH for this thread meanwhile: its wake-ups then do not preempt the task
    running on the CPU, which the kernel otherwise does for a task just woken. For those
    that wake during the blackout but have nothing urgent to do there:

    - the source waiting for Resumed: the target sends it and then, on the same CPU,
      starts the guest's vCPUs; a source preempting it held the resume back by 0.8 ms in
      about one handoff in three;
    - an operator's `handoff upgrade` following the HANDOFF events: a sched trace caught it
      taking the source's CPU for 100 to 200 us of the blackout while the other CPU went
      idle. (The events raised inside the blackout are now delivered after it, see
      `App.events_held`, but the ones around it still wake the client.)

    Back to SCHED_OTHER after, which an unprivileged process may always do from
    SCHED_BATCH. Threads and children started meanwhile inherit SCHED_BATCH."""
    try:
        switched = os.sched_getscheduler(0) == os.SCHED_OTHER
        if switched:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        switched = False
    try:
        yield
    finally:
        if switched:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


_lowered_from: int | None = None  # the autogroup nice before `lower_while_preparing`

# How long a new VMM stays lowered at most, in seconds of wall time. Its start and its
# preparation take 0.2 to 0.4 s on a small host. Where every CPU is busy (other guests, a
# build), nice 19 leaves it about 1.5 % of a CPU, and its ~150 ms of CPU took longer than
# its old VMM waits for its socket (15 s): every handoff on a busy host failed. Past this
# bound it prepares at the priority it started with.
LOWERED_AT_MOST_S = 1.0


def lower_while_preparing(at_most_s: float = LOWERED_AT_MOST_S) -> None:
    """For a new VMM (`handoff run --incoming`) from its first moment: its start-up and
    its preparation (about 150 ms of CPU on a small host: the interpreter, the imports,
    the VM and its vCPUs) run while the guest runs on the old VMM and kvmstub, and took
    CPUs from them. Its autogroup goes to nice 19 until `restore_for_blackout`, or for
    `at_most_s` (a SIGALRM restores it); only a session leader's (a successor spawned by
    its old VMM is one), as in `yield_cpus`. Call it from the main thread, before any
    other user of SIGALRM (the VMM has none)."""
    global _lowered_from
    if _lowered_from is not None or not _leads_session():
        return
    before = autogroup_nice()
    if before is None:
        return
    try:
        signal.signal(signal.SIGALRM, _restore_on_alarm)
    except ValueError:  # not the main thread: no bound, so not lowered
        return
    if _set_autogroup_nice(19):
        _lowered_from = before
        signal.setitimer(signal.ITIMER_REAL, at_most_s)
        # A process that exits within the bound (a refused command line, say) must not die of
        # the alarm while it exits: the interpreter's shutdown puts SIGALRM back to its default
        # action, and its parent would read exit status -14 instead of the real one.
        atexit.register(_disarm)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _restore_on_alarm(signum: int, frame: object) -> None:
    restore_for_blackout()


def lower_if_incoming(argv: Sequence[str]) -> None:
    """`lower_while_preparing` when `argv` is a new VMM's command line (`--incoming`)."""
    if any(arg.partition("=")[0] == "--incoming" for arg in argv):
        lower_while_preparing()


def restore_for_blackout() -> None:
    """Back to the priority it had before `lower_while_preparing`, before it tells the old
    VMM it is prepared: inside the blackout it must have a CPU at once. (Raising an
    autogroup's nice back to 0 or more needs no privilege.) Also what the bound's SIGALRM
    runs; the handler stays, doing nothing after."""
    global _lowered_from
    before, _lowered_from = _lowered_from, None
    if before is None:
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    _set_autogroup_nice(before)


def place_apart(kvmstub_pid: int) -> str | None:
    """Pin kvmstub (whose CPU loop runs every guest vCPU) to the last CPU this process may
    use, and this process, so every VMM it starts and their successors, to the others, as a
    deployment pins vCPU threads and a VMM's own threads apart (libvirt's vcpupin and
    emulatorpin; systemd's CPUAffinity= in contrib/systemd). Left to the scheduler on a small
    host, the wake-up of kvmstub by a VMM's request queued kvmstub on that VMM's CPU (a Unix
    socket wakes its reader as the writer's "sync" partner), where it waited about 90 µs for
    the VMM to sleep while the other CPU idled: at every exit served and every hop of the
    blackout. What was done, for a report; None (nothing done) with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    guest, vmms = cpus[-1:], cpus[:-1]
    os.sched_setaffinity(kvmstub_pid, guest)
    os.sched_setaffinity(0, vmms)
    return (
        f"kvmstub (the guest's vCPUs) on CPU {guest[0]}, the VMMs on CPU {','.join(map(str, vmms))}"
    )
