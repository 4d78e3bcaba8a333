"""The `handoff` command (DESIGN section 7, layer L7): argument parsing lives in
`handoff.process.flags`; `main` dispatches, `demo` is the main job on embedded defaults."""

from handoff.cli.main import main

__all__ = ["main"]
