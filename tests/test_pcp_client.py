"""The PCP client and source, with NAT-PMP fallback, on a fake UDP reactor."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from qbportsync.config import Config, PortmapConfig
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources import natpmp
from qbportsync.sources.gatewaysource import PCPSource
from qbportsync.sources.pcp import (
    AnnounceResponse,
    MapRequest,
    MapResponse,
    UnsupportedVersion,
    decodeRequest,
    encodeResponse,
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

CLIENT = "198.51.100.2"
OK = Result.SUCCESS


def config(**portmap: object) -> Config:
    settings: dict[str, object] = {"gateway": GATEWAY, "bind_address": CLIENT}
    settings.update(portmap)
    return Config(portmap=PortmapConfig(**settings))  # type: ignore[arg-type]


def resets(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("qb_port_sync_gateway_epoch_resets_total")


class FakeGateway(ScriptedGateway[MapRequest]):
    """Answers PCP (or NAT-PMP) requests the way a test scripts."""

    kind = MapRequest

    def decode(self, data: bytes) -> object:
        return decodeRequest(data)

    def keyOf(self, request: MapRequest) -> Hashable:
        return (request.protocol, request.internalPort)

    def answer(self, request: MapRequest, result: Result, port: int, life: int) -> None:
        self.send(
            encodeResponse(
                MapResponse(
                    result,
                    life,
                    self.now(),
                    request.nonce,
                    request.protocol,
                    request.internalPort,
                    port,
                    "203.0.113.5",
                )
            )
        )

    def grant(self, port: int | None = None, lifetime: int = 120) -> MapRequest:
        """Answer the oldest open request, granting C{port} (default: suggested)."""
        request = self.oldest()
        self.answer(
            request, OK, request.suggestedPort if port is None else port, lifetime
        )
        return request

    def refuse(self, result: Result, lifetime: int = 0) -> MapRequest:
        request = self.oldest()
        self.answer(request, result, 0, lifetime)
        return request

    def natpmpRequest(self) -> natpmp.Request:
        return natpmp.decodeRequest(self.lastSent())

    def natpmpGrant(self, port: int) -> None:
        request = self.natpmpRequest()
        assert isinstance(request, natpmp.MapRequest)
        self.send(
            natpmp.encodeResponse(
                natpmp.MapResponse(
                    request.protocol,
                    Result.SUCCESS,
                    self.now(),
                    request.internalPort,
                    port,
                    request.lifetime,
                )
            )
        )


class SourceTestCase(SynchronousTestCase):
    def makeSource(
        self,
        sinkPort: Callable[[], Deferred[int]] = lambda: succeed(1024),
        **portmap: object,
    ) -> PCPSource:
        self.reactor = MemoryUDPReactor()
        self.metrics = Metrics.create()
        self.gateway = FakeGateway(self.reactor)
        self.delivered: list[Forwarded] = []
        return PCPSource(
            self.reactor,
            config(**portmap),
            self.metrics,
            sinkPort,
            random=lambda: 0.5,
        )

    def started(self, **portmap: object) -> PCPSource:
        source = self.makeSource(**portmap)  # type: ignore[arg-type]
        source.start(self.delivered.append)
        return source

    def sendTimes(self, until: float, step: float = 0.125) -> list[float]:
        """Advance to C{until}, noting when requests go out."""
        times = []
        while self.reactor.seconds() < until:
            self.reactor.advance(step)
            if any(p.written for p in self.reactor.open() if p.connectedTo == SERVER):
                times.append(self.reactor.seconds())
                for p in self.reactor.open():
                    p.written.clear()
        return times


class FetchOnceTests(SourceTestCase):
    """PCPSource.fetchOnce: MAP, matching, negotiation."""

    def test_provides(self) -> None:
        """PCPSource provides IPortSource and starts out named pcp."""
        source = self.makeSource()
        self.assertTrue(verifyObject(IPortSource, source))
        self.assertEqual(source.name, "pcp")

    def test_both(self) -> None:
        """UDP and TCP; a lifetime raised to 120 s counts as the 60 s asked."""
        source = self.makeSource()
        d = source.fetchOnce()
        udp = self.gateway.grant(1024)
        tcp = self.gateway.grant(1024)
        self.assertEqual((udp.protocol, tcp.protocol), ("UDP", "TCP"))
        self.assertEqual(
            (udp.internalPort, udp.suggestedPort, udp.lifetime), (1024, 1024, 60)
        )
        self.assertEqual(
            self.successResultOf(d),
            Forwarded(1024, "pcp", note="ttl=60s", expires=60.0),
        )
        self.assertEqual(self.reactor.open(), [])

    def test_clientAddress(self) -> None:
        """The client field is the socket's local address; no external preference."""
        self.makeSource().fetchOnce()
        request = self.gateway.last()
        self.assertEqual(request.clientAddress, CLIENT)
        self.assertEqual(request.suggestedAddress, "0.0.0.0")

    def test_noncePerProtocol(self) -> None:
        """Each mapping has its own random 12-byte nonce."""
        self.makeSource().fetchOnce()
        udp = self.gateway.grant()
        tcp = self.gateway.last()
        self.assertEqual(len(udp.nonce), 12)
        self.assertNotEqual(udp.nonce, tcp.nonce)

    def test_nonceKeptOnRetransmission(self) -> None:
        """The retransmission after ~3 s carries the same nonce."""
        self.makeSource(protocol="UDP").fetchOnce()
        self.reactor.advance(3)
        first, second = self.gateway.requests()
        self.assertEqual(first, second)

    def test_matching(self) -> None:
        """A response for another nonce, protocol or port is dropped."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        request = self.gateway.last()
        for other in (
            request.__class__(b"x" * 12, "UDP", 1024, 0, "", 0, ""),
            request.__class__(request.nonce, "TCP", 1024, 0, "", 0, ""),
            request.__class__(request.nonce, "UDP", 1025, 0, "", 0, ""),
        ):
            self.gateway.answer(other, OK, 1024, 120)
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "mismatch"), 3)
        self.gateway.grant(1024)
        self.assertEqual(self.successResultOf(d).port, 1024)

    def test_sourceChecked(self) -> None:
        """A response from another address or port is dropped."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        request = self.gateway.last()
        data = encodeResponse(
            MapResponse(OK, 120, 1, request.nonce, "UDP", 1024, 1024, "203.0.113.5")
        )
        self.gateway.socket.protocol.datagramReceived(data, (GATEWAY, 5350))
        self.gateway.socket.protocol.datagramReceived(data, ("198.51.100.9", 5351))
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "stranger"), 2)

    def test_malformedDropped(self) -> None:
        """A malformed datagram is counted and the request goes on."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        self.gateway.send(b"\x02\x81\x00\x00" + bytes(21))
        self.assertNoResult(d)
        self.assertEqual(dropped(self.metrics, "length"), 1)

    def test_versionZeroFallsBackAtOnce(self) -> None:
        """UNSUPP_VERSION with version 0: NAT-PMP at once, on a new socket."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        pcpSocket = self.gateway.socket
        self.gateway.send(encodeResponse(UnsupportedVersion(0)))
        self.assertFalse(pcpSocket.listening)
        self.assertEqual(
            self.gateway.natpmpRequest(), natpmp.MapRequest("UDP", 1024, 1024, 60)
        )
        self.gateway.natpmpGrant(1024)
        forwarded = self.successResultOf(d)
        self.assertEqual((forwarded.port, forwarded.source), (1024, "natpmp"))
        self.assertIn("fell back from pcp", forwarded.note)
        self.assertIn("only NAT-PMP", forwarded.note)
        self.assertEqual(source.name, "natpmp")
        self.assertEqual(self.reactor.seconds(), 0)

    def test_silentFallsBackAfterProbe(self) -> None:
        """No PCP answer: sent at 0 and 3 s, NAT-PMP asked at 5 s."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        self.assertEqual(len(self.gateway.requests()), 1)
        self.assertEqual(self.sendTimes(4.875), [3.0])
        self.reactor.advance(0.125)
        self.assertIsInstance(self.gateway.natpmpRequest(), natpmp.MapRequest)
        self.gateway.natpmpGrant(1024)
        self.assertEqual(self.successResultOf(d).source, "natpmp")

    def test_allSilent(self) -> None:
        """Neither protocol answers: SourceUnavailable after 5 + 39.75 s."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        self.reactor.pump([0.25] * 178)
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        self.failureResultOf(d, SourceUnavailable)
        self.assertEqual(self.reactor.open(), [])

    def test_errorIsNoFallback(self) -> None:
        """A PCP error answer is a PCP answer: SourceError, no NAT-PMP."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        self.gateway.refuse(Result.NO_RESOURCES, 30)
        failure = self.failureResultOf(d, SourceError)
        self.assertIn("out of resources", str(failure.value))
        self.assertEqual(source.name, "pcp")

    def test_unsupportedProtocol(self) -> None:
        """UNSUPP_PROTOCOL and UNSUPP_OPCODE mean SourceUnavailable (exit 3)."""
        for result in (Result.UNSUPP_PROTOCOL, Result.UNSUPP_OPCODE):
            source = self.makeSource(protocol="UDP")
            d = source.fetchOnce()
            self.gateway.refuse(result)
            self.failureResultOf(d, SourceUnavailable)

    def test_unknownResultFatal(self) -> None:
        """An undefined result code for our MAP ends the request."""
        source = self.makeSource(protocol="UDP")
        d = source.fetchOnce()
        request = self.gateway.last()
        data = bytearray(
            encodeResponse(
                MapResponse(OK, 0, 1, request.nonce, "UDP", 1024, 0, "0.0.0.0")
            )
        )
        data[3] = 99
        self.gateway.send(bytes(data))
        self.failureResultOf(d, SourceError)


class DaemonTests(SourceTestCase):
    """PCPSource.start: renewals, error lifetimes, epochs, announcements, stop."""

    def test_renewalSchedule(self) -> None:
        """
        Renew at 1/2-5/8 (67.5 s), again at 3/4, 7/8, 31/32, 63/64 with no
        wait over 8 s; at expiry, a new request on a new socket at once.
        """
        self.started(protocol="UDP", lifetime_secs=120, refresh_secs=300)
        self.gateway.grant(1024)
        self.gateway.requests()
        self.assertEqual(
            self.sendTimes(121.0),
            [67.5, 75.0, 82.5, 90.0, 97.5, 105.0, 112.5, 118.125, 120.0],
        )

    def test_renewalFromAskedLifetime(self) -> None:
        """Granted 120 s for the 60 s asked: renewed within 60 s, expiry at 60 s."""
        self.started(protocol="UDP")
        self.gateway.grant(1024, 120)
        self.gateway.requests()
        self.assertEqual(self.delivered[-1], Forwarded(1024, "pcp", "ttl=60s", 60.0))
        self.assertEqual(self.sendTimes(34.0), [33.75])

    def test_renewalKeepsNonceAndPort(self) -> None:
        """A renewal suggests the granted port with the mapping's nonce."""
        self.started(protocol="UDP", lifetime_secs=120, refresh_secs=300)
        first = self.gateway.grant(1024)
        self.reactor.advance(67.5)
        renewal = self.gateway.grant(1024)
        self.assertEqual((renewal.nonce, renewal.suggestedPort), (first.nonce, 1024))
        self.assertEqual([f.port for f in self.delivered], [1024, 1024])
        self.assertEqual(self.delivered[-1].expires, 67.5 + 120)

    def test_settledNeverFallsBack(self) -> None:
        """Once PCP answered, silence is retried with PCP, never NAT-PMP."""
        source = self.started(protocol="UDP")
        self.gateway.grant(1024)
        self.reactor.pump([1.0] * 300)
        self.assertEqual(source.name, "pcp")
        sockets = [p for p in self.reactor.udpPorts if p.connectedTo == SERVER]
        self.assertGreater(len(sockets), 3)
        for socket in sockets:
            for data in socket.sent:
                self.assertIsInstance(decodeRequest(data), MapRequest)

    def test_errorLifetimeRespected(self) -> None:
        """After NO_RESOURCES with lifetime 30, the request waits 30 s."""
        self.started(protocol="UDP")
        self.gateway.refuse(Result.NO_RESOURCES, 30)
        self.gateway.requests()
        self.assertEqual(self.sendTimes(30.0), [30.0])

    def test_shortErrorLifetime(self) -> None:
        """An error without lifetime is retried on the quick backoff."""
        self.started(protocol="UDP")
        self.gateway.refuse(Result.NETWORK_FAILURE, 0)
        self.gateway.requests()
        self.assertEqual(self.sendTimes(1.0), [1.0])

    def test_epochInvalidRemaps(self) -> None:
        """A restarted gateway's epoch in a renewal's answer remaps at once."""
        self.started(protocol="UDP")
        self.gateway.grant(1024)
        self.reactor.advance(33.75)
        self.gateway.epoch, self.gateway.started = 0, 33.75
        self.gateway.grant(1024)
        self.assertEqual(resets(self.metrics), 1.0)
        self.assertEqual(self.gateway.grant(1024).suggestedPort, 1024)
        self.assertEqual(resets(self.metrics), 1.0)

    def test_epochSteady(self) -> None:
        """Renewals with a steadily advancing epoch are no reset."""
        self.started(protocol="UDP")
        self.gateway.grant(1024)
        for _ in range(5):
            self.reactor.advance(67.5)
            self.gateway.grant(1024)
        self.assertEqual(resets(self.metrics), 0.0)

    def announcementPort(self) -> FakeUDPTransport:
        return next(p for p in self.reactor.open() if p.port == 5350)

    def test_announceOnSocket(self) -> None:
        """An ANNOUNCE with a reset epoch on our socket remaps."""
        self.started(protocol="UDP")
        self.gateway.grant(1024)
        self.gateway.requests()
        self.reactor.advance(10)
        self.gateway.send(encodeResponse(AnnounceResponse(OK, 0, 0)))
        self.assertEqual(self.sendTimes(13.0), [12.5])

    def test_announceOnMulticast(self) -> None:
        """An ANNOUNCE on 224.0.0.1:5350 with a reset epoch remaps."""
        self.started(protocol="UDP")
        self.assertEqual(self.announcementPort().groups, [("224.0.0.1", CLIENT)])
        self.gateway.grant(1024)
        self.gateway.requests()
        self.reactor.advance(10)
        self.announcementPort().protocol.datagramReceived(
            encodeResponse(AnnounceResponse(OK, 0, 0)), SERVER
        )
        self.assertEqual(self.sendTimes(13.0), [12.5])

    def test_unsolicitedMap(self) -> None:
        """An unsolicited MAP moving our mapping (on 5350 too) remaps."""
        self.started(protocol="UDP")
        request = self.gateway.grant(1024)
        self.gateway.requests()
        self.reactor.advance(10)
        moved = MapResponse(
            OK, 120, self.gateway.now(), request.nonce, "UDP", 1024, 2000, "203.0.113.6"
        )
        self.announcementPort().protocol.datagramReceived(encodeResponse(moved), SERVER)
        self.assertEqual(self.sendTimes(13.0), [12.5])

    def test_unsolicitedSame(self) -> None:
        """An unsolicited MAP confirming our mapping changes nothing."""
        self.started(protocol="UDP")
        request = self.gateway.grant(1024)
        self.gateway.requests()
        self.reactor.advance(10)
        self.gateway.answer(request, OK, 1024, 120)
        self.assertEqual(self.sendTimes(20.0), [])

    def test_unsolicitedStranger(self) -> None:
        """An unsolicited MAP for another nonce is dropped."""
        self.started(protocol="UDP")
        request = self.gateway.grant(1024)
        self.gateway.requests()
        other = MapRequest(b"y" * 12, "UDP", 1024, 0, "", 0, "")
        self.gateway.answer(other, OK, 2000, 120)
        self.assertEqual(self.sendTimes(10.0), [])
        self.assertEqual(dropped(self.metrics, "mismatch"), 1)
        self.assertNotEqual(request.nonce, other.nonce)

    def test_releaseSameNonce(self) -> None:
        """release_on_exit deletes each mapping with its nonce and lifetime 0."""
        source = self.started(release_on_exit=True)
        udp = self.gateway.grant(1024)
        tcp = self.gateway.grant(1024)
        self.gateway.requests()
        d = source.stop()
        delete = self.gateway.grant(0, 0)
        self.assertEqual(
            (delete.nonce, delete.lifetime, delete.protocol), (udp.nonce, 0, "UDP")
        )
        delete = self.gateway.grant(0, 0)
        self.assertEqual((delete.nonce, delete.lifetime), (tcp.nonce, 0))
        self.successResultOf(d)
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_releaseGivesUp(self) -> None:
        """A silent gateway holds up stop() for one ~3 s try per mapping."""
        source = self.started(release_on_exit=True, protocol="UDP")
        self.gateway.grant(1024)
        d = source.stop()
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.successResultOf(d)

    def test_stop(self) -> None:
        """stop() closes both sockets, leaves no timer, deletes nothing."""
        source = self.started()
        self.gateway.grant(1024)
        self.gateway.grant(1024)
        socket = self.gateway.socket
        socket.written.clear()
        self.successResultOf(source.stop())
        self.assertEqual(self.reactor.open(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(socket.written, [])

    def test_fallbackInDaemon(self) -> None:
        """The daemon falls back too, and renews with NAT-PMP at half-life."""
        source = self.started(protocol="UDP")
        self.gateway.send(encodeResponse(UnsupportedVersion(0)))
        self.gateway.natpmpGrant(1024)
        self.assertEqual(self.delivered[-1].source, "natpmp")
        self.assertEqual(source.name, "natpmp")
        self.gateway.socket.written.clear()
        self.assertEqual(self.sendTimes(30.0), [30.0])
