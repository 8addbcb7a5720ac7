"""The auto strategy: which source it picks, and how it explains the pick."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qbportsync.config import ConfigError
from qbportsync.interfaces import Forwarded, IPortSource, SourceUnavailable
from qbportsync.sources.auto import AutoSource, Choice, autoSource, choose

PATH = "/run/user/1000/Proton/VPN/forwarded_port"


def existing(*paths: str) -> Callable[[str], bool]:
    return lambda path: path in paths


@implementer(IPortSource)
class StubSource:
    """A source that answers fetchOnce with a fixed result."""

    def __init__(self, name: str, result: Deferred[Forwarded]) -> None:
        self.name = name
        self.result = result
        self.deliver: Callable[[Forwarded], object] | None = None

    def start(self, deliver: Callable[[Forwarded], object]) -> None:
        self.deliver = deliver

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def fetchOnce(self) -> Deferred[Forwarded]:
        return self.result


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


class AutoSourceTests(SynchronousTestCase):
    """AutoSource: the chosen source, its name, the reason in its notes."""

    def test_builds(self) -> None:
        """autoSource builds only the chosen source."""
        built: list[str] = []

        def make(name: str) -> Callable[[], IPortSource]:
            def build() -> IPortSource:
                built.append(name)
                return StubSource(name, Deferred())

            return build

        source = autoSource(
            PATH, make("file"), make("pcp"), platform="linux", exists=existing()
        )
        self.assertEqual((built, source.name), (["pcp"], "pcp"))
        self.assertTrue(verifyObject(IPortSource, source))

    def test_buildsGluetun(self) -> None:
        """With a gluetun URL, autoSource builds the gluetun source only."""
        built: list[str] = []

        def make(name: str) -> Callable[[], IPortSource]:
            def build() -> IPortSource:
                built.append(name)
                return StubSource(name, Deferred())

            return build

        source = autoSource(
            PATH,
            make("file"),
            make("pcp"),
            platform="linux",
            exists=existing(PATH),
            gluetunURL="http://gluetun:8000",
            gluetunSource=make("gluetun"),
        )
        self.assertEqual((built, source.name), (["gluetun"], "gluetun"))

    def test_noteExplains(self) -> None:
        """fetchOnce's note keeps the source's note and adds the reason."""
        stub = StubSource("natpmp", succeed(Forwarded(1024, "natpmp", note="ttl=60s")))
        source = AutoSource(stub, "auto chose the gateway")
        forwarded = self.successResultOf(source.fetchOnce())
        self.assertEqual(forwarded.note, "ttl=60s; auto chose the gateway")
        self.assertEqual(source.name, "natpmp")

    def test_daemonNotes(self) -> None:
        """Ports delivered to the daemon carry the reason too."""
        stub = StubSource("file", Deferred())
        seen: list[Forwarded] = []
        AutoSource(stub, "why").start(seen.append)
        assert stub.deliver is not None
        stub.deliver(Forwarded(5, "file"))
        self.assertEqual(seen, [Forwarded(5, "file", note="why")])

    def test_noGatewayIsUnavailable(self) -> None:
        """No port file and no gateway to ask: SourceUnavailable (exit 3)."""
        stub = StubSource("pcp", fail(ConfigError("no default route")))
        failure = self.failureResultOf(
            AutoSource(stub, "auto chose the gateway").fetchOnce(), SourceUnavailable
        )
        self.assertIn(
            "auto chose the gateway, but no default route", str(failure.value)
        )

    def test_otherErrorsPass(self) -> None:
        """A gateway that never answered stays SourceUnavailable as it was."""
        error = SourceUnavailable("silent")
        stub = StubSource("natpmp", fail(error))
        failure = self.failureResultOf(AutoSource(stub, "r").fetchOnce())
        self.assertIs(failure.value, error)
