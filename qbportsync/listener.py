"""
Is qBittorrent really listening?  A TCP connect to its port says, and a
dead listener is made to listen again.

Bound to a VPN interface, libtorrent keeps a listening socket tied to the
interface it was opened on: after the interface is deleted and re-created
(C{wg-quick down/up}), connections are refused while the Web API and
C{/proc} still show the port.  Sending the same settings again changes
nothing; changing one setting and setting it back makes libtorrent open
its sockets anew (measured on qBittorrent 4.5.2; 5.x has the same code).
"""

from __future__ import annotations

import fcntl
import random
import socket
import struct
import sys
from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IConnector, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from qbportsync.backoff import Backoff
from qbportsync.interfaces import IPortSink
from qbportsync.metrics import HEAL_METHODS, Metrics

_log = Logger()

PROBE_TIMEOUT_SECS = 2.0
"""A local connect is answered in microseconds; this is only a backstop."""
SETTLE_SECS = 0.5
"""
Pause between the last setting of a heal and the connect that judges it:
libtorrent listens about 20 ms after the request.
"""
SETTLE_TRIES = 3


Probe = Callable[[str, int], Deferred[bool]]
"""Connects to (address, port); fires True when the handshake completed."""


class _Connected(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _ProbeFactory(ClientFactory):
    """Fires its Deferred with whether the connection was made."""

    def __init__(self) -> None:
        self.result: Deferred[bool] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if not self.result.called:
            self.result.callback(True)
        return _Connected()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.result.called:
            self.result.callback(False)


def probeListener(
    reactor: IReactorTime, address: str, port: int, timeout: float = PROBE_TIMEOUT_SECS
) -> Deferred[bool]:
    """
    Whether a TCP connection to C{address}:C{port} completes within
    C{timeout} seconds; refused, unreachable and timed out all say False.
    C{reactor} must also provide C{IReactorTCP}.
    """
    factory = _ProbeFactory()
    connector = IReactorTCP(reactor).connectTCP(address, port, factory, timeout=timeout)

    def timedOut(result: object, timeout: float) -> bool:
        connector.stopConnecting()
        return False

    return factory.result.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)


_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}


def interfaceAddress(name: str, platform: str = sys.platform) -> str | None:
    """The IPv4 address of network interface C{name} here, or None."""
    request = _SIOCGIFADDR.get("darwin" if platform == "darwin" else "linux")
    if not name or request is None or len(name.encode()) >= 16:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            answer = fcntl.ioctl(
                s.fileno(), request, struct.pack("256s", name.encode())
            )
    except OSError:
        return None
    # struct ifreq: the name (16 bytes), then a sockaddr_in whose address
    # starts 4 bytes in.
    return socket.inet_ntoa(answer[20:24])


@frozen
class ListenerCheck:
    """What one check of qBittorrent's listener found."""

    address: str
    port: int
    listening: bool
    """A connection completed, at once or after healing."""
    healedBy: str | None = None
    """The heal that made it listen again; None when none was needed."""


class ListenerHealer:
    """
    Checks qBittorrent's listener with a TCP connect and, when it refuses,
    makes it listen again: first by re-binding the listening address, then
    by moving the port away and back, each judged by another connect.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        sink: IPortSink,
        metrics: Metrics,
        *,
        bindInterface: str,
        check: str = "auto",
        probe: Probe | None = None,
        addressOf: Callable[[str], str | None] = interfaceAddress,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        """
        @param check: C{"auto"} to probe C{bindInterface}'s IPv4 address when
            it is on this host, C{"off"}, or the IPv4 address to probe.
        """
        self._reactor = reactor
        self._sink = sink
        self._metrics = metrics
        self._bindInterface = bindInterface
        self._check = check
        self._probe: Probe = probe or (
            lambda address, port: probeListener(reactor, address, port)
        )
        self._addressOf = addressOf
        self._backoff = Backoff(first=10.0, cap=300.0, rnd=rnd)
        self._notBefore = 0.0
        """No heal is tried again before this time after one failed."""
        self._failing = False

    def target(self) -> str | None:
        """The address to connect to now, or None when there is nothing to check."""
        if self._check == "off":
            return None
        if self._check != "auto":
            return self._check
        if not self._bindInterface:
            return None
        return self._addressOf(self._bindInterface)

    def check(self, port: int, trigger: str) -> Deferred[ListenerCheck | None]:
        """
        Connect to qBittorrent's C{port}; heal a refusing listener.  Fires
        None when there is nothing to check (no address to connect to).
        """
        return Deferred.fromCoroutine(self._checkAndHeal(port, trigger))

    async def _checkAndHeal(self, port: int, trigger: str) -> ListenerCheck | None:
        address = self.target()
        if address is None:
            return None
        if await self._probe(address, port):
            if self._failing:
                self._failing = False
                self._backoff.reset()
                _log.info(
                    "qBittorrent accepts connections on {address}:{port} again",
                    address=address,
                    port=port,
                )
            return ListenerCheck(address, port, listening=True)
        self._metrics.listener_dead.inc()
        now = self._reactor.seconds()
        if now < self._notBefore:
            return ListenerCheck(address, port, listening=False)
        started = now
        for how in HEAL_METHODS:
            await self._sink.relisten(port, address, how)
            if await self._settled(address, port):
                self._metrics.listener_heals.labels(method=how).inc()
                self._failing = False
                self._backoff.reset()
                _log.info(
                    "qBittorrent refused connections on {address}:{port} "
                    "({trigger}): made it listen again by {heal} in {secs:.1f} s",
                    address=address,
                    port=port,
                    trigger=trigger,
                    heal=_HEAL_NAMES[how],
                    secs=self._reactor.seconds() - started,
                    method=how,
                )
                return ListenerCheck(address, port, listening=True, healedBy=how)
        delay = self._backoff.next()
        self._notBefore = self._reactor.seconds() + delay
        if not self._failing:
            self._failing = True
            _log.warn(
                "qBittorrent refuses connections on {address}:{port} ({trigger}) "
                "and re-binding did not help; trying again in {delay:.0f} s. If "
                "qBittorrent runs in another network namespace (a container), "
                'set [qbittorrent] check_listener to "off" or to its address',
                address=address,
                port=port,
                trigger=trigger,
                delay=delay,
            )
        return ListenerCheck(address, port, listening=False)

    async def _settled(self, address: str, port: int) -> bool:
        for _ in range(SETTLE_TRIES):
            await deferLater(self._reactor, SETTLE_SECS)
            if await self._probe(address, port):
                return True
        return False


_HEAL_NAMES = {
    "address": "re-binding its listening address",
    "port": "moving its port away and back",
}
