"""The auto strategy: what it picks and why, and how the daemon keeps deciding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qbportsync.config import ConfigError
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.sources.auto import (
    FILE_CHECK_SECS,
    SILENCE_SECS,
    AutoSource,
    Choice,
    autoSource,
    choose,
    pathExists,
    portFileEvidence,
)
from tests.fakes import FakeNetworkEvents
from tests.test_netlink import ROOT

PATH = "/run/user/1000/Proton/VPN/forwarded_port"


def existing(*paths: str) -> Callable[[str], bool]:
    return lambda path: path in paths


@implementer(IPortSource)
class StubSource:
    """A source that answers fetchOnce with a fixed result and records its life."""

    def __init__(self, name: str, result: Deferred[Forwarded] | None = None) -> None:
        self.name = name
        self.result: Deferred[Forwarded] = result or Deferred()
        self.deliver: Report | None = None
        self.stopped = False
        self.stopping: Deferred[None] | None = None

    def start(self, deliver: Report) -> None:
        self.deliver = deliver

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return self.stopping or succeed(None)

    def fetchOnce(self) -> Deferred[Forwarded]:
        return self.result


def denied(path: str) -> bool:
    raise PermissionError(13, "Permission denied", path)


class ChooseTests(SynchronousTestCase):
    """choose(): the decision alone, with the platform and the file system injected."""

    def test_linuxFile(self) -> None:
        """Linux with the port file present: the file."""
        choice = choose(PATH, "linux", existing(PATH))
        self.assertEqual(
            choice, Choice("file", f"auto chose the port file: {PATH} exists")
        )

    def test_linuxDirectory(self) -> None:
        """Linux with only the file's directory: still the file (it comes later)."""
        choice = choose(PATH, "linux", existing("/run/user/1000/Proton/VPN"))
        self.assertEqual(choice.kind, "file")
        self.assertIn("directory /run/user/1000/Proton/VPN exists", choice.reason)

    def test_linuxNothing(self) -> None:
        """Linux with neither: the gateway, saying why."""
        choice = choose(PATH, "linux", existing())
        self.assertEqual(choice.kind, "gateway")
        self.assertIn("PCP, then NAT-PMP", choice.reason)
        self.assertIn(PATH, choice.reason)

    def test_macOS(self) -> None:
        """macOS: the gateway even when the path exists."""
        choice = choose(PATH, "darwin", existing(PATH))
        self.assertEqual(choice.kind, "gateway")
        self.assertIn("macOS", choice.reason)

    def test_gluetunWhenURLSet(self) -> None:
        """[gluetun] url set: gluetun, whatever the platform and files."""
        for platform in ("linux", "darwin", "freebsd"):
            choice = choose(PATH, platform, existing(PATH), "http://127.0.0.1:8000")
            self.assertEqual(
                choice,
                Choice(
                    "gluetun",
                    "auto chose gluetun's control server: [gluetun] url is set",
                ),
            )

    def test_otherPlatform(self) -> None:
        """Elsewhere: SourceUnavailable naming the strategies to choose."""
        error = self.assertRaises(SourceUnavailable, choose, PATH, "win32", existing())
        self.assertIn("--strategy file, pcp or natpmp", str(error))

    def test_unreadableIsTheFile(self) -> None:
        """A port file behind a permission is chosen; the reason names the path."""
        choice = choose(PATH, "linux", denied)
        self.assertEqual(choice.kind, "file")
        self.assertIn(f"Cannot read the port file {PATH}", choice.reason)
        self.assertIn("permission", choice.reason)


class PathTests(SynchronousTestCase):
    """pathExists and portFileEvidence on the real file system."""

    def test_exists(self) -> None:
        """A file that is there exists; a missing one does not."""
        path = self.mktemp()
        self.assertFalse(pathExists(path))
        with open(path, "w"):
            pass
        self.assertTrue(pathExists(path))
        self.assertFalse(pathExists(os.path.join(path, "below-a-file")))

    def test_closedDirectory(self) -> None:
        """A directory that may not be searched is "cannot tell", not "no"."""
        if os.geteuid() == 0:
            # root searches any directory: drop to nobody in a child to see it.
            self.assertClosedAsNobody()
            return
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0)
        self.addCleanup(os.chmod, directory, 0o700)
        self.assertRaises(PermissionError, pathExists, os.path.join(directory, "x"))

    def assertClosedAsNobody(self) -> None:
        directory = tempfile.mkdtemp(prefix="qbps-auto-")
        self.addCleanup(shutil.rmtree, directory)
        script = (
            "import os, sys;"
            "from qbportsync.sources.auto import portFileEvidence, pathExists;"
            "os.setgid(65534); os.setuid(65534);"
            "print(portFileEvidence(sys.argv[1], pathExists))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, os.path.join(directory, "forwarded_port")],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        self.assertIn("cannot be checked", out)
        self.assertIn(f"the directory {directory}", out)
        self.assertIn("setfacl -m u:nobody:rx", out)

    def test_evidence(self) -> None:
        """The file, else its directory, else nothing."""
        self.assertEqual(portFileEvidence(PATH, existing(PATH)), f"{PATH} exists")
        self.assertEqual(
            portFileEvidence(PATH, existing(os.path.dirname(PATH))),
            f"its directory {os.path.dirname(PATH)} exists",
        )
        self.assertIsNone(portFileEvidence(PATH, existing()))


class AutoSourceTests(SynchronousTestCase):
    """AutoSource: the chosen source, its name, the reason in its notes."""

    def test_builds(self) -> None:
        """autoSource builds only the chosen source."""
        built: list[str] = []

        def make(name: str) -> Callable[[], IPortSource]:
            def build() -> IPortSource:
                built.append(name)
                return StubSource(name)

            return build

        source = autoSource(
            PATH,
            make("file"),
            make("pcp"),
            clock=Clock(),
            platform="linux",
            exists=existing(),
        )
        self.assertEqual((built, source.name), (["pcp"], "pcp"))
        self.assertTrue(verifyObject(IPortSource, source))

    def test_buildsGluetun(self) -> None:
        """With a gluetun URL, autoSource builds the gluetun source only."""
        built: list[str] = []

        def make(name: str) -> Callable[[], IPortSource]:
            def build() -> IPortSource:
                built.append(name)
                return StubSource(name)

            return build

        source = autoSource(
            PATH,
            make("file"),
            make("pcp"),
            clock=Clock(),
            platform="linux",
            exists=existing(PATH),
            gluetunURL="http://gluetun:8000",
            gluetunSource=make("gluetun"),
        )
        self.assertEqual((built, source.name), (["gluetun"], "gluetun"))

    def single(self, stub: StubSource, reason: str) -> AutoSource:
        return AutoSource(Clock(), Choice("gateway", reason), {"gateway": lambda: stub})

    def test_noteExplains(self) -> None:
        """fetchOnce's note keeps the source's note and adds the reason."""
        stub = StubSource("natpmp", succeed(Forwarded(1024, "natpmp", note="ttl=60s")))
        source = self.single(stub, "auto chose the gateway")
        forwarded = self.successResultOf(source.fetchOnce())
        self.assertEqual(forwarded.note, "ttl=60s; auto chose the gateway")
        self.assertEqual(source.name, "natpmp")

    def test_daemonNotes(self) -> None:
        """Ports delivered to the daemon carry the reason too."""
        stub = StubSource("file")
        seen: list[Forwarded | SourceTrouble] = []
        self.single(stub, "why").start(seen.append)
        assert stub.deliver is not None
        stub.deliver(Forwarded(5, "file"))
        self.assertEqual(seen, [Forwarded(5, "file", note="why")])

    def test_noGatewayIsUnavailable(self) -> None:
        """No port file and no gateway to ask: SourceUnavailable (exit 3)."""
        stub = StubSource("pcp", fail(ConfigError("no default route")))
        failure = self.failureResultOf(
            self.single(stub, "auto chose the gateway").fetchOnce(), SourceUnavailable
        )
        self.assertIn(
            "auto chose the gateway, but no default route", str(failure.value)
        )

    def test_otherErrorsPass(self) -> None:
        """A gateway that never answered stays SourceUnavailable as it was."""
        error = SourceUnavailable("silent")
        stub = StubSource("natpmp", fail(error))
        failure = self.failureResultOf(self.single(stub, "r").fetchOnce())
        self.assertIs(failure.value, error)


TROUBLE = SourceTrouble("the gateway does not answer", kind="gateway")


class KeepsDecidingTests(SynchronousTestCase):
    """The daemon's auto: takes a new port file, re-probes a failing gateway."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.paths: set[str] = set()
        self.events = FakeNetworkEvents()
        self.built: list[StubSource] = []
        self.seen: list[Forwarded | SourceTrouble] = []
        self.source = autoSource(
            PATH,
            self.maker("file"),
            self.maker("pcp"),
            clock=self.clock,
            networkEvents=self.events,
            platform="linux",
            exists=lambda path: path in self.paths,
        )
        self.source.start(self.seen.append)

    def maker(self, name: str) -> Callable[[], IPortSource]:
        def build() -> IPortSource:
            stub = StubSource(name)
            self.built.append(stub)
            return stub

        return build

    @property
    def current(self) -> StubSource:
        return self.built[-1]

    def report(
        self, seen: Forwarded | SourceTrouble, source: StubSource | None = None
    ) -> None:
        stub = source or self.current
        assert stub.deliver is not None
        stub.deliver(seen)

    def test_fileAppears(self) -> None:
        """The port file's directory appears: within one check, auto serves the file."""
        self.clock.advance(FILE_CHECK_SECS)
        self.assertEqual([s.name for s in self.built], ["pcp"])
        self.paths.add(os.path.dirname(PATH))
        self.clock.advance(FILE_CHECK_SECS)
        self.assertEqual([s.name for s in self.built], ["pcp", "file"])
        self.assertTrue(self.built[0].stopped)
        self.assertEqual(self.source.name, "file")
        self.assertIn("switched from the gateway to the port file", self.source.reason)
        self.report(Forwarded(4242, "file"))
        [forwarded] = self.seen
        assert isinstance(forwarded, Forwarded)
        self.assertIn(f"its directory {os.path.dirname(PATH)} exists", forwarded.note)

    def test_networkChangeLooks(self) -> None:
        """A network change makes auto look for the file at once."""
        self.paths.add(PATH)
        self.events.announce("link", "proton0")
        self.assertEqual(self.source.name, "file")
        self.assertEqual(self.events.observers, [])

    def test_watchingEnds(self) -> None:
        """Once on the file, auto stops looking: no timer, no subscription."""
        self.paths.add(PATH)
        self.clock.advance(FILE_CHECK_SECS)
        self.assertEqual(
            (self.clock.getDelayedCalls(), self.events.observers), ([], [])
        )

    def test_unreadableSurfaces(self) -> None:
        """A port file behind a permission: auto switches, the reason names the fix."""

        def denied(path: str) -> bool:
            raise PermissionError(13, "Permission denied", path)

        source = autoSource(
            PATH,
            self.maker("file"),
            self.maker("pcp"),
            clock=self.clock,
            platform="linux",
            exists=denied,
        )
        self.assertEqual(source.name, "file")
        self.assertIn(f"Cannot read the port file {PATH}", source.reason)

    def test_oldSourceSilenced(self) -> None:
        """Once replaced, the gateway source's late reports are dropped."""
        gateway = self.current
        self.paths.add(PATH)
        self.clock.advance(FILE_CHECK_SECS)
        self.report(Forwarded(1024, "pcp"), source=gateway)
        self.assertEqual(self.seen, [])

    def test_slowStop(self) -> None:
        """The file source starts only once the gateway source has stopped."""
        gateway = self.current
        gateway.stopping = Deferred()
        self.paths.add(PATH)
        self.clock.advance(FILE_CHECK_SECS)
        self.assertEqual(len(self.built), 1)
        self.clock.advance(FILE_CHECK_SECS)
        self.assertEqual(len(self.built), 1)
        gateway.stopping.callback(None)
        self.assertEqual(self.source.name, "file")

    def test_stopDuringSwitch(self) -> None:
        """Stopping while the gateway source stops waits for it and starts nothing."""
        gateway = self.current
        gateway.stopping = Deferred()
        self.paths.add(PATH)
        self.clock.advance(FILE_CHECK_SECS)
        stopped = self.source.stop()
        self.assertNoResult(stopped)
        gateway.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.built), 1)

    def test_stop(self) -> None:
        """Stopping stops the source, the timer and the subscription."""
        self.successResultOf(self.source.stop())
        self.assertTrue(self.current.stopped)
        self.assertEqual(
            (self.clock.getDelayedCalls(), self.events.observers), ([], [])
        )

    def test_reprobe(self) -> None:
        """Three troubles in a row: a new gateway source (PCP first) after a backoff."""
        for _ in range(3):
            self.report(TROUBLE)
        self.assertEqual(self.seen, [TROUBLE] * 3)
        self.assertEqual(len(self.built), 1)
        self.clock.advance(36)
        self.assertEqual([s.name for s in self.built], ["pcp", "pcp"])
        self.assertTrue(self.built[0].stopped)

    def waitForNewSource(self, limit: int = 1000) -> float:
        """Seconds, in steps of one, until auto builds another source."""
        built, start = len(self.built), self.clock.seconds()
        for _ in range(limit):
            self.clock.advance(1)
            if len(self.built) > built:
                return self.clock.seconds() - start
        raise AssertionError(f"no new source within {limit} s")

    def test_reprobeBacksOff(self) -> None:
        """Each re-probe that fails again waits twice as long, up to ten minutes."""
        for base in [30, 60, 120, 240, 480, 600, 600]:
            for _ in range(3):
                self.report(TROUBLE)
            wait = self.waitForNewSource()
            self.assertTrue(0.8 * base <= wait <= 1.2 * base + 1, (wait, base))

    def test_portResets(self) -> None:
        """A port between troubles resets the count: scattered ones never re-probe."""
        for _ in range(120):
            self.report(TROUBLE)
            self.report(TROUBLE)
            self.report(Forwarded(1024, "pcp", expires=self.clock.seconds() + 60))
            self.clock.pump([1] * 30)
        self.assertEqual(len(self.built), 1)

    def test_silentSourceReprobed(self) -> None:
        """A gateway source that says nothing at all is probed anew."""
        wait = self.waitForNewSource()
        self.assertTrue(SILENCE_SECS + 24 <= wait <= SILENCE_SECS + 37, wait)

    def test_leaseDefersSilence(self) -> None:
        """Silence counts from the end of the last lease."""
        self.report(Forwarded(1024, "pcp", expires=self.clock.seconds() + 600))
        wait = self.waitForNewSource()
        self.assertTrue(
            600 + SILENCE_SECS + 24 <= wait <= 600 + SILENCE_SECS + 37, wait
        )

    def test_fileTroublesNoReprobe(self) -> None:
        """Troubles from (or silence of) the port file are its own: no re-probe."""
        self.paths.add(PATH)
        self.clock.advance(FILE_CHECK_SECS)
        for _ in range(5):
            self.report(SourceTrouble("unreadable", kind="file"))
        self.clock.pump([10] * 360)
        self.assertEqual([s.name for s in self.built], ["pcp", "file"])

    def test_macOSStays(self) -> None:
        """On macOS no port file is looked for: no timer, no subscription."""
        events = FakeNetworkEvents()
        clock = Clock()
        source = autoSource(
            PATH,
            self.maker("file"),
            self.maker("pcp"),
            clock=clock,
            networkEvents=events,
            platform="darwin",
            exists=lambda path: True,
        )
        source.start(self.seen.append)
        clock.advance(60)
        self.assertEqual((source.name, events.observers), ("pcp", []))
