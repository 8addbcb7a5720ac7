"""
macOS's routing socket (PF_ROUTE): the kernel's announcements of interface,
address and route changes, read as L{NetworkChange}s.  Each datagram holds
one message whose header says its kind and interface index
(C{<net/route.h>}, C{<net/if.h>}).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

from qbportsync.interfaces import NetworkChange

RTM_VERSION = 5
RTM_ADD = 0x1
RTM_DELETE = 0x2
RTM_CHANGE = 0x3
RTM_NEWADDR = 0xC
RTM_DELADDR = 0xD
RTM_IFINFO = 0xE
IFF_UP = 0x1
RTF_LLINFO = 0x400
RTF_WASCLONED = 0x20000

_COMMON = struct.Struct("=HBB")
_IF_MSGHDR = struct.Struct("=HBBiiH")
"""if_msghdr and ifa_msghdr start alike: length, version, type, addrs, flags, index."""
_RT_MSGHDR = struct.Struct("=HBBHxxi")
"""rt_msghdr: length, version, type, index, flags."""

_ROUTES = {RTM_ADD: True, RTM_CHANGE: True, RTM_DELETE: False}
_ADDRESSES = {RTM_NEWADDR: True, RTM_DELADDR: False}


def parseRoutingMessage(
    datagram: bytes, name: Callable[[int], str]
) -> NetworkChange | None:
    """
    The change one routing-socket message stands for, or None for the
    messages that are not changes (lookups, misses, ARP and cloned entries).
    C{name} maps an interface index to its name.  Raises ValueError when the
    message is malformed.
    """
    if len(datagram) < _IF_MSGHDR.size:
        raise ValueError("truncated routing message")
    length, version, kind = _COMMON.unpack_from(datagram)
    if version != RTM_VERSION or length > len(datagram):
        raise ValueError(f"routing message version {version}, length {length}")
    if kind == RTM_IFINFO:
        _, _, _, _, flags, index = _IF_MSGHDR.unpack_from(datagram)
        return NetworkChange("link", name(index), bool(flags & IFF_UP))
    if kind in _ADDRESSES:
        index = _IF_MSGHDR.unpack_from(datagram)[5]
        return NetworkChange("address", name(index), _ADDRESSES[kind])
    if kind in _ROUTES:
        _, _, _, index, flags = _RT_MSGHDR.unpack_from(datagram)
        if flags & (RTF_LLINFO | RTF_WASCLONED):
            return None
        return NetworkChange("route", name(index) if index else "", _ROUTES[kind])
    return None


class RoutingSocketDecoder:
    """Reads the routing socket, naming interfaces while they still exist."""

    def __init__(
        self, indexToName: Callable[[int], str] = socket.if_indextoname
    ) -> None:
        self._indexToName = indexToName
        self.names: dict[int, str] = {}

    def open(self) -> socket.socket:
        """A non-blocking routing socket: it hears every change, no subscription."""
        sock = socket.socket(socket.AF_ROUTE, socket.SOCK_RAW, socket.AF_UNSPEC)
        sock.setblocking(False)
        return sock

    def requestNames(self, sock: socket.socket) -> None:
        """Names are looked up as messages come: nothing to refresh."""

    def _name(self, index: int) -> str:
        with contextlib.suppress(OSError):
            self.names[index] = self._indexToName(index)
        return self.names.get(index, "")

    def decode(self, datagram: bytes) -> list[NetworkChange]:
        """The change in one datagram, if it is one."""
        change = parseRoutingMessage(datagram, self._name)
        return [] if change is None else [change]
