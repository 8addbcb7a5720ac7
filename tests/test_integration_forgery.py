"""
A forged gateway reply racing the real one, against real miniupnpd.

An on-path attacker in I{gw} drops the gateway's real replies to the client,
answers the daemon's renewal itself (external port L{FORGED_PORT}, lifetime
2**32-1, from the gateway's address and port 5351) and then lets the real
gateway answer again.  The daemon must ask again before believing a port that
moved on a renewal, and must not believe a lifetime longer than it asked for:
qBittorrent stays on the real port, renewals go on, a peer still connects,
and /status never shows a lease beyond the lifetime asked for.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.rig import requireTool, waitFor
from tests.rig_gateway import GATEWAY_EXTERNAL, PROJECT, requireGatewayTools
from tests.test_lifecycle import LIFETIME, START_LIMIT, _Lifecycle

FORGED_PORT = 4444
MARK = 0x4444
"""The forger's packets carry this mark, so the drop rule spares them."""
WATCH = LIFETIME + 1.0
"""Seconds to watch after the forgery: more than two renewal periods."""

# The real gateway's replies to the client are dropped; the forger's pass.
_DROP = """\
table inet qbpsforge {{
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr {client} udp sport 5351 meta mark != {mark} counter drop
    }}
}}
"""

# In the client: counts the datagrams from the gateway's port 5351 whose
# lifetime is 2**32-1, which only the forger sends (miniupnpd grants at most
# a day).  The lifetime's offset from the UDP header, in bits: NAT-PMP's at
# byte 12 of its response, PCP's at byte 4.
_SEEN = """\
table inet qbpsforgeseen {{
    chain input {{
        type filter hook input priority -10; policy accept;
        ip saddr {gateway} udp sport 5351 @th,{offset},32 0xffffffff counter
    }}
}}
"""
_LIFETIME_OFFSET = {"natpmp": 64 + 96, "pcp": 64 + 32}

# Runs in gw, as root: sees the client's requests through a raw socket and
# answers the first MAP request (lifetime > 0) for each transport with a
# forged success.  Prints "ready", then one JSON line of what it forged.
_FORGER = """\
import json, socket, struct, sys, time
from ipaddress import IPv4Address
from qbportsync.sources import natpmp, pcp
from qbportsync.sources.wire import Result

(strategy, gateway, client, external, started, timeout, mark, port) = sys.argv[1:]
started, deadline = float(started), time.monotonic() + float(timeout)
mark, port = int(mark), int(port)
codec = natpmp if strategy == "natpmp" else pcp
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
raw.bind((gateway, 0))
print("ready", flush=True)


def checksum(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def forge(request):
    epoch = int(time.monotonic() - started)
    if codec is natpmp:
        return natpmp.encodeResponse(natpmp.MapResponse(
            request.protocol, Result.SUCCESS, epoch, request.internalPort,
            port, 2**32 - 1))
    return pcp.encodeResponse(pcp.MapResponse(
        Result.SUCCESS, 2**32 - 1, epoch, request.nonce, request.protocol,
        request.internalPort, port, external))


forged = {}
while len(forged) < 2:
    left = deadline - time.monotonic()
    if left <= 0:
        print(json.dumps({"forged": forged, "timeout": True}), flush=True)
        sys.exit(1)
    raw.settimeout(left)
    try:
        packet = raw.recv(65535)
    except TimeoutError:
        continue
    ihl = (packet[0] & 0x0F) * 4
    source = str(IPv4Address(packet[12:16]))
    sport, dport = struct.unpack_from("!HH", packet, ihl)
    if source != client or dport != 5351:
        continue
    try:
        request = codec.decodeRequest(packet[ihl + 8 :])
    except Exception:
        continue
    if not isinstance(request, codec.MapRequest) or request.lifetime == 0:
        continue
    if request.protocol in forged:
        continue
    payload = forge(request)
    header = struct.pack("!HHHH", 5351, sport, 8 + len(payload), 0)
    pseudo = IPv4Address(gateway).packed + IPv4Address(client).packed
    pseudo += struct.pack("!BBH", 0, socket.IPPROTO_UDP, 8 + len(payload))
    total = checksum(pseudo + header + payload)
    raw.sendto(header[:6] + struct.pack("!H", total) + payload, (client, 0))
    forged[request.protocol] = {
        "client_port": sport, "internal": request.internalPort,
        "asked": request.lifetime, "at": time.monotonic(),
    }
print(json.dumps({"forged": forged, "timeout": False}), flush=True)
"""


class _Forgery(_Lifecycle):
    """The race, for the protocol a subclass names."""

    assertNotEqual: Any

    def setUp(self) -> None:
        # Not _Lifecycle's: this module adds no rows to the lifecycle table.
        requireGatewayTools()
        requireTool("qbittorrent-nox")
        requireTool("natpmpc")

    def dropped(self) -> int:
        """Real gateway replies to the client that the drop rule ate."""
        out = self.rig.run(
            self.rig.gw, ["nft", "list", "chain", "inet", "qbpsforge", "output"]
        ).stdout
        return sum(int(n) for n in _counts(out))

    def forgedSeen(self) -> int:
        """Forged replies (lifetime 2**32-1) that reached the client."""
        out = self.rig.run(
            self.rig.client,
            ["nft", "list", "chain", "inet", "qbpsforgeseen", "input"],
        ).stdout
        return sum(int(n) for n in _counts(out))

    def race(self) -> tuple[dict[str, Any], int]:
        """
        Drop the real replies, forge one per transport for the next renewal,
        let the real replies through again; what the forger sent, and how
        many real replies were dropped.
        """
        rig = self.rig
        seen = rig.directory / "seen.nft"
        offset = _LIFETIME_OFFSET[self.protocol]
        seen.write_text(_SEEN.format(gateway=rig.gatewayAddress, offset=offset))
        rig.run(rig.client, ["nft", "-f", str(seen)])
        nft = rig.directory / "forge.nft"
        nft.write_text(_DROP.format(client=rig.clientAddress, mark=hex(MARK)))
        rig.run(rig.gw, ["nft", "-f", str(nft)])
        self.addCleanup(self._undrop)
        dropped = 0
        argv = [sys.executable, "-c", _FORGER, self.protocol, rig.gatewayAddress]
        argv += [rig.clientAddress, GATEWAY_EXTERNAL, repr(rig.gateway.started)]
        argv += [str(LIFETIME + 5), str(MARK), str(FORGED_PORT)]
        forger = subprocess.Popen(
            rig.command(rig.gw, argv),
            cwd=PROJECT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        rig.adopt(forger)
        try:
            out, err = forger.communicate(timeout=LIFETIME + 10)
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                dropped = self.dropped()
            self._undrop()
        lines = out.splitlines()
        self.assertTrue(
            forger.returncode == 0 and lines[:1] == ["ready"] and len(lines) == 2,
            f"forger exit {forger.returncode}: {out!r} {err!r}\n{self.diagnostics()}",
        )
        report: dict[str, Any] = json.loads(lines[1])
        return report, dropped

    def _undrop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.rig.run(self.rig.gw, ["nft", "delete", "table", "inet", "qbpsforge"])

    def test_forgedRenewalReplyIsNotBelieved(self) -> None:
        """
        A forged renewal reply (port 4444, lifetime 2**32-1) that wins the
        race against the real one never moves qBittorrent nor stretches the
        lease: after a confirming request the real port stays, renewals go
        on, a peer still connects through it.
        """
        self.build()
        started = time.monotonic()
        self.startDaemon()
        port = self.reachable("start", started, START_LIMIT, record=False)
        self.assertNotEqual(port, FORGED_PORT)

        report, dropped = self.race()
        forgedAt = time.monotonic()
        self.assertEqual(
            (report["timeout"], sorted(report["forged"])),
            (False, ["TCP", "UDP"]),
            f"{report}\n{self.diagnostics()}",
        )
        # Not vacuous: the real replies to that renewal were dropped, and the
        # forged ones reached the client.
        self.assertTrue(dropped, f"no real reply dropped: {report}")
        try:
            waitFor(
                lambda: self.forgedSeen() >= 2,
                "both forged replies to reach the client",
                2,
                0.05,
            )
        except AssertionError as e:
            self.fail(f"{e}\n{report}\n{self.diagnostics()}")

        # Watch at least two renewal periods, and until two renewals after
        # the confirmation have been answered with the real port.
        ports: set[int | None] = set()
        worst = 0.0
        renewals = 0
        confirmed: float | None = None
        while time.monotonic() < forgedAt + WATCH or renewals < 2:
            if time.monotonic() > forgedAt + 3 * LIFETIME:
                break
            ports.add(self.qbittorrent.listenPortVia(self.client))
            status = self.daemon.status()
            if status is not None and status["lease_expires"] is not None:
                left = _seconds(status["lease_expires"]) - _seconds(status["now"])
                worst = max(worst, left)
            after = self.daemon.output().split(f"then {port}, for our TCP mapping")
            if len(after) > 1:
                if confirmed is None:
                    confirmed = time.monotonic() - forgedAt
                renewals = after[-1].count(f"forwards port {port} for") - 1
            time.sleep(0.25)
        self.assertEqual(
            (
                ports - {None},
                worst <= LIFETIME + 1,
                confirmed is not None,
                renewals >= 2,
            ),
            ({port}, True, True, True),
            f"qBittorrent's ports {ports}, longest lease left {worst:g} s, "
            f"confirmed after {confirmed} s, {renewals} renewals after it\n"
            f"{self.diagnostics()}",
        )
        print(
            f"\nforgery {self.protocol}: {dropped} real replies dropped, "
            f"{self.forgedSeen()} forged ones reached the client; real port "
            f"{port} confirmed "
            f"{confirmed:.1f} s after the forgery, {renewals} renewals since, "
            f"qBittorrent's ports {sorted(ports - {None})}, longest lease "
            f"left {worst:g} s",
            file=sys.__stderr__,
            flush=True,
        )
        self.assertEqual(
            self.reachable("after the forgery", time.monotonic(), record=False), port
        )


def _counts(nft: str) -> list[str]:
    """The packet counts in an nft listing."""
    words = nft.split()
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "packets"]


def _seconds(stamp: str) -> float:
    """An RFC 3339 timestamp from /status, as seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


class NATPMPForgeryTests(_Forgery, SynchronousTestCase):
    """The race over NAT-PMP: replies carry no nonce."""

    protocol = "natpmp"


class PCPForgeryTests(_Forgery, SynchronousTestCase):
    """The race over PCP, by an on-path attacker who sees the nonce."""

    protocol = "pcp"
