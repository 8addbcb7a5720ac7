"""
Asking a PCP gateway (RFC 6887): the retransmission and renewal schedules of
§8.1.1 and §11.2.1, L{PCPClient} which sends the codec's messages on them,
and L{PCPMapper} which keeps one nonce per mapping and turns MAP answers
into L{Grant}s for the gateway source.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Hashable, Iterable, Iterator

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP
from twisted.logger import Logger

from qbportsync.metrics import Metrics
from qbportsync.sources.lease import Grant
from qbportsync.sources.mapper import MapperContext, MappingMethod
from qbportsync.sources.pcp import (
    NO_PREFERENCE,
    NONCE_LENGTH,
    AnnounceRequest,
    AnnounceResponse,
    MapRequest,
    MapResponse,
    Opcode,
    Request,
    Response,
    UnsupportedVersion,
    decodeResponse,
    encodeRequest,
    epochInvalid,
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

_log = Logger()

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
OUTAGE_TRIES = 4
"""
Sends of a new mapping's request (3, 6, 8, 8 s apart) before it fails, so
that the source can look at the route again: ~25 s.
"""
ERROR_LIFETIME_MAX = 1800.0
"""Seconds; the longest an error's lifetime may keep us from asking again."""


def retransmissions(
    random: Callable[[], float], cap: float = RETRY_MAX
) -> Iterator[float]:
    """§8.1.1: 3 s, doubling to at most C{cap} (MRT 1024 s), each ±10 %, endless."""
    wait = RETRY_INITIAL
    while True:
        yield wait * (1 + JITTER * (2 * random() - 1))
        wait = min(2 * wait, cap)


def outageWaits(random: Callable[[], float]) -> list[float]:
    """
    A new mapping's request: §8.1.1's schedule with the waits kept under
    L{RETRANSMIT_CAP}, given up after L{OUTAGE_TRIES} sends.
    """
    return list(itertools.islice(retransmissions(random, RETRANSMIT_CAP), OUTAGE_TRIES))


def probeWaits(random: Callable[[], float]) -> list[float]:
    """The first request: sent again after ~3 s, given up at L{PROBE_SECS}."""
    first = next(retransmissions(random))
    return [first, max(PROBE_SECS - first, 0.0)]


def probeAgainWaits(random: Callable[[], float]) -> list[float]:
    """While the gateway is away: one send every ~8 s (±10 %), ~32 s in all."""
    return [RETRANSMIT_CAP * (1 + JITTER * (2 * random() - 1))] * OUTAGE_TRIES


def renewalWaits(
    grantedAt: float, lifetime: float, now: float, cap: float = float("inf")
) -> list[float]:
    """
    §11.2.1: a renewal sent at C{now} is sent again 3/4, 7/8, 15/16… of the
    way through the lifetime, at least 4 s apart, then given up at expiry.
    Waits longer than C{cap} are split evenly, so a gateway back from an
    outage hears from us within C{cap}.
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
    return list(
        _split((end - start for start, end in zip(sends, ends, strict=True)), cap)
    )


def _split(waits: Iterable[float], cap: float) -> Iterator[float]:
    for wait in waits:
        parts = max(1, -int(-wait // cap)) if wait > cap else 1
        yield from [wait / parts] * parts


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

    def keyOf(self, request: Request) -> Hashable:
        # A mapping is named by its protocol and internal port (§11.1).
        if isinstance(request, AnnounceRequest):
            return "announce"
        return (request.protocol, request.internalPort)

    def fatal(self, error: ParseError, request: Request) -> bool:
        return (
            isinstance(error, UnknownResult)
            and isinstance(request, MapRequest)
            and error.opcode == Opcode.MAP
        )

    def invalid(self, request: Request, response: Response) -> str | None:
        # Port 0 or lifetime 0 granted to a mapping we asked to keep.
        if (
            isinstance(request, MapRequest)
            and request.lifetime > 0
            and isinstance(response, MapResponse)
            and response.result == Result.SUCCESS
            and (response.externalPort == 0 or response.lifetime == 0)
        ):
            return "zero"
        return None

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
    result: Result


class PCPMapper:
    """PCP MAP requests over one socket to the gateway, one nonce per protocol."""

    name = "pcp"

    def __init__(
        self,
        context: MapperContext,
        nonce: Callable[[], bytes] = lambda: os.urandom(NONCE_LENGTH),
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
        self._nonces = context.nonces
        self._port: IListeningPort = IReactorUDP(context.reactor).listenUDP(
            0, self.client, context.bindAddress, 8192
        )
        # Keyed by (protocol, internal port): what identifies a mapping.
        self._leases: dict[tuple[IPProto, int], _Lease] = {}
        self._blocked: dict[tuple[IPProto, int], _Block] = {}
        self._answered = False

    def _now(self) -> float:
        return self._context.reactor.seconds()

    def _waits(self, key: tuple[IPProto, int]) -> Iterator[float] | list[float]:
        if not self._answered:
            return probeWaits(self._context.random)
        held = self._leases.get(key)
        now = self._now()
        if held is not None and now < held.grantedAt + held.lifetime:
            return renewalWaits(held.grantedAt, held.lifetime, now, RETRANSMIT_CAP)
        return outageWaits(self._context.random)

    def _nonceKey(
        self, protocol: IPProto, internalPort: int
    ) -> tuple[str, IPProto, int]:
        return (self.client.clientAddress, protocol, internalPort)

    def mapOne(
        self,
        protocol: IPProto,
        internalPort: int,
        suggested: int,
        lifetime: int,
        *,
        probing: bool = False,
    ) -> Deferred[Grant]:
        return Deferred.fromCoroutine(
            self._mapOne(protocol, internalPort, suggested, lifetime, probing)
        )

    async def _mapOne(
        self,
        protocol: IPProto,
        internalPort: int,
        suggested: int,
        lifetime: int,
        probing: bool,
    ) -> Grant:
        key = (protocol, internalPort)
        block = self._blocked.get(key)
        left = 0.0 if block is None else block.until - self._now()
        if block is not None and left > 0:
            raise GatewayRefusal(block.message, block.result, left)
        nonceKey = self._nonceKey(protocol, internalPort)
        if nonceKey not in self._nonces:
            self._nonces[nonceKey] = self._newNonce()
        nonce = self._nonces[nonceKey]
        request = MapRequest(
            nonce,
            protocol,
            internalPort,
            suggested,
            NO_PREFERENCE,
            lifetime,
            self.client.clientAddress,
        )
        waits = probeAgainWaits(self._context.random) if probing else self._waits(key)
        response = await self.client.send(request, waits)
        if isinstance(response, UnsupportedVersion):
            speaks = f"version {response.version}"
            if response.version == 0:
                speaks = "only NAT-PMP"
            raise WrongProtocol(
                f"gateway {self.client.gateway} speaks {speaks}, not PCP"
            )
        assert isinstance(response, MapResponse)
        self._answered = True
        if response.result != Result.SUCCESS:
            raise self._refused(request, response)
        # A lease longer than asked is not believed (issue 11): renewals
        # follow the shorter of the two.
        self._leases[key] = _Lease(
            self._now(), min(lifetime, response.lifetime), response.externalPort
        )
        return Grant(protocol, internalPort, response.externalPort, response.lifetime)

    def _refused(self, request: MapRequest, response: MapResponse) -> Exception:
        message = (
            f"gateway {self.client.gateway} answered PCP with "
            f"{response.result.value} to our {request.protocol} mapping"
        )
        # §8.3: the same request must wait out the lifetime the error carries
        # (bounded: a forged error must not silence us for days).
        wait = min(response.lifetime, ERROR_LIFETIME_MAX)
        if wait:
            self._blocked[(request.protocol, request.internalPort)] = _Block(
                self._now() + wait, message, response.result
            )
        if response.result.unsupported:
            return GatewayUnsupported(message)
        return GatewayRefusal(message, response.result, wait)

    def release(self, protocol: IPProto, internalPort: int) -> Deferred[None]:
        nonce = self._nonces.get(self._nonceKey(protocol, internalPort))
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
            _log.debug(
                "gateway {gateway} announced epoch {epoch} (PCP)",
                gateway=self.client.gateway,
                epoch=response.epoch,
            )
            self._context.onAnnounce(response.epoch)
            return
        if isinstance(response, UnsupportedVersion):
            self.client.drop("unexpected")
            return
        key = (response.protocol, response.internalPort)
        if self._nonces.get(self._nonceKey(*key)) != response.nonce:
            self.client.drop("mismatch")
            return
        held = self._leases.get(key)
        if held is None:
            # A late answer to a request we gave up: no mapping to change.
            self.client.drop("unexpected")
            return
        self._context.onEpoch(response.epoch)
        if (
            response.result == Result.SUCCESS
            and response.lifetime > 0
            and held.externalPort == response.externalPort
        ):
            return
        _log.debug(
            "gateway {gateway} changed our {protocol} mapping unasked "
            "({result}, port {port})",
            gateway=self.client.gateway,
            protocol=response.protocol,
            result=response.result.name,
            port=response.externalPort,
        )
        self._context.onChange()

    @property
    def alive(self) -> bool:
        return not self.client.closed

    def close(self) -> Deferred[None]:
        self.client.abandon()
        return Deferred.fromCoroutine(closePort(self._port))


PCP = MappingMethod("pcp", PCPMapper)
