"""
Talking to a NAT-PMP or PCP gateway over a connected UDP socket: requests
pending side by side, each keyed by what identifies it and retransmitted on
its own schedule, answers accepted only from the gateway's address and port.
Also the errors both protocols share.
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

from qbportsync.interfaces import (
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.wire import SERVER_PORT, ParseError

_log = Logger()


class GatewayTimeout(SourceUnavailable):
    """The gateway never answered (nothing speaks this protocol there)."""


class GatewayRefused(SourceUnavailable):
    """ICMP port unreachable: nothing listens on the gateway's port 5351."""


class WrongProtocol(SourceUnavailable):
    """The gateway answered in another protocol version (RFC 6887 §9)."""


class Superseded(SourceError):
    """A newer request for the same mapping took this one's place."""


class GatewayRefusal(SourceError):
    """
    The gateway answered a request with an error that says how long not to
    ask again (PCP's error lifetime, RFC 6887 §8.3).
    """

    def __init__(self, message: str, retryAfter: float = 0.0) -> None:
        super().__init__(message)
        self.retryAfter = retryAfter


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

    def unmatched(self, response: ResponseT, reason: str) -> None:
        """A valid response that answers nothing pending: dropped by default."""
        self.drop(reason)

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.gateway, SERVER_PORT)

    def stopProtocol(self) -> None:
        for each in list(self._pending.values()):
            each.deferred.cancel()

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
                    f"gateway {self.gateway} did not answer {self.protocolName} "
                    f"after {pending.sent} tries"
                ),
            )
            return
        pending.sent += 1
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
        answered = [
            key
            for key, pending in self._pending.items()
            if self.answers(pending.request, response)
        ]
        if not answered:
            self.unmatched(response, "mismatch" if self._pending else "unexpected")
            return
        epoch = self.epochOf(response)
        if epoch is not None:
            self._onEpoch(epoch)
        for key in answered:
            pending = self._pending.pop(key)
            pending.stopTimer()
            pending.deferred.callback(response)

    def connectionRefused(self) -> None:
        refused = GatewayRefused(
            f"gateway {self.gateway} refused {self.protocolName} "
            "(ICMP port unreachable)"
        )
        for key in list(self._pending):
            self._fail(key, refused)


async def closePort(port: IListeningPort) -> None:
    """Stop listening, waiting when the port says so."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
