"""
Keeping a gateway's port mapping alive, for either mapping protocol: map TCP
and UDP to one port, renew before the lease ends, retry quickly, and remap
everything when the gateway's epoch says it forgot us.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from qbportsync.backoff import Backoff
from qbportsync.config import Protocol as MappedProtocols
from qbportsync.metrics import Metrics
from qbportsync.sources.udpclient import GatewayRefusal
from qbportsync.sources.wire import EpochSample, IPProto

_log = Logger()

RESET_DELAY_MAX = 5.0
"""Seconds; a random wait up to this spreads remaps after a reboot (RFC 6886 §3.7)."""
RETRY_FIRST = 1.0
RETRY_MAX = 15.0


@frozen
class Grant:
    """One mapping the gateway granted."""

    protocol: IPProto
    internalPort: int
    externalPort: int
    lifetime: int
    """Seconds; 0 when the gateway gave none."""


@frozen
class MappedPort:
    """The one port qBittorrent should use, and the grants behind it."""

    port: int
    lifetime: int
    grants: tuple[Grant, ...]


MapOne = Callable[[IPProto, int], Deferred[Grant]]
"""Map C{protocol} suggesting an external port; the protocol's own request."""


async def mapProtocols(
    mapOne: MapOne,
    protocol: MappedProtocols,
    suggest: Callable[[IPProto], int],
    metrics: Metrics,
) -> MappedPort:
    """
    Map one or both transports.  qBittorrent listens on one port for both,
    so when the grants differ, ask UDP again for TCP's port; if the gateway
    still disagrees, TCP wins (peers connect over TCP first).
    """
    if protocol != "BOTH":
        grant = await mapOne(protocol, suggest(protocol))
        return MappedPort(grant.externalPort, grant.lifetime, (grant,))
    udp = await mapOne("UDP", suggest("UDP"))
    tcp = await mapOne("TCP", suggest("TCP"))
    if udp.externalPort != tcp.externalPort:
        _log.info(
            "gateway granted UDP {udp} but TCP {tcp}; asking UDP for {tcp}",
            udp=udp.externalPort,
            tcp=tcp.externalPort,
        )
        udp = await mapOne("UDP", tcp.externalPort)
        if udp.externalPort != tcp.externalPort:
            metrics.errors.labels(kind="gateway").inc()
            _log.warn(
                "gateway insists on UDP port {udp} and TCP port {tcp}; "
                "using the TCP port, so UDP peers cannot reach qBittorrent",
                udp=udp.externalPort,
                tcp=tcp.externalPort,
            )
    return MappedPort(tcp.externalPort, min(udp.lifetime, tcp.lifetime), (udp, tcp))


EpochRule = Callable[[EpochSample, EpochSample], bool]
"""True when the new sample shows the gateway lost its state since the last."""


class EpochTracker:
    """Remembers the gateway's last epoch and applies the protocol's rule."""

    def __init__(self, isReset: EpochRule) -> None:
        self._isReset = isReset
        self._last: EpochSample | None = None

    def observe(self, epoch: int, at: float) -> bool:
        """Record a sample; True when it shows a gateway reset."""
        sample = EpochSample(epoch, at)
        last, self._last = self._last, sample
        return last is not None and self._isReset(last, sample)


def halfLifetime(lifetime: float) -> float:
    return lifetime / 2


class LeaseKeeper:
    """
    Map, then renew at C{renewAt(lifetime)}; on failure retry after the
    L{Backoff}'s 1, 2, 4… seconds (at most 15, and never past the end of the
    current lease); on a gateway reset, remap after a random 0–5 s.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        remap: Callable[[], Deferred[MappedPort]],
        onMapped: Callable[[MappedPort], object],
        *,
        fallbackRefresh: float,
        random: Callable[[], float],
        renewAt: Callable[[float], float] = halfLifetime,
        name: str,
    ) -> None:
        self._reactor = reactor
        self._remap = remap
        self._onMapped = onMapped
        self._fallbackRefresh = fallbackRefresh
        self._random = random
        self._renewAt = renewAt
        self._name = name
        self._timer: IDelayedCall | None = None
        self._resetPending = False
        self._inFlight: Deferred[MappedPort] | None = None
        self._again = False
        self._backoff = Backoff(RETRY_FIRST, RETRY_MAX, rnd=random)
        self._running = False
        self.expires: float | None = None
        """Our clock's time when the current lease ends; None before the first."""

    def start(self) -> None:
        """Map now and keep the mapping alive until L{stop}."""
        self._running = True
        self._run()

    def stop(self) -> None:
        """Cancel the timer and any request in flight."""
        self._running = False
        self._cancelTimer()
        if self._inFlight is not None:
            self._inFlight.cancel()

    def gatewayReset(self) -> None:
        """The gateway lost its mappings: remap soon, once, whatever was planned."""
        if not self._running or self._resetPending:
            return
        self._cancelTimer()
        self._resetPending = True
        delay = self._random() * RESET_DELAY_MAX
        _log.info(
            "{source}: the gateway lost its mappings; mapping again in {delay:.1f}s",
            source=self._name,
            delay=delay,
        )
        self._timer = self._reactor.callLater(delay, self._run)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._resetPending = False

    def _run(self) -> None:
        self._timer = None
        self._resetPending = False
        if self._inFlight is not None:
            self._again = True
            return
        d = self._inFlight = self._remap()
        d.addCallbacks(self._mapped, self._failed)
        d.addErrback(lambda f: _log.failure("handling a new mapping failed", failure=f))
        d.addBoth(self._requestDone)

    def _requestDone(self, result: object) -> None:
        self._inFlight = None
        if self._again and self._running:
            self._again = False
            self._cancelTimer()
            self._run()

    def _mapped(self, mapped: MappedPort) -> None:
        now = self._reactor.seconds()
        self._backoff.reset()
        if mapped.lifetime > 0:
            self.expires = now + mapped.lifetime
            delay = self._renewAt(mapped.lifetime)
        else:
            self.expires = None
            delay = self._fallbackRefresh
        if self._running and self._timer is None:
            self._timer = self._reactor.callLater(delay, self._run)
        self._onMapped(mapped)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or not self._running:
            return
        delay = self._backoff.next()
        left = None if self.expires is None else self.expires - self._reactor.seconds()
        if left is not None and left > 0:
            delay = min(delay, left)
        if isinstance(failure.value, GatewayRefusal):
            delay = max(delay, failure.value.retryAfter)
        _log.warn(
            "{source}: mapping failed ({error}); try {attempt} in {delay:.1f}s, "
            "lease {lease}",
            source=self._name,
            error=failure.getErrorMessage(),
            attempt=self._backoff.failures + 1,
            delay=delay,
            lease="expired" if left is None or left <= 0 else f"ends in {left:.0f}s",
        )
        if self._timer is None:
            self._timer = self._reactor.callLater(delay, self._run)
