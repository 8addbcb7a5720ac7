"""
The HTTP side for operators: /metrics for Prometheus, /healthz and /status.

Plain twisted.web resources, no WSGI thread pool.  Which of them listen where
comes from the C{[metrics]} and C{[health]} sections: one port when they share
it, two when they do not.

Whoever can reach these ports must not be able to starve the daemon: the
connections open at once are capped by a share of the descriptor limit
(L{connectionCap}), the busiest client address giving way to the others
(L{Connections}); a request must be
complete within L{REQUEST_DEADLINE} seconds however slowly its bytes come;
and a request body is refused with 413 before any of it is read.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from qbportsync.config import Config
from qbportsync.metrics import CONTENT_TYPE, Metrics
from qbportsync.status import SyncStatus, statusDocument, unhealthyReason

_log = Logger()

GetStatus = Callable[[], SyncStatus]

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"

REQUEST_DEADLINE = 5.0
"""
Seconds from a connection (or the previous answer on it) to a complete
request; then the connection is closed.
"""
GRACE = 1.0
"""
Seconds a new connection may take to send its request before, at the cap,
another from its own address may close it (see L{Connections}).
"""
MAX_CONNECTIONS = 512
"""The most operator connections open at once, whatever the descriptor limit."""
BACKLOG = 1024
"""
Connections the kernel may hold for us before we accept them; they cost no
descriptor of ours, and a flood that fills a short queue would make a
legitimate client wait for its SYN to be sent again.
"""
_SHARE = 4
"""The operator endpoints may hold a quarter of the descriptors, no more."""
_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 32\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"These paths take no request body\n"
)


def _noStore(request: Request, contentType: bytes) -> None:
    request.setHeader(b"content-type", contentType)
    request.setHeader(b"cache-control", b"no-store")


def _json(document: dict[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True).encode() + b"\n"


class MetricsResource(Resource):
    """Every metric in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        _noStore(request, CONTENT_TYPE.encode())
        return self._metrics.exposition()


class _StatusReader(Resource):
    """A leaf that answers from the daemon's status as of the clock's now."""

    isLeaf = True

    def __init__(self, getStatus: GetStatus, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._getStatus = getStatus
        self._clock = clock


class HealthResource(_StatusReader):
    """
    200 C{OK} while healthy, 503 C{Unhealthy} otherwise; the /status document
    instead when the client accepts JSON.
    """

    def render_GET(self, request: Request) -> bytes:
        status = self._getStatus()
        now = self._clock.seconds()
        healthy = unhealthyReason(status, now) is None
        request.setResponseCode(200 if healthy else 503)
        if _JSON in (request.getHeader(b"accept") or b""):
            _noStore(request, _JSON)
            return _json(statusDocument(status, now))
        _noStore(request, _TEXT)
        return b"OK" if healthy else b"Unhealthy"


class StatusResource(_StatusReader):
    """What the daemon knows, as JSON, always 200."""

    def render_GET(self, request: Request) -> bytes:
        _noStore(request, _JSON)
        return _json(statusDocument(self._getStatus(), self._clock.seconds()))


class _Index(Resource):
    """The root: a list of what else is here, for a curious operator."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        _noStore(request, _TEXT)
        return "".join(f"/{name.decode()}\n" for name in sorted(self.children)).encode()

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else notFound()


def makeWebRoot(
    getStatus: GetStatus,
    metrics: Metrics | None,
    health: bool,
    clock: IReactorTime,
) -> Resource:
    """
    The root resource: C{/metrics} when C{metrics} is given, C{/healthz} and
    C{/status} when C{health} is true.
    """
    root = _Index()
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(metrics))
    if health:
        root.putChild(b"healthz", HealthResource(getStatus, clock))
        root.putChild(b"status", StatusResource(getStatus, clock))
    return root


class ListenError(Exception):
    """A configured port could not be listened on (exit code 2)."""

    def __init__(self, keys: Sequence[str], address: str, port: int, reason: str):
        self.keys = tuple(keys)
        self.address = address
        self.port = port
        self.reason = reason
        super().__init__(
            f"{' and '.join(self.keys)}: cannot listen on "
            f"{_hostPort(address, port)}: {reason}"
        )


def _hostPort(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@frozen
class WebListener:
    """One address and port to listen on, and the site it serves."""

    keys: tuple[str, ...]
    """The config keys that asked for it, for error messages."""
    address: str
    port: int
    site: OperatorSite
    paths: tuple[str, ...]


def planWeb(
    config: Config,
    getStatus: GetStatus,
    metrics: Metrics,
    clock: IReactorTime,
    connections: Connections,
) -> list[WebListener]:
    """
    The listeners C{config} asks for: none, one shared by metrics and health,
    or one each, sharing C{connections}.  The loader has already checked the
    ports and given health the metrics port when it had none of its own.
    """
    wanted: dict[tuple[str, int], list[str]] = {}
    if config.metrics.enabled:
        wanted[(config.metrics.address, config.metrics.port)] = ["metrics.port"]
    if config.health.enabled:
        where = (config.health.address, config.health.port)
        wanted.setdefault(where, []).append("health.port")
    listeners = []
    for (address, port), keys in wanted.items():
        withMetrics = "metrics.port" in keys
        withHealth = "health.port" in keys
        root = makeWebRoot(
            getStatus, metrics if withMetrics else None, withHealth, clock
        )
        paths = (("/metrics",) if withMetrics else ()) + (
            ("/healthz", "/status") if withHealth else ()
        )
        listeners.append(
            WebListener(
                tuple(keys), address, port, makeSite(root, clock, connections), paths
            )
        )
    return listeners


def connectionCap(descriptorLimit: int) -> int:
    """
    How many operator connections may be open at once when the process may
    open C{descriptorLimit} descriptors: a quarter of them, from 4 to
    L{MAX_CONNECTIONS}, so that the rest stays for the daemon's own work
    (the port file, the gateway, qBittorrent, the journal).
    """
    if descriptorLimit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, descriptorLimit // _SHARE))


def descriptorLimit() -> int:
    """This process's soft limit on open descriptors (C{RLIMIT_NOFILE})."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Connections:
    """
    The operator connections holding a descriptor now, on every listener
    together, by client address, oldest first.

    At the cap a new connection from an address that holds fewer than the
    busiest one closes that address's oldest connection; one from the
    busiest address itself does so only when that connection has had
    L{GRACE} seconds to send its request, and is turned away at once
    otherwise.  So a flood of idle connections from one address cannot lock
    out a client elsewhere (a health checker, Prometheus), a client on the
    flooding address waits about a second, not the whole deadline, and the
    count never passes the cap by more than the few connections still
    closing.
    """

    def __init__(self, cap: int, clock: IReactorTime) -> None:
        self.cap = cap
        self._clock = clock
        self._slack = max(1, cap // 8)
        self._byPeer: dict[str, dict[_OperatorChannel, None]] = {}
        self._closing: set[_OperatorChannel] = set()
        self._full = False

    def __len__(self) -> int:
        return sum(map(len, self._byPeer.values())) + len(self._closing)

    def admit(self, peer: str) -> bool:
        """
        Whether a new connection from C{peer} may open, closing another to
        make room if need be.
        """
        if len(self) < self.cap:
            return True
        if not self._full:
            self._full = True
            _log.warn(
                "{cap} operator connections open at once, the most allowed "
                "(a quarter of the descriptor limit): closing the oldest of "
                "the busiest address, refusing more from it",
                cap=self.cap,
            )
        busiest = max(self._byPeer.values(), key=len)
        oldest = next(iter(busiest))
        if len(self._closing) >= self._slack or (
            len(self._byPeer.get(peer, ())) >= len(busiest)
            and self._clock.seconds() - oldest.openedAt < GRACE
        ):
            return False
        self._forget(oldest)
        self._closing.add(oldest)
        oldest.abort()
        return True

    def add(self, channel: _OperatorChannel) -> None:
        """Count C{channel} in, as the newest of its address."""
        channel.openedAt = self._clock.seconds()
        self._byPeer.setdefault(channel.peer, {})[channel] = None

    def release(self, channel: _OperatorChannel) -> None:
        """C{channel} has closed: its descriptor is free."""
        self._closing.discard(channel)
        self._forget(channel)
        if len(self) <= self.cap // 2:
            self._full = False

    def _forget(self, channel: _OperatorChannel) -> None:
        mine = self._byPeer.get(channel.peer, {})
        mine.pop(channel, None)
        if not mine:
            self._byPeer.pop(channel.peer, None)


class _OperatorChannel(http.HTTPChannel):
    """
    An HTTP channel whose idle timeout is a deadline for the whole request,
    that refuses request bodies unread, and that counts itself in and out
    of the site's L{Connections}.
    """

    site: OperatorSite
    peer = ""
    """The client's address."""
    openedAt = 0.0
    _refused = False
    """A body was refused: what follows the headers is dropped unread."""

    def resetTimeout(self) -> None:
        """
        Bytes arriving do not push the deadline back: a client that sends
        its headers one byte at a time is cut off like a silent one.
        """

    def timeoutConnection(self) -> None:
        # Nothing is owed to a client with no complete request: close at
        # once rather than wait for it to read (HTTPChannel's default).
        _log.debug("no complete request in {secs} s: closing", secs=self.timeOut)
        self.abort()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        # length is 0 for no body, None for a chunked one, else the
        # Content-Length: refuse a body here, before twisted.web reads it
        # into memory or a temporary file.
        if self.length != 0:
            _log.debug("refused a request body ({length} bytes)", length=self.length)
            self._refused = True
            self.transport.write(_TOO_LARGE)  # type: ignore[union-attr]
            self.loseConnection()  # type: ignore[no-untyped-call]
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def abort(self) -> None:
        """Drop the connection now, pending output and all."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.connections.release(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class OperatorSite(Site):
    """
    A site that logs each request at debug level only: Prometheus scrapes
    every few seconds, and an access log line for each would drown the rest.
    Its channels are L{_OperatorChannel}s.
    """

    noisy = False
    protocol = _OperatorChannel  # type: ignore[assignment]

    def __init__(
        self, root: Resource, clock: IReactorTime, connections: Connections
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            root, reactor=clock, timeout=REQUEST_DEADLINE
        )
        self.connections = connections

    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress | None
    ) -> _OperatorChannel | None:
        """
        A channel for a new connection, or L{None}, which closes it at once,
        when L{Connections} has no room for it.
        """
        peer = addr.host if isinstance(addr, IPv4Address | IPv6Address) else ""
        if not self.connections.admit(peer):
            _log.debug("refused a connection from {peer}: no room", peer=peer)
            return None
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        assert isinstance(channel, _OperatorChannel)
        channel.peer = peer
        self.connections.add(channel)
        return channel

    def logPrefix(self) -> str:
        return "Operator HTTP"

    def log(self, request: http.Request) -> None:
        client = request.getClientAddress()
        _log.debug(
            "{method} {path} answered {code} to {client}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            code=request.code,
            client=client.host if isinstance(client, IPv4Address | IPv6Address) else "",
        )


def makeSite(
    root: Resource, clock: IReactorTime, connections: Connections
) -> OperatorSite:
    """
    A site for C{root} that logs each request at debug level only, and whose
    connections count towards C{connections}.
    """
    return OperatorSite(root, clock, connections)


class WebService(Service):
    """
    Listens on the planned addresses while running.  L{listen} is synchronous,
    as listening on TCP is, so that a caller can find a port in use before the
    reactor runs and exit with status 2; starting the service listens too, for
    twistd, which calls L{privilegedStartService} before dropping privileges.
    """

    def __init__(self, reactor: IReactorTCP, listeners: Sequence[WebListener]):
        self._reactor = reactor
        self._listeners = tuple(listeners)
        self._ports: list[IListeningPort] = []

    @property
    def listeners(self) -> tuple[WebListener, ...]:
        """What this service listens on, as planned."""
        return self._listeners

    @property
    def ports(self) -> list[IListeningPort]:
        """The ports listened on so far, in the order of the listeners."""
        return list(self._ports)

    def listen(self) -> None:
        """
        Listen on every address not yet listened on; raise L{ListenError} for
        the first that fails.  Those already open stay open until stopped.
        """
        for listener in self._listeners[len(self._ports) :]:
            try:
                port = self._reactor.listenTCP(
                    listener.port,
                    listener.site,  # type: ignore[arg-type]
                    backlog=BACKLOG,
                    interface=listener.address,
                )
            except CannotListenError as e:
                reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
                raise ListenError(
                    listener.keys, listener.address, listener.port, reason
                ) from e
            self._ports.append(port)
            host = port.getHost()
            bound = host.port if isinstance(host, IPv4Address | IPv6Address) else 0
            _log.info(
                "serving {paths} on http://{where}/ "
                "(at most {cap} connections at once)",
                paths=" ".join(listener.paths),
                where=_hostPort(listener.address, bound),
                cap=listener.site.connections.cap,
            )

    def privilegedStartService(self) -> None:
        self.listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self.listen()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        """Stop listening everywhere."""
        super().stopService()  # type: ignore[no-untyped-call]
        ports, self._ports = self._ports, []
        stopping = [maybeDeferred(port.stopListening) for port in ports]
        return gatherResults(stopping).addCallback(lambda _: None)


def makeWebService(
    reactor: IReactorTCP,
    clock: IReactorTime,
    config: Config,
    getStatus: GetStatus,
    metrics: Metrics,
    descriptors: int | None = None,
) -> WebService:
    """
    The web service C{config} asks for; it listens nowhere when neither
    C{[metrics]} nor C{[health]} is enabled.  Its connections are capped by
    L{connectionCap} of C{descriptors}, this process's limit by default.
    """
    cap = connectionCap(descriptorLimit() if descriptors is None else descriptors)
    listeners = planWeb(config, getStatus, metrics, clock, Connections(cap, clock))
    return WebService(reactor, listeners)
