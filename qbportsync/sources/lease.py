"""
Keeping a gateway's port mapping alive, for any mapping protocol.

NAT-PMP and PCP differ on the wire but not here: map TCP and UDP to one
port, renew before the lease ends, retry quickly, and remap everything when
the gateway's epoch says it forgot us.  A protocol supplies a L{Session}
(its own requests, epoch rule and renewal point) built on L{GatewayClient}
(one request in flight, retransmitted on a schedule); L{GatewaySource} does
the rest, trying the protocols in order until one answers.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, Literal, Protocol, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorMulticast,
    IReactorTime,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qbportsync.config import Config
from qbportsync.config import Protocol as MappedProtocols
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.announce import (
    Announcement,
    AnnouncementListener,
    listenForAnnouncements,
)
from qbportsync.sources.gateway import resolveBindAddress, resolveGateway

_log = Logger()

Transport = Literal["TCP", "UDP"]

RESET_DELAY_MAX = 5.0
"""Seconds; a random wait up to this spreads remaps after a reboot (RFC 6886 §3.7)."""
RETRY_FIRST = 1.0
RETRY_MAX = 15.0
SERVER_PORT = 5351
"""NAT-PMP and PCP servers share this port (RFC 6887 §19.1)."""
DEFAULT_INTERNAL_PORT = 51413
"""Internal port when config says automatic and qBittorrent cannot tell us."""


class ParseError(Exception):
    """A datagram that is not a well-formed message of the protocol spoken."""

    reason = "malformed"
    """Label for the datagrams_dropped metric."""


class GatewayTimeout(SourceUnavailable):
    """The gateway never answered (nothing speaks this protocol there)."""


class GatewayRefused(SourceUnavailable):
    """ICMP port unreachable: nothing listens on the gateway's port 5351."""


class WrongProtocol(SourceUnavailable):
    """The gateway answered in another protocol version (RFC 6887 §9)."""


class GatewayRefusal(SourceError):
    """
    The gateway answered a request with an error that says how long not to
    ask again (PCP's error lifetime, RFC 6887 §8.3).
    """

    def __init__(self, message: str, retryAfter: float = 0.0) -> None:
        super().__init__(message)
        self.retryAfter = retryAfter


@frozen
class Grant:
    """One mapping the gateway granted."""

    protocol: Transport
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


MapOne = Callable[[Transport, int], Deferred[Grant]]
"""Map C{protocol} suggesting an external port; the protocol's own request."""


async def mapProtocols(
    mapOne: MapOne,
    protocol: MappedProtocols,
    suggest: Callable[[Transport], int],
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


@frozen
class EpochSample:
    epoch: int
    """The gateway's seconds since its mapping table was created."""
    at: float
    """Our clock when it arrived."""


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
    Map, then renew at C{renewAt(lifetime)}; on failure retry after 1, 2, 4…
    seconds (at most 15, and never past the end of the current lease); on a
    gateway reset, remap after a random 0–5 s.
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
        self._failures = 0
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
        d.addBoth(self._settled)

    def _settled(self, result: object) -> None:
        self._inFlight = None
        if self._again and self._running:
            self._again = False
            self._cancelTimer()
            self._run()

    def _mapped(self, mapped: MappedPort) -> None:
        now = self._reactor.seconds()
        self._failures = 0
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
        self._failures += 1
        # The exponent is capped: a float overflows after ~1000 failures.
        delay = min(RETRY_FIRST * 2.0 ** min(self._failures - 1, 16), RETRY_MAX)
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
            attempt=self._failures + 1,
            delay=delay,
            lease="expired" if left is None or left <= 0 else f"ends in {left:.0f}s",
        )
        if self._timer is None:
            self._timer = self._reactor.callLater(delay, self._run)


RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class _Pending(Generic[RequestT, ResponseT]):
    def __init__(
        self,
        request: RequestT,
        deferred: Deferred[ResponseT],
        waits: Iterator[float],
    ) -> None:
        self.request = request
        self.deferred = deferred
        self.waits = waits
        self.sent = 0


class GatewayClient(DatagramProtocol, Generic[RequestT, ResponseT]):
    """
    Talks to one gateway over a connected UDP socket: one request in flight,
    sent again after each wait of its schedule until answered, others queued.
    A protocol supplies the codec and the matching rule.
    """

    protocolName = ""
    """For messages: "NAT-PMP", "PCP"."""

    def __init__(
        self,
        reactor: IReactorTime,
        gateway: str,
        metrics: Metrics,
        onEpoch: Callable[[int], object],
    ) -> None:
        self._reactor = reactor
        self.gateway = gateway
        self._metrics = metrics
        self._onEpoch = onEpoch
        self._queue: deque[_Pending[RequestT, ResponseT]] = deque()
        self._current: _Pending[RequestT, ResponseT] | None = None
        self._timer: IDelayedCall | None = None

    def encode(self, request: RequestT) -> bytes:
        raise NotImplementedError()

    def decode(self, datagram: bytes) -> ResponseT:
        """The response in C{datagram}; raises L{ParseError} and nothing else."""
        raise NotImplementedError()

    def answers(self, request: RequestT, response: ResponseT) -> bool:
        raise NotImplementedError()

    def epochOf(self, response: ResponseT) -> int | None:
        raise NotImplementedError()

    def fatal(self, error: ParseError, request: RequestT) -> bool:
        """True when C{error} ends C{request} (an undefined result code for it)."""
        return False

    def unmatched(self, response: ResponseT, reason: str) -> None:
        """A valid response that answers nothing in flight: dropped by default."""
        self.drop(reason)

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.gateway, SERVER_PORT)

    def stopProtocol(self) -> None:
        # Empty the queue first, so cancelling the current request starts no other.
        pending = [*([self._current] if self._current else []), *self._queue]
        self._queue.clear()
        for each in pending:
            each.deferred.cancel()

    def send(self, request: RequestT, waits: Iterable[float]) -> Deferred[ResponseT]:
        """
        Send C{request}, again after each of C{waits} seconds; fires with the
        gateway's answer whatever its result code, or fails with
        L{GatewayTimeout} when the waits run out, L{GatewayRefused} or
        L{SourceError}.
        """
        d: Deferred[ResponseT] = Deferred(self._cancel)
        self._queue.append(_Pending(request, d, iter(waits)))
        if self._current is None:
            self._next()
        return d

    def _cancel(self, d: Deferred[ResponseT]) -> None:
        if self._current is not None and self._current.deferred is d:
            self._finish()
            self._next()
        else:
            self._queue = deque(p for p in self._queue if p.deferred is not d)

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        self._current = self._queue.popleft()
        self._send()

    def _send(self) -> None:
        current = self._current
        assert current is not None and self.transport is not None
        wait = next(current.waits, None)
        if wait is None:
            self._fail(
                GatewayTimeout(
                    f"gateway {self.gateway} did not answer {self.protocolName} "
                    f"after {current.sent} tries"
                )
            )
            return
        current.sent += 1
        self._timer = self._reactor.callLater(wait, self._send)
        try:
            self.transport.write(self.encode(current.request), None)
        except OSError as e:
            self._fail(SourceError(f"cannot send to gateway {self.gateway}: {e}"))

    def _finish(self) -> _Pending[RequestT, ResponseT] | None:
        current, self._current = self._current, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return current

    def _fail(self, error: Exception) -> None:
        current = self._finish()
        if current is not None:
            current.deferred.errback(error)
        self._next()

    def drop(self, reason: str, source: str = "") -> None:
        """Count and log a datagram we ignore."""
        self._metrics.datagrams_dropped.labels(reason=reason).inc()
        _log.debug(
            "dropped a datagram from {source}: {reason}",
            source=source or self.gateway,
            reason=reason,
        )

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if addr != (self.gateway, SERVER_PORT):
            self.drop("stranger", f"{addr[0]}:{addr[1]}")
            return
        current = self._current
        try:
            response = self.decode(datagram)
        except ParseError as e:
            self._metrics.errors.labels(kind="parse").inc()
            self.drop(e.reason)
            if current is not None and self.fatal(e, current.request):
                self._fail(SourceError(f"gateway {self.gateway} sent {e}"))
            return
        if current is None:
            self.unmatched(response, "unexpected")
            return
        if not self.answers(current.request, response):
            self.unmatched(response, "mismatch")
            return
        epoch = self.epochOf(response)
        if epoch is not None:
            self._onEpoch(epoch)
        self._finish()
        current.deferred.callback(response)
        self._next()

    def connectionRefused(self) -> None:
        if self._current is not None:
            self._fail(
                GatewayRefused(
                    f"gateway {self.gateway} refused {self.protocolName} "
                    "(ICMP port unreachable)"
                )
            )


async def closePort(port: IListeningPort) -> None:
    """Stop listening, waiting when the port says so."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


@frozen
class SessionContext:
    """What a protocol needs to open a session with the gateway."""

    reactor: IReactorTime
    gateway: str
    bindAddress: str
    metrics: Metrics
    random: Callable[[], float]
    onEpoch: Callable[[int], object]
    """Every epoch the gateway reports, for the source's epoch rule."""
    onChange: Callable[[], object]
    """The gateway said, unasked, that one of our mappings changed."""


class Session(Protocol):
    """One protocol's conversation with the gateway over one socket."""

    name: str
    """Short name for logs and JSON: "natpmp", "pcp"."""

    def mapOne(
        self, protocol: Transport, internalPort: int, suggested: int, lifetime: int
    ) -> Deferred[Grant]:
        """Create or renew a mapping; fails with SourceError/SourceUnavailable."""

    def release(self, protocol: Transport, internalPort: int) -> Deferred[None]:
        """Delete the mapping, trying only briefly."""

    def renewAt(self, lifetime: float) -> float:
        """Seconds after a grant of C{lifetime} seconds to renew it."""

    def isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        """The protocol's rule: did the gateway lose its state?"""

    def heard(self, datagram: bytes) -> None:
        """A datagram from the gateway on the announcement port, not an announcement."""

    def close(self) -> Deferred[None]:
        """Close the socket, cancelling every request."""


SessionFactory = Callable[[SessionContext], Session]


@frozen
class MappingProtocol:
    """A protocol the source may speak: its name and how to open a session."""

    name: str
    open: SessionFactory


@implementer(IPortSource)
class GatewaySource:
    """
    The forwarded port as a gateway grants it, kept alive.  Tries each of
    C{protocols} in turn until one answers, then speaks only that one.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        sinkPort: Callable[[], Deferred[int]],
        protocols: Sequence[MappingProtocol],
        *,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._metrics = metrics
        self._sinkPort = sinkPort
        self._protocols = protocols
        self._index = 0
        self._settled = False
        self._fallback = ""
        self._random = random
        self._internalPort: int | None = None
        self._granted: dict[Transport, int] = {}
        self._epochs = EpochTracker(self._isEpochReset)
        self._externalAddress: str | None = None
        self._session: Session | None = None
        self._gateway = ""
        self._bindAddress = ""
        self._ports: list[IListeningPort] = []
        self._listening = False
        self._keeper: LeaseKeeper | None = None
        self._deliver: Callable[[Forwarded], object] = lambda forwarded: None

    @property
    def name(self) -> str:
        """The protocol spoken now (or about to be tried)."""
        return self._protocols[self._index].name

    def start(self, deliver: Callable[[Forwarded], object]) -> None:
        self._deliver = deliver
        self._keeper = LeaseKeeper(
            self._reactor,
            lambda: Deferred.fromCoroutine(self._remap()),
            self._mapped,
            fallbackRefresh=self._config.portmap.refresh_secs,
            random=self._random,
            renewAt=self._renewAt,
            name=self.name,
        )
        self._keeper.start()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def fetchOnce(self) -> Deferred[Forwarded]:
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        # Not "finally": a coroutine closed unfinished must not await.
        try:
            mapped = await self._negotiate()
        except Exception:
            await self._closeSession()
            raise
        await self._closeSession()
        return self._forwarded(mapped)

    async def _remap(self) -> MappedPort:
        return await self._negotiate()

    async def _negotiate(self) -> MappedPort:
        await self._chooseInternalPort()
        while True:
            session = self._session or await self._open()
            try:
                mapped = await self._mapAll(session)
            except (WrongProtocol, GatewayTimeout) as e:
                if self._settled or self._index + 1 == len(self._protocols):
                    raise
                tried = self.name
                await self._closeSession()
                self._index += 1
                self._fallback = f"fell back from {tried}: {e}"
                _log.info(
                    "{tried} failed ({error}); trying {protocol}",
                    tried=tried,
                    error=e,
                    protocol=self.name,
                )
                continue
            self._settled = True
            return mapped

    async def _open(self) -> Session:
        self._gateway = await resolveGateway(self._reactor, self._config)
        self._bindAddress = resolveBindAddress(self._config)
        self._epochs = EpochTracker(self._isEpochReset)
        self._session = self._protocols[self._index].open(
            SessionContext(
                self._reactor,
                self._gateway,
                self._bindAddress,
                self._metrics,
                self._random,
                self._epochSeen,
                self._changed,
            )
        )
        if self._keeper is not None and not self._listening:
            self._listening = True
            self._listenForAnnouncements(self._gateway)
        return self._session

    async def _closeSession(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _listenForAnnouncements(self, gateway: str) -> None:
        listener = AnnouncementListener(
            gateway,
            self._announced,
            self._metrics,
            self._bindAddress,
            onOther=self._heard,
        )
        try:
            transport = listenForAnnouncements(
                IReactorMulticast(self._reactor), listener
            )
            self._ports.append(IListeningPort(transport))
        except CannotListenError as e:
            _log.warn(
                "cannot hear gateway announcements ({error}); gateway reboots "
                "will be noticed at the next renewal",
                error=e,
            )

    def _heard(self, datagram: bytes) -> None:
        if self._session is not None:
            self._session.heard(datagram)

    def _renewAt(self, lifetime: float) -> float:
        if self._session is None:
            return halfLifetime(lifetime)
        return self._session.renewAt(lifetime)

    def _isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        return self._session is not None and self._session.isEpochReset(last, new)

    async def _chooseInternalPort(self) -> int:
        if self._internalPort is None:
            self._internalPort = self._config.portmap.internal_port or (
                await self._askSinkPort()
            )
        return self._internalPort

    async def _askSinkPort(self) -> int:
        try:
            port = await self._sinkPort()
        except Exception as e:
            _log.info(
                "qBittorrent's port is unknown ({error}); mapping internal port {port}",
                error=e,
                port=DEFAULT_INTERNAL_PORT,
            )
            return DEFAULT_INTERNAL_PORT
        if 0 < port < 65536:
            return port
        return DEFAULT_INTERNAL_PORT

    def _suggest(self, protocol: Transport) -> int:
        # First request suggests external = internal; renewals the last grant.
        assert self._internalPort is not None
        return self._granted.get(protocol, self._internalPort)

    async def _mapAll(self, session: Session) -> MappedPort:
        return await mapProtocols(
            lambda protocol, suggested: Deferred.fromCoroutine(
                self._mapOne(session, protocol, suggested)
            ),
            self._config.portmap.protocol,
            self._suggest,
            self._metrics,
        )

    async def _mapOne(
        self, session: Session, protocol: Transport, suggested: int
    ) -> Grant:
        assert self._internalPort is not None
        try:
            grant = await session.mapOne(
                protocol,
                self._internalPort,
                suggested,
                self._config.portmap.lifetime_secs,
            )
        except (SourceError, SourceUnavailable):
            self._metrics.errors.labels(kind="gateway").inc()
            raise
        self._granted[protocol] = grant.externalPort
        return grant

    def _forwarded(self, mapped: MappedPort) -> Forwarded:
        now = self._reactor.seconds()
        expires = now + mapped.lifetime if mapped.lifetime else None
        self._metrics.forwarded_port.set(mapped.port)
        if expires is not None:
            self._metrics.lease_expiry.set(expires)
        note = "; ".join(n for n in (f"ttl={mapped.lifetime}s", self._fallback) if n)
        return Forwarded(mapped.port, self.name, note=note, expires=expires)

    def _mapped(self, mapped: MappedPort) -> None:
        _log.info(
            "gateway forwards port {port} for {lifetime}s ({protocol})",
            port=mapped.port,
            lifetime=mapped.lifetime,
            protocol=self.name,
        )
        self._deliver(self._forwarded(mapped))

    def _epochSeen(self, epoch: int) -> None:
        if self._epochs.observe(epoch, self._reactor.seconds()):
            self._metrics.epoch_resets.inc()
            _log.warn(
                "the gateway's epoch went back to {epoch}s: it restarted and "
                "forgot our mappings",
                epoch=epoch,
            )
            if self._keeper is not None:
                self._keeper.gatewayReset()

    def _changed(self) -> None:
        if self._keeper is not None:
            self._keeper.gatewayReset()

    def _announced(self, announcement: Announcement) -> None:
        self._epochSeen(announcement.epoch)
        address = announcement.externalAddress
        if address is None:
            return
        previous, self._externalAddress = self._externalAddress, address
        if previous is not None and previous != address and self._keeper is not None:
            _log.warn(
                "the gateway's external address changed from {old} to {new}",
                old=previous,
                new=address,
            )
            self._keeper.gatewayReset()

    async def _stop(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
        session = self._session
        if self._config.portmap.release_on_exit and session is not None:
            await self._release(session)
        await self._closeSession()
        ports, self._ports, self._listening = self._ports, [], False
        for port in ports:
            await closePort(port)

    async def _release(self, session: Session) -> None:
        assert self._internalPort is not None
        for protocol in list(self._granted):
            try:
                await session.release(protocol, self._internalPort)
            except (SourceError, SourceUnavailable) as e:
                _log.warn(
                    "could not delete our {protocol} mapping: {error}",
                    protocol=protocol,
                    error=e,
                )
            else:
                del self._granted[protocol]
                _log.info("deleted our {protocol} mapping", protocol=protocol)
