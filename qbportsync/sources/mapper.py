"""
The seam between the gateway source and a mapping protocol: a L{Mapper}
asks one gateway for mappings over one socket, in NAT-PMP or PCP; a
L{MappingMethod} names a protocol and opens its mappers.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from qbportsync.metrics import Metrics
from qbportsync.sources.lease import Grant
from qbportsync.sources.wire import EpochSample, IPProto


@frozen
class MapperContext:
    """What a protocol needs to open a mapper for the gateway."""

    reactor: IReactorTime
    gateway: str
    bindAddress: str
    metrics: Metrics
    random: Callable[[], float]
    onEpoch: Callable[[int], object]
    """Every epoch the gateway reports in answer to us, for the epoch rule."""
    onAnnounce: Callable[[int], object]
    """The gateway announced, unasked, its epoch (PCP ANNOUNCE, RFC 6887 §14.1)."""
    onChange: Callable[[], object]
    """The gateway said, unasked, that one of our mappings changed."""
    nonces: MutableMapping[tuple[str, IPProto, int], bytes]
    """
    PCP's nonce for each (client address, protocol, internal port): kept by
    the source so that a new socket from the same address renews the
    mapping it made rather than being refused as a stranger (RFC 6887 §11.3).
    """


class Mapper(Protocol):
    """One protocol's conversation with the gateway over one socket."""

    name: str
    """Short name for logs and JSON: "natpmp", "pcp"."""

    def mapOne(
        self,
        protocol: IPProto,
        internalPort: int,
        suggested: int,
        lifetime: int,
        *,
        probing: bool = False,
    ) -> Deferred[Grant]:
        """
        Create or renew a mapping; fails with SourceError/SourceUnavailable.
        C{probing}: the gateway has been silent, so send once every
        L{RETRANSMIT_CAP} seconds rather than in a quick burst.
        """

    def release(self, protocol: IPProto, internalPort: int) -> Deferred[None]:
        """Delete the mapping, trying only briefly."""

    def renewAt(self, lifetime: float) -> float:
        """Seconds after a grant of C{lifetime} seconds to renew it."""

    def isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        """The protocol's rule: did the gateway lose its state?"""

    def heard(self, datagram: bytes) -> None:
        """A datagram from the gateway on the announcement port, not an announcement."""

    @property
    def alive(self) -> bool:
        """False once the socket closed, by us or by the reactor."""

    def close(self) -> Deferred[None]:
        """Close the socket, cancelling every request."""


@frozen
class MappingMethod:
    """A mapping protocol the source may speak: its name and how to open a mapper."""

    name: str
    open: Callable[[MapperContext], Mapper]
