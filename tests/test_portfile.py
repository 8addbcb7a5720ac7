"""Tests for L{qbportsync.sources.portfile}: parser, watcher, one-shot read."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from attrs import define, field
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from qbportsync.interfaces import Forwarded, IPortSource, SourceError, SourceUnavailable
from qbportsync.metrics import Metrics
from qbportsync.sources.portfile import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE_SELF,
    PortFileError,
    PortFileSource,
    parsePortFile,
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

    def test_garbage(self) -> None:
        """Anything else is an error that shows the content."""
        for content in [b"abc", b"0", b"65536", b"-5", b"5e3", b"12 34", b"\xff\xfe"]:
            with self.assertRaises(PortFileError, msg=content) as caught:
                parsePortFile(content)
            self.assertTrue(str(caught.exception))
        self.assertIn(
            "abc", str(self.assertRaises(PortFileError, parsePortFile, b"abc"))
        )

    def test_nonAsciiDigits(self) -> None:
        """Digits of other scripts are not taken for a port."""
        self.assertRaises(PortFileError, parsePortFile, "١٢٣٤".encode())

    @given(st.binary(max_size=64))
    def test_anyBytes(self, content: bytes) -> None:
        """Any content gives a valid port, None, or PortFileError: nothing else."""
        try:
            port = parsePortFile(content)
        except PortFileError:
            return
        self.assertTrue(port is None or 1 <= port <= 65535)


@define
class FakeNotifier:
    """Stands in for INotify: records watches; the test calls back."""

    watches: list[tuple[FilePath[str], int, list[Callable[..., object]]]] = field(
        factory=list
    )
    closed: bool = False

    def watch(
        self, path: FilePath[str], mask: int, callbacks: list[Callable[..., object]]
    ) -> None:
        self.watches.append((path, mask, callbacks))

    def loseConnection(self) -> None:
        self.closed = True


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics.create()
        self.dir = FilePath(self.mktemp()).child("Proton").child("VPN")
        self.file = self.dir.child("forwarded_port")
        self.notifiers: list[FakeNotifier] = []
        self.seen: list[Forwarded] = []
        self.source = PortFileSource(
            self.clock, self.file, self.metrics, self.makeNotifier
        )

    def makeNotifier(self) -> Any:
        notifier = FakeNotifier()
        self.notifiers.append(notifier)
        return notifier

    def write(self, content: bytes) -> None:
        self.dir.makedirs(ignoreExistingDirectory=True)
        self.file.setContent(content)

    def event(self, name: str = "forwarded_port", mask: int = IN_CLOSE_WRITE) -> None:
        path, _, callbacks = self.notifiers[-1].watches[-1]
        for callback in callbacks:
            callback(None, path.child(name).asBytesMode(), mask)

    def ports(self) -> list[int]:
        return [f.port for f in self.seen]

    def test_providesInterface(self) -> None:
        """PortFileSource provides IPortSource."""
        self.assertTrue(verifyObject(IPortSource, self.source))

    def test_currentPortAtStart(self) -> None:
        """An existing file's port is delivered as soon as watching starts."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.assertEqual(self.ports(), [40000])
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.dir)
        self.assertEqual(self.seen[0].source, "file")

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
        self.assertEqual(self.ports(), [40000])

    def test_garbageKeepsLastPort(self) -> None:
        """Garbage is counted and ignored; the next good port still arrives."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"port: soon\n")
        self.event()
        self.assertEqual(self.ports(), [40000])
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "qb_port_sync_errors_total", {"kind": "parse"}
            ),
            1,
        )
        self.write(b"40002\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40002])

    def test_emptyAndPortZeroIgnored(self) -> None:
        """An empty file (VPN down) and port 0 deliver nothing."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        for content in (b"", b"0\n"):
            self.write(content)
            self.event()
        self.assertEqual(self.ports(), [40000])

    def test_reconnectWithSamePortDelivered(self) -> None:
        """Down then up again with the same port is delivered again."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        self.write(b"")
        self.event()
        self.write(b"40000\n")
        self.event()
        self.assertEqual(self.ports(), [40000, 40000])

    def test_waitsForDirectory(self) -> None:
        """A missing directory is waited for by watching its nearest ancestor."""
        base = self.dir.parent().parent()
        base.makedirs()
        self.source.start(self.seen.append)
        self.assertEqual(self.notifiers[-1].watches[-1][0], base)
        self.write(b"40000\n")
        self.event(name="Proton", mask=IN_CREATE)
        self.clock.advance(0)
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
        self.clock.advance(0)
        self.assertEqual(self.notifiers[-1].watches[-1][0], self.dir.parent())
        self.write(b"40003\n")
        self.event(name="VPN", mask=IN_CREATE)
        self.clock.advance(0)
        self.assertEqual(self.ports(), [40000, 40003])

    def test_stopCloses(self) -> None:
        """Stopping closes INotify and later events deliver nothing."""
        self.write(b"40000\n")
        self.source.start(self.seen.append)
        callbacks = self.notifiers[-1].watches[-1][2]
        self.successResultOf(self.source.stop())
        self.assertTrue(self.notifiers[-1].closed)
        self.write(b"40001\n")
        for callback in callbacks:
            callback(None, self.file.asBytesMode(), IN_CLOSE_WRITE)
        self.assertEqual(self.ports(), [40000])

    def test_unreadableFileCounted(self) -> None:
        """A file that cannot be read is an error of kind file, nothing lost."""
        self.dir.makedirs()
        self.file.makedirs()  # a directory where the file should be
        self.source.start(self.seen.append)
        self.assertEqual(self.ports(), [])
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "qb_port_sync_errors_total", {"kind": "file"}
            ),
            1,
        )


class PollingTests(SynchronousTestCase):
    def test_pollsWithoutINotify(self) -> None:
        """Without INotify the file is read every poll interval."""
        clock = Clock()
        path = FilePath(self.mktemp())
        path.setContent(b"40000")
        seen: list[Forwarded] = []
        source = PortFileSource(clock, path, Metrics.create(), None, pollInterval=2)
        source.start(seen.append)
        path.setContent(b"40001")
        clock.advance(1.9)
        self.assertEqual([f.port for f in seen], [40000])
        clock.advance(0.1)
        self.assertEqual([f.port for f in seen], [40000, 40001])
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
        """A missing, empty or garbled file is a transient error naming it."""
        self.dir.makedirs()
        failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
        self.assertIn(self.file.path, failure.getErrorMessage())
        for content in (b"", b"nope"):
            self.file.setContent(content)
            failure = self.failureResultOf(self.source.fetchOnce(), SourceError)
            self.assertIn(self.file.path, failure.getErrorMessage())


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

    def deliver(self, forwarded: Forwarded) -> None:
        self.seen.append(forwarded.port)
        for port, d in list(self.waiting):
            if port == forwarded.port:
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
