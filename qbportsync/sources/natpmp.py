"""
NAT-PMP (RFC 6886): a pure wire codec, a thin UDP client, and the port source.

Data flows codec → L{NATPMPClient} (one request in flight, retransmissions)
→ L{NATPMPSource} (gateway, internal port, lease keeping, announcements).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address
from typing import Literal

from attrs import frozen
from twisted.logger import Logger

Transport = Literal["TCP", "UDP"]

_log = Logger()

SERVER_PORT = 5351
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
