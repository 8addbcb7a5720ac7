"""
The host's network changes as a stream of L{NetworkChange}s, read from the
kernel's socket in the reactor: netlink on Linux, the routing socket on
macOS, nothing elsewhere.

A link counts as present while it is up: C{wg-quick down} (or C{ip link set
wg0 down}) is told as C{NetworkChange("link", "wg0", False)}.

A burst (C{wg-quick up} adds a link, addresses and routes in a few
milliseconds) reaches observers as several changes; identical changes read
in one go are told once.  Observers that act on "something changed" should
expect several calls in a row and make acting twice harmless.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qbportsync.interfaces import INetworkEvents, NetworkChange
from qbportsync.netlink import NetlinkDecoder
from qbportsync.routesocket import RoutingSocketDecoder

_log = Logger()

_BATCH = 64
"""Datagrams read per wake-up; the reactor calls again while more wait."""
_DATAGRAM_SIZE = 65536

SOMETHING_CHANGED = NetworkChange("link", "", True)
"""
Told when changes may have been missed: the kernel dropped some (a full
buffer) or the socket had to be replaced.
"""


class Decoder(Protocol):
    """One kernel socket's format: how to open it and read its datagrams."""

    def open(self) -> socket.socket:
        """A non-blocking socket that receives the changes."""

    def decode(self, datagram: bytes) -> list[NetworkChange]:
        """The changes in one datagram; raises ValueError when it is malformed."""

    def requestNames(self, sock: socket.socket) -> None:
        """After lost datagrams: refresh whatever state decoding relies on."""


@implementer(INetworkEvents, IReadDescriptor)
class KernelEvents(Service):
    """
    Reads a kernel socket of network changes while the service runs and
    tells every subscriber.  Opening the socket may fail (a sandbox without
    netlink): the daemon then runs without events, saying so once.
    """

    def __init__(self, reactor: IReactorFDSet, decoder: Decoder) -> None:
        self._reactor = reactor
        self._decoder = decoder
        self._socket: socket.socket | None = None
        self._observers: list[Callable[[NetworkChange], object]] = []

    def subscribe(
        self, observer: Callable[[NetworkChange], object]
    ) -> Callable[[], None]:
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def startService(self) -> None:
        Service.startService(self)
        self._open()

    def _open(self) -> None:
        try:
            self._socket = self._decoder.open()
        except OSError as e:
            _log.warn(
                "cannot hear network changes ({error}); changes will be noticed "
                "when requests fail",
                error=e,
            )
            return
        self._reactor.addReader(self)

    def stopService(self) -> None:
        Service.stopService(self)
        sock, self._socket = self._socket, None
        if sock is not None:
            self._reactor.removeReader(self)
            sock.close()

    def fileno(self) -> int:
        return -1 if self._socket is None else self._socket.fileno()

    def logPrefix(self) -> str:
        return "network-events"

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor gave up on the socket (it reported an error with nothing
        to read): open a new one, and say that something may have changed.
        """
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        if self.running:
            _log.warn(
                "the kernel's socket of network changes failed ({reason}); "
                "opening a new one",
                reason=reason.getErrorMessage(),
            )
            self._open()
            self._tell(SOMETHING_CHANGED)

    def doRead(self) -> None:
        """Read what the kernel has queued and tell each distinct change once."""
        changes: list[NetworkChange] = []
        for _ in range(_BATCH):
            if self._socket is None:
                break
            try:
                datagram = self._socket.recv(_DATAGRAM_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    _log.warn("reading network changes failed: {error}", error=e)
                    break
                # The kernel dropped changes: say something changed, relearn names.
                changes.append(SOMETHING_CHANGED)
                self._refresh()
                continue
            if not datagram:
                continue  # an empty datagram says nothing
            try:
                changes.extend(self._decoder.decode(datagram))
            except ValueError as e:
                _log.debug("dropped a malformed network change: {error}", error=e)
        for change in dict.fromkeys(changes):
            self._tell(change)

    def _refresh(self) -> None:
        if self._socket is None:
            return
        try:
            self._decoder.requestNames(self._socket)
        except OSError as e:
            _log.debug("cannot refresh interface names: {error}", error=e)

    def _tell(self, change: NetworkChange) -> None:
        _log.debug(
            "network change: {kind} {interface} {state}",
            kind=change.kind,
            interface=change.interface or "?",
            state="present" if change.present else "gone",
        )
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:
                _log.failure("a network change observer failed")


def networkEvents(
    reactor: IReactorFDSet, platform: str = sys.platform
) -> KernelEvents | None:
    """The host's network changes where this platform can tell them, else None."""
    if platform.startswith("linux"):
        return KernelEvents(reactor, NetlinkDecoder())
    if platform == "darwin":
        return KernelEvents(reactor, RoutingSocketDecoder())
    return None
