"""
A fake qBittorrent Web API (v2) for unit tests, emulating 4.5 or 5.2.

Serve it with C{treq.testing.StubTreq(fake.resource())}, or take
C{fake.httpClient()}, which is exactly that, typed as an C{HTTPClient}::

    fake = FakeQBittorrent("5.2", password="secret")
    client = QBittorrentClient(Clock(), fake.httpClient(), config, refusals)

What it emulates (see FACTS.md, "qBittorrent Web API v2"):

    - login: 4.5 answers 200 C{Ok.} / 200 C{Fails.} and sets cookie C{SID};
      5.2 answers 204 / 401 and sets C{QBT_SID_<webUIPort>}; both answer 403
      once C{failedLogins} reaches C{maxFailures} (the ban; set
      C{failedLogins = 0} to lift it), even to the right password;
    - private endpoints without a live session answer 403;
    - CSRF: an Origin or Referer whose host and port differ from the Host
      header answers 401 (skipped for a 5.2 API key);
    - 5.2 API key: C{Authorization: Bearer <apiKey>}; a wrong key gets no
      session (403), and C{auth/*} with a key is 403;
    - C{app/setPreferences} (POST only, form field C{json}) answers 200 on
      4.5 and 204 on 5.2, and, like the real one, stores ports out of range;
      C{random_port: true} wins over C{listen_port};
    - C{app/preferences}, C{app/networkInterfaceList}, C{app/version},
      C{app/webapiVersion}.

State to read or change: C{preferences}, C{interfaces}, C{requests} (every
request seen, as L{SeenRequest}), C{loginAttempts}, C{failedLogins},
C{sessions}, C{password}, C{apiKey}, C{ignoreSetPreferences}; helpers
C{expireSessions()}, C{failNext(status, body, endpoint)}, C{banned}.

The fake reads the path below where it is mounted, so putting it under a
child of another resource emulates a reverse proxy with a path prefix.
"""

from __future__ import annotations

import json
from typing import Literal, cast
from urllib.parse import urlsplit

from attrs import frozen
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import Request

Version = Literal["4.5", "5.2"]

_VERSIONS = {"4.5": ("v4.5.2", "2.8.19"), "5.2": ("v5.2.0", "2.15.1")}
_POST_ONLY = {"auth/login", "auth/logout", "app/setPreferences"}
_SETTABLE = ("upnp", "current_network_interface", "current_interface_address")


@frozen
class SeenRequest:
    """One request as the fake received it."""

    method: str
    path: str
    """The path below the fake's mount point, such as C{/api/v2/app/version}."""
    headers: dict[str, str]
    """Header names in lower case."""


class FakeQBittorrent:
    """
    State of one emulated qBittorrent.  Tests read and change the public
    attributes directly.
    """

    def __init__(
        self,
        version: Version = "4.5",
        *,
        username: str = "admin",
        password: str = "adminadmin",
        apiKey: str = "",
        webUIPort: int = 8080,
        maxFailures: int = 5,
    ) -> None:
        self.version = version
        self.username = username
        self.password = password
        self.apiKey = apiKey
        """Only a 5.2 fake honours it; empty means no key is configured."""
        self.maxFailures = maxFailures
        self.cookieName = "SID" if version == "4.5" else f"QBT_SID_{webUIPort}"
        self.preferences: dict[str, object] = {
            "listen_port": 8999,
            "random_port": False,
            "upnp": True,
            "current_network_interface": "",
            "current_interface_address": "",
        }
        self.interfaces: list[dict[str, str]] = [
            {"name": "lo", "value": "lo"},
            {"name": "eth0", "value": "eth0"},
        ]
        """What C{app/networkInterfaceList} answers."""
        self.ignoreSetPreferences = False
        """When true, C{setPreferences} answers as usual but changes nothing."""
        self.loginAttempts = 0
        """Every C{auth/login} request, refused or not."""
        self.failedLogins = 0
        """Wrong credentials since the last good login; at C{maxFailures}: ban."""
        self.requests: list[SeenRequest] = []
        self.sessions: set[str] = set()
        """Live session ids; the cookie of any other id gets 403."""
        self._failures: list[tuple[str, int, bytes]] = []

    def resource(self) -> Resource:
        """A twisted.web resource serving this fake."""
        return _FakeResource(self)

    def httpClient(self) -> HTTPClient:
        """A new in-memory HTTP client (with its own cookie jar) to this fake."""
        return cast(HTTPClient, StubTreq(self.resource()))

    def expireSessions(self) -> None:
        """Forget every session, as qBittorrent does after its idle timeout."""
        self.sessions.clear()

    def failNext(self, status: int, body: bytes = b"", endpoint: str = "") -> None:
        """
        Answer the next request for C{endpoint} (such as C{app/preferences};
        empty: any request) with C{status} and C{body}, before any check.
        Calls queue up in order.
        """
        self._failures.append((endpoint, status, body))

    @property
    def banned(self) -> bool:
        """Whether logins from the client are refused with 403."""
        return 0 < self.maxFailures <= self.failedLogins

    def render(self, request: Request) -> bytes:
        """Answer one request (the resource calls this)."""
        path = "/" + b"/".join(request.postpath or []).decode("utf-8")
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        method = request.method.decode("ascii")
        self.requests.append(SeenRequest(method, path, headers))
        endpoint = path.removeprefix("/api/v2/")

        for index, (failing, status, body) in enumerate(self._failures):
            if failing in ("", endpoint):
                del self._failures[index]
                return _answer(request, status, body)

        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        usingKey = self.version == "5.2" and "authorization" in headers
        if not usingKey and self._crossSite(headers):
            return _answer(request, 401, b"Unauthorized")
        if usingKey:
            session = bool(self.apiKey) and bearer == self.apiKey
        else:
            session = self._cookieSession(request)

        if not path.startswith("/api/v2/"):
            return _answer(request, 404, b"Not Found")
        if usingKey and endpoint.startswith("auth/"):
            return _answer(request, 403, b"Forbidden")
        if not session and endpoint != "auth/login":
            return _answer(request, 403, b"Forbidden")
        if endpoint in _POST_ONLY and method != "POST":
            return _answer(request, 405, b"Method Not Allowed")
        return self._dispatch(request, endpoint, session)

    def _crossSite(self, headers: dict[str, str]) -> bool:
        target = urlsplit("http://" + headers.get("host", ""))
        for name in ("origin", "referer"):
            if name in headers:
                source = urlsplit(headers[name])
                if (source.hostname, source.port) != (target.hostname, target.port):
                    return True
        return False

    def _cookieSession(self, request: Request) -> bool:
        sid = request.getCookie(self.cookieName.encode("ascii"))
        return sid is not None and sid.decode("ascii") in self.sessions

    def _dispatch(self, request: Request, endpoint: str, session: bool) -> bytes:
        modern = self.version == "5.2"
        if endpoint == "auth/login":
            return self._login(request, session)
        if endpoint == "app/version":
            return _answer(request, 200, _VERSIONS[self.version][0].encode())
        if endpoint == "app/webapiVersion":
            return _answer(request, 200, _VERSIONS[self.version][1].encode())
        if endpoint == "app/preferences":
            return _json(request, self.preferences)
        if endpoint == "app/networkInterfaceList":
            return _json(request, self.interfaces)
        if endpoint == "app/setPreferences":
            if b"json" not in request.args:
                return _answer(request, 400, b"Bad Request")
            self._setPreferences(request.args[b"json"][0])
            return _answer(request, 204 if modern else 200, b"")
        return _answer(request, 404, b"Not Found")

    def _login(self, request: Request, session: bool) -> bytes:
        self.loginAttempts += 1
        if session:
            return self._loginOk(request)
        if self.banned:
            return _answer(
                request,
                403,
                b"Your IP address has been banned after too many failed "
                b"authentication attempts.",
            )
        username = request.args.get(b"username", [b""])[0].decode("utf-8")
        password = request.args.get(b"password", [b""])[0].decode("utf-8")
        if (username, password) != (self.username, self.password):
            self.failedLogins += 1
            if self.version == "5.2":
                return _answer(request, 401, b"Unauthorized")
            return _answer(request, 200, b"Fails.")
        self.failedLogins = 0
        sid = f"fake-session-{len(self.sessions)}-{self.loginAttempts}"
        self.sessions.add(sid)
        cookie = (self.cookieName.encode("ascii"), sid.encode("ascii"))
        request.addCookie(*cookie, path=b"/", httpOnly=True, sameSite="strict")
        return self._loginOk(request)

    def _loginOk(self, request: Request) -> bytes:
        if self.version == "5.2":
            return _answer(request, 204, b"")
        return _answer(request, 200, b"Ok.")

    def _setPreferences(self, raw: bytes) -> None:
        try:
            changes = json.loads(raw)
        except ValueError:
            changes = {}
        if self.ignoreSetPreferences or not isinstance(changes, dict):
            return
        if changes.get("random_port") is True:
            self.preferences["random_port"] = True
        elif "listen_port" in changes:
            self.preferences["listen_port"] = int(changes["listen_port"])
            self.preferences["random_port"] = False
        for key in _SETTABLE:
            if key in changes:
                self.preferences[key] = changes[key]


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeQBittorrent) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> bytes:
        return self._fake.render(request)


def _answer(request: Request, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(
        b"content-type", [b"text/plain; charset=UTF-8"]
    )
    return body


def _json(request: Request, value: object) -> bytes:
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return json.dumps(value).encode("utf-8")
