"""
The port sources that ask the gateway: NAT-PMP and PCP differ on the wire
but not here.  A protocol supplies a L{Mapper} (its own requests, epoch rule
and renewal point); L{GatewaySource} does the rest -- gateway discovery, the
internal port, the lease, announcements, release on exit -- trying the
protocols in order until one answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorMulticast,
    IReactorTime,
)
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from qbportsync.config import Config
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.announce import (
    Announcement,
    AnnouncementListener,
    listenForAnnouncements,
)
from qbportsync.sources.gateway import resolvePath
from qbportsync.sources.lease import (
    EpochTracker,
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
    GatewayTimeout,
    WrongProtocol,
    closePort,
)
from qbportsync.sources.wire import EpochSample, IPProto

_log = Logger()

DEFAULT_INTERNAL_PORT = 51413
"""Internal port when config says automatic and qBittorrent cannot tell us."""


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
        protocols: Sequence[MappingMethod],
        *,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._metrics = metrics
        self._sinkPort = sinkPort
        self._protocols = protocols
        self._index = 0
        self._protocolChosen = False
        self._fallback = ""
        self._random = random
        self._internalPort: int | None = None
        self._granted: dict[IPProto, int] = {}
        self._lastPort: int | None = None
        self._epochs = EpochTracker(self._isEpochReset)
        self._externalAddress: str | None = None
        self._mapper: Mapper | None = None
        self._gateway = ""
        self._bindAddress = ""
        self._ports: list[IListeningPort] = []
        self._listening = False
        self._keeper: LeaseKeeper | None = None
        self._deliver: Report = lambda forwarded: None

    @property
    def name(self) -> str:
        """The protocol spoken now (or about to be tried)."""
        return self._protocols[self._index].name

    def start(self, deliver: Report) -> None:
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
            await self._closeMapper()
            raise
        await self._closeMapper()
        return self._forwarded(mapped)

    async def _remap(self) -> MappedPort:
        return await self._negotiate()

    async def _negotiate(self) -> MappedPort:
        while True:
            # The gateway first: a configuration that names none fails at
            # once, before qBittorrent is asked for its port.
            mapper = self._mapper or await self._open()
            await self._chooseInternalPort()
            try:
                mapped = await self._mapAll(mapper)
            except (WrongProtocol, GatewayTimeout) as e:
                if self._protocolChosen or self._index + 1 == len(self._protocols):
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
                continue
            self._protocolChosen = True
            return mapped

    async def _open(self) -> Mapper:
        path = await resolvePath(self._reactor, self._config)
        _log.debug(
            "asking gateway {gateway} from {source} ({route})",
            gateway=path.gateway,
            source=path.source or "any address",
            route=path.route,
        )
        self._gateway = path.gateway
        self._bindAddress = path.source
        self._epochs = EpochTracker(self._isEpochReset)
        self._mapper = self._protocols[self._index].open(
            MapperContext(
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
        return self._mapper

    async def _closeMapper(self) -> None:
        mapper, self._mapper = self._mapper, None
        if mapper is not None:
            await mapper.close()

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
        return self._granted.get(protocol, self._internalPort)

    async def _mapAll(self, mapper: Mapper) -> MappedPort:
        return await mapProtocols(
            lambda protocol, suggested: Deferred.fromCoroutine(
                self._mapOne(mapper, protocol, suggested)
            ),
            self._config.portmap.protocol,
            self._suggest,
            self._metrics,
        )

    async def _mapOne(self, mapper: Mapper, protocol: IPProto, suggested: int) -> Grant:
        assert self._internalPort is not None
        try:
            grant = await mapper.mapOne(
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
        mapper = self._mapper
        if self._config.portmap.release_on_exit and mapper is not None:
            await self._release(mapper)
        await self._closeMapper()
        ports, self._ports, self._listening = self._ports, [], False
        for port in ports:
            await closePort(port)

    async def _release(self, mapper: Mapper) -> None:
        assert self._internalPort is not None
        for protocol in list(self._granted):
            try:
                await mapper.release(protocol, self._internalPort)
            except (SourceError, SourceUnavailable) as e:
                _log.warn(
                    "could not delete our {protocol} mapping: {error}",
                    protocol=protocol,
                    error=e,
                )
            else:
                del self._granted[protocol]
                _log.info("deleted our {protocol} mapping", protocol=protocol)


class NATPMPSource(GatewaySource):
    """The forwarded port as a NAT-PMP gateway grants it, kept alive."""

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        sinkPort: Callable[[], Deferred[int]],
        *,
        random: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(reactor, config, metrics, sinkPort, [NATPMP], random=random)


class PCPSource(GatewaySource):
    """
    The forwarded port as a PCP gateway grants it, kept alive; a gateway
    that answers in NAT-PMP or not at all is asked with NAT-PMP instead.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        sinkPort: Callable[[], Deferred[int]],
        *,
        random: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            reactor, config, metrics, sinkPort, [PCP, NATPMP], random=random
        )
