"""Tests for qbportsync.web and the health rules of qbportsync.status."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

import treq
from attrs import evolve
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactor,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from qbportsync.config import Config, ListenConfig
from qbportsync.metrics import Metrics
from qbportsync.status import SyncStatus, isHealthy, statusLine
from qbportsync.web import (
    GRACE,
    MAX_CONNECTIONS,
    REQUEST_DEADLINE,
    Connections,
    ListenError,
    WebListener,
    WebService,
    connectionCap,
    makeSite,
    makeWebRoot,
    makeWebService,
    planWeb,
)
from tests.test_config import ConfigTestCase

NOW = 1_700_000_000.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    listeners = planWeb(
        config, _Holder(GOOD).get, Metrics.create(), Clock(), Connections(8, Clock())
    )
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


class MetricsOffTests(ConfigTestCase):
    """Health keeps working when metrics are not served."""

    def test_metricsPortZero(self) -> None:
        """metrics enabled with port 0: only health listens, on its own port."""
        config = self.load(
            "[metrics]\nenabled = true\nport = 0\n"
            "[health]\nenabled = true\nport = 9001\n"
        )
        self.assertEqual(
            _plan(config),
            [(("health.port",), "127.0.0.1", 9001, ("/healthz", "/status"))],
        )

    def test_metricsDisabled(self) -> None:
        """metrics disabled with a port: health serves alone on that port."""
        config = self.load(
            "[metrics]\nenabled = false\nport = 9000\n[health]\nenabled = true\n"
        )
        self.assertEqual(
            _plan(config),
            [(("health.port",), "127.0.0.1", 9000, ("/healthz", "/status"))],
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
    site = makeSite(root, Clock(), Connections(8, Clock()))
    return WebListener(keys, "127.0.0.1", port, site, ("/metrics",))


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


def _connect(
    site: Site,
    host: str = "127.0.0.1",
    port: int = 40000,
    transport: StringTransport | None = None,
) -> tuple[Protocol | None, StringTransport]:
    """
    A connection to C{site} from C{host} over a string transport; the
    protocol is None when the site turned it away.  By default closing the
    transport tells the protocol at once, as a closed socket would.
    """
    channel = site.buildProtocol(IPv4Address("TCP", host, port))
    if transport is None:
        transport = StringTransportWithDisconnection()
        transport.protocol = channel
    if channel is not None:
        channel.makeConnection(transport)
    return channel, transport


_GET = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


class BoundsTests(SynchronousTestCase):
    """Whoever reaches the port cannot hold descriptors or memory for long."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.connections = Connections(3, self.clock)
        root = makeWebRoot(_Holder(GOOD).get, Metrics.create(), True, self.clock)
        self.site = makeSite(root, self.clock, self.connections)

    def test_cap(self) -> None:
        """A quarter of the descriptor limit, from 4 up to MAX_CONNECTIONS."""
        self.assertEqual(
            [connectionCap(n) for n in (8, 256, 1024, 4096, 1 << 20)],
            [4, 64, 256, 512, MAX_CONNECTIONS],
        )
        self.assertEqual(connectionCap(resource.RLIM_INFINITY), MAX_CONNECTIONS)

    def test_unitsRaiseTheLimit(self) -> None:
        """
        The systemd units raise the descriptor limit above systemd's 1,024,
        so that the endpoints get their full cap and the daemon thrice as
        many for itself.
        """
        units = sorted(glob.glob(os.path.join(ROOT, "systemd", "*.service")))
        self.assertGreaterEqual(len(units), 2)
        for unit in units:
            with open(unit) as f:
                limits = [
                    line.partition("=")[2].strip()
                    for line in f
                    if line.startswith("LimitNOFILE=")
                ]
            self.assertEqual(len(limits), 1, unit)
            limit = int(limits[0])
            self.assertEqual(connectionCap(limit), MAX_CONNECTIONS, unit)
            self.assertGreaterEqual(limit - MAX_CONNECTIONS, 3 * MAX_CONNECTIONS)

    def test_serviceCapFromLimit(self) -> None:
        """The web service takes its cap from the descriptor limit given."""
        config = _config(ListenConfig(True, 9000), ListenConfig(True, 9001))
        service = makeWebService(
            MemoryReactor(), Clock(), config, _Holder(GOOD).get, Metrics.create(), 256
        )
        metricsSite, healthSite = (each.site for each in service.listeners)
        self.assertEqual(metricsSite.connections.cap, 64)
        self.assertIs(metricsSite.connections, healthSite.connections)

    def test_idleConnectionCut(self) -> None:
        """A connection that sends nothing is closed after REQUEST_DEADLINE."""
        _, transport = _connect(self.site)
        self.clock.advance(REQUEST_DEADLINE - 0.1)
        self.assertTrue(transport.connected)
        self.clock.advance(0.1)
        self.assertFalse(transport.connected)
        self.assertEqual(len(self.connections), 0)

    def test_slowHeadersCut(self) -> None:
        """Headers trickling in a byte at a time do not push the deadline back."""
        _, transport = _connect(self.site)
        for byte in _GET[:-3]:
            self.clock.advance(REQUEST_DEADLINE / len(_GET))
            transport.protocol.dataReceived(bytes([byte]))
        self.assertTrue(transport.connected)
        self.clock.advance(REQUEST_DEADLINE)
        self.assertFalse(transport.connected)
        self.assertEqual(transport.value(), b"")

    def test_keepAliveDeadlineRestarts(self) -> None:
        """After an answer the next request has a full deadline again."""
        _, transport = _connect(self.site)
        self.clock.advance(REQUEST_DEADLINE - 0.1)
        transport.protocol.dataReceived(_GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.clock.advance(REQUEST_DEADLINE - 0.1)
        self.assertTrue(transport.connected)
        self.clock.advance(0.1)
        self.assertFalse(transport.connected)

    def _refused(self, request: bytes) -> bytes:
        def noTemporaryFiles(*args: object, **kwargs: object) -> NoReturn:
            raise AssertionError("a request body went to a temporary file")

        self.patch(tempfile, "TemporaryFile", noTemporaryFiles)
        _, transport = _connect(self.site)
        transport.protocol.dataReceived(request)
        self.assertFalse(transport.connected)
        self.assertEqual(len(self.connections), 0)
        return transport.value()

    def test_bodyRefusedUnread(self) -> None:
        """A 200 MB POST gets 413 from its headers; nothing of it is stored."""
        answer = self._refused(
            b"POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 200000000\r\n\r\n" + b"x" * 65536
        )
        self.assertEqual(
            answer,
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 32\r\nConnection: close\r\n\r\n"
            b"These paths take no request body\n",
        )

    def test_chunkedBodyRefused(self) -> None:
        """A chunked body, of no stated length, is refused the same way."""
        answer = self._refused(
            b"POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 65536
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "))

    def test_noContinueForABody(self) -> None:
        """A client that asks before sending its body is told 413, not 100."""
        answer = self._refused(
            b"PUT /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", answer)

    def test_emptyBodyAnswered(self) -> None:
        """Content-Length: 0 is no body: the request is answered."""
        _, transport = _connect(self.site)
        transport.protocol.dataReceived(
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_busiestAddressTurnedAway(self) -> None:
        """
        At the cap the address holding the most gets no more at once; after
        GRACE its own oldest connection gives way to its new one.
        """
        transports = [_connect(self.site, "192.0.2.1", 40000 + n)[1] for n in range(3)]
        self.clock.advance(GRACE - 0.1)
        channel, _ = _connect(self.site, "192.0.2.1", 40003)
        self.assertIsNone(channel)
        self.assertEqual([each.connected for each in transports], [True] * 3)
        self.assertEqual(len(self.connections), 3)
        self.clock.advance(0.1)
        channel, _ = _connect(self.site, "192.0.2.1", 40004)
        self.assertIsNotNone(channel)
        self.assertEqual([each.connected for each in transports], [False, True, True])

    def test_otherAddressGetsIn(self) -> None:
        """Another address closes the busiest one's oldest and is answered."""
        flood = [_connect(self.site, "192.0.2.1", 40000 + n)[1] for n in range(3)]
        channel, transport = _connect(self.site, "127.0.0.1")
        self.assertIsNotNone(channel)
        self.assertEqual([each.connected for each in flood], [False, True, True])
        self.assertEqual(len(self.connections), 3)
        transport.protocol.dataReceived(_GET)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        flood[1].loseConnection()
        self.assertEqual(len(self.connections), 2)

    def test_closingStillCounts(self) -> None:
        """
        A connection closed to make room holds its descriptor until the
        close is done: until then no more room is made.
        """
        connections = Connections(8, self.clock)
        root = makeWebRoot(_Holder(GOOD).get, None, True, self.clock)
        site = makeSite(root, self.clock, connections)
        flood = [
            _connect(site, "192.0.2.1", 40000 + n, StringTransport()) for n in range(8)
        ]
        self.assertIsNotNone(_connect(site, "192.0.2.2")[0])
        self.assertEqual(len(connections), 9)
        self.assertIsNone(_connect(site, "192.0.2.3")[0])
        oldest, transport = flood[0]
        assert oldest is not None
        self.assertTrue(transport.disconnecting)
        oldest.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(connections), 8)
        self.assertIsNotNone(_connect(site, "192.0.2.3")[0])

    def test_warnsOncePerFlood(self) -> None:
        """Reaching the cap is logged once, not once per connection."""
        with capturedLogs() as events:
            for n in range(20):
                _connect(self.site, "192.0.2.1", 40000 + n)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn(
            "3 operator connections open at once, the most allowed",
            formatEvent(warnings[0]),
        )


HOSTILE = 1000
CHILD_LIMIT = 256


class _Child:
    """tests.webchild running under CHILD_LIMIT descriptors, stopped by PID."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.webchild", str(CHILD_LIMIT)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            stdout=subprocess.PIPE,
        )
        case.addCleanup(self.stop)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise AssertionError(f"the child did not start: {line!r}")
        self.port = int(line)

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def get(self, path: str) -> tuple[bytes, float]:
        """One request on a fresh connection: the whole answer, and seconds."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer, time.monotonic() - started


def _body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


class FloodTests(SynchronousTestCase):
    """
    The real web service in a child process limited to 256 descriptors,
    under 1,000 hostile connections from this test.
    """

    def hostile(self, port: int) -> list[socket.socket]:
        """
        HOSTILE connections from another loopback address (127.0.0.2, as
        from another host), each sending half a request line, then idling.
        """
        sockets: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in sockets])
        for _ in range(HOSTILE):
            s = socket.socket()
            sockets.append(s)
            s.setblocking(False)
            s.bind(("127.0.0.2", 0))
            s.connect_ex(("127.0.0.1", port))
        deadline = time.monotonic() + 20
        waiting = list(sockets)
        while waiting and time.monotonic() < deadline:
            _, writable, _ = select.select([], waiting, [], 1)
            for s in writable:
                waiting.remove(s)
                with contextlib.suppress(OSError):
                    s.send(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        self.assertEqual(waiting, [], "connections still pending after 20 s")
        return sockets

    def test_hugePostRefused(self) -> None:
        """A 200 MB POST over a real socket is answered 413 and cut off."""
        child = _Child(self)
        with socket.create_connection(("127.0.0.1", child.port), timeout=5) as s:
            s.sendall(
                b"POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Length: 200000000\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                for _ in range(64):
                    s.sendall(b"x" * 65536)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n"))
        probe = json.loads(_body(child.get("/probe")[0]))
        self.assertEqual(probe["connections"], 1)

    def test_healthUnderFlood(self) -> None:
        """/healthz answers at once, and the daemon keeps descriptors to work."""
        child = _Child(self)
        sockets = self.hostile(child.port)
        for _ in range(5):
            answer, seconds = child.get("/healthz")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
            self.assertEqual(_body(answer), b"OK")
            self.assertLess(seconds, 2.0)
        probe = json.loads(_body(child.get("/probe")[0]))
        self.assertGreater(probe["done"], 0)
        self.assertEqual(probe["failed"], 0)
        self.assertLessEqual(probe["connections"], connectionCap(CHILD_LIMIT))
        # At least half the descriptors stayed free for the daemon throughout.
        self.assertLess(probe["peak"], CHILD_LIMIT // 2)
        # Every hostile connection is closed: given way or past its deadline.
        deadline = time.monotonic() + REQUEST_DEADLINE + 10
        open_ = list(sockets)
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 1)
            for s in readable:
                with contextlib.suppress(OSError):
                    if s.recv(4096):
                        continue
                open_.remove(s)
        self.assertEqual(len(open_), 0, "hostile connections still open")
        self.assertEqual(json.loads(_body(child.get("/probe")[0]))["connections"], 1)
