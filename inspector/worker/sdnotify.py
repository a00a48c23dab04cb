"""systemd's service notifications (sd_notify): READY=1, STOPPING=1, STATUS= and watchdog pings.

Under `Type=notify` systemd counts the worker started only once it serves (models loaded, connected),
so what is ordered after it, and `systemctl start`, wait for that. Under `WatchdogSec=` systemd kills
and restarts a worker whose pings stop; the worker's watchdog thread pings only while every core
thread is healthy, so a worker too stuck to exit by itself is restarted all the same.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket in `$NOTIFY_SOCKET` (a path, or
`@name` in the abstract namespace). Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends notifications to `address` (`$NOTIFY_SOCKET`); does nothing when it is None. Never raises:
    a failed notification is logged once, and systemd's own timeouts say the rest."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target: str | None = None
        self._socket: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            self._target = "\0" + address[1:]
        elif address.startswith("/"):
            self._target = address
        else:
            log.warning("%s=%s is not a unix socket path or @name; systemd is not notified", SOCKET_ENV, address)
            return
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get(SOCKET_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (`READY=1`, `STATUS=...`) as one datagram; False when not sent."""
        if self._socket is None or self._target is None:
            return False
        try:
            self._socket.sendto("\n".join(fields).encode(), self._target)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s (%s); it will time the worker out", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", _status(status))

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", _status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str) -> str:
    """A STATUS= field on one line: a newline would start a field of its own."""
    return "STATUS=" + " ".join(text.split())[:400]
