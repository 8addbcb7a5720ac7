"""
A real NAT-PMP/PCP gateway for integration tests: miniupnpd in network
namespaces, linked to nothing on the host.

    client (198.51.100.2) ── gw (198.51.100.1 | 203.0.113.5) ── wan (203.0.113.1, .2)

miniupnpd runs in I{gw}; it learns its "public" address from stund in I{wan}
(it refuses documentation ranges as external addresses otherwise).  Code
under test runs in I{client}, where a qbittorrent-nox can run too, on
127.0.0.1.  Synchronous and standard library only, like L{tests.rig}.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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
_READY = "Port forwarding is now enabled"

_NFT_CHAINS = """\
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy accept;
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


def requireGatewayTools() -> None:
    """Skip (or fail) unless the gateway rig can be built here."""
    requireRoot()
    for tool in ("ip", "nft", "unshare", "miniupnpd", "stund"):
        requireTool(tool)


def _run(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=timeout
    )


def _miniupnpdConf(minLifetime: int, maxLifetime: int) -> str:
    return f"""\
ext_ifname=g1
listening_ip=g0
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
allow 1024-65535 198.51.100.0/24 1-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


class GatewayRig(Rig):
    """
    Three namespaces, stund and miniupnpd.  Use as a context manager or call
    L{close}: every process is stopped by PID, namespaces deleted.
    """

    def __init__(self, *, minLifetime: int = 120, maxLifetime: int = 86400) -> None:
        requireGatewayTools()
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.client = f"qbpsnat-{tag}-client"
        self.gw = f"qbpsnat-{tag}-gw"
        self.wan = f"qbpsnat-{tag}-wan"
        self.miniupnpd: subprocess.Popen[bytes] | None = None
        self.stund: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        super().__init__()
        try:
            self.directory = Path(
                self._cleanup.enter_context(
                    tempfile.TemporaryDirectory(prefix="qbps-gw-")
                )
            )
            self.conf = self.directory / "miniupnpd.conf"
            self.conf.write_text(_miniupnpdConf(minLifetime, maxLifetime))
            self._network()
            self._cleanup.callback(self._stopAll)
            self._startStund()
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

    def _network(self) -> None:
        for name in (self.client, self.gw, self.wan):
            _run(["ip", "netns", "add", name])
            self._cleanup.callback(self._deleteNamespace, name)
            self.run(name, ["ip", "link", "set", "lo", "up"])
            self.run(
                name,
                ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
            )
        # Created inside the namespaces: these links never touch the host.
        for near, far, namespace in (("g0", "c0", self.client), ("g1", "w0", self.wan)):
            _run(
                [
                    "ip",
                    "-n",
                    self.gw,
                    "link",
                    "add",
                    near,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    far,
                    "netns",
                    namespace,
                ]
            )
        for namespace, address, interface in (
            (self.client, f"{CLIENT_ADDRESS}/24", "c0"),
            (self.gw, f"{GATEWAY_ADDRESS}/24", "g0"),
            (self.gw, f"{GATEWAY_EXTERNAL}/24", "g1"),
            (self.wan, f"{STUN_PRIMARY}/24", "w0"),
            (self.wan, f"{STUN_SECONDARY}/24", "w0"),
        ):
            self.run(namespace, ["ip", "addr", "add", address, "dev", interface])
            self.run(namespace, ["ip", "link", "set", interface, "up"])
        self.run(self.client, ["ip", "route", "add", "default", "via", GATEWAY_ADDRESS])
        self.run(self.gw, ["ip", "route", "add", "default", "via", STUN_PRIMARY])
        nft = self.directory / "chains.nft"
        nft.write_text(_NFT_CHAINS)
        self.run(self.gw, ["nft", "-f", str(nft)])

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
        return self.directory / "miniupnpd.log"

    def log(self) -> str:
        """Everything miniupnpd wrote, all runs."""
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def start(self) -> float:
        """Start miniupnpd; seconds until it has its external address."""
        assert self.miniupnpd is None or self.miniupnpd.poll() is not None
        before = self.log().count(_READY)
        # With no syslog, miniupnpd writes each line to /dev/console too, which
        # is slow enough to cause retransmissions: silence that copy.
        script = (
            f"mount --bind /dev/null /dev/console && exec miniupnpd -f {self.conf} -d"
        )
        with open(self.logPath, "ab") as out:
            self.miniupnpd = subprocess.Popen(
                self.command(self.gw, ["unshare", "-m", "sh", "-c", script]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = self.miniupnpd

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"miniupnpd exited with {process.returncode}: {self.log()[-2000:]}"
                )
            return self.log().count(_READY) > before

        return waitFor(ready, "miniupnpd to get its external address", 15, 0.01)

    def stop(self) -> None:
        """Stop miniupnpd by PID and flush its rules, which it leaves behind."""
        if self.miniupnpd is not None:
            stopProcess(self.miniupnpd)
        for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
            with contextlib.suppress(subprocess.CalledProcessError):
                self.run(self.gw, ["nft", "flush", "chain", "inet", "filter", chain])

    def restart(self) -> float:
        """A gateway reboot: epoch back to 0, every mapping gone."""
        self.stop()
        self.restarts += 1
        return self.start()

    def announce(self) -> None:
        """SIGUSR1: miniupnpd resets its epoch and announces, keeping mappings."""
        assert self.miniupnpd is not None
        os.kill(self.miniupnpd.pid, signal.SIGUSR1)

    def rules(self) -> str:
        """miniupnpd's DNAT rules, one per mapping."""
        return self.run(
            self.gw, ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"]
        ).stdout

    def oneShot(
        self, config: Path, strategy: str, timeout: float = 200
    ) -> tuple[int, dict[str, Any], float]:
        """
        C{qb-port-sync --once --json} in the client namespace: its exit
        code, its JSON line, and the seconds it took.
        """
        argv = [sys.executable, "-m", "qbportsync", "--once", "--json"]
        argv += ["--strategy", strategy, "--config", str(config)]
        started = time.monotonic()
        done = subprocess.run(
            self.command(self.client, argv),
            check=False,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        elapsed = time.monotonic() - started
        outcome: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return done.returncode, outcome, elapsed

    def adopt(self, process: subprocess.Popen[bytes]) -> None:
        """Stop C{process} by its PID when the rig closes."""
        self._cleanup.callback(stopProcess, process)

    def _stopAll(self) -> None:
        self.stop()
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
