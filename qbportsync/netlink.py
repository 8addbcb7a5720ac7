"""
Linux's routing netlink (NETLINK_ROUTE): which route a packet to a
destination would take, asked as C{ip route get} asks (RTM_GETROUTE, policy
rules included, nothing sent), and the link, address and route changes the
kernel announces.

The codec is pure: bytes in, records out, one L{ParseError} for anything
malformed.  L{NetlinkDecoder} keeps the one piece of state the stream needs
(interface index to name) and L{lookupRoute} is the only function here that
talks to the kernel; the reader itself is L{qbportsync.netevents}.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Mapping
from ipaddress import ip_address

from attrs import frozen

from qbportsync.interfaces import NetworkChange

NETLINK_ROUTE = 0

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
EVENT_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV6_ROUTE
)
"""Links, addresses and routes, IPv4 and IPv6."""

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

IFLA_IFNAME = 3
IFA_LABEL = 3
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15
RTM_F_CLONED = 0x200
RTM_F_LOOKUP_TABLE = 0x1000
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
RTN_LOCAL = 2
IFF_UP = 0x1
_NLA_TYPE_MASK = 0x3FFF

_HEADER = struct.Struct("=IHHII")
_ATTRIBUTE = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_ERROR = struct.Struct("=i")
_TABLE_NAMES = {RT_TABLE_MAIN: "main", RT_TABLE_LOCAL: "local", 253: "default"}


class ParseError(ValueError):
    """A netlink message that is not what its header says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RouteError(OSError):
    """The kernel has no usable route to the destination."""


@frozen
class Message:
    """One netlink message: its header fields and the bytes after the header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


@frozen
class RouteAnswer:
    """The kernel's answer to "how would a packet to this destination go"."""

    destination: str
    table: int
    interfaceIndex: int
    gateway: str
    """The next hop; empty for a point-to-point or on-link route (WireGuard)."""
    source: str
    """The preferred source address (prefsrc); empty when the kernel names none."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def parseMessages(datagram: bytes) -> list[Message]:
    """Split one datagram from a netlink socket into its messages."""
    messages = []
    offset = 0
    while offset < len(datagram):
        if len(datagram) - offset < _HEADER.size:
            raise ParseError("truncated header")
        length, kind, flags, seq, pid = _HEADER.unpack_from(datagram, offset)
        if length < _HEADER.size or offset + length > len(datagram):
            raise ParseError("bad message length")
        payload = datagram[offset + _HEADER.size : offset + length]
        messages.append(Message(kind, flags, seq, pid, payload))
        offset += _align(length)
    return messages


def parseAttributes(data: bytes) -> dict[int, bytes]:
    """The route attributes (type to value) that follow a fixed message part."""
    attributes = {}
    offset = 0
    while len(data) - offset >= _ATTRIBUTE.size:
        length, kind = _ATTRIBUTE.unpack_from(data, offset)
        if length < _ATTRIBUTE.size or offset + length > len(data):
            raise ParseError("bad attribute length")
        attributes[kind & _NLA_TYPE_MASK] = data[
            offset + _ATTRIBUTE.size : offset + length
        ]
        offset += _align(length)
    return attributes


def _string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def _unpack(
    layout: struct.Struct, payload: bytes
) -> tuple[tuple[int, ...], dict[int, bytes]]:
    if len(payload) < layout.size:
        raise ParseError("truncated body")
    return layout.unpack_from(payload), parseAttributes(payload[layout.size :])


def _uint32(value: bytes) -> int:
    if len(value) != 4:
        raise ParseError("bad integer attribute")
    number: int = struct.unpack("=I", value)[0]
    return number


def _address(value: bytes) -> str:
    if len(value) not in (4, 16):
        raise ParseError("bad address attribute")
    return str(ip_address(value))


def linkName(message: Message) -> tuple[int, str] | None:
    """The (index, name) pair a link message carries, else None."""
    if message.type not in (RTM_NEWLINK, RTM_DELLINK):
        return None
    (_, _, index, _, _), attributes = _unpack(_IFINFOMSG, message.payload)
    name = attributes.get(IFLA_IFNAME)
    return None if name is None else (index, _string(name))


def parseChange(message: Message, names: Mapping[int, str]) -> NetworkChange | None:
    """
    The change one announcement stands for, or None for messages that are
    not changes (and for the kernel's local-table and cached routes, which
    only repeat address changes).  A link counts as present while it is up.
    """
    kind = message.type
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        (_, _, index, flags, _), attributes = _unpack(_IFINFOMSG, message.payload)
        name = attributes.get(IFLA_IFNAME)
        interface = _string(name) if name is not None else names.get(index, "")
        present = kind == RTM_NEWLINK and bool(flags & IFF_UP)
        return NetworkChange("link", interface, present)
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        (_, _, _, _, index), attributes = _unpack(_IFADDRMSG, message.payload)
        label = attributes.get(IFA_LABEL)
        interface = _string(label) if label is not None else names.get(index, "")
        return NetworkChange("address", interface, kind == RTM_NEWADDR)
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        fields, attributes = _unpack(_RTMSG, message.payload)
        table = _uint32(attributes[RTA_TABLE]) if RTA_TABLE in attributes else fields[4]
        if table == RT_TABLE_LOCAL or fields[8] & RTM_F_CLONED:
            return None
        oif = attributes.get(RTA_OIF)
        interface = names.get(_uint32(oif), "") if oif is not None else ""
        return NetworkChange("route", interface, kind == RTM_NEWROUTE)
    return None


def encodeRouteRequest(destination: str, seq: int, interfaceIndex: int = 0) -> bytes:
    """
    RTM_GETROUTE for C{destination}: the route a packet to it would take,
    through interface C{interfaceIndex} when not 0 (C{ip route get ... oif}).
    """
    address = ip_address(destination)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    packed = address.packed
    attributes = _attribute(RTA_DST, packed)
    if interfaceIndex:
        attributes += _attribute(RTA_OIF, struct.pack("=I", interfaceIndex))
    body = (
        _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, RTM_F_LOOKUP_TABLE)
        + attributes
    )
    return (
        _HEADER.pack(_HEADER.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0)
        + body
    )


def encodeLinkDump(seq: int) -> bytes:
    """RTM_GETLINK for every link: the names behind interface indexes."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return (
        _HEADER.pack(
            _HEADER.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
        )
        + body
    )


def _attribute(kind: int, value: bytes) -> bytes:
    length = _ATTRIBUTE.size + len(value)
    return _ATTRIBUTE.pack(length, kind) + value + b"\0" * (_align(length) - length)


def parseError(message: Message) -> int:
    """The errno of an NLMSG_ERROR message (0 for an acknowledgement)."""
    if len(message.payload) < _ERROR.size:
        raise ParseError("truncated error")
    code: int = _ERROR.unpack_from(message.payload)[0]
    return -code


def parseRouteAnswer(message: Message) -> RouteAnswer:
    """The route in the kernel's RTM_NEWROUTE answer to an RTM_GETROUTE."""
    if message.type != RTM_NEWROUTE:
        raise ParseError("not a route")
    fields, attributes = _unpack(_RTMSG, message.payload)
    if fields[7] not in (RTN_UNICAST, RTN_LOCAL):
        raise ParseError(f"route of type {fields[7]}")
    table = _uint32(attributes[RTA_TABLE]) if RTA_TABLE in attributes else fields[4]
    oif = attributes.get(RTA_OIF)
    gateway = attributes.get(RTA_GATEWAY)
    source = attributes.get(RTA_PREFSRC)
    destination = attributes.get(RTA_DST)
    return RouteAnswer(
        destination=_address(destination) if destination is not None else "",
        table=table,
        interfaceIndex=_uint32(oif) if oif is not None else 0,
        gateway=_address(gateway) if gateway is not None else "",
        source=_address(source) if source is not None else "",
    )


def tableName(table: int) -> str:
    """A routing table as C{ip route} names it: "main", "local" or its number."""
    return _TABLE_NAMES.get(table, str(table))


def openRouteSocket(groups: int = 0) -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket subscribed to C{groups}."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    )
    try:
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def lookupRoute(destination: str, interface: str = "") -> RouteAnswer:
    """
    Ask the kernel which route a packet to C{destination} would take (through
    C{interface} when given), with every policy rule applied as for this
    process's own packets.  Nothing is sent to C{destination}.  The kernel
    answers within the request's send, so this never waits.  Raises
    L{RouteError} when there is no route.
    """
    try:
        index = socket.if_nametoindex(interface) if interface else 0
    except OSError:
        raise RouteError(errno.ENODEV, f"there is no interface {interface!r}") from None
    with openRouteSocket() as sock:
        sock.send(encodeRouteRequest(destination, 1, index))
        try:
            datagram = sock.recv(65536)
        except BlockingIOError:
            raise RouteError(errno.ETIMEDOUT, "the kernel did not answer") from None
    return routeFromAnswer(datagram)


def routeFromAnswer(datagram: bytes) -> RouteAnswer:
    """
    The route in the kernel's answer to an RTM_GETROUTE; L{RouteError} when
    the kernel refused (no route: ENETUNREACH) or the answer is unreadable.
    """
    try:
        for message in parseMessages(datagram):
            if message.type == NLMSG_ERROR:
                code = parseError(message)
                raise RouteError(code, os.strerror(code))
            if message.type == RTM_NEWROUTE:
                return parseRouteAnswer(message)
    except ParseError as e:
        raise RouteError(errno.EPROTO, f"unreadable answer: {e.reason}") from e
    raise RouteError(errno.EPROTO, "the kernel's answer held no route")


class NetlinkDecoder:
    """
    Turns the datagrams of an event socket into changes, keeping the
    interface names that route and IPv6 address messages only give by index.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self._dumpSeq = 0
        self._pid = 0

    def open(self) -> socket.socket:
        """Subscribe to link, address and route changes; ask for every link's name."""
        sock = openRouteSocket(EVENT_GROUPS)
        try:
            self.attach(sock)
        except OSError:
            sock.close()
            raise
        return sock

    def attach(self, sock: socket.socket) -> None:
        """Read C{sock} from now on, first asking it for every link's name."""
        self._pid = sock.getsockname()[0]
        self.requestNames(sock)

    def requestNames(self, sock: socket.socket) -> None:
        """Ask for every link (after an overrun too): the answers refresh names."""
        self._dumpSeq += 1
        sock.send(encodeLinkDump(self._dumpSeq))

    def decode(self, datagram: bytes) -> list[NetworkChange]:
        """The changes in one datagram; L{ParseError} when it is malformed."""
        changes = []
        for message in parseMessages(datagram):
            named = linkName(message)
            if message.pid == self._pid and message.seq == self._dumpSeq:
                # The answer to our own dump: names, not changes.
                if named is not None:
                    self.names[named[0]] = named[1]
                continue
            change = parseChange(message, self.names)
            if named is not None:
                if message.type == RTM_DELLINK:
                    self.names.pop(named[0], None)
                else:
                    self.names[named[0]] = named[1]
            if change is not None:
                changes.append(change)
        return changes
