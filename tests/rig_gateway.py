"""
A real NAT-PMP/PCP gateway for integration tests: miniupnpd in network
namespaces, linked to nothing on the host.

    client (198.51.100.2) ── gw (198.51.100.1 | 203.0.113.5) ── wan (203.0.113.1, .2)
           (192.0.2.2)   ── lan (192.0.2.1 | 203.0.113.7) ──┘     (a bridge)

miniupnpd runs in I{gw}; it learns its "public" address from stund in I{wan}
(it refuses documentation ranges as external addresses otherwise).  Code
under test runs in I{client}, where a qbittorrent-nox can run too, Web UI on
127.0.0.1, listening for peers on every address.  A peer in I{wan} reaches
it only through a mapping: gw forwards nothing else.  The optional I{lan}
namespace is a home router with a miniupnpd of its own, for the client's
main routing table while the VPN path lives in a policy-routing table, as
wg-quick sets it up.  Synchronous and standard library only, like
L{tests.rig}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.rig import (
    Rig,
    requireRoot,
    requireTool,
    startQBittorrent,
    stopProcess,
    waitFor,
    writeProfile,
)

PROJECT = Path(__file__).resolve().parent.parent
CLIENT_ADDRESS = "198.51.100.2"
GATEWAY_ADDRESS = "198.51.100.1"
GATEWAY_EXTERNAL = "203.0.113.5"
STUN_PRIMARY = "203.0.113.1"
STUN_SECONDARY = "203.0.113.2"
LAN_CLIENT = "192.0.2.2"
LAN_ROUTER = "192.0.2.1"
LAN_EXTERNAL = "203.0.113.7"
WIREGUARD_TABLE = "51820"
ALLOW_ALL = "1024-65535 198.51.100.0/24 1-65535"
"""miniupnpd's C{allow} rule: external ports, client addresses, internal ports."""
_READY = "Port forwarding is now enabled"

# Forwarding is dropped unless a mapping's rule in chain miniupnpd accepts it,
# so a peer gets through only where a gateway really mapped; replies pass.
_NFT_CHAINS = """\
table inet filter {
    chain input {
        type filter hook input priority 0; policy accept;
        udp dport 5351 counter
    }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
"""
_OUTAGE = """\
table inet outage {
    chain input {
        type filter hook input priority -10; policy accept;
        udp dport 5351 drop
    }
}
"""


_DEVICES = ("null", "zero", "random", "urandom", "console")
"""What miniupnpd's private /dev holds, besides the log socket."""
_SYSLOG = """\
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
    log.bind(sys.argv[1])
    while True:
        log.recv(65536)
"""


def requireGatewayTools() -> None:
    """Skip (or fail) unless the gateway rig can be built here."""
    requireRoot()
    for tool in ("ip", "nft", "unshare", "miniupnpd", "stund"):
        requireTool(tool)


def _run(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=timeout
    )


def _miniupnpdConf(
    inside: str, outside: str, allow: str, minLifetime: int, maxLifetime: int
) -> str:
    return f"""\
ext_ifname={outside}
listening_ip={inside}
ext_perform_stun=yes
ext_stun_host={STUN_PRIMARY}
ext_stun_port=3478
enable_natpmp=yes
enable_upnp=no
ipv6_disable=yes
secure_mode=yes
system_uptime=no
min_lifetime={minLifetime}
max_lifetime={maxLifetime}
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow {allow}
deny 0-65535 0.0.0.0/0 0-65535
"""


class Miniupnpd:
    """
    One miniupnpd in a namespace of a rig, its log a file of the rig's.  It
    starts stopped: call L{start}.
    """

    def __init__(self, rig: GatewayRig, namespace: str, name: str, conf: str) -> None:
        self.rig = rig
        self.namespace = namespace
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.conf = rig.directory / f"{name}.conf"
        self.conf.write_text(conf)
        self.logPath = rig.directory / f"{name}.log"
        self.pidPath = rig.directory / f"{name}.pid"
        self.dev = rig.directory / f"{name}-dev"
        self.dev.mkdir()
        for node in _DEVICES:
            (self.dev / node).touch()
        self.syslog: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        """Everything it wrote, all runs."""
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> float:
        """Start it; seconds until it has its external address."""
        assert not self.running
        before = self.log().count(_READY)
        self._startSyslog()
        # With no syslog, miniupnpd opens /dev/console for every line it logs
        # (besides writing it to stderr, our log): slow enough to delay its
        # answers by seconds when it logs a line per port it tries.  In a
        # mount namespace of its own it gets a /dev with a /dev/log that
        # takes the lines and drops them.  And a PID file of its own: the
        # default one is shared by every miniupnpd on the host, and a second
        # one refuses to start.
        binds = " && ".join(
            f"mount --bind /dev/{node} {self.dev / node}"
            for node in _DEVICES
            if node != "console"
        )
        script = (
            f"{binds} && mount --bind /dev/null {self.dev / 'console'} && "
            f"mount --rbind {self.dev} /dev && "
            f"exec miniupnpd -f {self.conf} -P {self.pidPath} -d"
        )
        with open(self.logPath, "ab") as out:
            self.process = subprocess.Popen(
                self.rig.command(self.namespace, ["unshare", "-m", "sh", "-c", script]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        self.started = time.monotonic()

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"miniupnpd exited with {process.returncode}: {self.log()[-2000:]}"
                )
            return self.log().count(_READY) > before

        return waitFor(ready, "miniupnpd to get its external address", 15, 0.01)

    def _startSyslog(self) -> None:
        if self.syslog is not None:
            return
        path = self.dev / "log"
        self.syslog = subprocess.Popen(
            [sys.executable, "-c", _SYSLOG, str(path)], stdin=subprocess.DEVNULL
        )
        self.rig.adopt(self.syslog)
        waitFor(path.exists, "the syslog socket", 10, 0.01)

    def stop(self) -> None:
        """Stop it by PID and flush its rules, which it leaves behind."""
        if self.process is not None:
            stopProcess(self.process)
        for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
            with contextlib.suppress(subprocess.CalledProcessError):
                self.rig.run(
                    self.namespace, ["nft", "flush", "chain", "inet", "filter", chain]
                )

    def waitEpoch(self, seconds: float) -> None:
        """
        Wait until its epoch (seconds since it started: C{system_uptime=no})
        has reached C{seconds}.
        """
        waitFor(
            lambda: time.monotonic() - self.started >= seconds,
            f"miniupnpd's epoch to reach {seconds:g}",
            seconds + 1,
        )

    def signal(self, number: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)


class GatewayRig(Rig):
    """
    Three namespaces (four with C{lanRouter}), stund and miniupnpd.  Use as a
    context manager or call L{close}: every process is stopped by PID,
    namespaces deleted.

    @param allow: miniupnpd's C{allow} rule (see L{ALLOW_ALL}).
    @param gateway: start miniupnpd now.
    @param vpnUp: give the client its address and route now; else its link
        to gw is up but bare, as before a VPN connects.
    @param lanRouter: add the I{lan} home router, with its own miniupnpd, on
        the client's main table; the route to gw then lives in table 51820
        (C{via} the gateway, or on-link without C{vpnVia}, as WireGuard).
    """

    def __init__(
        self,
        *,
        minLifetime: int = 120,
        maxLifetime: int = 86400,
        allow: str = ALLOW_ALL,
        gateway: bool = True,
        vpnUp: bool = True,
        lanRouter: bool = False,
        vpnVia: bool = True,
    ) -> None:
        requireGatewayTools()
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.client = f"qbpsnat-{tag}-client"
        self.gw = f"qbpsnat-{tag}-gw"
        self.wan = f"qbpsnat-{tag}-wan"
        self.lan = f"qbpsnat-{tag}-lan" if lanRouter else ""
        self.clientAddress = CLIENT_ADDRESS
        self.gatewayAddress = GATEWAY_ADDRESS
        self.vpnVia = vpnVia
        self.stund: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        super().__init__()
        try:
            self.directory = Path(
                self._cleanup.enter_context(
                    tempfile.TemporaryDirectory(prefix="qbps-gw-")
                )
            )
            self.gateway = Miniupnpd(
                self,
                self.gw,
                "miniupnpd",
                _miniupnpdConf("g0", "g1", allow, minLifetime, maxLifetime),
            )
            self.conf = self.gateway.conf
            self.lanGateway: Miniupnpd | None = None
            self._network()
            self._cleanup.callback(self._stopAll)
            if vpnUp:
                self.vpnUp()
            self._startStund()
            if lanRouter:
                self.lanGateway = Miniupnpd(
                    self,
                    self.lan,
                    "lan-miniupnpd",
                    _miniupnpdConf(
                        "l0", "l1", "1024-65535 192.0.2.0/24 1-65535", 120, 86400
                    ),
                )
                self.lanGateway.start()
            if gateway:
                self.start()
        except BaseException:
            self._cleanup.close()
            raise

    def command(self, namespace: str, argv: list[str]) -> list[str]:
        """C{argv} wrapped to run inside C{namespace}."""
        return ["ip", "netns", "exec", namespace, *argv]

    def run(self, namespace: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run C{argv} in C{namespace}; its output."""
        return _run(self.command(namespace, argv))

    def _link(self, namespace: str, near: str, far: str, farNamespace: str) -> None:
        # Created inside the namespaces: these links never touch the host.
        _run(
            [
                "ip",
                "-n",
                namespace,
                "link",
                "add",
                near,
                "type",
                "veth",
                "peer",
                "name",
                far,
                "netns",
                farNamespace,
            ]
        )

    def _address(self, namespace: str, address: str, interface: str) -> None:
        self.run(namespace, ["ip", "addr", "add", address, "dev", interface])
        self.run(namespace, ["ip", "link", "set", interface, "up"])

    def _network(self) -> None:
        for name in filter(None, (self.client, self.gw, self.wan, self.lan)):
            _run(["ip", "netns", "add", name])
            self._cleanup.callback(self._deleteNamespace, name)
            self.run(name, ["ip", "link", "set", "lo", "up"])
            self.run(
                name,
                ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
            )
        self._link(self.gw, "g0", "c0", self.client)
        self._link(self.gw, "g1", "w0", self.wan)
        # wan is one segment (a bridge) shared by gw and the home router.
        self.run(self.wan, ["ip", "link", "add", "br0", "type", "bridge"])
        self.run(self.wan, ["ip", "link", "set", "w0", "master", "br0"])
        self.run(self.wan, ["ip", "link", "set", "w0", "up"])
        self._address(self.gw, f"{GATEWAY_ADDRESS}/24", "g0")
        self._address(self.gw, f"{GATEWAY_EXTERNAL}/24", "g1")
        self._address(self.wan, f"{STUN_PRIMARY}/24", "br0")
        self._address(self.wan, f"{STUN_SECONDARY}/24", "br0")
        self.run(self.client, ["ip", "link", "set", "c0", "up"])
        self.run(self.gw, ["ip", "route", "add", "default", "via", STUN_PRIMARY])
        # gw routes, and answers ARP for what it routes: an on-link default
        # route (WireGuard's, without "via") then works as through a tunnel.
        self.run(
            self.gw,
            [
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && "
                "echo 1 > /proc/sys/net/ipv4/conf/g0/proxy_arp",
            ],
        )
        nft = self.directory / "chains.nft"
        nft.write_text(_NFT_CHAINS)
        self.run(self.gw, ["nft", "-f", str(nft)])
        if self.lan:
            self._link(self.lan, "l0", "c1", self.client)
            self._link(self.lan, "l1", "w1", self.wan)
            self.run(self.wan, ["ip", "link", "set", "w1", "master", "br0"])
            self.run(self.wan, ["ip", "link", "set", "w1", "up"])
            self._address(self.lan, f"{LAN_ROUTER}/24", "l0")
            self._address(self.lan, f"{LAN_EXTERNAL}/24", "l1")
            self._address(self.client, f"{LAN_CLIENT}/24", "c1")
            self.run(self.lan, ["ip", "route", "add", "default", "via", STUN_PRIMARY])
            self.run(self.lan, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            self.run(self.lan, ["nft", "-f", str(nft)])
            # wg-quick's rules: everything not marked goes by table 51820,
            # except what the main table knows more specifically than 0/0.
            self.run(self.client, ["ip", "route", "add", "default", "via", LAN_ROUTER])
            self.run(
                self.client,
                [
                    "ip",
                    "rule",
                    "add",
                    "not",
                    "fwmark",
                    WIREGUARD_TABLE,
                    "table",
                    WIREGUARD_TABLE,
                ],
            )
            self.run(
                self.client,
                ["ip", "rule", "add", "table", "main", "suppress_prefixlength", "0"],
            )

    def _defaultRoute(self) -> list[str]:
        route = ["default", "via", self.gatewayAddress, "dev", "c0"]
        if self.lan:
            if not self.vpnVia:
                route = ["default", "dev", "c0"]
            route += ["table", WIREGUARD_TABLE]
        return route

    def vpnUp(self, address: str | None = None) -> None:
        """The tunnel comes up: the client gets C{address} and a default route."""
        self.clientAddress = address or self.clientAddress
        self.run(
            self.client, ["ip", "addr", "add", f"{self.clientAddress}/24", "dev", "c0"]
        )
        self.run(self.client, ["ip", "route", "replace", *self._defaultRoute()])

    def vpnDown(self) -> None:
        """The tunnel goes: the client's address, and so its route, are gone."""
        self.run(self.client, ["ip", "addr", "flush", "dev", "c0"])

    def moveGateway(self, address: str) -> float:
        """
        The gateway moves to C{address}: miniupnpd stopped (its mappings
        gone), gw's address and the client's route changed, miniupnpd started
        there; seconds until it is ready.
        """
        self.gateway.stop()
        self.run(
            self.gw, ["ip", "addr", "del", f"{self.gatewayAddress}/24", "dev", "g0"]
        )
        self.gatewayAddress = address
        self.run(self.gw, ["ip", "addr", "add", f"{address}/24", "dev", "g0"])
        self.run(self.client, ["ip", "route", "replace", *self._defaultRoute()])
        return self.gateway.start()

    def _deleteNamespace(self, name: str) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["ip", "netns", "delete", name])

    def _startStund(self) -> None:
        with open(self.directory / "stund.out", "ab") as out:
            self.stund = subprocess.Popen(
                self.command(
                    self.wan, ["stund", "-h", STUN_PRIMARY, "-a", STUN_SECONDARY]
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def logPath(self) -> Path:
        return self.gateway.logPath

    def log(self) -> str:
        """Everything the gateway's miniupnpd wrote, all runs."""
        return self.gateway.log()

    def start(self) -> float:
        """Start miniupnpd; seconds until it has its external address."""
        return self.gateway.start()

    def stop(self) -> None:
        """Stop miniupnpd by PID and flush its rules, which it leaves behind."""
        self.gateway.stop()

    def restart(self) -> float:
        """A gateway reboot: epoch back to 0, every mapping gone."""
        self.stop()
        self.restarts += 1
        return self.start()

    def waitEpoch(self, seconds: float) -> None:
        """Wait until the gateway's epoch has reached C{seconds}."""
        self.gateway.waitEpoch(seconds)

    def announce(self) -> None:
        """SIGUSR1: miniupnpd resets its epoch and announces, keeping mappings."""
        self.gateway.signal(signal.SIGUSR1)

    def silence(self) -> None:
        """The gateway drops every NAT-PMP and PCP datagram, silently."""
        nft = self.directory / "outage.nft"
        nft.write_text(_OUTAGE)
        self.run(self.gw, ["nft", "-f", str(nft)])

    def unsilence(self) -> None:
        """The gateway answers again."""
        self.run(self.gw, ["nft", "delete", "table", "inet", "outage"])

    def rules(self, namespace: str = "") -> str:
        """miniupnpd's DNAT rules, one per mapping."""
        return self.run(
            namespace or self.gw,
            ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"],
        ).stdout

    def mappings(self, namespace: str = "") -> set[tuple[str, int, str, int]]:
        """(protocol, external port, client address, internal port) of each."""
        found = re.findall(
            r"(0x6|0x11|tcp|udp) (?:th )?dport (\d+) dnat ip to ([\d.]+):(\d+)",
            self.rules(namespace),
        )
        names = {"0x6": "tcp", "0x11": "udp"}
        return {
            (names.get(proto, proto), int(external), client, int(internal))
            for proto, external, client, internal in found
        }

    def requestsHeard(self, namespace: str = "") -> int:
        """Datagrams that reached udp/5351 in C{namespace} (gw by default)."""
        out = self.run(
            namespace or self.gw, ["nft", "list", "chain", "inet", "filter", "input"]
        ).stdout
        match = re.search(r"udp dport 5351 counter packets (\d+)", out)
        assert match is not None, out
        return int(match.group(1))

    def oneShot(
        self, config: Path, strategy: str, timeout: float = 200
    ) -> tuple[int, dict[str, Any], float]:
        """
        C{qb-port-sync --once --json} in the client namespace: its exit
        code, its JSON line, and the seconds it took.
        """
        code, lines, elapsed, _ = self.oneShotRaw(config, strategy, timeout)
        outcome: dict[str, Any] = json.loads(lines[-1])
        return code, outcome, elapsed

    def oneShotRaw(
        self, config: Path, strategy: str, timeout: float = 200
    ) -> tuple[int, list[str], float, str]:
        """
        C{qb-port-sync --once --json} in the client namespace: its exit
        code, its stdout lines, the seconds it took and its stderr.
        """
        argv = [sys.executable, "-m", "qbportsync", "--once", "--json"]
        argv += ["--strategy", strategy, "--config", str(config)]
        started = time.monotonic()
        done = subprocess.run(
            self.command(self.client, argv),
            check=False,
            cwd=PROJECT,
            # The rig's own login-refusal record, never the host's.
            env=dict(os.environ, STATE_DIRECTORY=str(self.directory / "state")),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        elapsed = time.monotonic() - started
        return done.returncode, done.stdout.splitlines(), elapsed, done.stderr

    def adopt(self, process: subprocess.Popen[Any]) -> None:
        """Stop C{process} by its PID when the rig closes."""
        self._cleanup.callback(stopProcess, process)

    def _stopAll(self) -> None:
        self.gateway.stop()
        if self.lanGateway is not None:
            self.lanGateway.stop()
        if self.stund is not None:
            stopProcess(self.stund)


class ClientQBittorrent:
    """
    qbittorrent-nox inside the rig's client namespace, Web UI on 127.0.0.1,
    every outbound feature off.
    """

    def __init__(
        self, rig: GatewayRig, *, webuiPort: int = 8080, listenPort: int = 6881
    ):
        requireTool("qbittorrent-nox")
        self.rig = rig
        self.webuiPort = webuiPort
        self.username = "admin"
        self.password = secrets.token_urlsafe(18)
        self.directory = rig.directory / "qbittorrent"
        config = self.directory / "qBittorrent" / "config"
        config.mkdir(parents=True)
        (config / "qBittorrent.conf").write_text(
            writeProfile(
                address="127.0.0.1",
                webuiPort=webuiPort,
                listenPort=listenPort,
                username=self.username,
                password=self.password,
                maxAuthFailCount=5,
                banDuration=3600,
            )
        )
        self.process = startQBittorrent(
            lambda argv: rig.command(rig.client, argv), self.directory, webuiPort
        )
        rig.adopt(self.process)
        waitFor(self._answers, "qBittorrent's Web UI", 15, 0.05)

    @property
    def baseURL(self) -> str:
        return f"http://127.0.0.1:{self.webuiPort}"

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"qbittorrent-nox exited with {self.process.returncode}")
        result = subprocess.run(
            self.rig.command(
                self.rig.client,
                ["python3", "-c", _FETCH, f"{self.baseURL}/api/v2/app/version"],
            ),
            check=False,
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def listenPort(self) -> int:
        """qBittorrent's listening port, asked from inside the namespace."""
        out = _run(
            self.rig.command(
                self.rig.client,
                [
                    "python3",
                    "-c",
                    _PREFERENCES,
                    self.baseURL,
                    self.username,
                    self.password,
                ],
            )
        ).stdout
        return int(out)

    def preferencesVia(self, agent: Agent) -> dict[str, Any] | None:
        """
        qBittorrent's preferences read through C{agent} (in the client
        namespace), logging in when needed; None if it does not answer.
        """
        url = f"{self.baseURL}/api/v2/app/preferences"
        code, body = agent.http(url)
        if code == 403:
            form = {"username": self.username, "password": self.password}
            agent.http(f"{self.baseURL}/api/v2/auth/login", form)
            code, body = agent.http(url)
        if code != 200:
            return None
        preferences: dict[str, Any] = json.loads(body)
        return preferences

    def listenPortVia(self, agent: Agent) -> int | None:
        """qBittorrent's listening port (L{preferencesVia}), or None."""
        preferences = self.preferencesVia(agent)
        return None if preferences is None else int(preferences["listen_port"])


_FETCH = """\
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass  # 403 without a login: the Web UI answers
"""
_PREFERENCES = """\
import http.cookiejar, json, sys, urllib.parse, urllib.request
base, user, password = sys.argv[1:]
opener = urllib.request.build_opener(
    urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
form = urllib.parse.urlencode({"username": user, "password": password}).encode()
opener.open(base + "/api/v2/auth/login", form, timeout=5)
preferences = opener.open(base + "/api/v2/app/preferences", timeout=5)
print(json.load(preferences)["listen_port"])
"""


def writeConfig(
    rig: GatewayRig, qbittorrent: ClientQBittorrent, **portmap: object
) -> Path:
    """A configuration file for the code under test."""
    lines = [
        "[qbittorrent]",
        f'base_url = "{qbittorrent.baseURL}"',
        f'username = "{qbittorrent.username}"',
        f'password = "{qbittorrent.password}"',
        "[portmap]",
        f'gateway = "{GATEWAY_ADDRESS}"',
    ]
    for key, value in portmap.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = rig.directory / f"config-{len(list(rig.directory.glob('config-*')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Capture:
    """tshark on the client's link, for NAT-PMP and PCP ports."""

    def __init__(self, rig: GatewayRig) -> None:
        self.rig = rig
        self.path = rig.directory / f"capture-{time.monotonic_ns()}.pcapng"
        self.path.touch()
        self.errors = rig.directory / "tshark.err"
        self.errors.touch()
        started = self.errors.read_text(errors="replace").count("Capture started")
        with open(self.errors, "ab") as err:
            self.process = subprocess.Popen(
                rig.command(
                    rig.client,
                    [
                        "tshark",
                        "-q",
                        "-i",
                        "c0",
                        "-w",
                        str(self.path),
                        "-f",
                        "udp port 5350 or udp port 5351",
                    ],
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        rig.adopt(self.process)
        waitFor(
            lambda: (
                self.errors.read_text(errors="replace").count("Capture started")
                > started
            ),
            "tshark to start capturing",
            15,
        )

    def stop(self) -> None:
        """Stop as on Ctrl-C, which makes tshark flush everything it saw."""
        time.sleep(0.2)  # let the last datagrams arrive
        os.kill(self.process.pid, signal.SIGINT)
        self.process.wait(15)

    def fields(self, *names: str, displayFilter: str = "nat-pmp") -> list[list[str]]:
        """One row per packet matching C{displayFilter}."""
        argv = ["tshark", "-r", str(self.path), "-Y", displayFilter, "-T", "fields"]
        for name in names:
            argv += ["-e", name]
        out = subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=30
        ).stdout
        return [line.split("\t") for line in out.splitlines() if line]


class Agent:
    """
    L{tests.nsagent} in one namespace of a rig: TCP connects and HTTP
    requests from inside it, a millisecond each.
    """

    def __init__(self, rig: GatewayRig, namespace: str) -> None:
        self.process = subprocess.Popen(
            rig.command(namespace, [sys.executable, "-m", "tests.nsagent"]),
            cwd=PROJECT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        rig.adopt(self.process)
        self._answer(15)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"the namespace agent gave no answer in {timeout} s")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, wait: float, **request: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        return self._answer(wait + 5)

    def connect(self, host: str, port: int, timeout: float = 0.5) -> tuple[bool, str]:
        """Whether a TCP handshake with C{host:port} completes; else why not."""
        answer = self._ask(timeout, op="connect", host=host, port=port, timeout=timeout)
        return answer["ok"], answer["error"]

    def http(
        self, url: str, form: dict[str, str] | None = None, timeout: float = 5
    ) -> tuple[int, str]:
        """GET C{url}, or POST C{form}; status (0: no answer) and body."""
        answer = self._ask(timeout, op="http", url=url, form=form, timeout=timeout)
        return answer["status"], answer["body"]


STATUS_PORT = 9100


def writeDaemonConfig(
    rig: GatewayRig,
    qbittorrent: ClientQBittorrent,
    *,
    gateway: bool = True,
    verifyInterval: float = 2.0,
    bindInterface: str = "",
    **portmap: object,
) -> Path:
    """
    A configuration for the daemon: C{[portmap]} from C{portmap}, the
    gateway's address only with C{gateway} (else it is discovered),
    qBittorrent bound to C{bindInterface} when given, metrics and /status on
    127.0.0.1:L{STATUS_PORT}.
    """
    lines = [
        "[qbittorrent]",
        f'base_url = "{qbittorrent.baseURL}"',
        f'username = "{qbittorrent.username}"',
        f'password = "{qbittorrent.password}"',
        f"verify_interval_secs = {verifyInterval}",
        "[portmap]",
    ]
    if gateway:
        lines.append(f'gateway = "{rig.gatewayAddress}"')
    lines += [f"{key} = {json.dumps(value)}" for key, value in portmap.items()]
    if bindInterface:
        lines += ["[net]", f'bind_interface = "{bindInterface}"']
    lines += [
        "[metrics]",
        "enabled = true",
        f"port = {STATUS_PORT}",
        "[health]",
        "enabled = true",
    ]
    path = rig.directory / f"daemon-{len(list(rig.directory.glob('daemon-*')))}.toml"
    path.touch(0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """
    The real daemon, C{python -m qbportsync}, in the client namespace; its
    /status and /metrics read through the client's L{Agent}.
    """

    def __init__(
        self, rig: GatewayRig, config: Path, strategy: str, agent: Agent
    ) -> None:
        self.agent = agent
        self.path = rig.directory / f"daemon-{strategy}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "qbportsync", "--config", str(config)]
        argv += ["--strategy", strategy, "--log-level", "debug"]
        with open(self.path, "wb") as out:
            self.process = subprocess.Popen(
                rig.command(rig.client, argv),
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        rig.adopt(self.process)

    def output(self) -> str:
        """Everything the daemon wrote."""
        return self.path.read_text(errors="replace")

    def status(self) -> dict[str, Any] | None:
        """Its /status document, or None while it does not answer."""
        code, body = self.agent.http(f"http://127.0.0.1:{STATUS_PORT}/status")
        if code != 200:
            return None
        document: dict[str, Any] = json.loads(body)
        return document

    def metrics(self) -> str:
        """Its /metrics text ("" while it does not answer)."""
        code, body = self.agent.http(f"http://127.0.0.1:{STATUS_PORT}/metrics")
        return body if code == 200 else ""

    def metric(self, sample: str) -> float:
        """One sample's value, e.g. of C{qb_port_sync_errors_total{kind="gateway"}}."""
        for line in self.metrics().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0

    def stop(self) -> int:
        """SIGTERM by PID; its exit code."""
        return stopProcess(self.process)
