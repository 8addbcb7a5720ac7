"""
PCP against a real gateway: miniupnpd 2.3.1 in network namespaces
(L{tests.rig_gateway}), qbittorrent-nox on the client side; and, for the
one case miniupnpd cannot play, a NAT-PMP-only test double on the client
namespace's loopback.

Our code runs as a subprocess in the client namespace: the one-shot CLI, or
L{tests.gatewaydriver}, which runs L{PCPSource} in daemon mode.  This module
run with C{--double MODE} is the NAT-PMP-only gateway.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.gatewaydriver import Driver
from tests.rig import requireTool, waitFor
from tests.rig_gateway import (
    CLIENT_ADDRESS,
    GATEWAY_ADDRESS,
    PROJECT,
    Capture,
    ClientQBittorrent,
    GatewayRig,
    requireGatewayTools,
    writeConfig,
)

PCP_REQUESTS = f"portcontrol && ip.src == {CLIENT_ADDRESS}"


class PCPIntegrationTests(TestCase):
    """Our PCP client against miniupnpd, and auto's fallback to NAT-PMP."""

    def setUp(self) -> None:
        requireGatewayTools()
        for tool in ("tshark", "qbittorrent-nox"):
            requireTool(tool)

    def makeRig(self, **lifetimes: int) -> None:
        self.rig = GatewayRig(**lifetimes)
        self.addCleanup(self.rig.close)
        self.qbittorrent = ClientQBittorrent(self.rig)

    def config(self, gateway: str = GATEWAY_ADDRESS, **portmap: object) -> Path:
        path = writeConfig(self.rig, self.qbittorrent, **portmap)
        path.write_text(path.read_text().replace(GATEWAY_ADDRESS, gateway))
        missing = self.rig.directory / "no-proton" / "forwarded_port"
        path.write_text(
            path.read_text() + f'[protonvpn]\nforwarded_port_path = "{missing}"\n'
        )
        return path

    def test_autoChoosesPCP(self) -> None:
        """
        auto with no port file maps UDP and TCP with PCP; the gateway clamps
        the 60 s asked to 120 s, which counts as the 60 s asked; tshark
        decodes every PCP packet cleanly.
        """
        self.makeRig()
        capture = Capture(self.rig)
        code, outcome, elapsed = self.rig.oneShot(self.config(), "auto", timeout=60)
        capture.stop()
        self.assertEqual(
            (code, outcome["strategy"], outcome["detected_port"], outcome["verified"]),
            (0, "pcp", 6881, True),
            outcome,
        )
        self.assertIn("ttl=60s", outcome["note"])
        self.assertIn("auto chose the gateway", outcome["note"])
        self.assertEqual(self.qbittorrent.listenPort(), 6881)
        rules = self.rig.rules()
        for protocol in ("0x6", "0x11"):
            self.assertRegex(
                rules, rf"{protocol} th dport 6881 dnat ip to {CLIENT_ADDRESS}:6881"
            )
        requests = capture.fields(
            "portcontrol.opcode",
            "portcontrol.map.protocol",
            "portcontrol.map.internal_port",
            "portcontrol.lifetime_req",
            "portcontrol.client_ip",
            "portcontrol.map.nonce",
            displayFilter=PCP_REQUESTS,
        )
        self.assertEqual(
            [r[:4] for r in requests],
            [["1", "17", "6881", "60"], ["1", "6", "6881", "60"]],
        )
        self.assertNotEqual(requests[0][5], requests[1][5])
        self.assertEqual({r[4] for r in requests}, {f"::ffff:{CLIENT_ADDRESS}"})
        answers = capture.fields(
            "portcontrol.result_code",
            "portcontrol.lifetime_rsp",
            displayFilter=f"portcontrol && ip.src == {GATEWAY_ADDRESS}",
        )
        self.assertEqual(answers, [["0", "120"], ["0", "120"]])
        self.assertEqual(
            capture.fields("frame.number", displayFilter="_ws.malformed"), []
        )
        print(f"\nauto one-shot over PCP: {elapsed:.3f}s", file=sys.stderr)

    def test_renewalsAndRestart(self) -> None:
        """
        With 4 s leases (the gateway's minimum set to 4) renewals come at
        9/16 of the lifetime with one nonce and the same port; a restarted
        gateway (epoch 0, mappings gone) is noticed and everything remapped.
        """
        self.makeRig(minLifetime=4)
        capture = Capture(self.rig)
        driver = Driver(self.rig, "pcp", self.config(lifetime_secs=4), "0.5")
        driver.waitFor("forwarded", 4, timeout=15)
        times = [e["mono"] for e in driver.events("forwarded")]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 9/16 of 4 s, never early, late only by what a loaded machine adds.
        for gap in gaps:
            self.assertTrue(2.2 <= gap <= 3.25, gaps)
        restarted = time.monotonic()
        count = len(driver.events("forwarded"))
        self.rig.restart()
        # The ANNOUNCE or the next renewal's epoch shows the reset; remap after
        # random 0.5 × 5 s.
        waitFor(
            lambda: len(re.findall("dport 6881 dnat", self.rig.rules())) == 2,
            "the remap after the restart",
            15,
            0.02,
        )
        remapped = time.monotonic() - restarted
        driver.waitFor("forwarded", count + 1)
        stopped = driver.stop()
        capture.stop()
        forwarded = driver.events("forwarded")
        self.assertEqual({e["port"] for e in forwarded}, {6881})
        self.assertEqual({e["source"] for e in forwarded}, {"pcp"})
        self.assertEqual(stopped["epoch_resets"], 1)
        self.assertEqual(stopped["dropped"], 0)
        nonces = capture.fields(
            "portcontrol.map.protocol",
            "portcontrol.map.nonce",
            displayFilter=PCP_REQUESTS,
        )
        self.assertEqual(len({n for p, n in nonces if p == "17"}), 1)
        self.assertEqual(len({n for p, n in nonces if p == "6"}), 1)
        self.assertEqual(
            capture.fields("frame.number", displayFilter="_ws.malformed"), []
        )
        print(
            f"\nPCP renewals (4 s lease): gaps {[round(g, 3) for g in gaps]}; "
            f"restart remapped after {remapped:.3f}s",
            file=sys.stderr,
        )

    def fallback(self, mode: str) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
        """auto against the NAT-PMP-only double: outcome, seconds, what it heard."""
        self.makeRig()
        heard = self.rig.directory / f"double-{mode}.jsonl"
        argv = [sys.executable, "-m", "tests.test_integration_pcp", "--double", mode]
        with open(heard, "wb") as out:
            double = subprocess.Popen(
                self.rig.command(self.rig.client, argv),
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        self.rig.adopt(double)
        waitFor(lambda: heard.read_text().startswith("{"), "the double to listen", 10)
        code, outcome, elapsed = self.rig.oneShot(
            self.config(gateway="127.0.0.1"), "auto", timeout=60
        )
        self.assertEqual(code, 0, outcome)
        events = [json.loads(line) for line in heard.read_text().splitlines()[1:]]
        return outcome, elapsed, events

    def test_fallbackOnVersionZero(self) -> None:
        """A gateway answering PCP with version 0: NAT-PMP at once."""
        outcome, elapsed, events = self.fallback("answer")
        self.assertEqual(outcome["strategy"], "natpmp", outcome)
        self.assertIn("fell back from pcp", outcome["note"])
        self.assertIn("auto chose the gateway", outcome["note"])
        # UDP and TCP asked together in PCP, then together in NAT-PMP.
        self.assertEqual([e["version"] for e in events], [2, 2, 0, 0])
        switch = events[2]["mono"] - events[0]["mono"]
        self.assertLess(switch, 2, "far sooner than the 5 s probe")
        print(
            f"\nfallback on version 0: NAT-PMP asked {switch * 1000:.1f}ms after "
            f"PCP; one-shot {elapsed:.3f}s",
            file=sys.stderr,
        )

    def test_fallbackOnSilence(self) -> None:
        """A gateway ignoring PCP: NAT-PMP after the 5 s probe."""
        outcome, elapsed, events = self.fallback("silent")
        self.assertEqual(outcome["strategy"], "natpmp", outcome)
        self.assertEqual([e["version"] for e in events], [2, 2, 2, 2, 0, 0])
        switch = events[4]["mono"] - events[0]["mono"]
        self.assertTrue(4.95 <= switch <= 6.5, switch)
        print(
            f"\nfallback on silence: NAT-PMP asked {switch:.3f}s after PCP; "
            f"one-shot {elapsed:.3f}s",
            file=sys.stderr,
        )


def _double(mode: str) -> None:
    """
    A NAT-PMP-only gateway on 127.0.0.1:5351: PCP gets UNSUPP_VERSION with
    version 0 ("answer") or nothing ("silent"); NAT-PMP maps are granted.
    One JSON line per datagram heard.
    """
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 5351))
        print(json.dumps({"listening": True}), flush=True)
        while True:
            data, client = server.recvfrom(2048)
            print(
                json.dumps({"mono": time.monotonic(), "version": data[0]}), flush=True
            )
            epoch = int(time.monotonic() - started)
            if data[0] != 0:
                if mode == "answer":
                    server.sendto(struct.pack("!BBBBI", 0, 0x80, 0, 1, epoch), client)
            elif len(data) == 12:
                _, op, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
                server.sendto(
                    struct.pack(
                        "!BBHIHHI", 0, 128 + op, 0, epoch, internal, suggested, lifetime
                    ),
                    client,
                )


if __name__ == "__main__":
    _double(sys.argv[2])
