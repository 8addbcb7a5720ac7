"""
PCP against a real gateway: miniupnpd 2.3.1 in network namespaces
(L{tests.rig_gateway}), qbittorrent-nox on the client side; and, for the
one case miniupnpd cannot play, a NAT-PMP-only test double on the client
namespace's loopback.

Our code runs as a subprocess in the client namespace: the one-shot CLI, or
the daemon-mode driver at the end of this module (C{python -m
tests.test_integration_pcp CONFIG RANDOM}), which runs L{PCPSource}.  The
same module run with C{--double MODE} is the NAT-PMP-only gateway.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.rig import requireTool, waitFor
from tests.rig_gateway import (
    CLIENT_ADDRESS,
    GATEWAY_ADDRESS,
    ClientQBittorrent,
    GatewayRig,
    requireGatewayTools,
)
from tests.test_integration_natpmp import Capture, writeConfig

PROJECT = Path(__file__).resolve().parent.parent
PCP_REQUESTS = f"portcontrol && ip.src == {CLIENT_ADDRESS}"


class Driver:
    """Our daemon-mode PCP source in the client namespace, as JSON events."""

    def __init__(self, rig: GatewayRig, config: Path, randomValue: str) -> None:
        self.output = rig.directory / f"pcp-driver-{time.monotonic_ns()}.jsonl"
        self.errors = rig.directory / "pcp-driver.err"
        argv = [sys.executable, "-m", "tests.test_integration_pcp", str(config)]
        with open(self.output, "wb") as out, open(self.errors, "ab") as err:
            self.process = subprocess.Popen(
                rig.command(rig.client, [*argv, randomValue]),
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        rig.adopt(self.process)

    def events(self, kind: str) -> list[dict[str, Any]]:
        text = self.output.read_text(errors="replace")
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [e for e in events if e["event"] == kind]

    def waitFor(self, kind: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"driver exited: {self.errors.read_text(errors='replace')[-3000:]}"
                )
            return len(self.events(kind)) >= count

        waitFor(seen, f"{count} {kind} events", timeout, 0.01)
        return self.events(kind)[count - 1]

    def stop(self) -> dict[str, Any]:
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(15)
        return self.events("stopped")[-1]


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

    def oneShot(self, config: Path, strategy: str) -> tuple[int, dict[str, Any], float]:
        """The CLI one-shot in the client namespace: exit code, JSON, seconds."""
        started = time.monotonic()
        done = subprocess.run(
            self.rig.command(
                self.rig.client,
                [
                    sys.executable,
                    "-m",
                    "qbportsync",
                    "--once",
                    "--strategy",
                    strategy,
                    "--json",
                    "--config",
                    str(config),
                ],
            ),
            check=False,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        outcome: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return done.returncode, outcome, elapsed

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
        the 60 s asked to 120 s; tshark decodes every PCP packet cleanly.
        """
        self.makeRig()
        capture = Capture(self.rig)
        code, outcome, elapsed = self.oneShot(self.config(), "auto")
        capture.stop()
        self.assertEqual(
            (code, outcome["strategy"], outcome["detected_port"], outcome["verified"]),
            (0, "pcp", 6881, True),
            outcome,
        )
        self.assertIn("ttl=120s", outcome["note"])
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
        driver = Driver(self.rig, self.config(lifetime_secs=4), "0.5")
        driver.waitFor("forwarded", 4, timeout=15)
        times = [e["mono"] for e in driver.events("forwarded")]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap in gaps:
            self.assertLess(abs(gap - 2.25), 0.15, gaps)
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
        double = subprocess.Popen(
            self.rig.command(
                self.rig.client,
                [sys.executable, "-m", "tests.test_integration_pcp", "--double", mode],
            ),
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=open(heard, "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.DEVNULL,
        )
        self.rig.adopt(double)
        waitFor(lambda: heard.read_text().startswith("{"), "the double to listen", 10)
        code, outcome, elapsed = self.oneShot(self.config(gateway="127.0.0.1"), "auto")
        self.assertEqual(code, 0, outcome)
        events = [json.loads(line) for line in heard.read_text().splitlines()[1:]]
        return outcome, elapsed, events

    def test_fallbackOnVersionZero(self) -> None:
        """A gateway answering PCP with version 0: NAT-PMP at once."""
        outcome, elapsed, events = self.fallback("answer")
        self.assertEqual(outcome["strategy"], "natpmp", outcome)
        self.assertIn("fell back from pcp", outcome["note"])
        self.assertIn("auto chose the gateway", outcome["note"])
        self.assertEqual([e["version"] for e in events], [2, 0, 0])
        switch = events[1]["mono"] - events[0]["mono"]
        self.assertLess(switch, 0.5)
        print(
            f"\nfallback on version 0: NAT-PMP asked {switch * 1000:.1f}ms after "
            f"PCP; one-shot {elapsed:.3f}s",
            file=sys.stderr,
        )

    def test_fallbackOnSilence(self) -> None:
        """A gateway ignoring PCP: NAT-PMP after the 5 s probe."""
        outcome, elapsed, events = self.fallback("silent")
        self.assertEqual(outcome["strategy"], "natpmp", outcome)
        self.assertEqual([e["version"] for e in events], [2, 2, 0, 0])
        switch = events[2]["mono"] - events[0]["mono"]
        self.assertLess(abs(switch - 5.0), 0.3)
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


def _drive(argv: list[str]) -> None:
    """Run inside the client namespace: C{CONFIG RANDOM}; JSON events out."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from qbportsync.config import loadConfig
    from qbportsync.interfaces import Forwarded
    from qbportsync.metrics import Metrics
    from qbportsync.sources.pcp import PCPSource
    from qbportsync.tap import makeSink

    def emit(event: str, **fields: object) -> None:
        print(
            json.dumps({"event": event, "mono": time.monotonic(), **fields}), flush=True
        )

    async def main(reactor: Any) -> None:
        config = loadConfig(argv[0], os.environ)
        sink = makeSink(reactor, config)
        metrics = Metrics.create()
        fixed = float(argv[1])
        source = PCPSource(
            reactor, config, metrics, sink.listenPort, random=lambda: fixed
        )

        def deliver(forwarded: Forwarded) -> None:
            emit("forwarded", port=forwarded.port, source=forwarded.source)
            sink.apply(forwarded.port, "").addErrback(lambda f: None)

        async def finish() -> None:
            await source.stop()
            registry = metrics.registry
            dropped = sum(
                s.value
                for m in registry.collect()
                if m.name == "qb_port_sync_datagrams_dropped"
                for s in m.samples
                if s.name.endswith("_total")
            )
            emit(
                "stopped",
                dropped=dropped,
                epoch_resets=registry.get_sample_value(
                    "qb_port_sync_gateway_epoch_resets_total"
                ),
            )

        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(finish())
        )
        source.start(deliver)
        await Deferred()

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


if __name__ == "__main__":
    if sys.argv[1] == "--double":
        _double(sys.argv[2])
    else:
        _drive(sys.argv[1:])
