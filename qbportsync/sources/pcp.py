"""
The PCP wire format (RFC 6887) for the MAP and ANNOUNCE opcodes: messages as
records, bytes in and out, no I/O.  The client that sends them, and its
timing rules, are in L{qbportsync.sources.pcpclient}.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

from attrs import frozen

from qbportsync.sources.wire import (
    EpochSample,
    IPProto,
    ParseError,
    Result,
    ResultTable,
    WrongLength,
    WrongOpcode,
    WrongVersion,
)

VERSION = 2
MAX_LENGTH = 1100
NONCE_LENGTH = 12
NO_PREFERENCE = "0.0.0.0"  # noqa: S104 (an address in a message, not a bind)
"""Suggested external address meaning "any IPv4 address" (§11.1)."""

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12x")
_MAP_BODY = struct.Struct("!12sB3xHH16s")
_OPTION_HEADER = struct.Struct("!BxH")
RESPONSE_BIT = 0x80
_PROTOCOLS: dict[IPProto, int] = {"TCP": 6, "UDP": 17}
_TRANSPORTS: dict[int, IPProto] = {6: "TCP", 17: "UDP"}
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1


RESULTS = ResultTable(
    {
        0: Result.SUCCESS,
        1: Result.UNSUPP_VERSION,
        2: Result.NOT_AUTHORIZED,
        3: Result.MALFORMED_REQUEST,
        4: Result.UNSUPP_OPCODE,
        5: Result.UNSUPP_OPTION,
        6: Result.MALFORMED_OPTION,
        7: Result.NETWORK_FAILURE,
        8: Result.NO_RESOURCES,
        9: Result.UNSUPP_PROTOCOL,
        10: Result.USER_EX_QUOTA,
        11: Result.CANNOT_PROVIDE_EXTERNAL,
        12: Result.ADDRESS_MISMATCH,
        13: Result.EXCESSIVE_REMOTE_PEERS,
    }
)
"""RFC 6887 §7.4's result codes."""


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
    protocol: IPProto
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
    result: Result
    lifetime: int
    """The mapping's lifetime; for an error, how long not to ask again."""
    epoch: int
    nonce: bytes
    protocol: IPProto
    internalPort: int
    externalPort: int
    externalAddress: str


@frozen
class AnnounceResponse:
    result: Result
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


def _transport(number: int) -> IPProto:
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
    if opcode & RESPONSE_BIT:
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
        return struct.pack("!BBBBI", response.version, RESPONSE_BIT, 0, 1, epoch)
    if isinstance(response, AnnounceResponse):
        return _RESPONSE_HEADER.pack(
            VERSION,
            RESPONSE_BIT | Opcode.ANNOUNCE,
            0,
            RESULTS.encode(response.result),
            response.lifetime,
            response.epoch,
        )
    header = _RESPONSE_HEADER.pack(
        VERSION,
        RESPONSE_BIT | Opcode.MAP,
        0,
        RESULTS.encode(response.result),
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
        if data[3] == RESULTS.encode(Result.UNSUPP_VERSION):
            return UnsupportedVersion(data[0])
        raise WrongVersion(f"version {data[0]}")
    _checkLength(data)
    _, opcode, _, rawResult, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if not opcode & RESPONSE_BIT:
        raise WrongDirection("a request")
    opcode &= ~RESPONSE_BIT
    if opcode not in (Opcode.ANNOUNCE, Opcode.MAP):
        raise WrongOpcode(f"opcode {opcode}")
    result = RESULTS.decode(opcode, rawResult)
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
