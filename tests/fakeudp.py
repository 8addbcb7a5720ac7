"""
A reactor for UDP unit tests: a L{Clock} that also binds (fake) UDP and
multicast ports, in the manner of twisted.names' own test reactor; and the
gateway's end of it, which the NAT-PMP and PCP tests script.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IMulticastTransport,
    IReactorMulticast,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import AbstractDatagramProtocol, DatagramProtocol
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyClass

from qbportsync.metrics import Metrics

GATEWAY = "198.51.100.1"
SERVER = (GATEWAY, 5351)

RequestT = TypeVar("RequestT")


@implementer(IUDPTransport, IMulticastTransport, IListeningPort)
class FakeUDPTransport:
    """Records what a protocol sends; tests feed replies to the protocol."""

    def __init__(
        self, interface: str, port: int, protocol: AbstractDatagramProtocol
    ) -> None:
        self.interface = interface
        self.port = port
        self.protocol = protocol
        self.written: list[tuple[bytes, tuple[str, int] | None]] = []
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

    def connect(self, host: str, port: int) -> None:
        self.connectedTo = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        self.protocol.doStop()
        return succeed(None)

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

    def listenUDP(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakeUDPTransport:
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
        transport = FakeUDPTransport(interface, port, protocol)
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

    def decode(self, data: bytes) -> object:
        """The protocol's request decoder."""
        raise NotImplementedError

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


verifyClass(IUDPTransport, FakeUDPTransport)
verifyClass(IMulticastTransport, FakeUDPTransport)
verifyClass(IReactorUDP, MemoryUDPReactor)
verifyClass(IReactorMulticast, MemoryUDPReactor)
