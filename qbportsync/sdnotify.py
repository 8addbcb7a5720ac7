"""
systemd's notify protocol (sd_notify(3)): readiness, a status line and the
watchdog, each one datagram to C{$NOTIFY_SOCKET}.  Without that variable
every call does nothing, so the daemon can always use it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()


def _address(notifySocket: str) -> str:
    # "@name" is Linux's abstract namespace, which the kernel spells "\0name".
    if notifySocket.startswith("@"):
        return "\0" + notifySocket[1:]
    return notifySocket


def watchdogInterval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between watchdog pings, half of C{$WATCHDOG_USEC}, or None when
    systemd asked for none or asked another process (C{$WATCHDOG_PID}).
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if environ.get("WATCHDOG_PID", str(pid)) != str(pid):
        return None
    return usec / 2_000_000


class SystemdNotifier(Service):
    """
    Tells systemd how the daemon is doing.  As a service it pings the
    watchdog while running and says STOPPING=1 when stopped; L{ready} and
    L{status} are for the code that knows when those hold.
    """

    def __init__(
        self,
        clock: IReactorTime,
        environ: Mapping[str, str] = os.environ,
        pid: int | None = None,
    ) -> None:
        self._clock = clock
        self._socket = environ.get("NOTIFY_SOCKET", "")
        self._interval = watchdogInterval(environ, os.getpid() if pid is None else pid)
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening."""
        return self._socket != ""

    def notify(self, **fields: str) -> None:
        """Send C{NAME=value} lines, e.g. C{notify(READY="1")}."""
        if not self.enabled:
            return
        message = "".join(f"{name}={value}\n" for name, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                notify.setblocking(False)
                notify.sendto(message.encode(), _address(self._socket))
        except OSError as e:
            _log.warn(
                "could not notify systemd at {notify_socket}: {error}",
                notify_socket=self._socket,
                error=e.strerror or str(e),
            )

    def ready(self) -> None:
        """The source runs and the first port was applied, or tried."""
        self.notify(READY="1")

    def status(self, text: str) -> None:
        """The one line C{systemctl status} shows."""
        self.notify(STATUS=text.replace("\n", " "))

    def startWatchdog(self) -> None:
        """
        Ping the watchdog now and then at half C{$WATCHDOG_USEC}: the pings
        stop when the reactor stalls, which is what systemd should notice.
        """
        if not self.enabled or self._interval is None or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.notify, WATCHDOG="1")
        self._watchdog.clock = self._clock
        self._watchdog.start(self._interval, now=True)

    def stopWatchdog(self) -> None:
        """Stop pinging the watchdog."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.startWatchdog()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.stopWatchdog()
        self.notify(STOPPING="1")
