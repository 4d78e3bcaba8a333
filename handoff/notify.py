"""sd_notify without dependencies: one datagram to $NOTIFY_SOCKET per call.

READY=1 once the guest runs, STATUS= lines during a handoff, MAINPID=<successor> before an old
VMM exits so systemd keeps the service, STOPPING=1 on shutdown. Outside systemd it does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send `lines` joined by newlines; return whether a notify socket was there to take them."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
            sock.sendall("\n".join(lines).encode())
        except OSError:
            return False
    return True
