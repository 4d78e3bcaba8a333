"""The `kvmstub` command: `kvmstub serve` runs the daemon, `kvmstub stats` shows its state.

    kvmstub serve [--socket PATH] [--sev-asids N] [--sev-es-asids N] [--slice-us N]
                  [--quantum-us N] [--halt-poll-us N] [--state-dir DIR] [--amd-root DIR]
                  [--oca-key FILE]
    kvmstub stats [--socket PATH] [--json]

The socket defaults to $KVMSTUB_SOCKET, else $XDG_RUNTIME_DIR/kvmstub/kvm.sock, else
/run/kvmstub/kvm.sock (the same rule the `handoff` command uses to find it).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from kvmstub import client, daemon, keystore
from kvmstub.model import Host
from kvmstub.platform import AmdRoot, Platform, PlatformKeys


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low}..{high}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmstub",
        description="A stand-in for the host kernel's KVM and AMD SEV firmware, served on a "
        "Unix socket that plays /dev/kvm.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    socket_help = (
        "the daemon's Unix socket (default: $KVMSTUB_SOCKET, else "
        "$XDG_RUNTIME_DIR/kvmstub/kvm.sock, else /run/kvmstub/kvm.sock)"
    )

    serve = commands.add_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run the kvmstub daemon in the foreground. Prints one line "
        "'kvmstub: ready socket=... pid=...' once clients can connect; SIGTERM or SIGINT "
        "stops it and removes the socket.",
    )
    serve.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
    serve.add_argument(
        "--sev-asids",
        type=_int_in(0, 65535),
        default=None,
        metavar="N",
        help="number of SEV ASIDs (above min_sev_asid; default: as on an EPYC host)",
    )
    serve.add_argument(
        "--sev-es-asids",
        type=_int_in(0, 65535),
        default=None,
        metavar="N",
        help="number of SEV-ES ASIDs (1..min_sev_asid-1; default: as on an EPYC host)",
    )
    serve.add_argument(
        "--slice-us",
        type=_int_in(1, 1_000_000),
        default=None,
        metavar="N",
        help="longest guest slice one KVM_RUN executes, in microseconds (default: 200)",
    )
    serve.add_argument(
        "--quantum-us",
        type=_int_in(1, 1_000_000),
        default=None,
        metavar="N",
        help="how long each vCPU in KVM_RUN runs before the next one's turn while at most 4 "
        "take turns (shorter when more do); every vCPU of every VM takes turns on the "
        "daemon's CPU (default: 10)",
    )
    serve.add_argument(
        "--halt-poll-us",
        type=_int_in(0, 1_000_000),
        default=0,
        metavar="N",
        help="with no vCPU to run, keep looking for work this long before sleeping, each "
        "request served meanwhile starting it again, as KVM's halt_poll_ns does: the next "
        "KVM_RUN or MOVE then needs no wake-up of the daemon. Spends up to that much CPU "
        "each time; for a CPU the daemon has to itself (default: 0, off)",
    )
    serve.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="keep this host's SEV platform keys (PDH, PEK, OCA, CEK) in DIR, created (mode "
        "0700) on first use, so the platform keeps its identity across restarts (default: "
        "fresh keys each run)",
    )
    serve.add_argument(
        "--amd-root",
        default=None,
        metavar="DIR",
        help="the simulated AMD root (ARK, ASK) that signs this platform's CEK, kept in DIR "
        "and created there on first use; hosts naming the same DIR trust each other's "
        "certificate chains, as genuine AMD platforms do (a simulated key, never AMD's; "
        "default: a root of this daemon's own, made when first needed)",
    )
    serve.add_argument(
        "--oca-key",
        default=None,
        metavar="FILE",
        help="put this platform in an owner's domain (guest policy DOMAIN): its PEK is "
        "certified by the owner's OCA key in FILE, one P-384 private key in PKCS#8 PEM, a "
        "file of this user with mode 0600 (e.g. `openssl genpkey -algorithm EC -pkeyopt "
        "ec_paramgen_curve:P-384 -out FILE`); hosts given the same FILE share the domain, so "
        "a DOMAIN guest may migrate between them and to no other (default: the platform owns "
        "itself, a domain of one)",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="what the daemon logs to stderr (default: warning)",
    )

    stats = commands.add_parser(
        "stats",
        help="show the daemon's VMs and ASIDs",
        description="Show the daemon's VMs (creator pid, dead, mode, ASID, firmware handle "
        "and state, vCPUs, steps run, and for a VM that took a running guest over, the "
        "longest pause its vCPUs saw: from their last step in the old VM to their first in "
        "this one) and its ASIDs in use and free.",
    )
    stats.add_argument("--socket", default=None, metavar="PATH", help=socket_help)
    stats.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    return parser


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="kvmstub[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # One fd per VM and vCPU lives here: a host with many guests needs more than 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    options: dict[str, Any] = {}  # what is not given keeps the model's default
    if args.sev_asids is not None:
        options["sev_asids"] = args.sev_asids
    if args.sev_es_asids is not None:
        options["sev_es_asids"] = args.sev_es_asids
    if args.slice_us is not None:
        options["slice_ns"] = args.slice_us * 1000
    try:
        options["platform"] = _platform(args.state_dir, args.amd_root, args.oca_key)
    except keystore.KeystoreError as e:
        print(f"kvmstub: {e}", file=sys.stderr)
        return 1
    host = Host(**options)
    quantum_ns = daemon.DEFAULT_QUANTUM_NS if args.quantum_us is None else args.quantum_us * 1000
    _harden()
    path = args.socket or client.default_socket()
    try:
        trio.run(
            partial(
                daemon.run,
                path,
                host,
                host_info=_host_info(host),
                quantum_ns=quantum_ns,
                halt_poll_ns=args.halt_poll_us * 1000,
            )
        )
    except OSError as e:
        print(f"kvmstub: cannot serve {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _platform(state_dir: str | None, amd_root: str | None, oca_key: str | None) -> Platform:
    """The SEV platform this daemon plays: its keys from --state-dir and the AMD root from
    --amd-root when given, else fresh ones; the owner's OCA from --oca-key when given."""
    oca = keystore.load_oca_key(oca_key) if oca_key else None
    root = keystore.load_or_create_root(amd_root) if amd_root else AmdRoot()
    if state_dir:
        return keystore.load_or_create_platform(state_dir, root, oca)
    return Platform(PlatformKeys.generate(oca=oca), root)


def _harden() -> None:
    """As the kernel keeps its secrets from user space: a process name that says what this is,
    not dumpable (no ptrace attach or core dump by processes of the same uid: guest VEKs live
    here), and no_new_privs (nothing it executes gains privileges)."""
    try:
        import prctl  # python-prctl; imported here: only the daemon needs it

        prctl.set_name("kvmstub")
        prctl.set_dumpable(False)
        prctl.set_no_new_privs(True)
    except (ImportError, OSError) as exc:  # a missing prctl must not stop the host; say so
        logging.getLogger("kvmstub").warning("process hardening unavailable: %s", exc)


def _host_info(host: Host) -> dict[str, Any]:
    """The ready line's ASID counts, read back from the model (its defaults included)."""
    asids = host.stats()["asids"]
    return {"sev-asids": asids["sev"]["total"], "sev-es-asids": asids["sev_es"]["total"]}


def _stats(args: argparse.Namespace) -> int:
    path = args.socket or client.default_socket()
    try:
        stats = client.read_stats(path)
    except OSError as e:
        print(f"kvmstub: cannot read stats from {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """The human table of `kvmstub stats`."""
    columns = [
        "VM", "CREATOR", "DEAD", "MODE", "ASID", "HANDLE", "FW STATE", "VCPUS", "STEPS",
        "HANDOFF GAP",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for vm in stats.get("vms", []):
        vcpus = vm.get("vcpus", [])
        mode = str(vm.get("mode", "?"))
        if vm.get("owner") is not None:
            mode += f" of {vm['owner']}"
        rows.append(
            [
                str(vm.get("id", "?")),
                str(vm.get("creator", "?")),
                "yes" if vm.get("dead") else "no",
                mode,
                str(vm.get("asid") or "-"),
                str(vm.get("handle") or "-"),
                str(vm.get("firmware_state") or "-"),
                str(len(vcpus)),
                str(sum(v.get("steps", 0) for v in vcpus)),
                _gap(vm.get("handoff_gap_us")),
            ]
        )
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not rows:
        lines.append("(no VMs)")
    lines.append("")
    platform = stats.get("platform")
    if isinstance(platform, dict):
        root = platform.get("amd_root_fingerprint")
        lines.append(
            f"SEV platform: {platform.get('state', '?')}, API {platform.get('api', '?')}, "
            f"PDH {str(platform.get('pdh_fingerprint', '?'))[:16]}, "
            f"OCA {str(platform.get('oca_fingerprint', '?'))[:16]}, "
            f"AMD root {str(root)[:16] if root else '(not made yet)'}"
        )
    for key, name in (("sev", "SEV"), ("sev_es", "SEV-ES")):
        counts = stats.get("asids", {}).get(key, {})
        lines.append(
            f"{name} ASIDs: {counts.get('used', '?')} used, {counts.get('free', '?')} free "
            f"of {counts.get('total', '?')}"
        )
    return "\n".join(lines)


def _gap(us: Any) -> str:
    """The HANDOFF GAP column: the blackout this VM's guest saw when the VM took it over."""
    if not isinstance(us, int | float):
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kvmstub` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _stats(args)


if __name__ == "__main__":
    sys.exit(main())
