"""The one family of errors that handoff raises.

Everything below the edge (sockets, KVM calls, timeouts) is translated into one of these exactly
once, where it happens, so the rest of the code and the operator see a single vocabulary. Each
error carries a message a person can act on: what was found, what was expected, and what state
the guest is left in (for a refused handoff: the source keeps running).

    HandoffError
    +-- Refused              the peer or this side declined the handoff before anything moved
    |   +-- Incompatible     guest-visible configuration or protocol versions do not match
    |   +-- CredentialsRefused   the peer's uid is not allowed (checked before any fd crosses)
    |   +-- AuthRefused      the peer did not prove the handoff token
    +-- PeerFailed           the peer reported a failure or broke the protocol
    +-- HandoffTimeout       a step did not finish within its limit
    +-- TransportError       the connection itself failed (socket errors, malformed datagrams)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuthRefused",
    "CredentialsRefused",
    "HandoffError",
    "HandoffTimeout",
    "Incompatible",
    "PeerFailed",
    "Refused",
    "TransportError",
]


class HandoffError(Exception):
    """Base of every error handoff raises on purpose.

    Args:
        message: what happened and what to do about it, written for the operator.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Refused(HandoffError):
    """The handoff was declined before any guest state moved (busy, version, policy, ...).

    A refusal is always clean: the source keeps running its guest.
    """


class Incompatible(Refused):
    """Guest-visible configuration or protocol versions differ between source and target.

    The message names both values, e.g. "target has 8 vCPUs, source VM has 4: guest-visible
    config must match; source keeps running".
    """


class CredentialsRefused(Refused):
    """The peer process runs as a uid that is not allowed to take part in a handoff.

    Raised before any fd crosses the connection.

    Args:
        message: the full explanation.
        pid, uid, gid: the peer's credentials as the kernel reported them (SO_PEERCRED).
        allowed_uids: the uids that would have been accepted.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        allowed_uids: Iterable[int] = (),
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.allowed_uids = frozenset(allowed_uids)


class AuthRefused(Refused):
    """The peer did not prove it holds the handoff token (or holds none when we do).

    Raised before any fd crosses, except that a target learns a source's proof only with
    Describe, whose fds it then closes unused.
    """


class PeerFailed(HandoffError):
    """The peer reported an error, sent something the protocol forbids, or died mid-step."""


class HandoffTimeout(HandoffError):
    """A step of the handoff did not finish within its configured limit."""


class TransportError(HandoffError):
    """The handoff connection failed: a socket error, or a datagram that cannot be trusted
    (truncated, carrying too many fds, empty).

    Args:
        message: the explanation.
        errno: the OS errno behind it, when there is one (EPIPE: the peer is gone).
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
