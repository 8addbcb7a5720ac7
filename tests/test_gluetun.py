"""Tests for qbportsync.sources.gluetun, against the emulation in fakegluetun."""

from __future__ import annotations

import json
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from qbportsync.config import GluetunConfig
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    SourceError,
    SourceTrouble,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.gluetun import (
    DEFAULT_URL,
    GluetunRefused,
    GluetunSource,
    authHeaders,
    parsePort,
)
from tests.fakegluetun import NEW_ROUTE, OLD_ROUTE, FakeGluetun

URL = "http://127.0.0.1:8000"
KEY = "gluetun-Secret-Key-0042"
PASSWORD = "gluetun-Secret-Pass-0042"


def makeSource(
    fake: FakeGluetun | Resource,
    config: GluetunConfig | None = None,
    clock: Clock | None = None,
    timeout: float = 10.0,
) -> tuple[GluetunSource, Clock]:
    clock = clock or Clock()
    resource = fake.resource() if isinstance(fake, FakeGluetun) else fake
    http = cast(HTTPClient, StubTreq(resource))
    config = config or GluetunConfig(url=URL, api_key=KEY)
    source = GluetunSource(
        clock, http, config, Metrics.create(), timeout=timeout, rnd=lambda: 0.5
    )
    return source, clock


class ParseTests(SynchronousTestCase):
    """parsePort: gluetun's JSON answer, strictly."""

    def test_ports(self) -> None:
        """A port and 0 ("none yet") are read; whitespace does not matter."""
        self.assertEqual(parsePort(b'{"port": 51413}\n'), 51413)
        self.assertEqual(parsePort(b'{"port":0}'), 0)

    def test_malformed(self) -> None:
        """Anything else is a ValueError saying what was wrong."""
        for body, why in [
            (b"", "not JSON"),
            (b"<html>", "not JSON"),
            (b"\xff\xfe", "not JSON"),
            (b"[51413]", 'not a JSON object with a "port"'),
            (b'{"ports": [1]}', 'not a JSON object with a "port"'),
            (b'{"port": "51413"}', '"port" is not a whole number'),
            (b'{"port": true}', '"port" is not a whole number'),
            (b'{"port": 1.5}', '"port" is not a whole number'),
            (b'{"port": 70000}', '"port" 70000 is outside 0-65535'),
            (b'{"port": -1}', '"port" -1 is outside 0-65535'),
            (b" " * 5000, "too long"),
        ]:
            e = self.assertRaises(ValueError, parsePort, body)
            self.assertIn(why, str(e), body)

    @given(st.binary(max_size=64))
    def test_neverCrashes(self, body: bytes) -> None:
        """Any bytes give a port in 0-65535 or a ValueError, nothing else."""
        try:
            port = parsePort(body)
        except ValueError:
            return
        self.assertTrue(0 <= port <= 65535)


class AuthTests(SynchronousTestCase):
    """What we send to authenticate."""

    def test_headers(self) -> None:
        """API key as X-API-Key, user and password as basic auth, or neither."""
        self.assertEqual(authHeaders(GluetunConfig()), {"Accept": "application/json"})
        self.assertEqual(authHeaders(GluetunConfig(api_key=KEY))["X-API-Key"], KEY)
        self.assertEqual(
            authHeaders(GluetunConfig(username="u", password="p"))["Authorization"],
            b"Basic dTpw",
        )

    def test_apiKeyAccepted(self) -> None:
        """The emulation with auth = "apikey" accepts our key."""
        fake = FakeGluetun(port=40000, apiKey=KEY)
        source, _ = makeSource(fake)
        self.assertEqual(self.successResultOf(source.fetchOnce()).port, 40000)
        self.assertEqual(fake.requests[0][1][b"x-api-key"], KEY.encode())

    def test_basicAccepted(self) -> None:
        """The emulation with auth = "basic" accepts our user and password."""
        fake = FakeGluetun(port=40001, username="bob", password=PASSWORD)
        config = GluetunConfig(url=URL, username="bob", password=PASSWORD)
        source, _ = makeSource(fake, config)
        self.assertEqual(self.successResultOf(source.fetchOnce()).port, 40001)

    def test_refusedOnce(self) -> None:
        """
        A 401 in the one-shot mode is a config error naming the key, and
        never carrying the secret.
        """
        fake = FakeGluetun(port=40000, apiKey="another-key")
        source, _ = makeSource(fake)
        failure = self.failureResultOf(source.fetchOnce(), GluetunRefused)
        message = failure.getErrorMessage()
        self.assertIn("refused the API key ([gluetun] api_key) (HTTP 401)", message)
        self.assertNotIn(KEY, message)
        self.assertNotIn(KEY, repr(source))

    def test_noCredentialsConfigured(self) -> None:
        """A 401 with nothing configured says which keys to set."""
        fake = FakeGluetun(port=40000, username="u", password="p")
        source, _ = makeSource(fake, GluetunConfig(url=URL))
        failure = self.failureResultOf(source.fetchOnce(), GluetunRefused)
        self.assertIn("set [gluetun] api_key", failure.getErrorMessage())

    def test_refusedDaemon(self) -> None:
        """In the daemon a 401 is a permanent SourceTrouble of kind auth."""
        fake = FakeGluetun(port=40000, username="u", password="right")
        config = GluetunConfig(url=URL, username="u", password=PASSWORD)
        source, _ = makeSource(fake, config)
        seen: list[Forwarded | SourceTrouble] = []
        with capturedLogs() as events:
            source.start(seen.append)
        self.assertEqual(len(seen), 1)
        trouble = seen[0]
        assert isinstance(trouble, SourceTrouble)
        self.assertEqual((trouble.kind, trouble.permanent), ("auth", True))
        self.assertIn("[gluetun] username, password", trouble.cause)
        for event in events:
            self.assertNotIn(PASSWORD, formatEvent(event))


class RouteTests(SynchronousTestCase):
    """Which route is asked: the current one, or the old one after a 404."""

    def test_newRoute(self) -> None:
        """A current gluetun is asked at /v1/portforward only."""
        fake = FakeGluetun(port=40000, apiKey=KEY)
        source, _ = makeSource(fake)
        self.successResultOf(source.fetchOnce())
        self.assertEqual([path for path, _ in fake.requests], [NEW_ROUTE])

    def test_oldGluetunRemembered(self) -> None:
        """After a 404 the old route is asked, and from then on first."""
        fake = FakeGluetun(port=40000, apiKey=KEY, old=True)
        source, _ = makeSource(fake)
        self.assertEqual(self.successResultOf(source.fetchOnce()).port, 40000)
        self.successResultOf(source.fetchOnce())
        self.assertEqual(
            [path for path, _ in fake.requests], [NEW_ROUTE, OLD_ROUTE, OLD_ROUTE]
        )

    def test_upgradedGluetun(self) -> None:
        """If the remembered old route goes away, the new one is tried again."""
        fake = FakeGluetun(port=40000, apiKey=KEY, old=True)
        source, _ = makeSource(fake)
        self.successResultOf(source.fetchOnce())
        fake.old = False
        fake.port = 40002
        self.assertEqual(self.successResultOf(source.fetchOnce()).port, 40002)

    def test_notGluetun(self) -> None:
        """404 on both routes: the URL is not gluetun's, and the error says so."""
        source, _ = makeSource(Resource())
        failure = self.failureResultOf(source.fetchOnce(), SourceError)
        self.assertIn("is [gluetun] url gluetun's control server?", str(failure.value))

    def test_defaultURL(self) -> None:
        """An empty url means gluetun's own default address."""
        source, _ = makeSource(FakeGluetun(), GluetunConfig())
        self.assertEqual(source.url, DEFAULT_URL)


class OnceTests(SynchronousTestCase):
    """fetchOnce: the one-shot mode's answers."""

    def test_noPortYet(self) -> None:
        """Port 0 is a transient error: the VPN is still connecting."""
        source, _ = makeSource(FakeGluetun(port=0, apiKey=KEY))
        failure = self.failureResultOf(source.fetchOnce(), SourceError)
        self.assertIn("has no forwarded port yet", str(failure.value))

    def test_malformed(self) -> None:
        """Nonsense from gluetun is a transient error naming the problem."""
        source, _ = makeSource(FakeGluetun(apiKey=KEY, body=b'{"port": "x"}'))
        failure = self.failureResultOf(source.fetchOnce(), SourceError)
        self.assertIn('"port" is not a whole number', str(failure.value))

    def test_serverError(self) -> None:
        """An HTTP 500 is a transient error."""
        source, _ = makeSource(FakeGluetun(apiKey=KEY, status=500))
        failure = self.failureResultOf(source.fetchOnce(), SourceError)
        self.assertIn("answered HTTP 500", str(failure.value))

    def test_timeout(self) -> None:
        """A gluetun that never answers fails after the timeout."""
        source, clock = makeSource(_Silent(), timeout=3.0)
        d = source.fetchOnce()
        self.assertNoResult(d)
        clock.advance(3.0)
        failure = self.failureResultOf(d, SourceError)
        self.assertIn("did not answer within 3 s", str(failure.value))


class _Silent(Resource):
    """A server that accepts requests and never answers them."""

    isLeaf = True

    def render(self, request: Request) -> object:
        return NOT_DONE_YET


class DaemonTests(SynchronousTestCase):
    """start/stop: polling, troubles, keeping the last port."""

    def setUp(self) -> None:
        self.fake = FakeGluetun(port=40000, apiKey=KEY)
        self.source, self.clock = makeSource(
            self.fake, GluetunConfig(url=URL, api_key=KEY, poll_interval_secs=10)
        )
        self.seen: list[Forwarded | SourceTrouble] = []
        self.source.start(self.seen.append)

    def ports(self) -> list[int | str]:
        return [s.port if isinstance(s, Forwarded) else s.kind for s in self.seen]

    def test_interface(self) -> None:
        """GluetunSource provides IPortSource."""
        self.assertTrue(verifyObject(IPortSource, self.source))

    def test_pollsEveryInterval(self) -> None:
        """The port is reported at once, then after every poll interval."""
        self.assertEqual(self.ports(), [40000])
        self.clock.advance(9.9)
        self.assertEqual(len(self.fake.requests), 1)
        self.clock.advance(0.1)
        self.fake.port = 40001
        self.clock.advance(10)
        self.assertEqual(self.ports(), [40000, 40000, 40001])

    def test_noPortKeepsLast(self) -> None:
        """Port 0 reports a trouble and no port: the last one stays in use."""
        self.fake.port = 0
        self.clock.advance(10)
        trouble = self.seen[-1]
        assert isinstance(trouble, SourceTrouble)
        self.assertIn(
            "gluetun at http://127.0.0.1:8000 has no forwarded port yet", trouble.cause
        )
        self.assertFalse(trouble.permanent)
        self.fake.port = 40000
        self.clock.advance(10)
        self.assertEqual(self.ports(), [40000, "gluetun", 40000])

    def test_malformedBacksOff(self) -> None:
        """
        A malformed answer is a parse trouble; polls come again after 1 s,
        2 s, 4 s... up to the poll interval, and back to normal after success.
        """
        self.fake.body = b"{"
        times = []
        for _ in range(6):
            before = len(self.fake.requests)
            waited = 0.0
            while len(self.fake.requests) == before:
                self.clock.advance(0.5)
                waited += 0.5
            times.append(waited)
        self.assertEqual(times, [10.0, 1.0, 2.0, 4.0, 8.0, 10.0])
        self.assertEqual(set(self.ports()[1:]), {"parse"})
        self.fake.body = None
        self.clock.advance(10)
        self.assertEqual(self.ports()[-1], 40000)
        before = len(self.fake.requests)
        self.clock.advance(9.9)
        self.assertEqual(len(self.fake.requests), before)

    def test_stop(self) -> None:
        """After stop, nothing is asked or reported."""
        self.successResultOf(self.source.stop())
        self.clock.advance(100)
        self.assertEqual((len(self.fake.requests), self.ports()), (1, [40000]))

    def test_stopCancelsInFlight(self) -> None:
        """A request in flight is abandoned at stop and reports nothing."""
        source, clock = makeSource(_Silent())
        seen: list[object] = []
        source.start(seen.append)
        self.successResultOf(source.stop())
        clock.advance(100)
        self.assertEqual(seen, [])


class ChangeLogTests(SynchronousTestCase):
    """What the source logs."""

    def test_logsChangesOnly(self) -> None:
        """A new port is logged once, not at every poll."""
        fake = FakeGluetun(port=40000, apiKey=KEY)
        source, clock = makeSource(fake)
        with capturedLogs() as events:
            source.start(lambda seen: None)
            clock.advance(30)
        said = [formatEvent(e) for e in events if "forwards port" in formatEvent(e)]
        self.assertEqual(said, ["gluetun at http://127.0.0.1:8000 forwards port 40000"])


class JSONShapeTests(SynchronousTestCase):
    """The emulation answers as gluetun does."""

    def test_emulation(self) -> None:
        """GET /v1/portforward answers {"port": N} with the key, 401 without."""
        fake = FakeGluetun(port=12345, apiKey=KEY)
        stub = StubTreq(fake.resource())
        response = self.successResultOf(
            stub.get(URL + "/v1/portforward", headers={"X-API-Key": KEY})
        )
        self.assertEqual(
            json.loads(self.successResultOf(response.content())), {"port": 12345}
        )
        response = self.successResultOf(stub.get(URL + "/v1/portforward"))
        self.assertEqual(response.code, 401)
