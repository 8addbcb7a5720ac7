"""
C{qb-port-sync check}: walk through everything the daemon needs, in the
order it needs it, and say for each step whether it works and, when not,
how to fix it.  It changes nothing: no preference is set, no mapping is
requested (NAT-PMP is asked for its external address, PCP for an
ANNOUNCE), and at most one login is sent, none while a refusal is on record.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TextIO, TypeVar

from attrs import evolve, frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python import usage
from twisted.web.client import Agent
from zope.interface import implementer

from qbportsync.config import (
    Config,
    ConfigError,
    QBittorrentConfig,
    loadConfig,
    searchPath,
)
from qbportsync.interfaces import (
    IPortSink,
    IPortSource,
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.plainhttp import mismatchMessage, speaksPlainHTTP
from qbportsync.qbittorrent import (
    LoginRefused,
    QBittorrentClient,
    QBittorrentError,
    makeHTTPClient,
)
from qbportsync.refusals import RefusalStore
from qbportsync.sources.auto import choose
from qbportsync.sources.gateway import GatewayPath, resolvePath
from qbportsync.sources.natpmp import (
    ExternalAddressRequest,
    ExternalAddressResponse,
)
from qbportsync.sources.natpmp import UnsupportedVersion as NATPMPUnsupported
from qbportsync.sources.natpmpclient import RETRY_INITIAL, NATPMPClient
from qbportsync.sources.pcp import AnnounceRequest, AnnounceResponse
from qbportsync.sources.pcp import UnsupportedVersion as PCPUnsupported
from qbportsync.sources.pcpclient import PCPClient
from qbportsync.sources.udpclient import closePort
from qbportsync.sources.wire import Result
from qbportsync.tap import (
    EXIT_CONFIG,
    EXIT_TRANSIENT,
    EXIT_UNSUPPORTED,
    STRATEGIES,
    PrintingOptions,
    makeSource,
    refusalStore,
    strategyOption,
)

Verdict = Literal["ok", "fail", "skip"]
_Answer = TypeVar("_Answer")
"""What a gateway exchange in L{Checker} returns when it succeeds."""

REQUEST_TIMEOUT = 5.0
"""Seconds any one HTTP request of the check may take."""
GATEWAY_TRIES = 4
"""NAT-PMP/PCP requests sent before giving up: 0.25 + 0.5 + 1 + 2 s."""


@frozen
class Step:
    """One thing checked, and what came of it."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""
    exitCode: int = 0
    """The one-shot's exit class this failure belongs to; 0 unless failed."""

    def asDict(self) -> dict[str, object]:
        """The step as C{--json} shows it."""
        return {
            "step": self.name,
            "verdict": self.verdict,
            "detail": self.detail,
            "fix": self.fix or None,
        }


def ok(name: str, detail: str) -> Step:
    return Step(name, "ok", detail)


def skip(name: str, detail: str) -> Step:
    return Step(name, "skip", detail)


def failed(name: str, detail: str, fix: str, exitCode: int) -> Step:
    return Step(name, "fail", detail, fix, exitCode)


@frozen
class CheckReport:
    """Every step, in order, and what they add up to."""

    strategy: str
    steps: tuple[Step, ...]

    @property
    def exitCode(self) -> int:
        """0 when nothing failed, else the exit class of the first failure."""
        for step in self.steps:
            if step.verdict == "fail":
                return step.exitCode
        return 0

    def asJSON(self) -> str:
        """One JSON object with the list of steps."""
        return json.dumps(
            {
                "ok": self.exitCode == 0,
                "exit_code": self.exitCode,
                "strategy": self.strategy,
                "steps": [step.asDict() for step in self.steps],
            }
        )

    def asText(self) -> str:
        """The transcript a person reads."""
        marks = {"ok": " ok ", "fail": "FAIL", "skip": "skip"}
        width = max((len(step.name) for step in self.steps), default=0)
        lines = [f"qb-port-sync check (strategy {self.strategy})"]
        for step in self.steps:
            lines.append(f"[{marks[step.verdict]}] {step.name:<{width}}  {step.detail}")
            if step.fix:
                lines.append(f"       {'':<{width}}  fix: {step.fix}")
        failures = sum(step.verdict == "fail" for step in self.steps)
        if failures:
            lines.append(
                f"{failures} step{'s' if failures > 1 else ''} failed "
                f"(exit {self.exitCode})."
            )
        else:
            lines.append("Everything qb-port-sync needs works.")
        return "\n".join(lines)


def _hostInterfaces() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def _exitClass(error: Exception) -> int:
    """
    The one-shot's exit code for a source's failure (see L{applyOnce}):
    what only the source finds out is 3, whatever the strategy.
    """
    if isinstance(error, ConfigError | SourceUnavailable):
        return EXIT_UNSUPPORTED
    return EXIT_TRANSIENT


def _tlsProblem(error: BaseException) -> str | None:
    """The TLS failure among a connection's reasons, if that is what it was."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    for reason in getattr(error, "reasons", []):
        if isinstance(reason.value, SSL.Error | VerificationError):
            return str(reason.value)
    return None


class Checker:
    """
    Runs the steps.  Every collaborator that touches the system can be
    replaced, for the tests.
    """

    def __init__(
        self,
        reactor: Any,
        configPath: str | None,
        strategy: str,
        environ: Mapping[str, str],
        *,
        platform: str = sys.platform,
        interfaces: Callable[[], Iterable[str]] = _hostInterfaces,
        exists: Callable[[str], bool] = os.path.exists,
        qbHTTP: Callable[[Config], HTTPClient] | None = None,
        sourceFor: Callable[[Config, str, IPortSink], IPortSource] | None = None,
        webHTTP: HTTPClient | None = None,
        gatewayPath: Callable[[Config], Deferred[GatewayPath]] | None = None,
        refusals: Callable[[Config], RefusalStore],
        plainHTTP: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._configPath = configPath
        self._strategy = strategy
        self._environ = environ
        self._platform = platform
        self._interfaces = interfaces
        self._exists = exists
        self._qbHTTP = qbHTTP or (
            lambda config: makeHTTPClient(reactor, config.qbittorrent)
        )
        self._sourceFor = sourceFor or (
            lambda config, strategy, sink: makeSource(
                reactor, config, strategy, Metrics.create(), sink
            )
        )
        self._webHTTP = webHTTP or HTTPClient(Agent(reactor))
        self._refusals = refusals
        self._plainHTTP = plainHTTP or (lambda url: speaksPlainHTTP(reactor, url))
        self._qbInterfaces: set[str] | None = None
        """The interfaces qBittorrent lists, once logged in."""
        self._gatewayPath = gatewayPath or (lambda config: resolvePath(reactor, config))

    def run(self) -> Deferred[CheckReport]:
        """Every step, in order; steps that depend on a failed one are skipped."""
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> CheckReport:
        steps: list[Step] = []
        config, step = self.config()
        steps.append(step)
        if config is None:
            for name in ("secrets", "qbittorrent", "source", "metrics"):
                steps.append(skip(name, "needs a valid configuration"))
            return CheckReport(self._strategy, tuple(steps))
        steps.extend(self.secrets(config))
        steps.extend(await self.qbittorrent(config))
        steps.append(self.interface(config))
        steps.extend(await self.source(config))
        steps.extend(await self.listeners(config))
        return CheckReport(self._strategy, tuple(steps))

    def config(self) -> tuple[Config | None, Step]:
        """The configuration file: found, and valid."""
        try:
            config = loadConfig(self._configPath, self._environ)
        except ConfigError as e:
            return None, failed(
                "config",
                str(e),
                "correct the key named above (config/config.example.toml "
                "lists every key with its default)",
                EXIT_CONFIG,
            )
        if config.path is None:
            looked = ", ".join(searchPath(self._environ, self._platform))
            return config, ok(
                "config",
                f"no configuration file (looked for {looked}): built-in "
                "defaults and the environment",
            )
        return config, ok("config", f"{config.path} is valid")

    def secrets(self, config: Config) -> list[Step]:
        """Files holding a secret must be readable by their owner only."""
        holders = []
        if config.path is not None:
            try:
                with open(config.path, "rb") as f:
                    tables = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError):
                tables = {}
            holds = any(
                isinstance(table, dict)
                and any(table.get(key) for key in ("password", "api_key"))
                for table in tables.values()
            )
            if holds:
                holders.append(config.path)
            qb = tables.get("qbittorrent", {})
            passwordFile = qb.get("password_file") if isinstance(qb, dict) else None
            if isinstance(passwordFile, str) and passwordFile:
                holders.append(os.path.expanduser(passwordFile))
        if not holders:
            return [skip("secrets", "no file holds a password or API key")]
        shared = []
        for path in holders:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError:
                continue
            if mode & 0o077:
                shared.append(f"{path} (mode {mode:04o})")
        if shared:
            return [
                failed(
                    "secrets",
                    "other users can read " + ", ".join(shared),
                    "chmod 600 " + " ".join(s.split(" (")[0] for s in shared),
                    EXIT_CONFIG,
                )
            ]
        return [ok("secrets", "only their owner can read " + ", ".join(holders))]

    async def qbittorrent(self, config: Config) -> list[Step]:
        """Reachable, TLS, login, CSRF/Host, versions."""
        qb = config.qbittorrent
        names = ("login", "csrf", "version")
        try:
            http = self._qbHTTP(config)
        except ConfigError as e:
            return [
                skip("qbittorrent", "needs a usable ca_file"),
                failed(
                    "tls",
                    str(e),
                    "set [qbittorrent] ca_file to the PEM file of the CA that "
                    "signed qBittorrent's certificate",
                    EXIT_CONFIG,
                ),
                *(skip(name, "needs a usable ca_file") for name in names),
            ]
        url = f"{qb.base_url}/api/v2/app/webapiVersion"
        try:
            response = await self._timed(http.get(url, allow_redirects=False))
            code = response.code
            await response.content()
        except Exception as e:
            tls = _tlsProblem(e)
            if qb.base_url.startswith("https:") and await self._plainHTTP(qb.base_url):
                return [
                    ok("qbittorrent", f"{qb.base_url} accepts connections"),
                    failed(
                        "tls",
                        mismatchMessage(qb.base_url),
                        "set [qbittorrent] base_url to http://..., or enable "
                        "HTTPS in qBittorrent (Options > Web UI)",
                        EXIT_CONFIG,
                    ),
                    *(skip(name, "needs a TLS connection") for name in names),
                ]
            if tls is None:
                return [
                    failed(
                        "qbittorrent",
                        f"{qb.base_url}: {_describe(e)}",
                        "start qBittorrent with its Web UI on (Tools > "
                        "Options > Web UI), or set [qbittorrent] base_url "
                        "to where it answers",
                        EXIT_TRANSIENT,
                    ),
                    skip("tls", "needs qBittorrent to answer"),
                    *(skip(name, "needs qBittorrent to answer") for name in names),
                ]
            return [
                ok("qbittorrent", f"{qb.base_url} accepts connections"),
                failed(
                    "tls",
                    f"the certificate of {qb.base_url} could not be verified ({tls})",
                    "set [qbittorrent] ca_file to the PEM file of the CA that "
                    "signed qBittorrent's certificate (for a self-signed one, "
                    "that certificate itself)",
                    EXIT_CONFIG,
                ),
                *(skip(name, "needs a trusted connection") for name in names),
            ]
        steps = [ok("qbittorrent", f"{qb.base_url} answers (HTTP {code})")]
        if qb.base_url.startswith("https:"):
            trust = f"the CA in {qb.ca_file}" if qb.ca_file else "the system's CAs"
            steps.append(ok("tls", f"certificate verified against {trust}"))
        else:
            steps.append(skip("tls", "plain HTTP"))
        steps.extend(await self.login(config, http))
        return steps

    async def login(self, config: Config, http: HTTPClient) -> list[Step]:
        """One login at most (none with an API key), then the versions."""
        qb = config.qbittorrent
        if not qb.api_key and not qb.password:
            return [
                failed(
                    "login",
                    "no password: [qbittorrent] password, password_file and "
                    "QB_PORT_SYNC_QB_PASSWORD are all empty (no login was sent)",
                    "set one of them to the Web UI password",
                    EXIT_CONFIG,
                ),
                *_NEEDS_LOGIN,
            ]
        # The record every run shares: no login while a refusal is on it.
        client = QBittorrentClient(self._reactor, http, qb, self._refusals(config))
        how = "API key" if qb.api_key else f"user {qb.username!r}"
        try:
            version = await self._timed(client.version())
        except LoginRefused as e:
            fix = (
                "check [qbittorrent] api_key (API keys need qBittorrent 5.2+)"
                if qb.api_key
                else "check [qbittorrent] username and the password"
            )
            if e.reason == "banned":
                fix = (
                    "wait for qBittorrent's ban to end (WebUI\\BanDuration, "
                    "1 hour by default) or restart qBittorrent, then " + fix
                )
            return [
                failed("login", str(e), fix, EXIT_TRANSIENT),
                *_NEEDS_LOGIN,
            ]
        except QBittorrentError as e:
            if "401 Unauthorized" in str(e):
                return [
                    skip("login", "qBittorrent refused the request before the login"),
                    failed(
                        "csrf",
                        str(e),
                        "set [qbittorrent] base_url to the address qBittorrent "
                        "is reached at; a reverse proxy must pass the Host "
                        "header through (or add the name to qBittorrent's "
                        "WebUI\\ServerDomains)",
                        EXIT_CONFIG,
                    ),
                    skip("version", "needs a login"),
                ]
            return [
                failed("login", str(e), "see the error above", EXIT_TRANSIENT),
                *_NEEDS_LOGIN,
            ]
        api = (await self._get(http, qb, "app/webapiVersion")).strip()[:20]
        listed = await self._get(http, qb, "app/networkInterfaceList")
        try:
            entries = json.loads(listed)
            self._qbInterfaces = {
                str(entry.get(key))
                for entry in entries
                if isinstance(entry, dict)
                for key in ("name", "value")
            }
        except (ValueError, TypeError):
            self._qbInterfaces = None
        return [
            ok("login", f"accepted ({how})"),
            ok("csrf", "qBittorrent accepted our Host, Origin and Referer"),
            ok("version", f"qBittorrent {version}, Web API {api}"),
        ]

    async def _get(self, http: HTTPClient, qb: QBittorrentConfig, path: str) -> str:
        """A read-only call in the session the login opened; "" if it fails."""
        headers: dict[bytes | str, bytes | str] = {}
        if qb.api_key:
            headers["Authorization"] = f"Bearer {qb.api_key}"
        try:
            response = await self._timed(
                http.get(f"{qb.base_url}/api/v2/{path}", headers=headers)
            )
            body: bytes = await response.content()
        except Exception:
            return ""
        if response.code != 200:
            return ""
        return body.decode("utf-8", "replace")

    def interface(self, config: Config) -> Step:
        """
        C{[net] bind_interface} is one qBittorrent knows (it binds only to
        those), and one of this host's when qBittorrent's list is unknown.
        """
        name = config.net.bind_interface
        if not name:
            return skip("interface", "no [net] bind_interface")
        here = name in self._interfaces()
        if self._qbInterfaces is not None:
            if name in self._qbInterfaces:
                where = (
                    "" if here else " (not on this host: qBittorrent runs elsewhere)"
                )
                return ok("interface", f"qBittorrent lists {name}{where}")
            return failed(
                "interface",
                f"qBittorrent does not list {name} ([net] bind_interface), so the "
                "port would be set without binding to it",
                "bring the VPN up where qBittorrent runs, or set [net] "
                "bind_interface to one of: " + ", ".join(sorted(self._qbInterfaces)),
                EXIT_TRANSIENT,
            )
        if here:
            return ok("interface", f"{name} is present (qBittorrent's list unread)")
        return failed(
            "interface",
            f"{name} ([net] bind_interface) is not an interface of this host",
            "bring the VPN up, or set [net] bind_interface to its interface "
            "(ip link lists them)",
            EXIT_TRANSIENT,
        )

    async def source(self, config: Config) -> list[Step]:
        """Where the port comes from, as the daemon would look."""
        strategy = self._strategy
        steps = []
        if strategy == "auto":
            try:
                choice = choose(
                    config.protonvpn.forwarded_port_path,
                    self._platform,
                    self._exists,
                    config.gluetun.url,
                )
            except SourceUnavailable as e:
                return [failed("strategy", str(e), "", EXIT_UNSUPPORTED)]
            steps.append(ok("strategy", choice.reason))
            strategy = {"gateway": "pcp"}.get(choice.kind, choice.kind)
        if strategy in ("file", "gluetun"):
            steps.append(await self.fetched(config, strategy))
        else:
            steps.extend(await self.gateway(config, strategy))
        return steps

    async def fetched(self, config: Config, strategy: str) -> Step:
        """The port file or gluetun, asked once as the one-shot would."""
        name = "port file" if strategy == "file" else "gluetun"
        fixes = {
            "file": "connect the VPN with port forwarding on, or set "
            "[protonvpn] forwarded_port_path to the file it writes",
            "gluetun": "check [gluetun] url and its credentials, and that "
            "gluetun runs with VPN_PORT_FORWARDING=on",
        }
        try:
            source = self._sourceFor(config, strategy, _NoSink())
            forwarded = await self._timed(source.fetchOnce())
        except (ConfigError, SourceError, SourceUnavailable) as e:
            return failed(name, str(e), fixes[strategy], _exitClass(e))
        if strategy == "file":
            where = config.protonvpn.forwarded_port_path
        else:
            where = f"gluetun at {config.gluetun.url or 'http://127.0.0.1:8000'}"
        return ok(name, f"{where} says port {forwarded.port}")

    async def gateway(self, config: Config, strategy: str) -> list[Step]:
        """The gateway found, then asked something that maps nothing."""
        try:
            path = await self._gatewayPath(config)
        except (ConfigError, SourceError, SourceUnavailable, OSError) as e:
            return [
                failed(
                    "gateway",
                    str(e),
                    'set [portmap] gateway (ProtonVPN: "10.2.0.1") or bring the VPN up',
                    EXIT_TRANSIENT if isinstance(e, OSError) else _exitClass(e),
                ),
                skip(strategy, "needs a gateway"),
            ]
        gateway, bind = path.gateway, path.source
        steps = [ok("gateway", f"{gateway}, route: {path.route}")]
        if strategy == "pcp":
            pcp = await self.announce(gateway, bind)
            steps.append(pcp)
            if pcp.verdict == "ok":
                return steps
            if "speaks NAT-PMP" not in pcp.detail:
                return steps
            # The daemon falls back to NAT-PMP at once: so does the check.
            steps[-1] = evolve(pcp, verdict="skip", fix="", exitCode=0)
        steps.append(await self.externalAddress(gateway, bind))
        return steps

    async def _exchange(
        self,
        name: str,
        gateway: str,
        bind: str,
        client: DatagramProtocol,
        ask: Callable[[], Awaitable[_Answer]],
    ) -> _Answer | Step:
        """
        Ask the gateway through C{client}, bound to C{bind}: its answer, or
        the failed step C{name} when none came.
        """
        port = self._reactor.listenUDP(0, client, interface=bind)
        try:
            return await ask()
        except CancelledError:
            return failed(name, _closed(gateway), _NO_FORWARDING, EXIT_UNSUPPORTED)
        except (SourceError, SourceUnavailable) as e:
            return failed(name, str(e), _NO_FORWARDING, _exitClass(e))
        finally:
            await closePort(port)

    async def externalAddress(self, gateway: str, bind: str) -> Step:
        """NAT-PMP: the gateway's external address and epoch."""
        client = NATPMPClient(self._reactor, gateway, Metrics.create(), lambda e: None)
        response = await self._exchange(
            "natpmp",
            gateway,
            bind,
            client,
            lambda: client.request(ExternalAddressRequest(), GATEWAY_TRIES),
        )
        if isinstance(response, Step):
            return response
        if isinstance(response, NATPMPUnsupported):
            return failed(
                "natpmp",
                f"{gateway} answered in another version ({response.version})",
                "",
                EXIT_UNSUPPORTED,
            )
        if not isinstance(response, ExternalAddressResponse):
            return failed(
                "natpmp",
                f"{gateway} answered {response.result.value}",
                "",
                EXIT_TRANSIENT,
            )
        if response.result != Result.SUCCESS:
            return failed(
                "natpmp",
                f"{gateway} answered {response.result.value}",
                _NO_FORWARDING,
                EXIT_TRANSIENT,
            )
        return ok(
            "natpmp",
            f"{gateway} answers: external address {response.address}, epoch "
            f"{response.epoch} s",
        )

    async def announce(self, gateway: str, bind: str) -> Step:
        """PCP: an ANNOUNCE, answered with the gateway's epoch."""
        client = PCPClient(
            self._reactor, gateway, Metrics.create(), lambda e: None, lambda r: None
        )
        waits = [RETRY_INITIAL * 2**n for n in range(GATEWAY_TRIES)]
        response = await self._exchange(
            "pcp",
            gateway,
            bind,
            client,
            lambda: client.send(AnnounceRequest(client.clientAddress), waits),
        )
        if isinstance(response, Step):
            return response
        if isinstance(response, PCPUnsupported):
            return failed(
                "pcp",
                f"{gateway} speaks NAT-PMP, not PCP (version {response.version})",
                "",
                EXIT_UNSUPPORTED,
            )
        if not isinstance(response, AnnounceResponse):
            return failed("pcp", f"{gateway} answered out of turn", "", EXIT_TRANSIENT)
        if response.result != Result.SUCCESS:
            return failed(
                "pcp",
                f"{gateway} answered the ANNOUNCE with {response.result.value}",
                _NO_FORWARDING,
                EXIT_TRANSIENT,
            )
        # An ANNOUNCE's lifetime is 0 by RFC 6887 §14.1; show one only if given.
        lifetime = f", lifetime {response.lifetime} s" if response.lifetime else ""
        return ok("pcp", f"{gateway} answers: epoch {response.epoch} s{lifetime}")

    async def listeners(self, config: Config) -> list[Step]:
        """The metrics and health ports can be opened (or we already serve them)."""
        wanted: list[tuple[str, str, int]] = []
        for name, listen in (("metrics", config.metrics), ("health", config.health)):
            if listen.enabled and (listen.address, listen.port) not in [
                (a, p) for _, a, p in wanted
            ]:
                wanted.append((name, listen.address, listen.port))
        if not wanted:
            return [skip("metrics", "metrics and health are off")]
        steps = []
        for name, address, port in wanted:
            steps.append(await self.listener(name, address, port))
        return steps

    async def listener(self, name: str, address: str, port: int) -> Step:
        try:
            listening = self._reactor.listenTCP(
                port, Factory.forProtocol(Protocol), interface=address
            )
        except CannotListenError as e:
            host = f"[{address}]" if ":" in address else address
            try:
                response = await self._timed(
                    self._webHTTP.get(f"http://{host}:{port}/metrics")
                )
                body = await response.content()
            except Exception:
                body = b""
            if b"qb_port_sync_" in body:
                return ok(
                    name,
                    f"{address}:{port} is served by a running qb-port-sync",
                )
            return failed(
                name,
                f"cannot listen on {address}:{port}: {e.socketError}",
                f"choose another [{name}] port, or stop what listens there",
                EXIT_CONFIG,
            )
        await closePort(listening)
        return ok(name, f"{address}:{port} is free")

    async def _timed(self, d: Deferred[Any]) -> Any:
        d.addTimeout(REQUEST_TIMEOUT, self._reactor)
        return await d


_NEEDS_LOGIN = (skip("csrf", "needs a login"), skip("version", "needs a login"))
"""The steps a login that was not made leaves unchecked."""

_NO_FORWARDING = (
    "the VPN server must offer port forwarding (ProtonVPN: a P2P server, and "
    "NAT-PMP on in the WireGuard profile)"
)


def _closed(gateway: str) -> str:
    # Under epoll an ICMP port unreachable closes the socket (FACTS.md).
    return f"{gateway} refused (ICMP port unreachable): nothing listens on port 5351"


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__


@implementer(IPortSink)
class _NoSink:
    """The sink a source gets in a check: asked nothing."""

    def apply(self, port: int, bindInterface: str) -> Deferred[Any]:
        raise AssertionError("check applies nothing")

    def listenPort(self) -> Deferred[int]:
        raise AssertionError("check asks no port")

    def relisten(self, port: int, address: str, how: str) -> Deferred[None]:
        raise AssertionError("check changes nothing")


class CheckOptions(PrintingOptions):
    """C{qb-port-sync check [--config PATH] [--strategy S] [--json]}."""

    synopsis = "check [--config PATH] [--strategy NAME] [--json]"
    longdesc = (
        "Check, without changing anything, that everything the daemon needs "
        "works: the configuration, qBittorrent, the port source, the metrics "
        "port. Exit 0 when all pass, else the exit code of the first failure."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the search path)."],
        [
            "strategy",
            "s",
            "auto",
            "The port source to check: " + ", ".join(STRATEGIES) + ".",
        ],
    ]
    optFlags = [["json", None, "Print one JSON object with the list of steps."]]

    def opt_strategy(self, value: str) -> None:
        """The port source to check: file, natpmp, pcp, gluetun or auto."""
        self["strategy"] = strategyOption(value)

    opt_s = opt_strategy


async def runCheck(
    reactor: Any,
    argv: list[str],
    environ: Mapping[str, str],
    uid: int,
    out: TextIO,
    err: TextIO,
) -> int:
    """The C{check} subcommand: print the report, return the exit code."""
    options = CheckOptions(out)
    try:
        options.parseOptions(argv)  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        print(
            f"qb-port-sync check: {e}\nRun 'qb-port-sync check --help' for the "
            "options.",
            file=err,
        )
        return EXIT_CONFIG
    checker = Checker(
        reactor,
        options["config"],
        options["strategy"],
        environ,
        refusals=lambda config: refusalStore(reactor, config, environ, uid),
    )
    report = await checker.run()
    print(report.asJSON() if options["json"] else report.asText(), file=out)
    return report.exitCode
