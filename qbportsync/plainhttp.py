"""
Whether the server behind an C{https://} URL speaks plain HTTP instead.

A TLS client that reaches a plain-HTTP server learns little from the failed
handshake: OpenSSL says "wrong version number" when the server answers the
ClientHello with text, and qBittorrent (like twisted.web) answers nothing at
all, waiting for a line end that never comes, so the request just times out.
Asking the same host and port in plain HTTP settles it, and lets the error
name the mistake instead of a certificate or a timeout.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

PROBE_TIMEOUT = 5.0
"""Seconds the plain-HTTP question may take, connection included."""
_MOST = 1024
"""Bytes read at most: the status line is all we need."""
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d)\b")


def mismatchMessage(url: str) -> str:
    """What to tell the user when C{url}'s server speaks plain HTTP."""
    parts = urlsplit(url)
    return (
        f"the server at https://{parts.netloc.rpartition('@')[2]} answered in "
        "plain HTTP, not TLS: use http:// or enable HTTPS in qBittorrent"
    )


def answersPlainHTTP(answer: bytes) -> bool:
    """
    Whether C{answer}, the start of a reply to a plain C{GET /}, comes from a
    plain-HTTP server.  A 400 does not count: a TLS server asked in plain
    HTTP says so with a 400 (nginx, Apache, Go, Caddy).
    """
    match = _STATUS_LINE.match(answer)
    return match is not None and match.group(1) != b"400"


class _FirstBytes(Protocol):
    """Sends one request and keeps the first bytes of the answer."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._received = b""
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if b"\n" in self._received or len(self._received) >= _MOST:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.answer.called:
            self.answer.callback(self._received[:_MOST])


async def speaksPlainHTTP(
    reactor: Any, url: str, timeout: float = PROBE_TIMEOUT
) -> bool:
    """
    Whether the host and port of the C{https://} URL C{url} answer a plain
    HTTP C{GET /} as an HTTP server would.  No error escapes: a server that
    cannot be asked does not speak plain HTTP as far as we know.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return False
    port = parts.port or 443
    where = parts.netloc.rpartition("@")[2]
    request = f"GET / HTTP/1.0\r\nHost: {where}\r\nConnection: close\r\n\r\n"
    protocol = _FirstBytes(request.encode("ascii", "replace"))
    endpoint = HostnameEndpoint(reactor, parts.hostname, port, timeout=timeout)
    connecting = connectProtocol(endpoint, protocol)
    connecting.addTimeout(timeout, reactor)
    try:
        await connecting
        answered = protocol.answer
        answered.addTimeout(timeout, reactor)
        return answersPlainHTTP(await answered)
    except (defer.TimeoutError, CancelledError, ConnectError, OSError):
        return False
    finally:
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
