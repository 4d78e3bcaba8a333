"""sd_notify without dependencies: one datagram to $NOTIFY_SOCKET per call.

READY=1 once the guest runs, STATUS= lines during a handoff, MAINPID=<successor> before an old
VMM exits so systemd keeps the service, STOPPING=1 on shutdown. Outside systemd it does nothing.

A handover needs one more step: the old VMM must not exit before systemd has *read* its
MAINPID= message, or systemd may see the main process die first and stop the service (and with
it the successor). `barrier()` is sd_notify_barrier(3): it sends BARRIER=1 with the write end of
a pipe and waits until systemd, having processed every earlier message, closes it.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

import trio


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        path = "\0" + path[1:]
    return path


def notify(*lines: str) -> bool:
    """Send `lines` joined by newlines; return whether a notify socket was there to take them."""
    path = _address()
    if path is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall("\n".join(lines).encode())
        except OSError:
            return False
    return True


async def barrier(timeout: float = 5.0) -> bool:
    """Wait until the service manager has processed every message sent before this call.

    Returns True when it confirmed in time, False without a notify socket, on a send failure,
    or after `timeout` seconds (a receiver that keeps the fd open).
    """
    path = _address()
    if path is None:
        return False
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(path)
                sock.sendmsg(
                    [b"BARRIER=1"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end]))],
                )
        except OSError:
            return False
        finally:
            os.close(write_end)
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(read_end)  # EOF: every copy of the write end closed
            return True
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(read_end)
