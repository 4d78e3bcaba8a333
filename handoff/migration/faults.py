"""Deterministic fault injection: make a VMM fail at a named step of a handoff.

A spec is `ROLE:STEP:ACTION`, set with the hidden run flag `--x-fault` (so `handoff upgrade
--set x-fault=...` arms a successor) or at run time with the QMP command `x-set-fault`.
ROLE is `source` or `target`; STEP is a point in the protocol (see STEPS); ACTION is one of
`crash` (SIGKILL ourselves), `hang` (stop answering), `slow` (go on after SLOW_SECONDS, to
hold a window open), `exit` (exit 1 at once, fds closed by the kernel), `close` (close the
handoff connection), `garbage` (send undecodable bytes), `truncated` (send half a message),
`extra-fds` (send a message with an fd it did not declare). Tests and tools/chaos.py drive
it; it costs one comparison per step otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

import trio

from handoff.errors import HandoffError

if TYPE_CHECKING:
    from handoff.migration.peer import Peer

log = logging.getLogger("handoff.faults")

ROLES = ("source", "target")
STEPS = {
    "source": ("hello", "describe", "prepared", "paused", "switchover", "moved", "commit"),
    "target": ("hello", "describe", "prepared", "switchover", "moved", "commit", "resumed"),
}
ACTIONS = ("crash", "hang", "exit", "close", "garbage", "truncated", "extra-fds")
# Not a fault (the handoff goes on and completes), so not in the chaos matrix of ACTIONS: it
# holds a step's window open for a test (a signal in the blackout, say).
DELAYS = ("slow",)
SLOW_SECONDS = 1.0
"""How long the `slow` action holds its step: well within any --handoff-timeout."""


class FaultSpecError(ValueError):
    pass


def parse(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise FaultSpecError(f"fault {spec!r}: use ROLE:STEP:ACTION, e.g. target:moved:crash")
    role, step, action = parts
    if role not in ROLES:
        raise FaultSpecError(f"fault role {role!r}: use one of {', '.join(ROLES)}")
    if step not in STEPS[role]:
        raise FaultSpecError(f"fault step {step!r} for {role}: use one of {', '.join(STEPS[role])}")
    if action not in ACTIONS + DELAYS:
        raise FaultSpecError(f"fault action {action!r}: use one of {', '.join(ACTIONS + DELAYS)}")
    return role, step, action


class Faults:
    def __init__(self, spec: str | None = None) -> None:
        self.armed: tuple[str, str, str] | None = parse(spec) if spec else None

    def arm(self, spec: str | None) -> None:
        self.armed = parse(spec) if spec else None

    async def point(self, role: str, step: str, peer: Peer | None = None) -> None:
        """Called by source and target at each step; acts if armed for it."""
        if self.armed is None or self.armed[:2] != (role, step):
            return
        action = self.armed[2]
        self.armed = None
        log.warning("fault injection: %s at %s: %s", role, step, action)
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            os._exit(1)
        elif action == "hang":
            await trio.sleep_forever()
        elif action == "slow":
            await trio.sleep(SLOW_SECONDS)
        elif peer is not None:
            # What we send the peer is the fault; a peer that is gone already is not ours to
            # report (it would turn the fault into a crash of this process).
            try:
                await _send_fault(peer, action)
            except (HandoffError, OSError) as exc:
                log.warning("fault injection: could not %s: %s", action, exc)


async def _send_fault(peer: Peer, action: str) -> None:
    if action == "close":
        peer.close()
    elif action == "garbage":
        await peer.chan.send(b"\xc1\xff garbage \x00")
    elif action == "truncated":
        await peer.chan.send(b"\x82\xa4type")
    elif action == "extra-fds":
        r, w = os.pipe()
        try:
            await peer.chan.send(b"\x81\xa4type\xa5moved", [r])
        finally:
            os.close(r)
            os.close(w)
