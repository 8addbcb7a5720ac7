"""
Where to send port-mapping requests, and from which local address: the
path that internet traffic takes, as the kernel routes it.

Linux asks the kernel which route a packet to a public address would take
(netlink RTM_GETROUTE, policy rules included, nothing sent), so a VPN whose
default route hides in its own table (wg-quick's table 51820) is found and
the home router behind it is never asked.  macOS asks C{route -n get}.  The
decisions are pure functions; only the C{resolve*} functions touch the system.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
from collections.abc import Callable
from ipaddress import IPv4Address

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.utils import getProcessOutput

from qbportsync.config import Config, ConfigError
from qbportsync.interfaces import SourceError, SourceUnavailable
from qbportsync.netlink import RouteAnswer, RouteError, lookupRoute, tableName

ROUTE_KEY = "1.1.1.1"
"""
A public address used only as the key of a route lookup, standing for "the
internet": nothing is ever sent to it.
"""

_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}
_IFNAMSIZ = 16

PROTON_HINT = 'set [portmap] gateway, e.g. gateway = "10.2.0.1" for ProtonVPN'


@frozen
class GatewayPath:
    """The gateway to ask and the local end of the path towards it."""

    gateway: str
    source: str
    """The local address to send from (and to name as PCP client address);
    empty when the system did not say (then any)."""
    interface: str
    route: str
    """The route, for humans: "1.1.1.1 dev wg0 table 51820 src 10.2.0.2"."""


def describeRoute(answer: RouteAnswer, interface: str) -> str:
    """A route lookup's answer written as C{ip route get} writes it."""
    words = [answer.destination or ROUTE_KEY]
    if answer.gateway:
        words += ["via", answer.gateway]
    if interface:
        words += ["dev", interface]
    words += ["table", tableName(answer.table)]
    if answer.source:
        words += ["src", answer.source]
    return " ".join(words)


def pathFromRoute(answer: RouteAnswer, interface: str, config: Config) -> GatewayPath:
    """
    The path for a route lookup's C{answer}: towards the configured gateway,
    else to the internet, whose next hop is then the gateway.  Raises
    L{ConfigError} naming the fix when that route has no next hop (WireGuard).
    """
    route = describeRoute(answer, interface)
    gateway = config.portmap.gateway
    if not gateway:
        if not answer.gateway:
            raise ConfigError(
                f"the route internet traffic takes ({route}) has no gateway (a "
                f"point-to-point tunnel such as WireGuard); {PROTON_HINT}"
            )
        gateway = answer.gateway
    source = config.portmap.bind_address or answer.source
    return GatewayPath(gateway, source, interface, route)


def _linuxPath(config: Config) -> GatewayPath:
    destination = config.portmap.gateway or ROUTE_KEY
    bindInterface = config.net.bind_interface
    try:
        answer = lookupRoute(destination, bindInterface)
        interface = socket.if_indextoname(answer.interfaceIndex)
    except (RouteError, OSError) as e:
        through = (
            f" through [net] bind_interface {bindInterface!r}" if bindInterface else ""
        )
        if config.portmap.gateway:
            raise SourceError(
                f"no route to gateway {destination}{through} ({e.strerror}); "
                "is the VPN up?"
            ) from e
        raise SourceUnavailable(
            f"no route to the internet{through} ({e.strerror}) to find a "
            f"gateway on; is the VPN up? Or {PROTON_HINT}"
        ) from e
    return pathFromRoute(answer, interface, config)


@frozen
class DarwinRoute:
    """What C{route -n get} on macOS says about one route."""

    interface: str
    gateway: str
    """Empty when the route names no IPv4 next hop (utun point-to-point)."""


def parseRouteGet(text: str) -> DarwinRoute:
    """Parse macOS C{route -n get default} output."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    gateway = fields.get("gateway", "")
    try:
        IPv4Address(gateway)
    except ValueError:
        gateway = ""
    return DarwinRoute(fields.get("interface", ""), gateway)


def gatewayFromDarwinRoute(route: DarwinRoute, interface: str = "") -> str:
    """The gateway of macOS's default route, or L{ConfigError} naming the fix."""
    if not route.interface:
        raise ConfigError(
            f"there is no default route to find a gateway on; {PROTON_HINT}"
        )
    if interface and route.interface != interface:
        raise ConfigError(
            f"the default route goes through {route.interface!r}, not [net] "
            f"bind_interface {interface!r}; {PROTON_HINT}"
        )
    if not route.gateway:
        raise ConfigError(
            f"the default route through {route.interface!r} has no gateway (a "
            f"point-to-point tunnel); {PROTON_HINT}"
        )
    return route.gateway


def parseIfreqAddress(ifreq: bytes) -> str:
    """The IPv4 address in a C{struct ifreq} that SIOCGIFADDR filled in."""
    if len(ifreq) < _IFNAMSIZ + 8:
        raise ValueError("ifreq too short")
    # sockaddr_in: family (and length on BSD), port, then the address.
    return str(IPv4Address(ifreq[_IFNAMSIZ + 4 : _IFNAMSIZ + 8]))


def interfaceAddress(name: str) -> str:
    """The IPv4 address of interface C{name}; L{SourceError} if it has none."""
    request = struct.pack("32s", name.encode()[: _IFNAMSIZ - 1])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = fcntl.ioctl(
                s.fileno(), _SIOCGIFADDR.get(sys.platform, 0x8915), request
            )
    except OSError as e:
        raise SourceError(
            f"interface {name!r} has no IPv4 address ({e.strerror}); is the VPN up?"
        ) from e
    return parseIfreqAddress(ifreq)


def pathFromDarwinRoute(
    route: DarwinRoute,
    target: str,
    config: Config,
    address: Callable[[str], str] = interfaceAddress,
) -> GatewayPath:
    """
    The path for macOS's answer to C{route -n get TARGET}: towards the
    configured gateway, else to the default route's gateway.  C{address}
    gives an interface's address (the source when none is configured).
    """
    gateway = config.portmap.gateway or gatewayFromDarwinRoute(
        route, config.net.bind_interface
    )
    source = config.portmap.bind_address or (
        address(route.interface) if route.interface else ""
    )
    via = f" via {route.gateway}" if route.gateway else ""
    return GatewayPath(
        gateway, source, route.interface, f"{target}{via} dev {route.interface}"
    )


def resolvePath(reactor: object, config: Config) -> Deferred[GatewayPath]:
    """
    The gateway to ask and the local address to ask it from: the configured
    gateway and the route towards it, else the next hop of the route that
    internet traffic takes (through [net] bind_interface when set).
    """
    portmap = config.portmap
    if not portmap.gateway and not portmap.autodiscover_gateway:
        return fail(
            ConfigError(
                "[portmap] autodiscover_gateway is off and no gateway is set; "
                + PROTON_HINT
            )
        )
    if portmap.gateway and portmap.bind_address:
        # Both ends given: nothing to discover.
        return succeed(
            GatewayPath(
                portmap.gateway,
                portmap.bind_address,
                config.net.bind_interface,
                f"{portmap.gateway} from {portmap.bind_address} (configured)",
            )
        )
    if sys.platform == "darwin":
        target = portmap.gateway or "default"
        d = getProcessOutput("/sbin/route", ["-n", "get", target], reactor=reactor)
        return d.addCallback(
            lambda out: pathFromDarwinRoute(
                parseRouteGet(out.decode("utf-8", "replace")), target, config
            )
        )
    if not sys.platform.startswith("linux"):
        if portmap.gateway:
            route = f"{portmap.gateway} (configured)"
            return succeed(GatewayPath(portmap.gateway, "", "", route))
        return fail(
            SourceUnavailable(f"gateway discovery knows Linux and macOS; {PROTON_HINT}")
        )
    try:
        return succeed(_linuxPath(config))
    except (ConfigError, SourceError, SourceUnavailable) as e:
        return fail(e)
