"""
C{qb-port-sync check} for real: against a real qbittorrent-nox
(L{tests.rig}), and against the real miniupnpd gateway (L{tests.rig_gateway})
from inside its client namespace.  It must pass where everything works,
fail with the right exit code where not, and change nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import qbportsync
from tests.rig import (
    QBittorrentRig,
    checkoutEnvironment,
    freePort,
    requireQBittorrent,
    requireTool,
)
from tests.rig_gateway import (
    GATEWAY_ADDRESS,
    GATEWAY_EXTERNAL,
    ClientQBittorrent,
    GatewayRig,
    requireGatewayTools,
)

ROOT = Path(qbportsync.__file__).parent.parent
PASSWORD_ENV = "QB_PORT_SYNC_QB_PASSWORD"
CHECK = [sys.executable, "-m", "qbportsync", "check"]


def environment(password: str, state: Path) -> dict[str, str]:
    """This checkout first, the password, a refusal record of the test's own."""
    return checkoutEnvironment(STATE_DIRECTORY=str(state), **{PASSWORD_ENV: password})


def steps(output: str) -> dict[str, tuple[str, str]]:
    """Each step's verdict and detail from C{--json}."""
    result: dict[str, Any] = json.loads(output)
    return {s["step"]: (s["verdict"], s["detail"]) for s in result["steps"]}


class QBittorrentCheckTests(SynchronousTestCase):
    """check against a real qBittorrent 4.5.2 on the host side of its namespace."""

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig()
        self.addCleanup(self.rig.close)
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.portFile = self.directory / "forwarded_port"
        self.portFile.write_text("47000\n")
        self.config = self.directory / "config.toml"
        self.config.write_text(
            "[qbittorrent]\n"
            f'base_url = "{self.rig.baseURL}"\n'
            f'username = "{self.rig.username}"\n'
            "[protonvpn]\n"
            f'forwarded_port_path = "{self.portFile}"\n'
            "[net]\n"
            'bind_interface = "lo"\n'
            "[metrics]\n"
            "enabled = true\n"
            f"port = {freePort()}\n"
        )
        self.config.chmod(0o600)

    def check(self, *argv: str, password: str | None = None) -> tuple[int, str]:
        done = subprocess.run(
            [*CHECK, "--config", str(self.config), *argv],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(
                self.rig.password if password is None else password,
                self.directory / "state",
            ),
            cwd=self.directory,
        )
        self.assertNotIn(self.rig.password, done.stdout + done.stderr)
        return done.returncode, done.stdout

    def test_passes(self) -> None:
        """
        Every step passes against a working qBittorrent; the port is not
        touched and one login was made.
        """
        code, out = self.check("--strategy", "file", "--json")
        self.assertEqual(code, 0, out)
        found = steps(out)
        self.assertEqual(
            {name: verdict for name, (verdict, _) in found.items()},
            {
                "config": "ok",
                "secrets": "skip",
                "qbittorrent": "ok",
                "tls": "skip",
                "login": "ok",
                "csrf": "ok",
                "version": "ok",
                "interface": "ok",
                "port file": "ok",
                "metrics": "ok",
            },
        )
        self.assertEqual(found["version"][1], "qBittorrent v4.5.2, Web API 2.8.19")
        self.assertEqual(self.rig.listenPort(), 6881)
        code, text = self.check("--strategy", "file")
        self.assertEqual(code, 0)
        self.assertIn("Everything qb-port-sync needs works.", text)

    def test_httpsToPlainHTTP(self) -> None:
        """An https:// base_url for this plain-HTTP qBittorrent: TLS fails, named."""
        self.config.write_text(
            self.config.read_text().replace("http://", "https://", 1)
        )
        code, out = self.check("--strategy", "file", "--json")
        self.assertEqual(code, 2, out)
        verdict, detail = steps(out)["tls"]
        self.assertEqual(verdict, "fail")
        self.assertIn("answered in plain HTTP, not TLS", detail)
        self.assertEqual(self.rig.failedLogins(), [])

    def test_wrongPassword(self) -> None:
        """
        A wrong password: exit 1 and one failed login in qBittorrent's log;
        a second check right after sends none (the refusal is on record).
        """
        for _ in range(2):
            code, out = self.check("--strategy", "file", "--json", password="wrong")
            self.assertEqual(code, 1, out)
            self.assertEqual(steps(out)["login"][0], "fail")
        self.assertEqual(
            len(self.rig.failedLogins(self.rig.namespace.clientAddress)), 1
        )
        self.assertFalse(self.rig.isBanned(self.rig.namespace.clientAddress))


class GatewayCheckTests(SynchronousTestCase):
    """check inside the client namespace, against miniupnpd and qBittorrent."""

    def setUp(self) -> None:
        requireGatewayTools()
        requireTool("qbittorrent-nox")
        self.rig = GatewayRig()
        self.addCleanup(self.rig.close)
        self.qbittorrent = ClientQBittorrent(self.rig)
        self.config = self.rig.directory / "check.toml"
        self.config.write_text(
            "[qbittorrent]\n"
            f'base_url = "{self.qbittorrent.baseURL}"\n'
            f'username = "{self.qbittorrent.username}"\n'
            "[protonvpn]\n"
            f'forwarded_port_path = "{self.rig.directory}/no-vpn/forwarded_port"\n'
        )
        self.config.chmod(0o600)

    def check(self, *argv: str) -> tuple[int, str]:
        done = subprocess.run(
            self.rig.command(
                self.rig.client,
                [*CHECK, "--config", str(self.config), *argv],
            ),
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(self.qbittorrent.password, self.rig.directory / "state"),
            cwd=ROOT,
        )
        return done.returncode, done.stdout + done.stderr

    def test_auto(self) -> None:
        """
        auto, with no port file: the gateway is found in the routing table and
        answers PCP's ANNOUNCE; no mapping is made.
        """
        code, out = self.check("--json")
        self.assertEqual(code, 0, out)
        found = steps(out)
        self.assertEqual(found["gateway"][0], "ok")
        self.assertRegex(
            found["gateway"][1], rf"^{GATEWAY_ADDRESS}, route: .* via {GATEWAY_ADDRESS}"
        )
        self.assertEqual(found["pcp"][0], "ok")
        self.assertRegex(found["pcp"][1], r"answers: epoch \d+ s$")
        self.assertNotIn("dnat", self.rig.rules())
        code, text = self.check()
        self.assertEqual(code, 0, text)

    def test_natpmp(self) -> None:
        """natpmp: the external address and epoch from the gateway; no mapping."""
        code, out = self.check("--strategy", "natpmp", "--json")
        self.assertEqual(code, 0, out)
        verdict, detail = steps(out)["natpmp"]
        self.assertEqual(verdict, "ok")
        self.assertIn(f"external address {GATEWAY_EXTERNAL}, epoch", detail)
        self.assertNotIn("dnat", self.rig.rules())

    def test_gatewayDown(self) -> None:
        """With miniupnpd stopped, the gateway step fails with exit 3."""
        self.rig.stop()
        code, out = self.check("--strategy", "natpmp", "--json")
        self.assertEqual(code, 3, out)
        self.assertEqual(steps(out)["natpmp"][0], "fail")
