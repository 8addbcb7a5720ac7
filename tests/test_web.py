"""Tests for qbportsync.web and the health rules of qbportsync.status."""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from qbportsync.config import Config, ListenConfig
from qbportsync.metrics import Metrics
from qbportsync.status import SyncStatus, isHealthy, statusLine
from qbportsync.web import (
    ListenError,
    WebListener,
    WebService,
    makeSite,
    makeWebRoot,
    makeWebService,
    planWeb,
)

NOW = 1_700_000_000.0

NEVER = SyncStatus(strategy="natpmp")
GOOD = SyncStatus(
    strategy="natpmp",
    source_port=51413,
    applied_port=51413,
    verified=True,
    last_success=NOW - 30,
    lease_expires=NOW + 40,
)
FAILED = evolve(
    GOOD,
    last_attempt_failed=True,
    last_error="qBittorrent answered 403",
    last_error_at=NOW - 5,
)
EXPIRING = evolve(GOOD, lease_expires=NOW + 9)


class _Holder:
    """The latest status, as PortSync.status would give it."""

    def __init__(self, status: SyncStatus) -> None:
        self.status = status

    def get(self) -> SyncStatus:
        return self.status


def _stub(
    holder: _Holder, metrics: Metrics | None = None, health: bool = True
) -> StubTreq:
    clock = Clock()
    clock.advance(NOW)
    return StubTreq(makeWebRoot(holder.get, metrics, health, clock))


class HealthTests(SynchronousTestCase):
    """/healthz follows the health rules through every transition."""

    def _get(self, stub: StubTreq, accept: str | None = None) -> tuple[int, bytes, str]:
        headers = {"Accept": accept} if accept else {}
        response = self.successResultOf(
            stub.get("http://localhost/healthz", headers=headers)
        )
        body = self.successResultOf(response.content())
        contentType = response.headers.getRawHeaders("content-type")[0]
        return response.code, body, contentType

    def test_beforeFirstSuccess(self) -> None:
        """Before any verified update the answer is 503 Unhealthy."""
        code, body, _ = self._get(_stub(_Holder(NEVER)))
        self.assertEqual((code, body), (503, b"Unhealthy"))

    def test_afterSuccess(self) -> None:
        """After a verified update and a fresh lease the answer is 200 OK."""
        code, body, contentType = self._get(_stub(_Holder(GOOD)))
        self.assertEqual((code, body), (200, b"OK"))
        self.assertEqual(contentType, "text/plain; charset=utf-8")

    def test_afterFailedAttempt(self) -> None:
        """A failed attempt after a success makes it 503 again."""
        code, body, _ = self._get(_stub(_Holder(FAILED)))
        self.assertEqual((code, body), (503, b"Unhealthy"))

    def test_leaseAboutToExpire(self) -> None:
        """A lease expiring within ten seconds unrenewed makes it 503."""
        code, body, _ = self._get(_stub(_Holder(EXPIRING)))
        self.assertEqual((code, body), (503, b"Unhealthy"))

    def test_shortLeaseMargin(self) -> None:
        """For a lease shorter than 40 s the margin is a quarter of it."""
        short = evolve(GOOD, lease_lifetime=6.0)
        renewed = self._get(_stub(_Holder(evolve(short, lease_expires=NOW + 4))))
        self.assertEqual(renewed[0], 200)
        late = self._get(_stub(_Holder(evolve(short, lease_expires=NOW + 1))))
        self.assertEqual(late[0], 503)

    def test_unverified(self) -> None:
        """An update whose read-back did not match is not healthy."""
        code, _, _ = self._get(_stub(_Holder(evolve(GOOD, verified=False))))
        self.assertEqual(code, 503)

    def test_portFileHasNoLease(self) -> None:
        """With no lease (port file) a verified update is healthy."""
        code, _, _ = self._get(_stub(_Holder(evolve(GOOD, lease_expires=None))))
        self.assertEqual(code, 200)

    def test_followsTheLatestStatus(self) -> None:
        """Each request reads the status anew: recovery shows at once."""
        holder = _Holder(FAILED)
        stub = _stub(holder)
        self.assertEqual(self._get(stub)[0], 503)
        holder.status = GOOD
        self.assertEqual(self._get(stub)[0], 200)

    def test_jsonWhenAccepted(self) -> None:
        """With Accept: application/json the body is the status document."""
        code, body, contentType = self._get(
            _stub(_Holder(EXPIRING)), accept="application/json"
        )
        self.assertEqual(code, 503)
        self.assertEqual(contentType, "application/json")
        document = json.loads(body)
        self.assertIs(document["healthy"], False)
        self.assertEqual(
            document["reason"], "the gateway lease is about to expire unrenewed"
        )

    def test_isHealthyMatchesEndpoint(self) -> None:
        """isHealthy agrees with /healthz for each state."""
        for status, expected in [
            (NEVER, False),
            (GOOD, True),
            (FAILED, False),
            (EXPIRING, False),
        ]:
            self.assertIs(isHealthy(status, NOW), expected, status)


class StatusTests(SynchronousTestCase):
    """/status gives the whole state as JSON."""

    def _document(self, status: SyncStatus) -> dict[str, Any]:
        stub = _stub(_Holder(status))
        response = self.successResultOf(stub.get("http://localhost/status"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        document: dict[str, Any] = self.successResultOf(response.json())
        return document

    def test_fields(self) -> None:
        """Every field, with RFC 3339 UTC timestamps, after a failure."""
        self.assertEqual(
            self._document(FAILED),
            {
                "healthy": False,
                "reason": "the last attempt failed",
                "strategy": "natpmp",
                "source_port": 51413,
                "applied_port": 51413,
                "verified": True,
                "last_success": "2023-11-14T22:12:50+00:00",
                "last_error": "qBittorrent answered 403",
                "last_error_at": "2023-11-14T22:13:15+00:00",
                "last_attempt_failed": True,
                "lease_expires": "2023-11-14T22:14:00+00:00",
                "source_trouble": None,
                "source_trouble_since": None,
                "contested": False,
                "contested_since": None,
                "listening": None,
                "now": "2023-11-14T22:13:20+00:00",
            },
        )

    def test_beforeAnything(self) -> None:
        """Before the source said anything, unknowns are null."""
        document = self._document(NEVER)
        self.assertEqual(document["source_port"], None)
        self.assertEqual(document["last_success"], None)
        self.assertEqual(document["reason"], "qBittorrent has not been updated yet")

    def test_statusLine(self) -> None:
        """The systemd STATUS= line names the port, strategy and any failure."""
        self.assertEqual(statusLine(NEVER), "waiting for a forwarded port (natpmp)")
        self.assertEqual(statusLine(GOOD), "port 51413 via natpmp, verified")
        self.assertEqual(
            statusLine(FAILED),
            "port 51413 via natpmp, verified; "
            "last attempt failed: qBittorrent answered 403",
        )


class MetricsResourceTests(SynchronousTestCase):
    """/metrics serves the registry in the Prometheus text format."""

    def test_contentTypeAndBody(self) -> None:
        """The body is the exposition, with its 0.0.4 content type."""
        metrics = Metrics.create()
        metrics.current_port.set(51413)
        metrics.port_updates.inc()
        stub = _stub(_Holder(GOOD), metrics, health=False)
        response = self.successResultOf(stub.get("http://localhost/metrics"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"),
            ["text/plain; version=0.0.4; charset=utf-8"],
        )
        body = self.successResultOf(response.text())
        self.assertIn("qb_port_sync_current_port 51413.0\n", body)
        self.assertIn("qb_port_sync_port_updates_total 1.0\n", body)
        self.assertEqual(body.encode(), metrics.exposition())

    def test_onlyWhatIsEnabled(self) -> None:
        """A root without metrics has no /metrics; without health no /healthz."""
        noMetrics = _stub(_Holder(GOOD), None, health=True)
        response = self.successResultOf(noMetrics.get("http://localhost/metrics"))
        self.assertEqual(response.code, 404)
        noHealth = _stub(_Holder(GOOD), Metrics.create(), health=False)
        for path in ("healthz", "status"):
            response = self.successResultOf(noHealth.get(f"http://localhost/{path}"))
            self.assertEqual(response.code, 404)

    def test_index(self) -> None:
        """The root lists the paths it serves."""
        stub = _stub(_Holder(GOOD), Metrics.create(), health=True)
        response = self.successResultOf(stub.get("http://localhost/"))
        self.assertEqual(
            self.successResultOf(response.text()), "/healthz\n/metrics\n/status\n"
        )


def _config(metrics: ListenConfig, health: ListenConfig) -> Config:
    return Config(metrics=metrics, health=health)


def _plan(config: Config) -> list[tuple[tuple[str, ...], str, int, tuple[str, ...]]]:
    listeners = planWeb(config, _Holder(GOOD).get, Metrics.create(), Clock())
    return [(each.keys, each.address, each.port, each.paths) for each in listeners]


class PlanTests(SynchronousTestCase):
    """Which addresses the [metrics] and [health] sections ask for."""

    def test_nothingEnabled(self) -> None:
        """By default nothing listens."""
        self.assertEqual(_plan(Config()), [])

    def test_samePortShared(self) -> None:
        """The same port in both sections is one listener, as in the reference."""
        config = _config(ListenConfig(True, 9000), ListenConfig(True, 9000))
        self.assertEqual(len(_plan(config)), 1)

    def test_twoPorts(self) -> None:
        """Different ports (and addresses) give two listeners."""
        config = _config(
            ListenConfig(True, 9000, "0.0.0.0"), ListenConfig(True, 9001, "::1")
        )
        self.assertEqual(
            _plan(config),
            [
                (("metrics.port",), "0.0.0.0", 9000, ("/metrics",)),
                (("health.port",), "::1", 9001, ("/healthz", "/status")),
            ],
        )


class WebServiceTests(SynchronousTestCase):
    """WebService listens where planned, on the given reactor."""

    def test_listensOnInterface(self) -> None:
        """Each listener becomes listenTCP(port, site, interface=address)."""
        reactor = MemoryReactor()
        config = _config(
            ListenConfig(True, 9000), ListenConfig(True, 9001, "192.0.2.7")
        )
        service = makeWebService(
            reactor, Clock(), config, _Holder(GOOD).get, Metrics.create()
        )
        service.startService()
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(9000, "127.0.0.1"), (9001, "192.0.2.7")],
        )
        service.listen()
        self.assertEqual(len(reactor.tcpServers), 2, "listen() is idempotent")

    def test_listenErrorMessage(self) -> None:
        """ListenError's message names the keys and the address:port."""
        self.assertEqual(
            str(ListenError(("metrics.port",), "::1", 9000, "Address in use")),
            "metrics.port: cannot listen on [::1]:9000: Address in use",
        )


def _listener(keys: tuple[str, ...], port: int, root: Resource) -> WebListener:
    return WebListener(keys, "127.0.0.1", port, makeSite(root, Clock()), ("/metrics",))


class RealListenTests(TestCase):
    """The service on a real port of 127.0.0.1."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: IReactorTCP = reactor

    async def test_fetch(self) -> None:
        """A real HTTP GET of /healthz and /metrics from the running service."""
        metrics = Metrics.create()
        metrics.current_port.set(51413)
        clock = Clock()
        clock.advance(NOW)
        root = makeWebRoot(_Holder(GOOD).get, metrics, True, clock)
        service = WebService(self.reactor, [_listener(("metrics.port",), 0, root)])
        service.startService()
        self.addCleanup(service.stopService)
        host = service.ports[0].getHost()
        assert isinstance(host, IPv4Address)
        base = f"http://127.0.0.1:{host.port}"
        metricsResponse = await treq.get(f"{base}/metrics", persistent=False)
        self.assertEqual(metricsResponse.code, 200)
        self.assertIn(
            b"qb_port_sync_current_port 51413.0", await metricsResponse.content()
        )
        healthResponse = await treq.get(f"{base}/healthz", persistent=False)
        self.assertEqual(healthResponse.code, 200)
        self.assertEqual(await healthResponse.content(), b"OK")

    async def test_portInUse(self) -> None:
        """A port already in use raises ListenError naming the key and port."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        root = makeWebRoot(_Holder(GOOD).get, None, True, Clock())
        service = WebService(
            self.reactor,
            [
                _listener(("metrics.port",), 0, root),
                _listener(("health.port",), port, root),
            ],
        )
        error = self.assertRaises(ListenError, service.listen)
        self.assertEqual(
            str(error),
            f"health.port: cannot listen on 127.0.0.1:{port}: Address already in use",
        )
        self.assertEqual((error.keys, error.port), (("health.port",), port))
        self.assertEqual(len(service.ports), 1)
        await service.stopService()
        self.assertEqual(service.ports, [])
