"""Tests for qbportsync.sdnotify against a real datagram socket."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.sdnotify import SystemdNotifier, watchdogInterval

PID = 4242


class FakeSystemd:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, testCase: SynchronousTestCase, abstract: bool = False):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testCase.addCleanup(self.socket.close)
        if abstract:
            name = f"qbportsync-test-{secrets.token_hex(8)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="qbps-notify-")
            testCase.addCleanup(shutil.rmtree, directory)
            self.address = os.path.join(directory, "notify")
            self.socket.bind(self.address)
        self.socket.setblocking(False)

    def messages(self) -> list[bytes]:
        """Every datagram received so far."""
        received = []
        while True:
            try:
                received.append(self.socket.recv(4096))
            except BlockingIOError:
                return received


def _notifier(
    systemd: FakeSystemd, clock: Clock | None = None, **environ: str
) -> SystemdNotifier:
    return SystemdNotifier(
        clock or Clock(), {"NOTIFY_SOCKET": systemd.address, **environ}, pid=PID
    )


class NotifyTests(SynchronousTestCase):
    """Messages to $NOTIFY_SOCKET."""

    def test_readyAndStatus(self) -> None:
        """ready() sends READY=1, status() sends STATUS=text."""
        systemd = FakeSystemd(self)
        notifier = _notifier(systemd)
        notifier.ready()
        notifier.status("port 51413 via natpmp, verified")
        self.assertEqual(
            systemd.messages(),
            [b"READY=1\n", b"STATUS=port 51413 via natpmp, verified\n"],
        )

    def test_statusOneLine(self) -> None:
        """A newline in the status text cannot start another assignment."""
        systemd = FakeSystemd(self)
        _notifier(systemd).status("error\nREADY=1")
        self.assertEqual(systemd.messages(), [b"STATUS=error READY=1\n"])

    def test_severalFields(self) -> None:
        """notify() puts several assignments in one datagram."""
        systemd = FakeSystemd(self)
        _notifier(systemd).notify(READY="1", STATUS="started")
        self.assertEqual(systemd.messages(), [b"READY=1\nSTATUS=started\n"])

    def test_abstractSocket(self) -> None:
        """A NOTIFY_SOCKET starting with @ is an abstract socket name."""
        systemd = FakeSystemd(self, abstract=True)
        _notifier(systemd).ready()
        self.assertEqual(systemd.messages(), [b"READY=1\n"])

    def test_withoutNotifySocket(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing is scheduled."""
        clock = Clock()
        notifier = SystemdNotifier(clock, {"WATCHDOG_USEC": "1000000"}, pid=PID)
        self.assertFalse(notifier.enabled)
        notifier.ready()
        notifier.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        notifier.stopService()

    def test_socketGone(self) -> None:
        """A vanished socket is logged, never raised."""
        systemd = FakeSystemd(self)
        notifier = _notifier(systemd)
        os.unlink(systemd.address)
        with capturedLogs() as events:
            notifier.ready()
        self.assertEqual(
            [formatEvent(event) for event in events],
            [
                f"could not notify systemd at {systemd.address}: "
                "No such file or directory"
            ],
        )


class WatchdogTests(SynchronousTestCase):
    """WATCHDOG=1 at half of $WATCHDOG_USEC, on the injected clock."""

    def test_pacing(self) -> None:
        """With WATCHDOG_USEC=10 s a ping goes out at 0, 5, 10 s and so on."""
        systemd = FakeSystemd(self)
        clock = Clock()
        notifier = _notifier(systemd, clock, WATCHDOG_USEC="10000000")
        notifier.startService()
        self.assertEqual(systemd.messages(), [b"WATCHDOG=1\n"])
        clock.advance(4.9)
        self.assertEqual(systemd.messages(), [])
        clock.advance(0.1)
        self.assertEqual(systemd.messages(), [b"WATCHDOG=1\n"])
        clock.pump([5, 5, 5])
        self.assertEqual(len(systemd.messages()), 3)
        notifier.stopService()

    def test_stopping(self) -> None:
        """Stopping the service says STOPPING=1 and ends the pings."""
        systemd = FakeSystemd(self)
        clock = Clock()
        notifier = _notifier(systemd, clock, WATCHDOG_USEC="2000000")
        notifier.startService()
        notifier.stopService()
        self.assertEqual(systemd.messages(), [b"WATCHDOG=1\n", b"STOPPING=1\n"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_startTwice(self) -> None:
        """A second startWatchdog does not double the pings."""
        systemd = FakeSystemd(self)
        clock = Clock()
        notifier = _notifier(systemd, clock, WATCHDOG_USEC="2000000")
        notifier.startWatchdog()
        notifier.startWatchdog()
        clock.advance(1)
        self.assertEqual(len(systemd.messages()), 2)
        notifier.stopWatchdog()

    def test_noWatchdogWithoutUsec(self) -> None:
        """Without WATCHDOG_USEC there are no pings."""
        systemd = FakeSystemd(self)
        clock = Clock()
        notifier = _notifier(systemd, clock)
        notifier.startService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(systemd.messages(), [])

    def test_interval(self) -> None:
        """The interval is half of WATCHDOG_USEC, for this PID only."""
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "30000000"}, PID), 15.0)
        self.assertEqual(
            watchdogInterval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, PID),
            1.5,
        )
        self.assertIsNone(
            watchdogInterval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, PID)
        )
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "0"}, PID))
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "soon"}, PID))
        self.assertIsNone(watchdogInterval({}, PID))
