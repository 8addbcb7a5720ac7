"""Tests for L{qbportsync.cli}: the one-shot run and its exit codes."""

from __future__ import annotations

import io
import json

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.cli import Outcome, applyOnce, main, oneShot
from qbportsync.config import ConfigError
from qbportsync.interfaces import Forwarded, SourceError, SourceUnavailable
from qbportsync.qbittorrent import LoginRefused, QBittorrentError
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

    def test_gatewayConfigError(self) -> None:
        """A gateway that cannot be found from the routes is exit 2, with the fix."""
        source = FakeSource(once=ConfigError('no gateway: set gateway = "10.2.0.1"'))
        outcome = self.run_(source, FakeSink())
        self.assertEqual(outcome.code, 2)
        self.assertIn("10.2.0.1", outcome.note)

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
    def once(self, *argv: str) -> tuple[int, str]:
        options = Options()
        options.parseOptions(["--once", "--json", *argv])
        out = io.StringIO()
        code = self.successResultOf(
            ensureDeferred(oneShot(MemoryReactorClock(), options, {}, out))
        )
        return code, out.getvalue()

    def test_configError(self) -> None:
        """A broken configuration: exit 2, and the JSON note names the key."""
        path = FilePath(self.mktemp())
        path.setContent(b"[qbittorrent]\ntimeout_secs = 'ten'\n")
        code, out = self.once("--config", path.path)
        self.assertEqual(code, 2)
        self.assertIn("qbittorrent.timeout_secs", json.loads(out)["note"])

    def test_autoWithNothingAvailable(self) -> None:
        """auto with no port file and no gateway to ask: exit 3, saying why."""
        path = FilePath(self.mktemp())
        missing = FilePath(self.mktemp()).child("forwarded_port")
        path.setContent(
            f'[protonvpn]\nforwarded_port_path = "{missing.path}"\n'
            "[portmap]\nautodiscover_gateway = false\n".encode()
        )
        code, out = self.once("--config", path.path, "--strategy", "auto")
        self.assertEqual(code, 3)
        self.assertEqual(json.loads(out)["detected_port"], None)
        self.assertTrue(json.loads(out)["note"])

    def test_noPortFile(self) -> None:
        """The file strategy with no VPN directory: exit 3."""
        path = FilePath(self.mktemp())
        missing = FilePath(self.mktemp()).child("forwarded_port")
        path.setContent(
            f'[protonvpn]\nforwarded_port_path = "{missing.path}"\n'.encode()
        )
        code, out = self.once("--config", path.path, "--strategy", "file")
        self.assertEqual(code, 3)
        self.assertEqual(json.loads(out)["detected_port"], None)


class MainTests(SynchronousTestCase):
    def test_usageErrorExits2(self) -> None:
        """A bad command line exits with code 2."""
        d: Deferred[None] = ensureDeferred(main(Clock(), ["--strategy", "upnp"]))
        failure = self.failureResultOf(d, SystemExit)
        self.assertEqual(failure.value.code, 2)
