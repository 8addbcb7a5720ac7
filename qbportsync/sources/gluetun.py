"""
gluetun's control server: C{GET /v1/portforward} answers C{{"port": N}}
(gluetun 3.41 and later), C{GET /v1/openvpn/portforwarded} the same in older
releases.  Polled, since gluetun pushes nothing.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import NoReturn

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from qbportsync.backoff import Backoff
from qbportsync.config import GluetunConfig
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceError,
    SourceTrouble,
)
from qbportsync.metrics import Metrics

_log = Logger()

DEFAULT_URL = "http://127.0.0.1:8000"
"""Where gluetun's control server listens when C{[gluetun] url} is empty."""
ROUTES = ("/v1/portforward", "/v1/openvpn/portforwarded")
"""The current route first, then the one gluetun before 3.41 serves."""
BODY_LIMIT = 4096
"""An answer is a few bytes of JSON; more is not gluetun's."""
RETRY_FIRST = 1.0
"""The first wait after a failed poll; waits grow up to the poll interval."""

KIND = "gluetun"
"""Label of qb_port_sync_errors_total for gluetun's troubles."""


class GluetunRefused(SourceError):
    """
    gluetun refused our credentials (401/403): only the user can fix it.
    Exit code 1, as a refused qBittorrent login: the contract's "auth".
    """


class _Problem(Exception):
    """One poll failed; the message is for operators."""

    def __init__(self, message: str, kind: str = KIND, permanent: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.permanent = permanent


class _NotFound(Exception):
    """The route answered 404: gluetun is of the other generation."""


def parsePort(body: bytes) -> int:
    """
    The port in gluetun's answer, 0 when it has none yet.  Raises
    L{ValueError} for anything that is not C{{"port": <0-65535>}}.
    """
    if len(body) > BODY_LIMIT:
        raise ValueError(f"{len(body)} bytes, too long for a port")
    try:
        answer: object = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(answer, dict) or "port" not in answer:
        raise ValueError('not a JSON object with a "port"')
    port = answer["port"]
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f'"port" is not a whole number: {json.dumps(port)[:40]}')
    if not 0 <= port <= 65535:
        raise ValueError(f'"port" {port} is outside 0-65535')
    return port


def authHeaders(config: GluetunConfig) -> dict[bytes | str, bytes | str]:
    """The headers that authenticate us as C{config} says: API key, basic, both."""
    headers: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
    if config.api_key:
        headers["X-API-Key"] = config.api_key
    if config.username or config.password:
        pair = f"{config.username}:{config.password}".encode()
        headers["Authorization"] = b"Basic " + base64.b64encode(pair)
    return headers


@implementer(IPortSource)
class GluetunSource:
    """
    Ask gluetun's control server for the forwarded port every
    C{poll_interval_secs}; report each port, or why there is none (no port
    yet, unreachable, refused, nonsense), keeping the last good one.
    """

    name = "gluetun"

    def __init__(
        self,
        reactor: IReactorTime,
        http: HTTPClient,
        config: GluetunConfig,
        metrics: Metrics,
        *,
        timeout: float = 10.0,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self._config = config
        self._metrics = metrics
        self._timeout = timeout
        self.url = (config.url or DEFAULT_URL).rstrip("/")
        self._headers = authHeaders(config)
        self._route = ROUTES[0]
        self._backoff = Backoff(
            first=RETRY_FIRST, cap=max(RETRY_FIRST, config.poll_interval_secs), rnd=rnd
        )
        self._deliver: Report | None = None
        self._timer: IDelayedCall | None = None
        self._inFlight: Deferred[int] | None = None
        self._lastPort: int | None = None

    def __repr__(self) -> str:
        return f"<GluetunSource {self.url}>"

    def start(self, deliver: Report) -> None:
        """Poll now, then every poll interval (sooner after a failure)."""
        self._deliver = deliver
        _log.info("Asking gluetun at {url} for the forwarded port", url=self.url)
        self._poll()

    def stop(self) -> Deferred[None]:
        """Stop polling and abandon a request in flight."""
        self._deliver = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._inFlight is not None:
            self._inFlight.cancel()
        stopped: Deferred[None] = Deferred()
        stopped.callback(None)
        return stopped

    def fetchOnce(self) -> Deferred[Forwarded]:
        """Ask once, for the one-shot mode and C{check}."""
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        try:
            port = await self._ask()
        except _Problem as e:
            if e.permanent:
                raise GluetunRefused(str(e)) from None
            raise SourceError(str(e)) from None
        if port == 0:
            raise SourceError(self._noPortYet())
        return Forwarded(port=port, source=self.name, note=f"gluetun at {self.url}")

    def _noPortYet(self) -> str:
        return (
            f"gluetun at {self.url} has no forwarded port yet (VPN connecting, "
            "or port forwarding off: VPN_PORT_FORWARDING=on)"
        )

    def _poll(self) -> None:
        self._timer = None
        d = Deferred.fromCoroutine(self._ask())
        self._inFlight = d
        d.addCallbacks(self._answered, self._failed)

    def _schedule(self, delay: float) -> None:
        if self._deliver is not None:
            self._timer = self._reactor.callLater(delay, self._poll)

    def _answered(self, port: int) -> None:
        self._inFlight = None
        if self._deliver is None:
            return
        self._backoff.reset()
        if port == 0:
            self._deliver(SourceTrouble(self._noPortYet(), KIND))
        else:
            if port != self._lastPort:
                _log.info(
                    "gluetun at {url} forwards port {port}", url=self.url, port=port
                )
            self._lastPort = port
            self._metrics.forwarded_port.set(port)
            # Every poll, not only changes: a port after a trouble clears it.
            self._deliver(Forwarded(port=port, source=self.name))
        self._schedule(self._config.poll_interval_secs)

    def _failed(self, failure: Failure) -> None:
        self._inFlight = None
        if self._deliver is None:
            return
        problem = failure.value
        if not isinstance(problem, _Problem):
            _log.failure("Unexpected error while asking gluetun", failure)
            problem = _Problem(f"gluetun at {self.url}: {failure.getErrorMessage()}")
        self._deliver(SourceTrouble(str(problem), problem.kind, problem.permanent))
        delay = self._backoff.next()
        _log.debug(
            "Asking gluetun again in {delay:.1f} s: {why}", delay=delay, why=problem
        )
        self._schedule(delay)

    async def _ask(self) -> int:
        """
        The port gluetun forwards, trying the other route once on a 404 and
        remembering the one that answered.  Raises L{_Problem}.
        """
        first = self._route
        try:
            port = await self._get(first)
        except _NotFound:
            other = ROUTES[1] if first == ROUTES[0] else ROUTES[0]
            try:
                port = await self._get(other)
            except _NotFound:
                raise _Problem(
                    f"{self.url} answered 404 to both {ROUTES[0]} and "
                    f"{ROUTES[1]}: is [gluetun] url gluetun's control server?"
                ) from None
            _log.info("gluetun at {url} answers on {route}", url=self.url, route=other)
            self._route = other
        return port

    async def _get(self, route: str) -> int:
        url = self.url + route

        async def exchange() -> tuple[int, bytes]:
            response = await self._http.get(
                url, headers=self._headers, allow_redirects=False
            )
            body: bytes = await response.content()
            return response.code, body

        def timedOut(result: object, timeout: float) -> NoReturn:
            raise _Problem(f"gluetun at {url} did not answer within {timeout:g} s")

        d = Deferred.fromCoroutine(exchange())
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timedOut)
        try:
            code, body = await d
        except _Problem:
            raise
        except Exception as e:
            raise _Problem(f"cannot reach gluetun at {url}: {_describe(e)}") from e
        if code == 404:
            raise _NotFound()
        if code in (401, 403):
            raise _Problem(self._refusal(url, code), kind="auth", permanent=True)
        if code != 200:
            raise _Problem(f"gluetun at {url} answered HTTP {code}")
        try:
            return parsePort(body)
        except ValueError as e:
            raise _Problem(
                f"gluetun at {url} answered {e}; keeping the last port", kind="parse"
            ) from None

    def _refusal(self, url: str, code: int) -> str:
        if self._config.api_key and (self._config.username or self._config.password):
            sent = "the API key and the user name and password"
        elif self._config.api_key:
            sent = "the API key ([gluetun] api_key)"
        elif self._config.username or self._config.password:
            sent = "the user name and password ([gluetun] username, password)"
        else:
            return (
                f"gluetun at {url} answered {code}: it needs authentication; set "
                '[gluetun] api_key (gluetun auth = "apikey") or [gluetun] '
                'username and password (auth = "basic"), as in gluetun\'s '
                "/gluetun/auth/config.toml"
            )
        return (
            f"gluetun at {url} refused {sent} (HTTP {code}); fix [gluetun] "
            "api_key or username/password to match gluetun's "
            "/gluetun/auth/config.toml"
        )


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__
