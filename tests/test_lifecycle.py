"""
The gateway path under the VPN's real lifecycle, end to end.

Real miniupnpd (or a ProtonVPN-style gateway emulation) in I{gw}, a real
qbittorrent-nox and the real daemon (C{python -m qbportsync}) in I{client},
and a peer in I{wan} that must complete a TCP handshake with qBittorrent
through the gateway's external address and qBittorrent's listening port —
after every change to the network, within seconds.  "The Web API shows the
port" is not enough: the peer's connect is the check.

Each scenario runs for NAT-PMP and for PCP.  The run ends with a table:
scenario, protocol, connect tries, recovered, seconds to reachable.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from typing import Any, ClassVar

from attrs import frozen
from twisted.trial.unittest import SynchronousTestCase

from tests.rig import requireTool, waitFor
from tests.rig_gateway import (
    GATEWAY_EXTERNAL,
    PROJECT,
    Agent,
    ClientQBittorrent,
    Daemon,
    GatewayRig,
    requireGatewayTools,
    writeDaemonConfig,
)

LIMIT = 10.0
"""Seconds from a change to a peer's completed handshake."""
START_LIMIT = 20.0
"""The same from the daemon's launch, Python's start-up included."""
LIFETIME = 8
"""The lease the daemon asks for: short, so renewals and expiries happen."""
SLOW = os.environ.get("QBPORTSYNC_SLOW") == "1"
OUTAGE = 180.0 if SLOW else 15.0
"""A gateway outage (3 minutes, scaled down outside slow runs)."""
CONNECT_TIMEOUT = 0.5
PROTON_PORT = 45678


@frozen
class Row:
    """One line of the closing table."""

    scenario: str
    protocol: str
    tries: int
    recovered: str
    seconds: float | None


_ROWS: list[Row] = []


def _printTable() -> None:
    if not _ROWS:
        return
    lines = [
        "",
        "lifecycle: time from the change to a peer's completed TCP handshake",
        f"{'scenario':<32} {'protocol':<8} {'tries':>5} {'recovered':<10} "
        f"{'reachable':>9}",
    ]
    for row in _ROWS:
        seconds = "-" if row.seconds is None else f"{row.seconds:.2f}s"
        lines.append(
            f"{row.scenario:<32} {row.protocol:<8} {row.tries:>5} "
            f"{row.recovered:<10} {seconds:>9}"
        )
    print("\n".join(lines), file=sys.__stderr__, flush=True)


atexit.register(_printTable)


class _Lifecycle:
    """What every scenario uses, for the protocol a subclass names."""

    protocol: ClassVar[str]

    # The TestCase methods a subclass brings.
    addCleanup: Any
    assertEqual: Any
    assertIn: Any
    assertTrue: Any
    fail: Any

    def setUp(self) -> None:
        requireGatewayTools()
        requireTool("qbittorrent-nox")

    def build(self, **options: Any) -> GatewayRig:
        """The rig, qBittorrent in the client, and agents in client and wan."""
        options.setdefault("minLifetime", 4)
        self.rig = GatewayRig(**options)
        self.addCleanup(self.rig.close)
        self.qbittorrent = ClientQBittorrent(self.rig)
        self.client = Agent(self.rig, self.rig.client)
        self.peer = Agent(self.rig, self.rig.wan)
        return self.rig

    def startDaemon(self, gateway: bool = True, **portmap: object) -> Daemon:
        """The daemon, asking the gateway for C{LIFETIME}-second leases."""
        portmap.setdefault("lifetime_secs", LIFETIME)
        config = writeDaemonConfig(
            self.rig, self.qbittorrent, gateway=gateway, **portmap
        )
        self.daemon = Daemon(self.rig, config, self.protocol, self.client)
        return self.daemon

    def diagnostics(self) -> str:
        """What a failure message shows: the daemon, the gateway, qBittorrent."""
        daemon = getattr(self, "daemon", None)
        parts = [
            f"qBittorrent's port: {self.qbittorrent.listenPortVia(self.client)}",
            f"gateway mappings: {sorted(self.rig.mappings())}",
            f"requests heard by the gateway: {self.rig.requestsHeard()}",
        ]
        if daemon is not None:
            parts.append(f"daemon running: {daemon.process.poll() is None}")
            parts.append(f"/status: {daemon.status()}")
            # Without the lines our own polling of /status causes.
            lines = daemon.output().splitlines()
            tail = [line for line in lines if "GET /" not in line][-40:]
            parts.append("daemon log (tail):\n  " + "\n  ".join(tail))
        parts.append(
            "gateway log (tail):\n  " + "\n  ".join(self.rig.log().splitlines()[-10:])
        )
        return "\n".join(parts)

    def reachable(
        self, scenario: str, since: float, limit: float = LIMIT, record: bool = True
    ) -> int:
        """
        Wait until a peer in wan completes a handshake with qBittorrent at
        the external address and qBittorrent's listening port, at most
        C{limit} seconds after C{since}; the port.  A row for the table is
        recorded, unless C{record} is false and it succeeds.  The
        gateway's mapping for it then forwards the port to itself on the
        client's current address.
        """
        tries = 0
        last = "qBittorrent's port unknown"
        deadline = since + limit
        while True:
            port = self.qbittorrent.listenPortVia(self.client)
            if port:
                tries += 1
                ok, why = self.peer.connect(GATEWAY_EXTERNAL, port, CONNECT_TIMEOUT)
                if ok:
                    seconds = time.monotonic() - since
                    if record:
                        row = Row(scenario, self.protocol, tries, "yes", seconds)
                        _ROWS.append(row)
                    self.assertIn(
                        ("tcp", port, self.rig.clientAddress, port),
                        self.rig.mappings(),
                    )
                    return port
                last = f"{GATEWAY_EXTERNAL}:{port}: {why}"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        _ROWS.append(Row(scenario, self.protocol, tries, "NO", None))
        self.fail(
            f"{scenario}: no peer handshake within {limit:g} s ({tries} tries, "
            f"last: {last})\n{self.diagnostics()}"
        )
        raise AssertionError("unreachable")

    def waitStatus(
        self, what: str, predicate: Any, timeout: float = 15
    ) -> dict[str, Any]:
        """Wait until the daemon's /status satisfies C{predicate}; the document."""
        seen: list[dict[str, Any]] = []

        def check() -> bool:
            if self.daemon.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.daemon.process.returncode}\n"
                    f"{self.diagnostics()}"
                )
            status = self.daemon.status()
            if status is None:
                return False
            seen[:] = [status]
            return bool(predicate(status))

        try:
            waitFor(check, what, timeout, 0.25)
        except AssertionError as e:
            self.fail(f"{e}\n{self.diagnostics()}")
        return seen[0]

    def startProtonGateway(self, *mode: str) -> None:
        """L{tests.protongateway} in gw, in place of miniupnpd."""
        rig = self.rig
        heard = rig.directory / "proton.jsonl"
        argv = [sys.executable, "-m", "tests.protongateway", rig.gatewayAddress]
        argv += [GATEWAY_EXTERNAL, str(PROTON_PORT), str(LIFETIME), *mode]
        with open(heard, "wb") as out:
            proton = subprocess.Popen(
                rig.command(rig.gw, argv),
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        rig.adopt(proton)
        waitFor(lambda: heard.read_text().startswith("{"), "the gateway to listen", 10)

    def assertLANRouterUntouched(self) -> None:
        """Nothing reached the home router's udp/5351; it maps nothing."""
        heard = self.rig.requestsHeard(self.rig.lan)
        mappings = self.rig.mappings(self.rig.lan)
        self.assertEqual((heard, mappings), (0, set()), self.diagnostics())

    def outage(self, scenario: str, down: str, up: str) -> None:
        """
        Reachable; the gateway goes away (C{down}) for L{OUTAGE} seconds,
        long enough for the mapping to lapse; back (C{up}); reachable within
        10 s of its return.
        """
        self.build()
        started = time.monotonic()
        self.startDaemon()
        self.reachable("start", started, START_LIMIT, record=False)
        wentDown = time.monotonic()
        getattr(self.rig, down)()
        waitFor(
            lambda: not self.rig.mappings(), "the mapping to lapse", LIFETIME + 5, 0.2
        )
        # The outage itself lasts a set time: nothing to wait for but that.
        time.sleep(max(0.0, wentDown + OUTAGE - time.monotonic()))
        getattr(self.rig, up)()
        started = time.monotonic()
        self.reachable(f"{scenario} {OUTAGE:g}s", started)


class _Scenarios(_Lifecycle):
    """The scenarios."""

    # 2. A ProtonVPN-style gateway: X forwarded to X whatever was asked.

    def test_protonStyleGateway(self) -> None:
        """
        A gateway that grants port X and forwards X to the client's port X,
        whatever internal port was asked: qBittorrent moves to X and a peer
        connects.
        """
        self.build(gateway=False)
        self.startProtonGateway()
        started = time.monotonic()
        self.startDaemon()
        port = self.reachable("proton-style gateway", started, START_LIMIT)
        self.assertEqual(port, PROTON_PORT)

    # 4-6. Follow the network.

    def test_vpnComesUpLater(self) -> None:
        """
        The daemon starts before the tunnel (no address, no route); once the
        tunnel is up a peer connects within 10 s.
        """
        rig = self.build(vpnUp=False)
        self.startDaemon(gateway=False)
        self.waitStatus("the daemon to answer", lambda s: True)
        started = time.monotonic()
        rig.vpnUp()
        self.reachable("VPN up after the daemon", started)

    # 7. WireGuard-style policy routing, a home router on the main table.

    def test_policyRouting(self) -> None:
        """
        The default route of the main table leads to a home router running
        miniupnpd; the VPN route, in table 51820 by ip rules, via the VPN
        gateway: the daemon maps on the VPN gateway, a peer connects, and the
        home router never hears a request.
        """
        self.build(lanRouter=True)
        started = time.monotonic()
        self.startDaemon(gateway=False)
        self.reachable("policy routing", started, START_LIMIT)
        self.assertLANRouterUntouched()

    def test_policyRoutingConfigured(self) -> None:
        """
        WireGuard's on-link route with C{gateway} configured: mapped there, a
        peer connects, the home router hears nothing.
        """
        self.build(lanRouter=True, vpnVia=False)
        started = time.monotonic()
        self.startDaemon(gateway=True)
        self.reachable("policy routing, on-link", started, START_LIMIT)
        self.assertLANRouterUntouched()

    # 8. Gateway outages.

    def test_silentOutage(self) -> None:
        """The gateway drops every request for a while: remapped after."""
        self.outage("outage, silent", "silence", "unsilence")


class NATPMPLifecycleTests(_Scenarios, SynchronousTestCase):
    """The lifecycle over NAT-PMP."""

    protocol = "natpmp"


class PCPLifecycleTests(_Scenarios, SynchronousTestCase):
    """The lifecycle over PCP."""

    protocol = "pcp"
