"""
NAT-PMP (RFC 6886): a pure wire codec, a thin UDP client, and the port source.

Data flows codec → L{NATPMPClient} (one request in flight, retransmissions)
→ L{NATPMPSession} (requests for one socket) → L{NATPMPSource}, the shared
L{GatewaySource} speaking NAT-PMP alone.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from enum import IntEnum
from ipaddress import IPv4Address

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.logger import Logger

from qbportsync.config import Config
from qbportsync.interfaces import SourceError, SourceUnavailable
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
from qbportsync.sources.udpclient import (
    GatewayClient,
    UnknownResult,
    WrongLength,
    WrongOpcode,
    WrongProtocol,
    WrongVersion,
    closePort,
)

_log = Logger()

TRIES = 9
RETRY_INITIAL = 0.25
"""Seconds before the first retransmission; doubles each time (§3.1)."""
RELEASE_TRIES = 3
"""Deleting on exit must not hold up a stop for two minutes."""

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


class NATPMPClient(GatewayClient[Request, Response]):
    """
    Talks to one gateway over a connected UDP socket: one request in flight,
    retransmitted after 250 ms, 500 ms, 1 s… (§3.1), others queued.
    """

    protocolName = "NAT-PMP"

    def request(self, request: Request, tries: int = TRIES) -> Deferred[Response]:
        """
        Send C{request}; fires with the gateway's answer whatever its result
        code, or fails with L{GatewayTimeout}, L{GatewayRefused} or
        L{SourceError}.
        """
        return self.send(request, [RETRY_INITIAL * 2**n for n in range(tries)])

    def encode(self, request: Request) -> bytes:
        return encodeRequest(request)

    def decode(self, datagram: bytes) -> Response:
        return decodeResponse(datagram)

    def answers(self, request: Request, response: Response) -> bool:
        return _answers(request, response)

    def epochOf(self, response: Response) -> int | None:
        return None if isinstance(response, UnsupportedVersion) else response.epoch

    def fatal(self, error: udpclient.ParseError, request: Request) -> bool:
        # RFC 6886 §3.5: an undefined result code is fatal for its request.
        return isinstance(
            error, UnknownResult
        ) and error.opcode == _RESPONSE_BIT | _requestOpcode(request)


def _grantOrRaise(gateway: str, response: Response) -> MapResponse:
    """A successful map response, or the exception its result code means."""
    if isinstance(response, UnsupportedVersion):
        raise WrongProtocol(
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


class NATPMPSession:
    """NAT-PMP requests over one socket to the gateway."""

    name = "natpmp"

    def __init__(self, context: SessionContext) -> None:
        self.client = NATPMPClient(
            context.reactor, context.gateway, context.metrics, context.onEpoch
        )
        self._port: IListeningPort = IReactorUDP(context.reactor).listenUDP(
            0, self.client, context.bindAddress, 8192
        )

    def mapOne(
        self, protocol: Transport, internalPort: int, suggested: int, lifetime: int
    ) -> Deferred[Grant]:
        return Deferred.fromCoroutine(
            self._mapOne(MapRequest(protocol, internalPort, suggested, lifetime))
        )

    async def _mapOne(self, request: MapRequest) -> Grant:
        response = _grantOrRaise(
            self.client.gateway, await self.client.request(request)
        )
        return Grant(
            response.protocol,
            response.internalPort,
            response.externalPort,
            response.lifetime,
        )

    def release(self, protocol: Transport, internalPort: int) -> Deferred[None]:
        # Internal port 0 here would delete every mapping we have (§3.4).
        request = MapRequest(protocol, internalPort, 0, 0)
        return self.client.request(request, tries=RELEASE_TRIES).addCallback(
            lambda _: None
        )

    def renewAt(self, lifetime: float) -> float:
        return lifetime / 2

    def isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        return epochReset(last, new)

    def heard(self, datagram: bytes) -> None:
        """NAT-PMP has nothing but announcements on that port."""

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(closePort(self._port))


NATPMP = MappingProtocol("natpmp", NATPMPSession)


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
