"""
Tests for L{qbportsync.cli}: the one-shot run, its exit codes and its one
line of output, on every way out.
"""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from qbportsync import cli
from qbportsync.cli import Outcome, Plan, applyOnce, main, oneShot
from qbportsync.config import ConfigError
from qbportsync.interfaces import Forwarded, SourceError, SourceUnavailable
from qbportsync.qbittorrent import LoginRefused, QBittorrentError
from qbportsync.refusals import RECORD_NAME
from qbportsync.tap import Options

from .fakes import FakeSink, FakeSource

KEYS = ["strategy", "detected_port", "applied", "verified", "note"]


class ApplyOnceTests(SynchronousTestCase):
    def run_(self, source: FakeSource, sink: FakeSink) -> Outcome:
        d = ensureDeferred(applyOnce(source, sink, "wg0"))
        if sink.applies:
            sink.succeed()
        return self.successResultOf(d)

    def test_applied(self) -> None:
        """A new port is applied and verified: exit 0, applied true."""
        source = FakeSource(once=Forwarded(40000, "file"))
        outcome = self.run_(source, FakeSink())
        self.assertEqual(
            outcome, Outcome(0, "file", 40000, applied=True, verified=True)
        )

    def test_noChange(self) -> None:
        """qBittorrent already on the port: exit 0, applied false."""
        outcome = self.run_(
            FakeSource(once=Forwarded(40000, "file")), FakeSink(port=40000)
        )
        self.assertEqual(
            (outcome.code, outcome.applied, outcome.verified), (0, False, True)
        )

    def test_sourceNoteKept(self) -> None:
        """The source's note (e.g. the lease) reaches the JSON note."""
        source = FakeSource(
            name="natpmp", once=Forwarded(40000, "natpmp", note="ttl=60s")
        )
        self.assertEqual(self.run_(source, FakeSink()).note, "ttl=60s")

    def test_unsupported(self) -> None:
        """A source that cannot work here gives exit 3."""
        outcome = self.run_(
            FakeSource(once=SourceUnavailable("no VPN client")), FakeSink()
        )
        self.assertEqual((outcome.code, outcome.note), (3, "no VPN client"))

    def test_sameCodeForEveryStrategy(self) -> None:
        """
        What only the source finds out is exit 3 with the fix, whatever the
        strategy and however the source words it (as auto does for all).
        """
        for name, error in [
            ("natpmp", SourceUnavailable('no route; or set gateway = "10.2.0.1"')),
            ("pcp", SourceUnavailable('no route; or set gateway = "10.2.0.1"')),
            ("natpmp", ConfigError('no gateway on wg0; set gateway = "10.2.0.1"')),
            ("gluetun", ConfigError("refused the key; fix [gluetun] api_key")),
        ]:
            outcome = self.run_(FakeSource(name=name, once=error), FakeSink())
            self.assertEqual((outcome.strategy, outcome.code), (name, 3))
            self.assertIn(str(error), outcome.note)

    def test_portZero(self) -> None:
        """A gateway granting port 0: exit 1, and qBittorrent is not asked."""
        sink = FakeSink()
        outcome = self.run_(FakeSource("natpmp", once=Forwarded(0, "natpmp")), sink)
        self.assertEqual((outcome.code, outcome.detected_port), (1, 0))
        self.assertIn("port 0", outcome.note)
        self.assertEqual(sink.applies, [])

    def test_transientSource(self) -> None:
        """A source failing this time gives exit 1."""
        outcome = self.run_(FakeSource(once=SourceError("file empty")), FakeSink())
        self.assertEqual((outcome.code, outcome.detected_port), (1, None))

    def test_qbittorrentDown(self) -> None:
        """qBittorrent unreachable or refusing us gives exit 1."""
        for error in (
            QBittorrentError("connection refused"),
            LoginRefused("wrong credentials", "credentials", 600.0),
        ):
            sink = FakeSink()
            d = ensureDeferred(
                applyOnce(FakeSource(once=Forwarded(40000, "file")), sink, "")
            )
            sink.applies[-1][2].errback(error)
            outcome = self.successResultOf(d)
            self.assertEqual((outcome.code, outcome.detected_port), (1, 40000))
            self.assertEqual(outcome.note, str(error))

    def test_notVerified(self) -> None:
        """A port qBittorrent did not keep gives exit 1 and verified false."""
        sink = FakeSink()
        d = ensureDeferred(
            applyOnce(FakeSource(once=Forwarded(40000, "file")), sink, "")
        )
        sink.succeed(verified=False)
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.code, outcome.verified), (1, False))
        self.assertIn("did not keep", outcome.note)


class OutcomeTests(SynchronousTestCase):
    def test_jsonKeys(self) -> None:
        """The JSON line has exactly the reference keys, in order, on one line."""
        line = Outcome(0, "file", 40000, True, True, "").asJSON()
        self.assertNotIn("\n", line)
        self.assertEqual(list(json.loads(line)), KEYS)
        self.assertEqual(
            json.loads(line),
            {
                "strategy": "file",
                "detected_port": 40000,
                "applied": True,
                "verified": True,
                "note": "",
            },
        )

    def test_sentences(self) -> None:
        """Without --json a person gets one sentence saying what happened."""
        self.assertIn(
            "now listens on forwarded port 40000",
            Outcome(0, "file", 40000, True, True).asSentence(),
        )
        self.assertIn(
            "already listened", Outcome(0, "file", 40000, False, True).asSentence()
        )
        self.assertIn("file empty", Outcome(1, "file", note="file empty").asSentence())


class OneShotTests(SynchronousTestCase):
    def once(self, *argv: str) -> Outcome:
        options = Options()
        options.parseOptions(["--once", "--json", *argv])
        environ = {"STATE_DIRECTORY": self.mktemp()}
        return self.successResultOf(
            ensureDeferred(oneShot(MemoryReactorClock(), options, environ, 1000))
        )

    def test_configError(self) -> None:
        """A broken configuration: exit 2, and the note names the key."""
        path = FilePath(self.mktemp())
        path.setContent(b"[qbittorrent]\ntimeout_secs = 'ten'\n")
        outcome = self.once("--config", path.path)
        self.assertEqual(outcome.code, 2)
        self.assertIn("qbittorrent.timeout_secs", outcome.note)

    def test_caFileNotPEM(self) -> None:
        """A ca_file that is not PEM: exit 2, naming the file."""
        notPEM = FilePath(self.mktemp())
        notPEM.setContent(b"hello\n")
        path = FilePath(self.mktemp())
        path.setContent(f'[qbittorrent]\nca_file = "{notPEM.path}"\n'.encode())
        outcome = self.once("--config", path.path)
        self.assertEqual(outcome.code, 2)
        self.assertIn(notPEM.path, outcome.note)

    def test_autoWithNothingAvailable(self) -> None:
        """auto with no port file and no gateway to ask: exit 3, saying why."""
        path = FilePath(self.mktemp())
        missing = FilePath(self.mktemp()).child("forwarded_port")
        path.setContent(
            f'[protonvpn]\nforwarded_port_path = "{missing.path}"\n'
            "[portmap]\nautodiscover_gateway = false\n".encode()
        )
        outcome = self.once("--config", path.path, "--strategy", "auto")
        self.assertEqual((outcome.code, outcome.detected_port), (3, None))
        self.assertTrue(outcome.note)

    def test_noPortFile(self) -> None:
        """The file strategy with no VPN directory: exit 3."""
        path = FilePath(self.mktemp())
        missing = FilePath(self.mktemp()).child("forwarded_port")
        path.setContent(
            f'[protonvpn]\nforwarded_port_path = "{missing.path}"\n'.encode()
        )
        outcome = self.once("--config", path.path, "--strategy", "file")
        self.assertEqual((outcome.code, outcome.detected_port), (3, None))

    def test_unexpectedError(self) -> None:
        """
        Anything unexpected: exit 1, the error in one line, the traceback
        only at debug level.
        """

        def broken(*args: object) -> Plan | Outcome:
            raise ZeroDivisionError("oops")

        options = Options()
        options.parseOptions(["--once", "--json", "--strategy", "pcp"])
        with capturedLogs() as events:
            outcome = self.successResultOf(
                ensureDeferred(
                    oneShot(MemoryReactorClock(), options, {}, 0, _prepare=broken)
                )
            )
        self.assertEqual((outcome.code, outcome.strategy), (1, "pcp"))
        self.assertIn("ZeroDivisionError: oops", outcome.note)
        self.assertNotIn("\n", outcome.note)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])
        self.assertIn("log_failure", events[0])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class MainTests(SynchronousTestCase):
    """The command as a user runs it: exit code and exactly what it prints."""

    def setUp(self) -> None:
        self.state = self.mktemp()
        self.environ: dict[str, str] = {"STATE_DIRECTORY": self.state}

    def main(
        self, *argv: str, environ: Mapping[str, str] | None = None
    ) -> tuple[int | str | None, str, str]:
        """Run the command; its exit code, its stdout and its stderr."""
        stdout, stderr = io.StringIO(), io.StringIO()
        levels: list[LogLevel] = []
        d = ensureDeferred(
            main(
                MemoryReactorClock(),
                list(argv),
                self.environ if environ is None else environ,
                stdout,
                stderr,
                1000,
                _startLogging=lambda level, stream: levels.append(level),
            )
        )
        code = self.failureResultOf(d, SystemExit).value.code
        return code, stdout.getvalue(), stderr.getvalue()

    def config(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        return path.path

    def jsonLine(self, stdout: str) -> dict[str, Any]:
        lines = stdout.splitlines()
        self.assertEqual(len(lines), 1, stdout)
        result: dict[str, Any] = json.loads(lines[0])
        self.assertEqual(list(result), KEYS)
        return result

    def test_usageError(self) -> None:
        """A bad command line exits 2, saying what is wrong on stderr only."""
        code, out, err = self.main("--strategy", "upnp")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--strategy must be one of", err)
        self.assertEqual(err.count("--strategy must be one of"), 1)

    def test_usageErrorJSON(self) -> None:
        """With --once --json even a bad command line gives one JSON line."""
        code, out, err = self.main("--once", "--json", "--strategy", "upnp")
        self.assertEqual((code, err), (2, ""))
        self.assertIn("--strategy", self.jsonLine(out)["note"])

    def test_configErrorJSON(self) -> None:
        """A config error with --json: one JSON line, code 2, nothing else."""
        path = self.config("[qbittorrent]\ntimeout_secs = 'ten'\n")
        code, out, err = self.main("--once", "--json", "--config", path)
        self.assertEqual((code, err), (2, ""))
        result = self.jsonLine(out)
        self.assertIn("qbittorrent.timeout_secs", result["note"])
        self.assertEqual(
            (result["detected_port"], result["applied"], result["verified"]),
            (None, False, False),
        )

    def test_configErrorOnce(self) -> None:
        """A config error without --json is said once, on stderr."""
        path = self.config("[qbittorrent]\ntimeout_secs = 'ten'\n")
        code, out, err = self.main("--once", "--config", path)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("qbittorrent.timeout_secs", err)

    def test_unsupportedJSON(self) -> None:
        """The file strategy with no VPN directory: code 3, one JSON line."""
        missing = FilePath(self.mktemp()).child("forwarded_port")
        path = self.config(f'[protonvpn]\nforwarded_port_path = "{missing.path}"\n')
        code, out, _ = self.main("--once", "--json", "-s", "file", "--config", path)
        self.assertEqual(code, 3)
        self.assertEqual(self.jsonLine(out)["strategy"], "file")

    def test_help(self) -> None:
        """--help prints the usage, starting 'Usage: qb-port-sync', and exits 0."""
        code, out, err = self.main("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("Usage: qb-port-sync "), out)
        self.assertIn("--forget-refusals", out)

    def test_forgetRefusals(self) -> None:
        """--forget-refusals deletes the record, says so, and exits 0."""
        os.makedirs(self.state)
        record = os.path.join(self.state, RECORD_NAME)
        with open(record, "w") as f:
            f.write("{}")
        code, out, err = self.main("--forget-refusals")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"Forgot the refused logins recorded in {record}", out)
        self.assertFalse(os.path.exists(record))
        code, out, _ = self.main("--forget-refusals")
        self.assertEqual(code, 0)
        self.assertIn("No refused logins were recorded", out)

    def test_forgetThenOnce(self) -> None:
        """--forget-refusals with --once --json keeps stdout to the JSON line."""
        path = self.config("[qbittorrent]\ntimeout_secs = 'ten'\n")
        code, out, err = self.main(
            "--forget-refusals", "--once", "--json", "--config", path
        )
        self.assertEqual(code, 2)
        self.jsonLine(out)
        self.assertIn("No refused logins were recorded", err)

    def test_stateDirectoryFromEnvironment(self) -> None:
        """Without STATE_DIRECTORY a user's record is under XDG_STATE_HOME."""
        xdg = os.path.abspath(self.mktemp())
        code, out, _ = self.main("--forget-refusals", environ={"XDG_STATE_HOME": xdg})
        self.assertEqual(code, 0)
        self.assertIn(os.path.join(xdg, "qb-port-sync", RECORD_NAME), out)


_RECORD_MODULES = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from qbportsync.cli import run
run()
"""

DAEMON_ONLY = (
    "prometheus_client",
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.spread",
    "twisted.internet.inotify",
    "qbportsync.web",
    "qbportsync.sync",
    "qbportsync.netlink",
    "qbportsync.check",
    "qbportsync.sources.gatewaysource",
)
"""Modules a one-shot run from a port file has no use for."""


class OneShotImportTests(SynchronousTestCase):
    """What a one-shot run loads: its start-up time is mostly imports."""

    def test_onlyWhatItNeeds(self) -> None:
        """
        C{--once} from a port file, all the way to qBittorrent's address,
        imports no web server, metrics library, INotify, netlink or gateway
        code.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        portFile = directory.child("forwarded_port")
        portFile.setContent(b"51413\n")
        # Bound and not listening: connections to it are refused at once.
        closed = socket.socket()
        self.addCleanup(closed.close)
        closed.bind(("127.0.0.1", 0))
        config = directory.child("config.toml")
        config.setContent(
            f'[qbittorrent]\nbase_url = "http://127.0.0.1:{closed.getsockname()[1]}"\n'
            f'[protonvpn]\nforwarded_port_path = "{portFile.path}"\n'.encode()
        )
        config.chmod(0o600)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(
            os.environ,
            PYTHONPATH=root,
            STATE_DIRECTORY=directory.path,
            QB_PORT_SYNC_QB_PASSWORD="unused",
        )
        for strategy in ("auto", "file"):
            modules = directory.child(f"{strategy}.json")
            argv = ["--once", "--json", "--strategy", strategy, "--config", config.path]
            run = subprocess.run(
                [sys.executable, "-c", _RECORD_MODULES, modules.path, *argv],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            outcome = json.loads(run.stdout)
            self.assertEqual(outcome["detected_port"], 51413)
            self.assertIn("connection refused", outcome["note"])
            loaded = json.loads(modules.getContent())
            self.assertIn("qbportsync.qbittorrent", loaded)
            self.assertEqual(
                [m for m in loaded if m.startswith(DAEMON_ONLY)], [], strategy
            )


class RunTests(SynchronousTestCase):
    """The console-script entry point."""

    def test_exitSkipsTheLastCollection(self) -> None:
        """
        Whatever the run's outcome, the heap is frozen before the
        interpreter exits, which then does not walk every object again.
        """
        for code in (0, 3):

            def exiting(main: object, argv: list[object], code: int = code) -> None:
                raise SystemExit(code)

            self.patch(cli, "react", exiting)
            gc.unfreeze()
            self.addCleanup(gc.unfreeze)
            with self.assertRaises(SystemExit) as caught:
                cli.run()
            self.assertEqual(caught.exception.code, code)
            self.assertGreater(gc.get_freeze_count(), 0)
