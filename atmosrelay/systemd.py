"""The service manager's readiness protocol (sd_notify), without a dependency.

Under systemd with ``Type=notify`` (contrib/systemd/atmosrelay.service), ``NOTIFY_SOCKET``
names a datagram socket; the relay sends ``READY=1`` once the journal is replayed and every
listener is up (so ``systemctl start`` returns when mail can be accepted, and units ordered
after it start then), ``RELOADING=1``/``READY=1`` around a SIGHUP reload and ``STOPPING=1``
when the drain starts. Without the variable every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``lines`` (``KEY=value``) to the service manager; False when there is none or
    it cannot be reached (a notification is never worth failing the relay for)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address  # @: an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), target)
    except OSError:
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic time systemd asks for (systemd.service(5))."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
