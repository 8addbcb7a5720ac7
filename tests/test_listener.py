"""
Tests for L{qbportsync.listener}: the TCP-connect probe and the healing of
a listener that refuses connections, driven by a Clock.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from qbportsync.listener import (
    PROBE_TIMEOUT_SECS,
    SETTLE_SECS,
    SETTLE_TRIES,
    ListenerCheck,
    ListenerHealer,
    interfaceAddress,
    probeListener,
)
from qbportsync.metrics import Metrics
from qbportsync.qbittorrent import QBittorrentError

from .fakes import FakeSink


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class ProbeTests(SynchronousTestCase):
    """probeListener: a completed TCP handshake, nothing less."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.result = probeListener(self.reactor, "10.2.0.2", 40000)
        host, port, self.factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("10.2.0.2", 40000, PROBE_TIMEOUT_SECS))

    def test_connected(self) -> None:
        """A completed connection is True, and is closed at once."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.2.0.2", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(self.successResultOf(self.result), True)
        self.assertTrue(transport.disconnecting)

    def test_refused(self) -> None:
        """A refused connection is False."""
        connector = self.reactor.connectors[-1]
        self.factory.clientConnectionFailed(
            connector, Failure(ConnectionRefusedError())
        )
        self.assertIs(self.successResultOf(self.result), False)

    def test_timeout(self) -> None:
        """No answer within the timeout is False; the attempt is stopped."""
        self.reactor.advance(PROBE_TIMEOUT_SECS - 0.1)
        self.assertNoResult(self.result)
        self.reactor.advance(0.1)
        self.assertIs(self.successResultOf(self.result), False)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)


class RealProbeTests(TestCase):
    """probeListener against real sockets on the loopback."""

    def test_listeningAndClosed(self) -> None:
        """True while a port listens on 127.0.0.1, False once it is closed."""
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        number = port.getHost().port

        async def check() -> None:
            self.assertIs(await probeListener(reactor, "127.0.0.1", number), True)
            await port.stopListening()
            self.assertIs(await probeListener(reactor, "127.0.0.1", number), False)

        return Deferred.fromCoroutine(check())  # type: ignore[return-value]


class InterfaceAddressTests(SynchronousTestCase):
    """interfaceAddress reads an interface's IPv4 address from the kernel."""

    def test_loopback(self) -> None:
        """The loopback interface has 127.0.0.1."""
        self.assertEqual(interfaceAddress("lo"), "127.0.0.1")

    def test_missing(self) -> None:
        """An interface that does not exist, or an impossible name, is None."""
        for name in ["qbps-missing0", "", "x" * 16]:
            self.assertIsNone(interfaceAddress(name), name)


class ScriptedProbe:
    """Answers each probe with the next scripted result; logs the calls."""

    def __init__(self, results: Iterable[bool]) -> None:
        self.results = list(results)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, address: str, port: int) -> Deferred[bool]:
        self.calls.append((address, port))
        return succeed(self.results.pop(0))


class HealerTests(SynchronousTestCase):
    """ListenerHealer: check, heal the least disruptive way, say it once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = FakeSink()
        self.metrics = Metrics.create()
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def healer(
        self,
        probe: ScriptedProbe,
        check: str = "auto",
        bindInterface: str = "wg0",
        addresses: dict[str, str] | None = None,
    ) -> ListenerHealer:
        known = {"wg0": "10.2.0.2"} if addresses is None else addresses
        return ListenerHealer(
            self.clock,
            self.sink,
            self.metrics,
            bindInterface=bindInterface,
            check=check,
            probe=probe,
            addressOf=known.get,
            rnd=lambda: 0.5,
        )

    def relistened(self, how: str) -> None:
        """The sink's last relisten was C{how}; let it succeed."""
        port, address, actual, d = self.sink.relistens[-1]
        self.assertEqual((port, address, actual), (40000, "10.2.0.2", how))
        d.callback(None)

    def settle(self, tries: int) -> None:
        """Let C{tries} settle-and-connect rounds pass."""
        for _ in range(tries):
            self.clock.advance(SETTLE_SECS)

    def logged(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == level]

    def test_listening(self) -> None:
        """A listener that accepts is left alone."""
        probe = ScriptedProbe([True])
        result = self.successResultOf(self.healer(probe).check(40000, "test"))
        self.assertEqual(result, ListenerCheck("10.2.0.2", 40000, listening=True))
        self.assertEqual(probe.calls, [("10.2.0.2", 40000)])
        self.assertEqual(self.sink.relistens, [])
        self.assertEqual(sample(self.metrics, "qb_port_sync_listener_dead_total"), 0)

    def test_healedByAddress(self) -> None:
        """
        A refusing listener is re-bound to its address first, judged by a
        new connect; counted, and told in one line naming the trigger.
        """
        probe = ScriptedProbe([False, True])
        d = self.healer(probe).check(40000, "network interface wg0 changed")
        self.relistened("address")
        self.assertNoResult(d)
        self.clock.advance(SETTLE_SECS)
        self.assertEqual(
            self.successResultOf(d),
            ListenerCheck("10.2.0.2", 40000, listening=True, healedBy="address"),
        )
        self.assertEqual(len(self.sink.relistens), 1)
        self.assertEqual(sample(self.metrics, "qb_port_sync_listener_dead_total"), 1)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_listener_heals_total", method="address"),
            1,
        )
        [line] = self.logged(LogLevel.info)
        self.assertEqual(
            line,
            "qBittorrent refused connections on 10.2.0.2:40000 (network interface "
            "wg0 changed): made it listen again by re-binding its listening "
            "address in 0.5 s",
        )
        self.assertEqual(self.logged(LogLevel.warn), [])

    def test_escalatesToPort(self) -> None:
        """When re-binding the address does not take, the port moves and back."""
        probe = ScriptedProbe([False] + [False] * SETTLE_TRIES + [True])
        d = self.healer(probe).check(40000, "periodic check")
        self.relistened("address")
        self.settle(SETTLE_TRIES)
        self.relistened("port")
        self.clock.advance(SETTLE_SECS)
        self.assertEqual(self.successResultOf(d).healedBy, "port")
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_listener_heals_total", method="port"), 1
        )
        self.assertEqual(len(self.logged(LogLevel.info)), 1)

    def test_neitherHealsWarnsOnceAndWaits(self) -> None:
        """
        When nothing heals it: one warning, no heal again before the backoff
        wait (connects still tell), then it tries again without a warning.
        """
        failing = [False] * (1 + 2 * SETTLE_TRIES)
        probe = ScriptedProbe([*failing, False, *failing])
        healer = self.healer(probe)
        d = healer.check(40000, "periodic check")
        self.relistened("address")
        self.settle(SETTLE_TRIES)
        self.relistened("port")
        self.settle(SETTLE_TRIES)
        self.assertIs(self.successResultOf(d).listening, False)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)
        self.assertIn("trying again in 10 s", self.logged(LogLevel.warn)[0])
        self.assertIn("check_listener", self.logged(LogLevel.warn)[0])
        self.clock.advance(5)
        self.assertIs(
            self.successResultOf(healer.check(40000, "periodic check")).listening,
            False,
        )
        self.assertEqual(len(self.sink.relistens), 2)
        self.clock.advance(5)
        healer.check(40000, "periodic check")
        self.assertEqual(len(self.sink.relistens), 3)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)

    def test_relistenFailure(self) -> None:
        """qBittorrent failing the heal's request fails the check."""
        probe = ScriptedProbe([False])
        d = self.healer(probe).check(40000, "test")
        self.sink.relistens[-1][3].errback(QBittorrentError("timed out"))
        self.failureResultOf(d, QBittorrentError)

    def test_targets(self) -> None:
        """Which address is connected to, by check_listener and bind_interface."""
        for check, bindInterface, expected in [
            ("auto", "wg0", "10.2.0.2"),
            ("auto", "", None),
            ("auto", "tun0", None),
            ("off", "wg0", None),
            ("192.0.2.7", "", "192.0.2.7"),
        ]:
            healer = self.healer(ScriptedProbe([]), check, bindInterface)
            self.assertEqual(healer.target(), expected, (check, bindInterface))

    def test_nothingToCheck(self) -> None:
        """Without an address to connect to, the check says None, probes nothing."""
        probe = ScriptedProbe([])
        healer = self.healer(probe, check="off")
        self.assertIsNone(self.successResultOf(healer.check(40000, "test")))
        self.assertEqual(probe.calls, [])
