"""
Prometheus metrics, on a registry of their own (never the global one).

prometheus_client is imported only when metrics are made to be kept
(L{Metrics.create}): a one-shot run, which exports none, discards them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, cast

from attrs import fields, frozen

from qbportsync._version import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

ErrorKind = Literal["qbittorrent", "auth", "gateway", "file", "parse", "gluetun"]
ERROR_KINDS: tuple[ErrorKind, ...] = (
    "qbittorrent",
    "auth",
    "gateway",
    "file",
    "parse",
    "gluetun",
)

HOOK_RESULTS = ("ok", "failed", "timeout", "error")
"""How an on-change hook run ended: exit 0; non-zero exit or a signal;
stopped at its timeout; could not be started."""

HEAL_METHODS = ("address", "port")
"""How a dead listener is healed, least disruptive first."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of what L{Metrics.exposition} returns (prometheus_client's
C{CONTENT_TYPE_PLAIN_0_0_4})."""


class _WithoutCreated:
    """
    A view of a registry without the C{_created} samples of counters and
    histograms: they only say when the process started, and turning them off
    with prometheus-client's own switch would change every registry in the
    process.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.metrics_core import Metric

        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            created = family.name + "_created"
            kept.samples = [s for s in family.samples if s.name != created]
            yield kept


class _Discard:
    """Takes every update a metric can take, and keeps none."""

    def labels(self, *values: object, **labels: object) -> _Discard:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


@frozen
class Metrics:
    """Every metric the daemon exports; one instance per running service."""

    registry: CollectorRegistry
    port_updates: Counter
    current_port: Gauge
    last_update: Gauge
    forwarded_port: Gauge
    lease_expiry: Gauge
    errors: Counter
    epoch_resets: Counter
    datagrams_dropped: Counter
    apply_duration: Histogram
    qbittorrent_up: Gauge
    hook_runs: Counter
    hook_duration: Histogram
    conflicts: Counter
    listener_dead: Counter
    listener_heals: Counter

    def exposition(self) -> bytes:
        """The Prometheus text format (L{CONTENT_TYPE}) of every metric."""
        from prometheus_client import generate_latest

        # generate_latest asks its argument for nothing but collect().
        return generate_latest(cast("Collector", _WithoutCreated(self.registry)))

    @classmethod
    def discarding(cls) -> Metrics:
        """Metrics that keep nothing, for a run that exports none (C{--once})."""
        discard: Any = _Discard()
        return cls(**{field.name: discard for field in fields(cls)})

    @classmethod
    def create(cls) -> Metrics:
        """Make a fresh registry holding all of our metrics, errors at zero."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        registry = CollectorRegistry(auto_describe=True)
        ns = "qb_port_sync"
        info = Info("build", "Version of qbportsync.", namespace=ns, registry=registry)
        info.info({"version": __version__.short()})

        def labelled(name: str, doc: str, label: str, values: Iterable[str]) -> Counter:
            """A counter with one label, every value of it present from zero."""
            counter = Counter(name, doc, [label], namespace=ns, registry=registry)
            for value in values:
                counter.labels(value)
            return counter

        errors = labelled(
            "errors",
            "Failures by kind: qbittorrent, auth, gateway, file, parse, gluetun.",
            "kind",
            ERROR_KINDS,
        )
        heals = labelled(
            "listener_heals",
            "Times qBittorrent was made to listen again, by method: address, port.",
            "method",
            HEAL_METHODS,
        )
        hookRuns = labelled(
            "hook_runs",
            "Runs of the on-change hook by result: ok, failed, timeout, error.",
            "result",
            HOOK_RESULTS,
        )
        return cls(
            registry=registry,
            port_updates=Counter(
                "port_updates",
                "Times qBittorrent's listening port was changed by us.",
                namespace=ns,
                registry=registry,
            ),
            current_port=Gauge(
                "current_port",
                "Listening port qBittorrent reported at the last check.",
                namespace=ns,
                registry=registry,
            ),
            last_update=Gauge(
                "last_update_timestamp_seconds",
                "POSIX time of the last successful, verified update.",
                namespace=ns,
                registry=registry,
            ),
            forwarded_port=Gauge(
                "forwarded_port",
                "Forwarded port most recently reported by the source.",
                namespace=ns,
                registry=registry,
            ),
            lease_expiry=Gauge(
                "lease_expiry_timestamp_seconds",
                "POSIX time when the gateway's current mapping expires.",
                namespace=ns,
                registry=registry,
            ),
            errors=errors,
            epoch_resets=Counter(
                "gateway_epoch_resets",
                "Times the gateway was seen to lose its mappings.",
                namespace=ns,
                registry=registry,
            ),
            datagrams_dropped=Counter(
                "datagrams_dropped",
                "Datagrams ignored: malformed, spoofed or unexpected.",
                ["reason"],
                namespace=ns,
                registry=registry,
            ),
            apply_duration=Histogram(
                "apply_duration_seconds",
                "Time to set and verify the port in qBittorrent.",
                namespace=ns,
                registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ),
            qbittorrent_up=Gauge(
                "qbittorrent_up",
                "1 when the last request to qBittorrent succeeded, else 0.",
                namespace=ns,
                registry=registry,
            ),
            hook_runs=hookRuns,
            hook_duration=Histogram(
                "hook_duration_seconds",
                "Time the on-change hook ran, from start to exit.",
                namespace=ns,
                registry=registry,
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            conflicts=Counter(
                "conflicts",
                "Times qBittorrent was found on another port soon after we set ours.",
                namespace=ns,
                registry=registry,
            ),
            listener_dead=Counter(
                "listener_dead",
                "Times a TCP connect to qBittorrent's port was refused.",
                namespace=ns,
                registry=registry,
            ),
            listener_heals=heals,
        )
