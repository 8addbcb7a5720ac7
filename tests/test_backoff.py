"""Tests for L{qbportsync.backoff}: the one retry schedule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.backoff import Backoff


class BackoffTests(SynchronousTestCase):
    def test_firstAboutOneSecond(self) -> None:
        """The first wait is C{first} spread by the jitter either way."""
        self.assertAlmostEqual(Backoff(rnd=lambda: 0.0).next(), 0.8)
        self.assertAlmostEqual(Backoff(rnd=lambda: 1.0).next(), 1.2)

    def test_doublesThenResets(self) -> None:
        """Each failure doubles the wait; a success starts over."""
        backoff = Backoff(first=2.0, cap=100.0, rnd=lambda: 0.5)
        self.assertEqual([backoff.next() for _ in range(4)], [2.0, 4.0, 8.0, 16.0])
        backoff.reset()
        self.assertEqual(backoff.next(), 2.0)

    @given(st.integers(min_value=1, max_value=10_000), st.floats(0, 1))
    def test_neverBeyondCap(self, failures: int, r: float) -> None:
        """No wait ever exceeds the cap plus jitter, however many failures."""
        backoff = Backoff(cap=60.0, rnd=lambda: r)
        delays = [backoff.next() for _ in range(min(failures, 200))]
        self.assertLessEqual(max(delays), 60.0 * 1.2 + 1e-9)
        self.assertGreater(min(delays), 0)
