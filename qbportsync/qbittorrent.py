"""
qBittorrent's Web API (v2): log in without ever earning a ban, set the
listening port, read it back.

One L{QBittorrentClient} lives as long as the daemon and shares one treq
C{HTTPClient}, so the session cookie (C{SID} up to 5.1, C{QBT_SID_<port>}
from 5.2) stays in its cookie jar whatever its name.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hyperlink import URL
from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error, task
from twisted.internet.abstract import isIPAddress
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from qbportsync.config import ConfigError, QBittorrentConfig
from qbportsync.interfaces import ApplyResult, IPortSink
from qbportsync.plainhttp import mismatchMessage
from qbportsync.refusals import (
    LOGIN_TRIES,
    Credentials,
    LoginTurn,
    Refusal,
    RefusalStore,
    StoreError,
)
from qbportsync.urls import redact

_log = Logger()

RELISTEN_PAUSE_SECS = 0.5
"""Between changing a setting and putting it back (measured to work on 4.5.2)."""

READ_BACK_PAUSE_SECS = 0.03
"""
Between setting the port and reading it back: libtorrent opens the new
listening socket after qBittorrent has answered, and a read arriving at
once holds it back by a fifth (measured on 4.5.2, C{benchmarks/bench_speed}).
"""

RefusalReason = Literal["credentials", "banned"]


class QBittorrentError(Exception):
    """Talking to qBittorrent failed this time; the message names the URL."""


class LoginRefused(QBittorrentError):
    """
    qBittorrent refused our credentials (or API key), or banned us; or the
    login-refusal record says not to try now.
    """

    def __init__(
        self, message: str, reason: RefusalReason, retryAt: float, new: bool = True
    ) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason
        self.retryAt = retryAt
        """C{reactor.seconds()} before which no login will be attempted;
        C{inf} until the credentials change."""
        self.new = new
        """False when this client already raised this very refusal: the
        daemon logs only new ones."""


def makeHTTPClient(
    reactor: Any, config: QBittorrentConfig, pool: HTTPConnectionPool | None = None
) -> HTTPClient:
    """
    The one HTTP client (and cookie jar) for the daemon's life.  HTTPS is
    verified against the system's trust store, or only against the CA
    certificates in C{config.ca_file} when that is set.  A persistent
    C{pool} keeps connections open between requests; its owner closes it.
    """
    policy: IPolicyForHTTPS
    if config.ca_file:
        trustRoot = _loadTrustRoot(config.ca_file)
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRoot)
    else:
        policy = BrowserLikePolicyForHTTPS()
    return HTTPClient(
        Agent.usingEndpointFactory(reactor, _Endpoints(reactor, policy), pool=pool),
        data_to_body_producer=_wholeBody,
    )


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Agent's endpoints, except that an IPv4 address is connected to as it
    is: Agent would look it up like a name, in a thread, at every new
    connection (a few ms of CPU each time qBittorrent has closed the idle
    one, and a thread pool to start and stop in a one-shot run).
    """

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._policy = policy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port)
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, endpoint)
        return endpoint


@implementer(IBodyProducer)
class _WholeBody:
    """
    A small request body written together with the headers: one segment
    for qBittorrent to read, where treq's default producer writes it one
    reactor turn later, in a segment of its own.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _wholeBody(data: object) -> IBodyProducer:
    """treq's body producer: ours for bytes (our forms), treq's for the rest."""
    if isinstance(data, bytes):
        return _WholeBody(data)
    producer: IBodyProducer = IBodyProducer(data)
    return producer


def _loadTrustRoot(path: str) -> object:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(
            f"[qbittorrent] ca_file {path}: cannot read it ({e.strerror})"
        ) from e
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ConfigError(
            f"[qbittorrent] ca_file {path}: not a PEM file of CA certificates"
        ) from e
    trusted = [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    return trustRootFromCertificates(trusted)


def _origin(url: URL) -> str:
    # Twisted's Agent leaves a scheme's default port out of the Host header
    # and qBittorrent compares ports literally, so Origin must leave it out too.
    if url.port is None or url.port == {"http": 80, "https": 443}.get(url.scheme):
        return f"{url.scheme}://{url.host}"
    return f"{url.scheme}://{url.host}:{url.port}"


@implementer(IPortSink)
class QBittorrentClient:
    """Sets and reads qBittorrent's listening port through its Web API."""

    def __init__(
        self,
        reactor: IReactorTime,
        http: HTTPClient,
        config: QBittorrentConfig,
        refusals: RefusalStore,
        plainHTTPProbe: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """
        @param plainHTTPProbe: asks whether the server behind an https:// URL
            speaks plain HTTP (L{qbportsync.plainhttp.speaksPlainHTTP}), to
            name that mistake when TLS gets no answer; None never asks.
        """
        self._reactor = reactor
        self._http = http
        self._config = config
        self._plainHTTPProbe = plainHTTPProbe
        url = URL.from_text(config.base_url).replace(userinfo="", query=(), fragment="")
        if ":" in url.host:
            raise ConfigError(
                f"[qbittorrent] base_url {redact(config.base_url)}: IPv6 address "
                "literals do not work with treq (hyperlink issue #68); use a "
                "host name for that address, such as localhost"
            )
        self._baseURL = url.to_text().rstrip("/")
        self._headers: dict[bytes | str, bytes | str] = {
            "Referer": _origin(url),
            "Origin": _origin(url),
        }
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._refusals = refusals
        self._credentials = Credentials(
            _origin(url), config.username, config.api_key or config.password
        )
        self._loginLock = defer.DeferredLock()
        self._loggedIn = False
        self._lastRefusal: Refusal | None = None
        self._apiKeyRejected = False
        self._known: dict[str, Any] | None = None
        """qBittorrent's preferences as last read; None until the first
        read, and again after a re-login or a failed call."""
        self._interfaceIDs: dict[str, str] = {}
        """qBittorrent's id of each interface asked for (by name or id)."""

    def __repr__(self) -> str:
        return f"<QBittorrentClient {self._baseURL}>"

    @property
    def baseURL(self) -> str:
        """qBittorrent's address as configured, without credentials."""
        return self._baseURL

    def apply(self, port: int, bindInterface: str = "") -> defer.Deferred[ApplyResult]:
        """
        Make qBittorrent listen on C{port} with random port and its own
        UPnP/NAT-PMP off, bound to C{bindInterface} when qBittorrent knows
        that interface, then read the port back.  Fails with L{ValueError}
        for a port outside 1-65535, which qBittorrent would accept and then
        listen on nothing.
        """
        return defer.Deferred.fromCoroutine(self._apply(port, bindInterface))

    def listenPort(self) -> defer.Deferred[int]:
        """The port qBittorrent is set to listen on now."""
        return defer.Deferred.fromCoroutine(self._listenPort())

    def relisten(self, port: int, address: str, how: str) -> defer.Deferred[None]:
        """
        Make libtorrent open its listening sockets anew, which sending the
        same settings again does not: C{how="address"} sets
        C{current_interface_address} to C{address} (or to "" when it is
        C{address} already) and back, C{how="port"} sets C{listen_port} to a
        neighbour of C{port} and back.
        """
        return defer.Deferred.fromCoroutine(self._relisten(port, address, how))

    async def _relisten(self, port: int, address: str, how: str) -> None:
        try:
            await self._relistenOnce(port, address, how)
        finally:
            self._forget()

    async def _relistenOnce(self, port: int, address: str, how: str) -> None:
        if how == "address":
            _, prefs = await self._preferences()
            key = "current_interface_address"
            original: object = prefs.get(key, "")
            changed: object = "" if original == address else address
        else:
            key, original = "listen_port", port
            changed = port + 1 if port < 65535 else port - 1
        for value in (changed, original):
            await self._call(
                "POST",
                "app/setPreferences",
                {"json": json.dumps({key: value})},
                (200, 204),
            )
            if value == changed:
                # Two changes in one go could be merged into none.
                await task.deferLater(self._reactor, RELISTEN_PAUSE_SECS)

    def version(self) -> defer.Deferred[str]:
        """qBittorrent's version, such as C{v4.5.2}."""
        return defer.Deferred.fromCoroutine(self._version())

    async def _version(self) -> str:
        return (await self._call("GET", "app/version")).decode("utf-8").strip()

    async def _listenPort(self) -> int:
        url, prefs = await self._preferences()
        return _portField(prefs, "listen_port", url)

    async def _apply(self, port: int, bindInterface: str) -> ApplyResult:
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1-65535")
        try:
            return await self._applyKnowing(port, bindInterface)
        except BaseException:
            self._forget()
            raise

    async def _applyKnowing(self, port: int, bindInterface: str) -> ApplyResult:
        """
        Set what differs from the preferences last read, then read them back:
        two requests.  They are read first only when unknown (the first
        apply, after a re-login or a failure) or when they seem to need no
        change, which only a fresh read can tell.
        """
        wanted: dict[str, object] = {
            "listen_port": port,
            "random_port": False,
            "upnp": False,
        }
        note = ""
        if bindInterface:
            interface = await self._interfaceID(bindInterface)
            if interface is None:
                note = (
                    f"network interface {bindInterface} is not in qBittorrent's "
                    "list; the port was set without binding to it"
                )
                _log.warn(
                    "qBittorrent at {url} does not list network interface "
                    "{interface}; setting the port without binding to it",
                    url=self._baseURL,
                    interface=bindInterface,
                )
            else:
                wanted["current_network_interface"] = interface
        url, prefs = self._endpoint("app/preferences"), self._known
        if prefs is None or _holds(prefs, wanted):
            url, prefs = await self._preferences()
        previous = _portField(prefs, "listen_port", url)
        if _holds(prefs, wanted):
            _log.debug(
                "qBittorrent at {url} already listens on port {port}",
                url=self._baseURL,
                port=port,
            )
            return ApplyResult(port, previous, applied=False, verified=True, note=note)

        await self._call(
            "POST", "app/setPreferences", {"json": json.dumps(wanted)}, (200, 204)
        )
        await task.deferLater(self._reactor, READ_BACK_PAUSE_SECS)
        url, prefs = await self._preferences()
        actual = _portField(prefs, "listen_port", url)
        randomPort = prefs.get("random_port", False)
        verified = actual == port and not randomPort
        if verified:
            _log.debug(
                "qBittorrent at {url} now listens on port {port} (was {previous})",
                url=self._baseURL,
                port=port,
                previous=previous,
            )
        else:
            # The caller reports it (the daemon retries, the one-shot fails).
            _log.debug(
                "qBittorrent at {url} did not keep port {port}: it reports "
                "listen_port {actual}, random_port {randomPort}",
                url=self._baseURL,
                port=port,
                actual=actual,
                randomPort=randomPort,
            )
        return ApplyResult(port, previous, applied=True, verified=verified, note=note)

    def _forget(self) -> None:
        """What qBittorrent holds is in doubt: read it before the next change."""
        self._known = None
        self._interfaceIDs.clear()

    async def _preferences(self) -> tuple[str, dict[str, Any]]:
        url = self._endpoint("app/preferences")
        prefs = _parseJSON(await self._call("GET", "app/preferences"), url)
        if not isinstance(prefs, dict):
            raise QBittorrentError(f"{url} answered JSON that is not an object")
        self._known = prefs
        return url, prefs

    async def _interfaceID(self, wanted: str) -> str | None:
        """C{wanted}'s id in qBittorrent's list, asked once while it holds."""
        if wanted not in self._interfaceIDs:
            found = await self._findInterface(wanted)
            if found is None:
                return None
            self._interfaceIDs[wanted] = found
        return self._interfaceIDs[wanted]

    async def _findInterface(self, wanted: str) -> str | None:
        url = self._endpoint("app/networkInterfaceList")
        entries = _parseJSON(await self._call("GET", "app/networkInterfaceList"), url)
        if not isinstance(entries, list):
            raise QBittorrentError(f"{url} answered JSON that is not a list")
        for entry in entries:
            if isinstance(entry, dict) and wanted in (
                entry.get("value"),
                entry.get("name"),
            ):
                return str(entry.get("value"))
        return None

    def _endpoint(self, path: str) -> str:
        return f"{self._baseURL}/api/v2/{path}"

    async def _call(
        self,
        method: str,
        path: str,
        data: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> bytes:
        """
        One Web API call, logging in first when needed and once more when
        the session turns out to have expired; the body of the answer.
        """
        url = self._endpoint(path)
        if self._config.api_key:
            code, body = await self._send(method, url, data)
            if code in (401, 403):
                raise self._apiKeyRefused(url, code)
            self._apiKeyRejected = False
        else:
            await self._ensureLoggedIn()
            code, body = await self._send(method, url, data)
            if code == 403:
                self._loggedIn = False
                self._forget()
                await self._ensureLoggedIn()
                code, body = await self._send(method, url, data)
                if code == 403:
                    raise QBittorrentError(
                        f"{url} answered 403 Forbidden even after logging in again"
                    )
            if code == 401:
                raise QBittorrentError(_unauthorized(url))
        if code not in ok:
            raise QBittorrentError(_unexpected(url, code))
        return body

    def _apiKeyRefused(self, url: str, code: int) -> LoginRefused:
        new, self._apiKeyRejected = not self._apiKeyRejected, True
        return LoginRefused(
            f"{url} rejected the API key (HTTP {code}): check qbittorrent.api_key "
            "(API keys need qBittorrent 5.2+)",
            "credentials",
            self._reactor.seconds(),
            new,
        )

    async def _ensureLoggedIn(self) -> None:
        # The lock keeps concurrent calls from sending two logins at once:
        # with a wrong password each would count towards a ban.
        await self._loginLock.run(
            lambda: defer.Deferred.fromCoroutine(self._loginIfNeeded())
        )

    async def _loginIfNeeded(self) -> None:
        if self._loggedIn:
            return
        try:
            turn = await self._refusals.begin(self._credentials)
        except StoreError as e:
            raise QBittorrentError(str(e)) from e
        try:
            if turn.refusal is not None:
                raise self._refused(turn.refusal, turn.path, sent=False)
            await self._login(turn)
        finally:
            turn.release()

    async def _login(self, turn: LoginTurn) -> None:
        """Send one login, the record locked, and record how it went."""
        url = self._endpoint("auth/login")
        form = {"username": self._config.username, "password": self._config.password}
        code, body = await self._send("POST", url, form)
        if (code == 200 and body.strip() == b"Ok.") or code == 204:
            self._loggedIn = True
            self._lastRefusal = None
            try:
                turn.succeeded()
            except StoreError as e:
                _log.warn("{why}", why=str(e))
            _log.info("Logged in to qBittorrent at {url}", url=self._baseURL)
        elif code == 200 and body.strip() == b"Fails.":
            raise self._refused(self._record(turn.refused), turn.path, sent=True)
        elif code == 401:
            # 5.2 answers 401 both to a wrong password and to a failed CSRF or
            # Host check; a private endpoint tells them apart, and asking it
            # counts towards no ban.
            probe, _ = await self._send("GET", self._endpoint("app/version"), None)
            if probe == 401:
                raise QBittorrentError(_unauthorized(url))
            raise self._refused(self._record(turn.refused), turn.path, sent=True)
        elif code == 403:
            raise self._refused(self._record(turn.banned), turn.path, sent=True)
        elif code == 200:
            raise QBittorrentError(
                f"{url} answered 200 but neither 'Ok.' nor 'Fails.': "
                "is base_url the address of qBittorrent's Web UI?"
            )
        else:
            raise QBittorrentError(_unexpected(url, code))

    def _record(self, outcome: Callable[[], Refusal]) -> Refusal:
        try:
            return outcome()
        except StoreError as e:
            # Unrecorded, a refusal could be repeated by the next run: this
            # process at least sends no more logins.
            _log.error("{why}", why=str(e))
            now = self._reactor.seconds()
            return Refusal(LOGIN_TRIES, now, 0.0, math.inf)

    def _refused(self, refusal: Refusal, path: str, sent: bool) -> LoginRefused:
        """The refusal to raise, saying what to fix and how to retry now."""
        new = refusal != self._lastRefusal
        self._lastRefusal = refusal
        base = self._baseURL
        if refusal.bannedUntil:
            until = _clock(refusal.bannedUntil)
            head = (
                f"qBittorrent at {base} has banned this address after too many "
                "failed logins"
                if sent
                else f"not logging in to qBittorrent at {base}: it banned this "
                f"address (recorded in {path})"
            )
            return LoginRefused(
                f"{head}; no login until {until} (its WebUI ban lasts 1 hour by "
                "default, WebUI\\BanDuration)",
                "banned",
                refusal.retryAt,
                new,
            )
        fix = (
            f"check qbittorrent.username ({self._config.username!r}) and the "
            f"password ({self._config.password_from or 'qbittorrent.password'}): "
            "new credentials are tried at once (the daemon reads them when it "
            "starts)"
        )
        if sent:
            head = (
                f"qBittorrent at {base} refused the login: wrong username or password"
            )
        else:
            head = (
                f"not logging in to qBittorrent at {base}: it refused these "
                f"credentials {refusal.refusals} time(s), the last at "
                f"{_clock(refusal.lastRefusal)} (recorded in {path})"
            )
        if refusal.retryAt == math.inf:
            then = (
                "no more tries with them, so that qBittorrent does not ban this "
                f"address; {fix}; if they were right after all, run "
                f"'qb-port-sync --forget-refusals' (or delete {path}) to try "
                "them again"
            )
        else:
            then = (
                f"one more try with them after {_clock(refusal.retryAt)}; {fix}, "
                f"or run 'qb-port-sync --forget-refusals' (or delete {path}) "
                "to try them again now"
            )
        return LoginRefused(f"{head}; {then}", "credentials", refusal.retryAt, new)

    async def _send(
        self, method: str, url: str, data: dict[str, str] | None
    ) -> tuple[int, bytes]:
        async def exchange() -> tuple[int, bytes]:
            response = await self._http.request(
                method,
                url,
                headers=self._headers,
                data=data,
                allow_redirects=False,
            )
            body = await response.content()
            if 300 <= response.code < 400:
                location = response.headers.getRawHeaders("location", [""])[0]
                raise QBittorrentError(
                    f"{url} redirects to {redact(location)!r}: set base_url to the "
                    "address qBittorrent answers at"
                )
            return response.code, body

        def timedOut(result: object, timeout: float) -> NoReturn:
            raise _NoAnswer(f"{url} did not answer within {timeout:g} s")

        exchanged = defer.Deferred.fromCoroutine(exchange())
        exchanged.addTimeout(
            self._config.timeout_secs, self._reactor, onTimeoutCancel=timedOut
        )
        try:
            return await exchanged
        except Exception as e:
            if await self._speaksPlainHTTP(url, e):
                raise QBittorrentError(f"{url}: {mismatchMessage(url)}") from e
            if isinstance(e, QBittorrentError):
                raise
            raise QBittorrentError(f"{url}: {_describe(e)}") from e

    async def _speaksPlainHTTP(self, url: str, e: Exception) -> bool:
        """
        Whether C{url} got no TLS answer, C{e}, because its server speaks
        plain HTTP.
        """
        if self._plainHTTPProbe is None or not url.startswith("https://"):
            return False
        reasons: list[Failure] = getattr(e, "reasons", [])
        if not isinstance(e, _NoAnswer) and not any(
            isinstance(reason.value, error.ConnectionClosed) or _notTLS(reason.value)
            for reason in reasons
        ):
            return False
        return await self._plainHTTPProbe(url)


class _NoAnswer(QBittorrentError):
    """No answer came within C{timeout_secs}."""


def _notTLS(e: BaseException | None) -> bool:
    """Whether OpenSSL failed because the other side does not speak TLS."""
    text = str(e)
    return isinstance(e, SSL.Error) and any(
        sign in text
        for sign in ("wrong version number", "packet length too long", "http request")
    )


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _describe(e: Exception) -> str:
    """Say in words why a request got no answer."""
    reasons: list[Failure] = getattr(e, "reasons", [])
    for reason in reasons:
        if _notTLS(reason.value):
            return (
                f"the server does not answer in TLS ({reason.value}): if it "
                "serves plain HTTP, use http://, or enable HTTPS in qBittorrent"
            )
        if isinstance(reason.value, SSL.Error | VerificationError):
            return (
                f"the TLS certificate could not be verified ({reason.value}); if "
                "qBittorrent uses a self-signed or private-CA certificate, set "
                "[qbittorrent] ca_file to that CA certificate (PEM)"
            )
    if isinstance(e, error.ConnectionRefusedError):
        return (
            "connection refused; is qBittorrent running with its Web UI on "
            "that address and port?"
        )
    if isinstance(e, error.DNSLookupError):
        return f"the host name could not be resolved ({e})"
    if isinstance(e, error.ConnectError):
        return f"could not connect ({e})"
    if reasons:
        why = "; ".join(reason.getErrorMessage() for reason in reasons)
        return f"the connection broke off ({why})"
    return f"{type(e).__name__}: {e}"


def _unauthorized(url: str) -> str:
    return (
        f"{url} answered 401 Unauthorized: qBittorrent's CSRF or Host header "
        "check refused the request; base_url must be the address qBittorrent "
        "is reached at (a reverse proxy must pass the Host header through)"
    )


def _unexpected(url: str, code: int) -> str:
    if code == 404:
        return f"{url} answered 404 Not Found: is base_url qBittorrent's Web UI?"
    if code >= 500:
        return f"{url} answered {code}: qBittorrent (or a proxy before it) failed"
    return f"{url} answered an unexpected HTTP {code}"


def _parseJSON(body: bytes, url: str) -> object:
    try:
        result: object = json.loads(body)
    except ValueError as e:
        raise QBittorrentError(f"{url} answered something that is not JSON") from e
    return result


def _holds(prefs: dict[str, Any], wanted: dict[str, object]) -> bool:
    """Whether C{prefs} already has every value in C{wanted}."""
    return all(prefs.get(key, False) == value for key, value in wanted.items())


def _portField(prefs: dict[str, Any], key: str, url: str) -> int:
    value = prefs.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise QBittorrentError(f"{url} answered no integer {key}: {value!r}")
    return value
