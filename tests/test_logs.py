"""Tests for qbportsync.logs: text lines, journald entries, no secrets."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import tempfile

from twisted.logger import LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.logs import (
    PRIORITIES,
    QUIET_NAMESPACES,
    JournaldLogObserver,
    encodeJournalEntry,
    isSecretField,
    journalFields,
    makeLogObserver,
)

PASSWORD = "hunter2-Zq9"
API_KEY = "qbt_s3cr3tkey"
SID = "SIDvalue123"


def parseJournalEntry(data: bytes) -> dict[str, bytes]:
    """Decode one native-protocol datagram, as journald does."""
    fields: dict[str, bytes] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:
            name = line
            (size,) = struct.unpack("<Q", rest[:8])
            value = rest[8 : 8 + size]
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
        fields[name.decode()] = value
    return fields


class FakeJournal:
    """A real AF_UNIX datagram socket in a temporary directory."""

    def __init__(self, testCase: SynchronousTestCase) -> None:
        directory = tempfile.mkdtemp(prefix="qbps-journal-")
        testCase.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "socket")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testCase.addCleanup(self.socket.close)
        self.socket.bind(self.path)
        self.socket.setblocking(False)

    def entries(self) -> list[dict[str, bytes]]:
        """Every entry received so far."""
        received = []
        while True:
            try:
                received.append(parseJournalEntry(self.socket.recv(65536)))
            except BlockingIOError:
                return received


def _secretEvent(log: Logger) -> None:
    log.info(
        "logged in to {qb_url} as {username} with {password}",
        qb_url="http://127.0.0.1:8080",
        username="admin",
        password=PASSWORD,
        api_key=API_KEY,
        cookie=f"SID={SID}",
        Authorization=f"Bearer {API_KEY}",
        sid=SID,
    )


class TextTests(SynchronousTestCase):
    """Text lines on a stream."""

    def test_oneLine(self) -> None:
        """An event is one line with the namespace, level and message."""
        stream = io.StringIO()
        log = Logger(
            namespace="qbportsync.sync",
            observer=makeLogObserver(stream, LogLevel.info, journald=False),
        )
        log.info("applied port {port}", port=51413)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertTrue(
            lines[0].endswith(" [qbportsync.sync#info] applied port 51413"), lines
        )

    def test_levelFilter(self) -> None:
        """Events below the chosen level are dropped."""
        stream = io.StringIO()
        log = Logger(observer=makeLogObserver(stream, LogLevel.warn, journald=False))
        log.info("routine")
        log.warn("worrying")
        self.assertNotIn("routine", stream.getvalue())
        self.assertIn("worrying", stream.getvalue())

    def test_quietNamespaces(self) -> None:
        """
        treq's per-request "Starting factory" lines, Twisted's old-style
        port and protocol lines and the reactor's "Main loop terminated" show
        only at debug; their warnings always.
        """
        for namespace in (
            "twisted.web.client._HTTP11ClientFactory",
            "log_legacy",
            "twisted.internet.base",
        ):
            self.assertIn(namespace, QUIET_NAMESPACES)
            for level, shown in [(LogLevel.info, False), (LogLevel.debug, True)]:
                stream = io.StringIO()
                observer = makeLogObserver(stream, level, journald=False)
                Logger(namespace=namespace, observer=observer).info("routine")
                Logger(namespace=namespace, observer=observer).warn("trouble")
                self.assertEqual("routine" in stream.getvalue(), shown, level)
                self.assertIn("trouble", stream.getvalue())

    def test_legacyPortLines(self) -> None:
        """A real old-style "... starting on PORT" line is hidden at info."""
        stream = io.StringIO()
        observer = makeLogObserver(stream, LogLevel.info, journald=False)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        legacy_log.msg("UDP starting on 5350")
        legacy_log.msg("it broke badly", isError=True)
        self.assertNotIn("starting on", stream.getvalue())
        self.assertIn("it broke badly", stream.getvalue())

    def test_noSecrets(self) -> None:
        """Password, API key, cookie and Authorization never reach the text."""
        stream = io.StringIO()
        _secretEvent(Logger(observer=makeLogObserver(stream, LogLevel.debug, False)))
        text = stream.getvalue()
        self.assertIn("as admin with <redacted>", text)
        for secret in (PASSWORD, API_KEY, SID):
            self.assertNotIn(secret, text)

    def test_secretNames(self) -> None:
        """Names that may hold secrets are recognised, others are not."""
        for name in (
            "password",
            "qb_password",
            "PASSWORD",
            "api_key",
            "apikey",
            "cookie",
            "set_cookie",
            "authorization",
            "sid",
            "session_sid",
            "token",
        ):
            self.assertTrue(isSecretField(name), name)
        for name in ("port", "qb_url", "strategy", "username", "side", "inside"):
            self.assertFalse(isSecretField(name), name)


class JournaldTests(SynchronousTestCase):
    """Native journald entries on a fake journal socket."""

    def _log(self, journal: FakeJournal, stream: io.StringIO | None = None) -> Logger:
        observer = makeLogObserver(
            stream or io.StringIO(),
            LogLevel.debug,
            journald=True,
            socketPath=journal.path,
        )
        return Logger(namespace="qbportsync.sync", observer=observer)

    def test_fields(self) -> None:
        """Structured fields arrive upper-cased, with MESSAGE and PRIORITY."""
        journal = FakeJournal(self)
        stream = io.StringIO()
        self._log(journal, stream).info(
            "applied port {port} via {strategy}",
            port=51413,
            strategy="natpmp",
            qb_url="http://127.0.0.1:8080",
        )
        [entry] = journal.entries()
        self.assertEqual(
            entry,
            {
                "MESSAGE": b"applied port 51413 via natpmp",
                "PRIORITY": b"6",
                "SYSLOG_IDENTIFIER": b"qbportsync",
                "TWISTED_NAMESPACE": b"qbportsync.sync",
                "PORT": b"51413",
                "STRATEGY": b"natpmp",
                "QB_URL": b"http://127.0.0.1:8080",
            },
        )
        self.assertEqual(stream.getvalue(), "", "nothing on the stream")

    def test_priorities(self) -> None:
        """Each twisted level maps to its syslog priority."""
        journal = FakeJournal(self)
        log = self._log(journal)
        for level in LogLevel.iterconstants():
            log.emit(level, "at {level_name}", level_name=level.name)
        priorities = [
            (entry["MESSAGE"], entry["PRIORITY"]) for entry in journal.entries()
        ]
        self.assertEqual(
            priorities,
            [
                (b"at debug", b"7"),
                (b"at info", b"6"),
                (b"at warn", b"4"),
                (b"at error", b"3"),
                (b"at critical", b"2"),
            ],
        )
        self.assertEqual(set(PRIORITIES), set(LogLevel.iterconstants()))

    def test_multiline(self) -> None:
        """A traceback travels in the binary-safe form, whole."""
        journal = FakeJournal(self)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            self._log(journal).failure("applying failed", Failure())
        [entry] = journal.entries()
        message = entry["MESSAGE"].decode()
        self.assertTrue(message.startswith("applying failed\n"), message)
        self.assertIn("ZeroDivisionError", message)
        self.assertEqual(entry["PRIORITY"], b"2")

    def test_noSecrets(self) -> None:
        """Secret-named fields are left out and their values appear nowhere."""
        journal = FakeJournal(self)
        _secretEvent(self._log(journal))
        [entry] = journal.entries()
        self.assertEqual(
            set(entry),
            {
                "MESSAGE",
                "PRIORITY",
                "SYSLOG_IDENTIFIER",
                "TWISTED_NAMESPACE",
                "QB_URL",
                "USERNAME",
            },
        )
        raw = b"".join(entry.values())
        for secret in (PASSWORD, API_KEY, SID):
            self.assertNotIn(secret.encode(), raw)

    def test_fieldNames(self) -> None:
        """Keys become valid journal names; Twisted's own keys stay out."""
        event: LogEvent = {
            "log_format": "x",
            "log_level": LogLevel.info,
            "log_namespace": "n",
            "log_time": 0.0,
            "gateway-address": "192.0.2.1",
            "_private": 1,
            "2fa": "no",
            "message": ("legacy",),
            "priority": "high",
        }
        names = [name for name, _ in journalFields(event)]
        self.assertEqual(
            names,
            [
                "MESSAGE",
                "PRIORITY",
                "SYSLOG_IDENTIFIER",
                "TWISTED_NAMESPACE",
                "GATEWAY_ADDRESS",
                "PRIVATE",
                "FA",
            ],
        )

    def test_encoding(self) -> None:
        """Plain values are NAME=value lines, others length-prefixed."""
        self.assertEqual(
            encodeJournalEntry([("A", "1"), ("B", "x\ny")]),
            b"A=1\nB\n" + struct.pack("<Q", 3) + b"x\ny\n",
        )

    def test_socketGoneFallsBack(self) -> None:
        """If the journal socket vanishes, the event goes to the stream."""
        journal = FakeJournal(self)
        stream = io.StringIO()
        log = self._log(journal, stream)
        os.unlink(journal.path)
        log.warn("gateway {gateway} silent", gateway="192.0.2.1")
        self.assertIn("gateway 192.0.2.1 silent", stream.getvalue())

    def test_observerDirect(self) -> None:
        """JournaldLogObserver sends an event given to it directly."""
        journal = FakeJournal(self)
        observer = JournaldLogObserver(journal.path, lambda event: None)
        observer({"log_format": "hello", "log_level": LogLevel.info})
        self.assertEqual(journal.entries()[0]["MESSAGE"], b"hello")


class ChoiceTests(SynchronousTestCase):
    """When makeLogObserver picks the journal."""

    def _choose(
        self, journalStream: bool, socketExists: bool, journald: bool | None = None
    ) -> tuple[str, list[dict[str, bytes]]]:
        journal = FakeJournal(self)
        directory = tempfile.mkdtemp(prefix="qbps-stream-")
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "out"), "w+") as stream:
            info = os.fstat(stream.fileno())
            environ = (
                {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
                if journalStream
                else {"JOURNAL_STREAM": "1:2"}
            )
            if not socketExists:
                os.unlink(journal.path)
            observer = makeLogObserver(
                stream,
                LogLevel.info,
                journald,
                environ=environ,
                socketPath=journal.path,
            )
            Logger(observer=observer).info("hello")
            stream.flush()
            stream.seek(0)
            return stream.read(), journal.entries()

    def test_underSystemd(self) -> None:
        """Stdout connected to the journal and the socket there: journald."""
        text, entries = self._choose(journalStream=True, socketExists=True)
        self.assertEqual((text, len(entries)), ("", 1))

    def test_terminal(self) -> None:
        """Stdout not the journal's: text, even though journald runs."""
        text, entries = self._choose(journalStream=False, socketExists=True)
        self.assertIn("hello", text)
        self.assertEqual(entries, [])

    def test_noSocket(self) -> None:
        """Without the journal's socket: text, even when asked for journald."""
        text, _ = self._choose(journalStream=True, socketExists=False, journald=True)
        self.assertIn("hello", text)

    def test_forced(self) -> None:
        """journald=True uses the journal whatever stdout is."""
        text, entries = self._choose(
            journalStream=False, socketExists=True, journald=True
        )
        self.assertEqual((text, len(entries)), ("", 1))

    def test_stringStream(self) -> None:
        """A stream with no file descriptor never counts as the journal's."""
        stream = io.StringIO()
        Logger(
            observer=makeLogObserver(
                stream, LogLevel.info, environ={"JOURNAL_STREAM": "1:2"}
            )
        ).info("hello")
        self.assertIn("hello", stream.getvalue())
