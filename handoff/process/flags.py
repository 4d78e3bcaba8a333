"""The command line of `handoff`: every subcommand's flags, their parsing and validation into a
`GuestConfig` and `HostFlags`, and the rewriting of a running VMM's flags for its successor
(`apply_sets`, `strip_flags`, `check_run_args`). The VMM process uses it at each upgrade; the
`handoff` command (`handoff.cli`) parses with it.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handoff import __version__
from handoff.hv import abi, backends
from handoff.machine.config import (
    LOG_LEVELS,
    MODES,
    ConfigError,
    GuestConfig,
    HostFlags,
    check_serial_log,
    new_uuid,
    parse_size,
    validate_guest,
    validate_name,
)
from handoff.transport import tcp
from handoff.transport.unix import unix_uri_path


def runtime_dir() -> str:
    """The host-wide directory where each VMM keeps its control socket under its VM name.

    Checked as every socket's directory is (owned by this uid, mode 0700): another user who
    made it first could replace a VMM's socket with a fake one. A missing one is fine (`handoff
    run` creates it, 0700).

    Raises:
        ConfigError: it exists but is unsafe; the message says what to fix.
    """
    if os.environ.get("HANDOFF_RUNTIME_DIR"):
        path, origin = os.environ["HANDOFF_RUNTIME_DIR"], "$HANDOFF_RUNTIME_DIR"
    elif os.getuid() == 0:
        path, origin = "/run/handoff", "the default for root"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "handoff")
        origin = "the default under $XDG_RUNTIME_DIR"
    else:
        path, origin = f"/tmp/handoff-{os.getuid()}", "the default without $XDG_RUNTIME_DIR"
    from handoff.errors import Refused
    from handoff.transport.unix import check_directory

    try:
        check_directory(path)
    except Refused as exc:
        raise ConfigError(
            f"unsafe runtime directory {path} ({origin}): {exc}. Set HANDOFF_RUNTIME_DIR to a "
            "directory of your own (mode 0700), or remove this one if it is not yours"
        ) from None
    return path


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} {value} is out of range: {lo} to {hi}")
        return value

    return parse


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _policy(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"policy {text!r} is not hexadecimal (e.g. 0x5 for NODBG|ES)"
        ) from None
    if not 0 <= value <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"policy {text} is not a 32-bit value")
    return value


def _incoming(text: str) -> str:
    """unix:PATH gives PATH (a handoff on this host); tcp:ADDR:PORT is kept whole (the target
    of a cross-host SEV migration, `is_tcp_incoming`)."""
    if text.startswith("tcp:"):
        try:
            tcp.parse_address(text, listening=True)
        except tcp.AddressError as exc:
            raise argparse.ArgumentTypeError(f"--incoming: {exc}") from None
        return text
    path = unix_uri_path(text)
    if path is None:
        raise argparse.ArgumentTypeError(
            f"--incoming {text!r}: use unix:PATH (the handoff socket to listen on), or "
            "tcp:ADDR:PORT (the target of a cross-host SEV migration)"
        )
    return path


def is_tcp_incoming(incoming: str | None) -> bool:
    return incoming is not None and incoming.startswith("tcp:")


def _downtime_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--downtime-limit {text!r} is not milliseconds") from None
    if not 1 <= value <= 60_000:
        raise argparse.ArgumentTypeError(f"--downtime-limit {value} is out of range: 1 to 60000 ms")
    return value


@dataclass(frozen=True)
class RemoteFlags:
    """The flags of cross-host migration: this host's TLS files (both roles) and where the
    sessions this host received are recorded (a target)."""

    tls: tcp.TlsFiles | None
    sev_sessions: str
    #: The guest owner's allow-list of target platforms (`--target-platform`; empty: any).
    target_platforms: tuple[str, ...] = ()


def remote_flags(ns: argparse.Namespace) -> RemoteFlags:
    given = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if any(given) and not all(given):
        raise ConfigError("--tls-cert, --tls-key and --tls-ca go together: give all three")
    tls = None
    if all(given):
        tls = tcp.TlsFiles(
            cert=Path(os.path.abspath(ns.tls_cert)),
            key=Path(os.path.abspath(ns.tls_key)),
            ca=Path(os.path.abspath(ns.tls_ca)),
        )
    if is_tcp_incoming(ns.incoming) and tls is None:
        raise ConfigError(
            f"--incoming {ns.incoming} needs --tls-cert, --tls-key and --tls-ca: no peer that "
            "cannot prove its host certificate gets a byte of a guest"
        )
    sessions = ns.sev_sessions or os.path.join(runtime_dir(), "sev-sessions")
    return RemoteFlags(
        tls=tls,
        sev_sessions=os.path.abspath(sessions),
        target_platforms=tuple(ns.target_platform),
    )


def migrate_args(ns: argparse.Namespace) -> dict[str, Any]:
    """`handoff migrate`'s auto-converge flags (and the tests' slow link) as QMP `migrate`
    arguments: only those given.

    Raises:
        ConfigError: a throttle flag with --no-auto-converge, or a first throttle above the
            cap.
    """
    from handoff.migration.remote_source import THROTTLE_INITIAL, THROTTLE_MAX, throttle_problem

    flags = {
        "cpu-throttle-initial": ns.cpu_throttle_initial,
        "cpu-throttle-increment": ns.cpu_throttle_increment,
        "max-cpu-throttle": ns.max_cpu_throttle,
    }
    given: dict[str, Any] = {name: value for name, value in flags.items() if value is not None}
    link = {"x-link-pages-per-s": ns.x_link_pages_per_s} if ns.x_link_pages_per_s else {}
    if not ns.auto_converge:
        if given:
            raise ConfigError(
                f"--{next(iter(given))} sets auto-converge's throttle, which "
                "--no-auto-converge turns off: give one or the other"
            )
        return {"auto-converge": False, **link}
    initial = given.get("cpu-throttle-initial", THROTTLE_INITIAL)
    maximum = given.get("max-cpu-throttle", THROTTLE_MAX)
    problem = throttle_problem(initial, 1, maximum, spell="--{}")
    if problem is not None:
        raise ConfigError(problem)
    return {**given, **link}


def _fault(text: str) -> str:
    from handoff.migration.faults import FaultSpecError, parse

    try:
        parse(text)
    except FaultSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number of seconds") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"timeout {value} is out of range: 0.05 to 3600 s")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the guest (guest-visible: must match across a handoff)")
    g.add_argument(
        "--vcpus", type=_int_in(1, 256, "--vcpus"), default=1, help="number of vCPUs (default 1)"
    )
    g.add_argument(
        "--memory",
        type=_size,
        default=parse_size("256M"),
        help="guest memory, e.g. 512M, 4G, 1T; a sparse memfd, so only pages the "
        "guest touches use host memory (default 256M)",
    )
    g.add_argument(
        "--mode",
        choices=MODES,
        default="plain",
        help="plain (no encryption), sev, or sev-es (registers protected too)",
    )
    g.add_argument(
        "--policy",
        type=_policy,
        default=None,
        help="SEV guest policy in hex (default: 0 for sev, 0x4 (ES) for sev-es; add 0x1 for NODBG)",
    )
    g.add_argument(
        "--line-every",
        type=_int_in(1, 1_000_000, "--line-every"),
        default=200,
        help="guest steps between two serial lines (default 200)",
    )
    g.add_argument(
        "--flip-every",
        type=_int_in(1, 1_000_000, "--flip-every"),
        default=50,
        help="guest steps between two shared/private page flips (default 50)",
    )
    g.add_argument(
        "--idle-us",
        type=_int_in(0, 1_000_000, "--idle-us"),
        default=None,
        metavar="US",
        help="the witness guest idles this many microseconds after each line, as a real "
        "guest halts between its work: the vCPU waits in the VMM and takes no CPU (0: a "
        "busy guest; default 10000 on kvm, 100 lines a second per vCPU, and 0 on kvmstub). "
        "Read at launch only",
    )
    h = p.add_argument_group("the host (free to change across a handoff)")
    h.add_argument(
        "--name", default="vm0", help="VM name; names the control socket in the runtime directory"
    )
    h.add_argument("--uuid", default=None, help=argparse.SUPPRESS)
    h.add_argument(
        "--hypervisor",
        choices=backends.CHOICES,
        default="auto",
        help="the kernel the guest runs on: kvm (the real /dev/kvm: plain guests, real x86 "
        "code), kvmstub (the kernel stand-in, which also plays the SEV firmware: every sev and "
        "sev-es guest), or auto (default): kvm for a plain guest where /dev/kvm works and no "
        "kvmstub socket is named (--kvm, $KVMSTUB_SOCKET), else kvmstub. Both VMMs of a "
        "handoff must run on the same one. On kvm a failed handoff can be rolled back only "
        "until the new VMM first runs the guest: after that it is the guest's only holder",
    )
    h.add_argument(
        "--kvm",
        default=None,
        help="kvmstub socket (default: $KVMSTUB_SOCKET, else "
        "$XDG_RUNTIME_DIR/kvmstub/kvm.sock, else /run/kvmstub/kvm.sock)",
    )
    h.add_argument(
        "--control", default=None, help="QMP control socket (default: <runtime dir>/<name>.qmp)"
    )
    h.add_argument(
        "--serial-log",
        default=None,
        help="append the guest's serial lines to this file (flushed per line; not a symlink, "
        "not a file another uid owns); lines it cannot take (a full disk) are dropped, counted "
        "in query-status and warned about, and the guest runs on",
    )
    h.add_argument(
        "--incoming",
        type=_incoming,
        default=None,
        metavar="unix:PATH|tcp:ADDR:PORT",
        help="start as a handoff target: listen on PATH and take over the VM a "
        "running VMM hands over; or, with tcp:ADDR:PORT (and --tls-*), as the target of a "
        "cross-host SEV migration (`handoff migrate NAME --to tcp:ADDR:PORT` on the source)",
    )
    h.add_argument("--tls-cert", default=None, help="this host's certificate (PEM), for migrate")
    h.add_argument("--tls-key", default=None, help="its private key (PEM, mode 0600)")
    h.add_argument("--tls-ca", default=None, help="the CA that signs the peer hosts (PEM)")
    h.add_argument(
        "--sev-sessions",
        default=None,
        metavar="FILE",
        help="where this host records every SEV migration session it received, so that a "
        "replayed stream is refused (default: sev-sessions in the runtime directory)",
    )
    h.add_argument(
        "--target-platform",
        action="append",
        default=[],
        type=_platform_id,
        metavar="ID",
        help="allow this guest to migrate only to the SEV platform with this id (repeatable; "
        "default: any platform the policy and mutual TLS admit); every `handoff migrate` of it "
        "is then refused before SEND_START unless the target's platform is listed here (and "
        "in the command's own --target-platform, if it gives any). The id is the SHA-256 of "
        "the platform's PDH: pdh_fingerprint in `kvmstub stats --json` on that host",
    )
    h.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    h.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines or one JSON object per line (default text); under systemd each "
        "line starts with its journald priority (<N>)",
    )
    h.add_argument(
        "--allow-uid",
        type=_int_in(0, 2**32 - 2, "--allow-uid"),
        action="append",
        default=[],
        metavar="UID",
        help="also accept handoff peers with this uid (repeatable; own uid always)",
    )
    h.add_argument(
        "--blackout-poll-us",
        type=_int_in(0, 100_000, "--blackout-poll-us"),
        default=0,
        metavar="N",
        help="as the new VMM of a handoff, wait for kvmstub's answer to the MOVE (inside the "
        "blackout) by polling for up to N microseconds instead of sleeping: waking a "
        "sleeping process takes tens of microseconds on a virtual machine host. Only for "
        "VMMs on CPUs apart from kvmstub's (see CPUs in the README); default 0: sleep",
    )
    h.add_argument(
        "--handoff-timeout",
        type=_timeout,
        default=10.0,
        metavar="SECONDS",
        help="longest wait for a handoff peer at any step (default 10)",
    )
    # Pins the newest protocol version this VMM speaks, so tests can play an older release.
    h.add_argument(
        "--max-protocol", type=_int_in(1, 3, "--max-protocol"), default=3, help=argparse.SUPPRESS
    )
    # Protocol 3 sends vCPU states above this many bytes in a sealed memfd (tests force it).
    h.add_argument(
        "--vcpu-states-inline-max",
        type=_int_in(0, 1 << 20, "--vcpu-states-inline-max"),
        default=128 * 1024,
        help=argparse.SUPPRESS,
    )
    h.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="require peers to prove this shared secret (HMAC challenge-response) before "
        "any fd crosses; the file must be mode 600. Upgrades always use a fresh one-time "
        "token of their own",
    )
    # Set by `handoff upgrade` only. Shown in --help: an old VMM looks for it there to tell
    # whether the program it is about to start as its successor takes the token this way.
    h.add_argument(
        "--token-fd",
        type=_int_in(3, 1 << 20, "--token-fd"),
        default=None,
        metavar="FD",
        help="read the one-time handoff token from inherited fd FD (how `handoff upgrade` "
        "passes it to the successor it starts; never a file or the command line)",
    )
    # Benchmarks: allocate every guest page up front ("fully populated" memory).
    h.add_argument("--x-prefault", action="store_true", help=argparse.SUPPRESS)
    # Fault injection for tests and tools/chaos.py (ROLE:STEP:ACTION, see handoff.migration.faults).
    h.add_argument("--x-fault", type=_fault, default=None, help=argparse.SUPPRESS)


def guest_config(ns: argparse.Namespace) -> GuestConfig:
    policy = ns.policy
    if policy is None:
        policy = abi.SEV_POLICY_ES if ns.mode == "sev-es" else 0
    cfg = GuestConfig(
        vcpus=ns.vcpus,
        memory=ns.memory,
        mode=ns.mode,
        policy=policy,
        line_every=ns.line_every,
        flip_every=ns.flip_every,
    )
    validate_guest(cfg)
    return cfg


def host_flags(ns: argparse.Namespace) -> HostFlags:
    name = validate_name(ns.name)
    hypervisor = _hypervisor(ns)
    backends.load(hypervisor)
    return HostFlags(
        name=name,
        uuid=ns.uuid or new_uuid(),
        kvm=ns.kvm or backends.kvmstub_default_socket(),
        hypervisor=hypervisor,
        idle_us=_idle_us(ns, hypervisor),
        control=ns.control or os.path.join(runtime_dir(), f"{name}.qmp"),
        serial_log=None if ns.serial_log is None else check_serial_log(ns.serial_log),
        log_level=ns.log_level,
        log_format=ns.log_format,
        allow_uids=tuple(ns.allow_uid),
        max_protocol=ns.max_protocol,
        vcpu_states_inline_max=ns.vcpu_states_inline_max,
        handoff_timeout=ns.handoff_timeout,
        fault=ns.x_fault,
        token_file=ns.token_file,
        token_fd=ns.token_fd,
        prefault=ns.x_prefault,
        blackout_poll_us=ns.blackout_poll_us,
    )


def _hypervisor(ns: argparse.Namespace) -> str:
    try:
        return backends.choose(
            ns.hypervisor, ns.mode, kvmstub_named=ns.kvm is not None or backends.kvmstub_named()
        )
    except backends.NoHypervisor as exc:
        raise ConfigError(str(exc)) from None


DEFAULT_KVM_IDLE_US = 10_000


def _idle_us(ns: argparse.Namespace, hypervisor: str) -> int:
    """The witness guest's idle after each line: the real KVM's guest idles by default (its
    x86 code would otherwise spin a host CPU per vCPU); kvmstub's is busy unless asked."""
    if ns.idle_us is not None:
        return int(ns.idle_us)
    return DEFAULT_KVM_IDLE_US if hypervisor == backends.KVM else 0


def _platform_id(text: str) -> str:
    from handoff.protocol.remote import parse_platform_id

    try:
        return parse_platform_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--target-platform {exc}") from None


def read_platform_ids(path: str) -> list[str]:
    """The platform ids in a file: one a line; blank lines and `#` comments are skipped.

    Raises:
        ConfigError: unreadable, or a line that is not an id (names the line).
    """
    from handoff.protocol.remote import MAX_ALLOWED_PLATFORMS, parse_platform_id

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--target-platforms {path}: {getattr(exc, 'strerror', exc)}") from None
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(parse_platform_id(text))
        except ValueError as exc:
            raise ConfigError(f"--target-platforms {path}, line {number}: {exc}") from None
    if not ids:
        raise ConfigError(
            f"--target-platforms {path} names no platform: an empty allow-list would allow "
            "any; give ids, one a line"
        )
    if len(ids) > MAX_ALLOWED_PLATFORMS:
        raise ConfigError(f"--target-platforms {path}: at most {MAX_ALLOWED_PLATFORMS} ids")
    return ids


def _pki_host(text: str) -> tuple[str, list[str]]:
    from handoff.transport.pki import PkiError, check_host_name, check_subject_name

    name, sep, addresses = text.partition("=")
    try:
        if not sep or not addresses:
            raise PkiError(f"{text!r}: use NAME=ADDR[,ADDR...], e.g. hosta=192.0.2.10")
        return check_host_name(name), [check_subject_name(a) for a in addresses.split(",")]
    except PkiError as exc:
        raise argparse.ArgumentTypeError(f"--host {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handoff",
        description="Hand a running VM (plain, SEV or SEV-ES) from one VMM process to another "
        "on the same host: zero-copy, with a pause of about a millisecond. If the new VMM dies "
        "at any step before it reports Resumed, the old VMM keeps the guest or takes it back; "
        "if the old VMM dies after it sent Switchover (its VM), the new VMM takes the guest "
        "over. A death where one process alone holds the guest loses it, as with any VMM: the "
        "old VMM's before Switchover (during the setup or the pause), the new VMM's after it "
        "reported Resumed. An SEV guest can also move to another host (`handoff migrate`): "
        "its pages re-encrypted by the SEV firmware for the target, over mutual TLS.",
    )
    parser.add_argument("--version", action="version", version=f"handoff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a VMM",
        description="Run a VMM: boot a guest on "
        "kvmstub and serve QMP on the control socket; with --incoming, wait "
        "for a running VMM to hand its guest over.",
    )
    add_run_arguments(run)

    up = sub.add_parser(
        "upgrade",
        help="replace a running VMM, guest running throughout",
        description="Ask a running VMM (over QMP) to spawn its successor and "
        "hand the guest to it. Shows each phase and the guest-visible pause; "
        "exits 0 once the successor runs the guest. Otherwise exits non-zero with the reason and "
        "who holds the guest, as far as it can check: the old VMM (it refused, or the handoff "
        "failed and it kept or took back the guest, as it reports), the successor (the old "
        "VMM died after Switchover and the successor took over: it answers on the control "
        "socket), nobody (the old VMM died before Switchover, or the successor after it "
        "resumed the guest: both processes are gone), or 'outcome unknown' with where to look.",
    )
    _vm_arguments(up, "running")
    up.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one run flag for the successor, e.g. log-level=debug (repeatable)",
    )
    up.add_argument(
        "--exec",
        nargs=argparse.REMAINDER,
        default=None,
        metavar="PROGRAM ARGS",
        help="run this program instead of the current one (rollback: the older "
        "program); everything after --exec belongs to it",
    )
    up.add_argument("--json", action="store_true", help="print one JSON result")
    up.add_argument("--timeout", type=_timeout, default=60.0, help="give up after (default 60 s)")

    mg = sub.add_parser(
        "migrate",
        help="migrate a running SEV guest to another host",
        description="Ask a running VMM (over QMP) to migrate its SEV guest to the VMM started "
        "with `handoff run ... --incoming tcp:ADDR:PORT` on another host, over mutual TLS. "
        "The guest keeps running here during the pre-copy rounds; a line on stderr shows the "
        "round, pages sent, rate, what remains and the ETA. Exits 0 once the guest runs on the "
        "target (this VMM then ends). Ctrl-C, or any failure before the commit point, cancels "
        "(SEND_CANCEL): the guest keeps running here, untouched. An SEV-ES or NOSEND guest is "
        "refused before anything is sent.",
    )
    _vm_arguments(mg, "running")
    mg.add_argument("--to", required=True, metavar="tcp:HOST:PORT", help="the target VMM")
    mg.add_argument(
        "--downtime-limit",
        type=_downtime_ms,
        default=300.0,
        metavar="MS",
        help="stop and copy once the rest fits this pause (default 300 ms)",
    )
    mg.add_argument(
        "--no-auto-converge",
        dest="auto_converge",
        action="store_false",
        help="never throttle the guest's vCPUs: a guest that dirties memory faster than it "
        "is sent then pre-copies until the round cap and pauses for whatever is left",
    )
    for flag, text in (
        ("--cpu-throttle-initial", "auto-converge: once two rounds in a row found more than "
         "half of what they sent dirtied again, each vCPU sleeps this share of its time "
         "until the migration ends (default 20 %%)"),
        ("--cpu-throttle-increment", "auto-converge: added to the throttle each time that "
         "happens again (default 10 %%)"),
        ("--max-cpu-throttle", "auto-converge: the throttle's cap (default 99 %%)"),
    ):  # fmt: skip
        mg.add_argument(flag, type=_int_in(1, 99, flag), default=None, metavar="PCT", help=text)
    mg.add_argument("--tls-cert", default=None, help="override the VMM's --tls-cert")
    mg.add_argument("--tls-key", default=None, help="override the VMM's --tls-key")
    mg.add_argument("--tls-ca", default=None, help="override the VMM's --tls-ca")
    mg.add_argument(
        "--target-platform",
        action="append",
        default=[],
        type=_platform_id,
        metavar="ID",
        help="migrate only if the target's SEV platform has this id (repeatable), checked "
        "before SEND_START: the SHA-256 of its PDH, pdh_fingerprint in `kvmstub stats --json` "
        "on the target host. A VM started with --target-platform must also list it",
    )
    mg.add_argument(
        "--target-platforms",
        metavar="FILE",
        default=None,
        help="the same, ids one a line ('#' comments), added to --target-platform's",
    )
    mg.add_argument("--json", action="store_true", help="print one JSON result")
    # Tests: keep pre-copying at least this many rounds (a migration long enough to cancel).
    mg.add_argument(
        "--x-min-rounds", type=_int_in(0, 5000, "--x-min-rounds"), default=0, help=argparse.SUPPRESS
    )
    # Tests: a link this slow (pre-copy rounds stretched to this many pages a second).
    mg.add_argument(
        "--x-link-pages-per-s",
        type=_int_in(0, 1_000_000, "--x-link-pages-per-s"),
        default=0,
        help=argparse.SUPPRESS,
    )
    mg.add_argument("--timeout", type=_timeout, default=600.0, help="give up after (default 600 s)")

    rs = sub.add_parser(
        "resolve",
        help="decide for a migration target holding a guest whose source host is dead",
        description="A cross-host migration target that said Received holds the guest, "
        "unrunnable, until its source's decision arrives (the source delivers it on a new "
        "connection if the first one broke). If the source host is dead, no decision comes "
        "and the guest waits forever (the target's log says so; QMP query-migrate shows it as "
        "held). "
        "Only then, and only AFTER FENCING THE SOURCE HOST (powered off, or cut off for good), "
        "tell the target: --finish (RECEIVE_FINISH and run the guest here) or --give-up (tear "
        "it down, freeing its ASID; the guest is lost if the source had issued SEND_FINISH). "
        "DANGER: if the source is in fact alive and resumed the guest (it cancelled), "
        "--finish makes two copies of the guest run. Refused while a source is connected, "
        "or when nothing is held.",
    )
    _vm_arguments(rs, "target")
    how = rs.add_mutually_exclusive_group(required=True)
    how.add_argument("--finish", action="store_true", help="run the held guest here")
    how.add_argument("--give-up", action="store_true", help="tear the held guest down")
    rs.add_argument(
        "--source-fenced",
        action="store_true",
        help="required with --finish: the source host is fenced and will never run the guest",
    )
    rs.add_argument("--json", action="store_true", help="print one JSON result")

    st = sub.add_parser("status", help="show a VMM's state and its last handoff")
    _vm_arguments(st, "running")
    st.add_argument("--json", action="store_true", help="print JSON")

    ls = sub.add_parser(
        "list",
        help="every VM on this host (its runtime directory entries)",
        description="List the VMs whose VMM keeps its entry in the runtime directory "
        "($HANDOFF_RUNTIME_DIR, else /run/handoff for root, else $XDG_RUNTIME_DIR/handoff): "
        "VMM pid, program version, mode, vCPUs, memory, uptime and the last handoff's pause. "
        "An entry whose VMM is gone is shown as stale.",
    )
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.add_argument(
        "--prune", action="store_true", help="remove stale entries (and their dead sockets)"
    )

    certs = sub.add_parser(
        "tls-certs",
        help="make a throwaway CA and host certificates, to try migration out",
        description="FOR TRIALS ONLY. Make a throwaway CA and one certificate and key per "
        "host (usable as TLS server and client), for the --tls-cert/--tls-key/--tls-ca flags "
        "of `handoff run` and `handoff migrate`. The CA's private key is never written: no "
        "certificate can be added later (run it again for a new set). Keys are written mode "
        "0600 and nothing that exists is overwritten. Whoever holds a host's key can take "
        "guests migrated to that host: copy each key only to its own host. A deployment uses "
        "its own CA and issuing process instead.",
    )
    certs.add_argument(
        "--out", required=True, metavar="DIR", help="where to write (created 0700 if missing)"
    )
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        type=_pki_host,
        metavar="NAME=ADDR[,ADDR...]",
        help="a host: its short name (the files NAME.crt, NAME.key) and the IP addresses or "
        "DNS names peers reach it by (repeatable)",
    )
    certs.add_argument(
        "--days", type=_int_in(1, 365, "--days"), default=7, help="validity (default 7 days)"
    )

    demo = sub.add_parser(
        "demo",
        help="the main job on embedded defaults (make demo)",
        description="Start kvmstub and an SEV-ES VMM (4 vCPUs, 4 GiB) in a "
        "temporary directory, upgrade it three times, roll back once, try an "
        "incompatible handoff, then verify continuity, zero copy and that "
        "nothing leaked; then migrate an SEV guest between two simulated hosts (two kvmstub "
        "daemons, mutual TLS on 127.0.0.2 and 127.0.0.3) and verify it from both serial logs; "
        "then, where /dev/kvm works, the same handoffs with a real x86 guest. Exits 0 only if "
        "all of it holds.",
    )
    demo.add_argument("--workdir", default=None, help="keep files here instead of a temp dir")
    demo.add_argument("--mode", choices=MODES, default="sev-es")
    demo.add_argument("--vcpus", type=_int_in(1, 64, "--vcpus"), default=4)
    demo.add_argument("--memory", type=_size, default=parse_size("4G"))
    return parser


def apply_sets(argv: list[str], sets: Sequence[str]) -> list[str]:
    """Replace (or add) `--key value` in a `run` command line for each `key=value`."""
    out = list(argv)
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. log-level=debug")
        flag = f"--{key}"
        # Drop every earlier occurrence ("--k v" and "--k=v"), then append the new one.
        out = strip_flags(out, (flag,))
        if value != "":
            out += [flag, value]
    return out


def strip_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`argv` without the given flags and their values (`--f v` and `--f=v` forms)."""
    out: list[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in flags:
            skip = True
            continue
        if any(tok.startswith(f + "=") for f in flags):
            continue
        out.append(tok)
    return out


@functools.cache
def checking_parser() -> argparse.ArgumentParser:
    """The parser `check_run_args` uses, built once: building one takes about a millisecond
    of the running VMM's event loop, which its guest would feel at every upgrade. A VMM
    builds it at start-up."""
    return build_parser()


def check_run_args(run_args: Sequence[str]) -> None:
    """Parse a successor's `run` flags as this program would; raise ConfigError naming what
    it would refuse, so a bad --set fails before any process starts."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = checking_parser().parse_args(["run", *run_args])
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise ConfigError(lines[-1] if lines else "invalid run flags") from None
    guest_config(ns)
    host_flags(ns)


def _vm_arguments(parser: argparse.ArgumentParser, which: str) -> None:
    """The VM a command acts on: by name, or by its control socket."""
    parser.add_argument("target", nargs="?", help="VM name (control socket in the runtime dir)")
    parser.add_argument("--control", help=f"QMP control socket of the {which} VMM")
