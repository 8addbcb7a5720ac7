"""
The gateway source against an emulated gateway (miniupnpd-like or
ProtonVPN-like) under a Clock: converging on a reachable port, outages,
refusals, reboots and network changes, timed.  Run for NAT-PMP here and
for PCP in test_pcp_emulated.
"""

from __future__ import annotations

import itertools

from twisted.internet.defer import succeed
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.config import Config, ConfigError, PortmapConfig
from qbportsync.interfaces import Forwarded, SourceError, SourceTrouble
from qbportsync.metrics import Metrics
from qbportsync.sources import natpmp, pcp
from qbportsync.sources.gateway import GatewayPath
from qbportsync.sources.gatewaysource import (
    NETWORK_SETTLE,
    GatewaySource,
    NATPMPSource,
)
from qbportsync.sources.wire import IPProto, Result
from tests.fakes import FakeNetworkEvents
from tests.fakeudp import (
    GATEWAY,
    SERVER,
    EmulatedGateway,
    FakePaths,
    FakeUDPTransport,
    Mapping,
    MemoryUDPReactor,
    Style,
    dropped,
    path,
)

TUNNEL = "198.51.100.2"
HERE = path(GATEWAY, TUNNEL)


class MovingGateway(EmulatedGateway):
    """A gateway that grants a new external port on every request."""

    def _map(
        self,
        client: str,
        protocol: IPProto,
        internal: int,
        suggested: int,
        lifetime: int,
        nonce: bytes,
    ) -> tuple[Result, int, int]:
        if lifetime == 0:
            return Result.SUCCESS, 0, 0
        port = 2000 + len(self.heard)
        expires = self.reactor.seconds() + lifetime
        self.mappings[(protocol, port)] = Mapping(client, internal, expires)
        return Result.SUCCESS, port, lifetime


class NATPMPEmulatedTests(SynchronousTestCase):
    """NAT-PMP against the emulated gateway; the PCP tests subclass this."""

    method = "natpmp"

    def makeSource(
        self,
        style: Style = "miniupnpd",
        allowed: tuple[int, int] = (1024, 65535),
        sinkPort: int = 51413,
        gatewayClass: type[EmulatedGateway] = EmulatedGateway,
        route: GatewayPath | Exception = HERE,
        **portmap: object,
    ) -> GatewaySource:
        self.reactor = MemoryUDPReactor()
        self.metrics = Metrics.create()
        self.gateway = gatewayClass(self.reactor, style, allowed)
        self.paths = FakePaths(route)
        self.events = FakeNetworkEvents()
        self.delivered: list[Forwarded | SourceTrouble] = []
        return self.sourceClass()(
            self.reactor,
            Config(portmap=PortmapConfig(**portmap)),  # type: ignore[arg-type]
            self.metrics,
            lambda: succeed(sinkPort),
            networkEvents=self.events,
            resolvePath=self.paths.resolve,
            random=lambda: 0.5,
        )

    def sourceClass(self) -> type[GatewaySource]:
        return NATPMPSource

    def started(self, **kwargs: object) -> GatewaySource:
        return self.start(self.makeSource(**kwargs))  # type: ignore[arg-type]

    def start(self, source: GatewaySource) -> GatewaySource:
        source.start(self.delivered.append)
        self.addCleanup(source.stop)
        return source

    def ports(self) -> list[int]:
        return [f.port for f in self.delivered if isinstance(f, Forwarded)]

    def troubles(self) -> list[SourceTrouble]:
        return [f for f in self.delivered if isinstance(f, SourceTrouble)]

    def reachable(self) -> bool:
        """The last port delivered is where a peer beyond the gateway lands."""
        last = self.delivered[-1] if self.delivered else None
        return isinstance(last, Forwarded) and self.gateway.reachable(last.port)

    def letPass(self, seconds: float) -> None:
        """Let C{seconds} pass, one timed call after another."""
        end = self.reactor.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.reactor.getDelayedCalls()]
            step = min([*due, end]) - self.reactor.seconds()
            self.reactor.advance(max(0.0, step))
            if self.reactor.seconds() >= end:
                return

    def untilReachable(self, limit: float) -> float:
        """
        Seconds until L{reachable}, moving the clock from one timed call to
        the next; fails the test after C{limit}.
        """
        started = self.reactor.seconds()
        while not self.reachable():
            calls = self.reactor.getDelayedCalls()
            if not calls:
                self.fail("nothing left to happen")
            due = min(call.getTime() for call in calls)
            if due - started > limit:
                self.fail(f"not reachable within {limit} s")
            self.reactor.advance(max(0.0, due - self.reactor.seconds()))
        return round(self.reactor.seconds() - started, 3)

    def socket(self) -> FakeUDPTransport:
        return next(p for p in self.reactor.open() if p.connectedTo == SERVER)

    def announcementPort(self) -> FakeUDPTransport:
        return next(p for p in self.reactor.open() if p.port == 5350)

    def sentBetween(self, start: float, end: float) -> int:
        return sum(1 for at, _, _ in self.gateway.heard if start <= at < end)

    def test_converges(self) -> None:
        """Granted 1024 for internal 51413: 1024 mapped to 1024, and delivered."""
        self.started(allowed=(1024, 2000))
        elapsed = self.untilReachable(5)
        self.assertEqual(self.ports(), [1024])
        self.assertEqual(self.gateway.forwards("TCP", 1024), 1024)
        self.assertEqual(self.gateway.forwards("UDP", 1024), 1024)
        self.assertLess(elapsed, 0.1)
        # Nothing left over: the 1024 -> 51413 mappings were deleted.
        self.assertEqual(sorted(self.gateway.mappings), [("TCP", 1024), ("UDP", 1024)])

    def test_convergedRenewals(self) -> None:
        """Once converged, renewals keep internal = external = 1024."""
        self.started(allowed=(1024, 2000))
        self.untilReachable(5)
        self.letPass(200)
        self.assertTrue(self.reachable())
        self.assertEqual(set(self.ports()), {1024})

    def test_proton(self) -> None:
        """ProtonVPN-style (X forwards to X): converges at the first remap."""
        self.started(style="proton")
        elapsed = self.untilReachable(5)
        self.assertEqual(self.ports(), [40000])
        self.assertLess(elapsed, 0.1)
        self.letPass(300)
        self.assertTrue(self.reachable())
        self.assertEqual(set(self.ports()), {40000})

    def test_keepsMoving(self) -> None:
        """A gateway that never forwards X to X: a permanent trouble, no port."""
        self.started(gatewayClass=MovingGateway)
        gateway = self.gateway
        self.letPass(1)
        (trouble,) = self.troubles()
        self.assertTrue(trouble.permanent)
        self.assertIn("never forwarded", trouble.cause)
        self.assertEqual(self.ports(), [])
        sent = len(gateway.heard)
        self.letPass(50)
        self.assertEqual(len(gateway.heard), sent)

    def test_silentOutage(self) -> None:
        """
        Silent for 3 minutes: a trouble once the lease ends, a few datagrams
        a minute, and reachable again within 10 s of the gateway's return.
        """
        self.started()
        self.untilReachable(5)
        self.letPass(10)
        self.gateway.up = False
        down = self.reactor.seconds()
        self.letPass(180)
        perMinute = self.sentBetween(down + 60, down + 180) / 2
        self.assertLessEqual(perMinute, 16)
        self.assertGreaterEqual(perMinute, 6)
        self.assertEqual(len({t.cause for t in self.troubles()}), 1)
        worst = 0.0
        for offset in [n / 4 for n in range(40)]:
            self.gateway.up = False
            self.letPass(30 + offset)
            self.gateway.reboot()
            self.gateway.up = True
            worst = max(worst, self.untilReachable(10))
        print(
            f"\n{self.method} silent outage: {perMinute} datagrams a minute; "
            f"back within {worst} s (worst of 40 return times)"
        )
        self.assertLessEqual(worst, 10)

    def test_refusingGateway(self) -> None:
        """
        ICMP port unreachable (the socket closed under us): one trouble,
        retried on a new socket every 1, 2, 4, 8, 8 s, then mapped at once.
        """
        source = self.makeSource()
        self.gateway.refusing = True
        self.start(source)
        self.letPass(60)
        causes = {t.cause for t in self.troubles()}
        self.assertEqual(len(causes), 1)
        self.assertIn("ICMP port unreachable", causes.pop())
        times = [at for at, _, _ in self.gateway.heard]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
        self.assertLessEqual(max(gaps), 9.6 + 0.01)
        self.assertGreater(len(self.reactor.udpPorts), 5)
        self.assertLessEqual(len(self.reactor.open()), 2)
        self.gateway.refusing = False
        elapsed = self.untilReachable(10)
        print(f"\n{self.method} refusing gateway answers: reachable in {elapsed} s")

    def test_rebootAnnounced(self) -> None:
        """A reboot with an announcement: remapped after the random 2.5 s."""
        self.started()
        self.untilReachable(5)
        self.letPass(10)
        self.gateway.reboot()
        self.assertFalse(self.reachable())
        listener = self.announcementPort().protocol
        listener.datagramReceived(
            pcp.encodeResponse(pcp.AnnounceResponse(Result.SUCCESS, 0, 0)), SERVER
        )
        elapsed = self.untilReachable(6)
        self.assertEqual(elapsed, 2.5)
        # Counted once, and no second remap when the answers show it too.
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "qb_port_sync_gateway_epoch_resets_total"
            ),
            1.0,
        )
        sent = len(self.gateway.heard)
        self.letPass(5)
        self.assertEqual(len(self.gateway.heard), sent)

    def test_vpnUpAfterDaemon(self) -> None:
        """No route at start; the network event that brings one maps within 1.1 s."""
        self.started(route=SourceError("no route to the internet; is the VPN up?"))
        self.letPass(100)
        self.assertEqual(self.ports(), [])
        (cause,) = {t.cause for t in self.troubles()}
        self.assertIn("is the VPN up?", cause)
        self.assertFalse(any(t.permanent for t in self.troubles()))
        self.paths.current = path(GATEWAY, TUNNEL)
        self.events.announce("link", "wg0")
        elapsed = self.untilReachable(5)
        self.assertLessEqual(elapsed, 1.1)
        print(f"\n{self.method} VPN up after the daemon: reachable in {elapsed} s")

    def test_vpnUpWithoutEvents(self) -> None:
        """Without network events, a missing route is asked again every 8 s at most."""
        self.started(route=SourceError("no route"))
        self.letPass(100)
        self.paths.current = path(GATEWAY, TUNNEL)
        self.assertLessEqual(self.untilReachable(10), 9.6)

    def test_newGateway(self) -> None:
        """A new gateway on a new path: asked from the new address within 1.1 s."""
        self.started()
        self.untilReachable(5)
        other = EmulatedGateway(self.reactor, address="198.51.100.9")
        self.paths.current = path("198.51.100.9", "198.51.100.3")
        self.gateway = other
        self.events.announce("route", "wg0")
        self.assertLessEqual(self.untilReachable(5), 1.1)
        (socket,) = [p for p in self.reactor.open() if p.connectedTo]
        self.assertEqual(
            (socket.connectedTo, socket.interface),
            (("198.51.100.9", 5351), "198.51.100.3"),
        )

    def test_newTunnelAddress(self) -> None:
        """A new tunnel address: a new socket from it, mapped within 1.1 s."""
        self.started()
        self.untilReachable(5)
        old = self.socket()
        self.letPass(5)
        changed = self.reactor.seconds()
        self.paths.current = path(GATEWAY, "198.51.100.3")
        self.gateway.mappings.clear()
        self.events.announce("address", "wg0")
        self.events.announce("route", "wg0")
        elapsed = self.untilReachable(5)
        self.assertFalse(old.listening)
        self.assertEqual(self.socket().interface, "198.51.100.3")
        clients = {client for at, client, _ in self.gateway.heard if at >= changed}
        self.assertEqual(clients, {"198.51.100.3"})
        self.assertLessEqual(elapsed, 1.1)
        print(f"\n{self.method} new tunnel address: reachable in {elapsed} s")

    def test_addressGoneBeforeBind(self) -> None:
        """An address gone between lookup and bind: a passing trouble, then mapped."""
        source = self.makeSource(route=path(GATEWAY, "198.51.100.7"))
        self.reactor.missing.add("198.51.100.7")
        self.start(source)
        (trouble,) = self.troubles()
        self.assertIn("cannot open a socket from 198.51.100.7", trouble.cause)
        self.assertFalse(trouble.permanent)
        self.reactor.missing.clear()
        self.assertLessEqual(self.untilReachable(2), 1.01)

    def test_oneShotAddressGone(self) -> None:
        """The one-shot fails with SourceError (exit 1) when it cannot bind."""
        source = self.makeSource(route=path(GATEWAY, "198.51.100.7"))
        self.reactor.missing.add("198.51.100.7")
        self.failureResultOf(source.fetchOnce(), SourceError)

    def test_quietNetworkEvent(self) -> None:
        """A network event that changes nothing on our path sends nothing."""
        self.started()
        self.untilReachable(5)
        sent = len(self.gateway.heard)
        self.events.announce("link", "docker0")
        self.letPass(2)
        self.assertEqual(len(self.gateway.heard), sent)

    def test_networkEventsDebounced(self) -> None:
        """A burst of network events looks at the path once."""
        self.started()
        self.untilReachable(5)
        asked = self.paths.asked
        for _ in range(50):
            self.events.announce("route", "wg0")
        self.letPass(2)
        self.assertEqual(self.paths.asked, asked + 1)

    def test_notAuthorized(self) -> None:
        """Refused by principle: one permanent trouble, asked again after minutes."""
        source = self.makeSource()
        self.gateway.refusal = Result.NOT_AUTHORIZED
        self.start(source)
        self.letPass(400)
        (cause,) = {t.cause for t in self.troubles()}
        self.assertIn("not authorized", cause.lower())
        self.assertTrue(all(t.permanent for t in self.troubles()))
        times = sorted({round(at) for at, _, _ in self.gateway.heard})
        self.assertEqual(times, [0, 60, 180])
        self.gateway.refusal = None
        self.events.announce("route", "wg0")
        self.letPass(NETWORK_SETTLE)
        self.assertLess(self.untilReachable(1), 0.01)

    def test_configErrorPermanent(self) -> None:
        """No gateway on the VPN route: a permanent trouble naming the fix."""
        self.started(route=ConfigError('no gateway; set gateway = "10.2.0.1"'))
        self.letPass(200)
        self.assertEqual(self.paths.asked, 3)
        (cause,) = {t.cause for t in self.troubles()}
        self.assertIn('gateway = "10.2.0.1"', cause)
        self.assertTrue(all(t.permanent for t in self.troubles()))
        # The network changes: asked again at once.
        self.paths.current = path(GATEWAY, TUNNEL)
        self.events.announce("route", "wg0")
        self.untilReachable(2)

    def test_logsOnce(self) -> None:
        """A long refusal logs nothing above info: PortSync warns once per cause."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        source = self.makeSource()
        self.gateway.refusing = True
        self.start(source)
        self.letPass(300)
        loud = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(loud, [])

    def test_announcementFromStranger(self) -> None:
        """Announcements from another host cannot make us remap."""
        self.started()
        self.untilReachable(5)
        sent = len(self.gateway.heard)
        listener = self.announcementPort().protocol
        for sender in (("198.51.100.66", 5351), (GATEWAY, 5350)):
            listener.datagramReceived(
                natpmp.encodeResponse(
                    natpmp.ExternalAddressResponse(Result.SUCCESS, 0, "203.0.113.9")
                ),
                sender,
            )
        self.letPass(6)
        self.assertEqual(len(self.gateway.heard), sent)
        self.assertEqual(dropped(self.metrics, "stranger"), 2)
