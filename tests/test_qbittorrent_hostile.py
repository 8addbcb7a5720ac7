"""
What the qBittorrent client says about a mistaken or hostile server: never a
secret from a URL, and a protocol mismatch named as one.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from qbportsync.config import ConfigError, QBittorrentConfig
from qbportsync.qbittorrent import QBittorrentError
from tests.test_qbittorrent import PASSWORD, newClient, qbConfig, stubClient

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
