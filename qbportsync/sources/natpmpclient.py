"""
Asking a NAT-PMP gateway (RFC 6886): L{NATPMPClient} sends the codec's
messages and retransmits them on §3.1's schedule; L{NATPMPMapper} turns
map requests and their answers into L{Grant}s for the gateway source.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorUDP

from qbportsync.sources.lease import Grant
from qbportsync.sources.mapper import MapperContext, MappingMethod
from qbportsync.sources.natpmp import (
    RESPONSE_BIT,
    ErrorResponse,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    Request,
    Response,
    UnsupportedVersion,
    decodeResponse,
    encodeRequest,
    epochReset,
    requestOpcode,
)
from qbportsync.sources.udpclient import (
    RETRANSMIT_CAP,
    GatewayClient,
    GatewayRefusal,
    GatewayUnsupported,
    WrongProtocol,
    closePort,
)
from qbportsync.sources.wire import (
    EpochSample,
    IPProto,
    ParseError,
    Result,
    UnknownResult,
)

TRIES = 9
RETRY_INITIAL = 0.25
"""Seconds before the first retransmission; doubles each time (§3.1)."""
RETRY_WAITS = [min(RETRY_INITIAL * 2**n, RETRANSMIT_CAP) for n in range(TRIES)]
"""
§3.1's nine sends, 250 ms apart and doubling, but never more than
L{RETRANSMIT_CAP} apart: 39.75 s in all rather than 127.75 s.
"""
PROBE_WAITS = [RETRANSMIT_CAP] * 5
"""While the gateway is away: one send every 8 s, given up after 40 s."""
RELEASE_TRIES = 3
"""Deleting on exit must not hold up a stop for two minutes."""


def _answers(request: Request, response: Response) -> bool:
    if isinstance(response, UnsupportedVersion):
        return True
    if isinstance(response, ErrorResponse):
        return response.opcode in (0, RESPONSE_BIT | requestOpcode(request))
    if isinstance(request, ExternalAddressRequest):
        return isinstance(response, ExternalAddressResponse)
    return (
        isinstance(response, MapResponse)
        and response.protocol == request.protocol
        and response.internalPort == request.internalPort
    )


class NATPMPClient(GatewayClient[Request, Response]):
    """
    NAT-PMP over a connected UDP socket: each request retransmitted after
    250 ms, 500 ms, 1 s… (§3.1), requests for different mappings side by side.
    """

    protocolName = "NAT-PMP"

    def request(self, request: Request, tries: int = TRIES) -> Deferred[Response]:
        """
        Send C{request}; fires with the gateway's answer whatever its result
        code, or fails with L{GatewayTimeout}, L{GatewayRefused} or
        L{SourceError}.
        """
        return self.send(request, RETRY_WAITS[:tries])

    def keyOf(self, request: Request) -> Hashable:
        # A mapping is named by its protocol and internal port (§3.3).
        if isinstance(request, ExternalAddressRequest):
            return "address"
        return (request.protocol, request.internalPort)

    def encode(self, request: Request) -> bytes:
        return encodeRequest(request)

    def decode(self, datagram: bytes) -> Response:
        return decodeResponse(datagram)

    def answers(self, request: Request, response: Response) -> bool:
        return _answers(request, response)

    def epochOf(self, response: Response) -> int | None:
        return None if isinstance(response, UnsupportedVersion) else response.epoch

    def fatal(self, error: ParseError, request: Request) -> bool:
        # RFC 6886 §3.5: an undefined result code is fatal for its request.
        return isinstance(
            error, UnknownResult
        ) and error.opcode == RESPONSE_BIT | requestOpcode(request)

    def invalid(self, request: Request, response: Response) -> str | None:
        # Port 0 or lifetime 0 granted to a mapping we asked to keep: a
        # gateway bug or a forgery, never something to pass on.
        if (
            isinstance(request, MapRequest)
            and request.lifetime > 0
            and isinstance(response, MapResponse)
            and response.result == Result.SUCCESS
            and (response.externalPort == 0 or response.lifetime == 0)
        ):
            return "zero"
        return None


def _grantOrRaise(gateway: str, response: Response) -> MapResponse:
    """A successful map response, or the exception its result code means."""
    if isinstance(response, UnsupportedVersion):
        raise WrongProtocol(
            f"gateway {gateway} speaks version {response.version}, not NAT-PMP"
        )
    if isinstance(response, MapResponse) and response.result == Result.SUCCESS:
        return response
    message = f"gateway {gateway} answered NAT-PMP with {response.result.value}"
    if response.result.unsupported:
        raise GatewayUnsupported(message)
    raise GatewayRefusal(message, response.result)


class NATPMPMapper:
    """NAT-PMP map requests over one socket to the gateway."""

    name = "natpmp"

    def __init__(self, context: MapperContext) -> None:
        self.client = NATPMPClient(
            context.reactor, context.gateway, context.metrics, context.onEpoch
        )
        self._port: IListeningPort = IReactorUDP(context.reactor).listenUDP(
            0, self.client, context.bindAddress, 8192
        )

    def mapOne(
        self,
        protocol: IPProto,
        internalPort: int,
        suggested: int,
        lifetime: int,
        *,
        probing: bool = False,
    ) -> Deferred[Grant]:
        request = MapRequest(protocol, internalPort, suggested, lifetime)
        waits = PROBE_WAITS if probing else RETRY_WAITS
        return Deferred.fromCoroutine(self._mapOne(request, waits))

    async def _mapOne(self, request: MapRequest, waits: list[float]) -> Grant:
        response = _grantOrRaise(
            self.client.gateway, await self.client.send(request, waits)
        )
        return Grant(
            response.protocol,
            response.internalPort,
            response.externalPort,
            response.lifetime,
        )

    def release(self, protocol: IPProto, internalPort: int) -> Deferred[None]:
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

    @property
    def alive(self) -> bool:
        return not self.client.closed

    def close(self) -> Deferred[None]:
        self.client.abandon()
        return Deferred.fromCoroutine(closePort(self._port))


NATPMP = MappingMethod("natpmp", NATPMPMapper)
