"""
The NAT-PMP wire format (RFC 6886): messages as records, bytes in and out,
no I/O.  The client that sends them is in L{qbportsync.sources.natpmpclient}.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address

from attrs import frozen

from qbportsync.sources.wire import (
    EpochSample,
    IPProto,
    Result,
    ResultTable,
    WrongLength,
    WrongOpcode,
    WrongVersion,
)

_HEADER = struct.Struct("!BBHI")  # version, opcode, result, SSSoE
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
RESPONSE_BIT = 128


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


RESULTS = ResultTable(
    {
        0: Result.SUCCESS,
        1: Result.UNSUPP_VERSION,
        2: Result.NOT_AUTHORIZED,
        3: Result.NETWORK_FAILURE,
        4: Result.NO_RESOURCES,
        5: Result.UNSUPP_OPCODE,
    }
)
"""RFC 6886 §3.5's result codes."""


def _protocolOpcode(protocol: IPProto) -> Opcode:
    return Opcode.MAP_UDP if protocol == "UDP" else Opcode.MAP_TCP


def _opcodeProtocol(opcode: int) -> IPProto:
    return "UDP" if opcode == Opcode.MAP_UDP else "TCP"


@frozen
class ExternalAddressRequest:
    """Ask the gateway for its external address (§3.2)."""


@frozen
class MapRequest:
    """Create, renew (lifetime > 0) or delete (lifetime 0) a mapping (§3.3)."""

    protocol: IPProto
    internalPort: int
    suggestedPort: int
    lifetime: int


Request = ExternalAddressRequest | MapRequest


@frozen
class ExternalAddressResponse:
    result: Result
    epoch: int
    address: str
    """Meaningless unless result is SUCCESS (§3.2)."""


@frozen
class MapResponse:
    protocol: IPProto
    result: Result
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
    result: Result
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
        return struct.pack("!BBBB", response.version, RESPONSE_BIT, 0, 1)
    if isinstance(response, ErrorResponse):
        return _HEADER.pack(
            0, response.opcode, RESULTS.encode(response.result), response.epoch
        )
    if isinstance(response, ExternalAddressResponse):
        header = _HEADER.pack(
            0,
            RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS,
            RESULTS.encode(response.result),
            response.epoch,
        )
        return header + IPv4Address(response.address).packed
    return _MAP_RESPONSE.pack(
        0,
        RESPONSE_BIT | _protocolOpcode(response.protocol),
        RESULTS.encode(response.result),
        response.epoch,
        response.internalPort,
        response.externalPort,
        response.lifetime,
    )


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
    if opcode == 0 and rawResult == RESULTS.encode(Result.UNSUPP_VERSION):
        # RFC 6886 §3.5 lays out this one error with opcode 0.
        if len(data) != _HEADER.size:
            raise WrongLength(f"{len(data)} bytes for an error")
        return ErrorResponse(0, Result.UNSUPP_VERSION, epoch)
    if opcode & RESPONSE_BIT == 0 or opcode & ~RESPONSE_BIT > Opcode.MAP_TCP:
        raise WrongOpcode(f"opcode {opcode}")
    result = RESULTS.decode(opcode, rawResult)
    if len(data) == _HEADER.size and result != Result.SUCCESS:
        return ErrorResponse(opcode, result, epoch)
    if opcode == RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS:
        if len(data) != 12:
            raise WrongLength(f"{len(data)} bytes for an address response")
        return ExternalAddressResponse(result, epoch, str(IPv4Address(data[8:12])))
    if len(data) != _MAP_RESPONSE.size:
        raise WrongLength(f"{len(data)} bytes for a map response")
    _, _, _, _, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    return MapResponse(
        _opcodeProtocol(opcode & ~RESPONSE_BIT),
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


def requestOpcode(request: Request) -> int:
    """The opcode C{request} goes out with; a response carries it plus 128."""
    if isinstance(request, ExternalAddressRequest):
        return Opcode.EXTERNAL_ADDRESS
    return _protocolOpcode(request.protocol)
