"""
Gateway discovery: the path internet traffic takes (Linux: the kernel's
route lookup, policy rules included; macOS: route -n get), interface
addresses.
"""

from __future__ import annotations

import struct
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.config import Config, ConfigError, NetConfig, PortmapConfig
from qbportsync.interfaces import SourceError, SourceUnavailable
from qbportsync.netlink import RouteAnswer
from qbportsync.sources.gateway import (
    DarwinRoute,
    GatewayPath,
    describeRoute,
    gatewayFromDarwinRoute,
    interfaceAddress,
    parseIfreqAddress,
    parseRouteGet,
    pathFromDarwinRoute,
    pathFromRoute,
    resolvePath,
)
from tests.rig import requireTool
from tests.test_netlink import Namespace

DARWIN_LAN = """\
   route to: default
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""
DARWIN_UTUN = """\
   route to: default
destination: default
       mask: default
  interface: utun4
      flags: <UP,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1420         0
"""


WIREGUARD = RouteAnswer("1.1.1.1", 51820, 7, "", "10.2.0.2")
LAN = RouteAnswer("1.1.1.1", 254, 2, "192.168.1.1", "192.168.1.20")


class PathFromRouteTests(SynchronousTestCase):
    """pathFromRoute: the decision on the kernel's answer."""

    def test_nextHop(self) -> None:
        """The route's next hop is the gateway, its preferred source ours."""
        self.assertEqual(
            pathFromRoute(LAN, "eth0", Config()),
            GatewayPath(
                "192.168.1.1",
                "192.168.1.20",
                "eth0",
                "1.1.1.1 via 192.168.1.1 dev eth0 table main src 192.168.1.20",
            ),
        )

    def test_wireguard(self) -> None:
        """A route without next hop is a ConfigError naming the route and the fix."""
        error = self.assertRaises(
            ConfigError, pathFromRoute, WIREGUARD, "wg0", Config()
        )
        self.assertIn("1.1.1.1 dev wg0 table 51820 src 10.2.0.2", str(error))
        self.assertIn('gateway = "10.2.0.1"', str(error))

    def test_configured(self) -> None:
        """A configured gateway is asked along the route towards it."""
        config = Config(portmap=PortmapConfig(gateway="10.2.0.1"))
        answer = RouteAnswer("10.2.0.1", 51820, 7, "", "10.2.0.2")
        self.assertEqual(
            pathFromRoute(answer, "wg0", config),
            GatewayPath(
                "10.2.0.1",
                "10.2.0.2",
                "wg0",
                "10.2.0.1 dev wg0 table 51820 src 10.2.0.2",
            ),
        )

    def test_bindAddress(self) -> None:
        """[portmap] bind_address wins over the route's preferred source."""
        config = Config(portmap=PortmapConfig(bind_address="192.168.1.99"))
        self.assertEqual(pathFromRoute(LAN, "eth0", config).source, "192.168.1.99")

    def test_describeBare(self) -> None:
        """A route with no destination, interface or source says only what it has."""
        self.assertEqual(
            describeRoute(RouteAnswer("", 51820, 0, "", ""), ""), "1.1.1.1 table 51820"
        )


class DarwinTests(SynchronousTestCase):
    """macOS: route -n get default."""

    def test_parseLan(self) -> None:
        """The gateway and interface lines are read."""
        self.assertEqual(parseRouteGet(DARWIN_LAN), DarwinRoute("en0", "192.168.1.1"))
        self.assertEqual(
            gatewayFromDarwinRoute(parseRouteGet(DARWIN_LAN)), "192.168.1.1"
        )

    def test_utun(self) -> None:
        """A utun default route without gateway names the fix."""
        route = parseRouteGet(DARWIN_UTUN)
        self.assertEqual(route, DarwinRoute("utun4", ""))
        error = self.assertRaises(ConfigError, gatewayFromDarwinRoute, route)
        self.assertIn('gateway = "10.2.0.1"', str(error))

    def test_linkGateway(self) -> None:
        """A gateway that is not an IPv4 address counts as none."""
        text = DARWIN_LAN.replace("192.168.1.1", "link#14")
        self.assertEqual(parseRouteGet(text).gateway, "")

    def test_otherInterface(self) -> None:
        """The default route through another interface than bind_interface fails."""
        self.assertRaises(
            ConfigError, gatewayFromDarwinRoute, parseRouteGet(DARWIN_LAN), "utun4"
        )

    def test_path(self) -> None:
        """The default route's gateway, asked from the interface's address."""
        addresses = {"en0": "192.168.1.20"}
        self.assertEqual(
            pathFromDarwinRoute(
                parseRouteGet(DARWIN_LAN), "default", Config(), addresses.__getitem__
            ),
            GatewayPath(
                "192.168.1.1", "192.168.1.20", "en0", "default via 192.168.1.1 dev en0"
            ),
        )

    def test_pathConfigured(self) -> None:
        """A configured gateway behind a utun is asked from the tunnel's address."""
        config = Config(portmap=PortmapConfig(gateway="10.2.0.1"))
        route = parseRouteGet(DARWIN_UTUN)
        self.assertEqual(
            pathFromDarwinRoute(route, "10.2.0.1", config, lambda name: "10.2.0.2"),
            GatewayPath("10.2.0.1", "10.2.0.2", "utun4", "10.2.0.1 dev utun4"),
        )
        self.assertRaises(
            ConfigError,
            pathFromDarwinRoute,
            route,
            "default",
            Config(),
            lambda name: "10.2.0.2",
        )

    def test_noRoute(self) -> None:
        """route's error output (no default route) is a clear error."""
        route = parseRouteGet("route: writing to routing socket: not in table\n")
        self.assertRaises(ConfigError, gatewayFromDarwinRoute, route)


class ResolveTests(SynchronousTestCase):
    """resolvePath: what the source asks, on this machine."""

    def test_discoveryOff(self) -> None:
        """Discovery off without a gateway is a ConfigError."""
        config = Config(portmap=PortmapConfig(autodiscover_gateway=False))
        self.failureResultOf(resolvePath(None, config), ConfigError)

    def test_configuredBoth(self) -> None:
        """Gateway and bind_address both set: used as they are, nothing looked up."""
        config = Config(
            portmap=PortmapConfig(gateway="10.2.0.1", bind_address="10.2.0.2"),
            net=NetConfig(bind_interface="nosuchif0"),
        )
        self.assertEqual(
            self.successResultOf(resolvePath(None, config)),
            GatewayPath(
                "10.2.0.1",
                "10.2.0.2",
                "nosuchif0",
                "10.2.0.1 from 10.2.0.2 (configured)",
            ),
        )

    def test_discoverHere(self) -> None:
        """On this machine, discovery agrees with `ip route get` on the next hop."""
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        ip = requireTool("ip")
        words = subprocess.run(
            [ip, "-o", "route", "get", "1.1.1.1"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
        d = resolvePath(None, Config())
        if "dev" not in words:
            self.failureResultOf(d, SourceUnavailable)
            return
        expected = (
            words[words.index("dev") + 1],
            words[words.index("src") + 1] if "src" in words else "",
        )
        if "via" not in words:
            self.failureResultOf(d, ConfigError)
            return
        path = self.successResultOf(d)
        self.assertEqual(
            (path.gateway, path.interface, path.source),
            (words[words.index("via") + 1], *expected),
        )

    def test_configuredHere(self) -> None:
        """A configured gateway on loopback: the path goes through lo from 127.0.0.1."""
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        config = Config(portmap=PortmapConfig(gateway="127.0.0.1"))
        path = self.successResultOf(resolvePath(None, config))
        self.assertEqual(
            (path.gateway, path.source, path.interface),
            ("127.0.0.1", "127.0.0.1", "lo"),
        )

    def test_noInterface(self) -> None:
        """A bind_interface that does not exist: no route, the interface named."""
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        config = Config(net=NetConfig(bind_interface="nosuchif0"))
        failure = self.failureResultOf(resolvePath(None, config), SourceUnavailable)
        self.assertIn("nosuchif0", str(failure.value))
        configured = Config(
            portmap=PortmapConfig(gateway="10.2.0.1"),
            net=NetConfig(bind_interface="nosuchif0"),
        )
        failure = self.failureResultOf(resolvePath(None, configured), SourceError)
        self.assertIn("10.2.0.1", str(failure.value))

    def test_ifreq(self) -> None:
        """The address sits after the name, family and port in struct ifreq."""
        ifreq = (
            b"wg0".ljust(16, b"\0") + struct.pack("<HH", 2, 0) + bytes([10, 2, 0, 2])
        )
        self.assertEqual(parseIfreqAddress(ifreq.ljust(32, b"\0")), "10.2.0.2")
        self.assertRaises(ValueError, parseIfreqAddress, b"short")

    def test_loopbackAddress(self) -> None:
        """The real ioctl reads lo's address."""
        if not sys.platform.startswith("linux"):
            requireTool("Linux interface names")
        self.assertEqual(interfaceAddress("lo"), "127.0.0.1")

    def test_missingInterface(self) -> None:
        """An interface that does not exist is a SourceError naming it."""
        error = self.assertRaises(SourceError, interfaceAddress, "nosuchif0")
        self.assertIn("nosuchif0", str(error))


class PolicyRoutingTests(SynchronousTestCase):
    """
    The real kernel in a namespace of our own: a LAN router in the main
    table, a tunnel in wg-quick's table 51820 chosen by its rules.
    """

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        self.namespace = Namespace()
        self.addCleanup(self.namespace.close)
        ip = self.namespace.ip
        for here, peer in (("qblan0", "qblan1"), ("qbwg0", "qbwg1")):
            ip("link", "add", here, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "up")
            ip("link", "set", here, "up")
        ip("address", "add", "198.51.100.2/24", "dev", "qblan0")
        ip("address", "add", "203.0.113.2/32", "dev", "qbwg0")

    def resolve(
        self, gateway: str = "", bindInterface: str = ""
    ) -> Deferred[GatewayPath]:
        """resolvePath, asked from inside the namespace."""
        config = Config(
            portmap=PortmapConfig(gateway=gateway),
            net=NetConfig(bind_interface=bindInterface),
        )
        return self.namespace.call(lambda: resolvePath(None, config))

    def wgQuick(self) -> None:
        ip = self.namespace.ip
        ip("route", "add", "default", "dev", "qbwg0", "table", "51820")
        ip("rule", "add", "not", "fwmark", "51820", "table", "51820")
        ip("rule", "add", "table", "main", "suppress_prefixlength", "0")

    def test_noRoute(self) -> None:
        """No default route at all: SourceUnavailable, saying the VPN may be down."""
        failure = self.failureResultOf(self.resolve(), SourceUnavailable)
        self.assertIn("is the VPN up?", str(failure.value))

    def test_mainTable(self) -> None:
        """Without policy rules the main table's default route gives the LAN router."""
        self.namespace.ip("route", "add", "default", "via", "198.51.100.1")
        self.assertEqual(
            self.successResultOf(self.resolve()),
            GatewayPath(
                "198.51.100.1",
                "198.51.100.2",
                "qblan0",
                "1.1.1.1 via 198.51.100.1 dev qblan0 table main src 198.51.100.2",
            ),
        )

    def test_wireguardPolicy(self) -> None:
        """wg-quick's rules: the tunnel's route is found, the LAN router never asked."""
        self.namespace.ip("route", "add", "default", "via", "198.51.100.1")
        self.wgQuick()
        message = str(self.failureResultOf(self.resolve(), ConfigError).value)
        self.assertIn("1.1.1.1 dev qbwg0 table 51820 src 203.0.113.2", message)
        self.assertIn('gateway = "10.2.0.1"', message)
        self.assertNotIn("198.51.100.1", message)

    def test_wireguardPolicyConfigured(self) -> None:
        """A configured tunnel gateway is asked from the tunnel's address."""
        self.namespace.ip("route", "add", "default", "via", "198.51.100.1")
        self.wgQuick()
        self.assertEqual(
            self.successResultOf(self.resolve("203.0.113.1")),
            GatewayPath(
                "203.0.113.1",
                "203.0.113.2",
                "qbwg0",
                "203.0.113.1 dev qbwg0 table 51820 src 203.0.113.2",
            ),
        )

    def test_policyTableWithNextHop(self) -> None:
        """A next hop in the policy table is the gateway, not the main table's."""
        self.namespace.ip("route", "add", "default", "via", "198.51.100.1")
        self.wgQuick()
        self.namespace.ip(
            "route",
            "replace",
            "default",
            "via",
            "203.0.113.1",
            "dev",
            "qbwg0",
            "onlink",
            "table",
            "51820",
        )
        path = self.successResultOf(self.resolve())
        self.assertEqual(
            (path.gateway, path.source, path.interface),
            ("203.0.113.1", "203.0.113.2", "qbwg0"),
        )

    def test_boundInterface(self) -> None:
        """With bind_interface, the path of traffic through that interface counts."""
        self.namespace.ip("route", "add", "default", "via", "198.51.100.1")
        self.wgQuick()
        path = self.successResultOf(self.resolve(bindInterface="qblan0"))
        self.assertEqual((path.gateway, path.interface), ("198.51.100.1", "qblan0"))
