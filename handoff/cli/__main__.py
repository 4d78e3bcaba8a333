"""`python -m handoff.cli`: the command without `handoff.__main__`'s early priority lowering
(the demo plays an older release this way)."""

import sys

from handoff.cli.main import main

sys.exit(main())
