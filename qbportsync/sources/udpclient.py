"""
Talking to a NAT-PMP or PCP gateway over a connected UDP socket: requests
pending side by side, each keyed by what identifies it and retransmitted on
its own schedule, answers accepted only from the gateway's address and port.
Also the errors both protocols share, and which of them only a person can fix.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from qbportsync.config import ConfigError
from qbportsync.interfaces import (
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.wire import SERVER_PORT, ParseError, Result

_log = Logger()

RETRANSMIT_CAP = 8.0
"""
Seconds; the longest silence between two sends of one request.  RFC 6886
lets the last waits grow to 64 s and RFC 6887 to 1024 s, but a gateway that
comes back must be asked again within seconds.
"""


class GatewayTimeout(SourceUnavailable):
    """The gateway never answered (nothing speaks this protocol there)."""

    def __init__(self, message: str, silentFor: float = 0.0) -> None:
        super().__init__(message)
        self.silentFor = silentFor
        """Seconds since the last send: a retry may count them as waited."""


class GatewayRefused(SourceUnavailable):
    """
    ICMP port unreachable: nothing listens on the gateway's port 5351.  Under
    the epoll and poll reactors it arrives as the port closing under us.
    """


class WrongProtocol(SourceUnavailable):
    """The gateway answered in another protocol version (RFC 6887 §9)."""


class GatewayUnsupported(SourceUnavailable):
    """The gateway answered that it does not offer this mapping at all."""


class Superseded(SourceError):
    """A newer request for the same mapping took this one's place."""


class GatewayRefusal(SourceError):
    """
    The gateway answered a request with an error result; with PCP it also
    says how long not to ask again (the error's lifetime, RFC 6887 §8.3).
    """

    def __init__(self, message: str, result: Result, retryAfter: float = 0.0) -> None:
        super().__init__(message)
        self.result = result
        self.retryAfter = retryAfter


class GatewayMoves(SourceError):
    """
    The gateway would not forward an external port to the same internal port,
    so no peer could reach qBittorrent through the mapping.
    """


def isPermanent(error: BaseException) -> bool:
    """
    True for errors that asking again cannot fix: a setting to change, a
    gateway that refuses us or lacks the feature.  A network change may
    still fix them, so they are retried, only rarely.
    """
    if isinstance(error, GatewayRefusal):
        return error.result.permanent
    return isinstance(
        error, ConfigError | GatewayUnsupported | WrongProtocol | GatewayMoves
    )


def isPathTrouble(error: BaseException) -> bool:
    """
    True for failures that say nothing reached the gateway or came back from
    it: the route, the gateway or our address may have changed, so the
    socket is worth opening anew.
    """
    return not isinstance(error, GatewayRefusal | GatewayUnsupported | WrongProtocol)


RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class _Pending(Generic[RequestT, ResponseT]):
    """One request waiting for its answer, and its retransmission timer."""

    def __init__(
        self,
        request: RequestT,
        deferred: Deferred[ResponseT],
        waits: Iterator[float],
    ) -> None:
        self.request = request
        self.deferred = deferred
        self.waits = waits
        self.sent = 0
        self.lastWait = 0.0
        self.timer: IDelayedCall | None = None

    def stopTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class GatewayClient(DatagramProtocol, Generic[RequestT, ResponseT]):
    """
    Talks to one gateway over a connected UDP socket, in the manner of
    twisted.names' C{DNSMixin}: each request pending under its own key,
    sent again after each wait of its schedule until answered.  A protocol
    supplies the codec, the key and the matching rule.
    """

    protocolName = ""
    """For messages: "NAT-PMP", "PCP"."""

    def __init__(
        self,
        reactor: IReactorTime,
        gateway: str,
        metrics: Metrics,
        onEpoch: Callable[[int], object],
    ) -> None:
        self._reactor = reactor
        self.gateway = gateway
        self._metrics = metrics
        self._onEpoch = onEpoch
        self._pending: dict[Hashable, _Pending[RequestT, ResponseT]] = {}
        self._abandoned = False
        self.closed = False
        """The socket closed: by us, or by the reactor after an ICMP error."""

    def keyOf(self, request: RequestT) -> Hashable:
        """What identifies C{request}: a newer one with the same key replaces it."""
        raise NotImplementedError()

    def encode(self, request: RequestT) -> bytes:
        raise NotImplementedError()

    def decode(self, datagram: bytes) -> ResponseT:
        """The response in C{datagram}; raises L{ParseError} and nothing else."""
        raise NotImplementedError()

    def answers(self, request: RequestT, response: ResponseT) -> bool:
        raise NotImplementedError()

    def epochOf(self, response: ResponseT) -> int | None:
        raise NotImplementedError()

    def fatal(self, error: ParseError, request: RequestT) -> bool:
        """True when C{error} ends C{request} (an undefined result code for it)."""
        return False

    def invalid(self, request: RequestT, response: ResponseT) -> str | None:
        """Why C{response}, which answers C{request}, cannot be believed; or None."""
        return None

    def unmatched(self, response: ResponseT, reason: str) -> None:
        """A valid response that answers nothing pending: dropped by default."""
        self.drop(reason)

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.gateway, SERVER_PORT)

    def abandon(self) -> None:
        """We are closing the socket: cancel every request, quietly."""
        self._abandoned = True
        for each in list(self._pending.values()):
            each.deferred.cancel()

    def stopProtocol(self) -> None:
        self.closed = True
        if self._abandoned:
            return
        # Not our doing: the epoll and poll reactors close a connected UDP
        # port on ICMP port unreachable, where select calls connectionRefused.
        self.connectionRefused()

    def send(self, request: RequestT, waits: Iterable[float]) -> Deferred[ResponseT]:
        """
        Send C{request}, again after each of C{waits} seconds; fires with the
        gateway's answer whatever its result code, or fails with
        L{GatewayTimeout} when the waits run out, L{GatewayRefused} or
        L{SourceError}.
        """
        key = self.keyOf(request)
        older = self._pending.pop(key, None)
        if older is not None:
            older.stopTimer()
            older.deferred.errback(Superseded("a newer request replaced this one"))
        pending: _Pending[RequestT, ResponseT]
        d: Deferred[ResponseT] = Deferred(lambda d: self._forget(key, pending))
        pending = _Pending(request, d, iter(waits))
        self._pending[key] = pending
        self._send(key, pending)
        return d

    def _forget(self, key: Hashable, pending: _Pending[RequestT, ResponseT]) -> None:
        pending.stopTimer()
        if self._pending.get(key) is pending:
            del self._pending[key]

    def _send(self, key: Hashable, pending: _Pending[RequestT, ResponseT]) -> None:
        assert self.transport is not None
        pending.timer = None
        wait = next(pending.waits, None)
        if wait is None:
            self._fail(
                key,
                GatewayTimeout(
                    f"gateway {self.gateway} does not answer {self.protocolName}",
                    pending.lastWait,
                ),
            )
            return
        pending.sent += 1
        pending.lastWait = wait
        pending.timer = self._reactor.callLater(wait, self._send, key, pending)
        try:
            self.transport.write(self.encode(pending.request), None)
        except OSError as e:
            self._fail(key, SourceError(f"cannot send to gateway {self.gateway}: {e}"))

    def _fail(self, key: Hashable, error: Exception) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.stopTimer()
            pending.deferred.errback(error)

    def drop(self, reason: str, source: str = "") -> None:
        """Count and log a datagram we ignore."""
        self._metrics.datagrams_dropped.labels(reason=reason).inc()
        _log.debug(
            "dropped a datagram from {source}: {reason}",
            source=source or self.gateway,
            reason=reason,
        )

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if addr != (self.gateway, SERVER_PORT):
            self.drop("stranger", f"{addr[0]}:{addr[1]}")
            return
        try:
            response = self.decode(datagram)
        except ParseError as e:
            self._metrics.errors.labels(kind="parse").inc()
            self.drop(e.reason)
            for key, pending in list(self._pending.items()):
                if self.fatal(e, pending.request):
                    self._fail(key, SourceError(f"gateway {self.gateway} sent {e}"))
            return
        answered = []
        for key, pending in self._pending.items():
            if not self.answers(pending.request, response):
                continue
            problem = self.invalid(pending.request, response)
            if problem is None:
                answered.append(key)
                continue
            self._metrics.errors.labels(kind="parse").inc()
            self.drop(problem)
            return
        if not answered:
            self.unmatched(response, "mismatch" if self._pending else "unexpected")
            return
        epoch = self.epochOf(response)
        if epoch is not None:
            self._onEpoch(epoch)
        finished = [self._pending.pop(key) for key in answered]
        for pending in finished:
            pending.stopTimer()
        for pending in finished:
            # A callback may have cancelled another answered request.
            if not pending.deferred.called:
                pending.deferred.callback(response)

    def connectionRefused(self) -> None:
        refused = GatewayRefused(
            f"gateway {self.gateway} refused {self.protocolName} "
            "(ICMP port unreachable: nothing listens on its port 5351)"
        )
        for key in list(self._pending):
            self._fail(key, refused)


async def closePort(port: IListeningPort) -> None:
    """Stop listening, waiting when the port says so."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
