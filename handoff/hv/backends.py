"""Which kernel a VMM runs its guest on, and opening it: the one way into the backends.

Two kernels sit behind the `Hypervisor` interface (DESIGN.md section 1):
- "kvm": the real Linux /dev/kvm (`handoff.hv.linux`), plain guests running real x86 code;
- "kvmstub": the kernel stand-in's daemon (`handoff.hv.kvmstub`), which also plays the SEV
  firmware, so every SEV and SEV-ES guest runs there.

`choose` turns `--hypervisor auto|kvm|kvmstub` into one of the two, with a reason a person can
act on when the asked one cannot work; `open_hypervisor` opens it. The backend modules are
imported here, when needed, and nowhere above this layer.
"""

from __future__ import annotations

import os

from .base import Hypervisor

KVM = "kvm"
KVMSTUB = "kvmstub"
KINDS = (KVM, KVMSTUB)
CHOICES = ("auto", *KINDS)
DEV_KVM = "/dev/kvm"


class NoHypervisor(ValueError):
    """The asked hypervisor cannot run this guest here; the message says why."""


def kvm_problem(path: str = DEV_KVM) -> str | None:
    """Why the real KVM at `path` cannot run a guest here (None: it can)."""
    try:
        from . import linux
    except ImportError as exc:  # pragma: no cover - the backend ships with handoff
        return f"the Linux KVM backend is not available ({exc})"
    return linux.unusable_reason(path)


def choose(asked: str, mode: str, *, kvmstub_named: bool) -> str:
    """The hypervisor for `--hypervisor asked` and a guest of `mode`.

    auto: the real KVM for a plain guest where /dev/kvm works, unless a kvmstub socket was named
    (`--kvm`, or $KVMSTUB_SOCKET), kvmstub otherwise. SEV and SEV-ES guests always run on
    kvmstub: no kernel here has the SEV firmware."""
    if asked not in CHOICES:
        raise NoHypervisor(f"--hypervisor {asked!r}: choose one of {', '.join(CHOICES)}")
    if asked == KVMSTUB:
        return KVMSTUB
    if asked == KVM:
        if mode != "plain":
            raise NoHypervisor(
                f"--hypervisor kvm cannot run a {mode} guest: this host's /dev/kvm has no SEV "
                "firmware; run it on kvmstub (--hypervisor kvmstub, or auto)"
            )
        problem = kvm_problem()
        if problem is not None:
            raise NoHypervisor(f"--hypervisor kvm: {problem}; use --hypervisor kvmstub")
        return KVM
    if mode != "plain" or kvmstub_named or kvm_problem() is not None:
        return KVMSTUB
    return KVM


def kvmstub_named() -> bool:
    """Whether the environment names a kvmstub daemon ($KVMSTUB_SOCKET)."""
    return bool(os.environ.get("KVMSTUB_SOCKET"))


def kvmstub_default_socket() -> str:
    """Where kvmstub's daemon listens unless `--kvm` says otherwise."""
    from . import kvmstub

    return kvmstub.default_socket()


def load(kind: str) -> None:
    """Import the backend `kind` names, at a VMM's start: a new VMM otherwise imported it when
    it built its VM for a handoff, 7 to 14 ms (kvmstub's client and trio's parts it pulls in)
    that the source waited for before it could pause."""
    if kind == KVM:
        from . import linux  # noqa: F401
    elif kind == KVMSTUB:
        from . import kvmstub  # noqa: F401


async def open_hypervisor(kind: str, *, kvmstub_socket: str) -> Hypervisor:
    """Open the kernel `kind` names ("kvm": /dev/kvm; "kvmstub": the daemon at the socket)."""
    if kind == KVM:
        from . import linux

        return linux.open_linux(DEV_KVM)
    if kind == KVMSTUB:
        from . import kvmstub

        return await kvmstub.open_kvmstub(kvmstub_socket)
    raise NoHypervisor(f"unknown hypervisor {kind!r}; choose one of {', '.join(KINDS)}")
