"""
Gateway announcements on 224.0.0.1:5350: NAT-PMP's address announcement
(RFC 6886 §3.2.1) and PCP's ANNOUNCE (RFC 6887 §14.1.3), both saying "my
epoch or address changed, check your mappings".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Literal

from attrs import frozen
from twisted.internet.interfaces import (
    IMulticastTransport,
    IReactorMulticast,
    IReactorTime,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from qbportsync.metrics import Metrics
from qbportsync.sources.wire import SERVER_PORT

_log = Logger()

GROUP = "224.0.0.1"
PORT = 5350
REMAP_DELAY_MAX = 5.0
"""Seconds; a random wait up to this spreads remaps after a reboot (RFC 6886 §3.7)."""
_PCP_MAX = 1100
_PCP_MAP_RESPONSE = b"\x02\x81"


@frozen
class Announcement:
    protocol: Literal["natpmp", "pcp"]
    epoch: int
    externalAddress: str | None
    """The gateway's new external address; None for PCP or a failure result."""


class NotAnnouncement(Exception):
    """A datagram on the announcement port that is not a gateway announcement."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decodeAnnouncement(data: bytes) -> Announcement:
    """Parse an announcement; anything else raises L{NotAnnouncement}."""
    if len(data) < 2:
        raise NotAnnouncement("length")
    version, opcode = data[0], data[1]
    if version == 0:
        if opcode != 0x80:
            raise NotAnnouncement("opcode")
        if len(data) != 12:
            raise NotAnnouncement("length")
        result, epoch = struct.unpack_from("!HI", data, 2)
        address = str(IPv4Address(data[8:12])) if result == 0 else None
        return Announcement("natpmp", epoch, address)
    if version == 2:
        if opcode != 0x80:
            raise NotAnnouncement("opcode")
        if len(data) < 24 or len(data) > _PCP_MAX or len(data) % 4:
            raise NotAnnouncement("length")
        if data[3] != 0:
            raise NotAnnouncement("result")
        (epoch,) = struct.unpack_from("!I", data, 8)
        return Announcement("pcp", epoch, None)
    raise NotAnnouncement("version")


class AnnouncementListener(DatagramProtocol):
    """
    Hears announcements, keeps only those from our gateway's address and
    port 5351 (RFC 6887 §8.3); hands its PCP MAP responses to C{onOther}.
    What to do about them, and how often, is the caller's to decide.
    """

    def __init__(
        self,
        gateway: str,
        onAnnouncement: Callable[[Announcement], object],
        metrics: Metrics,
        interface: str = "",
        onOther: Callable[[bytes], object] | None = None,
    ) -> None:
        self.gateway = gateway
        self._onAnnouncement = onAnnouncement
        self._metrics = metrics
        self._interface = interface
        self._onOther = onOther

    def startProtocol(self) -> None:
        transport = self.transport
        assert IMulticastTransport.providedBy(transport)
        d = transport.joinGroup(GROUP, self._interface)
        d.addErrback(self._joinFailed)

    def _joinFailed(self, failure: Failure) -> None:
        _log.warn(
            "cannot join {group} to hear gateway announcements ({error}); "
            "gateway reboots will be noticed at the next renewal",
            group=GROUP,
            error=failure.getErrorMessage(),
        )

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if addr != (self.gateway, SERVER_PORT):
            self._metrics.datagrams_dropped.labels(reason="stranger").inc()
            _log.debug(
                "ignored an announcement from {source}:{port}",
                source=addr[0],
                port=addr[1],
            )
            return
        if self._onOther is not None and datagram[:2] == _PCP_MAP_RESPONSE:
            # RFC 6887 §14.2: unsolicited MAP responses may come here too.
            self._onOther(datagram)
            return
        try:
            announcement = decodeAnnouncement(datagram)
        except NotAnnouncement as e:
            self._metrics.datagrams_dropped.labels(reason=e.reason).inc()
            _log.debug(
                "ignored a datagram from gateway {gateway} on port {port}: {reason}",
                gateway=self.gateway,
                port=PORT,
                reason=e.reason,
            )
            return
        _log.debug(
            "gateway {gateway} announced epoch {epoch} ({protocol})",
            gateway=self.gateway,
            epoch=announcement.epoch,
            protocol=announcement.protocol,
        )
        self._onAnnouncement(announcement)


class RemapLimiter:
    """
    What a gateway says unasked may be said by a forger too: allow a remap
    after RFC 6886's random 0-5 s at most once per C{period}, log the first
    of a burst and count the rest (metric C{datagrams_dropped{reason=
    "ratelimit"}}).
    """

    def __init__(
        self, clock: IReactorTime, random: Callable[[], float], metrics: Metrics
    ) -> None:
        self._clock = clock
        self._random = random
        self._metrics = metrics
        self._last: float | None = None
        self._ignored = 0

    def delay(self, what: str, period: float) -> float | None:
        """Seconds to wait before remapping for C{what}; None when too soon."""
        now = self._clock.seconds()
        if self._last is not None and now < self._last + period:
            self._ignored += 1
            self._metrics.datagrams_dropped.labels(reason="ratelimit").inc()
            _log.debug("{what}; a remap was done lately, ignored", what=what)
            return None
        self._last = now
        delay = self._random() * REMAP_DELAY_MAX
        ignored, self._ignored = self._ignored, 0
        _log.info(
            "{what}; mapping again in {delay:.1f}s{more}",
            what=what,
            delay=delay,
            more=f" ({ignored} more announcements ignored before)" if ignored else "",
        )
        return delay


def listenForAnnouncements(
    reactor: IReactorMulticast, listener: AnnouncementListener
) -> IMulticastTransport:
    """Bind 5350, shared with other listeners (mDNSResponder, other clients)."""
    return reactor.listenMulticast(PORT, listener, listenMultiple=True)
