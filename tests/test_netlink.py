"""
Network changes: the netlink and routing-socket codecs, the reader in the
reactor, the route lookup, and the real kernel in a namespace of our own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qbportsync.interfaces import INetworkEvents, NetworkChange
from qbportsync.netevents import SOMETHING_CHANGED, KernelEvents, networkEvents
from qbportsync.netlink import (
    IFA_LABEL,
    IFF_UP,
    IFLA_IFNAME,
    NLM_F_DUMP,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_PREFSRC,
    RTA_TABLE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_F_CLONED,
    RTM_F_LOOKUP_TABLE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    Message,
    NetlinkDecoder,
    ParseError,
    RouteAnswer,
    RouteError,
    encodeRouteRequest,
    lookupRoute,
    parseAttributes,
    parseChange,
    parseError,
    parseMessages,
    parseRouteAnswer,
    routeFromAnswer,
    tableName,
)
from qbportsync.routesocket import (
    RTF_LLINFO,
    RTM_ADD,
    RTM_CHANGE,
    RTM_DELETE,
    RTM_IFINFO,
    RoutingSocketDecoder,
    parseRoutingMessage,
)
from qbportsync.routesocket import RTM_DELADDR as DARWIN_DELADDR
from qbportsync.routesocket import RTM_NEWADDR as DARWIN_NEWADDR
from tests.fakes import FakeNetworkEvents
from tests.rig import requireRoot, requireTool, stopProcess

OUR_PID = 4242
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def message(
    kind: int, body: bytes, seq: int = 0, pid: int = 0, flags: int = 0
) -> bytes:
    length = 16 + len(body)
    return (
        struct.pack("=IHHII", length, kind, flags, seq, pid)
        + body
        + b"\0" * (-length % 4)
    )


def link(
    kind: int, index: int, name: str | None, up: bool = True, **header: int
) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, IFF_UP if up else 0, 0)
    if name is not None:
        body += attribute(IFLA_IFNAME, name.encode() + b"\0")
    return message(kind, body, **header)


def address(kind: int, index: int, label: str | None = None) -> bytes:
    body = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, index)
    body += attribute(2, bytes([10, 2, 0, 2]))
    if label is not None:
        body += attribute(IFA_LABEL, label.encode() + b"\0")
    return message(kind, body)


def route(
    kind: int,
    oif: int | None,
    table: int = 254,
    flags: int = 0,
    tableAttribute: int | None = None,
    routeType: int = 1,
    extra: bytes = b"",
) -> bytes:
    body = struct.pack(
        "=BBBBBBBBI", socket.AF_INET, 0, 0, 0, table, 4, 0, routeType, flags
    )
    if oif is not None:
        body += attribute(RTA_OIF, struct.pack("=I", oif))
    if tableAttribute is not None:
        body += attribute(RTA_TABLE, struct.pack("=I", tableAttribute))
    return message(kind, body + extra)


def parsed(datagram: bytes) -> Message:
    [one] = parseMessages(datagram)
    return one


class MessageTests(SynchronousTestCase):
    """parseMessages and parseAttributes: the framing."""

    def test_twoMessages(self) -> None:
        """Messages follow each other at 4-byte boundaries."""
        first = link(RTM_NEWLINK, 3, "wg0")
        second = message(NLMSG_DONE, b"\0\0\0\0", seq=7, pid=9)
        messages = parseMessages(first + second)
        self.assertEqual(
            [(m.type, m.seq, m.pid) for m in messages],
            [(RTM_NEWLINK, 0, 0), (NLMSG_DONE, 7, 9)],
        )
        self.assertEqual(messages[1].payload, b"\0\0\0\0")

    def test_truncated(self) -> None:
        """A header shorter than 16 bytes or a length past the end is malformed."""
        whole = link(RTM_NEWLINK, 3, "wg0")
        self.assertRaises(ParseError, parseMessages, whole[:10])
        self.assertRaises(ParseError, parseMessages, whole[:-4])
        tiny = struct.pack("=IHHII", 8, RTM_NEWLINK, 0, 0, 0)
        self.assertRaises(ParseError, parseMessages, tiny)

    def test_attributes(self) -> None:
        """Attributes are keyed by type, padded, with nested flags masked off."""
        data = attribute(IFLA_IFNAME, b"eth0\0") + attribute(0x8000 | 7, b"xy")
        self.assertEqual(parseAttributes(data), {IFLA_IFNAME: b"eth0\0", 7: b"xy"})
        self.assertRaises(ParseError, parseAttributes, struct.pack("=HH", 40, 1))


class ChangeTests(SynchronousTestCase):
    """parseChange: which NetworkChange a kernel announcement stands for."""

    names = {3: "wg0", 2: "eth0"}

    def change(self, datagram: bytes) -> NetworkChange | None:
        return parseChange(parsed(datagram), self.names)

    def test_links(self) -> None:
        """A link is present while up; down or deleted, it is gone."""
        self.assertEqual(
            self.change(link(RTM_NEWLINK, 9, "tun0")),
            NetworkChange("link", "tun0", True),
        )
        self.assertEqual(
            self.change(link(RTM_NEWLINK, 9, "tun0", up=False)),
            NetworkChange("link", "tun0", False),
        )
        self.assertEqual(
            self.change(link(RTM_DELLINK, 3, None)), NetworkChange("link", "wg0", False)
        )

    def test_addresses(self) -> None:
        """Addresses are named by label, else by index (IPv6 has no label)."""
        self.assertEqual(
            self.change(address(RTM_NEWADDR, 3, "wg0")),
            NetworkChange("address", "wg0", True),
        )
        self.assertEqual(
            self.change(address(RTM_DELADDR, 2)),
            NetworkChange("address", "eth0", False),
        )
        self.assertEqual(
            self.change(address(RTM_DELADDR, 77)), NetworkChange("address", "", False)
        )

    def test_routes(self) -> None:
        """Routes are named by their output interface; none leaves the name empty."""
        self.assertEqual(
            self.change(route(RTM_NEWROUTE, 3, table=0, tableAttribute=51820)),
            NetworkChange("route", "wg0", True),
        )
        self.assertEqual(
            self.change(route(RTM_DELROUTE, None)), NetworkChange("route", "", False)
        )

    def test_ignored(self) -> None:
        """Local-table and cached routes and other messages are no change."""
        self.assertIsNone(self.change(route(RTM_NEWROUTE, 3, table=255)))
        self.assertIsNone(self.change(route(RTM_NEWROUTE, 3, flags=RTM_F_CLONED)))
        self.assertIsNone(self.change(message(NLMSG_DONE, b"\0" * 4)))

    def test_shortBody(self) -> None:
        """A body shorter than its fixed part is malformed."""
        self.assertRaises(ParseError, self.change, message(RTM_NEWADDR, b"\0" * 4))
        bad = route(RTM_NEWROUTE, None, extra=attribute(RTA_OIF, b"\0\0"))
        self.assertRaises(ParseError, self.change, bad)


class RouteCodecTests(SynchronousTestCase):
    """The RTM_GETROUTE request and its answer."""

    def test_request(self) -> None:
        """The request asks for one IPv4 destination, the table used, and an oif."""
        [request] = parseMessages(encodeRouteRequest("1.1.1.1", 5, interfaceIndex=3))
        self.assertEqual((request.type, request.seq), (RTM_GETROUTE, 5))
        family, dstLen, *_, flags = struct.unpack_from("=BBBBBBBBI", request.payload)
        self.assertEqual(
            (family, dstLen, flags), (socket.AF_INET, 32, RTM_F_LOOKUP_TABLE)
        )
        self.assertEqual(
            parseAttributes(request.payload[12:]),
            {RTA_DST: bytes([1, 1, 1, 1]), RTA_OIF: struct.pack("=I", 3)},
        )

    def test_requestIPv6(self) -> None:
        """An IPv6 destination asks with AF_INET6 and a /128."""
        [request] = parseMessages(encodeRouteRequest("2001:db8::1", 1))
        family, dstLen = struct.unpack_from("=BB", request.payload)
        self.assertEqual((family, dstLen), (socket.AF_INET6, 128))
        self.assertNotIn(RTA_OIF, parseAttributes(request.payload[12:]))

    def test_answer(self) -> None:
        """Gateway, preferred source, table and interface are read back."""
        extra = (
            attribute(RTA_DST, bytes([1, 1, 1, 1]))
            + attribute(RTA_GATEWAY, bytes([198, 51, 100, 1]))
            + attribute(RTA_PREFSRC, bytes([198, 51, 100, 2]))
        )
        answer = parseRouteAnswer(
            parsed(route(RTM_NEWROUTE, 2, table=254, tableAttribute=51820, extra=extra))
        )
        self.assertEqual(
            answer, RouteAnswer("1.1.1.1", 51820, 2, "198.51.100.1", "198.51.100.2")
        )

    def test_answerWithoutGateway(self) -> None:
        """A point-to-point route has no gateway; without RTA_TABLE the byte says."""
        answer = parseRouteAnswer(parsed(route(RTM_NEWROUTE, 3, table=254)))
        self.assertEqual(answer, RouteAnswer("", 254, 3, "", ""))

    def test_answerNotUnicast(self) -> None:
        """A blackhole or unreachable route, or another message, is no answer."""
        self.assertRaises(
            ParseError, parseRouteAnswer, parsed(route(RTM_NEWROUTE, 3, routeType=6))
        )
        self.assertRaises(
            ParseError, parseRouteAnswer, parsed(link(RTM_NEWLINK, 1, "lo"))
        )

    def test_error(self) -> None:
        """NLMSG_ERROR carries a negative errno; too short is malformed."""
        error = parsed(message(NLMSG_ERROR, struct.pack("=i", -errno.ENETUNREACH)))
        self.assertEqual(parseError(error), errno.ENETUNREACH)
        self.assertRaises(ParseError, parseError, parsed(message(NLMSG_ERROR, b"")))

    def test_routeFromAnswer(self) -> None:
        """The kernel's refusal, an unreadable answer or none are RouteErrors."""
        answer = route(
            RTM_NEWROUTE, 3, extra=attribute(RTA_PREFSRC, b"\x0a\x02\x00\x02")
        )
        self.assertEqual(
            routeFromAnswer(answer), RouteAnswer("", 254, 3, "", "10.2.0.2")
        )
        refusal = message(NLMSG_ERROR, struct.pack("=i", -errno.ENETUNREACH))
        error = self.assertRaises(RouteError, routeFromAnswer, refusal)
        self.assertEqual(error.errno, errno.ENETUNREACH)
        for unreadable in (b"\x01\x02", message(NLMSG_DONE, b"\0" * 4)):
            error = self.assertRaises(RouteError, routeFromAnswer, unreadable)
            self.assertEqual(error.errno, errno.EPROTO)

    def test_tableNames(self) -> None:
        """Tables are named as ip route names them."""
        self.assertEqual(
            [tableName(t) for t in (254, 255, 253, 51820)],
            ["main", "local", "default", "51820"],
        )

    def test_lookupLoopback(self) -> None:
        """The real kernel routes 127.0.0.1 through lo, from 127.0.0.1."""
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        answer = lookupRoute("127.0.0.1")
        # No table asserted: without custom rules the kernel merges local into main.
        self.assertEqual(
            (answer.destination, answer.gateway, answer.source),
            ("127.0.0.1", "", "127.0.0.1"),
        )
        self.assertEqual(socket.if_indextoname(answer.interfaceIndex), "lo")
        self.assertEqual(lookupRoute("127.0.0.1", "lo"), answer)

    def test_lookupNoInterface(self) -> None:
        """Asking through an interface that does not exist is a RouteError naming it."""
        error = self.assertRaises(RouteError, lookupRoute, "127.0.0.1", "nosuchif0")
        self.assertIn("nosuchif0", str(error))


class NetlinkDecoderTests(SynchronousTestCase):
    """NetlinkDecoder: names learned from the dump and from link changes."""

    def decoder(self) -> NetlinkDecoder:
        decoder = NetlinkDecoder()
        sock = FakeSocket(pid=OUR_PID)
        decoder.attach(sock)
        return decoder

    def test_dumpAnswerIsNames(self) -> None:
        """The answer to our own link dump names interfaces and is no change."""
        decoder = self.decoder()
        answer = link(RTM_NEWLINK, 3, "wg0", seq=1, pid=OUR_PID) + message(
            NLMSG_DONE, b"\0" * 4, seq=1, pid=OUR_PID
        )
        self.assertEqual(decoder.decode(answer), [])
        self.assertEqual(
            decoder.decode(route(RTM_NEWROUTE, 3)),
            [NetworkChange("route", "wg0", True)],
        )

    def test_linkChangesKeepNames(self) -> None:
        """A new link is named from then on; a deleted one is forgotten after."""
        decoder = self.decoder()
        self.assertEqual(
            decoder.decode(link(RTM_NEWLINK, 5, "tun0")),
            [NetworkChange("link", "tun0", True)],
        )
        self.assertEqual(
            decoder.decode(address(RTM_NEWADDR, 5)),
            [NetworkChange("address", "tun0", True)],
        )
        self.assertEqual(
            decoder.decode(link(RTM_DELLINK, 5, "tun0")),
            [NetworkChange("link", "tun0", False)],
        )
        self.assertEqual(
            decoder.decode(address(RTM_DELADDR, 5)),
            [NetworkChange("address", "", False)],
        )

    def test_dumpRequest(self) -> None:
        """Attaching asks for every link, with a fresh sequence number each time."""
        decoder = NetlinkDecoder()
        sock = FakeSocket(pid=OUR_PID)
        decoder.attach(sock)
        decoder.requestNames(sock)
        requests = [parsed(datagram) for datagram in sock.sent]
        self.assertEqual(
            [(r.type, r.flags & NLM_F_DUMP, r.seq) for r in requests],
            [(RTM_GETLINK, NLM_F_DUMP, 1), (RTM_GETLINK, NLM_F_DUMP, 2)],
        )

    @given(st.binary(max_size=200))
    def test_garbage(self, datagram: bytes) -> None:
        """Any bytes decode to changes or raise ParseError, nothing else."""
        try:
            changes = NetlinkDecoder().decode(datagram)
        except ParseError:
            return
        self.assertTrue(all(isinstance(c, NetworkChange) for c in changes))

    @given(
        st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4), st.binary(max_size=64)
    )
    def test_garbageBodies(self, types: list[int], body: bytes) -> None:
        """Well-framed messages with any type and body never raise beyond ParseError."""
        datagram = b"".join(message(t % 32, body) for t in types)
        with contextlib.suppress(ParseError):
            NetlinkDecoder().decode(datagram)


def darwinIf(kind: int, index: int, flags: int = 0) -> bytes:
    body = struct.pack("=HBBiiH", 0, 5, kind, 0, flags, index) + b"\0" * 100
    return struct.pack("=H", len(body)) + body[2:]


def darwinRoute(kind: int, index: int, flags: int = 0) -> bytes:
    body = struct.pack("=HBBHxxi", 0, 5, kind, index, flags) + b"\0" * 80
    return struct.pack("=H", len(body)) + body[2:]


class RoutingSocketTests(SynchronousTestCase):
    """macOS: routing-socket messages, parsed from crafted bytes."""

    def name(self, index: int) -> str:
        return {4: "en0", 9: "utun4"}.get(index, "")

    def test_interface(self) -> None:
        """RTM_IFINFO is a link change, present while IFF_UP."""
        self.assertEqual(
            parseRoutingMessage(darwinIf(RTM_IFINFO, 9, flags=1), self.name),
            NetworkChange("link", "utun4", True),
        )
        self.assertEqual(
            parseRoutingMessage(darwinIf(RTM_IFINFO, 9), self.name),
            NetworkChange("link", "utun4", False),
        )

    def test_addresses(self) -> None:
        """RTM_NEWADDR and RTM_DELADDR are address changes."""
        self.assertEqual(
            [
                parseRoutingMessage(darwinIf(kind, 4), self.name)
                for kind in (DARWIN_NEWADDR, DARWIN_DELADDR)
            ],
            [
                NetworkChange("address", "en0", True),
                NetworkChange("address", "en0", False),
            ],
        )

    def test_routes(self) -> None:
        """Added, changed and deleted routes are route changes; ARP entries are not."""
        self.assertEqual(
            [
                parseRoutingMessage(darwinRoute(kind, 9), self.name)
                for kind in (RTM_ADD, RTM_CHANGE, RTM_DELETE)
            ],
            [
                NetworkChange("route", "utun4", True),
                NetworkChange("route", "utun4", True),
                NetworkChange("route", "utun4", False),
            ],
        )
        self.assertIsNone(
            parseRoutingMessage(darwinRoute(RTM_ADD, 4, flags=RTF_LLINFO), self.name)
        )
        self.assertIsNone(parseRoutingMessage(darwinRoute(0x4, 4), self.name))

    def test_malformed(self) -> None:
        """Short messages, other versions and lengths past the end are malformed."""
        good = darwinIf(RTM_IFINFO, 9)
        self.assertRaises(ValueError, parseRoutingMessage, good[:8], self.name)
        self.assertRaises(ValueError, parseRoutingMessage, good[:20], self.name)
        other = good[:2] + b"\x04" + good[3:]
        self.assertRaises(ValueError, parseRoutingMessage, other, self.name)

    def test_decoderKeepsNames(self) -> None:
        """An interface that vanished keeps the name it had while it existed."""
        names = {9: "utun4"}

        def indexToName(index: int) -> str:
            if index not in names:
                raise OSError(errno.ENXIO, "no such interface")
            return names[index]

        decoder = RoutingSocketDecoder(indexToName)
        self.assertEqual(
            decoder.decode(darwinIf(DARWIN_NEWADDR, 9)),
            [NetworkChange("address", "utun4", True)],
        )
        del names[9]
        self.assertEqual(
            decoder.decode(darwinIf(RTM_IFINFO, 9)),
            [NetworkChange("link", "utun4", False)],
        )
        self.assertEqual(decoder.decode(darwinRoute(0x4, 9)), [])

    @given(st.binary(max_size=200))
    def test_garbage(self, datagram: bytes) -> None:
        """Any bytes parse to a change, None, or ValueError."""
        change = None
        with contextlib.suppress(ValueError):
            change = parseRoutingMessage(datagram, self.name)
        self.assertIsInstance(change, (NetworkChange, type(None)))


class FakeSocket:
    """A socket that hands out queued datagrams or errors, then EAGAIN."""

    def __init__(self, pid: int = OUR_PID) -> None:
        self.pid = pid
        self.incoming: list[bytes | OSError] = []
        self.sent: list[bytes] = []
        self.closed = False

    def getsockname(self) -> tuple[int, int]:
        return (self.pid, 0)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "nothing")
        item = self.incoming.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


@implementer(IReactorFDSet)
class FDReactor:
    """Records readers added and removed; the test calls doRead itself."""

    def __init__(self) -> None:
        self.readers: list[IReadDescriptor] = []

    def addReader(self, reader: IReadDescriptor) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: IReadDescriptor) -> None:
        self.readers.remove(reader)

    def addWriter(self, writer: Any) -> None:
        raise NotImplementedError()

    def removeWriter(self, writer: Any) -> None:
        raise NotImplementedError()

    def removeAll(self) -> list[Any]:
        raise NotImplementedError()

    def getReaders(self) -> list[IReadDescriptor]:
        return list(self.readers)

    def getWriters(self) -> list[Any]:
        return []


class SocketDecoder(NetlinkDecoder):
    """The netlink decoder on a socket the test gives it."""

    def __init__(self, sock: Any) -> None:
        super().__init__()
        self.sock = sock

    def open(self) -> socket.socket:
        self.attach(self.sock)
        opened: socket.socket = self.sock
        return opened


class NetlinkAddressed:
    """A real socket that gives a netlink address (port id, groups) as its name."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def getsockname(self) -> tuple[int, int]:
        return (OUR_PID, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class FailingDecoder(NetlinkDecoder):
    """A decoder whose socket cannot be opened (no netlink here)."""

    def open(self) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported")


class KernelEventsTests(SynchronousTestCase):
    """KernelEvents: the reader in the reactor, over a fake socket."""

    def setUp(self) -> None:
        self.reactor = FDReactor()
        self.sock = FakeSocket()
        self.decoder = SocketDecoder(self.sock)
        self.events = KernelEvents(self.reactor, self.decoder)
        self.seen: list[NetworkChange] = []
        self.events.subscribe(self.seen.append)
        self.events.startService()

    def test_interface(self) -> None:
        """The reader provides INetworkEvents and IReadDescriptor, as does the fake."""
        self.assertTrue(verifyObject(INetworkEvents, self.events))
        self.assertTrue(verifyObject(IReadDescriptor, self.events))
        self.assertTrue(verifyObject(INetworkEvents, FakeNetworkEvents()))

    def test_startStop(self) -> None:
        """Starting adds the reader and asks for names; stopping removes and closes."""
        self.assertEqual(self.reactor.readers, [self.events])
        self.assertEqual(self.events.fileno(), 99)
        self.assertEqual(parsed(self.sock.sent[0]).type, RTM_GETLINK)
        self.events.stopService()
        self.assertEqual((self.reactor.readers, self.sock.closed), ([], True))
        self.assertEqual(self.events.fileno(), -1)

    def test_delivers(self) -> None:
        """Every datagram queued is read in one go; identical changes are told once."""
        self.sock.incoming += [
            link(RTM_NEWLINK, 5, "wg0"),
            address(RTM_NEWADDR, 5) + address(RTM_NEWADDR, 5),
            route(RTM_NEWROUTE, 5, table=0, tableAttribute=51820),
            link(RTM_NEWLINK, 5, "wg0"),
        ]
        self.events.doRead()
        self.assertEqual(
            self.seen,
            [
                NetworkChange("link", "wg0", True),
                NetworkChange("address", "wg0", True),
                NetworkChange("route", "wg0", True),
            ],
        )
        self.assertEqual(self.sock.incoming, [])

    def test_garbageDropped(self) -> None:
        """A malformed datagram is dropped; the ones around it still count."""
        self.sock.incoming += [b"\x01\x02", link(RTM_DELLINK, 5, "wg0")]
        self.events.doRead()
        self.assertEqual(self.seen, [NetworkChange("link", "wg0", False)])

    @given(st.lists(st.binary(max_size=120), max_size=8))
    def test_anyDatagrams(self, datagrams: list[bytes]) -> None:
        """Whatever the socket gives, a read tells changes and never raises."""
        sock = FakeSocket()
        events = KernelEvents(FDReactor(), SocketDecoder(sock))
        seen: list[NetworkChange] = []
        events.subscribe(seen.append)
        events.startService()
        sock.incoming += datagrams
        events.doRead()
        self.assertTrue(all(isinstance(c, NetworkChange) for c in seen))
        self.assertEqual(sock.incoming, [])

    def test_overrun(self) -> None:
        """Lost changes (ENOBUFS): "something changed" is told, names are refreshed."""
        self.sock.incoming += [OSError(errno.ENOBUFS, "No buffer space")]
        self.events.doRead()
        self.assertEqual(self.seen, [SOMETHING_CHANGED])
        self.assertEqual(len(self.sock.sent), 2)

    def test_readError(self) -> None:
        """Another read error ends this read; the next read goes on."""
        self.sock.incoming += [OSError(errno.EIO, "I/O"), link(RTM_NEWLINK, 1, "lo")]
        self.events.doRead()
        self.assertEqual(self.seen, [])
        self.events.doRead()
        self.assertEqual(self.seen, [NetworkChange("link", "lo", True)])

    def test_boundedBatch(self) -> None:
        """One wake-up reads at most 64 datagrams; the rest wait for the next."""
        self.sock.incoming += [link(RTM_NEWLINK, i, f"if{i}") for i in range(70)]
        self.events.doRead()
        self.assertEqual((len(self.seen), len(self.sock.incoming)), (64, 6))

    def test_observerFails(self) -> None:
        """A failing observer is logged; the others are still told."""

        def broken(change: NetworkChange) -> None:
            raise RuntimeError("observer bug")

        later: list[NetworkChange] = []
        self.events.subscribe(broken)
        self.events.subscribe(later.append)
        self.sock.incoming.append(link(RTM_NEWLINK, 1, "lo"))
        self.events.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(later, [NetworkChange("link", "lo", True)])

    def test_unsubscribe(self) -> None:
        """After unsubscribing, an observer hears nothing more."""
        later: list[NetworkChange] = []
        unsubscribe = self.events.subscribe(later.append)
        unsubscribe()
        unsubscribe()
        self.sock.incoming.append(link(RTM_NEWLINK, 1, "lo"))
        self.events.doRead()
        self.assertEqual((later, len(self.seen)), ([], 1))

    def test_connectionLost(self) -> None:
        """The reactor gives the socket up: a new one is read, a change is told."""
        self.decoder.sock = fresh = FakeSocket()
        self.reactor.removeReader(self.events)
        self.events.connectionLost(Failure(ConnectionLost("EPOLLERR")))
        self.assertTrue(self.sock.closed)
        self.assertEqual(self.seen, [SOMETHING_CHANGED])
        self.assertEqual(self.reactor.readers, [self.events])
        fresh.incoming.append(link(RTM_NEWLINK, 1, "lo"))
        self.events.doRead()
        self.assertEqual(
            self.seen, [SOMETHING_CHANGED, NetworkChange("link", "lo", True)]
        )

    def test_connectionLostStopped(self) -> None:
        """After the service stopped, a lost socket is just closed."""
        self.events.stopService()
        self.events.connectionLost(Failure(ConnectionLost("EPOLLERR")))
        self.assertEqual((self.seen, self.reactor.readers), ([], []))

    def test_cannotOpen(self) -> None:
        """No netlink here: one warning, no reader, stopping still works."""
        events = KernelEvents(self.reactor, FailingDecoder())
        events.startService()
        self.assertEqual(self.reactor.readers, [self.events])
        events.stopService()
        self.assertEqual(self.reactor.readers, [self.events])

    def test_platforms(self) -> None:
        """Linux and macOS have events, other platforms none."""
        self.assertIsInstance(networkEvents(self.reactor, "linux"), KernelEvents)
        self.assertIsInstance(networkEvents(self.reactor, "darwin"), KernelEvents)
        self.assertIsNone(networkEvents(self.reactor, "win32"))


class SocketPairTests(SynchronousTestCase):
    """The reader over a real datagram socket pair standing in for netlink."""

    def test_reads(self) -> None:
        """Datagrams written to the other end become changes; EAGAIN ends the read."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        decoder = SocketDecoder(NetlinkAddressed(ours))
        reactor = FDReactor()
        events = KernelEvents(reactor, decoder)
        seen: list[NetworkChange] = []
        events.subscribe(seen.append)
        events.startService()
        self.addCleanup(events.stopService)
        self.assertEqual(parsed(theirs.recv(4096)).type, RTM_GETLINK)
        theirs.send(link(RTM_NEWLINK, 7, "veth0", up=False))
        theirs.send(address(RTM_NEWADDR, 7))
        events.doRead()
        self.assertEqual(
            seen,
            [
                NetworkChange("link", "veth0", False),
                NetworkChange("address", "veth0", True),
            ],
        )


def probe() -> None:
    """
    Print one JSON line per change the real kernel announces, with the
    monotonic time it was told: run inside a test namespace by the tests below.
    """
    from twisted.internet import reactor

    events = KernelEvents(reactor, NetlinkDecoder())  # type: ignore[arg-type]

    def show(change: NetworkChange) -> None:
        line = {
            "kind": change.kind,
            "interface": change.interface,
            "present": change.present,
            "at": time.monotonic(),
        }
        print(json.dumps(line), flush=True)

    events.subscribe(show)
    events.startService()
    print(json.dumps({"ready": True}), flush=True)
    reactor.callLater(60, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


class Namespace:
    """A network namespace of our own, with only loopback to begin with."""

    def __init__(self) -> None:
        requireRoot()
        requireTool("ip")
        self.name = f"qbps-{os.getpid()}-{secrets.token_hex(3)}"
        self.ip("netns", "add", self.name, inside=False)
        self.ip("link", "set", "lo", "up")

    def ip(self, *argv: str, inside: bool = True) -> None:
        command = ["ip", *(["-n", self.name] if inside else []), *argv]
        subprocess.run(command, check=True, capture_output=True, timeout=10)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def call(self, function: Callable[[], T]) -> T:
        """
        C{function()}, run in a thread that entered the namespace (a thread
        has its own network namespace): no process to start.
        """
        results: list[T | BaseException] = []

        def inside() -> None:
            try:
                with open(f"/run/netns/{self.name}") as handle:
                    if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, os.strerror(code))
                results.append(function())
            except BaseException as e:
                results.append(e)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join(30)
        [result] = results
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        subprocess.run(
            ["ip", "netns", "delete", self.name],
            check=False,
            capture_output=True,
            timeout=10,
        )


class Probe:
    """The probe running in a namespace, its lines read with bounded waits."""

    def __init__(self, namespace: Namespace) -> None:
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            namespace.command([sys.executable, "-m", "tests.test_netlink"]),
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.next(lambda line: line.get("ready") is True, "the probe to start")

    def _line(self, deadline: float) -> dict[str, Any] | None:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def next(
        self, wanted: Callable[[dict[str, Any]], bool], what: str, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The next line that C{wanted} accepts, within C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line is None:
                raise AssertionError(f"no {what} within {timeout:g} s")
            if wanted(line):
                return line

    def stop(self) -> None:
        self._selector.close()
        stopProcess(self.process)
        assert self.process.stdout is not None
        self.process.stdout.close()


class KernelTests(TestCase):
    """The real kernel: changes in a namespace reach observers within a bounded wait."""

    def test_changes(self) -> None:
        """A veth, IPv4 and IPv6 addresses and a route, added and removed, are told."""
        if not sys.platform.startswith("linux"):
            requireTool("a Linux kernel")
        namespace = Namespace()
        self.addCleanup(namespace.close)
        probe = Probe(namespace)
        self.addCleanup(probe.stop)
        steps = [
            (
                ("link", "add", "qbva", "type", "veth", "peer", "name", "qbvb"),
                ("link", "qbva", False),
            ),
            # No IPv6 link-local address of its own: only ours below.
            (("link", "set", "qbva", "addrgenmode", "none"), None),
            (("link", "set", "qbva", "up"), ("link", "qbva", True)),
            (
                ("address", "add", "198.51.100.2/24", "dev", "qbva"),
                ("address", "qbva", True),
            ),
            (
                (
                    "route",
                    "add",
                    "203.0.113.0/24",
                    "via",
                    "198.51.100.1",
                    "dev",
                    "qbva",
                ),
                ("route", "qbva", True),
            ),
            (("route", "del", "203.0.113.0/24"), ("route", "qbva", False)),
            (
                ("address", "del", "198.51.100.2/24", "dev", "qbva"),
                ("address", "qbva", False),
            ),
            # IPv6 addresses carry no label: named by index.
            (
                ("-6", "address", "add", "2001:db8::2/64", "dev", "qbva", "nodad"),
                ("address", "qbva", True),
            ),
            (
                ("-6", "address", "del", "2001:db8::2/64", "dev", "qbva"),
                ("address", "qbva", False),
            ),
            (("link", "delete", "qbva"), ("link", "qbva", False)),
        ]
        rows = []
        for argv, expected in steps:
            before = time.monotonic()
            namespace.ip(*argv)
            if expected is None:
                continue
            line = probe.next(
                lambda line, expected=expected, before=before: (
                    (line.get("kind"), line.get("interface"), line.get("present"))
                    == expected
                    and line["at"] >= before
                ),
                f"{expected} after ip {' '.join(argv)}",
            )
            rows.append((" ".join(argv), line["at"] - before))
        print("\nnetlink change latency (ip command start -> observer told):")
        for text, seconds in rows:
            print(f"  {text:60} {seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    probe()
