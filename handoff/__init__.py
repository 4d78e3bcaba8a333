"""handoff: move a running VM between two VMM processes on one host, zero-copy and crash-safe."""

__version__ = "0.1.0"
