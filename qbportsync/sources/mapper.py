"""
The seam between the gateway source and a mapping protocol: a L{Mapper}
asks one gateway for mappings over one socket, in NAT-PMP or PCP; a
L{MappingMethod} names a protocol and opens its mappers.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Every epoch the gateway reports, for the source's epoch rule."""
    onChange: Callable[[], object]
    """The gateway said, unasked, that one of our mappings changed."""


class Mapper(Protocol):
    """One protocol's conversation with the gateway over one socket."""

    name: str
    """Short name for logs and JSON: "natpmp", "pcp"."""

    def mapOne(
        self, protocol: IPProto, internalPort: int, suggested: int, lifetime: int
    ) -> Deferred[Grant]:
        """Create or renew a mapping; fails with SourceError/SourceUnavailable."""

    def release(self, protocol: IPProto, internalPort: int) -> Deferred[None]:
        """Delete the mapping, trying only briefly."""

    def renewAt(self, lifetime: float) -> float:
        """Seconds after a grant of C{lifetime} seconds to renew it."""

    def isEpochReset(self, last: EpochSample, new: EpochSample) -> bool:
        """The protocol's rule: did the gateway lose its state?"""

    def heard(self, datagram: bytes) -> None:
        """A datagram from the gateway on the announcement port, not an announcement."""

    def close(self) -> Deferred[None]:
        """Close the socket, cancelling every request."""


@frozen
class MappingMethod:
    """A mapping protocol the source may speak: its name and how to open a mapper."""

    name: str
    open: Callable[[MapperContext], Mapper]
