"""
An emulation of gluetun's control server, as far as port forwarding goes:
C{GET /v1/portforward} (3.41+) and C{GET /v1/openvpn/portforwarded} (older),
each answering C{{"port": N}}, behind C{auth = "apikey"} (X-API-Key) or
C{auth = "basic"}, unauthorised requests getting 401 as gluetun's do.

Serve it through C{treq.testing.StubTreq(fake.resource())} in unit tests,
or for real with C{python -m tests.fakegluetun} (see L{main}).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from attrs import define, field
from twisted.web.resource import Resource
from twisted.web.server import Request

NEW_ROUTE = b"/v1/portforward"
OLD_ROUTE = b"/v1/openvpn/portforwarded"


@define
class FakeGluetun:
    """
    The state of one gluetun: the port it forwards (0 = none yet), its auth,
    whether it is old (no C{/v1/portforward}), and the requests it saw.
    """

    port: int = 0
    apiKey: str = ""
    username: str = ""
    password: str = ""
    old: bool = False
    body: bytes | None = None
    """When set, answered instead of the JSON (malformed-answer tests)."""
    status: int = 200
    requests: list[tuple[bytes, dict[bytes, bytes]]] = field(factory=list)

    def resource(self) -> Resource:
        """The root resource serving this gluetun."""
        return _Root(self)

    def authorised(self, request: Request) -> bool:
        if self.apiKey:
            return request.getHeader(b"x-api-key") == self.apiKey.encode()
        if self.username or self.password:
            pair = f"{self.username}:{self.password}".encode()
            expected = b"Basic " + base64.b64encode(pair)
            return request.getHeader(b"authorization") == expected
        return True

    def render(self, request: Request) -> bytes:
        path = request.path
        headers = {
            name.lower(): values[0]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((path, headers))
        routes = (OLD_ROUTE,) if self.old else (NEW_ROUTE, OLD_ROUTE)
        if request.method != b"GET" or path not in routes:
            request.setResponseCode(404)
            return b"404 page not found\n"
        if not self.authorised(request):
            request.setResponseCode(401)
            return b"Unauthorized\n"
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        if self.body is not None:
            return self.body
        return json.dumps({"port": self.port}).encode() + b"\n"


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: FakeGluetun) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> bytes:
        return self._fake.render(request)


class _Control(Resource):
    """C{PUT /_test/port} with the new port as its body, for subprocess tests."""

    isLeaf = True

    def __init__(self, fake: FakeGluetun) -> None:
        super().__init__()
        self._fake = fake

    def render_PUT(self, request: Request) -> bytes:
        assert request.content is not None
        self._fake.port = int(request.content.read())
        return b"ok\n"


def main(argv: list[str]) -> None:
    """
    Serve a fake gluetun on 127.0.0.1 at an unused port: C{python -m
    tests.fakegluetun PORT APIKEY USERNAME PASSWORD [old]} (empty strings
    for none).  Prints C{listening <port>} once it listens; a second server,
    for the test's own control, listens on the port printed as C{control}.
    """
    from twisted.internet import reactor
    from twisted.web.server import Site

    port, apiKey, username, password = argv[:4]
    fake = FakeGluetun(
        port=int(port),
        apiKey=apiKey,
        username=username,
        password=password,
        old=argv[4:5] == ["old"],
    )
    r: Any = reactor
    listening = r.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    control = r.listenTCP(0, Site(_Control(fake)), interface="127.0.0.1")
    print(f"listening {listening.getHost().port}", flush=True)
    print(f"control {control.getHost().port}", flush=True)
    r.run()


if __name__ == "__main__":
    main(sys.argv[1:])
