"""The NAT-PMP client and source, on a fake UDP reactor and a Clock."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qbportsync.config import Config, ConfigError, PortmapConfig
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    SourceError,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.announce import (
    Announcement,
    AnnouncementListener,
    NotAnnouncement,
    RemapLimiter,
    decodeAnnouncement,
)
from qbportsync.sources.gatewaysource import NATPMPSource
from qbportsync.sources.natpmp import (
    ErrorResponse,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    Response,
    UnsupportedVersion,
    decodeRequest,
    encodeResponse,
)
from qbportsync.sources.natpmpclient import NATPMPClient
from qbportsync.sources.udpclient import (
    GatewayRefused,
    GatewayTimeout,
    Superseded,
)
from qbportsync.sources.wire import Result
from tests.fakeudp import (
    GATEWAY,
    SERVER,
    FakeUDPTransport,
    MemoryUDPReactor,
    ScriptedGateway,
    dropped,
)

OK = Result.SUCCESS
RETRANSMIT_TIMES = [0, 0.25, 0.75, 1.75, 3.75, 7.75, 15.75, 23.75, 31.75]


def errors(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "qb_port_sync_errors_total", {"kind": kind}
    )
    return value or 0.0


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def advance(reactor: MemoryUDPReactor, seconds: float, step: float = 0.125) -> None:
    """Move time in small steps, as a real reactor would."""
    steps = round(seconds / step)
    reactor.pump([step] * steps)
    reactor.advance(seconds - steps * step)


def reply(transport: FakeUDPTransport, response: Response) -> None:
    transport.protocol.datagramReceived(encodeResponse(response), SERVER)


def requests(transport: FakeUDPTransport) -> list[object]:
    return [decodeRequest(data) for data, _ in transport.written]


class ClientTests(SynchronousTestCase):
    """NATPMPClient: matching, retransmission, one request at a time."""

    def setUp(self) -> None:
        self.reactor = MemoryUDPReactor()
        self.metrics = Metrics.create()
        self.epochs: list[int] = []
        self.client = NATPMPClient(
            self.reactor, GATEWAY, self.metrics, self.epochs.append
        )
        self.transport = self.reactor.listenUDP(0, self.client)

    def test_connects(self) -> None:
        """The socket is connected to the gateway's port 5351."""
        self.assertEqual(self.transport.connectedTo, SERVER)

    def test_retransmissions(self) -> None:
        """Nine sends 250 ms apart, doubling to at most 8 s; timeout 8 s later."""
        d = self.client.request(ExternalAddressRequest())
        times = [0.0]
        while self.reactor.seconds() < 200 and len(times) < 9:
            self.reactor.advance(0.125)
            if len(self.transport.written) > len(times):
                times.append(self.reactor.seconds())
        self.assertEqual(times, RETRANSMIT_TIMES)
        advance(self.reactor, 7.875)
        self.assertNoResult(d)
        self.reactor.advance(0.125)
        failure = self.failureResultOf(d, GatewayTimeout)
        self.assertEqual(failure.value.silentFor, 8.0)
        self.assertEqual(len(self.transport.written), 9)
        self.transport.written.clear()
        self.reactor.advance(1000)
        self.assertEqual(self.transport.written, [])

    def test_independentRequests(self) -> None:
        """UDP and TCP requests are pending side by side, each on its own schedule."""
        udp = MapRequest("UDP", 6881, 6881, 60)
        tcp = MapRequest("TCP", 6881, 6881, 60)
        first = self.client.request(udp)
        self.reactor.advance(0.125)
        second = self.client.request(tcp)
        self.assertEqual(requests(self.transport), [udp, tcp])
        self.reactor.advance(0.125)
        self.assertEqual(requests(self.transport)[2:], [udp])
        reply(self.transport, MapResponse("TCP", OK, 10, 6881, 6881, 60))
        self.assertEqual(
            self.successResultOf(second), MapResponse("TCP", OK, 10, 6881, 6881, 60)
        )
        self.assertNoResult(first)
        self.reactor.advance(0.5)
        self.assertEqual(requests(self.transport)[3:], [udp])

    def test_newerReplacesOlder(self) -> None:
        """A request for the same mapping replaces the pending one."""
        first = self.client.request(MapRequest("UDP", 6881, 6881, 60))
        second = self.client.request(MapRequest("UDP", 6881, 7000, 60))
        self.failureResultOf(first, Superseded)
        reply(self.transport, MapResponse("UDP", OK, 10, 6881, 7000, 60))
        self.successResultOf(second)
        self.reactor.advance(200)
        self.assertEqual(len(self.transport.written), 2)

    def test_answerStopsRetransmission(self) -> None:
        """Once answered, nothing more is sent."""
        d = self.client.request(ExternalAddressRequest())
        reply(self.transport, ExternalAddressResponse(OK, 5, "203.0.113.5"))
        self.successResultOf(d)
        self.reactor.advance(200)
        self.assertEqual(len(self.transport.written), 1)

    def test_refusedEndsAtOnce(self) -> None:
        """ICMP port unreachable fails the request without retransmitting."""
        d = self.client.request(ExternalAddressRequest())
        self.client.connectionRefused()
        self.failureResultOf(d, GatewayRefused)
        self.reactor.advance(200)
        self.assertEqual(len(self.transport.written), 1)

    def test_refusedIsSourceUnavailable(self) -> None:
        """Timeouts and refusals both mean 'no NAT-PMP here' (exit code 3)."""
        self.assertTrue(issubclass(GatewayRefused, SourceUnavailable))
        self.assertTrue(issubclass(GatewayTimeout, SourceUnavailable))

    def test_stranger(self) -> None:
        """A datagram from another address or port is dropped and counted."""
        d = self.client.request(ExternalAddressRequest())
        data = encodeResponse(ExternalAddressResponse(OK, 5, "203.0.113.5"))
        self.client.datagramReceived(data, ("198.51.100.66", 5351))
        self.client.datagramReceived(data, (GATEWAY, 5350))
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "stranger"), 2)
        self.assertEqual(self.epochs, [])

    def test_mismatch(self) -> None:
        """Answers to another protocol, port or opcode are dropped, counted."""
        d = self.client.request(MapRequest("TCP", 6881, 6881, 60))
        reply(self.transport, MapResponse("UDP", OK, 5, 6881, 6881, 60))
        reply(self.transport, MapResponse("TCP", OK, 5, 6882, 6881, 60))
        reply(self.transport, ExternalAddressResponse(OK, 5, "203.0.113.5"))
        reply(self.transport, ErrorResponse(129, Result.NOT_AUTHORIZED, 5))
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "mismatch"), 4)
        reply(self.transport, MapResponse("TCP", OK, 6, 6881, 7000, 30))
        self.assertEqual(
            self.successResultOf(d), MapResponse("TCP", OK, 6, 6881, 7000, 30)
        )
        self.assertEqual(self.epochs, [6])

    def test_unexpected(self) -> None:
        """A response with nothing in flight is dropped and not acted on."""
        reply(self.transport, MapResponse("TCP", OK, 5, 6881, 6881, 60))
        self.assertEqual(dropped(self.metrics, "unexpected"), 1)
        self.assertEqual(self.epochs, [])

    def test_malformed(self) -> None:
        """Malformed datagrams are dropped, counted, and the request goes on."""
        d = self.client.request(ExternalAddressRequest())
        self.client.datagramReceived(b"\x00\x80\x00", SERVER)
        self.client.datagramReceived(b"\x07" * 12, SERVER)
        self.assertEqual(dropped(self.metrics, "length"), 1)
        self.assertEqual(dropped(self.metrics, "version"), 1)
        self.assertEqual(errors(self.metrics, "parse"), 2)
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        self.assertEqual(len(self.transport.written), 2)

    def test_unknownResultFailsRequest(self) -> None:
        """An undefined result code for our opcode fails the request."""
        d = self.client.request(MapRequest("UDP", 6881, 6881, 60))
        self.client.datagramReceived(
            bytes.fromhex("0081 0009 00000007 1ae1 1ae1 0000003c"), SERVER
        )
        self.failureResultOf(d, SourceError)
        self.assertEqual(dropped(self.metrics, "result"), 1)

    def test_errorResultIsAnAnswer(self) -> None:
        """An 8-byte error for our opcode answers the request."""
        d = self.client.request(MapRequest("UDP", 6881, 6881, 60))
        reply(self.transport, ErrorResponse(129, Result.NO_RESOURCES, 3))
        self.assertEqual(
            self.successResultOf(d),
            ErrorResponse(129, Result.NO_RESOURCES, 3),
        )

    @given(st.binary(max_size=40))
    def test_garbageNeverRaises(self, data: bytes) -> None:
        """Any datagram from the gateway is handled without raising."""
        reactor = MemoryUDPReactor()
        client = NATPMPClient(reactor, GATEWAY, Metrics.create(), lambda epoch: None)
        reactor.listenUDP(0, client)
        d = client.request(MapRequest("UDP", 6881, 6881, 60))
        d.addErrback(lambda f: f.trap(SourceError))
        client.datagramReceived(data, SERVER)

    def test_closeCancelsAll(self) -> None:
        """Closing the socket ourselves cancels every request, quietly."""
        first = self.client.request(ExternalAddressRequest())
        second = self.client.request(MapRequest("UDP", 1, 1, 1))
        self.client.abandon()
        self.transport.stopListening()
        self.failureResultOf(first, CancelledError)
        self.failureResultOf(second, CancelledError)
        self.assertEqual(len(self.transport.written), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closedUnderUs(self) -> None:
        """The epoll reactor closing the port on ICMP fails requests as refused."""
        first = self.client.request(ExternalAddressRequest())
        second = self.client.request(MapRequest("UDP", 1, 1, 1))
        self.transport.closedByReactor()
        self.failureResultOf(first, GatewayRefused)
        self.failureResultOf(second, GatewayRefused)
        self.assertTrue(self.client.closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_zeroGrantDropped(self) -> None:
        """Success with port 0 or lifetime 0 is dropped, counted, never delivered."""
        d = self.client.request(MapRequest("UDP", 6881, 6881, 60))
        reply(self.transport, MapResponse("UDP", OK, 5, 6881, 0, 60))
        reply(self.transport, MapResponse("UDP", OK, 5, 6881, 6881, 0))
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "zero"), 2)
        self.assertEqual(errors(self.metrics, "parse"), 2)
        self.assertEqual(self.epochs, [])
        reply(self.transport, MapResponse("UDP", OK, 5, 6881, 6881, 60))
        self.successResultOf(d)

    def test_deleteAnsweredWithZeros(self) -> None:
        """A delete (lifetime 0) is answered with port and lifetime 0: accepted."""
        d = self.client.request(MapRequest("UDP", 6881, 0, 0))
        reply(self.transport, MapResponse("UDP", OK, 5, 6881, 0, 0))
        self.successResultOf(d)

    def test_cancelStopsOnlyThatOne(self) -> None:
        """Cancelling one request stops its retransmissions, not the other's."""
        first = self.client.request(ExternalAddressRequest())
        second = self.client.request(MapRequest("UDP", 1, 1, 1))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.reactor.advance(0.25)
        self.assertEqual(requests(self.transport)[-1], MapRequest("UDP", 1, 1, 1))
        reply(self.transport, MapResponse("UDP", OK, 1, 1, 1, 1))
        self.successResultOf(second)
        self.reactor.advance(200)
        self.assertEqual(len(self.transport.written), 3)


CLIENT = "198.51.100.2"


def config(**portmap: object) -> Config:
    settings: dict[str, object] = {"gateway": GATEWAY, "bind_address": CLIENT}
    settings.update(portmap)
    return Config(portmap=PortmapConfig(**settings))  # type: ignore[arg-type]


class AnnouncementTests(SynchronousTestCase):
    """decodeAnnouncement and the listener, on their own."""

    @given(st.binary(max_size=40))
    def test_garbageNeverRaises(self, data: bytes) -> None:
        """Any datagram on 5350 either decodes or raises NotAnnouncement."""
        with contextlib.suppress(NotAnnouncement):
            decodeAnnouncement(data)

    def test_natpmp(self) -> None:
        """A NAT-PMP announcement carries the epoch and external address."""
        self.assertEqual(
            decodeAnnouncement(
                encodeResponse(ExternalAddressResponse(OK, 7, "203.0.113.5"))
            ),
            Announcement("natpmp", 7, "203.0.113.5"),
        )

    def test_natpmpFailure(self) -> None:
        """With a failure result the address is ignored."""
        data = encodeResponse(
            ExternalAddressResponse(Result.NETWORK_FAILURE, 7, "0.0.0.0")
        )
        self.assertEqual(decodeAnnouncement(data), Announcement("natpmp", 7, None))

    def test_pcp(self) -> None:
        """A PCP ANNOUNCE response carries the epoch at offset 8."""
        data = bytes.fromhex("0280 0000 00000000 0000002a") + bytes(12)
        self.assertEqual(decodeAnnouncement(data), Announcement("pcp", 42, None))

    def test_notAnnouncements(self) -> None:
        """PCP MAP responses, failures, odd lengths and version 1 are refused."""
        for data, reason in (
            (bytes.fromhex("0281 0000") + bytes(56), "opcode"),
            (bytes.fromhex("0280 0008") + bytes(20), "result"),
            (bytes.fromhex("0280 0000") + bytes(21), "length"),
            (bytes.fromhex("0180 0000") + bytes(20), "version"),
            (bytes.fromhex("0081 0000") + bytes(12), "opcode"),
        ):
            error = self.assertRaises(NotAnnouncement, decodeAnnouncement, data)
            self.assertEqual(error.reason, reason)

    def test_limiterWaitsAtRandom(self) -> None:
        """The first remap is allowed after the random 0-5 s wait."""
        clock = Clock()
        limiter = RemapLimiter(clock, lambda: 0.3, Metrics.create())
        self.assertEqual(limiter.delay("the gateway restarted", 30), 1.5)

    def test_limiterOncePerPeriod(self) -> None:
        """Within one period, further remaps are refused and counted."""
        clock = Clock()
        metrics = Metrics.create()
        limiter = RemapLimiter(clock, lambda: 0.0, metrics)
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        allowed = []
        for _ in range(600):
            allowed.append(limiter.delay("forged", 30) is not None)
            clock.advance(0.1)
        self.assertEqual(allowed.count(True), 2)
        self.assertEqual(dropped(metrics, "ratelimit"), 598)
        said = [e for e in events if e["log_level"] >= LogLevel.info]
        self.assertEqual(len(said), 2)
        self.assertIn("299 more", said[1]["more"])

    def test_listenerDropsMalformed(self) -> None:
        """The listener counts a malformed datagram from the gateway."""
        metrics = Metrics.create()
        heard: list[Announcement] = []
        listener = AnnouncementListener(GATEWAY, heard.append, metrics)
        listener.datagramReceived(b"\x00\x80", (GATEWAY, 5351))
        self.assertEqual(heard, [])
        self.assertEqual(dropped(metrics, "length"), 1)


class FakeGateway(ScriptedGateway[MapRequest]):
    """Answers the source's NAT-PMP requests the way a test scripts."""

    kind = MapRequest

    def decode(self, data: bytes) -> object:
        return decodeRequest(data)

    def keyOf(self, request: MapRequest) -> Hashable:
        return (request.protocol, request.internalPort)

    def grant(self, port: int | None = None, lifetime: int | None = None) -> MapRequest:
        """Answer the oldest open request, granting C{port} (default: suggested)."""
        request = self.oldest()
        reply(
            self.socket,
            MapResponse(
                request.protocol,
                OK,
                self.now(),
                request.internalPort,
                request.suggestedPort if port is None else port,
                request.lifetime if lifetime is None else lifetime,
            ),
        )
        return request

    def refuse(self, result: Result) -> None:
        request = self.oldest()
        reply(
            self.socket,
            MapResponse(
                request.protocol, result, self.now(), request.internalPort, 0, 0
            ),
        )


class SourceTestCase(SynchronousTestCase):
    def makeSource(
        self,
        sinkPort: Callable[[], Deferred[int]] = lambda: succeed(6881),
        randomValue: float = 0.5,
        **portmap: object,
    ) -> NATPMPSource:
        self.reactor = MemoryUDPReactor()
        self.metrics = Metrics.create()
        self.gateway = FakeGateway(self.reactor)
        self.delivered: list[Forwarded | SourceTrouble] = []
        return NATPMPSource(
            self.reactor,
            config(**portmap),
            self.metrics,
            sinkPort,
            random=lambda: randomValue,
        )


class FetchOnceTests(SourceTestCase):
    """NATPMPSource.fetchOnce: map once, report, close."""

    def test_provides(self) -> None:
        """NATPMPSource provides IPortSource."""
        self.assertTrue(verifyObject(IPortSource, self.makeSource()))

    def test_both(self) -> None:
        """UDP then TCP, suggesting external = qBittorrent's port; socket closed."""
        source = self.makeSource()
        d = source.fetchOnce()
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 6881, 6881, 60))
        self.assertEqual(self.gateway.grant(), MapRequest("TCP", 6881, 6881, 60))
        self.assertEqual(
            self.successResultOf(d),
            Forwarded(6881, "natpmp", note="ttl=60s", expires=60.0),
        )
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(sample(self.metrics, "qb_port_sync_forwarded_port"), 6881.0)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_lease_expiry_timestamp_seconds"),
            60.0,
        )

    def test_singleProtocol(self) -> None:
        """protocol = "TCP" maps TCP alone, with the configured lifetime."""
        source = self.makeSource(protocol="TCP", lifetime_secs=120)
        d = source.fetchOnce()
        self.assertEqual(
            self.gateway.grant(6881, 60), MapRequest("TCP", 6881, 6881, 120)
        )
        self.assertEqual(
            self.successResultOf(d),
            Forwarded(6881, "natpmp", note="ttl=60s", expires=60.0),
        )

    def test_longerGrantNotBelieved(self) -> None:
        """A lifetime longer than asked is reported as the one asked for."""
        source = self.makeSource(protocol="TCP")
        d = source.fetchOnce()
        self.gateway.grant(6881, 2**32 - 1)
        self.assertEqual(
            self.successResultOf(d),
            Forwarded(6881, "natpmp", note="ttl=60s", expires=60.0),
        )

    def test_fixedInternalPort(self) -> None:
        """A configured internal port is used and qBittorrent is not asked."""
        source = self.makeSource(
            sinkPort=lambda: self.fail("asked"), internal_port=7000, protocol="UDP"
        )
        source.fetchOnce()
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 7000, 7000, 60))

    def test_sinkPortUnknown(self) -> None:
        """When qBittorrent cannot say its port, internal port 51413 is used."""
        source = self.makeSource(
            sinkPort=lambda: fail(SourceError("down")), protocol="UDP"
        )
        source.fetchOnce()
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 51413, 51413, 60))

    def test_sinkPortZero(self) -> None:
        """Internal port is never 0, even when qBittorrent says 0."""
        source = self.makeSource(sinkPort=lambda: succeed(0), protocol="UDP")
        source.fetchOnce()
        self.assertEqual(self.gateway.grant().internalPort, 51413)

    def test_refused(self) -> None:
        """ICMP refused: SourceUnavailable at once, socket closed."""
        source = self.makeSource()
        d = source.fetchOnce()
        self.gateway.socket.protocol.connectionRefused()  # type: ignore[attr-defined]
        self.failureResultOf(d, SourceUnavailable)
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(errors(self.metrics, "gateway"), 1)

    def test_refusedUnderEpoll(self) -> None:
        """The socket closed by the reactor on ICMP: GatewayRefused, no traceback."""
        source = self.makeSource()
        d = source.fetchOnce()
        self.gateway.socket.closedByReactor()
        failure = self.failureResultOf(d, GatewayRefused)
        self.assertIsInstance(failure.value, SourceUnavailable)
        self.assertIn("ICMP port unreachable", str(failure.value))
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_silentGateway(self) -> None:
        """A gateway that never answers: SourceUnavailable after 39.75 s."""
        source = self.makeSource()
        d = source.fetchOnce()
        advance(self.reactor, 39.625)
        self.assertNoResult(d)
        self.reactor.advance(0.125)
        self.failureResultOf(d, SourceUnavailable)

    def test_unsupported(self) -> None:
        """Unsupported version or opcode answers mean SourceUnavailable."""
        for response in (
            ErrorResponse(0, Result.UNSUPP_VERSION, 0),
            ErrorResponse(129, Result.UNSUPP_OPCODE, 0),
            UnsupportedVersion(2),
        ):
            source = self.makeSource(protocol="UDP")
            d = source.fetchOnce()
            reply(self.gateway.socket, response)
            self.failureResultOf(d, SourceUnavailable)

    def test_transientResults(self) -> None:
        """Refused, network failure, out of resources mean SourceError."""
        for result in (
            Result.NOT_AUTHORIZED,
            Result.NETWORK_FAILURE,
            Result.NO_RESOURCES,
        ):
            source = self.makeSource()
            d = source.fetchOnce()
            self.gateway.refuse(result)
            failure = self.failureResultOf(d, SourceError)
            self.assertIn(result.value, str(failure.value))

    def test_noGateway(self) -> None:
        """Discovery off and no gateway set: a ConfigError naming the fix."""
        source = self.makeSource(gateway="", autodiscover_gateway=False)
        failure = self.failureResultOf(source.fetchOnce(), ConfigError)
        self.assertIn('gateway = "10.2.0.1"', str(failure.value))

    def test_bindAddress(self) -> None:
        """The socket binds to [portmap] bind_address."""
        source = self.makeSource(bind_address="198.51.100.2")
        source.fetchOnce()
        self.assertEqual(self.gateway.socket.interface, "198.51.100.2")


class ReconcileTests(SourceTestCase):
    """BOTH: qBittorrent has one port, so UDP and TCP must agree."""

    def test_askedTogether(self) -> None:
        """UDP and TCP are asked at once, each retransmitted on its own."""
        self.makeSource().fetchOnce()
        self.assertEqual(
            self.gateway.requests(),
            [MapRequest("UDP", 6881, 6881, 60), MapRequest("TCP", 6881, 6881, 60)],
        )
        self.gateway.grant()
        self.reactor.advance(0.25)
        self.assertEqual(self.gateway.requests(), [MapRequest("TCP", 6881, 6881, 60)])

    def test_reaskWithTCPPort(self) -> None:
        """Different grants: ask UDP again for TCP's port; agreed port wins."""
        source = self.makeSource(sinkPort=lambda: succeed(2000))
        d = source.fetchOnce()
        self.gateway.grant(1000)
        self.gateway.grant(2000)
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 2000, 2000, 60))
        self.assertEqual(self.successResultOf(d).port, 2000)
        self.assertEqual(errors(self.metrics, "gateway"), 0)

    def test_tcpWins(self) -> None:
        """Still different: TCP's port is used, and the conflict counted."""
        source = self.makeSource(sinkPort=lambda: succeed(2000))
        d = source.fetchOnce()
        self.gateway.grant(1000)
        self.gateway.grant(2000)
        self.gateway.grant(1000)
        self.assertEqual(self.successResultOf(d).port, 2000)
        self.assertEqual(errors(self.metrics, "gateway"), 1)

    def test_oneFailsBoth(self) -> None:
        """A refusal for one transport fails the mapping and stops the other."""
        source = self.makeSource()
        d = source.fetchOnce()
        self.gateway.refuse(Result.NO_RESOURCES)
        self.failureResultOf(d, SourceError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_shortestLifetime(self) -> None:
        """The reported lifetime is the shorter of the two grants."""
        source = self.makeSource()
        d = source.fetchOnce()
        self.gateway.grant(lifetime=60)
        self.gateway.grant(lifetime=45)
        self.assertEqual(self.successResultOf(d).note, "ttl=45s")


class DaemonTests(SourceTestCase):
    """NATPMPSource.start: renewals, retries, epochs, announcements, stop."""

    def started(self, **portmap: object) -> NATPMPSource:
        source = self.makeSource(**portmap)  # type: ignore[arg-type]
        source.start(self.delivered.append)
        return source

    def mapBoth(self, port: int | None = None, lifetime: int | None = None) -> None:
        self.gateway.grant(port, lifetime)
        self.gateway.grant(port, lifetime)

    def ports(self) -> list[int]:
        return [f.port for f in self.delivered if isinstance(f, Forwarded)]

    def troubles(self) -> list[SourceTrouble]:
        return [f for f in self.delivered if isinstance(f, SourceTrouble)]

    def test_renewAtHalfLifetime(self) -> None:
        """Renewals every 30 s for a 60 s grant, two datagrams each."""
        self.started()
        self.mapBoth(6881)
        self.assertEqual(len(self.gateway.requests()), 2)
        for period in range(1, 5):
            self.reactor.advance(29.9)
            self.assertEqual(self.gateway.requests(), [])
            self.reactor.advance(0.1)
            self.mapBoth()
            self.assertEqual(len(self.gateway.requests()), 2, f"period {period}")
        self.assertEqual(self.ports(), [6881] * 5)
        self.assertEqual(
            self.delivered[-1], Forwarded(6881, "natpmp", "ttl=60s", 180.0)
        )

    def test_quietRenewals(self) -> None:
        """A grant is logged at info when new, at debug when a renewal repeats it."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.started()
        self.mapBoth(6881)
        self.reactor.advance(30)
        self.mapBoth()
        grants = [
            (e["port"], e["log_level"])
            for e in events
            if e.get("log_format", "").startswith("The gateway forwards port")
        ]
        self.assertEqual(grants, [(6881, LogLevel.info), (6881, LogLevel.debug)])

    def test_convergesOnGrantedPort(self) -> None:
        """External 40000 for internal 6881: release, then map 40000 to 40000."""
        self.started()
        self.mapBoth(40000)
        self.assertEqual(self.gateway.grant(0, 0), MapRequest("UDP", 6881, 0, 0))
        self.assertEqual(self.gateway.grant(0, 0), MapRequest("TCP", 6881, 0, 0))
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 40000, 40000, 60))
        self.assertEqual(self.gateway.grant(), MapRequest("TCP", 40000, 40000, 60))
        self.assertEqual(self.ports(), [40000])
        self.reactor.advance(30)
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 40000, 40000, 60))

    def test_internalPortStable(self) -> None:
        """qBittorrent is asked its port once; renewals keep the same one."""
        asked: list[int] = []

        def sinkPort() -> Deferred[int]:
            asked.append(1)
            return succeed(6881 + len(asked))

        source = self.makeSource(sinkPort=sinkPort)
        source.start(self.delivered.append)
        self.mapBoth(40000)
        self.reactor.advance(30)
        self.assertEqual(self.gateway.grant().internalPort, 6882)
        self.assertEqual(asked, [1])

    def test_shorterGrant(self) -> None:
        """A 20 s grant is renewed after 10 s."""
        self.started()
        self.mapBoth(lifetime=20)
        self.gateway.requests()
        self.reactor.advance(9.9)
        self.assertEqual(self.gateway.requests(), [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_longerGrantRenewedAsAsked(self) -> None:
        """A grant of 2**32-1 s is renewed after 30 s and expires as asked."""
        self.started()
        self.mapBoth(lifetime=2**32 - 1)
        self.gateway.requests()
        self.assertEqual(self.delivered[-1], Forwarded(6881, "natpmp", "ttl=60s", 60.0))
        self.reactor.advance(29.9)
        self.assertEqual(self.gateway.requests(), [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_refreshCap(self) -> None:
        """refresh_secs caps the time between renewals."""
        self.started(refresh_secs=20)
        self.mapBoth()
        self.gateway.requests()
        self.reactor.advance(19.9)
        self.assertEqual(self.gateway.requests(), [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_zeroGrantNeverDelivered(self) -> None:
        """Port 0 or lifetime 0 on success is dropped; the request goes on."""
        self.started(protocol="UDP")
        request = self.gateway.last()
        for port, lifetime in ((0, 60), (6881, 0)):
            reply(
                self.gateway.socket,
                MapResponse("UDP", OK, 1000, request.internalPort, port, lifetime),
            )
        self.assertEqual(self.delivered, [])
        self.assertEqual(dropped(self.metrics, "zero"), 2)
        self.reactor.advance(0.25)
        self.gateway.grant()
        self.assertEqual(self.ports(), [6881])

    def test_movedPortConfirmed(self) -> None:
        """A renewal that moves the port is asked again; agreed, it converges."""
        self.started()
        self.mapBoth()
        self.reactor.advance(30)
        self.mapBoth(7000)
        self.assertEqual(self.delivered[1:], [])
        self.assertEqual(self.gateway.grant(7000), MapRequest("UDP", 6881, 6881, 60))
        self.assertEqual(self.gateway.grant(7000), MapRequest("TCP", 6881, 6881, 60))
        self.gateway.grant(0, 0)
        self.gateway.grant(0, 0)
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 7000, 7000, 60))
        self.gateway.grant()
        self.assertEqual(self.ports(), [6881, 7000])

    def test_forgedMoveIgnored(self) -> None:
        """A moved port that asking again does not confirm is never delivered."""
        self.started()
        self.mapBoth()
        self.reactor.advance(30)
        self.mapBoth(4444)
        self.mapBoth(6881)
        self.assertEqual(self.ports(), [6881, 6881])
        self.assertEqual(
            self.gateway.requests()[-2:],
            [
                MapRequest("UDP", 6881, 6881, 60),
                MapRequest("TCP", 6881, 6881, 60),
            ],
        )

    def test_failureRetriesQuickly(self) -> None:
        """A refused renewal is retried after 1, 2, 4 s, within the lease."""
        self.started()
        self.mapBoth(6881)
        self.gateway.requests()
        self.reactor.advance(30)
        sent: list[float] = []
        for _ in range(3):
            self.gateway.refuse(Result.NETWORK_FAILURE)
            self.gateway.requests()
            while not self.gateway.socket.written:
                self.reactor.advance(0.5)
            sent.append(self.reactor.seconds())
        self.assertEqual(sent, [31.0, 33.0, 37.0])
        self.assertEqual(errors(self.metrics, "gateway"), 3)
        self.assertEqual(self.troubles(), [])

    def test_retryNeverPastLease(self) -> None:
        """With 2 s left on the lease, the retry comes within 2 s."""
        self.started()
        self.mapBoth(6881, lifetime=10)
        self.reactor.advance(5)
        for _ in range(3):  # 1 s, 2 s, then 4 s capped to the 1 s left
            self.gateway.refuse(Result.NETWORK_FAILURE)
            self.gateway.requests()
            while not self.gateway.socket.written:
                self.reactor.advance(0.25)
        self.assertEqual(self.reactor.seconds(), 10.0)

    def test_silentGatewayKeepsTrying(self) -> None:
        """A silent gateway: trouble after 39.75 s; a new socket asks at once."""
        self.started(protocol="UDP")
        first = self.gateway.socket
        advance(self.reactor, 39.75)
        self.assertEqual(len(first.sent), 9)
        self.assertFalse(first.listening)
        self.assertEqual(
            self.troubles(),
            [
                SourceTrouble(
                    f"natpmp: gateway {GATEWAY} does not answer NAT-PMP", "gateway"
                )
            ],
        )
        self.assertEqual(len(self.gateway.socket.sent), 1)

    def test_epochResetFromResponse(self) -> None:
        """An epoch gone back remaps everything after the random 0-5 s wait."""
        self.started()
        self.mapBoth(6881)
        self.reactor.advance(30)
        self.gateway.epoch = 0
        self.gateway.started = 30
        self.gateway.requests()
        self.mapBoth()
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_gateway_epoch_resets_total"), 1.0
        )
        # Our own try saw it: map again at once, no random wait.
        self.assertEqual(self.gateway.grant(), MapRequest("UDP", 6881, 6881, 60))
        self.assertEqual(self.gateway.grant(), MapRequest("TCP", 6881, 6881, 60))

    def test_epochSteady(self) -> None:
        """An epoch that advances with time is no reset."""
        self.started()
        self.mapBoth(6881)
        for _ in range(4):
            self.reactor.advance(30)
            self.mapBoth()
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_gateway_epoch_resets_total"), 0.0
        )

    def announcementPort(self) -> FakeUDPTransport:
        return next(p for p in self.reactor.open() if p.port == 5350)

    def test_listensForAnnouncements(self) -> None:
        """The daemon joins 224.0.0.1 on port 5350."""
        self.started()
        self.assertEqual(self.announcementPort().groups, [("224.0.0.1", CLIENT)])

    def announcedAfterMapping(
        self, datagram: bytes, sender: tuple[str, int] = SERVER
    ) -> None:
        """Map both, let 10 s pass, then hear C{datagram} on 224.0.0.1:5350."""
        self.started()
        self.mapBoth(6881)
        self.gateway.requests()
        self.reactor.advance(10)
        self.announcementPort().protocol.datagramReceived(datagram, sender)

    def test_natpmpAnnouncement(self) -> None:
        """A NAT-PMP announcement with a reset epoch remaps after 0-5 s."""
        self.announcedAfterMapping(
            encodeResponse(ExternalAddressResponse(OK, 0, "203.0.113.5"))
        )
        self.reactor.advance(2.4)
        self.assertEqual(self.gateway.requests(), [])
        self.reactor.advance(0.1)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_pcpAnnouncement(self) -> None:
        """A PCP ANNOUNCE (version 2) with a reset epoch triggers a remap."""
        self.announcedAfterMapping(
            bytes.fromhex("0280 0000 00000000 00000000") + bytes(12)
        )
        self.reactor.advance(2.5)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_announcementFromOtherPort(self) -> None:
        """An announcement from the gateway's address but not port 5351 is dropped."""
        self.announcedAfterMapping(
            encodeResponse(ExternalAddressResponse(OK, 0, "203.0.113.5")),
            (GATEWAY, 4444),
        )
        self.reactor.advance(5)
        self.assertEqual(self.gateway.requests(), [])
        self.assertEqual(dropped(self.metrics, "stranger"), 1)

    def test_announcementFlood(self) -> None:
        """5,000 forged resets: one remap per renewal period, logged once."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.announcedAfterMapping(
            encodeResponse(ExternalAddressResponse(OK, 0, "203.0.113.5"))
        )
        listener = self.announcementPort().protocol
        remaps = 0
        for n in range(5000):
            address = f"203.0.113.{5 + n % 2}"
            listener.datagramReceived(
                encodeResponse(ExternalAddressResponse(OK, 1010 + n, address)),
                SERVER,
            )
            self.reactor.advance(0.012)
            sent = self.gateway.requests()
            if sent:
                remaps += 1
                self.mapBoth()
        # 60 s of flood, renewal period 30 s, and one renewal of our own.
        self.assertLessEqual(remaps, 4)
        self.assertGreater(dropped(self.metrics, "ratelimit"), 4990)
        said = [
            e
            for e in events
            if e["log_level"] >= LogLevel.info
            and "mapping again in" in e.get("log_format", "")
        ]
        self.assertLessEqual(len(said), 2)

    def test_strangerAnnouncement(self) -> None:
        """Announcements from anyone but our gateway are dropped and counted."""
        self.announcedAfterMapping(
            encodeResponse(ExternalAddressResponse(OK, 0, "203.0.113.5")),
            ("198.51.100.66", 5351),
        )
        self.reactor.advance(5)
        self.assertEqual(self.gateway.requests(), [])
        self.assertEqual(dropped(self.metrics, "stranger"), 1)

    def test_addressChange(self) -> None:
        """An announced new external address triggers a remap."""
        self.started()
        self.mapBoth(6881)
        self.gateway.requests()
        listener = self.announcementPort().protocol
        for address in ("203.0.113.5", "203.0.113.6"):
            self.reactor.advance(1)
            listener.datagramReceived(
                encodeResponse(ExternalAddressResponse(OK, 1001, address)),
                (GATEWAY, 5351),
            )
        self.reactor.advance(2.5)
        self.assertEqual(len(self.gateway.requests()), 2)

    def test_stop(self) -> None:
        """stop() closes both sockets and leaves no timer; deletes nothing."""
        source = self.started()
        self.mapBoth(6881)
        socket = self.gateway.socket
        socket.written.clear()
        self.successResultOf(source.stop())
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(socket.written, [])

    def test_stopWhileMapping(self) -> None:
        """stop() during a request cancels it and its retransmissions."""
        source = self.started()
        self.successResultOf(source.stop())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.delivered, [])

    def test_releaseOnExit(self) -> None:
        """release_on_exit deletes each mapping: our internal port, lifetime 0."""
        source = self.started(release_on_exit=True)
        self.mapBoth(6881)
        self.gateway.requests()
        socket = self.gateway.socket
        d = source.stop()
        self.assertEqual(self.gateway.grant(0, 0), MapRequest("UDP", 6881, 0, 0))
        self.assertEqual(self.gateway.grant(0, 0), MapRequest("TCP", 6881, 0, 0))
        self.successResultOf(d)
        self.assertEqual(len(socket.written), 2)
        self.assertEqual(self.reactor.open(), [])

    def test_releaseGivesUp(self) -> None:
        """A silent gateway holds up stop() for 1.75 s at most per mapping."""
        source = self.started(release_on_exit=True, protocol="UDP")
        self.gateway.grant()
        d = source.stop()
        advance(self.reactor, 1.625)
        self.assertNoResult(d)
        self.reactor.advance(0.125)
        self.successResultOf(d)
