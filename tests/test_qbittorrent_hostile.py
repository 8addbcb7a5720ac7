"""
What the qBittorrent client says about a mistaken or hostile server: never a
secret from a URL, and a protocol mismatch named as one.
"""

from __future__ import annotations

from functools import partial

from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from qbportsync.config import ConfigError, QBittorrentConfig
from qbportsync.plainhttp import speaksPlainHTTP
from qbportsync.qbittorrent import (
    QBittorrentClient,
    QBittorrentError,
    makeHTTPClient,
)
from tests.fakeqbittorrent import FakeQBittorrent
from tests.test_plainhttp import listen, realReactor
from tests.test_qbittorrent import (
    PASSWORD,
    _certificates,
    _Silent,
    newClient,
    qbConfig,
    refusalStore,
    stubClient,
)

SECRET = "tok3n-Secret-in-a-URL"


class _RedirectWithSecrets(Resource):
    """Redirects to a URL that carries credentials and a token."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.responseHeaders.setRawHeaders(
            b"location", [f"https://u:{SECRET}@elsewhere/x?t={SECRET}".encode()]
        )
        return b""


class RedactionTests(SynchronousTestCase):
    """URLs in the client's errors are printed without their secrets."""

    def test_redirectTarget(self) -> None:
        """A redirect is named by where it goes, without user info or query."""
        client = newClient(
            self, Clock(), stubClient(_RedirectWithSecrets()), qbConfig()
        )
        error = self.failureResultOf(client.listenPort(), QBittorrentError).value
        self.assertIn("redirects to 'https://***@elsewhere/x?***'", str(error))
        self.assertNotIn(SECRET, str(error))

    def test_ipv6BaseURL(self) -> None:
        """The IPv6 literal error shows base_url without its query."""
        config = QBittorrentConfig(
            base_url=f"http://[::1]:8080/?token={SECRET}", password=PASSWORD
        )
        error = self.assertRaises(
            ConfigError, newClient, self, Clock(), stubClient(Resource()), config
        )
        self.assertIn("base_url http://[::1]:8080/?***: IPv6", str(error))
        self.assertNotIn(SECRET, str(error))


class _PlainOnly(Protocol):
    """
    A plain-HTTP server of the answering kind: 200 to a GET, and 400 at once
    to anything else, such as a TLS ClientHello.
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith(b"GET "):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.transport.loseConnection()


class ProtocolMismatchTests(TestCase):
    """
    An https:// base_url in front of a plain-HTTP server is named as such,
    with the real client against real servers on 127.0.0.1.
    """

    def setUp(self) -> None:
        self.reactor = realReactor()

    def client(
        self, port: int, probe: bool = True, caFile: str | None = None
    ) -> QBittorrentClient:
        config = QBittorrentConfig(
            base_url=f"https://127.0.0.1:{port}",
            password=PASSWORD,
            ca_file=caFile,
            timeout_secs=1.0,
        )
        return QBittorrentClient(
            self.reactor,
            makeHTTPClient(self.reactor, config),
            config,
            refusalStore(self, self.reactor),
            partial(speaksPlainHTTP, self.reactor) if probe else None,
        )

    def expected(self, port: int) -> str:
        return (
            f"https://127.0.0.1:{port}/api/v2/auth/login: the server at "
            f"https://127.0.0.1:{port} answered in plain HTTP, not TLS: use "
            "http:// or enable HTTPS in qBittorrent"
        )

    async def test_silentPlainServer(self) -> None:
        """
        twisted.web (like qBittorrent) waits in silence for a line that a
        ClientHello never ends: the timeout is then named as the mismatch.
        """
        fake = FakeQBittorrent(password=PASSWORD)
        port = listen(
            self,
            self.reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1"),
        )
        error = await self.assertFailure(self.client(port).version(), QBittorrentError)
        self.assertEqual(str(error), self.expected(port))

    async def test_answeringPlainServer(self) -> None:
        """A server that answers the ClientHello in text is named the same."""
        factory = Factory.forProtocol(_PlainOnly)
        port = listen(self, self.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        error = await self.assertFailure(self.client(port).version(), QBittorrentError)
        self.assertEqual(str(error), self.expected(port))

    async def test_withoutProbe(self) -> None:
        """Unasked, OpenSSL's 'wrong version number' is still not a certificate."""
        factory = Factory.forProtocol(_PlainOnly)
        port = listen(self, self.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        d = self.client(port, probe=False).version()
        error = await self.assertFailure(d, QBittorrentError)
        self.assertIn("the server does not answer in TLS (", str(error))
        self.assertIn("wrong version number", str(error))
        self.assertIn("use http://, or enable HTTPS in qBittorrent", str(error))
        self.assertNotIn("certificate", str(error))

    async def test_untrustedTLSStaysACertificateProblem(self) -> None:
        """A real TLS server with an unknown CA is still a certificate matter."""
        _, keyPEM, certPEM = _certificates()
        options = ssl.PrivateCertificate.loadPEM(keyPEM + certPEM).options()
        fake = FakeQBittorrent(password=PASSWORD)
        port = listen(
            self,
            self.reactor.listenSSL(
                0, Site(fake.resource()), options, interface="127.0.0.1"
            ),
        )
        error = await self.assertFailure(self.client(port).version(), QBittorrentError)
        self.assertIn("the TLS certificate could not be verified", str(error))
        self.assertNotIn("plain HTTP", str(error))

    async def test_silentTLSServerStaysATimeout(self) -> None:
        """A TLS server that never answers is a timeout, not plain HTTP."""
        caPEM, keyPEM, certPEM = _certificates()
        caFile = self.mktemp()
        with open(caFile, "wb") as f:
            f.write(caPEM)
        options = ssl.PrivateCertificate.loadPEM(keyPEM + certPEM).options()
        port = listen(
            self,
            self.reactor.listenSSL(0, Site(_Silent()), options, interface="127.0.0.1"),
        )
        d = self.client(port, caFile=caFile).version()
        error = await self.assertFailure(d, QBittorrentError)
        self.assertEqual(
            str(error),
            f"https://127.0.0.1:{port}/api/v2/auth/login did not answer within 1 s",
        )
