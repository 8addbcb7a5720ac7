"""
Command-line options shared by C{twistd qbportsync} and C{qb-port-sync}, and
the builders that turn a configuration into running parts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import InvalidLogLevelError, LogLevel
from twisted.python import usage

from qbportsync._version import __version__
from qbportsync.config import Config, ConfigError, loadConfig
from qbportsync.interfaces import (
    INetworkEvents,
    IPortSink,
    IPortSource,
    SourceUnavailable,
)
from qbportsync.plainhttp import speaksPlainHTTP
from qbportsync.qbittorrent import QBittorrentClient, makeHTTPClient
from qbportsync.refusals import RefusalStore, stateDirectory

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

    from qbportsync.metrics import Metrics
    from qbportsync.sdnotify import SystemdNotifier
    from qbportsync.sources.portfile import NotifierFactory
    from qbportsync.sync import PortSync

# What only the daemon or one strategy needs is imported where it is used:
# a one-shot run then loads no web server, netlink or other strategy.

STRATEGIES = ("file", "natpmp", "pcp", "gluetun", "auto")

EXIT_TRANSIENT = 1
EXIT_CONFIG = 2
EXIT_UNSUPPORTED = 3

READY_GRACE_SECS = 10.0
"""Tell systemd we are up after this long even if no port has come yet."""


def strategyOption(value: str) -> str:
    """C{value} of a C{--strategy} option, if it names one of L{STRATEGIES}."""
    if value not in STRATEGIES:
        raise usage.UsageError(
            f"--strategy must be one of {', '.join(STRATEGIES)}, not {value!r}"
        )
    return value


class PrintingOptions(usage.Options):
    """C{--help} and C{--version} print to C{stdout} (sys.stdout if None)."""

    def __init__(self, stdout: TextIO | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._stdout = stdout

    def opt_help(self) -> NoReturn:
        """Display this help and exit."""
        print(self, file=self._stdout or sys.stdout)
        raise SystemExit(0)

    def opt_version(self) -> NoReturn:
        """Print the version and exit."""
        print(f"qbportsync {__version__.short()}", file=self._stdout or sys.stdout)
        raise SystemExit(0)


class Options(PrintingOptions):
    """Options of the daemon and of the one-shot run."""

    synopsis = (
        "Usage: qb-port-sync [--config PATH] [--strategy NAME] [--once [--json]] "
        "[--forget-refusals]\n"
        "       twistd [twistd options] qbportsync [--config PATH] [--strategy NAME]"
    )
    longdesc = (
        "Keep qBittorrent listening on the port that the VPN forwards to this "
        "host, learnt from the VPN client's port file or from the gateway. "
        "'qb-port-sync check --help': test the set-up, changing nothing."
    )

    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file (default: the first of "
            "$XDG_CONFIG_HOME/qb-port-sync/config.toml, "
            "~/.config/qb-port-sync/config.toml, "
            "/Library/Application Support/qb-port-sync/config.toml, "
            "/etc/qb-port-sync/config.toml).",
        ],
        [
            "strategy",
            "s",
            "auto",
            "Where the forwarded port comes from: " + ", ".join(STRATEGIES) + ".",
        ],
        [
            "log-level",
            "l",
            "info",
            "Least severe log level shown: debug, info, warn, error, critical.",
        ],
    ]
    optFlags = [
        ["once", None, "Apply the forwarded port once and exit (qb-port-sync only)."],
        ["json", None, "With --once: print the outcome as one JSON line."],
        [
            "forget-refusals",
            None,
            "Forget the logins qBittorrent refused, so that the next run tries "
            "the same credentials again (qb-port-sync only).",
        ],
    ]

    def opt_strategy(self, value: str) -> None:
        """Where the forwarded port comes from: file, natpmp, pcp, gluetun or auto."""
        self["strategy"] = strategyOption(value)

    opt_s = opt_strategy

    def opt_log_level(self, value: str) -> None:
        """Least severe log level shown: debug, info, warn, error, critical."""
        try:
            LogLevel.levelWithName(value)
        except InvalidLogLevelError:
            raise usage.UsageError(
                "--log-level must be one of debug, info, warn, error, critical, "
                f"not {value!r}"
            ) from None
        self["log-level"] = value

    opt_l = opt_log_level

    opt_V = PrintingOptions.opt_version

    def postOptions(self) -> None:
        """Check the options that only make sense together."""
        if self["json"] and not self["once"]:
            raise usage.UsageError("--json only goes with --once")

    @property
    def logLevel(self) -> LogLevel:
        """The chosen log level."""
        level: LogLevel = LogLevel.levelWithName(self["log-level"])
        return level


def refusalStore(
    reactor: Any, config: Config, environ: Mapping[str, str], uid: int
) -> RefusalStore:
    """
    The login-refusal record shared by every run for this user (or
    service): it waits for another run's login at most as long as that
    login may take.
    """
    return RefusalStore(
        reactor,
        stateDirectory(environ, uid),
        lockTimeout=config.qbittorrent.timeout_secs + 5.0,
    )


def inotifyFactory(reactor: Any) -> NotifierFactory | None:
    """Make started INotify objects, or None where INotify is missing (macOS)."""
    try:
        from twisted.internet import inotify
    except ImportError:
        return None

    def make() -> inotify.INotify:
        notifier = inotify.INotify(reactor)
        notifier.startReading()
        return notifier

    try:
        make().loseConnection()
    except inotify.INotifyError:
        return None
    return make


def makeSource(
    reactor: Any,
    config: Config,
    strategy: str,
    metrics: Metrics,
    sink: IPortSink,
    pool: HTTPConnectionPool | None = None,
    networkEvents: INetworkEvents | None = None,
    *,
    watch: bool = True,
) -> IPortSource:
    """
    The source for C{strategy}; raises L{SourceUnavailable} where it cannot
    work.  C{networkEvents}: the host's network changes, in the daemon.
    C{watch=False}: the source will only be asked once, so a port file is
    not watched with INotify.
    """

    def gluetunSource() -> IPortSource:
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        from qbportsync.sources.gluetun import GluetunSource

        # Its own client: qBittorrent's cookie jar is none of gluetun's business.
        http = HTTPClient(Agent(reactor, pool=pool))
        return GluetunSource(
            reactor,
            http,
            config.gluetun,
            metrics,
            timeout=config.qbittorrent.timeout_secs,
        )

    def fileSource() -> IPortSource:
        from twisted.python.filepath import FilePath

        from qbportsync.sources.portfile import PortFileSource

        return PortFileSource(
            reactor,
            FilePath(config.protonvpn.forwarded_port_path),
            metrics,
            inotifyFactory(reactor) if watch else None,
        )

    def pcpSource() -> IPortSource:
        from qbportsync.sources.gatewaysource import PCPSource

        return PCPSource(
            reactor, config, metrics, sink.listenPort, networkEvents=networkEvents
        )

    if strategy == "natpmp":
        from qbportsync.sources.gatewaysource import NATPMPSource

        return NATPMPSource(
            reactor, config, metrics, sink.listenPort, networkEvents=networkEvents
        )
    if strategy == "pcp":
        return pcpSource()
    if strategy == "gluetun":
        return gluetunSource()
    if strategy == "auto":
        from qbportsync.sources.auto import autoSource

        return autoSource(
            config.protonvpn.forwarded_port_path,
            fileSource,
            pcpSource,
            clock=reactor,
            networkEvents=networkEvents,
            gluetunURL=config.gluetun.url,
            gluetunSource=gluetunSource,
        )
    return fileSource()


def makeSink(
    reactor: Any,
    config: Config,
    refusals: RefusalStore,
    pool: HTTPConnectionPool | None = None,
) -> QBittorrentClient:
    """
    The qBittorrent Web API client, with one HTTP session for its life.
    Raises L{ConfigError} when C{ca_file} holds no certificate.
    """
    http = makeHTTPClient(reactor, config.qbittorrent, pool)
    return QBittorrentClient(
        reactor,
        http,
        config.qbittorrent,
        refusals,
        partial(speaksPlainHTTP, reactor),
    )


class ConnectionPoolService(Service):
    """Closes the daemon's kept-alive connections to qBittorrent on stop."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


class ReadinessService(Service):
    """
    Tells systemd the daemon is ready once the first update of qBittorrent
    was tried, or after L{READY_GRACE_SECS} if that takes longer.
    """

    def __init__(
        self, reactor: IReactorTime, sync: PortSync, notifier: SystemdNotifier
    ) -> None:
        self._reactor = reactor
        self._sync = sync
        self._notifier = notifier
        self._ready: Deferred[None] | None = None

    def startService(self) -> None:
        Service.startService(self)
        ready = self._ready = self._sync.whenFirstAttempted()
        ready.addTimeout(READY_GRACE_SECS, self._reactor, onTimeoutCancel=_ignore)
        ready.addCallback(lambda _: self._notifier.ready())
        # Stopped before the first update: nothing to tell, nothing to log.
        ready.addErrback(lambda f: f.trap(CancelledError))

    def stopService(self) -> None:
        Service.stopService(self)
        if self._ready is not None:
            self._ready.cancel()
            self._ready = None


def _ignore(result: object, timeout: float) -> None:
    return None


def buildService(
    reactor: Any,
    config: Config,
    strategy: str,
    environ: Mapping[str, str],
    refusals: RefusalStore,
) -> IService:
    """
    Everything the daemon runs, as one service, from a loaded configuration:
    PortSync, the metrics and health endpoints, systemd notification, and
    the host's network changes for the parts that follow them.  Nothing
    listens before the service starts.  Raises L{SourceUnavailable} when the
    strategy cannot work here, L{ConfigError} for a configuration that only
    fails once used (a C{ca_file} that is not PEM).
    """
    from twisted.web.client import HTTPConnectionPool

    from qbportsync.hooks import ChangeHook
    from qbportsync.listener import ListenerHealer
    from qbportsync.metrics import Metrics
    from qbportsync.netevents import networkEvents
    from qbportsync.sdnotify import SystemdNotifier
    from qbportsync.status import statusLine
    from qbportsync.sync import PortSync
    from qbportsync.web import makeWebService

    metrics = Metrics.create()
    # Kept-alive connections halve the time of an update (benchmarks/).
    pool = HTTPConnectionPool(reactor, persistent=True)
    sink = makeSink(reactor, config, refusals, pool)
    events = networkEvents(reactor)
    source = makeSource(reactor, config, strategy, metrics, sink, pool, events)
    notifier = SystemdNotifier(reactor, environ)
    hook = ChangeHook(
        reactor,
        config.hooks.on_change,
        config.hooks.hook_timeout_secs,
        metrics,
        environ,
    )
    sync = PortSync(
        reactor,
        source,
        sink,
        metrics,
        bindInterface=config.net.bind_interface,
        verifyInterval=config.qbittorrent.verify_interval_secs,
        onStatus=lambda status: notifier.status(statusLine(status)),
        onNewPort=hook.onNewPort(source.name, config.net.bind_interface),
        healer=ListenerHealer(
            reactor,
            sink,
            metrics,
            bindInterface=config.net.bind_interface,
            check=config.qbittorrent.check_listener,
        ),
        networkEvents=events,
    )
    web = makeWebService(reactor, reactor, config, lambda: sync.status, metrics)
    top = MultiService()
    ready = ReadinessService(reactor, sync, notifier)
    # Stopped in reverse order: STOPPING=1 first, connections last.
    ConnectionPoolService(pool).setServiceParent(top)  # type: ignore[no-untyped-call]
    if events is not None:
        events.setServiceParent(top)  # type: ignore[no-untyped-call]
    for service in (sync, web, notifier, ready):
        service.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def daemonService(
    reactor: Any,
    options: Options,
    environ: Mapping[str, str],
    uid: int,
    stderr: TextIO,
) -> IService:
    """
    The daemon's service tree with its web ports open, so that a port in use
    is found before the reactor runs; on any start-up error, say what is
    wrong on C{stderr} and exit with the reference's code (2 for the
    configuration, 3 when the strategy cannot work here).
    """
    from qbportsync.web import ListenError

    try:
        config = loadConfig(options["config"], environ)
        service = buildService(
            reactor,
            config,
            options["strategy"],
            environ,
            refusalStore(reactor, config, environ, uid),
        )
        # twistd calls this again after makeService; it opens only the
        # ports not yet open.
        service.privilegedStartService()
    except (ConfigError, ListenError) as e:
        print(f"qb-port-sync: {e}", file=stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except SourceUnavailable as e:
        print(f"qb-port-sync: {e}", file=stderr)
        raise SystemExit(EXIT_UNSUPPORTED) from None
    return service


def makeService(options: Options) -> IService:
    """The twistd entry point: the daemon's service tree."""
    from twisted.internet import reactor

    for flag in ("once", "forget-refusals"):
        if options[flag]:
            print(
                f"twistd qbportsync: --{flag} runs from the qb-port-sync "
                "command, not from twistd",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_CONFIG)
    return daemonService(reactor, options, os.environ, os.getuid(), sys.stderr)
