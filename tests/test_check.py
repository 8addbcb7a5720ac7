"""Tests for qbportsync.check, each step against fakes."""

from __future__ import annotations

import json
import os
from io import StringIO
from pathlib import Path
from typing import Any, cast

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from qbportsync.check import Checker, CheckReport, Step, runCheck
from qbportsync.config import Config
from qbportsync.interfaces import IPortSink, IPortSource
from qbportsync.metrics import Metrics
from qbportsync.refusals import RefusalStore
from qbportsync.sources import natpmp, pcp
from qbportsync.sources.gateway import GatewayPath, resolvePath
from qbportsync.sources.gluetun import GluetunSource
from qbportsync.sources.portfile import PortFileSource
from qbportsync.sources.wire import Result
from tests.fakegluetun import FakeGluetun
from tests.fakeqbittorrent import FakeQBittorrent
from tests.fakeudp import GATEWAY, SERVER, MemoryUDPReactor

PASSWORD = "check-Secret-Pass-31"
BASE = "http://127.0.0.1:8080"


class _ForeignHost(Resource):
    """A proxy that changes the Host header, so Origin no longer matches it."""

    isLeaf = True

    def __init__(self, wrapped: Resource) -> None:
        super().__init__()
        self._wrapped = wrapped

    def render(self, request: Request) -> bytes:
        request.requestHeaders.setRawHeaders(b"host", [b"elsewhere.example:8080"])
        result: bytes = self._wrapped.render(request)
        return result


class _Refusing:
    """An HTTP client whose every request fails as C{error} does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(self.error)


class _Reasons(Exception):
    """What the Agent raises when a connection broke: a list of reasons."""

    def __init__(self, reasons: list[Failure]) -> None:
        super().__init__("connection lost")
        self.reasons = reasons


class _Port:
    def __init__(self) -> None:
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True


class CheckReactor(MemoryUDPReactor):
    """UDP and time from MemoryUDPReactor; TCP ports that are free or taken."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: set[int] = set()
        self.tcpPorts: list[_Port] = []

    def listenTCP(
        self, port: int, factory: object, backlog: int = 50, interface: str = ""
    ) -> _Port:
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "in use"))
        listening = _Port()
        self.tcpPorts.append(listening)
        return listening


class CheckTestCase(SynchronousTestCase):
    """Helpers: a config file, a fake qBittorrent, a checker wired to them."""

    def setUp(self) -> None:
        self.reactor = CheckReactor()
        self.qb = FakeQBittorrent("4.5", password=PASSWORD)
        self.qbResource: Resource = self.qb.resource()
        self.http: Any = None
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()
        self.portFile = self.directory / "forwarded_port"
        self.portFile.write_text("45678\n")
        self.gluetun = FakeGluetun(port=40000)
        self.interfaces = ["lo", "wg0"]
        self.exists: set[str] = set()
        self.web: Any = StubTreq(Resource())
        self.speaksPlainHTTP = False
        self.probed: list[str] = []

    def writeConfig(self, text: str = "", mode: int = 0o600, base: str = BASE) -> str:
        path = self.directory / "config.toml"
        path.write_text(
            f'[qbittorrent]\nbase_url = "{base}"\n'
            f'[protonvpn]\nforwarded_port_path = "{self.portFile}"\n' + text
        )
        path.chmod(mode)
        return str(path)

    def sourceFor(self, config: Config, strategy: str, sink: IPortSink) -> IPortSource:
        if strategy == "gluetun":
            http = cast(HTTPClient, StubTreq(self.gluetun.resource()))
            return GluetunSource(self.reactor, http, config.gluetun, Metrics.create())
        return PortFileSource(
            self.reactor,
            FilePath(config.protonvpn.forwarded_port_path),
            Metrics.create(),
            None,
        )

    def checker(
        self, config: str | None, strategy: str = "file", **environ: str
    ) -> Checker:
        http = self.http or StubTreq(self.qbResource)
        return Checker(
            self.reactor,
            config,
            strategy,
            {"QB_PORT_SYNC_QB_PASSWORD": PASSWORD, "HOME": "/nonexistent", **environ},
            platform="linux",
            interfaces=lambda: self.interfaces,
            exists=self.exists.__contains__,
            qbHTTP=lambda config: cast(HTTPClient, http),
            sourceFor=self.sourceFor,
            webHTTP=cast(HTTPClient, self.web),
            gatewayPath=self.gatewayPath,
            plainHTTP=self.plainHTTP,
            refusals=lambda config: RefusalStore(
                self.reactor, str(self.directory / "state")
            ),
        )

    async def plainHTTP(self, url: str) -> bool:
        self.probed.append(url)
        return self.speaksPlainHTTP

    def gatewayPath(self, config: Config) -> Deferred[GatewayPath]:
        if config.portmap.gateway:
            route = f"{config.portmap.gateway} dev wg0 table 51820 src 10.2.0.2"
            return succeed(GatewayPath(config.portmap.gateway, "", "wg0", route))
        return resolvePath(self.reactor, config)

    def check(
        self, config: str | None, strategy: str = "file", **env: str
    ) -> CheckReport:
        return self.successResultOf(self.checker(config, strategy, **env).run())

    def step(self, report: CheckReport, name: str) -> Step:
        [step] = [s for s in report.steps if s.name == name]
        return step

    def verdicts(self, report: CheckReport) -> dict[str, str]:
        return {s.name: s.verdict for s in report.steps}


class AllPassTests(CheckTestCase):
    """A working set-up: every step ok or skipped, exit 0."""

    def test_allPass(self) -> None:
        """Each step's verdict and what it found."""
        self.qb.interfaces.append({"name": "wg0", "value": "wg0"})
        report = self.check(self.writeConfig('[net]\nbind_interface = "wg0"\n'))
        self.assertEqual(
            [(s.name, s.verdict, s.detail) for s in report.steps],
            [
                ("config", "ok", f"{self.directory}/config.toml is valid"),
                ("secrets", "skip", "no file holds a password or API key"),
                ("qbittorrent", "ok", f"{BASE} answers (HTTP 403)"),
                ("tls", "skip", "plain HTTP"),
                ("login", "ok", "accepted (user 'admin')"),
                ("csrf", "ok", "qBittorrent accepted our Host, Origin and Referer"),
                ("version", "ok", "qBittorrent v4.5.2, Web API 2.8.19"),
                ("interface", "ok", "qBittorrent lists wg0"),
                ("port file", "ok", f"{self.portFile} says port 45678"),
                ("metrics", "skip", "metrics and health are off"),
            ],
        )
        self.assertEqual(report.exitCode, 0)

    def test_changesNothing(self) -> None:
        """One login, no setPreferences: qBittorrent is only read."""
        self.check(self.writeConfig())
        self.assertEqual(self.qb.loginAttempts, 1)
        self.assertNotIn(
            "/api/v2/app/setPreferences", [r.path for r in self.qb.requests]
        )
        self.assertEqual(self.qb.preferences["listen_port"], 8999)

    def test_text(self) -> None:
        """The transcript: one line a step, the fix under a failure, a verdict."""
        report = CheckReport(
            "file",
            (
                Step("config", "ok", "/etc/x.toml is valid"),
                Step("login", "fail", "refused", "check the password", 1),
                Step("version", "skip", "needs a login"),
            ),
        )
        self.assertEqual(
            report.asText(),
            "qb-port-sync check (strategy file)\n"
            "[ ok ] config   /etc/x.toml is valid\n"
            "[FAIL] login    refused\n"
            "                fix: check the password\n"
            "[skip] version  needs a login\n"
            "1 step failed (exit 1).",
        )

    def test_json(self) -> None:
        """--json: one object with the steps, fix null where there is none."""
        report = CheckReport(
            "pcp",
            (
                Step("config", "ok", "fine"),
                Step("pcp", "fail", "silent", "forward", 3),
            ),
        )
        self.assertEqual(
            json.loads(report.asJSON()),
            {
                "ok": False,
                "exit_code": 3,
                "strategy": "pcp",
                "steps": [
                    {"step": "config", "verdict": "ok", "detail": "fine", "fix": None},
                    {
                        "step": "pcp",
                        "verdict": "fail",
                        "detail": "silent",
                        "fix": "forward",
                    },
                ],
            },
        )


class ConfigStepTests(CheckTestCase):
    """Config found and valid; secrets' permissions."""

    def test_invalid(self) -> None:
        """An invalid file fails with exit 2; the rest is skipped."""
        report = self.check(self.writeConfig("[metrics]\nport = 70000\n"))
        self.assertEqual(report.steps[0].verdict, "fail")
        self.assertIn("metrics.port must be a whole number", report.steps[0].detail)
        self.assertEqual({s.verdict for s in report.steps[1:]}, {"skip"}, report.steps)
        self.assertEqual(report.exitCode, 2)
        self.assertEqual(self.qb.requests, [])

    def test_noFile(self) -> None:
        """No file anywhere: ok, naming where it looked."""
        report = self.check(None, XDG_CONFIG_HOME=str(self.directory / "none"))
        self.assertIn("no configuration file (looked for", report.steps[0].detail)
        self.assertEqual(report.steps[0].verdict, "ok")

    def test_sharedSecret(self) -> None:
        """A password in a file others can read fails with the chmod fix."""
        path = self.writeConfig(f'[gluetun]\napi_key = "{PASSWORD}"\n', mode=0o644)
        step = self.step(self.check(path), "secrets")
        self.assertEqual(
            (step.verdict, step.fix, step.exitCode), ("fail", f"chmod 600 {path}", 2)
        )
        self.assertNotIn(PASSWORD, step.detail)

    def test_privateSecretFile(self) -> None:
        """A private password_file passes."""
        secret = self.directory / "password"
        secret.write_text(PASSWORD)
        secret.chmod(0o600)
        config = self.directory / "config.toml"
        config.write_text(f'[qbittorrent]\npassword_file = "{secret}"\n')
        config.chmod(0o644)
        path = str(config)
        step = self.step(self.check(path), "secrets")
        self.assertEqual(
            (step.verdict, step.detail), ("ok", f"only their owner can read {secret}")
        )


class QBittorrentStepTests(CheckTestCase):
    """Reachable, TLS, login, CSRF, version."""

    def test_wrongPassword(self) -> None:
        """A refused login: exit 1, exactly one attempt, versions skipped."""
        report = self.check(self.writeConfig(), QB_PORT_SYNC_QB_PASSWORD="wrong")
        step = self.step(report, "login")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("wrong username or password", step.detail)
        self.assertEqual(self.qb.loginAttempts, 1)
        self.assertEqual(self.verdicts(report)["version"], "skip")
        self.assertEqual(report.exitCode, 1)

    def test_noLoginWhileRefused(self) -> None:
        """A second check right after a refused login sends no login at all."""
        path = self.writeConfig()
        self.check(path, QB_PORT_SYNC_QB_PASSWORD="wrong")
        report = self.check(path, QB_PORT_SYNC_QB_PASSWORD="wrong")
        self.assertEqual(self.qb.loginAttempts, 1)
        step = self.step(report, "login")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))

    def test_banned(self) -> None:
        """A ban says to wait for it to end."""
        self.qb.failedLogins = self.qb.maxFailures
        step = self.step(self.check(self.writeConfig()), "login")
        self.assertIn("wait for qBittorrent's ban to end", step.fix)

    def test_noPasswordNoLogin(self) -> None:
        """Without any password, no login is sent at all: exit 2."""
        report = self.check(self.writeConfig(), QB_PORT_SYNC_QB_PASSWORD="")
        step = self.step(report, "login")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 2))
        self.assertEqual(self.qb.loginAttempts, 0)

    def test_csrf(self) -> None:
        """A Host that does not match base_url fails the CSRF step: exit 2."""
        self.qbResource = _ForeignHost(self.qb.resource())
        report = self.check(self.writeConfig())
        self.assertEqual(
            (self.verdicts(report)["login"], self.verdicts(report)["csrf"]),
            ("skip", "fail"),
        )
        self.assertIn("ServerDomains", self.step(report, "csrf").fix)
        self.assertEqual(report.exitCode, 2)

    def test_unreachable(self) -> None:
        """Connection refused: exit 1 with the fix; the rest of qBittorrent skipped."""
        self.http = _Refusing(ConnectionRefusedError())
        report = self.check(self.writeConfig())
        step = self.step(report, "qbittorrent")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("base_url", step.fix)
        for name in ("tls", "login", "csrf", "version"):
            self.assertEqual(self.verdicts(report)[name], "skip")
        self.assertEqual(self.step(report, "port file").verdict, "ok")

    def test_untrusted(self) -> None:
        """A certificate that does not verify fails TLS with the ca_file fix."""
        from OpenSSL import SSL

        self.http = _Refusing(
            _Reasons([Failure(SSL.Error("certificate verify failed"))])
        )
        report = self.check(self.writeConfig())
        self.assertEqual(self.verdicts(report)["qbittorrent"], "ok")
        step = self.step(report, "tls")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 2))
        self.assertIn("[qbittorrent] ca_file", step.fix)


class PlainHTTPTests(CheckTestCase):
    """An https:// base_url in front of a plain-HTTP qBittorrent."""

    def test_named(self) -> None:
        """TLS fails naming the mismatch, not the certificate; exit 2."""
        self.http = _Refusing(_Reasons([Failure(ConnectionRefusedError())]))
        self.speaksPlainHTTP = True
        report = self.check(self.writeConfig(base="https://127.0.0.1:8080"))
        step = self.step(report, "tls")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 2))
        self.assertIn("answered in plain HTTP, not TLS", step.detail)
        self.assertEqual(self.probed, ["https://127.0.0.1:8080"])

    def test_notAskedForHTTP(self) -> None:
        """An http:// base_url is never probed."""
        self.http = _Refusing(ConnectionRefusedError())
        self.check(self.writeConfig())
        self.assertEqual(self.probed, [])


class InterfaceStepTests(CheckTestCase):
    """[net] bind_interface: in qBittorrent's list, else on this host."""

    def config(self) -> str:
        return self.writeConfig('[net]\nbind_interface = "wg0"\n')

    def test_notListed(self) -> None:
        """An interface qBittorrent does not list fails, naming those it does."""
        step = self.step(self.check(self.config()), "interface")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("one of: eth0, lo", step.fix)

    def test_listedElsewhere(self) -> None:
        """Listed by qBittorrent but not here: qBittorrent runs elsewhere, ok."""
        self.qb.interfaces.append({"name": "wg0", "value": "wg0"})
        self.interfaces = ["lo"]
        step = self.step(self.check(self.config()), "interface")
        self.assertEqual(
            (step.verdict, step.detail),
            (
                "ok",
                "qBittorrent lists wg0 (not on this host: qBittorrent runs elsewhere)",
            ),
        )

    def test_hostOnlyWithoutLogin(self) -> None:
        """Without a login, the host's own interfaces decide."""
        self.http = _Refusing(ConnectionRefusedError())
        step = self.step(self.check(self.config()), "interface")
        self.assertEqual(step.detail, "wg0 is present (qBittorrent's list unread)")
        self.interfaces = ["lo"]
        step = self.step(self.check(self.config()), "interface")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("bring the VPN up", step.fix)


class SourceStepTests(CheckTestCase):
    """Port file, gluetun, and auto's choice."""

    def test_emptyPortFile(self) -> None:
        """An empty port file fails, exit 1."""
        self.portFile.write_text("")
        step = self.step(self.check(self.writeConfig()), "port file")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("is empty", step.detail)

    def test_noDirectory(self) -> None:
        """No directory for the port file: exit 3 (unsupported here)."""
        self.portFile = self.directory / "none" / "forwarded_port"
        step = self.step(self.check(self.writeConfig()), "port file")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 3))

    def test_gluetun(self) -> None:
        """gluetun answering with its port passes."""
        step = self.step(
            self.check(
                self.writeConfig('[gluetun]\nurl = "http://127.0.0.1:8000"\n'),
                "gluetun",
            ),
            "gluetun",
        )
        self.assertEqual(
            (step.verdict, step.detail),
            ("ok", "gluetun at http://127.0.0.1:8000 says port 40000"),
        )

    def test_gluetunRefused(self) -> None:
        """gluetun refusing our key fails with exit 1 (auth), as the one-shot does."""
        self.gluetun.apiKey = "their-key"
        step = self.step(self.check(self.writeConfig(), "gluetun"), "gluetun")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 1))
        self.assertIn("[gluetun] api_key", step.detail)

    def test_autoChoosesGluetun(self) -> None:
        """auto says what it chose, then checks that source."""
        report = self.check(
            self.writeConfig('[gluetun]\nurl = "http://127.0.0.1:8000"\n'), "auto"
        )
        self.assertEqual(
            self.step(report, "strategy").detail,
            "auto chose gluetun's control server: [gluetun] url is set",
        )
        self.assertEqual(self.verdicts(report)["gluetun"], "ok")

    def test_autoChoosesFile(self) -> None:
        """auto with the port file present checks the file."""
        self.exists.add(str(self.portFile))
        report = self.check(self.writeConfig(), "auto")
        self.assertEqual(self.verdicts(report)["port file"], "ok")


class GatewayStepTests(CheckTestCase):
    """NAT-PMP and PCP: asked nothing that maps."""

    def config(self) -> str:
        return self.writeConfig(f'[portmap]\ngateway = "{GATEWAY}"\n')

    def sent(self) -> list[bytes]:
        return [d for p in self.reactor.udpPorts for d, _ in p.written]

    def socket(self) -> Any:
        return next(p for p in self.reactor.open() if p.connectedTo == SERVER)

    def answer(self, data: bytes) -> None:
        self.socket().protocol.datagramReceived(data, SERVER)

    def test_natpmpExternalAddress(self) -> None:
        """NAT-PMP: one external-address request, its answer shown, port closed."""
        d = self.checker(self.config(), "natpmp").run()
        self.assertEqual(
            [natpmp.decodeRequest(x) for x in self.sent()],
            [natpmp.ExternalAddressRequest()],
        )
        self.answer(
            natpmp.encodeResponse(
                natpmp.ExternalAddressResponse(Result.SUCCESS, 1234, "203.0.113.5")
            )
        )
        report = self.successResultOf(d)
        self.assertEqual(
            [(s.name, s.verdict, s.detail) for s in report.steps[-3:-1]],
            [
                (
                    "gateway",
                    "ok",
                    f"{GATEWAY}, route: {GATEWAY} dev wg0 table 51820 src 10.2.0.2",
                ),
                (
                    "natpmp",
                    "ok",
                    f"{GATEWAY} answers: external address 203.0.113.5, epoch 1234 s",
                ),
            ],
        )
        self.assertEqual(self.reactor.open(), [])

    def test_natpmpSilent(self) -> None:
        """A silent gateway: four tries in 3.75 s, then exit 3."""
        d = self.checker(self.config(), "natpmp").run()
        self.reactor.pump([0.05] * 74)
        self.assertNoResult(d)
        self.assertEqual(len(self.sent()), 4)
        self.reactor.pump([0.05] * 2)
        step = self.step(self.successResultOf(d), "natpmp")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 3))

    def test_pcpAnnounce(self) -> None:
        """PCP: an ANNOUNCE, answered with epoch and lifetime."""
        d = self.checker(self.config(), "pcp").run()
        [request] = [pcp.decodeRequest(x) for x in self.sent()]
        self.assertIsInstance(request, pcp.AnnounceRequest)
        self.answer(pcp.encodeResponse(pcp.AnnounceResponse(Result.SUCCESS, 0, 77)))
        step = self.step(self.successResultOf(d), "pcp")
        self.assertEqual(
            (step.verdict, step.detail),
            ("ok", f"{GATEWAY} answers: epoch 77 s"),
        )

    def test_pcpFallsBackToNATPMP(self) -> None:
        """A NAT-PMP-only gateway: PCP skipped, NAT-PMP asked and shown."""
        d = self.checker(self.config(), "pcp").run()
        self.answer(pcp.encodeResponse(pcp.UnsupportedVersion(0)))
        self.answer(
            natpmp.encodeResponse(
                natpmp.ExternalAddressResponse(Result.SUCCESS, 5, "203.0.113.5")
            )
        )
        report = self.successResultOf(d)
        self.assertEqual(
            (self.verdicts(report)["pcp"], self.verdicts(report)["natpmp"]),
            ("skip", "ok"),
        )
        self.assertIn("speaks NAT-PMP", self.step(report, "pcp").detail)
        self.assertEqual(report.exitCode, 0)

    def test_noGateway(self) -> None:
        """Autodiscovery off and no gateway: exit 3 (as --once), naming the fix."""
        step = self.step(
            self.check(
                self.writeConfig("[portmap]\nautodiscover_gateway = false\n"), "natpmp"
            ),
            "gateway",
        )
        self.assertEqual((step.verdict, step.exitCode), ("fail", 3))
        self.assertIn('"10.2.0.1"', step.fix)


class ListenerStepTests(CheckTestCase):
    """The metrics and health ports."""

    def test_free(self) -> None:
        """A free port passes and is closed again."""
        report = self.check(
            self.writeConfig("[metrics]\nenabled = true\nport = 9000\n")
        )
        self.assertEqual(self.step(report, "metrics").detail, "127.0.0.1:9000 is free")
        self.assertTrue(self.reactor.tcpPorts[0].stopped)

    def test_taken(self) -> None:
        """A port something else holds fails with exit 2."""
        self.reactor.taken.add(9000)
        report = self.check(
            self.writeConfig("[metrics]\nenabled = true\nport = 9000\n")
        )
        step = self.step(report, "metrics")
        self.assertEqual((step.verdict, step.exitCode), ("fail", 2))

    def test_takenByUs(self) -> None:
        """A port our running daemon serves passes."""
        self.reactor.taken.add(9000)
        metrics = Metrics.create()

        class Exposition(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                return metrics.exposition()

        self.web = StubTreq(Exposition())
        report = self.check(
            self.writeConfig("[metrics]\nenabled = true\nport = 9000\n")
        )
        self.assertEqual(
            self.step(report, "metrics").detail,
            "127.0.0.1:9000 is served by a running qb-port-sync",
        )

    def test_healthApart(self) -> None:
        """Health on its own port is checked as a second step."""
        report = self.check(
            self.writeConfig(
                "[metrics]\nenabled = true\nport = 9000\n"
                "[health]\nenabled = true\nport = 9001\n"
            )
        )
        self.assertEqual(
            [s.detail for s in report.steps[-2:]],
            ["127.0.0.1:9000 is free", "127.0.0.1:9001 is free"],
        )


class CommandTests(SynchronousTestCase):
    """runCheck: options and output."""

    def test_badStrategy(self) -> None:
        """An unknown strategy is a usage error, exit 2."""
        out = StringIO()
        d = Deferred.fromCoroutine(
            runCheck(CheckReactor(), ["--strategy", "upnp"], {}, 0, out, StringIO())
        )
        self.assertEqual(self.successResultOf(d), 2)

    def test_json(self) -> None:
        """--json prints one JSON object; an invalid config exits 2."""
        path = os.path.abspath(self.mktemp())
        Path(path).write_text("[nope]\n")
        out = StringIO()
        d = Deferred.fromCoroutine(
            runCheck(
                CheckReactor(), ["--config", path, "--json"], {}, 0, out, StringIO()
            )
        )
        self.assertEqual(self.successResultOf(d), 2)
        result = json.loads(out.getvalue())
        self.assertEqual(
            (result["exit_code"], result["steps"][0]["verdict"]), (2, "fail")
        )
