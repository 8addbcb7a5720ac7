"""Tests for L{qbportsync.sources.portfile}: reader, parser, watcher, one-shot read."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, cast

from attrs import define, field
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from qbportsync.backoff import Backoff
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    SourceError,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources import portfile
from qbportsync.sources.portfile import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE_SELF,
    IN_MOVED_TO,
    PortFileSource,
)
from qbportsync.sources.portfilepath import WatchPoint, watchPoints
from qbportsync.sources.portfilereader import (
    READ_LIMIT,
    NotARegularFile,
    UnusableContent,
    parsePortFile,
    readPortFile,
)
from qbportsync.tap import inotifyFactory


class ParseTests(SynchronousTestCase):
    def test_plainPort(self) -> None:
        """A decimal port with or without a newline is read."""
        self.assertEqual(parsePortFile(b"51413\n"), 51413)
        self.assertEqual(parsePortFile(b"51413"), 51413)
        self.assertEqual(parsePortFile(b"  51413 \r\n"), 51413)

    def test_firstOfSeveral(self) -> None:
        """gluetun's list of ports, one a line, gives the first."""
        self.assertEqual(parsePortFile(b"40000\n40001\n40002"), 40000)

    def test_emptyMeansDown(self) -> None:
        """An empty or blank file means the VPN is down: no port."""
        self.assertIsNone(parsePortFile(b""))
        self.assertIsNone(parsePortFile(b"\n \n"))

    def test_garbageSaysOnlyItsSize(self) -> None:
        """Garbage is refused with its size in bytes, never its content."""
        for content in [b"abc", b"-5", b"5e3", b"12 34", b"\xff\xfe", b"40000\nx"]:
            with self.assertRaises(UnusableContent, msg=content) as caught:
                parsePortFile(content)
            self.assertEqual(
                str(caught.exception),
                f"holds {len(content)} bytes that are not a port number",
            )

    def test_portZeroAndOutOfRange(self) -> None:
        """Port 0 and numbers past 65535 are refused without echoing long numbers."""
        self.assertEqual(
            str(self.assertRaises(UnusableContent, parsePortFile, b"0\n")),
            "holds port 0, which forwards nothing",
        )
        for content in [b"65536", b"123456789", b"40000\n70000"]:
            message = str(self.assertRaises(UnusableContent, parsePortFile, content))
            self.assertEqual(message, "holds a number outside the ports 1-65535")

    def test_nonAsciiDigits(self) -> None:
        """Digits of other scripts are not taken for a port."""
        self.assertRaises(UnusableContent, parsePortFile, "١٢٣٤".encode())

    @given(st.binary(max_size=64))
    def test_anyBytes(self, content: bytes) -> None:
        """Any content gives a valid port, None, or one of three fixed sentences."""
        try:
            port = parsePortFile(content)
        except UnusableContent as e:
            self.assertIn(
                str(e),
                {
                    f"holds {len(content)} bytes that are not a port number",
                    "holds port 0, which forwards nothing",
                    "holds a number outside the ports 1-65535",
                },
            )
            return
        self.assertTrue(port is None or 1 <= port <= 65535)


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.file = self.dir.child("forwarded_port")

    def test_regularFile(self) -> None:
        """A regular file is read whole, also through a symlink."""
        self.file.setContent(b"40000\n40001")
        self.assertEqual(readPortFile(self.file.path), b"40000\n40001")
        link = self.dir.child("link")
        os.symlink(self.file.path, link.path)
        self.assertEqual(readPortFile(link.path), b"40000\n40001")

    def test_atTheLimit(self) -> None:
        """A file of exactly the limit is read; one byte more is refused."""
        self.file.setContent(b"4" * READ_LIMIT)
        self.assertEqual(len(readPortFile(self.file.path)), READ_LIMIT)
        self.file.setContent(b"4" * (READ_LIMIT + 1))
        error = self.assertRaises(UnusableContent, readPortFile, self.file.path)
        self.assertEqual(str(error), f"is larger than {READ_LIMIT} bytes")

    def test_directory(self) -> None:
        """A directory is not a port file, and says so."""
        self.file.makedirs()
        error = self.assertRaises(NotARegularFile, readPortFile, self.file.path)
        self.assertEqual(str(error), "is a directory, not a regular file")
        self.assertEqual(error.kind, "file")

    def test_characterDevice(self) -> None:
        """A symlink to a device is refused without opening it."""
        os.symlink("/dev/zero", self.file.path)
        error = self.assertRaises(NotARegularFile, readPortFile, self.file.path)
        self.assertEqual(str(error), "is a character device, not a regular file")

    def test_missing(self) -> None:
        """A missing file is an OSError, as the watcher expects."""
        self.assertRaises(FileNotFoundError, readPortFile, self.file.path)


class WatchPointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = FilePath(self.mktemp())
        self.base.makedirs()
        self.root = os.path.realpath(self.base.path)

    def test_plainPath(self) -> None:
        """A path without symlinks is watched in its directory."""
        self.base.child("VPN").makedirs()
        self.base.child("VPN").child("forwarded_port").setContent(b"1")
        path = os.path.join(self.root, "VPN", "forwarded_port")
        self.assertEqual(
            watchPoints(path),
            (WatchPoint(os.path.join(self.root, "VPN"), "forwarded_port"),),
        )

    def test_missingPart(self) -> None:
        """The first missing part is watched in the directory that exists."""
        path = os.path.join(self.root, "Proton", "VPN", "forwarded_port")
        self.assertEqual(watchPoints(path), (WatchPoint(self.root, "Proton"),))

    def test_symlinkedDirectory(self) -> None:
        """A symlink on the way is watched, then the file where it leads."""
        self.base.child("real").child("VPN").makedirs()
        os.symlink("real", os.path.join(self.root, "Proton"))
        path = os.path.join(self.root, "Proton", "VPN", "forwarded_port")
        self.assertEqual(
            watchPoints(path),
            (
                WatchPoint(self.root, "Proton"),
                WatchPoint(os.path.join(self.root, "real", "VPN"), "forwarded_port"),
            ),
        )

    def test_symlinkWithParent(self) -> None:
        """A relative target with .. is resolved from the link's real directory."""
        self.base.child("a").child("b").makedirs()
        self.base.child("a").child("c").makedirs()
        self.base.child("c").makedirs()
        os.symlink("../c", os.path.join(self.root, "a", "b", "port"))
        self.assertEqual(
            watchPoints(os.path.join(self.root, "a", "b", "port", "file"))[-1],
            WatchPoint(os.path.join(self.root, "a", "c"), "file"),
        )
        os.symlink("../../c", os.path.join(self.root, "a", "b", "up"))
        self.assertEqual(
            watchPoints(os.path.join(self.root, "a", "b", "up", "file"))[-1],
            WatchPoint(os.path.join(self.root, "c"), "file"),
        )

    def test_symlinkLoopBounded(self) -> None:
        """A symlink loop ends the way instead of looping."""
        os.symlink("loop", os.path.join(self.root, "loop"))
        points = watchPoints(os.path.join(self.root, "loop", "file"))
        self.assertEqual(set(points), {WatchPoint(self.root, "loop")})


@define
class FakeNotifier:
    """Stands in for INotify: records watches; the test calls back."""

    watches: list[tuple[FilePath[str], int, list[Callable[..., object]]]] = field(
        factory=list
    )
    closed: bool = False
    refusing: bool = False
    """Refuse every watch, as INotify does a directory it may not read."""

    def watch(
        self, path: FilePath[str], mask: int, callbacks: list[Callable[..., object]]
    ) -> None:
        if self.refusing:
            raise OSError(errno.EACCES, "Permission denied")
        self.watches.append((path, mask, callbacks))

    def loseConnection(self) -> None:
        self.closed = True


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics.create()
        self.base = FilePath(self.mktemp())
        self.dir = self.base.child("Proton").child("VPN")
        self.file = self.dir.child("forwarded_port")
        self.notifiers: list[FakeNotifier] = []
        self.seen: list[Forwarded | SourceTrouble] = []
        self.source = PortFileSource(
            self.clock,
            self.file,
            self.metrics,
            self.makeNotifier,
            backoff=Backoff(first=0.5, cap=30.0, jitter=0),
        )

    def makeNotifier(self) -> Any:
        notifier = FakeNotifier()
        self.notifiers.append(notifier)
        return notifier

    def write(self, content: bytes) -> None:
        self.dir.makedirs(ignoreExistingDirectory=True)
        self.file.setContent(content)

    def event(
        self,
        name: str = "forwarded_port",
        mask: int = IN_CLOSE_WRITE,
        watch: int = -1,
    ) -> None:
        """Call back as INotify does, then let the reactor turn once."""
        path, _, callbacks = self.notifiers[-1].watches[watch]
        target = path.child(name) if name else path
        for callback in callbacks:
            callback(None, target.asBytesMode(), mask)
        self.clock.advance(0)

    def ports(self) -> list[int]:
        return [f.port for f in self.seen if isinstance(f, Forwarded)]

    def troubles(self) -> list[SourceTrouble]:
        return [t for t in self.seen if isinstance(t, SourceTrouble)]

    def failReads(self, error: int, times: int) -> list[int]:
        """Make the next C{times} reads fail with C{error}; count the reads."""
        reads = [0]
        real = portfile.readPortFile

        def read(path: str) -> bytes:
            reads[0] += 1
            if reads[0] <= times:
                raise OSError(error, os.strerror(error))
            return real(path)

        self.patch(portfile, "readPortFile", read)
        return reads

    def test_providesInterface(self) -> None:
        """PortFileSource provides IPortSource."""
        self.assertTrue(verifyObject(IPortSource, self.source))

    def test_currentPortAtStart(self) -> None:
        """An existing file's port is delivered as soon as watching starts."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.assertEqual(self.seen, [Forwarded(port=40000, source="file")])
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.dir)

    def test_changeDelivered(self) -> None:
        """A write to the file delivers its new port."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"40001\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40001])
        self.assertEqual(
            self.metrics.registry.get_sample_value("qb_port_sync_forwarded_port"), 40001
        )

    def test_otherFilesIgnored(self) -> None:
        """Events about other files in the directory do not read ours."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"40001\n")
        self.event(name="other")
        self.assertEqual(self.ports(), [40000])

    def test_sameContentOnce(self) -> None:
        """Several events for one write deliver the port once."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.event(mask=IN_CREATE)
        self.event()
        self.event(mask=IN_ATTRIB)
        self.assertEqual(self.ports(), [40000])

    def test_garbageIsTroubleWithoutContent(self) -> None:
        """Garbage is a parse trouble naming its size; the next good port arrives."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"port: soon\n")
        self.event()
        self.event()
        self.assertEqual(
            self.troubles(),
            [
                SourceTrouble(
                    f"The port file {self.file.path} holds 11 bytes that are "
                    "not a port number",
                    kind="parse",
                )
            ],
        )
        self.write(b"40002\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40002])

    def test_portZeroAndOversize(self) -> None:
        """Port 0 and an oversized file are parse troubles; the last port stays."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"0\n")
        self.event()
        self.write(b"4" * (READ_LIMIT + 1))
        self.event()
        self.assertEqual(self.ports(), [40000])
        path = self.file.path
        self.assertEqual(
            [(t.cause, t.kind) for t in self.troubles()],
            [
                (f"The port file {path} holds port 0, which forwards nothing", "parse"),
                (f"The port file {path} is larger than 4096 bytes", "parse"),
            ],
        )

    def test_emptyIsVPNDown(self) -> None:
        """An empty file reports the VPN down, once."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"")
        self.event()
        self.event()
        self.assertEqual(
            self.seen[1:],
            [SourceTrouble(f"The VPN is down: {self.file.path} is empty", "file")],
        )

    def test_reconnectWithSamePortDelivered(self) -> None:
        """Down then up again with the same port is delivered again."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"")
        self.event()
        self.write(b"40000\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40000])
        self.assertIsInstance(self.seen[1], SourceTrouble)

    def test_samePortAfterGarbageDelivered(self) -> None:
        """After any trouble the same port is delivered again, clearing it."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"nope")
        self.event()
        self.write(b"40000\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40000])

    def test_missingFileAtStart(self) -> None:
        """No file yet is a trouble until it appears."""
        self.dir.makedirs()
        self.source.start(self.seen.append)
        self.assertEqual(
            self.seen,
            [
                SourceTrouble(
                    f"No port file at {self.file.path} yet: waiting for the VPN client",
                    "file",
                )
            ],
        )
        self.write(b"40000")
        self.event(mask=IN_MOVED_TO)
        self.assertEqual(self.ports(), [40000])

    def test_fileGone(self) -> None:
        """A file removed after a port means the VPN is down."""
        self.write(b"40000")
        self.source.start(self.seen.append)
        self.file.remove()
        self.event()
        self.assertEqual(
            self.troubles(),
            [SourceTrouble(f"The VPN is down: {self.file.path} is gone", "file")],
        )

    def test_waitsForDirectory(self) -> None:
        """A missing directory is waited for by watching its nearest ancestor."""
        self.base.makedirs()
        self.source.start(self.seen.append)
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.base)
        self.write(b"40000\n")
        self.event(name="Proton", mask=IN_CREATE)
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.dir)
        self.assertTrue(self.notifiers[0].closed)
        self.assertEqual(self.ports(), [40000])

    def test_directoryRemoved(self) -> None:
        """When the directory goes away, its ancestor is watched again."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.file.remove()
        self.dir.remove()
        self.event(name="", mask=IN_DELETE_SELF)
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.dir.parent())
        self.write(b"40003\n")
        self.event(name="VPN", mask=IN_CREATE)
        self.assertEqual(self.ports(), [40000, 40003])

    def test_repointedSymlinkFollowed(self) -> None:
        """A symlinked directory pointed elsewhere is re-watched and re-read."""
        self.base.child("one").child("VPN").makedirs()
        self.base.child("two").child("VPN").makedirs()
        self.base.child("one").child("VPN").child("forwarded_port").setContent(b"1")
        self.base.child("two").child("VPN").child("forwarded_port").setContent(b"2")
        link = self.base.child("Proton")
        os.symlink("one", link.path)
        self.source.start(self.seen.append)
        watched = [w[0] for w in self.notifiers[-1].watches]
        self.assertEqual(watched, [self.base, self.base.child("one").child("VPN")])
        os.symlink("two", self.base.child("new").path)
        os.replace(self.base.child("new").path, link.path)
        self.event(name="Proton", mask=IN_MOVED_TO, watch=0)
        watched = [w[0] for w in self.notifiers[-1].watches]
        self.assertEqual(watched, [self.base, self.base.child("two").child("VPN")])
        self.assertTrue(self.notifiers[0].closed)
        self.assertEqual(self.ports(), [1, 2])

    def test_staleNotifierIgnored(self) -> None:
        """Events still queued in a replaced INotify change nothing."""
        self.base.makedirs()
        self.source.start(self.seen.append)
        old = self.notifiers[-1].watches[-1][2]
        self.write(b"40000\n")
        self.event(name="Proton", mask=IN_CREATE)
        self.assertEqual(len(self.notifiers), 2)
        for callback in old:
            callback(None, self.base.child("Proton").asBytesMode(), IN_DELETE_SELF)
        self.clock.advance(0)
        self.assertEqual(len(self.notifiers), 2)
        self.assertFalse(self.notifiers[-1].closed)

    def test_readErrorRetriedWithBackoff(self) -> None:
        """A failed read is reported once and retried after growing waits."""
        self.write(b"40000\n")
        reads = self.failReads(errno.EMFILE, times=3)
        self.source.start(self.seen.append)
        self.assertEqual(
            self.seen,
            [
                SourceTrouble(
                    f"Cannot read the port file {self.file.path}: "
                    "Too many open files; retrying",
                    "file",
                )
            ],
        )
        waits = []
        while not self.ports():
            (call,) = self.clock.getDelayedCalls()
            waits.append(call.getTime() - self.clock.seconds())
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [0.5, 1.0, 2.0])
        self.assertEqual(reads[0], 4)
        self.assertEqual(len(self.troubles()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoffCapped(self) -> None:
        """The wait between retries stops growing at 30 seconds."""
        self.write(b"40000\n")
        self.failReads(errno.EIO, times=100)
        self.source.start(self.seen.append)
        for _ in range(10):
            (call,) = self.clock.getDelayedCalls()
            wait = call.getTime() - self.clock.seconds()
            self.clock.advance(wait)
        self.assertEqual(wait, 30.0)

    def test_attributeChangeRetriesAtOnce(self) -> None:
        """IN_ATTRIB (chmod) re-reads at once, without waiting for the retry."""
        self.write(b"40000\n")
        self.failReads(errno.EACCES, times=1)
        self.source.start(self.seen.append)
        self.assertEqual(self.ports(), [])
        self.event(mask=IN_ATTRIB)
        self.assertEqual(self.ports(), [40000])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_permissionCauseNamesFix(self) -> None:
        """A file we may not read is named, with the chmod that fixes it."""
        self.write(b"40000\n")
        self.failReads(errno.EACCES, times=1)
        self.source.start(self.seen.append)
        (trouble,) = self.troubles()
        self.assertIn(self.file.path, trouble.cause)
        self.assertIn("chmod a+r", trouble.cause)

    def test_notifierFailureRetried(self) -> None:
        """When INotify cannot start (no descriptors), the file is read after waits."""
        self.write(b"40000\n")
        failures = [2]

        def factory() -> Any:
            if failures[0]:
                failures[0] -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.makeNotifier()

        source = PortFileSource(
            self.clock,
            self.file,
            self.metrics,
            factory,
            backoff=Backoff(first=0.5, cap=30.0, jitter=0),
        )
        source.start(self.seen.append)
        self.assertEqual(self.ports(), [40000])
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.assertEqual(len(self.notifiers), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_watchRefusedReadsAfterWaits(self) -> None:
        """A directory INotify cannot watch is read after growing waits, warned once."""
        self.write(b"40000\n")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def factory() -> Any:
            notifier = self.makeNotifier()
            notifier.refusing = len(self.notifiers) <= 2
            return notifier

        source = PortFileSource(
            self.clock,
            self.file,
            self.metrics,
            factory,
            backoff=Backoff(first=0.5, cap=30.0, jitter=0),
        )
        source.start(self.seen.append)
        self.assertEqual(self.ports(), [40000])
        self.write(b"40001\n")
        self.clock.advance(0.5)
        self.assertEqual(self.ports(), [40000, 40001])
        self.assertTrue(self.notifiers[0].closed)
        self.clock.advance(1.0)
        self.assertFalse(self.notifiers[-1].closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"cannot watch {self.dir.path}", formatEvent(warnings[0]))
        self.assertEqual(
            formatEvent(events[-1]), f"Following the port file {self.file.path} again"
        )

    def test_stopCloses(self) -> None:
        """Stopping closes INotify and cancels retries; later events do nothing."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        callbacks = self.notifiers[-1].watches[-1][2]
        self.failReads(errno.EIO, times=1)
        self.event(mask=IN_ATTRIB)
        self.successResultOf(self.source.stop())
        self.assertTrue(self.notifiers[-1].closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.write(b"40001\n")
        for callback in callbacks:
            callback(None, self.file.asBytesMode(), IN_CLOSE_WRITE)
        self.clock.advance(0)
        self.assertEqual(self.ports(), [40000])

    def test_directoryWhereFileShouldBe(self) -> None:
        """A directory at the file's path is a file trouble, nothing delivered."""
        self.dir.makedirs()
        self.file.makedirs()
        self.source.start(self.seen.append)
        self.assertEqual(
            self.seen,
            [
                SourceTrouble(
                    f"The port file {self.file.path} is a directory, not a "
                    "regular file",
                    "file",
                )
            ],
        )


class PollingTests(SynchronousTestCase):
    def test_pollsWithoutINotify(self) -> None:
        """Without INotify the file is read every poll interval."""
        clock = Clock()
        path = FilePath(self.mktemp())
        path.setContent(b"40000")
        seen: list[Forwarded | SourceTrouble] = []
        source = PortFileSource(clock, path, Metrics.create(), None, pollInterval=2)
        source.start(seen.append)
        path.setContent(b"40001")
        clock.advance(1.9)
        self.assertEqual(seen, [Forwarded(port=40000, source="file")])
        clock.advance(0.1)
        self.assertEqual(seen[-1], Forwarded(port=40001, source="file"))
        path.setContent(b"")
        clock.advance(2)
        self.assertIsInstance(seen[-1], SourceTrouble)
        self.successResultOf(source.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class FetchOnceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.file = self.dir.child("forwarded_port")
        self.source = PortFileSource(Clock(), self.file, Metrics.create(), None)

    def test_port(self) -> None:
        """A good file gives its port."""
        self.dir.makedirs()
        self.file.setContent(b"40000\n")
        self.assertEqual(
            self.successResultOf(self.source.fetchOnce()),
            Forwarded(port=40000, source="file"),
        )

    def test_noDirectory(self) -> None:
        """No directory at all means this environment has no such VPN client."""
        failure = self.failureResultOf(self.source.fetchOnce(), SourceUnavailable)
        self.assertIn(self.dir.path, failure.getErrorMessage())

    def test_transientProblems(self) -> None:
        """A missing, empty, garbled or odd file is a transient error naming it."""
        self.dir.makedirs()
        failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
        self.assertIn(self.file.path, failure.getErrorMessage())
        for content in (b"", b"nope", b"0", b"4" * 5000):
            self.file.setContent(content)
            failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
            self.assertIn(self.file.path, failure.getErrorMessage())
        self.file.remove()
        os.mkfifo(self.file.path)
        failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
        self.assertEqual(
            failure.getErrorMessage(),
            f"The port file {self.file.path} is a FIFO, not a regular file",
        )

    def test_readError(self) -> None:
        """A read error other than a permission is a transient error."""
        self.dir.makedirs()
        self.file.setContent(b"40000")

        def read(path: str) -> bytes:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(portfile, "readPortFile", read)
        failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
        self.assertIn("Too many open files", failure.getErrorMessage())


class RealINotifyTests(TestCase):
    """The watcher with the real INotify and real files."""

    def setUp(self) -> None:
        factory = inotifyFactory(global_reactor)
        if factory is None:
            raise SkipTest("INotify is not available on this platform")
        self.dir = FilePath(self.mktemp()).child("VPN")
        self.file = self.dir.child("forwarded_port")
        self.waiting: list[tuple[int, Deferred[None]]] = []
        self.seen: list[int] = []
        self.source = PortFileSource(
            cast(Any, global_reactor), self.file, Metrics.create(), factory
        )
        self.source.start(self.deliver)
        self.addCleanup(self.source.stop)

    def deliver(self, seen: Forwarded | SourceTrouble) -> None:
        if not isinstance(seen, Forwarded):
            return
        self.seen.append(seen.port)
        for port, d in list(self.waiting):
            if port == seen.port:
                self.waiting.remove((port, d))
                d.callback(None)

    def expect(self, port: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append((port, d))
        d.addTimeout(5, cast(Any, global_reactor))
        return d

    async def test_followsWritesAndRenames(self) -> None:
        """Directory created late, in-place writes and renames are all seen."""
        self.dir.makedirs()
        d = self.expect(40000)
        self.file.setContent(b"40000\n")  # FilePath writes a temp file, renames
        await d
        d = self.expect(40001)
        with open(self.file.path, "r+b") as f:  # in place, like gluetun
            f.truncate(0)
            f.write(b"40001")
        await d
        self.assertEqual(self.seen, [40000, 40001])

    async def test_directoryRecreated(self) -> None:
        """The directory removed and made again is followed."""
        self.dir.makedirs()
        d = self.expect(40000)
        self.file.setContent(b"40000")
        await d
        self.file.remove()
        os.rmdir(self.dir.path)
        d = self.expect(40005)
        self.dir.makedirs()
        self.file.setContent(b"40005")
        await d
