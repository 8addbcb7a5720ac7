"""
Keeping a gateway's port mapping alive, for either mapping protocol: map TCP
and UDP to one port, renew before the lease we asked for ends, retry within
seconds while the gateway is away, slowly when only a person can help, and
remap everything when the gateway's epoch says it forgot us.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from qbportsync.backoff import Backoff
from qbportsync.config import Protocol as MappedProtocols
from qbportsync.metrics import Metrics
from qbportsync.sources.udpclient import (
    RETRANSMIT_CAP,
    GatewayRefusal,
    GatewayTimeout,
    isPermanent,
)
from qbportsync.sources.wire import EpochSample, IPProto

_log = Logger()

RETRY_FIRST = 1.0
RETRY_MAX = RETRANSMIT_CAP
"""
Seconds; the longest wait between tries while the gateway is silent or
refusing, so that it is asked again within seconds of its return.
"""
PERMANENT_FIRST = 60.0
PERMANENT_MAX = 900.0
"""Seconds; how rarely an error only a person can fix is retried."""


@frozen
class Grant:
    """One mapping the gateway granted."""

    protocol: IPProto
    internalPort: int
    externalPort: int
    lifetime: int
    """Seconds, as granted: never 0 (the clients drop such answers)."""


@frozen
class MappedPort:
    """The one port qBittorrent should use, and the grants behind it."""

    port: int
    lifetime: int
    """Seconds we trust the mapping for: the shortest grant, at most as asked."""
    grants: tuple[Grant, ...]


MapOne = Callable[[IPProto, int], Deferred[Grant]]
"""Map C{protocol} suggesting an external port; the protocol's own request."""


async def mapProtocols(
    mapOne: MapOne,
    protocol: MappedProtocols,
    suggest: Callable[[IPProto], int],
    asked: int,
    metrics: Metrics,
    *,
    probeFirst: bool = False,
) -> MappedPort:
    """
    Map one or both transports, both at once.  qBittorrent listens on one
    port for both, so when the grants differ, ask UDP again for TCP's port;
    if the gateway still disagrees, TCP wins (peers connect over TCP first).
    A lifetime longer than C{asked} is not believed.  With C{probeFirst}
    (the gateway was away) TCP alone is asked until the gateway answers.
    """
    if protocol != "BOTH":
        grant = await mapOne(protocol, suggest(protocol))
        return MappedPort(grant.externalPort, min(asked, grant.lifetime), (grant,))
    if probeFirst:
        await mapOne("TCP", suggest("TCP"))
    udp, tcp = await _together(mapOne, suggest)
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
    lifetime = min(asked, udp.lifetime, tcp.lifetime)
    return MappedPort(tcp.externalPort, lifetime, (udp, tcp))


async def _together(
    mapOne: MapOne, suggest: Callable[[IPProto], int]
) -> tuple[Grant, Grant]:
    """UDP and TCP asked side by side: one slow answer never holds up the other."""
    udp = mapOne("UDP", suggest("UDP"))
    tcp = mapOne("TCP", suggest("TCP"))
    try:
        first, second = await gatherResults([udp, tcp], consumeErrors=True)
    except FirstError as e:
        udp.cancel()
        tcp.cancel()
        e.subFailure.raiseException()
    return first, second


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

    def contradicts(self, epoch: int, at: float) -> bool:
        """
        True when an unasked report shows a reset; it is not recorded, so a
        forged one cannot make the next true answer look like a reset.
        """
        return self._last is not None and self._isReset(
            self._last, EpochSample(epoch, at)
        )


def halfLifetime(lifetime: float) -> float:
    return lifetime / 2


@frozen
class Failed:
    """One failed try, as the keeper judged it."""

    error: BaseException
    permanent: bool
    """Only a person (or a network change) can fix it."""
    leaseLeft: float
    """Seconds the last mapping still holds; 0 when it ran out or never was."""
    retryIn: float


class LeaseKeeper:
    """
    Map, then renew at C{renewAt(lifetime)} (at most C{refreshCap} apart).
    On failure retry on a L{Backoff}: 1, 2, 4 up to 8 s while the gateway is
    silent or refusing (counting a silence already waited, and never past the
    end of the current lease), 1 to 15 minutes for errors only a person can
    fix.  L{remapSoon} and L{retryNow} cut any wait.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        remap: Callable[[], Deferred[MappedPort]],
        onMapped: Callable[[MappedPort], object],
        onFailed: Callable[[Failed], object],
        *,
        refreshCap: float,
        random: Callable[[], float],
        renewAt: Callable[[float], float] = halfLifetime,
    ) -> None:
        self._reactor = reactor
        self._remap = remap
        self._onMapped = onMapped
        self._onFailed = onFailed
        self._refreshCap = refreshCap
        self._renewAt = renewAt
        self._timer: IDelayedCall | None = None
        self._soon = False
        self._inFlight: Deferred[MappedPort] | None = None
        self._again = False
        self._quick = Backoff(RETRY_FIRST, RETRY_MAX, rnd=random)
        self._slow = Backoff(PERMANENT_FIRST, PERMANENT_MAX, rnd=random)
        self._running = False
        self.failing = False
        """The last try failed: the source has no port it can vouch for."""
        self.renewalPeriod: float | None = None
        """Seconds between renewals of the current lease; None before one."""
        self.expires: float | None = None
        """Our clock's time when the current lease ends; None before the first."""

    def start(self) -> None:
        """Map now and keep the mapping alive until L{stop}."""
        self._running = True
        self._run()

    def stop(self) -> None:
        """Cancel the timer and any request in flight."""
        self._running = False
        self.cancel()

    def cancel(self) -> None:
        """Cancel the timer and any request in flight; nothing runs until told."""
        self._cancelTimer()
        self._again = False
        if self._inFlight is not None:
            self._inFlight.cancel()

    def remapSoon(self, delay: float) -> None:
        """Remap after C{delay} s, once, cutting any longer wait or request."""
        if not self._running or self._soon:
            return
        self._cancelTimer()
        self._soon = True
        self._timer = self._reactor.callLater(delay, self._run)

    def retryNow(self) -> None:
        """Something changed (the network): forget the backoff and try at once."""
        if not self._running:
            return
        self._quick.reset()
        self._slow.reset()
        self._cancelTimer()
        self._run()

    def againAfter(self) -> None:
        """Map once more as soon as the try in flight ends (or now, if none)."""
        if self._inFlight is not None:
            self._again = True
        elif self._running:
            self._cancelTimer()
            self._run()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._soon = False

    def _run(self) -> None:
        self._timer = None
        self._soon = False
        if self._inFlight is not None:
            # A fresh try replaces one that may be waiting out a long silence.
            self._again = True
            self._inFlight.cancel()
            return
        d = self._inFlight = self._remap()
        d.addCallbacks(self._mapped, self._failed)
        d.addErrback(lambda f: _log.failure("handling a mapping failed", failure=f))
        d.addBoth(self._tryDone)

    def _tryDone(self, result: object) -> None:
        self._inFlight = None
        if self._again and self._running:
            self._again = False
            self._cancelTimer()
            self._run()

    def _mapped(self, mapped: MappedPort) -> None:
        now = self._reactor.seconds()
        self._quick.reset()
        self._slow.reset()
        self.failing = False
        self.expires = now + mapped.lifetime
        self.renewalPeriod = min(self._renewAt(mapped.lifetime), self._refreshCap)
        if self._running and self._timer is None:
            self._timer = self._reactor.callLater(self.renewalPeriod, self._run)
        self._onMapped(mapped)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or not self._running:
            return
        error = failure.value
        assert error is not None
        permanent = isPermanent(error)
        if permanent:
            delay = self._slow.next()
        else:
            delay = self._quick.next()
            if isinstance(error, GatewayTimeout):
                # The request's own last wait was a silence already sat out.
                delay = max(0.0, delay - error.silentFor)
        now = self._reactor.seconds()
        left = 0.0 if self.expires is None else max(0.0, self.expires - now)
        if left > 0:
            delay = min(delay, left)
        if isinstance(error, GatewayRefusal):
            delay = max(delay, error.retryAfter)
        self.failing = left == 0 or permanent
        if self._timer is None:
            self._timer = self._reactor.callLater(delay, self._run)
        self._onFailed(Failed(error, permanent, left, delay))
