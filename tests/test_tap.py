"""Tests for L{qbportsync.tap}: the shared options and the service builders."""

from __future__ import annotations

import gc
import io
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr
from typing import Any

from attrs import evolve
from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from qbportsync import __version__
from qbportsync.config import Config, ListenConfig, ProtonVPNConfig
from qbportsync.metrics import Metrics
from qbportsync.netevents import KernelEvents
from qbportsync.refusals import RefusalStore
from qbportsync.sdnotify import SystemdNotifier
from qbportsync.sources.auto import AutoSource
from qbportsync.sources.gatewaysource import NATPMPSource, PCPSource
from qbportsync.sources.portfile import PortFileSource
from qbportsync.sync import PortSync
from qbportsync.tap import (
    READY_GRACE_SECS,
    ConnectionPoolService,
    Options,
    ReadinessService,
    buildService,
    daemonService,
    makeService,
    makeSink,
    makeSource,
)
from qbportsync.web import WebService

from .fakes import FakeNetworkEvents, FakeSink
from .fakeudp import GATEWAY, MemoryUDPReactor

DEFAULTS = {
    "config": None,
    "strategy": "auto",
    "log-level": "info",
    "once": 0,
    "json": 0,
    "forget-refusals": 0,
}


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> dict[str, object]:
        options = Options()
        options.parseOptions(list(argv))
        return dict(options)

    def test_defaults(self) -> None:
        """With no arguments every option has its default."""
        self.assertEqual(self.parse(), DEFAULTS)

    def test_everything(self) -> None:
        """Every option given, long or short, lands in the dict."""
        self.assertEqual(
            self.parse(
                "--config",
                "/tmp/c.toml",
                "-s",
                "file",
                "-l",
                "debug",
                "--once",
                "--json",
            ),
            {
                "config": "/tmp/c.toml",
                "strategy": "file",
                "log-level": "debug",
                "once": 1,
                "json": 1,
                "forget-refusals": 0,
            },
        )

    def test_badStrategy(self) -> None:
        """An unknown strategy is a usage error listing the allowed ones."""
        error = self.assertRaises(usage.UsageError, self.parse, "--strategy", "upnp")
        self.assertIn("file, natpmp, pcp, gluetun, auto", str(error))

    def test_badLogLevel(self) -> None:
        """An unknown log level is a usage error."""
        error = self.assertRaises(usage.UsageError, self.parse, "--log-level", "loud")
        self.assertIn("loud", str(error))

    def test_jsonNeedsOnce(self) -> None:
        """--json without --once is refused."""
        self.assertRaises(usage.UsageError, self.parse, "--json")

    def test_version(self) -> None:
        """--version prints the version on the given stdout and exits 0."""
        out = io.StringIO()
        options = Options(out)
        error = self.assertRaises(SystemExit, options.parseOptions, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertEqual(out.getvalue(), f"qbportsync {__version__.short()}\n")

    def test_help(self) -> None:
        """--help starts 'Usage: qb-port-sync' and describes every option."""
        out = io.StringIO()
        options = Options(out)
        error = self.assertRaises(SystemExit, options.parseOptions, ["--help"])
        self.assertEqual(error.code, 0)
        self.assertTrue(out.getvalue().startswith("Usage: qb-port-sync "))
        text = " ".join(out.getvalue().split())
        for word in (
            "--config",
            "--strategy",
            "--once",
            "--json",
            "--log-level",
            "--forget-refusals",
        ):
            self.assertIn(word, text)
        self.assertIn("file, natpmp, pcp, gluetun or auto", text)


class BuilderTests(SynchronousTestCase):
    def config(self) -> Config:
        path = FilePath(self.mktemp()).child("forwarded_port")
        return Config(protonvpn=ProtonVPNConfig(forwarded_port_path=path.path))

    def test_fileSource(self) -> None:
        """'file' watches the configured port file."""
        source = makeSource(
            MemoryReactorClock(), self.config(), "file", Metrics.create(), FakeSink()
        )
        self.assertIsInstance(source, PortFileSource)

    def test_natpmpSource(self) -> None:
        """'natpmp' asks the gateway, and knows qBittorrent's current port."""
        sink = FakeSink()
        source = makeSource(Clock(), self.config(), "natpmp", Metrics.create(), sink)
        self.assertIsInstance(source, NATPMPSource)
        self.assertEqual(source.name, "natpmp")

    def test_gatewaySourcesHearTheNetwork(self) -> None:
        """'natpmp' and 'pcp' follow the network changes they are given."""
        config = evolve(
            self.config(),
            portmap=evolve(
                self.config().portmap, gateway=GATEWAY, bind_address="198.51.100.2"
            ),
        )
        for strategy in ("natpmp", "pcp"):
            events = FakeNetworkEvents()
            source = makeSource(
                MemoryUDPReactor(),
                config,
                strategy,
                Metrics.create(),
                FakeSink(),
                networkEvents=events,
            )
            source.start(lambda seen: None)
            self.assertEqual(len(events.observers), 1, strategy)
            self.successResultOf(source.stop())
            self.assertEqual(events.observers, [], strategy)

    def test_pcpSource(self) -> None:
        """'pcp' asks the gateway with PCP first."""
        source = makeSource(Clock(), self.config(), "pcp", Metrics.create(), FakeSink())
        self.assertIsInstance(source, PCPSource)
        self.assertEqual(source.name, "pcp")

    def test_autoWithPortFile(self) -> None:
        """'auto' where the port file's directory exists: the file, explained."""
        directory = FilePath(self.mktemp())
        directory.makedirs()
        config = evolve(
            self.config(),
            protonvpn=ProtonVPNConfig(directory.child("forwarded_port").path),
        )
        source = makeSource(
            MemoryReactorClock(), config, "auto", Metrics.create(), FakeSink()
        )
        self.assertIsInstance(source, AutoSource)
        self.assertEqual(source.name, "file")

    def test_autoWithoutPortFile(self) -> None:
        """'auto' with no port file nor directory: the gateway, PCP first."""
        config = evolve(
            self.config(),
            protonvpn=ProtonVPNConfig(FilePath(self.mktemp()).child("port").path),
        )
        source = makeSource(Clock(), config, "auto", Metrics.create(), FakeSink())
        self.assertIsInstance(source, AutoSource)
        assert isinstance(source, AutoSource)
        self.assertEqual(source.name, "pcp")
        self.assertIn("PCP, then NAT-PMP", source.reason)

    def store(self, reactor: Any) -> RefusalStore:
        return RefusalStore(reactor, self.mktemp())

    def test_buildService(self) -> None:
        """
        The daemon's tree: network events, PortSync, the web endpoints,
        systemd notification; building it opens no port.
        """
        reactor = MemoryReactorClock()
        config = evolve(self.config(), metrics=ListenConfig(True, 9000))
        top = buildService(reactor, config, "file", {}, self.store(reactor))
        self.assertTrue(IServiceCollection.providedBy(top))
        children = list(top)  # type: ignore[call-overload]
        hasEvents = sys.platform.startswith("linux") or sys.platform == "darwin"
        events: list[type] = [KernelEvents] if hasEvents else []
        self.assertEqual(
            [type(c) for c in children],
            [
                ConnectionPoolService,
                *events,
                PortSync,
                WebService,
                SystemdNotifier,
                ReadinessService,
            ],
        )
        self.assertEqual((reactor.tcpServers, reactor.getDelayedCalls()), ([], []))

    def test_readyAfterGrace(self) -> None:
        """With no answer from qBittorrent, systemd still hears READY=1 in time."""
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        path = self.mktemp()
        receiver.bind(path)
        receiver.setblocking(False)
        reactor = MemoryReactorClock()
        top = buildService(
            reactor,
            self.config(),
            "file",
            {"NOTIFY_SOCKET": path},
            self.store(reactor),
        )
        top.startService()
        self.addCleanup(top.stopService)
        reactor.advance(READY_GRACE_SECS - 1)
        self.assertNotIn(b"READY=1", self.drain(receiver))
        reactor.advance(1)
        self.assertIn(b"READY=1", self.drain(receiver))

    def test_stopBeforeReady(self) -> None:
        """Stopped before the first update: the wait ends quietly, no timer left."""
        reactor = MemoryReactorClock()
        top = buildService(reactor, self.config(), "file", {}, self.store(reactor))
        top.startService()
        top.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])
        del top
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def drain(self, receiver: socket.socket) -> bytes:
        received = b""
        while True:
            try:
                received += receiver.recv(4096) + b"\n"
            except BlockingIOError:
                return received

    def test_sinkUsesBaseURL(self) -> None:
        """The sink talks to the configured base URL."""
        from twisted.internet import reactor

        sink = makeSink(reactor, Config(), self.store(reactor))
        self.assertEqual(sink.baseURL, "http://127.0.0.1:8080")

    def test_makeServiceRefusesOnce(self) -> None:
        """twistd cannot run the one-shot mode: a usage error, exit 2."""
        for flag in ("--once", "--forget-refusals"):
            options = Options()
            options.parseOptions([flag])
            err = io.StringIO()
            with redirect_stderr(err):
                error = self.assertRaises(SystemExit, makeService, options)
            self.assertEqual(error.code, 2)
            self.assertIn(f"{flag} runs from the qb-port-sync command", err.getvalue())

    def test_makeServiceConfigError(self) -> None:
        """A broken configuration file makes twistd exit with code 2."""
        path = FilePath(self.mktemp())
        path.setContent(b"[qbittorrent]\nbase_url = 5\n")
        options = Options()
        options.parseOptions(["--config", path.path])
        with redirect_stderr(io.StringIO()):
            error = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(error.code, 2)


class DaemonServiceTests(SynchronousTestCase):
    """Start-up errors end in one line on stderr and the reference's code."""

    def start(self, config: str) -> tuple[int | str | None, str]:
        path = FilePath(self.mktemp())
        path.setContent(config.encode())
        options = Options()
        options.parseOptions(["--config", path.path, "--strategy", "file"])
        err = io.StringIO()
        from twisted.internet import reactor

        environ = {"STATE_DIRECTORY": self.mktemp()}
        error = self.assertRaises(
            SystemExit, daemonService, reactor, options, environ, 1000, err
        )
        return error.code, err.getvalue()

    def test_webPortInUse(self) -> None:
        """A metrics port already taken stops the start with exit code 2."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = self.start(f"[metrics]\nenabled = true\nport = {port}\n")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(f"127.0.0.1:{port}", err)

    def test_caFileNotPEM(self) -> None:
        """A ca_file that is not PEM: one line naming it, exit code 2."""
        notPEM = FilePath(self.mktemp())
        notPEM.setContent(b"hello\n")
        code, err = self.start(f'[qbittorrent]\nca_file = "{notPEM.path}"\n')
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(notPEM.path, err)

    def test_listensBeforeTheReactorRuns(self) -> None:
        """The daemon's service has its web ports open once built."""
        path = FilePath(self.mktemp())
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path.setContent(
            b"[metrics]\nenabled = true\nport = 9000\n[protonvpn]\n"
            + f'forwarded_port_path = "{directory.child("port").path}"\n'.encode()
        )
        options = Options()
        options.parseOptions(["--config", path.path, "--strategy", "file"])
        reactor = MemoryReactorClock()
        daemonService(reactor, options, {}, 1000, io.StringIO())
        self.assertEqual(len(reactor.tcpServers), 1)


class InstalledPluginTests(SynchronousTestCase):
    """The twistd plugin as installed, outside this source tree."""

    def twistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{python -m twisted ARGV} (C{twist}; with a leading C{twistd},
        C{twistd}) from the installed package, away from the source.
        """
        cwd = self.mktemp()
        os.makedirs(cwd)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        found = subprocess.run(
            [
                sys.executable,
                "-c",
                "import qbportsync, sys; print(qbportsync.__file__)",
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if found.returncode != 0:
            if os.environ.get("QBPORTSYNC_REQUIRE_INTEGRATION") == "1":
                self.fail("qbportsync is not installed: run pip install .")
            raise SkipTest("qbportsync is not installed in this Python")
        runner = ["-m", "twisted"]
        if argv[0] == "twistd":
            runner, argv = (
                ["-c", "from twisted.scripts.twistd import run; run()"],
                argv[1:],
            )
        return subprocess.run(
            [sys.executable, *runner, *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def test_twistdHelp(self) -> None:
        """C{twistd qbportsync --help} works from the installed package."""
        result = self.twistd("qbportsync", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--strategy", result.stdout)
        self.assertIn("--config", result.stdout)

    def test_twistdOnce(self) -> None:
        """C{twistd qbportsync --once}: a one-line usage error, exit 2."""
        for argv in (["twistd", "-n"], []):
            result = self.twistd(*argv, "qbportsync", "--once")
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertIn("--once runs from the qb-port-sync command", result.stderr)
