"""Tests for qbportsync.metrics: names, exposition, promtool's verdict."""

from __future__ import annotations

import re
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from qbportsync._version import __version__
from qbportsync.metrics import CONTENT_TYPE, ERROR_KINDS, Metrics
from tests.rig import requireTool


def _busy(metrics: Metrics | None = None) -> Metrics:
    """Metrics after a day's work: every series has a value."""
    metrics = metrics or Metrics.create()
    metrics.port_updates.inc(3)
    metrics.current_port.set(51413)
    metrics.last_update.set(1_700_000_000)
    metrics.forwarded_port.set(51413)
    metrics.lease_expiry.set(1_700_000_060)
    metrics.errors.labels(kind="gateway").inc()
    metrics.epoch_resets.inc()
    metrics.datagrams_dropped.labels(reason="malformed").inc(2)
    metrics.apply_duration.observe(0.004)
    metrics.apply_duration.observe(0.03)
    metrics.qbittorrent_up.set(1)
    metrics.hook_runs.labels(result="ok").inc()
    metrics.hook_duration.observe(0.02)
    metrics.conflicts.inc()
    metrics.listener_dead.inc()
    metrics.listener_heals.labels(method="address").inc()
    return metrics


class ExpositionTests(SynchronousTestCase):
    """What /metrics serves."""

    def test_names(self) -> None:
        """The reference's three metrics and ours are all there, by type."""
        text = _busy().exposition().decode()
        self.assertEqual(
            set(re.findall(r"^# TYPE (\S+ \S+)$", text, re.MULTILINE)),
            {
                "qb_port_sync_port_updates_total counter",
                "qb_port_sync_current_port gauge",
                "qb_port_sync_last_update_timestamp_seconds gauge",
                "qb_port_sync_forwarded_port gauge",
                "qb_port_sync_lease_expiry_timestamp_seconds gauge",
                "qb_port_sync_errors_total counter",
                "qb_port_sync_gateway_epoch_resets_total counter",
                "qb_port_sync_datagrams_dropped_total counter",
                "qb_port_sync_apply_duration_seconds histogram",
                "qb_port_sync_qbittorrent_up gauge",
                "qb_port_sync_conflicts_total counter",
                "qb_port_sync_listener_dead_total counter",
                "qb_port_sync_listener_heals_total counter",
                "qb_port_sync_build_info gauge",
                "qb_port_sync_hook_runs_total counter",
                "qb_port_sync_hook_duration_seconds histogram",
            },
        )

    def test_values(self) -> None:
        """Samples carry what was recorded, errors of every kind start at 0."""
        text = _busy().exposition().decode()
        for line in [
            "qb_port_sync_port_updates_total 3.0",
            "qb_port_sync_current_port 51413.0",
            'qb_port_sync_errors_total{kind="gateway"} 1.0',
            'qb_port_sync_datagrams_dropped_total{reason="malformed"} 2.0',
            "qb_port_sync_apply_duration_seconds_count 2.0",
            'qb_port_sync_listener_heals_total{method="address"} 1.0',
            'qb_port_sync_listener_heals_total{method="port"} 0.0',
            'qb_port_sync_hook_runs_total{result="ok"} 1.0',
            'qb_port_sync_hook_runs_total{result="timeout"} 0.0',
            "qb_port_sync_hook_duration_seconds_count 1.0",
            f'qb_port_sync_build_info{{version="{__version__.short()}"}} 1.0',
        ]:
            self.assertIn(line + "\n", text)
        for kind in ERROR_KINDS:
            self.assertIn(f'qb_port_sync_errors_total{{kind="{kind}"}}', text)

    def test_noCreatedSeries(self) -> None:
        """No _created series, yet the registry itself still has them."""
        metrics = _busy()
        self.assertNotIn(b"_created", metrics.exposition())
        names = {
            sample.name
            for family in metrics.registry.collect()
            for sample in family.samples
        }
        self.assertIn("qb_port_sync_port_updates_created", names)

    def test_ownRegistry(self) -> None:
        """Two instances share nothing: no global registry."""
        first, second = Metrics.create(), Metrics.create()
        first.port_updates.inc()
        self.assertIn(b"qb_port_sync_port_updates_total 1.0", first.exposition())
        self.assertIn(b"qb_port_sync_port_updates_total 0.0", second.exposition())


class DiscardingTests(SynchronousTestCase):
    """The metrics of a run that exports none."""

    def test_takesEveryUpdate(self) -> None:
        """Every update the daemon makes is taken by discarding metrics."""
        metrics = _busy(Metrics.discarding())
        metrics.errors.labels(kind="file").inc()
        self.assertNotIsInstance(metrics.errors, type(Metrics.create().errors))

    def test_contentType(self) -> None:
        """The media type of the exposition is prometheus_client's own."""
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

        self.assertEqual(CONTENT_TYPE, CONTENT_TYPE_PLAIN_0_0_4)


class PromtoolTests(SynchronousTestCase):
    """Prometheus's own linter accepts our output."""

    def _check(self, exposition: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [requireTool("promtool"), "check", "metrics"],
            input=exposition,
            capture_output=True,
            timeout=30,
            check=False,
        )

    def test_busy(self) -> None:
        """promtool check metrics passes on a busy registry's exposition."""
        result = self._check(_busy().exposition())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))

    def test_fresh(self) -> None:
        """promtool check metrics passes on a fresh registry's exposition."""
        result = self._check(Metrics.create().exposition())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))

    def test_promtoolCanFail(self) -> None:
        """The check is real: promtool rejects a counter without _total."""
        bad = b"# HELP x_seconds a counter\n# TYPE x_seconds counter\nx_seconds 1\n"
        self.assertNotEqual(self._check(bad).returncode, 0)
