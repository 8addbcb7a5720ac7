"""Tests for qbportsync.qbittorrent, against the 4.5 and 5.2 emulations."""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from attrs import evolve
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHostnameResolver,
    IListeningPort,
    IReactorPluggableNameResolver,
    IReactorTime,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qbportsync.config import ConfigError, QBittorrentConfig
from qbportsync.interfaces import ApplyResult, IPortSink
from qbportsync.qbittorrent import (
    READ_BACK_PAUSE_SECS,
    RELISTEN_PAUSE_SECS,
    LoginRefused,
    QBittorrentClient,
    QBittorrentError,
    _wholeBody,
    makeHTTPClient,
)
from qbportsync.refusals import (
    BAN_SECS,
    LOGIN_TRIES,
    RETRY_AFTER_REFUSAL,
    Credentials,
    RefusalStore,
)
from tests.fakeqbittorrent import FakeQBittorrent, Version

PASSWORD = "s3cret-Pa55word"
API_KEY = "qbt_Zx9Secret0ApiKey4Tests"
BASE = "http://127.0.0.1:8080"
PREFS = f"{BASE}/api/v2/app/preferences"
LOGIN = f"{BASE}/api/v2/auth/login"
TEST_HASH_COST = 2**4
"""scrypt's N in tests: the production cost would take seconds in all."""

T = TypeVar("T")


def qbConfig(
    baseURL: str = BASE, password: str = PASSWORD, apiKey: str = ""
) -> QBittorrentConfig:
    return QBittorrentConfig(
        base_url=baseURL, username="admin", password=password, api_key=apiKey
    )


def refusalStore(case: SynchronousTestCase, clock: IReactorTime) -> RefusalStore:
    """A login-refusal record of its own for one test, quick to hash."""
    return RefusalStore(clock, case.mktemp(), hashCost=TEST_HASH_COST)


def newClient(
    case: SynchronousTestCase,
    clock: IReactorTime,
    http: HTTPClient,
    config: QBittorrentConfig,
) -> QBittorrentClient:
    """A client with a login-refusal record of its own."""
    return QBittorrentClient(clock, http, config, refusalStore(case, clock))


def makeClient(
    case: SynchronousTestCase,
    fake: FakeQBittorrent,
    config: QBittorrentConfig | None = None,
    store: RefusalStore | None = None,
) -> tuple[QBittorrentClient, Clock]:
    """A client of C{fake} on a fresh clock; C{store} shares a record."""
    clock = Clock()
    if store is not None:
        store = RefusalStore(clock, store.directory, store.lockTimeout, TEST_HASH_COST)
    client = QBittorrentClient(
        clock,
        fake.httpClient(),
        config or qbConfig(),
        store or refusalStore(case, clock),
    )
    return client, clock


def afterPause(clock: Clock, d: Deferred[T]) -> Deferred[T]:
    """C{d}, once the pause before the read-back has passed on C{clock}."""
    clock.advance(READ_BACK_PAUSE_SECS)
    return d


def stubClient(resource: Resource) -> HTTPClient:
    return cast(HTTPClient, StubTreq(resource))


@contextmanager
def warnings() -> Iterator[list[LogEvent]]:
    """Collect the warning and error events logged inside the block."""
    with capturedLogs() as events:
        loud: list[LogEvent] = []
        yield loud
    loud.extend(e for e in events if e["log_level"].name in ("warn", "error"))


GET_PREFS = "GET app/preferences"
SET_PREFS = "POST app/setPreferences"


def _calls(fake: FakeQBittorrent) -> list[str]:
    """The requests C{fake} saw, as C{"METHOD endpoint"}."""
    return [f"{r.method} {r.path.removeprefix('/api/v2/')}" for r in fake.requests]


class _Leaf(Resource):
    """A resource that answers for every path below it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()


class _Silent(_Leaf):
    """Never answers."""

    def render(self, request: Request) -> object:
        return NOT_DONE_YET


class _Redirect(_Leaf):
    """Sends every request somewhere else."""

    def render(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.responseHeaders.setRawHeaders(b"location", [b"https://elsewhere/"])
        return b""


class _ForeignHost(_Leaf):
    """A proxy that changes the Host header, so Origin no longer matches it."""

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Request) -> bytes:
        request.requestHeaders.setRawHeaders(b"host", [b"elsewhere:80"])
        return self._wrapped.render(request)  # type: ignore[no-any-return]


class _Spy(_Leaf):
    """Passes requests on, keeping each setPreferences form field json."""

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self._wrapped = wrapped
        self.posted: list[bytes] = []

    def render(self, request: Request) -> bytes:
        if request.path.endswith(b"/setPreferences"):
            self.posted.append(request.args[b"json"][0])
        return self._wrapped.render(request)  # type: ignore[no-any-return]


class _HeldLogin(_Leaf):
    """Passes requests on, but holds each login answer until released."""

    def __init__(self, fake: FakeQBittorrent) -> None:
        super().__init__()
        self._fake = fake
        self.held: list[Request] = []

    def render(self, request: Request) -> object:
        if request.path.endswith(b"/auth/login"):
            self.held.append(request)
            return NOT_DONE_YET
        return self._fake.render(request)

    def release(self) -> None:
        for request in self.held:
            request.write(self._fake.render(request))
            request.finish()


class LoginTests(SynchronousTestCase):
    """Logging in to each emulated version, lazily and once."""

    def loginWorks(self, version: Version, cookie: str) -> None:
        fake = FakeQBittorrent(version, password=PASSWORD)
        client, _ = makeClient(self, fake)
        self.assertEqual(self.successResultOf(client.listenPort()), 8999)
        self.assertEqual(self.successResultOf(client.version())[:4], f"v{version}")
        self.assertEqual(fake.loginAttempts, 1)
        self.assertEqual(fake.requests[0].path, "/api/v2/auth/login")
        self.assertIn(f"{cookie}=", fake.requests[-1].headers["cookie"])

    def test_login45(self) -> None:
        """4.5's 200 C{Ok.} logs in; the C{SID} cookie carries later calls."""
        self.loginWorks("4.5", "SID")

    def test_login52(self) -> None:
        """5.2's empty 204 logs in; the C{QBT_SID_8080} cookie carries later calls."""
        self.loginWorks("5.2", "QBT_SID_8080")

    def loginRefused(self, version: Version) -> None:
        fake = FakeQBittorrent(version, password="other")
        client, _ = makeClient(self, fake)
        refused = self.failureResultOf(client.listenPort(), LoginRefused).value
        assert isinstance(refused, LoginRefused)
        self.assertEqual(refused.reason, "credentials")
        self.assertEqual(refused.retryAt, RETRY_AFTER_REFUSAL)
        self.assertIn(BASE, str(refused))
        self.assertIn("wrong username or password", str(refused))
        self.assertEqual(fake.failedLogins, 1)

    def test_fails45(self) -> None:
        """4.5's 200 C{Fails.} is a refusal of the credentials."""
        self.loginRefused("4.5")

    def test_unauthorized52(self) -> None:
        """5.2's 401 on login is a refusal of the credentials."""
        self.loginRefused("5.2")

    def banned(self, version: Version) -> None:
        fake = FakeQBittorrent(version, password=PASSWORD)
        fake.failedLogins = 5
        client, clock = makeClient(self, fake)
        clock.advance(100)
        refused = self.failureResultOf(client.listenPort(), LoginRefused).value
        assert isinstance(refused, LoginRefused)
        self.assertEqual(refused.reason, "banned")
        self.assertEqual(refused.retryAt, 3700)
        self.assertIn("banned", str(refused))
        self.assertIn(BASE, str(refused))

    def test_banned45(self) -> None:
        """A 403 to 4.5's login means banned: no login for an hour."""
        self.banned("4.5")

    def test_banned52(self) -> None:
        """A 403 to 5.2's login means banned: no login for an hour."""
        self.banned("5.2")

    def test_strangeLoginAnswer(self) -> None:
        """A 200 that is neither Ok. nor Fails. is an error, not a refusal."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(200, b"<html>proxy login</html>", "auth/login")
        client, _ = makeClient(self, fake)
        f = self.failureResultOf(client.listenPort(), QBittorrentError)
        self.assertNotIsInstance(f.value, LoginRefused)
        self.assertIn(LOGIN, str(f.value))
        self.assertEqual(self.successResultOf(client.listenPort()), 8999)

    def test_loginOnce(self) -> None:
        """Calls after a login reuse the session instead of logging in again."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        for port in (1000, 2000, 3000):
            self.successResultOf(afterPause(clock, client.apply(port)))
        self.assertEqual(fake.loginAttempts, 1)

    def test_oneLoginAtATime(self) -> None:
        """Calls made while a login is under way wait for it; none sends another."""
        fake = FakeQBittorrent(password=PASSWORD)
        held = _HeldLogin(fake)
        stub = StubTreq(held)
        client = newClient(self, Clock(), cast(HTTPClient, stub), qbConfig())
        calls = [client.listenPort(), client.version(), client.listenPort()]
        self.assertEqual(len(held.held), 1)
        held.release()
        stub.flush()
        self.assertEqual(
            [self.successResultOf(d) for d in calls], [8999, "v4.5.2", 8999]
        )
        self.assertEqual(fake.loginAttempts, 1)

    def test_noTrafficBeforeNeed(self) -> None:
        """Making a client sends nothing; the login waits for the first call."""
        fake = FakeQBittorrent(password=PASSWORD)
        makeClient(self, fake)
        self.assertEqual(fake.requests, [])


class SessionExpiryTests(SynchronousTestCase):
    """A 403 from an endpoint: log in again once, retry once."""

    def test_reloginAfterExpiry(self) -> None:
        """An expired session is replaced by one new login and the call retried."""
        fake = FakeQBittorrent("5.2", password=PASSWORD)
        client, _ = makeClient(self, fake)
        self.successResultOf(client.listenPort())
        fake.expireSessions()
        self.assertEqual(self.successResultOf(client.listenPort()), 8999)
        self.assertEqual(fake.loginAttempts, 2)
        paths = [r.path.removeprefix("/api/v2/") for r in fake.requests]
        self.assertEqual(
            paths,
            [
                "auth/login",
                "app/preferences",
                "app/preferences",
                "auth/login",
                "app/preferences",
            ],
        )

    def test_reloginOnlyOnce(self) -> None:
        """A second 403 after the new login fails the call; no third login."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(403, b"Forbidden", "app/preferences")
        fake.failNext(403, b"Forbidden", "app/preferences")
        client, _ = makeClient(self, fake)
        f = self.failureResultOf(client.listenPort(), QBittorrentError)
        self.assertNotIsInstance(f.value, LoginRefused)
        self.assertIn(PREFS, str(f.value))
        self.assertEqual(fake.loginAttempts, 2)
        self.assertEqual(len(fake.requests), 4)

    def test_reloginRefused(self) -> None:
        """When the new login is refused, the call fails with LoginRefused."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, _ = makeClient(self, fake)
        self.successResultOf(client.listenPort())
        fake.expireSessions()
        fake.password = "changed"
        refused = self.failureResultOf(client.listenPort(), LoginRefused).value
        assert isinstance(refused, LoginRefused)
        self.assertEqual(refused.reason, "credentials")


class BanAvoidanceTests(SynchronousTestCase):
    """
    Refused logins are counted in the record on disk, shared by every client
    (every process) using it, so that none of them earns a ban.
    """

    def setUp(self) -> None:
        self.fake = FakeQBittorrent(password=PASSWORD, maxFailures=3)
        self.store = refusalStore(self, Clock())

    def client(
        self, password: str = "wrong", at: float = 0.0
    ) -> tuple[QBittorrentClient, Clock]:
        """A new client (as a new process would make) sharing the record."""
        client, clock = makeClient(
            self, self.fake, qbConfig(password=password), self.store
        )
        clock.advance(at)
        return client, clock

    def refused(self, client: QBittorrentClient | Deferred[Any]) -> LoginRefused:
        """The refusal a call of C{client} (or a call made) fails with."""
        d = client.listenPort() if isinstance(client, QBittorrentClient) else client
        refused = self.failureResultOf(d, LoginRefused).value
        assert isinstance(refused, LoginRefused)
        return refused

    def test_secondTryAfterTenMinutes(self) -> None:
        """
        After a refusal the same credentials are tried once more, no sooner
        than ten minutes later, and then never again.
        """
        client, clock = self.client()
        self.assertEqual(self.refused(client).retryAt, RETRY_AFTER_REFUSAL)
        clock.advance(RETRY_AFTER_REFUSAL - 1)
        seen = len(self.fake.requests)
        self.assertEqual(self.refused(client).retryAt, RETRY_AFTER_REFUSAL)
        self.assertEqual(len(self.fake.requests), seen)
        clock.advance(1)
        self.assertEqual(self.refused(client).retryAt, math.inf)
        clock.advance(10 * BAN_SECS)
        self.assertEqual(self.refused(client).retryAt, math.inf)
        self.assertEqual(self.fake.loginAttempts, LOGIN_TRIES)

    def test_sharedByEveryProcess(self) -> None:
        """
        Six one-shot runs with a wrong password, hours apart, each a new
        client: two failed logins in all, and no ban with a limit of 3.
        """
        for run in range(6):
            client, _ = self.client(at=run * BAN_SECS)
            self.failureResultOf(client.apply(4000), LoginRefused)
        self.assertEqual(self.fake.failedLogins, LOGIN_TRIES)
        self.assertFalse(self.fake.banned)

    def test_neverBanned(self) -> None:
        """
        A day of calls every 30 s with a wrong password, after one typo in a
        browser, never gets the address banned by qBittorrent's count of 5.
        """
        self.fake.maxFailures = 5
        self.fake.failedLogins = 1
        client, clock = self.client()
        for _ in range(24 * 120):
            client.listenPort().addErrback(lambda f: f.trap(LoginRefused))
            clock.advance(30)
        self.assertFalse(self.fake.banned)
        self.assertEqual(self.fake.failedLogins, 1 + LOGIN_TRIES)

    def test_fixedPasswordAtOnce(self) -> None:
        """
        Once the password is fixed, the next run logs in at once, and the
        good login forgets every refusal.
        """
        for at in (0, RETRY_AFTER_REFUSAL):
            self.refused(self.client(at=at)[0])
        client, _ = self.client(password=PASSWORD, at=RETRY_AFTER_REFUSAL + 1)
        self.assertEqual(self.successResultOf(client.listenPort()), 8999)
        with open(self.store.path) as f:
            self.assertEqual(json.load(f)["origins"], {})
        self.assertEqual(self.refused(self.client()[0]).retryAt, RETRY_AFTER_REFUSAL)

    def test_newCredentialsOneTry(self) -> None:
        """
        Another wrong password after the first one's two tries gets one
        try, not two: qBittorrent counts per address, not per password.
        """
        self.fake.maxFailures = 5
        for at in (0, RETRY_AFTER_REFUSAL):
            self.refused(self.client(at=at)[0])
        for at in (2 * RETRY_AFTER_REFUSAL, 4 * RETRY_AFTER_REFUSAL):
            refused = self.refused(self.client("wrong too", at)[0])
            self.assertEqual(refused.retryAt, math.inf)
        self.assertEqual(self.fake.failedLogins, LOGIN_TRIES + 1)

    def test_bannedWaitsAnHour(self) -> None:
        """After a ban no run logs in for an hour, whatever its credentials."""
        self.fake.failedLogins = 3
        client, _ = self.client(password=PASSWORD)
        self.assertEqual(self.refused(client).reason, "banned")
        self.fake.failedLogins = 0
        refused = self.refused(self.client(password=PASSWORD, at=BAN_SECS - 1)[0])
        self.assertEqual((refused.reason, refused.retryAt), ("banned", BAN_SECS))
        self.assertEqual(self.fake.loginAttempts, 1)
        client, _ = self.client(password=PASSWORD, at=BAN_SECS)
        self.assertEqual(self.successResultOf(client.listenPort()), 8999)

    def test_oneLoginAtATimeAcrossProcesses(self) -> None:
        """
        While one client's login is under way, another's waits for the
        record's lock, then reads the refusal instead of sending a login.
        """
        held = _HeldLogin(self.fake)
        stub = StubTreq(held)
        first = QBittorrentClient(
            Clock(), cast(HTTPClient, stub), qbConfig(password="wrong"), self.store
        )
        second, clock = self.client()
        pending = first.listenPort()
        waiting = second.listenPort()
        clock.advance(1)
        self.assertNoResult(waiting)
        held.release()
        stub.flush()
        self.failureResultOf(pending, LoginRefused)
        clock.advance(1)
        self.assertEqual(self.refused(waiting).retryAt, RETRY_AFTER_REFUSAL)
        self.assertEqual(self.fake.loginAttempts, 1)

    def test_lockTimeout(self) -> None:
        """A lock held too long fails the call, naming the file; no login."""
        turn = self.successResultOf(self.store.begin(Credentials("o", "u", "p")))
        self.addCleanup(turn.release)
        client, clock = self.client(password=PASSWORD)
        d = client.listenPort()
        clock.advance(self.store.lockTimeout)
        error = self.failureResultOf(d, QBittorrentError).value
        self.assertNotIsInstance(error, LoginRefused)
        self.assertIn("login-refusals.lock", str(error))
        self.assertEqual(self.fake.requests, [])

    def test_unusableRecord(self) -> None:
        """A record that cannot be kept: no login, and the fix named."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory\n")
        store = RefusalStore(Clock(), os.path.join(blocker, "state"))
        client, _ = makeClient(self, self.fake, qbConfig(), store)
        error = self.failureResultOf(client.listenPort(), QBittorrentError).value
        self.assertNotIsInstance(error, LoginRefused)
        self.assertIn(blocker, str(error))
        self.assertIn("STATE_DIRECTORY", str(error))
        self.assertEqual(self.fake.requests, [])

    def test_saysWhatToFix(self) -> None:
        """
        A refusal names where the password comes from, the record's path
        and how to try the same credentials again now.
        """
        config = evolve(qbConfig(password="wrong"), password_from="$SOMEWHERE")
        client, clock = makeClient(self, self.fake, config, self.store)
        first = str(self.refused(client))
        clock.advance(RETRY_AFTER_REFUSAL)
        last = str(self.refused(client))
        another, _ = makeClient(self, self.fake, config, self.store)
        fromRecord = str(self.refused(another))
        for text in (first, last):
            self.assertIn("wrong username or password", text)
        for text in (first, last, fromRecord):
            self.assertIn("$SOMEWHERE", text)
            self.assertIn(self.store.path, text)
            self.assertIn("--forget-refusals", text)
        self.assertIn("one more try", first)
        self.assertIn("no more tries", last)
        self.assertIn("not logging in", fromRecord)
        self.assertIn("refused these credentials 2 time(s)", fromRecord)

    def test_newOnlyOnce(self) -> None:
        """The same refusal raised again is marked not new: logged once."""
        client, clock = self.client()
        self.assertTrue(self.refused(client).new)
        self.assertFalse(self.refused(client).new)
        clock.advance(RETRY_AFTER_REFUSAL)
        self.assertEqual([self.refused(client).new for _ in "ab"], [True, False])

    def test_recordHoldsNoSecret(self) -> None:
        """The record holds no password, even hashed cheaply."""
        self.refused(self.client(password=PASSWORD + "x")[0])
        with open(self.store.path, "rb") as f:
            text = f.read()
        secret = (PASSWORD + "x").encode()
        self.assertNotIn(secret, text)
        for digest in ("md5", "sha1", "sha256", "sha512", "blake2b"):
            self.assertNotIn(hashlib.new(digest, secret).hexdigest().encode(), text)
        self.assertEqual(os.stat(self.store.path).st_mode & 0o777, 0o600)


class APIKeyTests(SynchronousTestCase):
    """qBittorrent 5.2's API key replaces the login."""

    def test_bearer(self) -> None:
        """Every call carries the key as a Bearer token and nothing logs in."""
        fake = FakeQBittorrent("5.2", password="unused", apiKey=API_KEY)
        client, clock = makeClient(self, fake, qbConfig(apiKey=API_KEY, password=""))
        result = self.successResultOf(afterPause(clock, client.apply(4321)))
        self.assertEqual(result.verified, True)
        self.assertEqual(fake.loginAttempts, 0)
        self.assertEqual(
            {r.headers["authorization"] for r in fake.requests}, {f"Bearer {API_KEY}"}
        )

    def test_rejected(self) -> None:
        """
        A rejected key fails with LoginRefused('credentials') saying what to
        fix, new only the first time; nothing logs in.
        """
        fake = FakeQBittorrent("5.2", apiKey="qbt_theRealOne")
        client, clock = makeClient(self, fake, qbConfig(apiKey=API_KEY))
        clock.advance(7)
        with warnings() as events:
            failures = [
                self.failureResultOf(client.listenPort(), LoginRefused)
                for _ in range(3)
            ]
        refused = [f.value for f in failures]
        assert all(isinstance(r, LoginRefused) for r in refused)
        self.assertEqual([r.new for r in refused], [True, False, False])
        self.assertEqual((refused[0].reason, refused[0].retryAt), ("credentials", 7))
        self.assertIn("qbittorrent.api_key", str(refused[0]))
        self.assertIn(PREFS, str(refused[0]))
        self.assertEqual(events, [])
        self.assertEqual(fake.loginAttempts, 0)

    def test_newAgainAfterRecovery(self) -> None:
        """After a call succeeds, a later rejection of the key is new again."""
        fake = FakeQBittorrent("5.2", apiKey="qbt_theRealOne")
        client, _ = makeClient(self, fake, qbConfig(apiKey=API_KEY))
        first = self.failureResultOf(client.listenPort(), LoginRefused).value
        fake.apiKey = API_KEY
        self.successResultOf(client.listenPort())
        fake.apiKey = "qbt_rotated"
        second = self.failureResultOf(client.listenPort(), LoginRefused).value
        assert isinstance(first, LoginRefused) and isinstance(second, LoginRefused)
        self.assertEqual((first.new, second.new), (True, True))


class HeaderTests(SynchronousTestCase):
    """Referer and Origin match the address the client talks to."""

    def originFor(self, baseURL: str, origin: str, host: str) -> None:
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake, qbConfig(baseURL=baseURL))
        self.assertTrue(
            self.successResultOf(afterPause(clock, client.apply(2345))).verified
        )
        self.assertEqual(fake.loginAttempts, 1)
        for request in fake.requests:
            self.assertEqual(request.headers["origin"], origin)
            self.assertEqual(request.headers["referer"], origin)
            self.assertEqual(request.headers["host"], host)

    def test_ipAddress(self) -> None:
        """An IPv4 host with a port."""
        self.originFor(
            "http://127.0.0.1:8080", "http://127.0.0.1:8080", "127.0.0.1:8080"
        )

    def test_ipv6(self) -> None:
        """An IPv6 literal, which treq cannot request, is a configuration error."""
        fake = FakeQBittorrent()
        error = self.assertRaises(
            ConfigError, makeClient, self, fake, qbConfig("http://[::1]:8080/")
        )
        self.assertIn("http://[::1]:8080/", str(error))

    def test_localhost(self) -> None:
        """A dotless name (localhost) keeps its session cookie."""
        self.originFor(
            "http://localhost:8080", "http://localhost:8080", "localhost:8080"
        )

    def test_containerName(self) -> None:
        """A Docker-style dotless service name keeps its session cookie."""
        self.originFor(
            "http://qbittorrent:8080", "http://qbittorrent:8080", "qbittorrent:8080"
        )

    def test_httpsName(self) -> None:
        """HTTPS with a domain name and a port."""
        self.originFor(
            "https://qb.example.org:8443",
            "https://qb.example.org:8443",
            "qb.example.org:8443",
        )

    def test_defaultPort(self) -> None:
        """A default port is left out, as in the Host header qBittorrent compares."""
        self.originFor(
            "https://qb.example.org:443/", "https://qb.example.org", "qb.example.org"
        )

    def test_noCredentialsInBaseURL(self) -> None:
        """User info in base_url is dropped from baseURL and every header."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, _ = makeClient(
            self, fake, qbConfig("http://admin:hunter2@10.0.0.2:8080/")
        )
        self.assertEqual(client.baseURL, "http://10.0.0.2:8080")
        self.successResultOf(client.listenPort())
        self.assertNotIn("hunter2", repr(fake.requests))

    def test_crossSite(self) -> None:
        """
        A 401 from the Origin/Host check (both versions) is reported as such,
        not as a wrong password, and starts no login delay.
        """
        for version in ("4.5", "5.2"):
            fake = FakeQBittorrent(version, password=PASSWORD)
            proxy = _ForeignHost(fake.resource())
            client = newClient(self, Clock(), stubClient(proxy), qbConfig())
            for _ in range(2):
                f = self.failureResultOf(client.listenPort(), QBittorrentError)
                self.assertNotIsInstance(f.value, LoginRefused)
                self.assertIn("Host header", str(f.value))
                self.assertIn(LOGIN, str(f.value))
            self.assertEqual(fake.failedLogins, 0)

    def test_pathPrefix(self) -> None:
        """A base_url with a path (reverse proxy) prefixes every endpoint."""
        fake = FakeQBittorrent("5.2", password=PASSWORD)
        root = Resource()
        proxied = Resource()
        root.putChild(b"tools", proxied)
        proxied.putChild(b"qbt", fake.resource())
        config = qbConfig("https://proxy.example.net/tools/qbt/")
        clock = Clock()
        client = newClient(self, clock, stubClient(root), config)
        self.assertEqual(client.baseURL, "https://proxy.example.net/tools/qbt")
        self.assertTrue(
            self.successResultOf(afterPause(clock, client.apply(3456))).verified
        )
        self.assertEqual(fake.preferences["listen_port"], 3456)
        self.assertEqual(
            fake.requests[0].headers["origin"], "https://proxy.example.net"
        )


class ApplyTests(SynchronousTestCase):
    """Setting the port, binding the interface, and reading back."""

    def test_apply(self) -> None:
        """The port is set with random port and UPnP off, then read back."""
        for version in ("4.5", "5.2"):
            fake = FakeQBittorrent(version, password=PASSWORD)
            client, clock = makeClient(self, fake)
            with capturedLogs() as events:
                result = self.successResultOf(afterPause(clock, client.apply(51413)))
            self.assertEqual(result, ApplyResult(51413, 8999, True, True, ""))
            posted = [r for r in fake.requests if r.path.endswith("/setPreferences")]
            self.assertEqual(len(posted), 1)
            self.assertEqual(fake.preferences["upnp"], False)
            self.assertIn(
                "now listens on port 51413 (was 8999)",
                [formatEvent(e) for e in events][-1],
            )

    def test_setPreferencesForm(self) -> None:
        """The form field json holds exactly listen_port, random_port, upnp."""
        fake = FakeQBittorrent(password=PASSWORD)
        spy = _Spy(fake.resource())
        clock = Clock()
        client = newClient(self, clock, stubClient(spy), qbConfig())
        self.successResultOf(afterPause(clock, client.apply(40000)))
        self.assertEqual(
            [json.loads(s) for s in spy.posted],
            [{"listen_port": 40000, "random_port": False, "upnp": False}],
        )

    def test_alreadySet(self) -> None:
        """Nothing is posted when qBittorrent already has everything."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.preferences.update(listen_port=40000, upnp=False)
        client, _ = makeClient(self, fake)
        result = self.successResultOf(client.apply(40000))
        self.assertEqual(result, ApplyResult(40000, 40000, False, True, ""))
        self.assertNotIn("/api/v2/app/setPreferences", [r.path for r in fake.requests])

    def test_readBackAfterPause(self) -> None:
        """
        A posted change is read back only READ_BACK_PAUSE_SECS later on the
        client's clock, on the first change as on later ones.
        """
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        for port, previous, posting in (
            (40000, 8999, ["POST auth/login", GET_PREFS, SET_PREFS]),
            (40001, 40000, [SET_PREFS]),
        ):
            fake.requests.clear()
            d = client.apply(port)
            self.assertEqual(_calls(fake), posting)
            self.assertEqual(fake.preferences["listen_port"], port)
            self.assertNoResult(d)
            clock.advance(READ_BACK_PAUSE_SECS / 2)
            self.assertEqual(_calls(fake), posting)
            self.assertNoResult(d)
            clock.advance(READ_BACK_PAUSE_SECS / 2)
            self.assertEqual(_calls(fake), [*posting, GET_PREFS])
            result = self.successResultOf(d)
            self.assertEqual(result, ApplyResult(port, previous, True, True, ""))

    def test_noPauseWithoutChange(self) -> None:
        """
        An apply that posts nothing fires at once, the preferences read
        first or read again: no pause is left waiting on the clock.
        """
        fake = FakeQBittorrent(password=PASSWORD)
        fake.preferences.update(listen_port=40000, upnp=False)
        client, clock = makeClient(self, fake)
        for _ in range(2):
            result = self.successResultOf(client.apply(40000))
            self.assertEqual(result, ApplyResult(40000, 40000, False, True, ""))
            self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNotIn(SET_PREFS, _calls(fake))

    def test_samePortOtherwiseWrong(self) -> None:
        """The same port with random port or UPnP on is set again."""
        for changes in ({"random_port": True}, {"upnp": True}):
            fake = FakeQBittorrent(password=PASSWORD)
            fake.preferences.update(listen_port=40000, upnp=False)
            fake.preferences.update(changes)
            client, clock = makeClient(self, fake)
            result = self.successResultOf(afterPause(clock, client.apply(40000)))
            self.assertEqual(result, ApplyResult(40000, 40000, True, True, ""))
            self.assertEqual(fake.preferences["random_port"], False)
            self.assertEqual(fake.preferences["upnp"], False)

    def test_bindInterface(self) -> None:
        """A listed interface (by id or by name) is bound with its id."""
        for wanted in ("wg0", "WireGuard tunnel"):
            fake = FakeQBittorrent("5.2", password=PASSWORD)
            fake.interfaces.append({"name": "WireGuard tunnel", "value": "wg0"})
            client, clock = makeClient(self, fake)
            result = self.successResultOf(
                afterPause(clock, client.apply(40000, wanted))
            )
            self.assertEqual(result, ApplyResult(40000, 8999, True, True, ""))
            self.assertEqual(fake.preferences["current_network_interface"], "wg0")

    def test_bindInterfaceAlreadySet(self) -> None:
        """Port and interface both right: nothing to do."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.interfaces.append({"name": "wg0", "value": "wg0"})
        fake.preferences.update(
            listen_port=40000, upnp=False, current_network_interface="wg0"
        )
        client, _ = makeClient(self, fake)
        result = self.successResultOf(client.apply(40000, "wg0"))
        self.assertEqual(result.applied, False)

    def test_bindOtherInterface(self) -> None:
        """The right port bound to the wrong interface is set again."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.interfaces.append({"name": "wg0", "value": "wg0"})
        fake.preferences.update(
            listen_port=40000, upnp=False, current_network_interface="eth0"
        )
        client, clock = makeClient(self, fake)
        result = self.successResultOf(afterPause(clock, client.apply(40000, "wg0")))
        self.assertEqual(result.applied, True)
        self.assertEqual(fake.preferences["current_network_interface"], "wg0")

    def test_interfaceMissing(self) -> None:
        """An unlisted interface: warn, set the port anyway, say so in the note."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        with warnings() as events:
            result = self.successResultOf(afterPause(clock, client.apply(40000, "wg0")))
        self.assertEqual((result.applied, result.verified), (True, True))
        self.assertIn("wg0", result.note)
        self.assertEqual(fake.preferences["listen_port"], 40000)
        self.assertEqual(fake.preferences["current_network_interface"], "")
        self.assertEqual(len(events), 1)
        self.assertIn("wg0", formatEvent(events[0]))

    def test_notKept(self) -> None:
        """
        A port that does not stick is verified=False, for the caller to
        report: the client itself warns of nothing.
        """
        fake = FakeQBittorrent("5.2", password=PASSWORD)
        fake.ignoreSetPreferences = True
        client, clock = makeClient(self, fake)
        with warnings() as events:
            result = self.successResultOf(afterPause(clock, client.apply(40000)))
        self.assertEqual(result, ApplyResult(40000, 8999, True, False, ""))
        self.assertEqual(events, [])

    def test_portRange(self) -> None:
        """Ports outside 1-65535 fail with ValueError before any request."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        for port in (0, -5, 65536, 70000):
            self.failureResultOf(client.apply(port), ValueError)
        self.assertEqual(fake.requests, [])
        self.successResultOf(afterPause(clock, client.apply(65535)))
        self.successResultOf(afterPause(clock, client.apply(1)))

    def test_firstApplyReadsFirst(self) -> None:
        """The first apply reads the preferences, sets the port, reads them back."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        self.assertEqual(
            _calls(fake),
            ["POST auth/login", GET_PREFS, SET_PREFS, GET_PREFS],
        )

    def test_steadyState(self) -> None:
        """
        Each later change is two requests, set then verify: the client
        knows qBittorrent's preferences from its last read.
        """
        for version in ("4.5", "5.2"):
            fake = FakeQBittorrent(version, password=PASSWORD)
            fake.interfaces.append({"name": "WireGuard tunnel", "value": "wg0"})
            client, clock = makeClient(self, fake)
            self.successResultOf(afterPause(clock, client.apply(40000, "wg0")))
            for previous, port in ((40000, 40001), (40001, 40002), (40002, 40001)):
                fake.requests.clear()
                result = self.successResultOf(
                    afterPause(clock, client.apply(port, "wg0"))
                )
                self.assertEqual(result, ApplyResult(port, previous, True, True, ""))
                self.assertEqual(_calls(fake), [SET_PREFS, GET_PREFS])
                self.assertEqual(fake.preferences["listen_port"], port)
                self.assertEqual(fake.preferences["current_network_interface"], "wg0")
                self.assertEqual(fake.preferences["random_port"], False)
                self.assertEqual(fake.preferences["upnp"], False)

    def test_steadyStatePrevious(self) -> None:
        """A change made without reading first still names the port before it."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        result = self.successResultOf(afterPause(clock, client.apply(40001)))
        self.assertEqual(result, ApplyResult(40001, 40000, True, True, ""))

    def test_verifyReadKnown(self) -> None:
        """A periodic read of the port is what the next change starts from."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        fake.preferences.update(listen_port=6881, upnp=True)
        self.assertEqual(self.successResultOf(client.listenPort()), 6881)
        fake.requests.clear()
        result = self.successResultOf(afterPause(clock, client.apply(40001)))
        self.assertEqual(result, ApplyResult(40001, 6881, True, True, ""))
        self.assertEqual(_calls(fake), [SET_PREFS, GET_PREFS])
        self.assertEqual(fake.preferences["upnp"], False)

    def test_seemsDoneReadsAgain(self) -> None:
        """
        When the last read says the port is in place already, only a fresh
        read can tell: it is made, and a port changed since is set back.
        """
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        fake.requests.clear()
        result = self.successResultOf(client.apply(40000))
        self.assertEqual(result, ApplyResult(40000, 40000, False, True, ""))
        self.assertEqual(_calls(fake), [GET_PREFS])
        fake.preferences["listen_port"] = 6881
        fake.requests.clear()
        result = self.successResultOf(afterPause(clock, client.apply(40000)))
        self.assertEqual(result, ApplyResult(40000, 6881, True, True, ""))
        self.assertEqual(_calls(fake), [GET_PREFS, SET_PREFS, GET_PREFS])

    def test_relogin(self) -> None:
        """
        A change that meets an expired session is sent again after the
        login, then verified; the next one asks for the interfaces again.
        """
        fake = FakeQBittorrent(password=PASSWORD)
        fake.interfaces.append({"name": "wg0", "value": "wg0"})
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000, "wg0")))
        fake.expireSessions()
        fake.requests.clear()
        self.successResultOf(afterPause(clock, client.apply(40001, "wg0")))
        self.assertEqual(
            _calls(fake), [SET_PREFS, "POST auth/login", SET_PREFS, GET_PREFS]
        )
        self.assertEqual(fake.preferences["listen_port"], 40001)
        fake.requests.clear()
        self.successResultOf(afterPause(clock, client.apply(40002, "wg0")))
        self.assertEqual(
            _calls(fake),
            ["GET app/networkInterfaceList", SET_PREFS, GET_PREFS],
        )
        self.assertEqual(fake.preferences["current_network_interface"], "wg0")

    def test_failureReadsFirst(self) -> None:
        """After a failed change the next one reads the preferences first."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        fake.failNext(500, endpoint="app/setPreferences")
        self.failureResultOf(client.apply(40001), QBittorrentError)
        fake.requests.clear()
        self.successResultOf(afterPause(clock, client.apply(40001)))
        self.assertEqual(_calls(fake), [GET_PREFS, SET_PREFS, GET_PREFS])

    def test_relistenReadsFirst(self) -> None:
        """After a relisten the next change reads the preferences first."""
        fake = FakeQBittorrent(password=PASSWORD)
        client, clock = makeClient(self, fake)
        self.successResultOf(afterPause(clock, client.apply(40000)))
        d = client.relisten(40000, "", "port")
        clock.advance(RELISTEN_PAUSE_SECS)
        self.successResultOf(d)
        fake.requests.clear()
        self.successResultOf(afterPause(clock, client.apply(40001)))
        self.assertEqual(_calls(fake), [GET_PREFS, SET_PREFS, GET_PREFS])

    def test_verifyObject(self) -> None:
        """The client provides IPortSink."""
        client, _ = makeClient(self, FakeQBittorrent())
        self.assertTrue(verifyObject(IPortSink, client))


class ErrorTests(SynchronousTestCase):
    """Failures become QBittorrentError naming the URL and what happened."""

    def failsWith(
        self, fake: FakeQBittorrent, expected: str, url: str = PREFS
    ) -> QBittorrentError:
        client, _ = makeClient(self, fake)
        error = self.failureResultOf(client.listenPort(), QBittorrentError).value
        assert isinstance(error, QBittorrentError)
        self.assertNotIsInstance(error, LoginRefused)
        self.assertIn(url, str(error))
        self.assertIn(expected, str(error))
        return error

    def test_serverError(self) -> None:
        """A 500 names the status."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(500, b"oops", "app/preferences")
        self.failsWith(fake, "500")

    def test_loginServerError(self) -> None:
        """A 502 on login is an error, not a refusal, and delays nothing."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(502, b"Bad Gateway", "auth/login")
        client, _ = makeClient(self, fake)
        f = self.failureResultOf(client.listenPort(), QBittorrentError)
        self.assertNotIsInstance(f.value, LoginRefused)
        self.assertIn("502", str(f.value))
        self.successResultOf(client.listenPort())

    def test_notFound(self) -> None:
        """A 404 suggests checking base_url."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(404, b"", "app/preferences")
        self.failsWith(fake, "base_url")

    def test_garbage(self) -> None:
        """An answer that is not JSON is named as such."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(200, b"<html>", "app/preferences")
        self.failsWith(fake, "not JSON")

    def test_notAnObject(self) -> None:
        """JSON of the wrong shape is an error."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(200, b"[1, 2]", "app/preferences")
        self.failsWith(fake, "not an object")

    def test_noPort(self) -> None:
        """Preferences without an integer listen_port are an error."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.failNext(200, b'{"listen_port": "8080"}', "app/preferences")
        self.failsWith(fake, "listen_port")

    def test_timeout(self) -> None:
        """No answer within timeout_secs fails the call, naming the URL."""
        clock = Clock()
        client = newClient(self, clock, stubClient(_Silent()), qbConfig())
        d = client.listenPort()
        self.assertNoResult(d)
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        error = self.failureResultOf(d, QBittorrentError).value
        self.assertIn(LOGIN, str(error))
        self.assertIn("within 10 s", str(error))

    def test_redirect(self) -> None:
        """A redirect is not followed (it would carry the password along)."""
        client = newClient(self, Clock(), stubClient(_Redirect()), qbConfig())
        error = self.failureResultOf(client.listenPort(), QBittorrentError).value
        self.assertIn(LOGIN, str(error))
        self.assertIn("https://elsewhere/", str(error))


class SecretTests(SynchronousTestCase):
    """Neither the password nor the API key shows in logs, errors or reprs."""

    def test_nothingLeaks(self) -> None:
        """Refusals, bans, rejected keys and errors never show a secret."""
        texts: list[str] = []

        def collect(d: Deferred[Any]) -> None:
            f = self.failureResultOf(d)
            texts.extend([str(f.value), repr(f.value), f.getTraceback()])

        with capturedLogs() as events:
            wrong = FakeQBittorrent(password="not it")
            client, clock = makeClient(self, wrong)
            texts.append(repr(client))
            collect(client.apply(1000))
            collect(client.apply(1000))
            wrong.failedLogins = 5
            clock.advance(600)
            collect(client.listenPort())

            good = FakeQBittorrent(password=PASSWORD)
            client, goodClock = makeClient(self, good)
            self.successResultOf(afterPause(goodClock, client.apply(1000, "wg0")))
            good.failNext(500, b"", "app/setPreferences")
            collect(client.apply(2000))

            keyed = FakeQBittorrent("5.2", apiKey="qbt_other")
            client, _ = makeClient(self, keyed, qbConfig(apiKey=API_KEY))
            texts.append(repr(client))
            collect(client.apply(1000))

        self.assertGreater(len(events), 1)
        texts.extend(formatEvent(e) + repr(e) for e in events)
        for text in texts:
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(API_KEY, text)
            self.assertNotIn("SID", text)


def _certificates() -> tuple[bytes, bytes, bytes]:
    """A private CA (PEM) and a key and certificate it issued for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qbportsync test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qbt")]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    keyPEM = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), keyPEM, leaf.public_bytes(pem)


def _realReactor() -> Any:
    from twisted.internet import reactor

    return reactor


class TLSTests(TestCase):
    """Against a real HTTPS server on 127.0.0.1 with a private CA."""

    def setUp(self) -> None:
        self.reactor = _realReactor()
        caPEM, keyPEM, certPEM = _certificates()
        self.caFile = self.mktemp()
        with open(self.caFile, "wb") as f:
            f.write(caPEM)
        server = ssl.PrivateCertificate.loadPEM(keyPEM + certPEM)
        fake = FakeQBittorrent(password=PASSWORD)
        port: IListeningPort = self.reactor.listenSSL(
            0, Site(fake.resource()), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.baseURL = f"https://127.0.0.1:{address.port}"

    def client(self, caFile: str | None) -> QBittorrentClient:
        config = QBittorrentConfig(
            base_url=self.baseURL, password=PASSWORD, ca_file=caFile
        )
        return newClient(
            self, self.reactor, makeHTTPClient(self.reactor, config), config
        )

    async def test_privateCA(self) -> None:
        """With ca_file the server's certificate is trusted."""
        self.assertEqual(await self.client(self.caFile).version(), "v4.5.2")

    async def test_untrusted(self) -> None:
        """Without ca_file the server is refused, naming the URL and ca_file."""
        d = self.client(None).version()
        error = await self.assertFailure(d, QBittorrentError)
        self.assertIn(f"{self.baseURL}/api/v2/auth/login", str(error))
        self.assertIn("ca_file", str(error))

    def test_badCAFile(self) -> None:
        """A ca_file that is missing or not PEM is a configuration error."""
        notPEM = self.mktemp()
        with open(notPEM, "w") as f:
            f.write("hello\n")
        for path in (self.mktemp(), notPEM):
            config = QBittorrentConfig(ca_file=path)
            error = self.assertRaises(ConfigError, makeHTTPClient, self.reactor, config)
            self.assertIn(path, str(error))
            self.assertIn("ca_file", str(error))

    async def test_applyOverTCP(self) -> None:
        """Over a real connection, the forms reach qBittorrent whole: applied."""
        fake = FakeQBittorrent(password=PASSWORD)
        port = self.reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = QBittorrentConfig(
            base_url=f"http://127.0.0.1:{port.getHost().port}", password=PASSWORD
        )
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        client = newClient(
            self, self.reactor, makeHTTPClient(self.reactor, config, pool), config
        )
        result = await client.apply(40000)
        self.assertEqual(result, ApplyResult(40000, 8999, True, True, ""))
        self.assertEqual(fake.preferences["listen_port"], 40000)

    async def test_refused(self) -> None:
        """A closed port fails with 'connection refused', naming the URL."""
        probe = self.reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        closed = probe.getHost().port
        await probe.stopListening()
        config = QBittorrentConfig(base_url=f"http://127.0.0.1:{closed}")
        client = newClient(
            self, self.reactor, makeHTTPClient(self.reactor, config), config
        )
        error = await self.assertFailure(client.version(), QBittorrentError)
        self.assertIn(f"http://127.0.0.1:{closed}/api/v2/auth/login", str(error))
        self.assertIn("connection refused", str(error))


class BodyTests(SynchronousTestCase):
    """How request bodies are handed to Twisted."""

    def test_writtenAtOnce(self) -> None:
        """
        A form is written while the request starts, with the headers, and
        its length is known.
        """
        producer = _wholeBody(b"json=%7B%7D")
        consumer = StringTransport()
        done = producer.startProducing(consumer)
        self.assertEqual(consumer.value(), b"json=%7B%7D")
        self.assertEqual(producer.length, 11)
        self.assertIsNone(self.successResultOf(done))

    def test_filesAsTreqDoes(self) -> None:
        """Anything but bytes gets treq's own producer."""
        self.assertIsInstance(_wholeBody(io.BytesIO(b"x")), FileBodyProducer)


class RelistenTests(SynchronousTestCase):
    """relisten changes one setting and puts it back, a pause apart."""

    def relisten(
        self, fake: FakeQBittorrent, port: int, how: str
    ) -> list[dict[str, object]]:
        """Run a relisten; the preferences after each of its two changes."""
        client, clock = makeClient(self, fake)
        d = client.relisten(port, "10.2.0.2", how)
        seen = [dict(fake.preferences)]
        self.assertNoResult(d)
        clock.advance(RELISTEN_PAUSE_SECS)
        self.successResultOf(d)
        seen.append(dict(fake.preferences))
        return seen

    def test_address(self) -> None:
        """By address: bound to the address, then back to all of them."""
        fake = FakeQBittorrent(password=PASSWORD)
        seen = self.relisten(fake, 8999, "address")
        self.assertEqual(
            [s["current_interface_address"] for s in seen], ["10.2.0.2", ""]
        )
        self.assertEqual([s["listen_port"] for s in seen], [8999, 8999])

    def test_addressAlreadySet(self) -> None:
        """By address, when bound to that address already: all, then back."""
        fake = FakeQBittorrent(password=PASSWORD)
        fake.preferences["current_interface_address"] = "10.2.0.2"
        seen = self.relisten(fake, 8999, "address")
        self.assertEqual(
            [s["current_interface_address"] for s in seen], ["", "10.2.0.2"]
        )

    def test_port(self) -> None:
        """By port: a neighbouring port, then ours again."""
        fake = FakeQBittorrent(password=PASSWORD)
        self.assertEqual(
            [s["listen_port"] for s in self.relisten(fake, 8999, "port")],
            [9000, 8999],
        )
        fake.preferences["listen_port"] = 65535
        self.assertEqual(
            [s["listen_port"] for s in self.relisten(fake, 65535, "port")],
            [65534, 65535],
        )


@implementer(IHostnameResolver)
class _NoteNames:
    """A name resolver that only notes the names it is asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver: object, hostName: str, *args: object, **kw: object
    ) -> object:
        self.asked.append(hostName)
        return object()


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor(MemoryReactorClock):
    """A memory reactor whose name lookups are noted, never answered."""

    def __init__(self) -> None:
        super().__init__()
        self.nameResolver = _NoteNames()

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError()


class ConnectTests(SynchronousTestCase):
    """How the HTTP client reaches qBittorrent."""

    def test_addressNotLookedUp(self) -> None:
        """
        An IPv4 address is connected to at once, over TLS too: no name
        lookup (a thread, and CPU, at every new connection).
        """
        for scheme in ("http", "https"):
            reactor = _ResolvingReactor()
            http = makeHTTPClient(reactor, qbConfig(f"{scheme}://192.0.2.7:8080"))
            http.get(f"{scheme}://192.0.2.7:8080/api/v2/app/version")
            self.assertEqual(reactor.nameResolver.asked, [])
            self.assertEqual(
                [(host, port) for host, port, *_ in reactor.tcpClients],
                [("192.0.2.7", 8080)],
            )

    def test_nameLookedUp(self) -> None:
        """A host name is looked up before any connection."""
        reactor = _ResolvingReactor()
        http = makeHTTPClient(reactor, qbConfig("http://qbittorrent:8080"))
        http.get("http://qbittorrent:8080/api/v2/app/version")
        self.assertEqual(reactor.nameResolver.asked, ["qbittorrent"])
        self.assertEqual(reactor.tcpClients, [])
