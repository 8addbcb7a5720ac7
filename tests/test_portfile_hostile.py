"""
The port file as an attacker on the same host would shape it, on the real
filesystem: a FIFO, a symlink to a secret, permissions taken away and given
back, a directory re-pointed through a symlink, descriptors used up.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from qbportsync.interfaces import Forwarded, SourceTrouble
from qbportsync.metrics import Metrics
from qbportsync.sources import portfilereader
from qbportsync.sources.portfile import PortFileSource
from qbportsync.sources.portfilereader import NotARegularFile, readPortFile
from qbportsync.tap import inotifyFactory
from tests.rig import requireTool, stopProcess, waitFor

NOBODY = 65534


def requireINotify() -> Any:
    """The INotify factory, or skip where there is none."""
    factory = inotifyFactory(global_reactor)
    if factory is None:
        raise SkipTest("INotify is not available on this platform")
    return factory


class ReadFIFOTests(SynchronousTestCase):
    """Reading never waits for a FIFO's writer."""

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.fifo = self.dir.child("forwarded_port").path
        os.mkfifo(self.fifo)

    def readBounded(self, path: str) -> tuple[object, float]:
        """readPortFile(path) in a thread: its result or error, and its time."""
        outcome: list[object] = []

        def run() -> None:
            started = time.monotonic()
            try:
                outcome.append(readPortFile(path))
            except Exception as e:
                outcome.append(e)
            outcome.append(time.monotonic() - started)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(5)
        if thread.is_alive():
            # A writer lets an open() blocked on the FIFO return.
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(5)
            self.fail(f"reading {path} blocked for 5 s")
        return outcome[0], cast(float, outcome[1])

    def test_fifoRefusedAtOnce(self) -> None:
        """A FIFO without a writer is refused at once, as a FIFO."""
        error, elapsed = self.readBounded(self.fifo)
        self.assertIsInstance(error, NotARegularFile)
        self.assertEqual(str(error), "is a FIFO, not a regular file")
        self.assertLess(elapsed, 1.0)

    def test_fifoSwappedInAfterTheLook(self) -> None:
        """A FIFO that replaces the file after it was looked at does not block."""
        regular = self.dir.child("regular")
        regular.setContent(b"40000")

        class StatSaysRegular:
            """The os module, but stat() always describes a regular file."""

            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def stat(self, path: str) -> os.stat_result:
                return os.stat(regular.path)

        self.patch(portfilereader, "os", StatSaysRegular())
        error, elapsed = self.readBounded(self.fifo)
        self.assertIsInstance(error, NotARegularFile)
        self.assertEqual(str(error), "is a FIFO, not a regular file")
        self.assertLess(elapsed, 1.0)


NOT_A_PORT = "holds {size} bytes that are not a port number"
SECRETS = [
    (b"hunter2-the-qbittorrent-password\n", NOT_A_PORT),
    (b"root:$y$j9T$secrethash:19000:0:99999:7:::\n", NOT_A_PORT),
    (b"40000\nhunter2-behind-a-port\n", NOT_A_PORT),
    (b"PASSWORD=hunter2\x00HOME=/root\x00", NOT_A_PORT),
    (b"8675309112358\n", "holds a number outside the ports 1-65535"),
]


class SecretBehindSymlinkTests(SynchronousTestCase):
    """A port file that is a symlink to a secret never shows the secret."""

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.secret = self.dir.child("secret")
        self.file = self.dir.child("forwarded_port")
        os.symlink(self.secret.path, self.file.path)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def assertNowhere(self, secret: bytes, texts: list[str]) -> None:
        words = [w for w in secret.replace(b"\x00", b"\n").split() if len(w) > 3]
        for word in words:
            for line in word.decode().split("\n"):
                for text in texts:
                    self.assertNotIn(line, text)

    def test_secretNotEchoed(self) -> None:
        """Not in log events, not in the trouble reported, not in the one-shot error."""
        for secret, problem in SECRETS:
            self.secret.setContent(secret)
            seen: list[Forwarded | SourceTrouble] = []
            source = PortFileSource(Clock(), self.file, Metrics.create(), None)
            source.start(seen.append)
            self.successResultOf(source.stop())
            once = self.failureResultOf(source.fetchOnce()).getErrorMessage()
            (trouble,) = seen
            assert isinstance(trouble, SourceTrouble)
            self.assertEqual(
                trouble.cause,
                f"The port file {self.file.path} {problem.format(size=len(secret))}",
            )
            self.assertEqual(once, trouble.cause)
            logged = [formatEvent(e) for e in self.events]
            logged += [repr(e) for e in self.events]
            self.assertNowhere(secret, [trouble.cause, once, *logged])


class RealFilesystemTests(TestCase):
    """The source with the real INotify, in this process's reactor."""

    def setUp(self) -> None:
        self.factory = requireINotify()
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.waiting: list[tuple[Callable[[object], bool], Deferred[object]]] = []
        self.seen: list[Forwarded | SourceTrouble] = []

    def startSource(self, path: FilePath[str]) -> None:
        source = PortFileSource(
            cast(Any, global_reactor), path, Metrics.create(), self.factory
        )
        source.start(self.deliver)
        self.addCleanup(source.stop)

    def deliver(self, seen: Forwarded | SourceTrouble) -> None:
        self.seen.append(seen)
        for match, d in list(self.waiting):
            if match(seen):
                self.waiting.remove((match, d))
                d.callback(seen)

    def expect(self, match: Callable[[object], bool]) -> Deferred[object]:
        """Fires with the first report that matches, within 5 seconds."""
        for seen in self.seen:
            if match(seen):
                d: Deferred[object] = Deferred()
                d.callback(seen)
                return d
        d = Deferred()
        self.waiting.append((match, d))
        d.addTimeout(5, cast(Any, global_reactor))
        return d

    def port(self, port: int) -> Deferred[object]:
        return self.expect(lambda s: isinstance(s, Forwarded) and s.port == port)

    async def test_fifoRenamedOverPortFile(self) -> None:
        """A FIFO renamed over the file is reported; the reactor goes on."""
        directory = self.base.child("VPN")
        directory.makedirs()
        file = directory.child("forwarded_port")
        file.setContent(b"40000")
        self.startSource(file)
        await self.port(40000)
        fifo = directory.child("fifo").path
        os.mkfifo(fifo)
        trouble = self.expect(lambda s: isinstance(s, SourceTrouble))
        os.replace(fifo, file.path)
        reported = await trouble
        self.assertEqual(
            reported,
            SourceTrouble(
                f"The port file {file.path} is a FIFO, not a regular file", "file"
            ),
        )
        d = self.port(40001)
        file.setContent(b"40001")
        await d

    async def repointed(self, repoint: Callable[[Path, str], None]) -> None:
        """A symlinked directory re-pointed with C{repoint} is followed."""
        for name, port in [("one", b"40000"), ("two", b"40002")]:
            self.base.child(name).child("VPN").makedirs()
            self.base.child(name).child("VPN").child("forwarded_port").setContent(port)
        link = Path(self.base.path) / "Proton"
        link.symlink_to("one")
        self.startSource(FilePath(str(link / "VPN" / "forwarded_port")))
        await self.port(40000)
        d = self.port(40002)
        repoint(link, "two")
        await d
        # The old target is no longer watched: its change comes first in
        # INotify's queue if it were, yet only the new target's is seen.
        self.base.child("one").child("VPN").child("forwarded_port").setContent(b"49999")
        d = self.port(40003)
        self.base.child("two").child("VPN").child("forwarded_port").setContent(b"40003")
        await d
        ports = [s.port for s in self.seen if isinstance(s, Forwarded)]
        self.assertNotIn(49999, ports)

    async def test_repointedWithLn(self) -> None:
        """C{ln -sfn other Proton} moves the watch to the new target."""

        def ln(link: Path, target: str) -> None:
            subprocess.run(["ln", "-sfn", target, str(link)], check=True, timeout=10)

        await self.repointed(ln)

    async def test_repointedByRename(self) -> None:
        """A new symlink renamed over the old one moves the watch."""

        def rename(link: Path, target: str) -> None:
            temporary = link.with_name("new")
            temporary.symlink_to(target)
            os.replace(temporary, link)

        await self.repointed(rename)


def withoutOverride(argv: list[str]) -> list[str]:
    """
    C{argv} run without root's right to ignore permissions, so that chmod
    000 means for the child what it means for any other user.
    """
    if os.geteuid() != 0:
        return argv
    setpriv = requireTool("setpriv")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *argv]


class SourceProcess:
    """tests.portfileprocess in a child; its JSON events read with deadlines."""

    def __init__(
        self, case: SynchronousTestCase, path: str, *args: str, bound: bool = False
    ) -> None:
        root = str(Path(__file__).parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, [env.get("PYTHONPATH")])]
        )
        self.stderr = Path(case.mktemp())
        with open(self.stderr, "wb") as stderr:
            argv = [sys.executable, "-m", "tests.portfileprocess", path, *args]
            self.process = subprocess.Popen(
                withoutOverride(argv) if bound else argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=root,
                env=env,
            )
        case.addCleanup(stopProcess, self.process)
        case.addCleanup(cast(IO[bytes], self.process.stdin).close)
        self.case = case
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        started = self.waitFor(lambda e: e["event"] == "started")
        if bound and started["overrides"]:
            self.case.fail("the child still ignores permissions")

    def send(self, command: str) -> None:
        stdin = cast(IO[bytes], self.process.stdin)
        stdin.write(command.encode() + b"\n")
        stdin.flush()

    def waitFor(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The next event that matches, read within C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        stdout = cast(IO[bytes], self.process.stdout)
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                event: dict[str, Any] = json.loads(line)
                self.events.append(event)
                if match(event):
                    return event
            left = deadline - time.monotonic()
            ready, _, _ = select.select([stdout], [], [], max(left, 0))
            chunk = os.read(stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.case.fail(
                    f"no matching event within {timeout} s; saw {self.events}; "
                    f"stderr: {self.stderr.read_text()}"
                )
            self.buffer += chunk

    def port(self, port: int) -> dict[str, Any]:
        return self.waitFor(lambda e: e["event"] == "port" and e["port"] == port)

    def trouble(self) -> dict[str, Any]:
        return self.waitFor(lambda e: e["event"] == "trouble")


class SourceProcessTests(SynchronousTestCase):
    """What a test process cannot do to itself, done to a child."""

    def setUp(self) -> None:
        requireINotify()
        self.base = Path(self.mktemp()).absolute()
        self.dir = self.base / "VPN"
        self.dir.mkdir(parents=True)
        self.file = self.dir / "forwarded_port"
        self.file.write_text("40000")

    def writeInPlace(self, content: str) -> None:
        """Truncate and write, as gluetun does."""
        with open(self.file, "w") as f:
            f.write(content)

    def test_chmodCycleFollowed(self) -> None:
        """After chmod 000 then 644 the new port arrives at once (IN_ATTRIB)."""
        # A first retry after a minute: only the event can explain a delivery.
        child = SourceProcess(self, str(self.file), "--first-retry", "60", bound=True)
        child.port(40000)
        self.file.chmod(0o000)
        self.addCleanup(self.file.chmod, 0o644)
        self.writeInPlace("40001")
        trouble = child.trouble()
        self.assertIn("permission denied", trouble["cause"])
        self.assertIn(str(self.file), trouble["cause"])
        given = time.monotonic()
        self.file.chmod(0o644)
        delivered = child.port(40001)
        self.assertLess(delivered["t"] - given, 5)

    def test_descriptorsExhausted(self) -> None:
        """A port written while descriptors are used up arrives once they are free."""
        child = SourceProcess(self, str(self.file), "--nofile", "64")
        child.port(40000)
        child.send("fill")
        self.assertGreater(child.waitFor(lambda e: e["event"] == "filled")["count"], 0)
        self.writeInPlace("40001")
        trouble = child.trouble()
        self.assertEqual(
            trouble["cause"],
            f"Cannot read the port file {self.file}: Too many open files; retrying",
        )
        child.send("free")
        freed = child.waitFor(lambda e: e["event"] == "freed")
        delivered = child.port(40001)
        self.assertLess(delivered["t"] - freed["t"], 5)

    def closeDirectory(self) -> None:
        """Make the port file's directory one we may not enter (Proton's 0700)."""
        if os.geteuid() == 0:
            os.chown(self.dir, NOBODY, NOBODY)
            os.chmod(self.dir, 0o700)
        else:
            os.chmod(self.dir, 0o000)
        self.addCleanup(os.chmod, self.dir, 0o755)

    def test_closedDirectory(self) -> None:
        """A closed directory is a lasting trouble that names the fix, until fixed."""
        self.closeDirectory()
        child = SourceProcess(self, str(self.file), "--first-retry", "60", bound=True)
        trouble = child.trouble()
        self.assertTrue(trouble["permanent"])
        self.assertIn(f"the directory {self.dir} (owner ", trouble["cause"])
        self.assertIn("setfacl -m u:", trouble["cause"])
        self.assertIn(f":rx {self.dir}", trouble["cause"])
        fixed = time.monotonic()
        os.chmod(self.dir, 0o755)
        delivered = child.port(40000)
        self.assertLess(delivered["t"] - fixed, 5)

    def test_closedDirectoryOnce(self) -> None:
        """The one-shot names the closed directory and the fix (exit code 3)."""
        self.closeDirectory()
        child = SourceProcess(self, str(self.file), "--once", bound=True)
        once = child.waitFor(lambda e: e["event"] == "once")
        self.assertEqual(once["error"], "SourceUnavailable")
        self.assertIn(f"the directory {self.dir}", once["message"])
        self.assertIn("setfacl", once["message"])


def freeLoopbackPort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProgramTests(SynchronousTestCase):
    """
    The daemon and the one-shot, as users run them, given hostile port
    files; qBittorrent is not needed: the port file is read first.
    """

    secret = "hunter2-the-qbittorrent-password"

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.dir = self.base / "vpn"
        self.dir.mkdir(parents=True)
        self.file = self.dir / "forwarded_port"
        self.file.write_text("40000")
        (self.base / "secret").write_text(self.secret + "\n")
        self.healthPort = freeLoopbackPort()
        self.config = self.base / "config.toml"
        self.config.write_text(
            "[qbittorrent]\n"
            # Nothing listens on the discard port: no port is ever applied.
            'base_url = "http://127.0.0.1:9"\n'
            'username = "admin"\n'
            "[protonvpn]\n"
            f'forwarded_port_path = "{self.file}"\n'
            "[metrics]\n"
            "enabled = true\n"
            f"port = {self.healthPort}\n"
            "[health]\n"
            "enabled = true\n"
        )
        self.runs = 0

    def spawn(self, *argv: str) -> tuple[subprocess.Popen[bytes], Path]:
        """C{python -m qbportsync ARGV}, its output in a file; stopped in cleanup."""
        root = str(Path(__file__).parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, [env.get("PYTHONPATH")])]
        )
        env["QB_PORT_SYNC_QB_PASSWORD"] = "not-the-secret"
        self.runs += 1
        output = self.base / f"run-{self.runs}.out"
        with open(output, "wb") as out, open(output.with_suffix(".err"), "wb") as err:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qbportsync",
                    *argv,
                    "--config",
                    str(self.config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.base,
            )
        self.addCleanup(stopProcess, process)
        return process, output

    def replace(self, make: Callable[[Path], None]) -> None:
        """Make a new file with C{make} and rename it over the port file."""
        temporary = self.dir / "new"
        make(temporary)
        os.replace(temporary, self.file)

    def get(self, path: str) -> tuple[int, bytes, float]:
        """GET C{path} on the health port: status, body, seconds it took."""
        started = time.monotonic()
        url = f"http://127.0.0.1:{self.healthPort}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                code, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        return code, body, time.monotonic() - started

    def status(self) -> dict[str, Any]:
        try:
            body = self.get("/status")[1]
        except OSError:
            return {}
        status: dict[str, Any] = json.loads(body)
        return status

    def test_daemonShowsTroubleAndKeepsAnswering(self) -> None:
        """/status names each bad file, /healthz answers 503 at once meanwhile."""
        daemon, output = self.spawn("--strategy", "file")
        waitFor(lambda: self.status().get("source_port") == 40000, "port 40000")
        said = f"The port file {self.file}"
        for make, cause in [
            (os.mkfifo, f"{said} is a FIFO, not a regular file"),
            (
                lambda p: p.symlink_to(self.base / "secret"),
                f"{said} holds {len(self.secret) + 1} bytes that are not a port number",
            ),
            (
                lambda p: p.write_text("0\n"),
                f"{said} holds port 0, which forwards nothing",
            ),
            (lambda p: p.write_text("4" * 5000), f"{said} is larger than 4096 bytes"),
            (lambda p: p.write_text(""), f"The VPN is down: {self.file} is empty"),
        ]:
            self.replace(make)
            waitFor(lambda c=cause: self.status().get("source_trouble") == c, cause)
            code, _, seconds = self.get("/healthz")
            self.assertEqual(code, 503)
            self.assertLess(seconds, 2)
            self.assertEqual(self.status()["source_port"], 40000)
        # The VPN back with the same port: delivered again, the trouble ends.
        self.replace(lambda p: p.write_text("40000\n"))
        waitFor(lambda: self.status().get("source_trouble") is None, "no trouble")
        stopProcess(daemon)
        logged = output.read_text() + output.with_suffix(".err").read_text()
        self.assertIn("is a FIFO, not a regular file", logged)
        self.assertNotIn("hunter2", logged)

    def once(self) -> tuple[int, dict[str, Any], str, float]:
        """Run --once --json: exit code, JSON line, all output, seconds."""
        started = time.monotonic()
        process, output = self.spawn("--once", "--json", "--strategy", "file")
        code = process.wait(30)
        elapsed = time.monotonic() - started
        stdout = output.read_text()
        lines = stdout.splitlines()
        self.assertEqual(len(lines), 1, stdout)
        everything = stdout + output.with_suffix(".err").read_text()
        return code, json.loads(lines[0]), everything, elapsed

    def test_oneShotNotes(self) -> None:
        """--once --json says what is wrong in its note, never what the file holds."""
        self.replace(lambda p: p.symlink_to(self.base / "secret"))
        code, result, everything, _ = self.once()
        self.assertEqual(code, 1)
        self.assertEqual(
            result["note"],
            f"The port file {self.file} holds {len(self.secret) + 1} bytes that "
            "are not a port number",
        )
        self.assertNotIn("hunter2", everything)
        self.replace(os.mkfifo)
        code, result, _, elapsed = self.once()
        self.assertEqual(code, 1)
        self.assertEqual(
            result["note"], f"The port file {self.file} is a FIFO, not a regular file"
        )
        self.assertLess(elapsed, 20)
