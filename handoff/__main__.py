"""`python -m handoff` and the `handoff` command: `handoff.cli`, except that a new VMM
(`handoff run --incoming`, as an old VMM spawns its successor) first lowers its CPU priority
(`sched.lower_while_preparing`), before the imports: they take about 100 ms of CPU (trio alone
65 ms), and on a small host they ran at full priority beside the old VMM, whose guest's exits
then waited 2 to 8 ms at a time until the successor was ready. Only the standard library is
imported before that."""

from __future__ import annotations

import sys


def main() -> int:
    from handoff.system.sched import lower_if_incoming

    lower_if_incoming(sys.argv[1:])
    from handoff.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
