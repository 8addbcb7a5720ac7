"""
NAT-PMP against a real gateway: miniupnpd 2.3.1 in network namespaces
(L{tests.rig_gateway}), with qbittorrent-nox on the client side.

Our code runs as a subprocess inside the client namespace: the one-shot CLI,
or L{tests.gatewaydriver}, which runs L{NATPMPSource} in daemon mode and
applies what it delivers with the real qBittorrent client.
"""

from __future__ import annotations

import itertools
import re
import sys
import time

from twisted.trial.unittest import TestCase

from tests.gatewaydriver import Driver
from tests.rig import requireTool
from tests.rig_gateway import (
    CLIENT_ADDRESS,
    GATEWAY_ADDRESS,
    Capture,
    ClientQBittorrent,
    GatewayRig,
    requireGatewayTools,
    writeConfig,
)


class NATPMPIntegrationTests(TestCase):
    """Our NAT-PMP client against miniupnpd, for real."""

    def setUp(self) -> None:
        requireGatewayTools()
        for tool in ("natpmpc", "tshark", "qbittorrent-nox"):
            requireTool(tool)
        self.rig = GatewayRig()
        self.addCleanup(self.rig.close)
        self.qbittorrent = ClientQBittorrent(self.rig)

    def natpmpc(self, *args: str) -> str:
        return self.rig.run(
            self.rig.client, ["natpmpc", "-g", GATEWAY_ADDRESS, *args]
        ).stdout

    def test_oneShotMapsAndApplies(self) -> None:
        """
        The one-shot maps UDP and TCP to one port, applies it, and natpmpc
        agrees.  TCP 6881 is taken, so the gateway first grants UDP 6881 and
        TCP 6882, BOTH reconciliation settles on 6882, and since 6882 then
        forwards to 6881, both are released and 6882 mapped to 6882.
        """
        taken = self.natpmpc("-a", "6881", "7000", "tcp", "60")
        self.assertIn("Mapped public port 6881 protocol TCP to local port 7000", taken)
        capture = Capture(self.rig)
        code, outcome, _ = self.rig.oneShot(
            writeConfig(self.rig, self.qbittorrent), "natpmp"
        )
        capture.stop()
        self.assertEqual(
            (code, outcome["detected_port"], outcome["applied"], outcome["verified"]),
            (0, 6882, True, True),
            outcome,
        )
        self.assertIn("ttl=60s", outcome["note"])
        self.assertEqual(self.qbittorrent.listenPort(), 6882)
        rules = self.rig.rules()
        for protocol in ("0x6", "0x11"):
            self.assertRegex(
                rules, rf"{protocol} th dport 6882 dnat ip to {CLIENT_ADDRESS}:6882"
            )
        # As the capture shows them: UDP and TCP, UDP again, both deleted,
        # then both mapped to the port that qBittorrent moves to.
        requests = capture.fields(
            "nat-pmp.opcode",
            "nat-pmp.internal_port",
            "nat-pmp.external_port",
            displayFilter="nat-pmp && ip.src == " + CLIENT_ADDRESS,
        )
        self.assertEqual(
            requests,
            [
                ["1", "6881", "6881"],
                ["2", "6881", "6881"],
                ["1", "6881", "6882"],
                ["1", "6881", "0"],
                ["2", "6881", "0"],
                ["1", "6882", "6882"],
                ["2", "6882", "6882"],
            ],
        )
        self.assertEqual(
            capture.fields("frame.number", displayFilter="_ws.malformed"), []
        )
        # natpmpc, asking the same, gets the same mapping.
        for protocol in ("udp", "tcp"):
            agreed = self.natpmpc("-a", "6882", "6882", protocol, "60")
            self.assertIn(
                f"Mapped public port 6882 protocol {protocol.upper()} to local "
                "port 6882 liftime 60",
                agreed,
            )

    def test_renewals(self) -> None:
        """
        With 4 s leases the daemon renews at half the lease, well before it
        ends: two requests per round, no retransmission, one answer each, and
        the capture decodes cleanly.
        """
        capture = Capture(self.rig)
        driver = Driver(
            self.rig, "natpmp", writeConfig(self.rig, self.qbittorrent, lifetime_secs=4)
        )
        rounds = 5
        driver.waitFor("forwarded", rounds, timeout=20)
        stopped = driver.stop()
        capture.stop()
        forwarded = driver.events("forwarded")
        times = [e["mono"] for e in forwarded]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Never early; late only by what a loaded machine adds.
        for gap in gaps:
            self.assertTrue(1.95 <= gap <= 3.0, gaps)
        self.assertEqual({e["port"] for e in forwarded}, {6881})
        requests = capture.fields(
            "frame.time_relative",
            "nat-pmp.opcode",
            "nat-pmp.pml",
            displayFilter=f"nat-pmp && ip.src == {CLIENT_ADDRESS}",
        )
        answers = capture.fields(
            "nat-pmp.opcode",
            "nat-pmp.result_code",
            displayFilter=f"nat-pmp && ip.src == {GATEWAY_ADDRESS}",
        )
        self.assertEqual(len(requests), 2 * len(forwarded))
        self.assertEqual(len(answers), len(requests))
        self.assertEqual({a[1] for a in answers}, {"0"})
        self.assertEqual({r[2] for r in requests}, {"4"})
        self.assertEqual(
            capture.fields("frame.number", displayFilter="_ws.malformed"), []
        )
        self.assertEqual(stopped["dropped"], 0)
        self.assertEqual(driver.events("applied")[0]["port"], 6881)
        print(
            f"\nrenewals: {len(forwarded)} rounds, {len(requests)} requests, "
            f"{len(answers)} answers, gaps {[round(g, 3) for g in gaps]}",
            file=sys.stderr,
        )

    def restartGateway(self, randomValue: str = "") -> tuple[float, float, float]:
        """
        Restart miniupnpd under a running daemon; seconds from the restart
        to remapped and to re-applied, and the random wait drawn.
        """
        driver = Driver(
            self.rig, "natpmp", writeConfig(self.rig, self.qbittorrent), randomValue
        )
        driver.waitFor("applied")
        self.rig.waitEpoch(3)  # old enough for a restart to show
        self.assertIn("6881 dnat", self.rig.rules())
        restarted = time.monotonic()
        self.rig.restart()  # flushes the rules: every mapping is gone
        remapped = driver.waitFor("forwarded", 2, timeout=15)["mono"]
        applied = driver.waitFor("applied", 2, timeout=15)["mono"]
        self.assertEqual(len(re.findall("dport 6881 dnat", self.rig.rules())), 2)
        logs = [e["text"] for e in driver.events("log")]
        self.assertTrue(
            any("announced epoch" in t and "(pcp)" in t for t in logs), logs
        )
        self.assertTrue(any("the gateway restarted" in t for t in logs), logs)
        stopped = driver.stop()
        self.assertEqual(stopped["epoch_resets"], 1)
        return remapped - restarted, applied - restarted, stopped["random"] * 5

    def test_gatewayRestart(self) -> None:
        """
        miniupnpd restarted (epoch 0, mappings gone): its PCP ANNOUNCE is
        heard and we remap and re-apply after the random 0-5 s wait, long
        before the 30 s renewal.
        """
        remapped, applied, wait = self.restartGateway()
        self.assertTrue(wait <= remapped < wait + 2, (remapped, wait))
        print(
            f"\nrestart: remapped after {remapped:.3f}s, re-applied after "
            f"{applied:.3f}s (random wait {wait:.3f}s)",
            file=sys.stderr,
        )

    def test_gatewayRestartReaction(self) -> None:
        """With no random wait, the remap follows the restart within 2 s."""
        remapped, applied, wait = self.restartGateway("0")
        self.assertEqual(wait, 0)
        self.assertLess(remapped, 2)
        print(
            f"\nrestart, no wait: remapped after {remapped * 1000:.1f}ms, "
            f"re-applied after {applied * 1000:.1f}ms",
            file=sys.stderr,
        )

    def test_announcement(self) -> None:
        """SIGUSR1: both announcements are heard; mappings are renewed."""
        driver = Driver(
            self.rig,
            "natpmp",
            writeConfig(self.rig, self.qbittorrent),
            randomValue="0.1",
        )
        driver.waitFor("applied")
        self.rig.waitEpoch(3)
        capture = Capture(self.rig)
        self.rig.announce()
        driver.waitFor("forwarded", 2, timeout=10)
        capture.stop()
        announcements = capture.fields(
            "ip.dst",
            "udp.dstport",
            "_ws.col.Protocol",
            displayFilter="ip.dst == 224.0.0.1",
        )
        self.assertEqual(
            sorted(announcements),
            [
                ["224.0.0.1", "5350", "NAT-PMP"],
                ["224.0.0.1", "5350", "PCP v2"],
                ["224.0.0.1", "5351", "NAT-PMP"],
            ],
        )
        self.assertEqual(
            capture.fields("frame.number", displayFilter="_ws.malformed"), []
        )
        logs = [e["text"] for e in driver.events("log")]
        self.assertTrue(
            any("announced epoch" in t and "(natpmp)" in t for t in logs), logs
        )
        self.assertTrue(
            any("announced epoch" in t and "(pcp)" in t for t in logs), logs
        )
        stopped = driver.stop()
        self.assertEqual(stopped["epoch_resets"], 1)

    def test_releaseOnExit(self) -> None:
        """release_on_exit deletes our two mappings and nothing else."""
        self.natpmpc("-a", "9000", "9000", "tcp", "60")
        driver = Driver(
            self.rig,
            "natpmp",
            writeConfig(self.rig, self.qbittorrent, release_on_exit=True),
        )
        driver.waitFor("applied")
        self.assertEqual(len(re.findall("dport 6881", self.rig.rules())), 2)
        driver.stop()
        rules = self.rig.rules()
        self.assertNotIn("dport 6881", rules)
        self.assertIn("dport 9000", rules)
