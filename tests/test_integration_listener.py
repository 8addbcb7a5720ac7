"""
Each way of healing a dead listener, against a real qbittorrent-nox bound
to an interface that was deleted and created again.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.trial.unittest import TestCase

from qbportsync.config import QBittorrentConfig
from qbportsync.listener import probeListener
from qbportsync.qbittorrent import QBittorrentClient, makeHTTPClient
from qbportsync.refusals import RefusalStore
from tests.rig import QBittorrentRig, requireQBittorrent, waitFor
from tests.test_integration_daemon import peerConnects

PORT = 40900
LISTEN_LATENCY_SECS = 0.02
"""libtorrent listens this long after a setPreferences (FACTS.md)."""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RelistenTests(TestCase):
    """QBittorrentClient.relisten after a real interface bounce."""

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig()
        self.addCleanup(self.rig.close)
        self.address = self.rig.namespace.address
        self.rig.setPreferences(
            {"current_network_interface": "qbps0", "listen_port": PORT}
        )
        waitFor(lambda: peerConnects(self.address, PORT), "a peer to connect")
        self.rig.namespace.bounce()
        self.assertFalse(peerConnects(self.address, PORT), "not dead after a bounce")
        config = QBittorrentConfig(
            base_url=self.rig.baseURL,
            username=self.rig.username,
            password=self.rig.password,
        )
        reactor = _reactor()
        self.client = QBittorrentClient(
            reactor,
            makeHTTPClient(reactor, config),
            config,
            RefusalStore(reactor, self.mktemp()),
        )

    async def heal(self, how: str) -> None:
        """Relisten C{how}; a peer and the probe connect within 5 s."""
        started = time.monotonic()
        await self.client.relisten(PORT, self.address, how)
        waitFor(lambda: peerConnects(self.address, PORT), f"{how} to heal", 5)
        print(f"\n  {how}: healed {time.monotonic() - started:.2f} s", end=" ")
        self.assertIs(await probeListener(_reactor(), self.address, PORT), True)
        preferences = self.rig.preferences()
        self.assertEqual(
            (
                preferences["listen_port"],
                preferences["current_network_interface"],
                preferences["current_interface_address"],
            ),
            (PORT, "qbps0", ""),
        )

    async def test_address(self) -> None:
        """Binding the listening address and back heals; settings end as before."""
        await self.heal("address")

    async def test_port(self) -> None:
        """Moving the port away and back heals; settings end as before."""
        await self.heal("port")

    async def test_sameSettingsDoNotHeal(self) -> None:
        """Sending the same port and interface again leaves it refusing."""
        self.rig.setPreferences(
            {"current_network_interface": "qbps0", "listen_port": PORT}
        )
        # A hundred times what libtorrent takes to listen after a change.
        time.sleep(100 * LISTEN_LATENCY_SECS)
        self.assertIs(await probeListener(_reactor(), self.address, PORT), False)
        self.assertFalse(peerConnects(self.address, PORT))
