"""
NAT-PMP (RFC 6886): a pure wire codec, a thin UDP client, and the port source.

Data flows codec → L{NATPMPClient} (one request in flight, retransmissions)
→ L{NATPMPSource} (gateway, internal port, lease keeping, announcements).
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from ipaddress import IPv4Address

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorMulticast,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from qbportsync.config import Config
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
from qbportsync.sources.lease import (
    EpochSample,
    EpochTracker,
    Grant,
    LeaseKeeper,
    MappedPort,
    Transport,
    mapProtocols,
)

_log = Logger()

SERVER_PORT = 5351
TRIES = 9
RETRY_INITIAL = 0.25
"""Seconds before the first retransmission; doubles each time (§3.1)."""
RELEASE_TRIES = 3
"""Deleting on exit must not hold up a stop for two minutes."""
DEFAULT_INTERNAL_PORT = 51413
"""Internal port when config says automatic and qBittorrent cannot tell us."""

_HEADER = struct.Struct("!BBHI")  # version, opcode, result, SSSoE
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_RESPONSE_BIT = 128


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class ParseError(Exception):
    """A datagram that is not a well-formed NAT-PMP message."""

    reason = "malformed"
    """Label for the datagrams_dropped metric."""


class WrongLength(ParseError):
    reason = "length"


class WrongVersion(ParseError):
    reason = "version"


class WrongOpcode(ParseError):
    reason = "opcode"


class UnknownResult(ParseError):
    """A result code RFC 6886 does not define: fatal for the request it answers."""

    reason = "result"

    def __init__(self, opcode: int, result: int) -> None:
        super().__init__(f"unknown result code {result} for opcode {opcode}")
        self.opcode = opcode
        self.result = result


def _protocolOpcode(protocol: Transport) -> Opcode:
    return Opcode.MAP_UDP if protocol == "UDP" else Opcode.MAP_TCP


def _opcodeProtocol(opcode: int) -> Transport:
    return "UDP" if opcode == Opcode.MAP_UDP else "TCP"


@frozen
class ExternalAddressRequest:
    """Ask the gateway for its external address (§3.2)."""


@frozen
class MapRequest:
    """Create, renew (lifetime > 0) or delete (lifetime 0) a mapping (§3.3)."""

    protocol: Transport
    internalPort: int
    suggestedPort: int
    lifetime: int


Request = ExternalAddressRequest | MapRequest


@frozen
class ExternalAddressResponse:
    result: ResultCode
    epoch: int
    address: str
    """Meaningless unless result is SUCCESS (§3.2)."""


@frozen
class MapResponse:
    protocol: Transport
    result: ResultCode
    epoch: int
    internalPort: int
    externalPort: int
    lifetime: int


@frozen
class ErrorResponse:
    """
    The 8-byte form of a failure: C{opcode} is the response opcode (128 + the
    request's), or 0 in RFC 6886's "unsupported version" layout.
    """

    opcode: int
    result: ResultCode
    epoch: int


@frozen
class UnsupportedVersion:
    """
    A gateway speaking another version (PCP is 2) refused ours: byte 3 is 1
    (unsupported version) in both formats (RFC 6887 §9).
    """

    version: int


Response = ExternalAddressResponse | MapResponse | ErrorResponse | UnsupportedVersion


def encodeRequest(request: Request) -> bytes:
    """The datagram for C{request}."""
    if isinstance(request, ExternalAddressRequest):
        return b"\x00\x00"
    return _MAP_REQUEST.pack(
        0,
        _protocolOpcode(request.protocol),
        0,
        request.internalPort,
        request.suggestedPort,
        request.lifetime,
    )


def decodeRequest(data: bytes) -> Request:
    """Parse a client's datagram (what a gateway sees); for fakes and tests."""
    if len(data) < 2:
        raise WrongLength(f"{len(data)} bytes")
    if data[0] != 0:
        raise WrongVersion(f"version {data[0]}")
    if data[1] == Opcode.EXTERNAL_ADDRESS:
        if len(data) != 2:
            raise WrongLength(f"{len(data)} bytes for an address request")
        return ExternalAddressRequest()
    if data[1] not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise WrongOpcode(f"opcode {data[1]}")
    if len(data) != _MAP_REQUEST.size:
        raise WrongLength(f"{len(data)} bytes for a map request")
    _, op, _, internal, suggested, lifetime = _MAP_REQUEST.unpack(data)
    return MapRequest(_opcodeProtocol(op), internal, suggested, lifetime)


def encodeResponse(response: Response) -> bytes:
    """The datagram a gateway sends for C{response}; for fakes and tests."""
    if isinstance(response, UnsupportedVersion):
        return struct.pack("!BBBB", response.version, _RESPONSE_BIT, 0, 1)
    if isinstance(response, ErrorResponse):
        return _HEADER.pack(0, response.opcode, response.result, response.epoch)
    if isinstance(response, ExternalAddressResponse):
        header = _HEADER.pack(
            0, _RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS, response.result, response.epoch
        )
        return header + IPv4Address(response.address).packed
    return _MAP_RESPONSE.pack(
        0,
        _RESPONSE_BIT | _protocolOpcode(response.protocol),
        response.result,
        response.epoch,
        response.internalPort,
        response.externalPort,
        response.lifetime,
    )


def _result(opcode: int, value: int) -> ResultCode:
    try:
        return ResultCode(value)
    except ValueError:
        raise UnknownResult(opcode, value) from None


def decodeResponse(data: bytes) -> Response:
    """
    Parse a gateway's datagram.  Raises a L{ParseError} subclass for anything
    RFC 6886 does not define, and nothing else.
    """
    if len(data) >= 4 and data[0] != 0 and data[2:4] == b"\x00\x01":
        return UnsupportedVersion(data[0])
    if len(data) < _HEADER.size:
        raise WrongLength(f"{len(data)} bytes")
    version, opcode, rawResult, epoch = _HEADER.unpack_from(data)
    if version != 0:
        raise WrongVersion(f"version {version}")
    if opcode == 0 and rawResult == ResultCode.UNSUPPORTED_VERSION:
        # RFC 6886 §3.5 lays out this one error with opcode 0.
        if len(data) != _HEADER.size:
            raise WrongLength(f"{len(data)} bytes for an error")
        return ErrorResponse(0, ResultCode.UNSUPPORTED_VERSION, epoch)
    if opcode & _RESPONSE_BIT == 0 or opcode & ~_RESPONSE_BIT > Opcode.MAP_TCP:
        raise WrongOpcode(f"opcode {opcode}")
    result = _result(opcode, rawResult)
    if len(data) == _HEADER.size and result != ResultCode.SUCCESS:
        return ErrorResponse(opcode, result, epoch)
    if opcode == _RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS:
        if len(data) != 12:
            raise WrongLength(f"{len(data)} bytes for an address response")
        return ExternalAddressResponse(result, epoch, str(IPv4Address(data[8:12])))
    if len(data) != _MAP_RESPONSE.size:
        raise WrongLength(f"{len(data)} bytes for a map response")
    _, _, _, _, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    return MapResponse(
        _opcodeProtocol(opcode & ~_RESPONSE_BIT),
        result,
        epoch,
        internal,
        external,
        lifetime,
    )


def epochReset(last: EpochSample, new: EpochSample) -> bool:
    """
    RFC 6886 §3.6: the gateway lost its state when its epoch is more than 2 s
    below the last one plus 7/8 of the time that passed here.
    """
    return new.epoch < last.epoch + (new.at - last.at) * 7 / 8 - 2


class GatewayTimeout(SourceUnavailable):
    """The gateway never answered (no NAT-PMP there)."""


class GatewayRefused(SourceUnavailable):
    """ICMP port unreachable: nothing listens on the gateway's port 5351."""


def _answers(request: Request, response: Response) -> bool:
    if isinstance(response, UnsupportedVersion):
        return True
    if isinstance(response, ErrorResponse):
        return response.opcode in (0, _RESPONSE_BIT | _requestOpcode(request))
    if isinstance(request, ExternalAddressRequest):
        return isinstance(response, ExternalAddressResponse)
    return (
        isinstance(response, MapResponse)
        and response.protocol == request.protocol
        and response.internalPort == request.internalPort
    )


def _requestOpcode(request: Request) -> int:
    if isinstance(request, ExternalAddressRequest):
        return Opcode.EXTERNAL_ADDRESS
    return _protocolOpcode(request.protocol)


@frozen
class _Pending:
    request: Request
    deferred: Deferred[Response]
    tries: int


class NATPMPClient(DatagramProtocol):
    """
    Talks to one gateway over a connected UDP socket: one request in flight,
    retransmitted after 250 ms, 500 ms, 1 s… (§3.1), others queued.
    """

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
        self._queue: deque[_Pending] = deque()
        self._current: _Pending | None = None
        self._timer: IDelayedCall | None = None
        self._sent = 0

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.gateway, SERVER_PORT)

    def stopProtocol(self) -> None:
        # Empty the queue first, so cancelling the current request starts no other.
        pending = [*([self._current] if self._current else []), *self._queue]
        self._queue.clear()
        for each in pending:
            each.deferred.cancel()

    def request(self, request: Request, tries: int = TRIES) -> Deferred[Response]:
        """
        Send C{request}; fires with the gateway's answer whatever its result
        code, or fails with L{GatewayTimeout}, L{GatewayRefused} or
        L{SourceError}.
        """
        d: Deferred[Response] = Deferred(self._cancel)
        self._queue.append(_Pending(request, d, tries))
        if self._current is None:
            self._next()
        return d

    def _cancel(self, d: Deferred[Response]) -> None:
        if self._current is not None and self._current.deferred is d:
            self._finish()
            self._next()
        else:
            self._queue = deque(p for p in self._queue if p.deferred is not d)

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        self._current = self._queue.popleft()
        self._sent = 0
        self._send()

    def _send(self) -> None:
        current = self._current
        assert current is not None and self.transport is not None
        if self._sent == current.tries:
            self._fail(
                GatewayTimeout(
                    f"gateway {self.gateway} did not answer after {current.tries} tries"
                )
            )
            return
        delay = RETRY_INITIAL * 2**self._sent
        self._sent += 1
        self._timer = self._reactor.callLater(delay, self._send)
        try:
            self.transport.write(encodeRequest(current.request), None)
        except OSError as e:
            self._fail(SourceError(f"cannot send to gateway {self.gateway}: {e}"))

    def _finish(self) -> _Pending | None:
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

    def _drop(self, reason: str, source: str) -> None:
        self._metrics.datagrams_dropped.labels(reason=reason).inc()
        _log.debug(
            "dropped a datagram from {source}: {reason}", source=source, reason=reason
        )

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if addr != (self.gateway, SERVER_PORT):
            self._drop("stranger", f"{addr[0]}:{addr[1]}")
            return
        current = self._current
        try:
            response = decodeResponse(datagram)
        except ParseError as e:
            self._metrics.errors.labels(kind="parse").inc()
            self._drop(e.reason, self.gateway)
            # RFC 6886 §3.5: an undefined result code is fatal for its request.
            if (
                isinstance(e, UnknownResult)
                and current is not None
                and e.opcode == _RESPONSE_BIT | _requestOpcode(current.request)
            ):
                self._fail(SourceError(f"gateway {self.gateway} sent {e}"))
            return
        if current is None:
            self._drop("unexpected", self.gateway)
            return
        if not _answers(current.request, response):
            self._drop("mismatch", self.gateway)
            return
        if not isinstance(response, UnsupportedVersion):
            self._onEpoch(response.epoch)
        self._finish()
        current.deferred.callback(response)
        self._next()

    def connectionRefused(self) -> None:
        if self._current is not None:
            self._fail(
                GatewayRefused(
                    f"gateway {self.gateway} refused NAT-PMP (ICMP port unreachable)"
                )
            )


async def _close(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def _grantOrRaise(gateway: str, response: Response) -> MapResponse:
    """A successful map response, or the exception its result code means."""
    if isinstance(response, UnsupportedVersion):
        raise SourceUnavailable(
            f"gateway {gateway} speaks version {response.version}, not NAT-PMP"
        )
    if isinstance(response, MapResponse) and response.result == ResultCode.SUCCESS:
        return response
    message = f"gateway {gateway} answered {response.result.name.lower()}"
    if response.result in (
        ResultCode.UNSUPPORTED_VERSION,
        ResultCode.UNSUPPORTED_OPCODE,
    ):
        raise SourceUnavailable(message)
    raise SourceError(message)


@implementer(IPortSource)
class NATPMPSource:
    """The forwarded port as a NAT-PMP gateway grants it, kept alive."""

    name = "natpmp"

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        sinkPort: Callable[[], Deferred[int]],
        *,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._metrics = metrics
        self._sinkPort = sinkPort
        self._random = random
        self._internalPort: int | None = None
        self._granted: dict[Transport, int] = {}
        self._epochs = EpochTracker(epochReset)
        self._externalAddress: str | None = None
        self._client: NATPMPClient | None = None
        self._ports: list[IListeningPort] = []
        self._bindAddress = ""
        self._keeper: LeaseKeeper | None = None
        self._deliver: Callable[[Forwarded], object] = lambda forwarded: None

    def start(self, deliver: Callable[[Forwarded], object]) -> None:
        self._deliver = deliver
        self._keeper = LeaseKeeper(
            self._reactor,
            lambda: Deferred.fromCoroutine(self._remap()),
            self._mapped,
            fallbackRefresh=self._config.portmap.refresh_secs,
            random=self._random,
            name=self.name,
        )
        self._keeper.start()

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def fetchOnce(self) -> Deferred[Forwarded]:
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        await self._chooseInternalPort()
        client, port = await self._connect()
        try:
            mapped = await self._mapAll(client)
        finally:
            await _close(port)
        return self._forwarded(mapped)

    async def _remap(self) -> MappedPort:
        await self._chooseInternalPort()
        if self._client is None:
            client, port = await self._connect()
            self._client = client
            self._ports.append(port)
            self._listenForAnnouncements(client.gateway)
        return await self._mapAll(self._client)

    async def _connect(self) -> tuple[NATPMPClient, IListeningPort]:
        gateway = await resolveGateway(self._reactor, self._config)
        bind = resolveBindAddress(self._config)
        client = NATPMPClient(self._reactor, gateway, self._metrics, self._epochSeen)
        self._bindAddress = bind
        port = IReactorUDP(self._reactor).listenUDP(0, client, bind, 8192)
        return client, port

    def _listenForAnnouncements(self, gateway: str) -> None:
        listener = AnnouncementListener(
            gateway, self._announced, self._metrics, self._bindAddress
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

    async def _mapAll(self, client: NATPMPClient) -> MappedPort:
        return await mapProtocols(
            lambda protocol, suggested: Deferred.fromCoroutine(
                self._mapOne(client, protocol, suggested)
            ),
            self._config.portmap.protocol,
            self._suggest,
            self._metrics,
        )

    async def _mapOne(
        self, client: NATPMPClient, protocol: Transport, suggested: int
    ) -> Grant:
        assert self._internalPort is not None
        request = MapRequest(
            protocol, self._internalPort, suggested, self._config.portmap.lifetime_secs
        )
        try:
            response = _grantOrRaise(client.gateway, await client.request(request))
        except (SourceError, SourceUnavailable):
            self._metrics.errors.labels(kind="gateway").inc()
            raise
        self._granted[protocol] = response.externalPort
        return Grant(
            protocol, response.internalPort, response.externalPort, response.lifetime
        )

    def _forwarded(self, mapped: MappedPort) -> Forwarded:
        now = self._reactor.seconds()
        expires = now + mapped.lifetime if mapped.lifetime else None
        self._metrics.forwarded_port.set(mapped.port)
        if expires is not None:
            self._metrics.lease_expiry.set(expires)
        return Forwarded(
            mapped.port, self.name, note=f"ttl={mapped.lifetime}s", expires=expires
        )

    def _mapped(self, mapped: MappedPort) -> None:
        _log.info(
            "gateway forwards port {port} for {lifetime}s",
            port=mapped.port,
            lifetime=mapped.lifetime,
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
        client = self._client
        if self._config.portmap.release_on_exit and client is not None:
            await self._release(client)
        ports, self._ports, self._client = self._ports, [], None
        for port in ports:
            await _close(port)

    async def _release(self, client: NATPMPClient) -> None:
        assert self._internalPort is not None
        for protocol in list(self._granted):
            # Internal port 0 here would delete every mapping we have (§3.4).
            request = MapRequest(protocol, self._internalPort, 0, 0)
            try:
                await client.request(request, tries=RELEASE_TRIES)
            except (SourceError, SourceUnavailable) as e:
                _log.warn(
                    "could not delete our {protocol} mapping: {error}",
                    protocol=protocol,
                    error=e,
                )
            else:
                del self._granted[protocol]
                _log.info("deleted our {protocol} mapping", protocol=protocol)
