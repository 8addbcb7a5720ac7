"""
Where to send port-mapping requests, and from which local address.

The gateway comes from C{[portmap] gateway}, else from the routing table:
/proc/net/route on Linux, C{route -n get default} on macOS.  The parsers are
pure functions; only the small C{resolve*} functions touch the system.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
from ipaddress import IPv4Address

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.utils import getProcessOutput

from qbportsync.config import Config, ConfigError
from qbportsync.interfaces import SourceError

PROC_NET_ROUTE = "/proc/net/route"
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2
_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}
_IFNAMSIZ = 16

PROTON_HINT = 'set [portmap] gateway, e.g. gateway = "10.2.0.1" for ProtonVPN'


@frozen
class Route:
    """One IPv4 route of the main table."""

    interface: str
    destination: str
    gateway: str
    """Empty when the route has no next hop (point-to-point or on-link)."""
    prefixLength: int
    metric: int


def _procAddress(field: str) -> str:
    # The kernel prints the network-order address as a native-endian integer.
    return str(IPv4Address(int(field, 16).to_bytes(4, sys.byteorder)))


def parseProcNetRoute(text: str) -> list[Route]:
    """The usable routes (flag RTF_UP) in the text of /proc/net/route."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            flags = int(fields[3], 16)
            mask = IPv4Address(_procAddress(fields[7]))
            route = Route(
                interface=fields[0],
                destination=_procAddress(fields[1]),
                gateway=_procAddress(fields[2]) if flags & _RTF_GATEWAY else "",
                prefixLength=bin(int(mask)).count("1"),
                metric=int(fields[6]),
            )
        except ValueError:
            continue
        if flags & _RTF_UP:
            routes.append(route)
    return routes


def gatewayFromRoutes(routes: list[Route], interface: str = "") -> str:
    """
    The next hop of the default route, or with C{interface} of the widest
    route through that interface (OpenVPN replaces the default with 0/1 and
    128/1).  Raises L{ConfigError} naming the fix when there is none.
    """
    if interface:
        candidates = [r for r in routes if r.interface == interface]
        if not candidates:
            raise ConfigError(
                f"no route goes through [net] bind_interface {interface!r}, so "
                f"the VPN gateway cannot be discovered; is the VPN up? Or {PROTON_HINT}"
            )
        via = [r for r in candidates if r.gateway]
        if not via:
            raise ConfigError(
                f"the routes through {interface!r} have no gateway (a "
                f"point-to-point link such as WireGuard); {PROTON_HINT}"
            )
        best = min(via, key=lambda r: (r.prefixLength, r.metric))
        return best.gateway
    defaults = [r for r in routes if r.prefixLength <= 1]
    if not defaults:
        raise ConfigError(
            f"there is no default route to find a gateway on; {PROTON_HINT}"
        )
    # The most specific wins: OpenVPN's 0/1 + 128/1 over the LAN's 0/0.
    best = min(defaults, key=lambda r: (-r.prefixLength, r.metric))
    if not best.gateway:
        raise ConfigError(
            f"the default route goes straight out of {best.interface!r} with no "
            f"gateway (WireGuard is point-to-point); {PROTON_HINT}"
        )
    return best.gateway


@frozen
class DarwinRoute:
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


def resolveGateway(reactor: object, config: Config) -> Deferred[str]:
    """The gateway to ask: configured, or discovered from the routing table."""
    portmap = config.portmap
    if portmap.gateway:
        return succeed(portmap.gateway)
    if not portmap.autodiscover_gateway:
        return fail(
            ConfigError(
                "[portmap] autodiscover_gateway is off and no gateway is set; "
                + PROTON_HINT
            )
        )
    interface = config.net.bind_interface
    if sys.platform == "darwin":
        d = getProcessOutput("/sbin/route", ["-n", "get", "default"], reactor=reactor)
        return d.addCallback(
            lambda out: gatewayFromDarwinRoute(
                parseRouteGet(out.decode("utf-8", "replace")), interface
            )
        )
    try:
        with open(PROC_NET_ROUTE, encoding="ascii") as f:
            routes = parseProcNetRoute(f.read())
        return succeed(gatewayFromRoutes(routes, interface))
    except (OSError, ConfigError) as e:
        return fail(e)


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


def resolveBindAddress(config: Config) -> str:
    """Local address for the mapping socket: configured, the VPN's, or any."""
    if config.portmap.bind_address:
        return config.portmap.bind_address
    if config.net.bind_interface:
        return interfaceAddress(config.net.bind_interface)
    return ""
