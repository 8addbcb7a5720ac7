"""Gateway discovery: routing tables of Linux and macOS, interface addresses."""

from __future__ import annotations

import struct
import sys
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from qbportsync.config import Config, ConfigError, NetConfig, PortmapConfig
from qbportsync.interfaces import SourceError
from qbportsync.sources.gateway import (
    DarwinRoute,
    Route,
    gatewayFromDarwinRoute,
    gatewayFromRoutes,
    interfaceAddress,
    parseIfreqAddress,
    parseProcNetRoute,
    parseRouteGet,
    resolveBindAddress,
    resolveGateway,
)

HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask"
    "\t\tMTU\tWindow\tIRTT                                                       \n"
)
LAN = (
    HEADER + "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
)
WIREGUARD = HEADER + "wg0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
OPENVPN = (
    LAN
    + "tun0\t00000000\t0100600A\t0003\t0\t0\t0\t00000080\t0\t0\t0\n"
    + "tun0\t00000080\t0100600A\t0003\t0\t0\t0\t00000080\t0\t0\t0\n"
    + "tun0\t0000600A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
)
WG_POLICY = LAN + "wg0\t0000020A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"

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


def needsLittleEndian() -> None:
    if sys.byteorder != "little":
        raise SkipTest("samples were taken on a little-endian machine")


class ProcNetRouteTests(SynchronousTestCase):
    """Linux: /proc/net/route."""

    def test_parse(self) -> None:
        """Addresses, masks and gateways decode from the kernel's hex."""
        needsLittleEndian()
        self.assertEqual(
            parseProcNetRoute(LAN),
            [
                Route("eth0", "0.0.0.0", "192.168.2.1", 0, 100),
                Route("eth0", "192.168.2.0", "", 24, 100),
            ],
        )

    def test_skipsDownAndGarbage(self) -> None:
        """Routes not up and unreadable lines are left out."""
        text = HEADER + "eth0\t00000000\t0102A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"
        self.assertEqual(parseProcNetRoute(text + "junk\nx\ty\tz\n"), [])

    def test_defaultGateway(self) -> None:
        """The default route's next hop is the gateway."""
        needsLittleEndian()
        self.assertEqual(gatewayFromRoutes(parseProcNetRoute(LAN)), "192.168.2.1")

    def test_wireguardPointToPoint(self) -> None:
        """A default route without a gateway names the ProtonVPN fix."""
        error = self.assertRaises(
            ConfigError, gatewayFromRoutes, parseProcNetRoute(WIREGUARD)
        )
        self.assertIn('gateway = "10.2.0.1"', str(error))
        self.assertIn("wg0", str(error))

    def test_openvpnSplitDefault(self) -> None:
        """OpenVPN's 0/1 and 128/1 routes win over the LAN's 0/0."""
        needsLittleEndian()
        routes = parseProcNetRoute(OPENVPN)
        self.assertEqual(gatewayFromRoutes(routes), "10.96.0.1")
        self.assertEqual(gatewayFromRoutes(routes, "tun0"), "10.96.0.1")

    def test_bindInterfaceWithoutGateway(self) -> None:
        """wg-quick's policy routing: wg0 has routes but no gateway."""
        error = self.assertRaises(
            ConfigError, gatewayFromRoutes, parseProcNetRoute(WG_POLICY), "wg0"
        )
        self.assertIn('gateway = "10.2.0.1"', str(error))

    def test_bindInterfaceAbsent(self) -> None:
        """No route through the interface: say so, with the fix."""
        error = self.assertRaises(
            ConfigError, gatewayFromRoutes, parseProcNetRoute(LAN), "tun0"
        )
        self.assertIn("tun0", str(error))
        self.assertIn('gateway = "10.2.0.1"', str(error))

    def test_noDefault(self) -> None:
        """No default route at all is a clear error."""
        self.assertRaises(ConfigError, gatewayFromRoutes, [])

    def test_lowestMetric(self) -> None:
        """Between two defaults the lower metric wins."""
        routes = [
            Route("eth1", "0.0.0.0", "10.0.0.1", 0, 600),
            Route("eth0", "0.0.0.0", "10.0.1.1", 0, 100),
        ]
        self.assertEqual(gatewayFromRoutes(routes), "10.0.1.1")


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

    def test_noRoute(self) -> None:
        """route's error output (no default route) is a clear error."""
        route = parseRouteGet("route: writing to routing socket: not in table\n")
        self.assertRaises(ConfigError, gatewayFromDarwinRoute, route)


class ResolveTests(SynchronousTestCase):
    """Which gateway and local address the source uses."""

    def test_configuredWins(self) -> None:
        """[portmap] gateway is used as is."""
        config = Config(portmap=PortmapConfig(gateway="10.2.0.1"))
        self.assertEqual(self.successResultOf(resolveGateway(None, config)), "10.2.0.1")

    def test_discoveryOff(self) -> None:
        """Discovery off without a gateway is a ConfigError."""
        config = Config(portmap=PortmapConfig(autodiscover_gateway=False))
        self.failureResultOf(resolveGateway(None, config), ConfigError)

    def test_discoverHere(self) -> None:
        """On this Linux machine, discovery returns an IPv4 address or a clear error."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads /proc/net/route")
        d = resolveGateway(None, Config())
        results: list[object] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1)
        result = results[0]
        if not isinstance(result, str):
            self.assertIsInstance(getattr(result, "value", None), ConfigError)

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
            raise SkipTest("Linux interface names")
        self.assertEqual(interfaceAddress("lo"), "127.0.0.1")

    def test_missingInterface(self) -> None:
        """An interface that does not exist is a SourceError naming it."""
        error = self.assertRaises(SourceError, interfaceAddress, "nosuchif0")
        self.assertIn("nosuchif0", str(error))

    def test_bindAddress(self) -> None:
        """bind_address wins, then the interface's address, else any."""
        self.assertEqual(
            resolveBindAddress(
                Config(
                    portmap=PortmapConfig(bind_address="10.2.0.2"),
                    net=NetConfig(bind_interface="lo"),
                )
            ),
            "10.2.0.2",
        )
        self.assertEqual(resolveBindAddress(Config()), "")
        if sys.platform.startswith("linux"):
            self.assertEqual(
                resolveBindAddress(Config(net=NetConfig(bind_interface="lo"))),
                "127.0.0.1",
            )
