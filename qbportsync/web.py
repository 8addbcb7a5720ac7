"""
The HTTP side for operators: /metrics for Prometheus, /healthz and /status.

Plain twisted.web resources, no WSGI thread pool.  Which of them listen where
comes from the C{[metrics]} and C{[health]} sections: one port when they share
it, two when they do not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.logger import Logger
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
    site: Site
    paths: tuple[str, ...]


def planWeb(
    config: Config,
    getStatus: GetStatus,
    metrics: Metrics,
    clock: IReactorTime,
) -> list[WebListener]:
    """
    The listeners C{config} asks for: none, one shared by metrics and health,
    or one each.  The loader has already checked the ports and given health
    the metrics port when it had none of its own.
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
            WebListener(tuple(keys), address, port, makeSite(root, clock), paths)
        )
    return listeners


class _QuietSite(Site):
    """
    A site that logs each request at debug level only: Prometheus scrapes
    every few seconds, and an access log line for each would drown the rest.
    """

    noisy = False

    def __init__(self, root: Resource, clock: IReactorTime) -> None:
        super().__init__(root, reactor=clock)  # type: ignore[no-untyped-call]

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


def makeSite(root: Resource, clock: IReactorTime) -> Site:
    """A site for C{root} that logs each request at debug level only."""
    return _QuietSite(root, clock)


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
                "serving {paths} on http://{where}/",
                paths=" ".join(listener.paths),
                where=_hostPort(listener.address, bound),
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
) -> WebService:
    """
    The web service C{config} asks for; it listens nowhere when neither
    C{[metrics]} nor C{[health]} is enabled.
    """
    return WebService(reactor, planWeb(config, getStatus, metrics, clock))
