"""`handoff`: run a VM under a VMM that can hand it to its successor, and drive such handoffs.

handoff run      run a VMM (or, with --incoming, wait to take one over)
handoff upgrade  replace a running VMM by a new process, the guest running throughout
handoff migrate  migrate a running SEV guest to another host's VMM (mutual TLS)
handoff resolve  finish or give up a guest a migration target holds, its source host fenced
handoff status   show a VMM's state and its last handoff
handoff list     every VM in the runtime directory (pid, version, shape, uptime, last pause)
handoff tls-certs  a throwaway CA and host certificates, to try migration out
handoff demo     the whole story on embedded defaults (what `make demo` runs)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from handoff.machine.config import ConfigError, validate_name
from handoff.process.flags import (
    build_parser,
    guest_config,
    host_flags,
    migrate_args,
    read_platform_ids,
    remote_flags,
    runtime_dir,
)


def control_path(ns: argparse.Namespace) -> str:
    if ns.control:
        return str(ns.control)
    if ns.target:
        name = validate_name(ns.target)
        directory = runtime_dir()
        path = os.path.join(directory, f"{name}.qmp")
        if not os.path.lexists(path):
            raise ConfigError(
                f"no VM named {name}: there is no control socket {name}.qmp in the runtime "
                f"directory {directory} ($HANDOFF_RUNTIME_DIR, else /run/handoff for root, "
                "else $XDG_RUNTIME_DIR/handoff); `handoff list` shows the VMs there, or give "
                "--control PATH"
            )
        return path
    raise ConfigError("name the VM (handoff upgrade NAME) or give --control PATH")


def status_hint(ns: argparse.Namespace) -> str:
    """The `handoff status` command for the VM a command named."""
    if ns.control:
        return f"handoff status --control {ns.control}"
    return f"handoff status {ns.target}"


def _stdout_gone() -> int:
    """The reader of our output went away (`handoff list | head -1`): exit quietly, as a
    command killed by SIGPIPE does (the shell shows 141), without the interpreter's complaint
    when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    from handoff.system.sched import lower_if_incoming

    # Before the preparation; `python -m handoff` and the `handoff` command did it before the
    # imports already (handoff.__main__), and then this does nothing.
    lower_if_incoming(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "run":
            from handoff.process.app import run_main

            args = list(sys.argv[1:] if argv is None else argv)
            run_args = args[args.index("run") + 1 :]
            program = [sys.executable, "-m", "handoff"]
            return run_main(
                guest_config(ns), host_flags(ns), ns.incoming, program, run_args, remote_flags(ns)
            )
        if ns.command == "upgrade":
            from handoff.process.ops import upgrade_main

            return _flushed(
                upgrade_main(
                    control_path(ns), ns.set, ns.exec, ns.json, ns.timeout, status_hint(ns)
                )
            )
        if ns.command == "migrate":
            from handoff.process.ops import migrate_main

            tls = [ns.tls_cert, ns.tls_key, ns.tls_ca]
            extra_args = migrate_args(ns)
            platforms = list(ns.target_platform)
            if ns.target_platforms:
                platforms += read_platform_ids(ns.target_platforms)
            return _flushed(
                migrate_main(
                    control_path(ns),
                    ns.to,
                    ns.downtime_limit,
                    [os.path.abspath(f) for f in tls] if all(tls) else None,
                    ns.json,
                    ns.timeout,
                    ns.x_min_rounds,
                    target_platforms=platforms,
                    extra_args=extra_args,
                )
            )
        if ns.command == "resolve":
            from handoff.process.ops import resolve_main

            if ns.finish and not ns.source_fenced:
                raise ConfigError(
                    "--finish runs the held guest here: only once the source host is fenced "
                    "(powered off, or cut off for good), else a source that resumed the guest "
                    "and this target run two copies; confirm with --source-fenced"
                )
            decision = "finish" if ns.finish else "give-up"
            return _flushed(resolve_main(control_path(ns), decision, ns.source_fenced, ns.json))
        if ns.command == "status":
            from handoff.process.ops import status_main

            return _flushed(status_main(control_path(ns), ns.json))
        if ns.command == "list":
            from handoff.process.ops import list_main

            return _flushed(list_main(runtime_dir(), ns.json, ns.prune))
        if ns.command == "tls-certs":
            from handoff.cli.certs import tls_certs_main

            return _flushed(tls_certs_main(ns.out, ns.host, ns.days))
        if ns.command == "demo":
            from handoff.cli.demo import demo_main

            return demo_main(ns.workdir, ns.mode, ns.vcpus, ns.memory)
    except ConfigError as exc:
        parser.exit(2, f"handoff: {exc}\n")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if ns.command == "run":
            raise  # not our output: a VMM reports its own errors
        return _stdout_gone()
    return 2


def _flushed(code: int) -> int:
    """`code`, once our output has reached the pipe (a closed one raises here, in main)."""
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
