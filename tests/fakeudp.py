"""
A reactor for UDP unit tests: a L{Clock} that also binds (fake) UDP and
multicast ports, in the manner of twisted.names' own test reactor; and the
gateway's end of it, either scripted by the test (L{ScriptedGateway}) or
answering by itself as miniupnpd or ProtonVPN would (L{EmulatedGateway}).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, Literal, TypeVar

from attrs import define
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IMulticastTransport,
    IReactorMulticast,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import AbstractDatagramProtocol, DatagramProtocol
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyClass

from qbportsync.config import Config
from qbportsync.metrics import Metrics
from qbportsync.sources import natpmp, pcp
from qbportsync.sources.gateway import GatewayPath
from qbportsync.sources.wire import IPProto, ParseError, Result

GATEWAY = "198.51.100.1"
SERVER = (GATEWAY, 5351)

RequestT = TypeVar("RequestT")


@implementer(IUDPTransport, IMulticastTransport, IListeningPort)
class FakeUDPTransport:
    """Records what a protocol sends; tests feed replies to the protocol."""

    def __init__(
        self,
        interface: str,
        port: int,
        protocol: AbstractDatagramProtocol,
        reactor: MemoryUDPReactor | None = None,
    ) -> None:
        self.interface = interface
        self.port = port
        self.protocol = protocol
        self.reactor = reactor
        self.written: list[tuple[bytes, tuple[str, int] | None]] = []
        self.sent: list[bytes] = []
        """Every datagram written, never cleared."""
        self.connectedTo: tuple[str, int] | None = None
        self.groups: list[tuple[str, str]] = []
        self.listening = True
        self.broadcast = False
        self.loopback = True
        self.ttl = 1
        self.outgoing: str | int = ""

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        if not self.listening:
            raise AssertionError("write on a closed port")
        if (self.connectedTo is None) == (addr is None):
            raise AssertionError("connected sockets take no address, others need one")
        self.written.append((packet, addr))
        self.sent.append(packet)
        peer = addr or self.connectedTo
        if self.reactor is not None and peer in self.reactor.peers:
            self.reactor.peers[peer](self, packet)

    def connect(self, host: str, port: int) -> None:
        self.connectedTo = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self) -> Deferred[None]:
        if self.listening:
            self.listening = False
            self.protocol.doStop()
        return succeed(None)

    def closedByReactor(self) -> None:
        """
        What the epoll reactor does on ICMP port unreachable for a connected
        UDP port: close it, and stop its protocol (FACTS.md, Twisted).
        """
        self.stopListening()

    def deliver(self, data: bytes, sender: tuple[str, int]) -> None:
        """A datagram arrives, if the port is still open."""
        if self.listening:
            self.protocol.datagramReceived(data, sender)

    def startListening(self) -> None:
        self.listening = True

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast

    def getOutgoingInterface(self) -> str | int:
        return self.outgoing

    def setOutgoingInterface(self, addr: str | int) -> Deferred[int]:
        self.outgoing = addr
        return succeed(1)

    def getLoopbackMode(self) -> bool:
        return self.loopback

    def setLoopbackMode(self, mode: bool) -> None:
        self.loopback = mode

    def getTTL(self) -> int:
        return self.ttl

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def joinGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        self.groups.append((addr, interface))
        return succeed(None)

    def leaveGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        self.groups.remove((addr, interface))
        return succeed(None)


@implementer(IReactorUDP, IReactorMulticast)
class MemoryUDPReactor(Clock):
    """Time from L{Clock}; UDP ports are L{FakeUDPTransport}s in C{udpPorts}."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[FakeUDPTransport] = []
        self._nextPort = 40000
        self.peers: dict[
            tuple[str, int], Callable[[FakeUDPTransport, bytes], object]
        ] = {}
        """Who answers datagrams sent to an address, such as an L{EmulatedGateway}."""
        self.missing: set[str] = set()
        """Local addresses that cannot be bound (the interface went away)."""

    def listenUDP(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeUDPTransport:
        if interface in self.missing:
            raise CannotListenError(interface, port, OSError(99, "not available"))
        return self._listen(port, protocol, interface)

    def listenMulticast(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeUDPTransport:
        return self._listen(port, protocol, interface)

    def _listen(
        self, port: int, protocol: DatagramProtocol, interface: str
    ) -> FakeUDPTransport:
        if port == 0:
            port = self._nextPort
            self._nextPort += 1
        transport = FakeUDPTransport(interface, port, protocol, self)
        self.udpPorts.append(transport)
        protocol.makeConnection(transport)
        return transport

    def open(self) -> list[FakeUDPTransport]:
        """The ports still listening."""
        return [p for p in self.udpPorts if p.listening]


class ScriptedGateway(Generic[RequestT]):
    """
    The gateway at L{SERVER}, played by the test: it reads what the source
    sent on its connected socket and answers with datagrams of its choice.
    A protocol's subclass names its request decoder and the request type.
    """

    kind: type[RequestT]
    """The requests the source is expected to send."""

    def __init__(self, reactor: MemoryUDPReactor) -> None:
        self.reactor = reactor
        self.epoch = 1000
        self.started = 0.0
        self._synced: FakeUDPTransport | None = None
        self._cursor = 0
        self._open: dict[Hashable, RequestT] = {}

    def decode(self, data: bytes) -> object:
        """The protocol's request decoder."""
        raise NotImplementedError

    def keyOf(self, request: RequestT) -> Hashable:
        """What names the mapping a request is about."""
        raise NotImplementedError

    def oldest(self) -> RequestT:
        """
        The oldest request on the current socket not yet taken: requests
        sent side by side are answered in the order they were first sent.
        """
        socket = self.socket
        if socket is not self._synced:
            self._synced, self._cursor = socket, 0
            self._open.clear()
        for data in socket.sent[self._cursor :]:
            try:
                request = self.decode(data)
            except ParseError:
                continue
            if isinstance(request, self.kind):
                self._open[self.keyOf(request)] = request
        self._cursor = len(socket.sent)
        return self._open.pop(next(iter(self._open)))

    def now(self) -> int:
        """The gateway's epoch time now."""
        return self.epoch + int(self.reactor.seconds() - self.started)

    @property
    def socket(self) -> FakeUDPTransport:
        return next(p for p in self.reactor.open() if p.connectedTo == SERVER)

    def requests(self) -> list[RequestT]:
        """Every request sent on the current socket since the last call."""
        out = [self._request(data) for data, _ in self.socket.written]
        self.socket.written.clear()
        return out

    def last(self) -> RequestT:
        """The newest request sent on the current socket."""
        return self._request(self.lastSent())

    def lastSent(self) -> bytes:
        """The newest datagram sent on the current socket, undecoded."""
        data: bytes = self.socket.written[-1][0]
        return data

    def send(self, data: bytes) -> None:
        """A datagram from the gateway to the source."""
        self.socket.protocol.datagramReceived(data, SERVER)

    def _request(self, data: bytes) -> RequestT:
        request = self.decode(data)
        assert isinstance(request, self.kind), request
        return request


def dropped(metrics: Metrics, reason: str) -> float:
    """How many datagrams were dropped for C{reason}."""
    value = metrics.registry.get_sample_value(
        "qb_port_sync_datagrams_dropped_total", {"reason": reason}
    )
    return value or 0.0


@define
class Mapping:
    """One mapping an L{EmulatedGateway} holds."""

    client: str
    internal: int
    expires: float
    nonce: bytes = b""


Style = Literal["miniupnpd", "proton"]


class EmulatedGateway:
    """
    A NAT-PMP and PCP gateway at L{SERVER} that answers by itself, after a
    round trip of L{RTT} seconds.  As miniupnpd: external X forwards to the
    internal port asked, X is the port suggested when free and allowed, else
    the first free allowed one.  As ProtonVPN: each client gets one port X,
    forwarded to internal X whatever was asked, for 60 s.  It can go silent
    (C{up = False}), refuse (ICMP, C{refusing = True}) and reboot.
    """

    RTT = 0.001

    def __init__(
        self,
        reactor: MemoryUDPReactor,
        style: Style = "miniupnpd",
        allowed: tuple[int, int] = (1024, 65535),
        address: str = GATEWAY,
    ) -> None:
        self.reactor = reactor
        self.style = style
        self.allowed = allowed
        self.address = address
        self.up = True
        self.refusing = False
        self.refusal: Result | None = None
        """Answer every map request with this error."""
        self.speaksPCP = True
        self.bootedAt = reactor.seconds() - 1000
        self.mappings: dict[tuple[IPProto, int], Mapping] = {}
        self.protonPorts: dict[str, int] = {}
        self.heard: list[tuple[float, str, bytes]] = []
        """(time, client address, datagram) of every request that arrived."""
        reactor.peers[(address, 5351)] = self.receive

    def epoch(self) -> int:
        return int(self.reactor.seconds() - self.bootedAt)

    def reboot(self) -> None:
        """Forget every mapping; the epoch starts again at 0."""
        self.mappings.clear()
        self.protonPorts.clear()
        self.bootedAt = self.reactor.seconds()

    def forwards(self, protocol: IPProto, external: int) -> int | None:
        """The internal port that traffic to C{external} reaches, if any."""
        held = self.mappings.get((protocol, external))
        if held is None or held.expires <= self.reactor.seconds():
            return None
        return external if self.style == "proton" else held.internal

    def reachable(
        self, port: int, protocols: tuple[IPProto, ...] = ("TCP", "UDP")
    ) -> bool:
        """A peer connecting to C{port} lands on C{port} behind the gateway."""
        return all(self.forwards(p, port) == port for p in protocols)

    def receive(self, transport: FakeUDPTransport, data: bytes) -> None:
        client = transport.getHost().host
        self.heard.append((self.reactor.seconds(), client, data))
        if not self.up:
            return
        if self.refusing:
            self.reactor.callLater(self.RTT, transport.closedByReactor)
            return
        reply = self._answer(client, data)
        if reply is not None:
            self.reactor.callLater(
                self.RTT, transport.deliver, reply, (self.address, 5351)
            )

    def _answer(self, client: str, data: bytes) -> bytes | None:
        if data[:1] == b"\x02":
            if not self.speaksPCP:
                return pcp.encodeResponse(pcp.UnsupportedVersion(0), self.epoch())
            return self._pcp(client, data)
        try:
            request = natpmp.decodeRequest(data)
        except ParseError:
            return None
        if isinstance(request, natpmp.ExternalAddressRequest):
            return natpmp.encodeResponse(
                natpmp.ExternalAddressResponse(
                    Result.SUCCESS, self.epoch(), "203.0.113.5"
                )
            )
        result, external, lifetime = self._map(
            client,
            request.protocol,
            request.internalPort,
            request.suggestedPort,
            request.lifetime,
            b"",
        )
        return natpmp.encodeResponse(
            natpmp.MapResponse(
                request.protocol,
                result,
                self.epoch(),
                request.internalPort,
                external,
                lifetime,
            )
        )

    def _pcp(self, client: str, data: bytes) -> bytes | None:
        try:
            request = pcp.decodeRequest(data)
        except ParseError:
            return None
        if isinstance(request, pcp.AnnounceRequest):
            return pcp.encodeResponse(
                pcp.AnnounceResponse(Result.SUCCESS, 0, self.epoch())
            )
        if request.clientAddress != client:
            result, external, lifetime = Result.ADDRESS_MISMATCH, 0, 30
        else:
            result, external, lifetime = self._map(
                client,
                request.protocol,
                request.internalPort,
                request.suggestedPort,
                request.lifetime,
                request.nonce,
            )
        return pcp.encodeResponse(
            pcp.MapResponse(
                result,
                lifetime,
                self.epoch(),
                request.nonce,
                request.protocol,
                request.internalPort,
                external,
                "203.0.113.5",
            )
        )

    def _map(
        self,
        client: str,
        protocol: IPProto,
        internal: int,
        suggested: int,
        lifetime: int,
        nonce: bytes,
    ) -> tuple[Result, int, int]:
        now = self.reactor.seconds()
        self.mappings = {k: m for k, m in self.mappings.items() if m.expires > now}
        if self.refusal is not None:
            return self.refusal, 0, 30
        if self.style == "proton":
            external = self.protonPorts.setdefault(
                client, 40000 + len(self.protonPorts)
            )
            if lifetime == 0:
                self.mappings.pop((protocol, external), None)
                return Result.SUCCESS, 0, 0
            self.mappings[(protocol, external)] = Mapping(client, internal, now + 60)
            return Result.SUCCESS, external, 60
        if internal == 0:
            return Result.NOT_AUTHORIZED, 0, 0
        mine = [
            ext
            for (proto, ext), m in self.mappings.items()
            if proto == protocol and m.client == client and m.internal == internal
        ]
        if lifetime == 0:
            for ext in mine:
                del self.mappings[(protocol, ext)]
            return Result.SUCCESS, 0, 0
        if mine:
            held = self.mappings[(protocol, mine[0])]
            if nonce and held.nonce != nonce:
                return Result.NOT_AUTHORIZED, 0, 30
            held.expires = now + lifetime
            return Result.SUCCESS, mine[0], lifetime
        low, high = self.allowed
        free = [
            port
            for port in ([suggested] if low <= suggested <= high else [])
            + list(range(low, high + 1))
            if (protocol, port) not in self.mappings
        ]
        if not free:
            return Result.NO_RESOURCES, 0, 30
        self.mappings[(protocol, free[0])] = Mapping(
            client, internal, now + lifetime, nonce
        )
        return Result.SUCCESS, free[0], lifetime


def path(gateway: str = GATEWAY, source: str = "198.51.100.2") -> GatewayPath:
    """A path as the route lookup would report it."""
    return GatewayPath(gateway, source, "wg0", f"{gateway} dev wg0 src {source}")


class FakePaths:
    """
    Stands in for the route lookup: answers with C{current}, or fails with it
    when it is an exception (no route yet, a WireGuard route with no gateway).
    """

    def __init__(self, current: GatewayPath | Exception) -> None:
        self.current = current
        self.asked = 0

    def resolve(self, reactor: IReactorTime, config: Config) -> Deferred[GatewayPath]:
        self.asked += 1
        if isinstance(self.current, Exception):
            return fail(self.current)
        return succeed(self.current)


verifyClass(IUDPTransport, FakeUDPTransport)
verifyClass(IMulticastTransport, FakeUDPTransport)
verifyClass(IReactorUDP, MemoryUDPReactor)
verifyClass(IReactorMulticast, MemoryUDPReactor)
