"""
Talking to a NAT-PMP or PCP gateway over a connected UDP socket: one request
in flight, retransmitted on the protocol's schedule, answers accepted only
from the gateway's address and port.  Also the errors both protocols share.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
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

_log = Logger()

SERVER_PORT = 5351
"""NAT-PMP and PCP servers share this port (RFC 6887 §19.1)."""


class ParseError(Exception):
    """A datagram that is not a well-formed message of the protocol spoken."""

    reason = "malformed"
    """Label for the datagrams_dropped metric."""


class WrongLength(ParseError):
    """Not a length the protocol allows for this message."""

    reason = "length"


class WrongVersion(ParseError):
    reason = "version"


class WrongOpcode(ParseError):
    reason = "opcode"


class UnknownResult(ParseError):
    """A result code the RFC does not define: fatal for the request it answers."""

    reason = "result"

    def __init__(self, opcode: int, result: int) -> None:
        super().__init__(f"unknown result code {result} for opcode {opcode}")
        self.opcode = opcode
        self.result = result


class GatewayTimeout(SourceUnavailable):
    """The gateway never answered (nothing speaks this protocol there)."""


class GatewayRefused(SourceUnavailable):
    """ICMP port unreachable: nothing listens on the gateway's port 5351."""


class WrongProtocol(SourceUnavailable):
    """The gateway answered in another protocol version (RFC 6887 §9)."""


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


class GatewayClient(DatagramProtocol, Generic[RequestT, ResponseT]):
    """
    Talks to one gateway over a connected UDP socket: one request in flight,
    sent again after each wait of its schedule until answered, others queued.
    A protocol supplies the codec and the matching rule.
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
        self._queue: deque[_Pending[RequestT, ResponseT]] = deque()
        self._current: _Pending[RequestT, ResponseT] | None = None
        self._timer: IDelayedCall | None = None

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
        """A valid response that answers nothing in flight: dropped by default."""
        self.drop(reason)

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(self.gateway, SERVER_PORT)

    def stopProtocol(self) -> None:
        # Empty the queue first, so cancelling the current request starts no other.
        pending = [*([self._current] if self._current else []), *self._queue]
        self._queue.clear()
        for each in pending:
            each.deferred.cancel()

    def send(self, request: RequestT, waits: Iterable[float]) -> Deferred[ResponseT]:
        """
        Send C{request}, again after each of C{waits} seconds; fires with the
        gateway's answer whatever its result code, or fails with
        L{GatewayTimeout} when the waits run out, L{GatewayRefused} or
        L{SourceError}.
        """
        d: Deferred[ResponseT] = Deferred(self._cancel)
        self._queue.append(_Pending(request, d, iter(waits)))
        if self._current is None:
            self._next()
        return d

    def _cancel(self, d: Deferred[ResponseT]) -> None:
        if self._current is not None and self._current.deferred is d:
            self._finish()
            self._next()
        else:
            self._queue = deque(p for p in self._queue if p.deferred is not d)

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        self._current = self._queue.popleft()
        self._send()

    def _send(self) -> None:
        current = self._current
        assert current is not None and self.transport is not None
        wait = next(current.waits, None)
        if wait is None:
            self._fail(
                GatewayTimeout(
                    f"gateway {self.gateway} did not answer {self.protocolName} "
                    f"after {current.sent} tries"
                )
            )
            return
        current.sent += 1
        self._timer = self._reactor.callLater(wait, self._send)
        try:
            self.transport.write(self.encode(current.request), None)
        except OSError as e:
            self._fail(SourceError(f"cannot send to gateway {self.gateway}: {e}"))

    def _finish(self) -> _Pending[RequestT, ResponseT] | None:
        current, self._current = self._current, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return current

    def _fail(self, error: Exception) -> None:
        current = self._finish()
        if current is not None:
            current.deferred.errback(error)
        self._next()

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
        current = self._current
        try:
            response = self.decode(datagram)
        except ParseError as e:
            self._metrics.errors.labels(kind="parse").inc()
            self.drop(e.reason)
            if current is not None and self.fatal(e, current.request):
                self._fail(SourceError(f"gateway {self.gateway} sent {e}"))
            return
        if current is None:
            self.unmatched(response, "unexpected")
            return
        if not self.answers(current.request, response):
            self.unmatched(response, "mismatch")
            return
        epoch = self.epochOf(response)
        if epoch is not None:
            self._onEpoch(epoch)
        self._finish()
        current.deferred.callback(response)
        self._next()

    def connectionRefused(self) -> None:
        if self._current is not None:
            self._fail(
                GatewayRefused(
                    f"gateway {self.gateway} refused {self.protocolName} "
                    "(ICMP port unreachable)"
                )
            )


async def closePort(port: IListeningPort) -> None:
    """Stop listening, waiting when the port says so."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
