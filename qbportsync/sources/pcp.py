"""
PCP (RFC 6887): a pure wire codec for the MAP and ANNOUNCE opcodes, the
schedules of §8.1.1 and §11.2.1, a thin UDP client, and the port source
that falls back to NAT-PMP when the gateway does not speak PCP.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.logger import Logger

from qbportsync.config import Config
from qbportsync.interfaces import SourceUnavailable
from qbportsync.metrics import Metrics
from qbportsync.sources import udpclient
from qbportsync.sources.lease import (
    EpochSample,
    Grant,
    Transport,
)
from qbportsync.sources.mapping import (
    GatewaySource,
    MappingProtocol,
    SessionContext,
)
from qbportsync.sources.natpmp import NATPMP
from qbportsync.sources.udpclient import (
    GatewayClient,
    GatewayRefusal,
    ParseError,
    UnknownResult,
    WrongLength,
    WrongOpcode,
    WrongProtocol,
    WrongVersion,
    closePort,
)

_log = Logger()

VERSION = 2
MAX_LENGTH = 1100
NONCE_LENGTH = 12
RETRY_INITIAL = 3.0
"""IRT of §8.1.1, seconds."""
RETRY_MAX = 1024.0
"""MRT of §8.1.1, seconds."""
JITTER = 0.1
PROBE_SECS = 5.0
"""
How long the first request waits for any PCP answer before NAT-PMP is
tried: a gateway that ignores PCP costs this, not §8.1.1's unbounded retries.
"""
RENEWAL_GAP = 4.0
"""Renewal requests are never closer together than this (§11.2.1)."""
NO_PREFERENCE = "0.0.0.0"  # noqa: S104 (an address in a message, not a bind)
"""Suggested external address meaning "any IPv4 address" (§11.1)."""

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12x")
_MAP_BODY = struct.Struct("!12sB3xHH16s")
_OPTION_HEADER = struct.Struct("!BxH")
_RESPONSE_BIT = 0x80
_PROTOCOLS: dict[Transport, int] = {"TCP": 6, "UDP": 17}
_TRANSPORTS: dict[int, Transport] = {6: "TCP", 17: "UDP"}
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class WrongDirection(ParseError):
    """A request where a response belongs (the R bit), or the reverse."""

    reason = "direction"


class UnknownProtocol(ParseError):
    """A MAP for a protocol other than TCP and UDP: never one of ours."""

    reason = "protocol"


class MalformedOption(ParseError):
    reason = "option"


@frozen
class MapRequest:
    """Create, renew (lifetime > 0) or delete (lifetime 0) a mapping (§11.1)."""

    nonce: bytes
    protocol: Transport
    internalPort: int
    suggestedPort: int
    suggestedAddress: str
    lifetime: int
    clientAddress: str
    """Our address as the gateway sees it; IPv4 goes as ::ffff:a.b.c.d."""


@frozen
class AnnounceRequest:
    """Ask the gateway to answer with its epoch (§14.1)."""

    clientAddress: str


Request = MapRequest | AnnounceRequest


@frozen
class MapResponse:
    result: ResultCode
    lifetime: int
    """The mapping's lifetime; for an error, how long not to ask again."""
    epoch: int
    nonce: bytes
    protocol: Transport
    internalPort: int
    externalPort: int
    externalAddress: str


@frozen
class AnnounceResponse:
    result: ResultCode
    lifetime: int
    epoch: int


@frozen
class UnsupportedVersion:
    """
    A gateway speaking another version refused ours: byte 3 is 1 in both
    formats, byte 0 the version it speaks (0 is NAT-PMP) (§9).
    """

    version: int


Response = MapResponse | AnnounceResponse | UnsupportedVersion


def packAddress(address: str) -> bytes:
    """16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address (§5)."""
    if ":" in address:
        return IPv6Address(address).packed
    return _MAPPED_PREFIX + IPv4Address(address).packed


def unpackAddress(data: bytes) -> str:
    """The address in 16 bytes, IPv4-mapped ones as dotted IPv4."""
    if data[:12] == _MAPPED_PREFIX:
        return str(IPv4Address(data[12:]))
    return str(IPv6Address(data))


def _checkLength(data: bytes) -> None:
    if len(data) < 24 or len(data) > MAX_LENGTH or len(data) % 4:
        raise WrongLength(f"{len(data)} bytes")


def _checkOptions(data: bytes) -> None:
    """Options follow the opcode body: code, reserved, length, padded data."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _OPTION_HEADER.size:
            raise MalformedOption("truncated option header")
        _, length = _OPTION_HEADER.unpack_from(data, offset)
        offset += _OPTION_HEADER.size + (length + 3) // 4 * 4
        if offset > len(data):
            raise MalformedOption(f"option of {length} bytes overruns the datagram")


def _result(opcode: int, value: int) -> ResultCode:
    try:
        return ResultCode(value)
    except ValueError:
        raise UnknownResult(opcode, value) from None


def _transport(number: int) -> Transport:
    try:
        return _TRANSPORTS[number]
    except KeyError:
        raise UnknownProtocol(f"protocol {number}") from None


def encodeRequest(request: Request) -> bytes:
    """The datagram for C{request}."""
    if isinstance(request, AnnounceRequest):
        return _REQUEST_HEADER.pack(
            VERSION, Opcode.ANNOUNCE, 0, 0, packAddress(request.clientAddress)
        )
    header = _REQUEST_HEADER.pack(
        VERSION,
        Opcode.MAP,
        0,
        request.lifetime,
        packAddress(request.clientAddress),
    )
    return header + _MAP_BODY.pack(
        request.nonce,
        _PROTOCOLS[request.protocol],
        request.internalPort,
        request.suggestedPort,
        packAddress(request.suggestedAddress),
    )


def decodeRequest(data: bytes) -> Request:
    """Parse a client's datagram (what a gateway sees); for fakes and tests."""
    _checkLength(data)
    version, opcode, _, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    if version != VERSION:
        raise WrongVersion(f"version {version}")
    if opcode & _RESPONSE_BIT:
        raise WrongDirection("a response")
    if opcode == Opcode.ANNOUNCE:
        _checkOptions(data[_REQUEST_HEADER.size :])
        return AnnounceRequest(unpackAddress(client))
    if opcode != Opcode.MAP:
        raise WrongOpcode(f"opcode {opcode}")
    end = _REQUEST_HEADER.size + _MAP_BODY.size
    if len(data) < end:
        raise WrongLength(f"{len(data)} bytes for a MAP request")
    nonce, protocol, internal, suggested, address = _MAP_BODY.unpack_from(
        data, _REQUEST_HEADER.size
    )
    _checkOptions(data[end:])
    return MapRequest(
        nonce,
        _transport(protocol),
        internal,
        suggested,
        unpackAddress(address),
        lifetime,
        unpackAddress(client),
    )


def encodeResponse(response: Response, epoch: int = 0) -> bytes:
    """The datagram a gateway sends for C{response}; for fakes and tests."""
    if isinstance(response, UnsupportedVersion):
        # Laid out as the older version's header: NAT-PMP's is 8 bytes.
        return struct.pack("!BBBBI", response.version, _RESPONSE_BIT, 0, 1, epoch)
    if isinstance(response, AnnounceResponse):
        return _RESPONSE_HEADER.pack(
            VERSION,
            _RESPONSE_BIT | Opcode.ANNOUNCE,
            0,
            response.result,
            response.lifetime,
            response.epoch,
        )
    header = _RESPONSE_HEADER.pack(
        VERSION,
        _RESPONSE_BIT | Opcode.MAP,
        0,
        response.result,
        response.lifetime,
        response.epoch,
    )
    return header + _MAP_BODY.pack(
        response.nonce,
        _PROTOCOLS[response.protocol],
        response.internalPort,
        response.externalPort,
        packAddress(response.externalAddress),
    )


def decodeResponse(data: bytes) -> Response:
    """
    Parse a gateway's datagram, validated as §8.3 says.  Raises a
    L{ParseError} subclass for anything else, and nothing else.
    """
    if len(data) < 4:
        raise WrongLength(f"{len(data)} bytes")
    if data[0] != VERSION:
        if data[3] == ResultCode.UNSUPP_VERSION:
            return UnsupportedVersion(data[0])
        raise WrongVersion(f"version {data[0]}")
    _checkLength(data)
    _, opcode, _, rawResult, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if not opcode & _RESPONSE_BIT:
        raise WrongDirection("a request")
    opcode &= ~_RESPONSE_BIT
    if opcode not in (Opcode.ANNOUNCE, Opcode.MAP):
        raise WrongOpcode(f"opcode {opcode}")
    result = _result(opcode, rawResult)
    if opcode == Opcode.ANNOUNCE:
        _checkOptions(data[_RESPONSE_HEADER.size :])
        return AnnounceResponse(result, lifetime, epoch)
    end = _RESPONSE_HEADER.size + _MAP_BODY.size
    if len(data) < end:
        raise WrongLength(f"{len(data)} bytes for a MAP response")
    nonce, protocol, internal, external, address = _MAP_BODY.unpack_from(
        data, _RESPONSE_HEADER.size
    )
    _checkOptions(data[end:])
    return MapResponse(
        result,
        lifetime,
        epoch,
        nonce,
        _transport(protocol),
        internal,
        external,
        unpackAddress(address),
    )


def epochInvalid(last: EpochSample, new: EpochSample) -> bool:
    """
    §8.5: the gateway lost its state when its epoch fell by more than 1 s, or
    when its clock and ours disagree by more than 2 s plus 1/16 either way.
    """
    if new.epoch + 1 < last.epoch:
        return True
    client = new.at - last.at
    server = new.epoch - last.epoch
    return client + 2 < server - server / 16 or server + 2 < client - client / 16


def retransmissions(random: Callable[[], float]) -> Iterator[float]:
    """§8.1.1: 3 s, doubling to at most 1024 s, each ±10 %, never ending."""
    wait = RETRY_INITIAL
    while True:
        yield wait * (1 + JITTER * (2 * random() - 1))
        wait = min(2 * wait, RETRY_MAX)


def probeWaits(random: Callable[[], float]) -> list[float]:
    """The first request: sent again after ~3 s, given up at L{PROBE_SECS}."""
    first = next(retransmissions(random))
    return [first, max(PROBE_SECS - first, 0.0)]


def renewalWaits(grantedAt: float, lifetime: float, now: float) -> list[float]:
    """
    §11.2.1: a renewal sent at C{now} is sent again 3/4, 7/8, 15/16… of the
    way through the lifetime, at least 4 s apart, then given up at expiry.
    """
    expiry = grantedAt + lifetime
    sends = [now]
    k = 2
    # 1 - 2**-k reaches 1.0 in floats by k = 54, so the loop ends.
    while sends[-1] + RENEWAL_GAP < expiry and k < 64:
        point = grantedAt + lifetime * (1 - 2.0**-k)
        k += 1
        if point >= sends[-1] + RENEWAL_GAP:
            sends.append(point)
    ends = [*sends[1:], max(expiry, sends[-1])]
    return [end - start for start, end in zip(sends, ends, strict=True)]


def renewalPoint(lifetime: float, random: Callable[[], float]) -> float:
    """§11.2.1: a uniformly random point from 1/2 to 5/8 of the lifetime."""
    return lifetime * (0.5 + 0.125 * random())


class PCPClient(GatewayClient[Request, Response]):
    """
    PCP over a connected UDP socket.  The client address field needs our
    address as the gateway sees it, which the connected socket tells us.
    Responses that answer nothing in flight (ANNOUNCE, unsolicited MAP)
    go to C{onUnsolicited}.
    """

    protocolName = "PCP"

    def __init__(
        self,
        reactor: IReactorTime,
        gateway: str,
        metrics: Metrics,
        onEpoch: Callable[[int], object],
        onUnsolicited: Callable[[Response], object],
    ) -> None:
        super().__init__(reactor, gateway, metrics, onEpoch)
        self._onUnsolicited = onUnsolicited
        self.clientAddress = NO_PREFERENCE

    def startProtocol(self) -> None:
        super().startProtocol()
        assert self.transport is not None
        self.clientAddress = self.transport.getHost().host

    def encode(self, request: Request) -> bytes:
        return encodeRequest(request)

    def decode(self, datagram: bytes) -> Response:
        return decodeResponse(datagram)

    def answers(self, request: Request, response: Response) -> bool:
        if isinstance(response, UnsupportedVersion):
            return True
        if isinstance(request, AnnounceRequest):
            return isinstance(response, AnnounceResponse)
        return (
            isinstance(response, MapResponse)
            and response.nonce == request.nonce
            and response.protocol == request.protocol
            and response.internalPort == request.internalPort
        )

    def epochOf(self, response: Response) -> int | None:
        return None if isinstance(response, UnsupportedVersion) else response.epoch

    def fatal(self, error: udpclient.ParseError, request: Request) -> bool:
        return (
            isinstance(error, UnknownResult)
            and isinstance(request, MapRequest)
            and error.opcode == Opcode.MAP
        )

    def unmatched(self, response: Response, reason: str) -> None:
        if isinstance(response, UnsupportedVersion):
            self.drop(reason)
        else:
            self._onUnsolicited(response)


@frozen
class _Lease:
    grantedAt: float
    lifetime: int
    externalPort: int


@frozen
class _Block:
    until: float
    message: str


_UNAVAILABLE = (
    ResultCode.UNSUPP_VERSION,
    ResultCode.UNSUPP_OPCODE,
    ResultCode.UNSUPP_PROTOCOL,
)


class PCPSession:
    """PCP MAP requests over one socket to the gateway, one nonce per protocol."""

    name = "pcp"

    def __init__(
        self,
        context: SessionContext,
        nonce: Callable[[], bytes] = lambda: os.urandom(12),
    ) -> None:
        self._context = context
        self._newNonce = nonce
        self.client = PCPClient(
            context.reactor,
            context.gateway,
            context.metrics,
            context.onEpoch,
            self._unsolicited,
        )
        self._port: IListeningPort = IReactorUDP(context.reactor).listenUDP(
            0, self.client, context.bindAddress, 8192
        )
        # Keyed by (protocol, internal port): what identifies a mapping.
        self._nonces: dict[tuple[Transport, int], bytes] = {}
        self._leases: dict[tuple[Transport, int], _Lease] = {}
        self._blocked: dict[tuple[Transport, int], _Block] = {}
        self._answered = False

    def _now(self) -> float:
        return self._context.reactor.seconds()

    def _waits(self, key: tuple[Transport, int]) -> Iterator[float] | list[float]:
        if not self._answered:
            return probeWaits(self._context.random)
        held = self._leases.get(key)
        now = self._now()
        if held is not None and now < held.grantedAt + held.lifetime:
            return renewalWaits(held.grantedAt, held.lifetime, now)
        return retransmissions(self._context.random)

    def mapOne(
        self, protocol: Transport, internalPort: int, suggested: int, lifetime: int
    ) -> Deferred[Grant]:
        return Deferred.fromCoroutine(
            self._mapOne(protocol, internalPort, suggested, lifetime)
        )

    async def _mapOne(
        self, protocol: Transport, internalPort: int, suggested: int, lifetime: int
    ) -> Grant:
        key = (protocol, internalPort)
        block = self._blocked.get(key)
        left = 0.0 if block is None else block.until - self._now()
        if block is not None and left > 0:
            raise GatewayRefusal(
                f"{block.message}; not asking again for {left:.0f}s", left
            )
        if key not in self._nonces:
            self._nonces[key] = os.urandom(NONCE_LENGTH)
        nonce = self._nonces[key]
        request = MapRequest(
            nonce,
            protocol,
            internalPort,
            suggested,
            NO_PREFERENCE,
            lifetime,
            self.client.clientAddress,
        )
        response = await self.client.send(request, self._waits(key))
        if isinstance(response, UnsupportedVersion):
            speaks = f"version {response.version}"
            if response.version == 0:
                speaks = "only NAT-PMP"
            raise WrongProtocol(
                f"gateway {self.client.gateway} speaks {speaks}, not PCP"
            )
        assert isinstance(response, MapResponse)
        self._answered = True
        if response.result != ResultCode.SUCCESS:
            raise self._refused(request, response)
        self._leases[key] = _Lease(
            self._now(), response.lifetime, response.externalPort
        )
        return Grant(protocol, internalPort, response.externalPort, response.lifetime)

    def _refused(self, request: MapRequest, response: MapResponse) -> Exception:
        message = (
            f"gateway {self.client.gateway} answered "
            f"{response.result.name} to our {request.protocol} mapping"
        )
        # §8.3: the same request must wait out the lifetime the error carries.
        if response.lifetime:
            self._blocked[(request.protocol, request.internalPort)] = _Block(
                self._now() + response.lifetime, message
            )
        if response.result in _UNAVAILABLE:
            return SourceUnavailable(message)
        return GatewayRefusal(message, response.lifetime)

    def release(self, protocol: Transport, internalPort: int) -> Deferred[None]:
        nonce = self._nonces.get((protocol, internalPort))
        held = self._leases.pop((protocol, internalPort), None)
        if nonce is None:
            return succeed(None)
        request = MapRequest(
            nonce,
            protocol,
            internalPort,
            0 if held is None else held.externalPort,
            NO_PREFERENCE,
            0,
            self.client.clientAddress,
        )
        # One try: stopping must not wait for §8.1.1's retransmissions.
        waits = [next(retransmissions(self._context.random))]
        return self.client.send(request, waits).addCallback(lambda _: None)

    def renewAt(self, lifetime: float) -> float:
        return renewalPoint(lifetime, self._context.random)

    def isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        return epochInvalid(last, new)

    def heard(self, datagram: bytes) -> None:
        try:
            response = decodeResponse(datagram)
        except ParseError as e:
            self.client.drop(e.reason)
            return
        self._unsolicited(response)

    def _unsolicited(self, response: Response) -> None:
        if isinstance(response, AnnounceResponse):
            _log.info(
                "gateway {gateway} announced epoch {epoch} (PCP)",
                gateway=self.client.gateway,
                epoch=response.epoch,
            )
            self._context.onEpoch(response.epoch)
            return
        if isinstance(response, UnsupportedVersion):
            self.client.drop("unexpected")
            return
        key = (response.protocol, response.internalPort)
        if self._nonces.get(key) != response.nonce:
            self.client.drop("mismatch")
            return
        self._context.onEpoch(response.epoch)
        held = self._leases.get(key)
        if (
            response.result == ResultCode.SUCCESS
            and held is not None
            and held.externalPort == response.externalPort
        ):
            return
        _log.warn(
            "gateway {gateway} changed our {protocol} mapping unasked "
            "({result}, port {port}); mapping again",
            gateway=self.client.gateway,
            protocol=response.protocol,
            result=response.result.name,
            port=response.externalPort,
        )
        self._context.onChange()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(closePort(self._port))


PCP = MappingProtocol("pcp", PCPSession)


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
