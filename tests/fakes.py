"""Fakes for the seams: a port source and a port sink driven by the test."""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from qbportsync.interfaces import (
    ApplyResult,
    Forwarded,
    INetworkEvents,
    IPortSink,
    IPortSource,
    NetworkChange,
    Report,
)


@implementer(IPortSource)
@define
class FakeSource:
    """A source whose ports the test pushes with L{emit}."""

    name: str = "file"
    deliver: Report | None = None
    stopped: bool = False
    once: Forwarded | Exception | None = None

    def start(self, deliver: Report) -> None:
        self.deliver = deliver

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def fetchOnce(self) -> Deferred[Forwarded]:
        if isinstance(self.once, Exception):
            return fail(self.once)
        assert self.once is not None
        return succeed(self.once)

    def emit(self, port: int, expires: float | None = None) -> None:
        assert self.deliver is not None, "source not started"
        self.deliver(Forwarded(port=port, source=self.name, expires=expires))


@implementer(IPortSink)
@define
class FakeSink:
    """
    A sink that answers each call with a Deferred the test fires, and keeps
    the port it was last told, like qBittorrent does.
    """

    port: int = 6881
    applies: list[tuple[int, str, Deferred[ApplyResult]]] = field(factory=list)
    checks: list[Deferred[int]] = field(factory=list)
    cancelled: list[int] = field(factory=list)
    relistens: list[tuple[int, str, str, Deferred[None]]] = field(factory=list)

    def apply(self, port: int, bindInterface: str) -> Deferred[ApplyResult]:
        d: Deferred[ApplyResult] = Deferred(lambda d: self.cancelled.append(port))
        self.applies.append((port, bindInterface, d))
        return d

    def listenPort(self) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.checks.append(d)
        return d

    def relisten(self, port: int, address: str, how: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.relistens.append((port, address, how, d))
        return d

    def succeed(self, index: int = -1, verified: bool = True) -> None:
        """Let the C{index}-th apply succeed, setting the port."""
        port, _, d = self.applies[index]
        previous = self.port
        if verified:
            self.port = port
        d.callback(
            ApplyResult(
                port=port,
                previous=previous,
                applied=previous != port,
                verified=verified,
            )
        )


@implementer(INetworkEvents)
@define
class FakeNetworkEvents:
    """Network changes the test announces with L{announce}."""

    observers: list[Callable[[NetworkChange], object]] = field(factory=list)

    def subscribe(
        self, observer: Callable[[NetworkChange], object]
    ) -> Callable[[], None]:
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    def announce(self, kind: str, interface: str = "", present: bool = True) -> None:
        """Tell every subscriber one change."""
        for observer in list(self.observers):
            observer(NetworkChange(kind, interface, present))
