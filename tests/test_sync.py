"""Tests for L{qbportsync.sync}: the PortSync service, driven by a Clock."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import (
    LogEvent,
    LogLevel,
    capturedLogs,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qbportsync.interfaces import (
    ApplyResult,
    INetworkEvents,
    IPortSink,
    IPortSource,
    NetworkChange,
    SourceTrouble,
)
from qbportsync.listener import SETTLE_SECS, ListenerHealer
from qbportsync.metrics import Metrics
from qbportsync.qbittorrent import LoginRefused, QBittorrentError
from qbportsync.status import SyncStatus, isHealthy, statusDocument, unhealthyReason
from qbportsync.sync import (
    CONTEST_CAP_SECS,
    CONTEST_FIRST_SECS,
    CONTEST_QUIET_SECS,
    NETWORK_SETTLE_SECS,
    RESTORE_SPACING_SECS,
    PortSync,
)

from .fakes import FakeSink, FakeSource


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class SyncTestsMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.sink = FakeSink()
        self.metrics = Metrics.create()
        self.statuses: list[SyncStatus] = []
        self.sync = PortSync(
            self.clock,
            self.source,
            self.sink,
            self.metrics,
            bindInterface="wg0",
            verifyInterval=30.0,
            rnd=lambda: 0.5,
            onStatus=self.statuses.append,
        )
        self.sync.startService()


class ApplyTests(SyncTestsMixin, SynchronousTestCase):
    def test_fakesProvideInterfaces(self) -> None:
        """The fakes used here provide the interfaces PortSync relies on."""
        self.assertTrue(verifyObject(IPortSource, self.source))
        self.assertTrue(verifyObject(IPortSink, self.sink))

    def test_firstPortAppliedAtOnce(self) -> None:
        """A port from the source goes to qBittorrent with no delay."""
        self.source.emit(40000)
        self.assertEqual([(p, i) for p, i, _ in self.sink.applies], [(40000, "wg0")])

    def test_successUpdatesStatusAndMetrics(self) -> None:
        """A verified change is counted, timestamped and reported in the status."""
        self.clock.advance(100)
        self.source.emit(40000)
        self.sink.succeed()
        status = self.sync.status
        self.assertEqual(
            (status.source_port, status.applied_port, status.verified),
            (40000, 40000, True),
        )
        self.assertEqual(status.last_success, 100.0)
        self.assertEqual(sample(self.metrics, "qb_port_sync_port_updates_total"), 1)
        self.assertEqual(sample(self.metrics, "qb_port_sync_current_port"), 40000)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_last_update_timestamp_seconds"), 100
        )
        self.assertEqual(self.statuses[-1], status)

    def test_samePortNotAppliedTwice(self) -> None:
        """The source repeating the port it already gave changes nothing."""
        self.source.emit(40000)
        self.sink.succeed()
        self.source.emit(40000)
        self.assertEqual(len(self.sink.applies), 1)

    def test_latestPortWins(self) -> None:
        """Ports arriving during an update coalesce: only the latest follows."""
        self.source.emit(40000)
        self.source.emit(40001)
        self.source.emit(40002)
        self.assertEqual(len(self.sink.applies), 1)
        self.sink.succeed(0)
        self.assertEqual([p for p, _, _ in self.sink.applies], [40000, 40002])
        self.sink.succeed(1)
        self.assertEqual(self.sync.status.applied_port, 40002)
        self.assertEqual(len(self.sink.applies), 2)

    def test_unchangedNotCountedAsUpdate(self) -> None:
        """When qBittorrent already had the port, no update is counted."""
        self.sink.port = 40000
        self.source.emit(40000)
        self.sink.succeed()
        self.assertEqual(sample(self.metrics, "qb_port_sync_port_updates_total"), 0)
        self.assertTrue(self.sync.status.verified)

    def test_whenFirstAttempted(self) -> None:
        """Readiness waits for the first update to end, success or failure."""
        d = self.sync.whenFirstAttempted()
        self.source.emit(40000)
        self.assertNoResult(d)
        self.sink.applies[-1][2].errback(QBittorrentError("refused"))
        self.successResultOf(d)
        self.successResultOf(self.sync.whenFirstAttempted())

    def test_leaseExpiryRecorded(self) -> None:
        """A lease's end time reaches the status and the metric."""
        self.clock.advance(100)
        self.source.emit(40000, expires=160.0)
        self.assertEqual(self.sync.status.lease_expires, 160.0)
        self.assertEqual(self.sync.status.lease_lifetime, 60.0)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_lease_expiry_timestamp_seconds"), 160
        )


class RetryTests(SyncTestsMixin, SynchronousTestCase):
    def failApply(self, index: int = -1) -> None:
        self.sink.applies[index][2].errback(QBittorrentError("connection refused"))

    def test_retryBacksOffFromOneSecond(self) -> None:
        """Failures are retried after 1, 2, 4, 8 ... seconds."""
        self.source.emit(40000)
        delays = []
        for _ in range(4):
            self.failApply()
            before = len(self.sink.applies)
            waited = 0.0
            while len(self.sink.applies) == before:
                self.clock.advance(0.25)
                waited += 0.25
                self.assertLess(waited, 100)
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0])

    def test_failureRecorded(self) -> None:
        """A failure is counted by kind and makes the status unhealthy."""
        self.source.emit(40000)
        self.failApply()
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_errors_total", kind="qbittorrent"), 1
        )
        self.assertEqual(sample(self.metrics, "qb_port_sync_qbittorrent_up"), 0)
        self.assertTrue(self.sync.status.last_attempt_failed)
        self.assertIn("connection refused", self.sync.status.last_error or "")

    def test_newPortDuringBackoffTriedAtOnce(self) -> None:
        """A new port does not wait for the retry of the old one."""
        self.source.emit(40000)
        self.failApply()
        self.source.emit(40001)
        self.assertEqual([p for p, _, _ in self.sink.applies], [40000, 40001])
        self.sink.succeed()
        self.clock.advance(10)
        self.assertEqual(len(self.sink.applies), 2)

    def test_successResetsBackoff(self) -> None:
        """After a success the next failure waits one second again."""
        self.source.emit(40000)
        self.failApply()
        self.clock.advance(1)
        self.failApply()
        self.clock.advance(2)
        self.sink.succeed()
        self.source.emit(40001)
        self.failApply()
        self.clock.advance(1)
        self.assertEqual(self.sink.applies[-1][0], 40001)
        self.assertEqual(len(self.sink.applies), 5)

    def test_loginRefusedWaitsUntilAllowed(self) -> None:
        """A refused login is retried only once the client may log in again."""
        self.source.emit(40000)
        self.sink.applies[-1][2].errback(
            LoginRefused("wrong credentials", reason="credentials", retryAt=600.0)
        )
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_errors_total", kind="auth"), 1
        )
        self.clock.advance(599)
        self.assertEqual(len(self.sink.applies), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.sink.applies), 2)

    def test_loginGivenUpNotRetried(self) -> None:
        """When the client has given up logging in, no retry is scheduled."""
        self.source.emit(40000)
        self.sink.applies[-1][2].errback(
            LoginRefused("refused 3 times", reason="credentials", retryAt=math.inf)
        )
        self.clock.advance(24 * 3600)
        self.assertEqual(len(self.sink.applies), 1)
        self.assertTrue(self.sync.status.last_attempt_failed)

    def test_newRefusalLoggedOnce(self) -> None:
        """A login refusal is logged, as an error, only the first time it is seen."""
        with capturedLogs() as events:
            for new in (True, False):
                self.source.emit(40000 + new)
                self.sink.applies[-1][2].errback(
                    LoginRefused("wrong password", "credentials", 600.0, new)
                )
                self.clock.advance(600)
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual([formatEvent(e) for e in errors], ["wrong password"])

    def test_unverifiedIsRetried(self) -> None:
        """
        qBittorrent not keeping the port is a failure and a tug-of-war: it is
        retried after the first contest wait, not at once.
        """
        self.source.emit(40000)
        self.sink.succeed(verified=False)
        self.assertTrue(self.sync.status.last_attempt_failed)
        self.assertTrue(self.sync.status.contested)
        self.clock.advance(CONTEST_FIRST_SECS - 0.1)
        self.assertEqual(len(self.sink.applies), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.sink.applies), 2)

    def test_portDuringApplyNotHeldBack(self) -> None:
        """
        A port that comes while another is being applied goes next, at
        once, whatever the other's outcome: it is not held back by the
        wait that outcome would start (a tug-of-war's, a failure's).
        """
        outcomes: list[Callable[[], None]] = [
            lambda: self.sink.succeed(verified=False),
            lambda: self.sink.applies[-1][2].errback(QBittorrentError("boom")),
        ]
        for port, outcome in enumerate(outcomes, 40000):
            self.source.emit(port)
            self.source.emit(port + 100)
            outcome()
            self.assertEqual(self.sink.applies[-1][0], port + 100)
            self.sink.succeed()
            self.assertEqual(self.sync.status.applied_port, port + 100)

    def test_stopCancelsAndStops(self) -> None:
        """Stopping cancels the request in flight, stops the source, no retry."""
        self.source.emit(40000)
        self.successResultOf(self.sync.stopService())
        self.assertEqual(self.sink.cancelled, [40000])
        self.assertTrue(self.source.stopped)
        self.clock.advance(3600)
        self.assertEqual(len(self.sink.applies), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DriftTests(SyncTestsMixin, SynchronousTestCase):
    def settle(self, port: int = 40000) -> None:
        self.source.emit(port)
        self.sink.succeed()

    def test_driftRestored(self) -> None:
        """A port changed behind our back is set back at the next check."""
        self.settle()
        self.clock.advance(30)
        self.assertEqual(len(self.sink.checks), 1)
        self.sink.checks[-1].callback(6881)
        self.assertEqual([p for p, _, _ in self.sink.applies], [40000, 40000])
        self.assertFalse(self.sync.status.verified)

    def test_noDriftNoApply(self) -> None:
        """When qBittorrent still has our port, checks change nothing."""
        self.settle()
        for _ in range(3):
            self.clock.advance(30)
            self.sink.checks[-1].callback(40000)
        self.assertEqual(len(self.sink.checks), 3)
        self.assertEqual(len(self.sink.applies), 1)

    def test_checkFailureKeepsChecking(self) -> None:
        """An unreachable qBittorrent is recorded and checked again later."""
        self.settle()
        self.clock.advance(30)
        self.sink.checks[-1].errback(QBittorrentError("timed out"))
        self.assertEqual(sample(self.metrics, "qb_port_sync_qbittorrent_up"), 0)
        self.clock.advance(30)
        self.assertEqual(len(self.sink.checks), 2)

    def test_outageLoggedOnceAndHealed(self) -> None:
        """
        An unreachable qBittorrent is warned about once per outage; when it
        answers again with our port, the status is healthy again.
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.settle()
        for _ in range(3):
            self.clock.advance(30)
            self.sink.checks[-1].errback(QBittorrentError("connection refused"))
        self.assertTrue(self.sync.status.last_attempt_failed)
        self.clock.advance(30)
        self.sink.checks[-1].callback(40000)
        self.assertFalse(self.sync.status.last_attempt_failed)
        self.assertTrue(isHealthy(self.sync.status, self.clock.seconds()))
        warnings = [
            e
            for e in events
            if e["log_level"] == LogLevel.warn and "check" in e["log_format"]
        ]
        self.assertEqual(len(warnings), 1)
        self.assertIn("answers again", [e["log_format"] for e in events][-1])

    def test_sourceTroubleIsVisibleUntilAPortArrives(self) -> None:
        """A source's trouble makes the daemon unhealthy and is logged once."""
        self.source.emit(51413)
        self.sink.succeed()
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        trouble = SourceTrouble(cause="cannot read the port file", kind="file")
        self.clock.advance(5)
        assert self.source.deliver is not None
        self.source.deliver(trouble)
        self.source.deliver(trouble)
        status = self.sync.status
        self.assertEqual(status.source_trouble, "cannot read the port file")
        self.assertEqual(status.source_trouble_since, 5)
        self.assertFalse(isHealthy(status, self.clock.seconds()))
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_errors_total", kind="file"), 1
        )
        warned = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warned), 1)
        self.source.emit(51413)
        self.assertIsNone(self.sync.status.source_trouble)
        self.assertTrue(isHealthy(self.sync.status, self.clock.seconds()))

    def test_noCheckBeforeFirstPort(self) -> None:
        """Nothing is checked while no port is known."""
        self.clock.advance(300)
        self.assertEqual(self.sink.checks, [])


class HealthRaceTests(SyncTestsMixin, SynchronousTestCase):
    """/healthz never says 200 while the port the source wants is unapplied."""

    def settle(self, port: int = 40000) -> None:
        self.source.emit(port)
        self.sink.succeed()

    def healthy(self) -> bool:
        return isHealthy(self.sync.status, self.clock.seconds())

    def test_checkInFlightKeepsFailedApplysError(self) -> None:
        """A drift check begun before a failed apply cannot clear its error."""
        self.settle(40000)
        self.clock.advance(30)
        check = self.sink.checks[-1]
        self.source.emit(40001)
        self.sink.applies[-1][2].errback(QBittorrentError("connection refused"))
        check.callback(40000)
        status = self.sync.status
        self.assertTrue(status.last_attempt_failed)
        self.assertIn("connection refused", status.last_error or "")
        self.assertFalse(self.healthy())

    def test_checkAfterOutageKeepsFailedApplysError(self) -> None:
        """
        After an outage, a check that answers with the old port while a new
        port's apply has failed leaves the daemon unhealthy.
        """
        self.settle(40000)
        self.clock.advance(30)
        self.sink.checks[-1].errback(QBittorrentError("timed out"))
        self.clock.advance(30)
        check = self.sink.checks[-1]
        self.source.emit(40001)
        self.sink.applies[-1][2].errback(QBittorrentError("timed out"))
        check.callback(40000)
        self.assertTrue(self.sync.status.last_attempt_failed)
        self.assertFalse(self.healthy())

    def test_unhealthyWhileNewPortApplying(self) -> None:
        """Between a new port's arrival and its verified apply, unhealthy."""
        self.settle(40000)
        self.assertTrue(self.healthy())
        self.source.emit(40001)
        self.assertFalse(self.healthy())
        self.sink.succeed()
        self.assertTrue(self.healthy())

    def test_unhealthyWhileNewPortWaitsForRetry(self) -> None:
        """A new port whose apply must wait for a login retry: unhealthy."""
        self.settle(40000)
        self.source.emit(40001)
        self.sink.applies[-1][2].errback(
            LoginRefused("wrong credentials", reason="credentials", retryAt=600.0)
        )
        self.clock.advance(30)
        self.assertEqual(self.sink.checks, [])
        self.assertFalse(self.healthy())
        self.assertEqual(
            unhealthyReason(self.sync.status, self.clock.seconds()),
            "port 40001 is not applied to qBittorrent yet",
        )

    def test_staleCheckDoesNotRestore(self) -> None:
        """A check answered after a new port was applied sets nothing back."""
        self.settle(40000)
        self.clock.advance(30)
        check = self.sink.checks[-1]
        self.source.emit(40001)
        self.sink.succeed()
        check.callback(40000)
        self.assertEqual([p for p, _, _ in self.sink.applies], [40000, 40001])
        self.assertTrue(self.healthy())


@implementer(IPortSink)
class ContestedSink:
    """
    qBittorrent with a rival writer that sets its own port every
    C{period} seconds; answers at once and logs the time and request count
    of each call (an apply is at most four Web API requests, a check one).
    """

    def __init__(
        self, clock: Clock, period: float, rival: int = 6881, slowness: float = 0.0
    ) -> None:
        """
        @param slowness: seconds an apply takes; its first request goes at
            the start, the other three at the end.
        """
        self.clock = clock
        self.slowness = slowness
        self.port = rival
        self.rival = rival
        self.requests: list[tuple[float, int]] = []
        self.writer = LoopingCall(self.compete)
        self.writer.clock = clock
        self.writer.start(period, now=False)

    def compete(self) -> None:
        self.port = self.rival

    def apply(self, port: int, bindInterface: str) -> Deferred[ApplyResult]:
        if not self.slowness:
            self.requests.append((self.clock.seconds(), 4))
            return succeed(self.set(port))
        self.requests.append((self.clock.seconds(), 1))
        return deferLater(self.clock, self.slowness, self.set, port, requests=3)

    def set(self, port: int, requests: int = 0) -> ApplyResult:
        if requests:
            self.requests.append((self.clock.seconds(), requests))
        previous = self.port
        self.port = port
        return ApplyResult(port, previous, applied=previous != port, verified=True)

    def listenPort(self) -> Deferred[int]:
        self.requests.append((self.clock.seconds(), 1))
        return succeed(self.port)

    def relisten(self, port: int, address: str, how: str) -> Deferred[None]:
        raise AssertionError("no listener check configured")


class ContestTests(SynchronousTestCase):
    """A rival keeps changing qBittorrent's port: back off, say so once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.metrics = Metrics.create()
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, sink: IPortSink) -> PortSync:
        sync = PortSync(
            self.clock,
            self.source,
            sink,
            self.metrics,
            verifyInterval=2.0,
            rnd=lambda: 0.0,
        )
        sync.startService()
        self.addCleanup(sync.stopService)
        return sync

    def elapse(self, seconds: float, step: float = 0.5) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def busiestWindow(self, sink: ContestedSink, since: float = 0.0) -> int:
        """The most requests in any 15 s window starting at a request."""
        times = [(t, n) for t, n in sink.requests if t >= since]
        return max(sum(n for u, n in times if t <= u < t + 15.0) for t, _ in times)

    def warnings(self) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] == LogLevel.warn]

    def test_rateUnderTugOfWar(self) -> None:
        """
        A rival resetting the port every second, verify_interval_secs = 2:
        no 15 s window holds more than 7 requests (0.5/s), for an hour.
        """
        sink = ContestedSink(self.clock, period=1.0)
        self.start(sink)
        self.source.emit(40000)
        self.elapse(3600)
        self.assertLessEqual(self.busiestWindow(sink), 7)
        self.assertLess(len(sink.requests), 3600 * 0.02)

    def test_rateWithSlowApplies(self) -> None:
        """
        Applies that take 3 s each (a loaded qBittorrent) still leave no
        15 s window with more than 7 requests.
        """
        sink = ContestedSink(self.clock, period=1.0, slowness=3.0)
        self.start(sink)
        self.source.emit(40000)
        self.elapse(3600)
        self.assertLessEqual(self.busiestWindow(sink), 7)
        self.assertGreater(sample(self.metrics, "qb_port_sync_conflicts_total"), 5)

    def test_waitsGrowToMinutes(self) -> None:
        """The waits between rounds double from 16 s up to the cap."""
        sink = ContestedSink(self.clock, period=1.0)
        sync = self.start(sink)
        self.source.emit(40000)
        self.elapse(3600)
        since = sync.status.contested_since
        assert since is not None
        rounds = [t for t, _ in sink.requests if t >= since]
        gaps = [b - a for a, b in itertools.pairwise(rounds)]
        self.assertEqual(gaps[:4], [16.0, 32.0, 64.0, 128.0])
        self.assertEqual(set(gaps[4:]), {CONTEST_CAP_SECS * 0.8})

    def test_oneWarningNamingCulprits(self) -> None:
        """One warning for the whole tug-of-war, naming the likely culprits."""
        sink = ContestedSink(self.clock, period=1.0)
        self.start(sink)
        self.source.emit(40000)
        self.elapse(3600)
        warned = [e for e in self.warnings() if "keeps changing" in e["log_format"]]
        self.assertEqual(len(warned), 1)
        text = formatEvent(warned[0])
        for culprit in ("UPnP/NAT-PMP", "VPN_PORT_FORWARDING_UP_COMMAND", "second"):
            self.assertIn(culprit, text)

    def test_countedAndShownInStatus(self) -> None:
        """Each conflict is counted; /status says the port is contested."""
        sink = ContestedSink(self.clock, period=1.0)
        sync = self.start(sink)
        self.source.emit(40000)
        self.elapse(20)
        status = sync.status
        self.assertEqual((status.contested, status.contested_since), (True, 16.0))
        self.assertFalse(isHealthy(status, self.clock.seconds()))
        before = sample(self.metrics, "qb_port_sync_conflicts_total")
        self.elapse(600)
        self.assertGreater(sample(self.metrics, "qb_port_sync_conflicts_total"), before)
        document = statusDocument(sync.status, self.clock.seconds())
        self.assertIs(document["contested"], True)
        self.assertEqual(document["contested_since"], "1970-01-01T00:00:16+00:00")

    def test_newPortAppliedAtOnce(self) -> None:
        """A new port from the source is applied at once, even when contested."""
        sink = ContestedSink(self.clock, period=1.0)
        self.start(sink)
        self.source.emit(40000)
        self.elapse(300)
        before = len(sink.requests)
        self.source.emit(40001)
        self.assertEqual(sink.requests[before:], [(300.0, 4)])
        self.assertEqual(sink.port, 40001)

    def test_contestEndsWhenRivalStops(self) -> None:
        """
        Once the rival stops, the port is kept, the contest ends after the
        quiet period, the daemon is healthy and verifies every 2 s again.
        """
        sink = ContestedSink(self.clock, period=1.0)
        sync = self.start(sink)
        self.source.emit(40000)
        self.elapse(120)
        sink.writer.stop()
        self.elapse(CONTEST_QUIET_SECS + 2 * CONTEST_CAP_SECS)
        self.assertFalse(sync.status.contested)
        self.assertTrue(isHealthy(sync.status, self.clock.seconds()))
        before, now = len(sink.requests), self.clock.seconds()
        self.elapse(10)
        ticks = [t for t in range(int(now) + 1, int(now) + 11) if t % 2 == 0]
        self.assertEqual(sink.requests[before:], [(float(t), 1) for t in ticks])
        self.assertEqual(sink.port, 40000)

    def test_singleDriftRestoredWithoutContest(self) -> None:
        """
        One drift long after the apply (qBittorrent restarted) is set back at
        once, with no contest; one soon after it waits for the spacing.
        """
        sink = FakeSink()
        sync = self.start(sink)
        self.source.emit(40000)
        sink.succeed()
        self.clock.advance(2)
        sink.checks[-1].callback(6881)
        self.assertEqual(len(sink.applies), 1)
        self.clock.advance(RESTORE_SPACING_SECS - 2)
        self.assertEqual(len(sink.applies), 2)
        sink.succeed()
        self.assertFalse(sync.status.contested)
        self.assertEqual(sample(self.metrics, "qb_port_sync_conflicts_total"), 0)


@implementer(INetworkEvents)
class FakeNetworkEvents:
    """Network changes the test tells with L{emit}."""

    def __init__(self) -> None:
        self.observers: list[Callable[[NetworkChange], object]] = []

    def subscribe(
        self, observer: Callable[[NetworkChange], object]
    ) -> Callable[[], None]:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    def emit(self, kind: str, interface: str, present: bool) -> None:
        for observer in list(self.observers):
            observer(NetworkChange(kind, interface, present))


class ListenerTriggerTests(SynchronousTestCase):
    """PortSync checks qBittorrent's listener when it may have died."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.sink = FakeSink()
        self.metrics = Metrics.create()
        self.events = FakeNetworkEvents()
        self.alive = True
        self.probes: list[float] = []
        healer = ListenerHealer(
            self.clock,
            self.sink,
            self.metrics,
            bindInterface="wg0",
            probe=self.probe,
            addressOf={"wg0": "10.2.0.2"}.get,
        )
        self.sync = PortSync(
            self.clock,
            self.source,
            self.sink,
            self.metrics,
            bindInterface="wg0",
            verifyInterval=30.0,
            rnd=lambda: 0.5,
            healer=healer,
            networkEvents=self.events,
        )
        self.sync.startService()
        self.source.emit(40000)
        self.sink.succeed()

    def probe(self, address: str, port: int) -> Deferred[bool]:
        self.probes.append(self.clock.seconds())
        return succeed(self.alive)

    def bounce(self) -> None:
        """wg-quick down/up: the link and address go, then come back."""
        self.events.emit("link", "wg0", False)
        self.events.emit("address", "wg0", False)
        self.clock.advance(0.3)
        self.events.emit("link", "wg0", True)
        self.events.emit("address", "wg0", True)
        self.events.emit("route", "wg0", True)

    def healRelistens(self) -> None:
        """qBittorrent takes the heal's first request; it listens again."""
        self.alive = True
        self.sink.relistens[-1][3].callback(None)

    def test_subscribed(self) -> None:
        """The service follows network changes while it runs, not after."""
        self.assertTrue(verifyObject(INetworkEvents, self.events))
        self.assertEqual(len(self.events.observers), 1)
        self.successResultOf(self.sync.stopService())
        self.assertEqual(self.events.observers, [])

    def test_interfaceBounceChecksOnceAfterSettling(self) -> None:
        """A burst of changes to the bound interface: one connect, 1 s after."""
        self.bounce()
        self.assertEqual(self.probes, [])
        self.clock.advance(NETWORK_SETTLE_SECS)
        self.assertEqual(self.probes, [0.3 + NETWORK_SETTLE_SECS])
        self.clock.advance(10)
        self.assertEqual(len(self.probes), 1)

    def test_otherInterfaceIgnored(self) -> None:
        """Changes to another interface do not matter."""
        self.events.emit("link", "eth0", False)
        self.events.emit("link", "eth0", True)
        self.clock.advance(10)
        self.assertEqual(self.probes, [])

    def test_unknownInterfaceChecks(self) -> None:
        """A change the kernel did not name (lost events) is checked too."""
        self.events.emit("link", "", True)
        self.clock.advance(NETWORK_SETTLE_SECS)
        self.assertEqual(len(self.probes), 1)

    def test_healedWithinTenSecondsOfReturn(self) -> None:
        """
        A listener dead after the bounce is healed, and judged healed by a
        connect, well within 10 s of the interface's return.
        """
        self.alive = False
        self.bounce()
        back = self.clock.seconds()
        self.clock.advance(NETWORK_SETTLE_SECS)
        self.assertIs(self.sync.status.listening, None)
        self.assertEqual(self.sink.relistens[-1][:3], (40000, "10.2.0.2", "address"))
        self.healRelistens()
        self.clock.advance(SETTLE_SECS)
        self.assertIs(self.sync.status.listening, True)
        self.assertLessEqual(self.probes[-1] - back, 10.0)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_listener_heals_total", method="address"),
            1,
        )

    def test_eachVerifyChecks(self) -> None:
        """Each verify that finds our port connects to it too."""
        for _ in range(3):
            self.clock.advance(30)
            self.sink.checks[-1].callback(40000)
        self.assertEqual(self.probes, [30.0, 60.0, 90.0])
        self.assertIs(self.sync.status.listening, True)

    def test_deadIsUnhealthyUntilHealed(self) -> None:
        """A refusing listener makes the daemon unhealthy until it is healed."""
        self.alive = False
        self.clock.advance(30)
        self.sink.checks[-1].callback(40000)
        self.sink.relistens[-1][3].callback(None)
        for _ in range(6):
            self.clock.advance(SETTLE_SECS)
        self.sink.relistens[-1][3].callback(None)
        for _ in range(3):
            self.clock.advance(SETTLE_SECS)
        self.assertIs(self.sync.status.listening, False)
        self.assertEqual(
            unhealthyReason(self.sync.status, self.clock.seconds()),
            "qBittorrent refuses connections on its port",
        )
        self.alive = True
        self.clock.advance(30)
        self.sink.checks[-1].callback(40000)
        self.assertTrue(isHealthy(self.sync.status, self.clock.seconds()))

    def test_sameEmptyThenSamePortChecks(self) -> None:
        """The source's trouble, then the same port again: the VPN reconnected."""
        assert self.source.deliver is not None
        self.source.deliver(SourceTrouble("the port file is empty", "file"))
        self.assertEqual(self.probes, [])
        self.source.emit(40000)
        self.assertEqual(self.probes, [0.0])
        self.assertEqual(len(self.sink.applies), 1)

    def test_healHoldsBackApplyAndVerify(self) -> None:
        """
        While a heal is under way nothing else touches qBittorrent's port:
        a new port waits for the heal, and is applied right after it.
        """
        self.alive = False
        self.clock.advance(30)
        self.sink.checks[-1].callback(40000)
        self.source.emit(40001)
        self.clock.advance(30)
        self.assertEqual((len(self.sink.applies), len(self.sink.checks)), (1, 1))
        self.healRelistens()
        self.clock.advance(SETTLE_SECS)
        self.assertEqual(self.sink.applies[-1][0], 40001)

    def test_eventDuringApplyChecksAfter(self) -> None:
        """An interface change during an apply is checked once it ends."""
        self.source.emit(40001)
        self.events.emit("address", "wg0", True)
        self.clock.advance(NETWORK_SETTLE_SECS)
        self.assertEqual(self.probes, [])
        self.sink.succeed()
        self.assertEqual(self.probes, [NETWORK_SETTLE_SECS])

    def test_stopCancelsHeal(self) -> None:
        """Stopping during a heal cancels it quietly."""
        self.alive = False
        self.clock.advance(30)
        self.sink.checks[-1].callback(40000)
        self.successResultOf(self.sync.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ContestedListenerTests(SynchronousTestCase):
    """A tug-of-war's long waits do not hold back a listener check."""

    def test_eventChecksDuringContest(self) -> None:
        """An interface change while contested is checked after settling."""
        clock = Clock()
        source = FakeSource()
        sink = ContestedSink(clock, period=1.0)
        events = FakeNetworkEvents()
        probes: list[float] = []

        def probe(address: str, port: int) -> Deferred[bool]:
            probes.append(clock.seconds())
            return succeed(True)

        healer = ListenerHealer(
            clock,
            sink,
            Metrics.create(),
            bindInterface="wg0",
            probe=probe,
            addressOf={"wg0": "10.2.0.2"}.get,
        )
        sync = PortSync(
            clock,
            source,
            sink,
            Metrics.create(),
            bindInterface="wg0",
            verifyInterval=2.0,
            rnd=lambda: 0.0,
            healer=healer,
            networkEvents=events,
        )
        sync.startService()
        self.addCleanup(sync.stopService)
        source.emit(40000)
        for _ in range(200):
            clock.advance(0.5)
        self.assertTrue(sync.status.contested)
        events.emit("link", "wg0", True)
        before = clock.seconds()
        clock.advance(NETWORK_SETTLE_SECS)
        self.assertEqual(probes[-1], before + NETWORK_SETTLE_SECS)
