"""
The port sources that ask the gateway: NAT-PMP and PCP differ on the wire
but not here.  A protocol supplies a L{Mapper} (its own requests, epoch rule
and renewal point); L{GatewaySource} does the rest -- the path to the
gateway, the internal port, the lease, announcements, network changes,
release on exit -- trying the protocols in order until one answers.

What it guarantees: the port it delivers is one a peer can reach, because
the mapping's internal port equals its external port (qBittorrent is then
moved there); a gateway that is silent, refusing or rebooted is asked again
within L{lease.RETRY_MAX} seconds; a network change re-reads the path and maps
from the new address.

What NAT-PMP cannot protect against: its replies carry no nonce, so anyone
who can send from the gateway's address and port 5351 before the gateway
answers (on the path, or on the same LAN when the gateway is the LAN's) can
forge a grant.  We bound the damage: a lease is trusted for the lifetime we
asked for at most (renewals are never stretched), a renewal that moves the
port is asked again before it is believed, port or lifetime 0 is dropped,
and announcements cause at most one remap per renewal period.  PCP's MAP
replies must echo the 12 random bytes of our request's nonce, so an attacker
who cannot see our requests cannot forge one; one who can still can.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorMulticast,
    IReactorTime,
)
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from qbportsync.config import Config
from qbportsync.interfaces import (
    Forwarded,
    INetworkEvents,
    IPortSource,
    NetworkChange,
    Report,
    SourceError,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.announce import (
    Announcement,
    AnnouncementListener,
    RemapLimiter,
    listenForAnnouncements,
)
from qbportsync.sources.gateway import GatewayPath, resolvePath
from qbportsync.sources.lease import (
    EpochTracker,
    Failed,
    Grant,
    LeaseKeeper,
    MappedPort,
    halfLifetime,
    mapProtocols,
)
from qbportsync.sources.mapper import Mapper, MapperContext, MappingMethod
from qbportsync.sources.natpmpclient import NATPMP
from qbportsync.sources.pcpclient import PCP
from qbportsync.sources.udpclient import (
    GatewayMoves,
    GatewayRefused,
    GatewayTimeout,
    WrongProtocol,
    closePort,
    isPathTrouble,
)
from qbportsync.sources.wire import EpochSample, IPProto

_log = Logger()

DEFAULT_INTERNAL_PORT = 51413
"""Internal port when config says automatic and qBittorrent cannot tell us."""
CONVERGE_TRIES = 3
"""Mappings tried before a gateway that keeps moving the port is given up on."""
NETWORK_SETTLE = 1.0
"""Seconds to let a burst of network events (link, address, route) settle."""


PathResolver = Callable[[IReactorTime, Config], Deferred[GatewayPath]]
"""Finds the gateway and our address towards it: L{resolvePath}, or a fake."""


@implementer(IPortSource)
class GatewaySource:
    """
    The forwarded port as a gateway grants it, kept alive.  Tries each of
    C{methods} in turn until one answers, then speaks only that one (until
    the gateway changes).
    """

    methods: ClassVar[Sequence[MappingMethod]]
    """The mapping protocols a subclass speaks, in the order tried."""

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        sinkPort: Callable[[], Deferred[int]],
        *,
        networkEvents: INetworkEvents | None = None,
        resolvePath: PathResolver = resolvePath,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._metrics = metrics
        self._sinkPort = sinkPort
        self._networkEvents = networkEvents
        self._resolvePath = resolvePath
        self._random = random
        self._index = 0
        self._methodChosen = False
        self._fallback = ""
        self._internalPort: int | None = None
        self._granted: dict[IPProto, Grant] = {}
        self._lastPort: int | None = None
        self._epochs = EpochTracker(self._isEpochReset)
        self._externalAddress: str | None = None
        self._nonces: dict[tuple[str, IPProto, int], bytes] = {}
        self._mapper: Mapper | None = None
        self._path: GatewayPath | None = None
        self._announcePort: IListeningPort | None = None
        self._listenerPath: GatewayPath | None = None
        """The path port 5350 was last opened for, even if opening it failed."""
        self._keeper: LeaseKeeper | None = None
        self._deliver: Report = lambda seen: None
        self._unsubscribe: Callable[[], None] | None = None
        self._networkTimer: IDelayedCall | None = None
        self._probing = False
        self._resetAnnounced = False
        self._limiter = RemapLimiter(reactor, random, metrics)

    @property
    def name(self) -> str:
        """The protocol spoken now (or about to be tried)."""
        return self.methods[self._index].name

    def start(self, deliver: Report) -> None:
        self._deliver = deliver
        self._keeper = LeaseKeeper(
            self._reactor,
            lambda: Deferred.fromCoroutine(self._remap()),
            self._mapped,
            self._failed,
            refreshCap=self._config.portmap.refresh_secs,
            random=self._random,
            renewAt=self._renewAt,
        )
        if self._networkEvents is not None:
            self._unsubscribe = self._networkEvents.subscribe(self._networkChanged)
        self._keeper.start()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def fetchOnce(self) -> Deferred[Forwarded]:
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        try:
            mapped = await self._remap()
        except (SourceError, SourceUnavailable, OSError) as e:
            await self._closeMapper()
            if isinstance(e, OSError):
                raise SourceError(f"cannot talk to the gateway: {e}") from e
            raise
        await self._closeMapper()
        return self._forwarded(mapped)

    async def _remap(self) -> MappedPort:
        while True:
            if self._mapper is not None and not self._mapper.alive:
                # The reactor closed it (ICMP): a new socket next time.
                self._mapper = None
            # The gateway first: a configuration that names none fails at
            # once, before qBittorrent is asked for its port.
            mapper = self._mapper or await self._open()
            await self._chooseInternalPort()
            try:
                return await self._mapConverged(mapper)
            except (WrongProtocol, GatewayTimeout) as e:
                if self._methodChosen or self._index + 1 == len(self.methods):
                    raise
                tried = self.name
                await self._closeMapper()
                self._index += 1
                self._fallback = f"fell back from {tried}: {e}"
                _log.info(
                    "{tried} failed ({error}); trying {protocol}",
                    tried=tried,
                    error=e,
                    protocol=self.name,
                )

    async def _open(self) -> Mapper:
        path = await self._resolvePath(self._reactor, self._config)
        if self._path is not None and path.gateway != self._path.gateway:
            # Another gateway may speak another protocol: ask in order again.
            self._index, self._methodChosen, self._fallback = 0, False, ""
            self._epochs = EpochTracker(self._isEpochReset)
        if self._path != path:
            _log.info(
                "asking gateway {gateway} from {source} ({route})",
                gateway=path.gateway,
                source=path.source or "any address",
                route=path.route,
            )
        self._path = path
        context = MapperContext(
            self._reactor,
            path.gateway,
            path.source,
            self._metrics,
            self._random,
            self._epochSeen,
            self._announcedEpoch,
            self._changed,
            self._nonces,
        )
        try:
            self._mapper = self.methods[self._index].open(context)
        except CannotListenError as e:
            # The address went away between the route lookup and the bind.
            raise SourceError(
                f"cannot open a socket from {path.source or 'any address'}: {e}"
            ) from e
        if self._keeper is not None:
            self._listenForAnnouncements(path)
        return self._mapper

    async def _closeMapper(self) -> None:
        mapper, self._mapper = self._mapper, None
        if mapper is not None:
            await mapper.close()

    def _dropMapper(self) -> None:
        """Close the socket now; the next try opens one on a fresh path."""
        d = Deferred.fromCoroutine(self._closeMapper())
        d.addErrback(lambda f: _log.failure("closing the gateway socket", failure=f))

    def _listenForAnnouncements(self, path: GatewayPath) -> None:
        if self._listenerPath == path:
            return
        self._closeAnnouncements()
        self._listenerPath = path
        listener = AnnouncementListener(
            path.gateway,
            self._announced,
            self._metrics,
            path.source,
            onOther=self._heard,
        )
        try:
            transport = listenForAnnouncements(
                IReactorMulticast(self._reactor), listener
            )
        except CannotListenError as e:
            _log.warn(
                "cannot hear gateway announcements ({error}); gateway reboots "
                "will be noticed at the next renewal",
                error=e,
            )
            return
        self._announcePort = IListeningPort(transport)

    def _closeAnnouncements(self) -> None:
        port, self._announcePort, self._listenerPath = self._announcePort, None, None
        if port is not None:
            d = Deferred.fromCoroutine(closePort(port))
            d.addErrback(lambda f: _log.failure("closing port 5350", failure=f))

    def _heard(self, datagram: bytes) -> None:
        if self._mapper is not None:
            self._mapper.heard(datagram)

    def _renewAt(self, lifetime: float) -> float:
        if self._mapper is None:
            return halfLifetime(lifetime)
        return self._mapper.renewAt(lifetime)

    def _isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        return self._mapper is not None and self._mapper.isEpochReset(last, new)

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

    def _suggest(self, protocol: IPProto) -> int:
        # First request suggests external = internal; renewals the last grant.
        assert self._internalPort is not None
        held = self._granted.get(protocol)
        return self._internalPort if held is None else held.externalPort

    async def _mapConverged(self, mapper: Mapper) -> MappedPort:
        """
        Map; when the gateway forwards external X to another internal port,
        release that and map X to X, so that qBittorrent, moved to X, is
        where the traffic lands.  A gateway that forwards X to X whatever we
        ask (ProtonVPN) converges at the first remap.
        """
        for _ in range(CONVERGE_TRIES):
            mapped = await mapProtocols(
                lambda protocol, suggested: Deferred.fromCoroutine(
                    self._mapOne(mapper, protocol, suggested)
                ),
                self._config.portmap.protocol,
                self._suggest,
                self._config.portmap.lifetime_secs,
                self._metrics,
                probeFirst=self._probing,
            )
            self._methodChosen = True
            assert self._internalPort is not None
            if mapped.port == self._internalPort:
                return mapped
            _log.info(
                "gateway forwards external port {external} to internal port "
                "{internal}; mapping {external} to {external} instead",
                external=mapped.port,
                internal=self._internalPort,
            )
            await self._release(mapper, LogLevel.debug)
            self._internalPort = mapped.port
        await self._release(mapper, LogLevel.debug)
        gateway = "" if self._path is None else f" {self._path.gateway}"
        raise GatewayMoves(
            f"gateway{gateway} never forwarded an external port to the same "
            f"internal port in {CONVERGE_TRIES} tries, so no peer could reach "
            "qBittorrent; check the gateway's allowed port ranges"
        )

    async def _mapOne(self, mapper: Mapper, protocol: IPProto, suggested: int) -> Grant:
        assert self._internalPort is not None
        internal = self._internalPort
        asked = self._config.portmap.lifetime_secs
        try:
            grant = await mapper.mapOne(
                protocol, internal, suggested, asked, probing=self._probing
            )
            self._probing = False
            held = self._granted.get(protocol)
            if (
                held is not None
                and held.internalPort == internal
                and grant.externalPort not in (held.externalPort, suggested)
            ):
                grant = await self._confirm(mapper, held, grant)
        except (SourceError, SourceUnavailable):
            self._metrics.errors.labels(kind="gateway").inc()
            raise
        self._granted[protocol] = grant
        return grant

    async def _confirm(self, mapper: Mapper, held: Grant, moved: Grant) -> Grant:
        """A renewal moved the port: believe it only if asking again agrees."""
        _log.info(
            "gateway moved our {protocol} mapping from port {old} to {new} "
            "on a renewal; asking again before believing it",
            protocol=held.protocol,
            old=held.externalPort,
            new=moved.externalPort,
        )
        again = await mapper.mapOne(
            held.protocol,
            held.internalPort,
            held.externalPort,
            self._config.portmap.lifetime_secs,
        )
        if again.externalPort != moved.externalPort:
            self._metrics.errors.labels(kind="gateway").inc()
            _log.warn(
                "gateway answered port {moved}, then {again}, for our {protocol} "
                "mapping; keeping {again}",
                moved=moved.externalPort,
                again=again.externalPort,
                protocol=held.protocol,
            )
        return again

    async def _release(self, mapper: Mapper, failed: LogLevel) -> None:
        """
        Delete every mapping we hold; one that cannot be deleted is logged
        at level C{failed} and forgotten all the same (it lapses by itself).
        """
        assert self._internalPort is not None
        granted, self._granted = self._granted, {}
        for protocol in granted:
            try:
                await mapper.release(protocol, self._internalPort)
            except (SourceError, SourceUnavailable) as e:
                _log.emit(
                    failed,
                    "could not delete our {protocol} mapping: {error}",
                    protocol=protocol,
                    error=e,
                )
            else:
                _log.info("deleted our {protocol} mapping", protocol=protocol)

    def _forwarded(self, mapped: MappedPort) -> Forwarded:
        expires = self._reactor.seconds() + mapped.lifetime
        self._metrics.forwarded_port.set(mapped.port)
        self._metrics.lease_expiry.set(expires)
        note = "; ".join(n for n in (f"ttl={mapped.lifetime}s", self._fallback) if n)
        return Forwarded(mapped.port, self.name, note=note, expires=expires)

    def _mapped(self, mapped: MappedPort) -> None:
        # A renewal that changes nothing is routine: say it only when asked.
        level = LogLevel.info if mapped.port != self._lastPort else LogLevel.debug
        self._lastPort = mapped.port
        _log.emit(
            level,
            "The gateway forwards port {port} for {lifetime} s ({protocol})",
            port=mapped.port,
            lifetime=mapped.lifetime,
            protocol=self.name,
        )
        self._deliver(self._forwarded(mapped))

    def _failed(self, failed: Failed) -> None:
        cause = f"{self.name}: {failed.error}"
        if isPathTrouble(failed.error):
            # Silence, refusal or a send error: the route, the gateway or
            # our address may have changed; look again at the next try.
            self._dropMapper()
        # While the gateway is away, ask with single datagrams, 8 s apart.
        self._probing = isinstance(failed.error, GatewayTimeout | GatewayRefused)
        if not self._methodChosen:
            # Never answered: the next try asks in every protocol again.
            self._index, self._fallback = 0, ""
        if failed.leaseLeft > 0 and not failed.permanent:
            _log.info(
                "{cause}; trying again in {delay:.1f}s, the lease ends in {left:.0f}s",
                cause=cause,
                delay=failed.retryIn,
                left=failed.leaseLeft,
            )
            return
        _log.debug(
            "{cause}; trying again in {delay:.1f}s", cause=cause, delay=failed.retryIn
        )
        self._deliver(SourceTrouble(cause, "gateway", failed.permanent))

    def _networkChanged(self, change: NetworkChange) -> None:
        if self._keeper is None or self._networkTimer is not None:
            return
        self._networkTimer = self._reactor.callLater(
            NETWORK_SETTLE, self._networkSettled
        )

    def _networkSettled(self) -> None:
        self._networkTimer = None
        d = Deferred.fromCoroutine(self._recheckPath())
        d.addErrback(lambda f: _log.failure("after a network change", failure=f))

    async def _recheckPath(self) -> None:
        keeper = self._keeper
        if keeper is None:
            return
        try:
            path: GatewayPath | None = await self._resolvePath(
                self._reactor, self._config
            )
        except (SourceError, SourceUnavailable, OSError) as e:
            _log.debug("no path to a gateway yet: {error}", error=e)
            path = None
        if path is not None and path == self._path and not keeper.failing:
            return
        _log.info(
            "the network changed; asking the gateway again{where}",
            where="" if path is None else f" ({path.gateway} from {path.source})",
        )
        keeper.cancel()
        await self._closeMapper()
        keeper.retryNow()

    def _epochSeen(self, epoch: int) -> None:
        """An epoch in an answer to us: a reset remaps once the try ends."""
        reset = self._epochs.observe(epoch, self._reactor.seconds())
        announced, self._resetAnnounced = self._resetAnnounced, False
        if reset and announced:
            # The remap under way is the one the announcement asked for.
            return
        if reset:
            self._metrics.epoch_resets.inc()
            _log.warn(
                "the gateway's epoch went back to {epoch}s: it restarted and "
                "forgot our mappings",
                epoch=epoch,
            )
            if self._keeper is not None:
                self._keeper.againAfter()

    def _announcedEpoch(self, epoch: int) -> None:
        reset = self._epochs.contradicts(epoch, self._reactor.seconds())
        self._announcementSays(
            "the gateway restarted" if reset else "the gateway announced itself",
            remap=reset,
            reset=reset,
        )

    def _changed(self) -> None:
        self._announcementSays(
            "the gateway changed our mapping unasked", remap=True, reset=False
        )

    def _announced(self, announcement: Announcement) -> None:
        reset = self._epochs.contradicts(announcement.epoch, self._reactor.seconds())
        address = announcement.externalAddress
        moved = False
        if address is not None:
            previous, self._externalAddress = self._externalAddress, address
            moved = previous is not None and previous != address
        if moved:
            what = f"the gateway's external address changed to {address}"
        elif reset:
            what = "the gateway restarted"
        else:
            what = "the gateway announced itself"
        self._announcementSays(what, remap=reset or moved, reset=reset)

    def _announcementSays(self, what: str, *, remap: bool, reset: bool) -> None:
        """
        Act on what the gateway said unasked -- a forger may say it too: a
        remap after RFC 6886's random 0-5 s, at most once per renewal period.
        """
        keeper = self._keeper
        if keeper is None or not (remap or keeper.failing):
            return
        period = keeper.renewalPeriod or halfLifetime(
            self._config.portmap.lifetime_secs
        )
        delay = self._limiter.delay(what, period)
        if delay is None:
            return
        if reset:
            self._metrics.epoch_resets.inc()
            self._resetAnnounced = True
        keeper.remapSoon(delay)

    async def _stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._networkTimer is not None and self._networkTimer.active():
            self._networkTimer.cancel()
        self._networkTimer = None
        if self._keeper is not None:
            self._keeper.stop()
        mapper = self._mapper
        if self._config.portmap.release_on_exit and mapper is not None:
            await self._release(mapper, LogLevel.warn)
        await self._closeMapper()
        port, self._announcePort, self._listenerPath = self._announcePort, None, None
        if port is not None:
            await closePort(port)


class NATPMPSource(GatewaySource):
    """The forwarded port as a NAT-PMP gateway grants it, kept alive."""

    methods = (NATPMP,)


class PCPSource(GatewaySource):
    """
    The forwarded port as a PCP gateway grants it, kept alive; a gateway
    that answers in NAT-PMP or not at all is asked with NAT-PMP instead.
    """

    methods = (PCP, NATPMP)
