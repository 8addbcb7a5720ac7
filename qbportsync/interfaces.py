"""The seams between the parts: what a source of forwarded ports must offer."""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@frozen
class Forwarded:
    """A port the VPN forwards to this host, as one source saw it."""

    port: int
    source: str
    note: str = ""
    expires: float | None = None
    """POSIX time when the gateway's lease ends; None for a port file."""


@frozen
class ApplyResult:
    """What applying one port to qBittorrent did."""

    port: int
    previous: int | None
    """qBittorrent's listening port before we touched it."""
    applied: bool
    """False when qBittorrent already had everything we wanted."""
    verified: bool
    """The port read back after the change equals C{port}."""
    note: str = ""


@frozen
class SourceTrouble:
    """
    Why a source cannot learn the port right now; it stays visible in
    /status, metrics and the health check until the source delivers a port.
    """

    cause: str
    """A sentence for operators: what is wrong and, when known, the fix."""
    kind: str
    """Metric label of C{qb_port_sync_errors_total}: "file", "gateway"..."""
    permanent: bool = False
    """True when only the user can fix it (a wrong setting, a refusal)."""


Report = Callable[[Forwarded | SourceTrouble], object]
"""What a source calls with each port it sees, or with why it sees none."""


class SourceUnavailable(Exception):
    """This environment cannot provide the port this way (exit code 3)."""


class SourceError(Exception):
    """The source failed this time and may work later (exit code 1)."""


class IPortSource(Interface):
    """Something that learns the forwarded port and reports every change."""

    name: str = Attribute("Short name used in logs, metrics and JSON: 'file'...")

    def start(deliver: Report) -> None:
        """
        Begin watching; call C{deliver} with each port seen, the current one
        first as soon as it is known, and with a L{SourceTrouble} whenever
        the port cannot be learned (a later port clears it).
        """

    def stop() -> Deferred[None]:
        """Stop watching and release what the source holds."""

    def fetchOnce() -> Deferred[Forwarded]:
        """
        Learn the port once, for the one-shot mode.  Fails with
        L{SourceUnavailable} or L{SourceError}.
        """


class IPortSink(Interface):
    """Where forwarded ports go: qBittorrent's Web API."""

    def apply(port: int, bindInterface: str) -> Deferred[ApplyResult]:
        """
        Make the sink listen on C{port} (and bind C{bindInterface} when not
        empty), then read the setting back.
        """

    def listenPort() -> Deferred[int]:
        """The port the sink listens on now."""

    def relisten(port: int, address: str, how: str) -> Deferred[None]:
        """
        Make the sink open its listening sockets on C{port} anew, by changing
        one setting and putting it back: C{how} is C{"address"} (bind to
        C{address} and back) or C{"port"} (another port and back).
        """


@frozen
class NetworkChange:
    """One change in the host's network, as the kernel reported it."""

    kind: str
    """C{"link"}, C{"address"} or C{"route"}."""
    interface: str
    """The interface's name; empty when the kernel did not say."""
    present: bool
    """True when the thing appeared or changed, False when it went away."""


class INetworkEvents(Interface):
    """The host's network changes (Linux: netlink; macOS: the routing socket)."""

    def subscribe(observer: Callable[[NetworkChange], object]) -> Callable[[], None]:
        """
        Call C{observer} with every change from now on; returns a function
        that ends the subscription.
        """
