"""Tests for qbportsync.plainhttp: is it plain HTTP behind an https:// URL?"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from qbportsync.plainhttp import answersPlainHTTP, mismatchMessage, speaksPlainHTTP
from tests.test_qbittorrent import _certificates


def realReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def listen(case: TestCase, port: IListeningPort) -> int:
    """The port number of C{port}, stopped when the test ends."""
    case.addCleanup(port.stopListening)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


class _Answers(Protocol):
    """Answers whatever comes with the same bytes, then closes."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self._answer)
        self.transport.loseConnection()


class AnswerTests(SynchronousTestCase):
    """Which first bytes of an answer mean a plain-HTTP server."""

    def test_statusLines(self) -> None:
        """Any HTTP/1.x status but 400 is plain HTTP; anything else is not."""
        for answer, expected in [
            (b"HTTP/1.1 200 OK\r\n", True),
            (b"HTTP/1.0 302 Found\r\nLocation: /x", True),
            (b"HTTP/1.1 401 Unauthorized\r\n", True),
            (b"HTTP/1.1 400 Bad Request\r\n\r\nThe plain HTTP request was", False),
            (b"\x15\x03\x03\x00\x02\x02\x46", False),
            (b"SSH-2.0-OpenSSH_9.6\r\n", False),
            (b"", False),
            (b"HTTP/1.1 999 Odd\r\n", False),
        ]:
            self.assertIs(answersPlainHTTP(answer), expected, answer)

    def test_message(self) -> None:
        """The message names the server and both ways out."""
        self.assertEqual(
            mismatchMessage("https://qb.example:8080/api/v2/auth/login"),
            "the server at https://qb.example:8080 answered in plain HTTP, not "
            "TLS: use http:// or enable HTTPS in qBittorrent",
        )
        self.assertNotIn("secret", mismatchMessage("https://u:secret@qb.example/"))


class ProbeTests(TestCase):
    """speaksPlainHTTP against real servers on 127.0.0.1."""

    def setUp(self) -> None:
        self.reactor = realReactor()

    async def test_plainHTTPServer(self) -> None:
        """A twisted.web server in plain HTTP is recognised."""
        port = listen(
            self,
            self.reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1"),
        )
        self.assertTrue(
            await speaksPlainHTTP(self.reactor, f"https://127.0.0.1:{port}/x")
        )

    async def test_tlsServer(self) -> None:
        """A TLS server asked in plain HTTP is not taken for a plain one."""
        _, keyPEM, certPEM = _certificates()
        options = ssl.PrivateCertificate.loadPEM(keyPEM + certPEM).options()
        port = listen(
            self,
            self.reactor.listenSSL(0, Site(Resource()), options, interface="127.0.0.1"),
        )
        self.assertFalse(
            await speaksPlainHTTP(self.reactor, f"https://127.0.0.1:{port}/")
        )

    async def test_tlsServerSaying400(self) -> None:
        """A 400 'plain HTTP request sent to HTTPS port' is not plain HTTP."""
        answer = b"HTTP/1.1 400 Bad Request\r\n\r\nplain HTTP sent to HTTPS port"
        factory = Factory.forProtocol(lambda: _Answers(answer))
        port = listen(self, self.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.assertFalse(
            await speaksPlainHTTP(self.reactor, f"https://127.0.0.1:{port}/")
        )

    async def test_nobodyThere(self) -> None:
        """A closed port is no plain-HTTP server."""
        probe = self.reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        closed = probe.getHost().port
        await probe.stopListening()
        self.assertFalse(
            await speaksPlainHTTP(self.reactor, f"https://127.0.0.1:{closed}/")
        )

    async def test_silentServer(self) -> None:
        """A server that never answers is given up on after the timeout."""
        factory = Factory.forProtocol(Protocol)
        port = listen(self, self.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.assertFalse(
            await speaksPlainHTTP(
                self.reactor, f"https://127.0.0.1:{port}/", timeout=0.2
            )
        )

    async def test_onlyHTTPS(self) -> None:
        """An http:// URL is not asked about at all."""
        self.assertFalse(await speaksPlainHTTP(None, "http://127.0.0.1:1/"))
