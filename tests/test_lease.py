"""Lease keeping shared by NAT-PMP and PCP: renewals, retries, epochs."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.config import ConfigError
from qbportsync.interfaces import SourceError
from qbportsync.metrics import Metrics
from qbportsync.sources.lease import (
    EpochTracker,
    Failed,
    Grant,
    LeaseKeeper,
    MappedPort,
    mapProtocols,
)
from qbportsync.sources.natpmp import epochReset
from qbportsync.sources.udpclient import (
    GatewayMoves,
    GatewayRefusal,
    GatewayRefused,
    GatewayTimeout,
    GatewayUnsupported,
    WrongProtocol,
    isPathTrouble,
    isPermanent,
)
from qbportsync.sources.wire import EpochSample, IPProto, Result


class EpochRuleTests(SynchronousTestCase):
    """RFC 6886 §3.6: a reset is an epoch 2 s below last + 7/8 of elapsed."""

    def test_steady(self) -> None:
        """An epoch advancing with our clock is no reset."""
        self.assertFalse(epochReset(EpochSample(100, 0), EpochSample(130, 30)))

    def test_slowGatewayClock(self) -> None:
        """A gateway clock at 7/8 of ours, within 2 s, is no reset."""
        self.assertFalse(epochReset(EpochSample(100, 0), EpochSample(128, 32)))
        self.assertTrue(epochReset(EpochSample(100, 0), EpochSample(125, 32)))

    def test_boundary(self) -> None:
        """Exactly 2 s below the estimate is still fine; just below is a reset."""
        self.assertFalse(epochReset(EpochSample(100, 0), EpochSample(133, 40)))
        self.assertTrue(epochReset(EpochSample(100, 0), EpochSample(132, 40)))

    def test_backwards(self) -> None:
        """An epoch back at 0 after a while is a reset."""
        self.assertTrue(epochReset(EpochSample(100, 0), EpochSample(0, 5)))

    def test_tracker(self) -> None:
        """The tracker compares each sample with the one before it."""
        tracker = EpochTracker(epochReset)
        self.assertFalse(tracker.observe(100, 0))
        self.assertFalse(tracker.observe(130, 30))
        self.assertTrue(tracker.observe(1, 40))
        self.assertFalse(tracker.observe(11, 50))

    def test_contradictsRecordsNothing(self) -> None:
        """An unasked report is judged against the last answer, not kept."""
        tracker = EpochTracker(epochReset)
        tracker.observe(100, 0)
        self.assertFalse(tracker.contradicts(5000, 10))
        self.assertFalse(tracker.observe(110, 10))
        self.assertTrue(tracker.contradicts(0, 20))
        self.assertFalse(tracker.observe(120, 20))


class MapProtocolsTests(SynchronousTestCase):
    """mapProtocols: one port for both transports, asked together."""

    def setUp(self) -> None:
        self.metrics = Metrics.create()
        self.calls: list[tuple[IPProto, int]] = []
        self.answers: list[int] = []
        self.lifetimes: list[int] = []

    def mapOne(self, protocol: IPProto, suggested: int) -> Deferred[Grant]:
        self.calls.append((protocol, suggested))
        life = self.lifetimes.pop(0) if self.lifetimes else 60
        return succeed(Grant(protocol, 6881, self.answers.pop(0), life))

    def test_single(self) -> None:
        """One protocol: one request with its suggestion."""
        self.answers = [5000]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "UDP", lambda p: 6881, 60, self.metrics)
        )
        self.assertEqual(self.successResultOf(d).port, 5000)
        self.assertEqual(self.calls, [("UDP", 6881)])

    def test_agree(self) -> None:
        """Both agree at once: two requests."""
        self.answers = [5000, 5000]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "BOTH", lambda p: 5000, 60, self.metrics)
        )
        mapped = self.successResultOf(d)
        self.assertEqual((mapped.port, len(mapped.grants)), (5000, 2))
        self.assertEqual(self.calls, [("UDP", 5000), ("TCP", 5000)])

    def test_lifetimeAtMostAsked(self) -> None:
        """The mapping's lifetime is the shortest grant, and never over the ask."""
        self.answers = [5000, 5000]
        self.lifetimes = [3600, 7200]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "BOTH", lambda p: 5000, 60, self.metrics)
        )
        self.assertEqual(self.successResultOf(d).lifetime, 60)
        self.answers, self.lifetimes = [5000, 5000], [45, 50]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "BOTH", lambda p: 5000, 60, self.metrics)
        )
        self.assertEqual(self.successResultOf(d).lifetime, 45)

    def test_failurePropagates(self) -> None:
        """A failed request fails the whole mapping and cancels the other."""
        tcp: Deferred[Grant] = Deferred()

        def mapOne(protocol: IPProto, suggested: int) -> Deferred[Grant]:
            return fail(SourceError("no")) if protocol == "UDP" else tcp

        cancelled: list[bool] = []
        tcp.addErrback(lambda f: cancelled.append(bool(f.check(CancelledError))))
        d = Deferred.fromCoroutine(
            mapProtocols(mapOne, "BOTH", lambda p: 1, 60, self.metrics)
        )
        self.failureResultOf(d, SourceError)
        self.assertEqual(cancelled, [True])

    def test_slowUDPDoesNotHoldTCP(self) -> None:
        """TCP is asked while UDP's answer is still awaited."""
        udp: Deferred[Grant] = Deferred()
        asked: list[IPProto] = []

        def mapOne(protocol: IPProto, suggested: int) -> Deferred[Grant]:
            asked.append(protocol)
            return udp if protocol == "UDP" else succeed(Grant("TCP", 1, 1, 60))

        d = Deferred.fromCoroutine(
            mapProtocols(mapOne, "BOTH", lambda p: 1, 60, self.metrics)
        )
        self.assertEqual(asked, ["UDP", "TCP"])
        self.assertNoResult(d)
        udp.callback(Grant("UDP", 1, 1, 60))
        self.assertEqual(self.successResultOf(d).port, 1)


class ErrorClassTests(SynchronousTestCase):
    """Which errors are permanent, and which say the path may have changed."""

    def test_permanent(self) -> None:
        """Refusals of principle and settings are permanent; silences are not."""
        for error in (
            ConfigError("no gateway on wg0"),
            GatewayRefusal("refused", Result.NOT_AUTHORIZED),
            GatewayUnsupported("unsupported opcode"),
            WrongProtocol("speaks version 3"),
            GatewayMoves("moves"),
        ):
            self.assertTrue(isPermanent(error), error)
        for error in (
            GatewayTimeout("silent"),
            GatewayRefused("ICMP"),
            GatewayRefusal("busy", Result.NO_RESOURCES),
            SourceError("cannot send"),
        ):
            self.assertFalse(isPermanent(error), error)

    def test_pathTrouble(self) -> None:
        """Silence, ICMP and send errors look at the path again; answers do not."""
        self.assertTrue(isPathTrouble(GatewayTimeout("silent")))
        self.assertTrue(isPathTrouble(GatewayRefused("ICMP")))
        self.assertTrue(isPathTrouble(SourceError("cannot send")))
        self.assertFalse(isPathTrouble(GatewayRefusal("busy", Result.NO_RESOURCES)))


class LeaseKeeperTests(SynchronousTestCase):
    """LeaseKeeper: when it remaps."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.requests: list[Deferred[MappedPort]] = []
        self.mapped: list[MappedPort] = []
        self.failed: list[Failed] = []
        self.keeper = self.makeKeeper()

    def makeKeeper(self, random: float = 0.5, **kwargs: object) -> LeaseKeeper:
        return LeaseKeeper(
            self.clock,
            self.remap,
            kwargs.pop("onMapped", self.mapped.append),  # type: ignore[arg-type]
            self.failed.append,
            refreshCap=kwargs.pop("refreshCap", 300),  # type: ignore[arg-type]
            random=lambda: random,
            **kwargs,  # type: ignore[arg-type]
        )

    def remap(self) -> Deferred[MappedPort]:
        d: Deferred[MappedPort] = Deferred()
        self.requests.append(d)
        return d

    def grant(self, lifetime: int = 60) -> None:
        self.requests[-1].callback(MappedPort(5000, lifetime, ()))

    def gaps(self, error: Exception, count: int) -> list[float]:
        """Fail C{count} tries in a row with C{error}; the waits before each retry."""
        gaps = []
        for _ in range(count):
            self.requests[-1].errback(error)
            (retry,) = self.clock.getDelayedCalls()
            gap = retry.getTime() - self.clock.seconds()
            gaps.append(round(gap, 3))
            self.clock.advance(gap)
        return gaps

    def test_renewAtHalf(self) -> None:
        """Renewal comes at half the lifetime; expiry is tracked."""
        self.keeper.start()
        self.grant(60)
        self.assertEqual(self.keeper.expires, 60)
        self.assertEqual(self.keeper.renewalPeriod, 30)
        self.clock.advance(29.9)
        self.assertEqual(len(self.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.requests), 2)

    def test_customRenewPoint(self) -> None:
        """A protocol may choose its own renewal point (PCP: 1/2 to 5/8)."""
        keeper = self.makeKeeper(renewAt=lambda lifetime: lifetime * 0.6)
        keeper.start()
        self.grant(100)
        self.clock.advance(59.9)
        self.assertEqual(len(self.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.requests), 2)

    def test_refreshCap(self) -> None:
        """Renewals are at most refreshCap seconds apart."""
        keeper = self.makeKeeper(refreshCap=20)
        keeper.start()
        self.grant(3600)
        self.clock.advance(20)
        self.assertEqual(len(self.requests), 2)

    def test_backoff(self) -> None:
        """Failures before any lease retry after 1, 2, 4, 8, 8 s; reported each."""
        self.keeper.start()
        self.assertEqual(self.gaps(SourceError("down"), 5), [1, 2, 4, 8, 8])
        self.assertEqual([f.leaseLeft for f in self.failed], [0.0] * 5)
        self.assertTrue(self.keeper.failing)

    def test_backoffJittered(self) -> None:
        """Waits are spread by the Backoff's jitter, never above 9.6 s."""
        self.keeper = self.makeKeeper(random=1.0)
        self.keeper.start()
        self.assertEqual(self.gaps(SourceError("down"), 5), [1.2, 2.4, 4.8, 9.6, 9.6])

    def test_timeoutCountsItsSilence(self) -> None:
        """After a request that ended 8 s after its last send, no more waiting."""
        self.keeper.start()
        self.assertEqual(self.gaps(GatewayTimeout("silent", 8.0), 5), [0, 0, 0, 0, 0])
        self.assertEqual(self.gaps(GatewayTimeout("silent", 3.0), 1), [5])

    def test_permanentBacksOffToMinutes(self) -> None:
        """A permanent error: 1, 2, 4, 8, 15, 15 minutes, reported as permanent."""
        self.keeper.start()
        error = GatewayRefusal("refused", Result.NOT_AUTHORIZED)
        self.assertEqual(self.gaps(error, 6), [60, 120, 240, 480, 900, 900])
        self.assertTrue(all(f.permanent for f in self.failed))

    def test_errorLifetime(self) -> None:
        """PCP's error lifetime is waited out."""
        self.keeper.start()
        error = GatewayRefusal("busy", Result.NO_RESOURCES, 30)
        self.assertEqual(self.gaps(error, 1), [30])

    def test_neverPastLease(self) -> None:
        """With 3 s left on the lease, a permanent error retries within 3 s."""
        self.keeper.start()
        self.grant(60)
        self.clock.advance(57)
        self.requests[-1].errback(GatewayRefusal("no", Result.NOT_AUTHORIZED))
        self.assertEqual(self.failed[-1].leaseLeft, 3)
        self.assertEqual(self.failed[-1].retryIn, 3)
        self.assertFalse(self.keeper.failing is False and self.failed[-1].permanent)

    def test_successResets(self) -> None:
        """A success starts the backoff over."""
        self.keeper.start()
        self.gaps(SourceError("down"), 3)
        self.grant(60)
        self.assertFalse(self.keeper.failing)
        self.clock.advance(30)
        self.assertEqual(self.gaps(SourceError("down"), 1), [1])

    def test_retryNow(self) -> None:
        """retryNow forgets the backoff and tries at once."""
        self.keeper.start()
        self.gaps(GatewayRefusal("no", Result.NOT_AUTHORIZED), 3)
        self.requests[-1].errback(GatewayRefusal("no", Result.NOT_AUTHORIZED))
        count = len(self.requests)
        self.keeper.retryNow()
        self.assertEqual(len(self.requests), count + 1)
        self.assertEqual(self.gaps(SourceError("down"), 1), [1])

    def test_remapSoonCutsARequest(self) -> None:
        """remapSoon replaces a request waiting out a silence, after its delay."""
        self.keeper.start()
        self.keeper.remapSoon(1.0)
        self.clock.advance(0.9)
        self.assertFalse(self.requests[0].called)
        self.clock.advance(0.1)
        self.assertTrue(self.requests[0].called)
        self.assertEqual(len(self.requests), 2)
        self.assertEqual(self.failed, [])

    def test_remapSoonOnce(self) -> None:
        """Several calls before the remap cause one remap."""
        self.keeper.start()
        self.grant()
        self.keeper.remapSoon(1.0)
        self.clock.advance(0.5)
        self.keeper.remapSoon(1.0)
        self.clock.advance(0.5)
        self.assertEqual(len(self.requests), 2)
        self.clock.advance(10)
        self.assertEqual(len(self.requests), 2)

    def test_againAfter(self) -> None:
        """againAfter during a try maps once more as soon as it ends."""
        self.keeper.start()
        self.keeper.againAfter()
        self.assertEqual(len(self.requests), 1)
        self.grant()
        self.assertEqual(len(self.requests), 2)

    def test_stop(self) -> None:
        """stop() cancels the request in flight, leaves no timer, logs no error."""
        self.keeper.start()
        self.keeper.stop()
        self.assertTrue(self.requests[0].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.keeper.remapSoon(1.0)
        self.keeper.retryNow()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.failed, [])

    def test_onMappedErrorLogged(self) -> None:
        """A failing onMapped is logged, and renewals go on."""

        def broken(mapped: MappedPort) -> None:
            raise RuntimeError("boom")

        keeper = self.makeKeeper(onMapped=broken)
        keeper.start()
        self.grant(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(30)
        self.assertEqual(len(self.requests), 2)
