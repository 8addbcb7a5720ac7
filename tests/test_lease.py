"""Lease keeping shared by NAT-PMP and PCP: renewals, retries, epochs."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.interfaces import SourceError
from qbportsync.metrics import Metrics
from qbportsync.sources.lease import (
    EpochTracker,
    Grant,
    LeaseKeeper,
    MappedPort,
    mapProtocols,
)
from qbportsync.sources.natpmp import epochReset
from qbportsync.sources.wire import EpochSample, IPProto


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


class MapProtocolsTests(SynchronousTestCase):
    """mapProtocols: one port for both transports."""

    def setUp(self) -> None:
        self.metrics = Metrics.create()
        self.calls: list[tuple[IPProto, int]] = []
        self.answers: list[int] = []

    def mapOne(self, protocol: IPProto, suggested: int) -> Deferred[Grant]:
        self.calls.append((protocol, suggested))
        return succeed(Grant(protocol, 6881, self.answers.pop(0), 60))

    def test_single(self) -> None:
        """One protocol: one request with its suggestion."""
        self.answers = [5000]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "UDP", lambda p: 6881, self.metrics)
        )
        self.assertEqual(self.successResultOf(d).port, 5000)
        self.assertEqual(self.calls, [("UDP", 6881)])

    def test_agree(self) -> None:
        """Both agree at once: two requests."""
        self.answers = [5000, 5000]
        d = Deferred.fromCoroutine(
            mapProtocols(self.mapOne, "BOTH", lambda p: 5000, self.metrics)
        )
        mapped = self.successResultOf(d)
        self.assertEqual((mapped.port, len(mapped.grants)), (5000, 2))
        self.assertEqual(self.calls, [("UDP", 5000), ("TCP", 5000)])

    def test_failurePropagates(self) -> None:
        """A failed request fails the whole mapping."""

        def mapOne(protocol: IPProto, suggested: int) -> Deferred[Grant]:
            return fail(SourceError("no"))

        d = Deferred.fromCoroutine(
            mapProtocols(mapOne, "BOTH", lambda p: 1, self.metrics)
        )
        self.failureResultOf(d, SourceError)


class LeaseKeeperTests(SynchronousTestCase):
    """LeaseKeeper: when it remaps."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.requests: list[Deferred[MappedPort]] = []
        self.mapped: list[MappedPort] = []
        self.keeper = LeaseKeeper(
            self.clock,
            self.remap,
            self.mapped.append,
            fallbackRefresh=45,
            random=lambda: 0.2,
            name="test",
        )

    def remap(self) -> Deferred[MappedPort]:
        d: Deferred[MappedPort] = Deferred()
        self.requests.append(d)
        return d

    def grant(self, lifetime: int = 60) -> None:
        self.requests[-1].callback(MappedPort(5000, lifetime, ()))

    def test_renewAtHalf(self) -> None:
        """Renewal comes at half the lifetime; expiry is tracked."""
        self.keeper.start()
        self.grant(60)
        self.assertEqual(self.keeper.expires, 60)
        self.clock.advance(29.9)
        self.assertEqual(len(self.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.requests), 2)

    def test_customRenewPoint(self) -> None:
        """A protocol may choose its own renewal point (PCP: 1/2 to 5/8)."""
        keeper = LeaseKeeper(
            self.clock,
            self.remap,
            self.mapped.append,
            fallbackRefresh=45,
            random=lambda: 0.0,
            renewAt=lambda lifetime: lifetime * 0.6,
            name="test",
        )
        keeper.start()
        self.grant(100)
        self.clock.advance(59.9)
        self.assertEqual(len(self.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.requests), 2)

    def test_backoff(self) -> None:
        """Failures before any lease retry after 1, 2, 4, 8, 15, 15 s, jittered."""
        self.keeper.start()
        gaps = []
        for _ in range(6):
            self.requests[-1].errback(SourceError("down"))
            (retry,) = self.clock.getDelayedCalls()
            gaps.append(retry.getTime() - self.clock.seconds())
            self.clock.advance(gaps[-1])
        # random() is 0.2 here: each wait is 0.88 of the nominal one.
        self.assertEqual(
            [round(gap, 2) for gap in gaps], [0.88, 1.76, 3.52, 7.04, 13.2, 13.2]
        )
        self.assertEqual(len(self.requests), 7)

    def test_resetDuringRequest(self) -> None:
        """A reset while a request is in flight remaps once it settles."""
        self.keeper.start()
        self.keeper.gatewayReset()
        self.clock.advance(1.0)  # random 0.2 × 5 s
        self.assertEqual(len(self.requests), 1)
        self.grant()
        self.assertEqual(len(self.requests), 2)

    def test_resetOnce(self) -> None:
        """Several reset signals before the remap cause one remap."""
        self.keeper.start()
        self.grant()
        self.keeper.gatewayReset()
        self.clock.advance(0.5)
        self.keeper.gatewayReset()
        self.clock.advance(0.5)
        self.assertEqual(len(self.requests), 2)
        self.clock.advance(10)
        self.assertEqual(len(self.requests), 2)

    def test_stop(self) -> None:
        """stop() cancels the request in flight, leaves no timer, logs no error."""
        self.keeper.start()
        self.keeper.stop()
        self.assertTrue(self.requests[0].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.keeper.gatewayReset()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_onMappedErrorLogged(self) -> None:
        """A failing onMapped is logged, and renewals go on."""

        def broken(mapped: MappedPort) -> None:
            raise RuntimeError("boom")

        keeper = LeaseKeeper(
            self.clock,
            self.remap,
            broken,
            fallbackRefresh=45,
            random=lambda: 0.0,
            name="test",
        )
        keeper.start()
        self.grant(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(30)
        self.assertEqual(len(self.requests), 2)
