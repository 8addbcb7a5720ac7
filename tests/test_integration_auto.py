"""The auto strategy in the real daemon, against a real qbittorrent-nox."""

from __future__ import annotations

from qbportsync.sources.auto import FILE_CHECK_SECS
from tests.rig import waitFor
from tests.test_integration_daemon import SLACK_SECS, DaemonTestCase


class DaemonSwitchTests(DaemonTestCase):
    """The real daemon on --strategy auto, against a real qbittorrent-nox."""

    def test_switchesToPortFile(self) -> None:
        """A port file that appears while auto serves from the gateway is applied."""
        self.portFile.parent.rmdir()
        config = self.writeConfig()
        with open(config, "a") as f:
            # Nobody answers PCP on loopback: the gateway fails, and nothing leaves.
            f.write('\n[portmap]\ngateway = "127.0.0.1"\n')
        run = self.spawn(["--config", str(config), "--strategy", "auto"])
        waitFor(
            lambda: "auto chose the gateway" in run.output(),
            "the daemon to choose the gateway",
            timeout=30,
        )
        self.portFile.parent.mkdir()
        self.writeInPlace("40123")
        took = self.waitForPort(40123, timeout=FILE_CHECK_SECS + SLACK_SECS)
        print(f"\nauto: port file applied {took:.2f} s after it appeared")
        self.assertIn("auto switched from the gateway to the port file", run.output())
