"""Tests for qbportsync.hooks: the on-change hook, with a fake and a real reactor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass

import qbportsync
from qbportsync.cli import applyOnce
from qbportsync.hooks import (
    KILL_GRACE_SECS,
    LINE_LIMIT,
    ChangeHook,
    PortChange,
    hookArguments,
    hookEnvironment,
)
from qbportsync.interfaces import ApplyResult, Forwarded
from qbportsync.metrics import Metrics
from qbportsync.sync import PortSync
from tests.fakes import FakeSink, FakeSource

HOOK = "/usr/local/bin/open-port"
TEMPLATE = (HOOK, "{port}", "--was={previous_port}", "{strategy}", "{interface}")
SECRET = "qb-Secret-Password-77"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@implementer(IProcessTransport)
@define(eq=False)
class FakeProcess:
    """The transport of one spawned process: records signals, never execs."""

    protocol: ProcessProtocol
    executable: str
    args: list[str]
    env: dict[str, str]
    signals: list[str] = field(factory=list)
    stdinClosed: bool = False
    exited: bool = False
    pid: int | None = 4242

    def signalProcess(self, signalID: str | int) -> None:
        if self.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(str(signalID))

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Any) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None

    def print(self, fd: int, text: str) -> None:
        self.protocol.childDataReceived(fd, text.encode())

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        """End the process: exit C{code}, or killed by C{signal}."""
        self.exited = True
        self.pid = None
        reason: Exception
        if code == 0 and signal is None:
            reason = error.ProcessDone(0)
        else:
            reason = error.ProcessTerminated(
                exitCode=None if signal else code, signal=signal
            )
        self.protocol.processEnded(Failure(reason))


@implementer(IReactorProcess)
class ProcessClock(Clock):
    """A Clock that also records spawnProcess calls, for the hook's tests."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawnError: Exception | None = None

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: Any,
        args: Any,
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: Any = False,
        childFDs: Any = None,
    ) -> Any:
        if self.spawnError is not None:
            raise self.spawnError
        process = FakeProcess(processProtocol, executable, list(args), dict(env))
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


verifyClass(IReactorProcess, ProcessClock)


class PlaceholderTests(SynchronousTestCase):
    """What the hook is given: arguments and environment."""

    def test_arguments(self) -> None:
        """Placeholders are replaced inside each argument; others stay."""
        change = PortChange(40000, 39999, "natpmp", "wg0")
        self.assertEqual(
            hookArguments([*TEMPLATE, "{port}:{port}", "{other}", "{{port}}"], change),
            [
                *(HOOK, "40000", "--was=39999", "natpmp", "wg0"),
                *("40000:40000", "{other}", "{40000}"),
            ],
        )

    def test_unknownPreviousIsEmpty(self) -> None:
        """An unknown previous port and interface are empty strings."""
        change = PortChange(40000, None, "file", "")
        self.assertEqual(
            hookArguments(TEMPLATE, change), [HOOK, "40000", "--was=", "file", ""]
        )

    def test_environment(self) -> None:
        """
        The environment is PATH, HOME and the QBPORTSYNC_* values only:
        nothing else of ours, no password.
        """
        ours = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/var/lib/qb",
            "QB_PORT_SYNC_QB_PASSWORD": SECRET,
            "LD_PRELOAD": "/tmp/evil.so",
        }
        self.assertEqual(
            hookEnvironment(ours, PortChange(40000, None, "gluetun", "tun0")),
            {
                "PATH": "/usr/bin:/bin",
                "HOME": "/var/lib/qb",
                "QBPORTSYNC_PORT": "40000",
                "QBPORTSYNC_PREVIOUS_PORT": "",
                "QBPORTSYNC_STRATEGY": "gluetun",
                "QBPORTSYNC_INTERFACE": "tun0",
            },
        )

    def test_environmentDefaults(self) -> None:
        """Without PATH or HOME of our own, safe defaults are given."""
        env = hookEnvironment({}, PortChange(1, None, "file", ""))
        self.assertIn("/usr/bin", env["PATH"].split(":"))
        self.assertEqual(env["HOME"], "/")


class RunTests(SynchronousTestCase):
    """ChangeHook with a fake process reactor."""

    def setUp(self) -> None:
        self.reactor = ProcessClock()
        self.metrics = Metrics.create()
        self.hook = ChangeHook(
            self.reactor,
            TEMPLATE,
            30.0,
            self.metrics,
            {"PATH": "/bin", "HOME": "/root", "QB_PORT_SYNC_QB_PASSWORD": SECRET},
        )

    def change(self, port: int, previous: int | None = 6881) -> None:
        self.hook.portChanged(PortChange(port, previous, "natpmp", "wg0"))

    def test_spawned(self) -> None:
        """The program itself is spawned (no shell) with the filled-in argv."""
        self.change(40000)
        [process] = self.reactor.processes
        self.assertEqual(
            (process.executable, process.args),
            (HOOK, [HOOK, "40000", "--was=6881", "natpmp", "wg0"]),
        )
        self.assertEqual(process.env["QBPORTSYNC_PORT"], "40000")
        self.assertNotIn(SECRET, repr(process.env))
        self.assertTrue(process.stdinClosed)

    def test_successCounted(self) -> None:
        """A run that exits 0 is counted as ok with its duration."""
        self.change(40000)
        self.reactor.advance(0.25)
        self.reactor.processes[0].exit(0)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_hook_runs_total", result="ok"), 1
        )
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_hook_duration_seconds_sum"), 0.25
        )

    def test_failureCounted(self) -> None:
        """A non-zero exit is counted as failed and logged with its status."""
        self.change(40000)
        with capturedLogs() as events:
            self.reactor.processes[0].exit(3)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_hook_runs_total", result="failed"), 1
        )
        said = [formatEvent(e) for e in events]
        self.assertIn(
            f"The on-change hook {HOOK} for port 40000 exited with status 3 "
            "after 0.000 s",
            said,
        )

    def test_outputLogged(self) -> None:
        """Output lines reach the log, split on newlines, long lines cut."""
        self.change(40000)
        process = self.reactor.processes[0]
        with capturedLogs() as events:
            process.print(1, "opened ")
            process.print(1, "40000\nsecond")
            process.print(2, "x" * (LINE_LIMIT + 50) + "\n")
            process.exit(0)
        said = [formatEvent(e) for e in events if "hook std" in formatEvent(e)]
        self.assertEqual(
            said,
            [
                "on-change hook stdout: opened 40000",
                "on-change hook stderr: " + "x" * LINE_LIMIT + "...",
                "on-change hook stdout: second",
            ],
        )

    def test_endlessLineBounded(self) -> None:
        """Output without newlines is logged in pieces, not held in memory."""
        self.change(40000)
        process = self.reactor.processes[0]
        with capturedLogs() as events:
            for _ in range(20):
                process.print(1, "y" * LINE_LIMIT)
        self.assertGreaterEqual(len(events), 4)

    def test_timeout(self) -> None:
        """
        At the timeout the hook gets SIGTERM, then SIGKILL after the grace;
        it is counted as a timeout.
        """
        self.change(40000)
        process = self.reactor.processes[0]
        self.reactor.advance(29.9)
        self.assertEqual(process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(KILL_GRACE_SECS)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        process.exit(signal=9)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_hook_runs_total", result="timeout"), 1
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_termEnough(self) -> None:
        """A hook that ends on SIGTERM gets no SIGKILL."""
        self.change(40000)
        process = self.reactor.processes[0]
        self.reactor.advance(30)
        process.exit(signal=15)
        self.reactor.advance(KILL_GRACE_SECS)
        self.assertEqual(process.signals, ["TERM"])

    def test_oneAtATimeLatestNext(self) -> None:
        """
        Changes during a run do not start another one; after it ends the
        latest change runs once, and the ones between are skipped.
        """
        self.change(40000)
        self.change(40001, 40000)
        self.change(40002, 40001)
        self.change(40003, 40002)
        self.assertEqual(len(self.reactor.processes), 1)
        self.reactor.processes[0].exit(0)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(self.reactor.processes[1].args[1:3], ["40003", "--was=40002"])
        self.reactor.processes[1].exit(0)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_whenIdle(self) -> None:
        """whenIdle fires once the run and the waiting one have ended."""
        self.successResultOf(self.hook.whenIdle())
        self.change(40000)
        self.change(40001)
        idle = self.hook.whenIdle()
        self.reactor.processes[0].exit(0)
        self.assertNoResult(idle)
        self.reactor.processes[1].exit(1)
        self.successResultOf(idle)

    def test_spawnError(self) -> None:
        """A program that cannot be started is counted as an error, logged."""
        self.reactor.spawnError = OSError(2, "No such file or directory")
        with capturedLogs() as events:
            self.change(40000)
        self.assertEqual(
            sample(self.metrics, "qb_port_sync_hook_runs_total", result="error"), 1
        )
        self.assertIn(f"Cannot run the on-change hook {HOOK}", formatEvent(events[-1]))
        self.successResultOf(self.hook.whenIdle())

    def test_noProgram(self) -> None:
        """Without [hooks] on_change nothing is spawned."""
        hook = ChangeHook(self.reactor, (), 30.0, self.metrics, {})
        hook.portChanged(PortChange(40000, None, "file", ""))
        self.assertEqual(self.reactor.processes, [])


class SyncHookTests(SynchronousTestCase):
    """PortSync calls the hook only when qBittorrent verifiably has a new port."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.sink = FakeSink()
        self.called: list[ApplyResult] = []
        self.sync = PortSync(
            self.clock,
            self.source,
            self.sink,
            Metrics.create(),
            rnd=lambda: 0.5,
            onNewPort=self.called.append,
        )
        self.sync.startService()

    def test_newPort(self) -> None:
        """A verified change to a new port calls the hook once."""
        self.source.emit(40000)
        self.sink.succeed()
        self.assertEqual([(r.port, r.previous) for r in self.called], [(40000, 6881)])

    def test_successiveChanges(self) -> None:
        """Each verified change calls the hook with its own port."""
        self.source.emit(40000)
        self.sink.succeed()
        self.source.emit(40001)
        self.sink.succeed()
        self.assertEqual(
            [(r.port, r.previous) for r in self.called],
            [(40000, 6881), (40001, 40000)],
        )

    def test_unverified(self) -> None:
        """No call when qBittorrent did not keep the port."""
        self.source.emit(40000)
        self.sink.succeed(verified=False)
        self.assertEqual(self.called, [])

    def test_alreadyThere(self) -> None:
        """No call when qBittorrent already listened on the port."""
        self.source.emit(6881)
        self.sink.succeed()
        self.assertEqual(self.called, [])


class NeverInTheWayTests(SynchronousTestCase):
    """A running hook neither blocks nor delays the sync."""

    def test_syncGoesOnWhileHookRuns(self) -> None:
        """
        With the first hook run still going, the next port is applied at
        once; its hook run waits for the first to end.
        """
        reactor = ProcessClock()
        source = FakeSource()
        sink = FakeSink()
        hook = ChangeHook(reactor, TEMPLATE, 30.0, Metrics.create(), {})
        PortSync(
            reactor,
            source,
            sink,
            Metrics.create(),
            rnd=lambda: 0.5,
            onNewPort=hook.onNewPort("file", ""),
        ).startService()
        source.emit(40000)
        sink.succeed()
        self.assertEqual(len(reactor.processes), 1)
        source.emit(40001)
        self.assertEqual([port for port, _, _ in sink.applies], [40000, 40001])
        sink.succeed()
        self.assertEqual(len(reactor.processes), 1)
        reactor.processes[0].exit(0)
        self.assertEqual(reactor.processes[1].args[1:3], ["40001", "--was=40000"])


class MissingProgramTests(TestCase):
    """A hook program that is not there stops us before anything runs."""

    def test_onceExitsTwo(self) -> None:
        """--once with a missing on_change program: exit 2, naming it."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        missing = directory / "no-such-hook"
        config = directory / "config.toml"
        config.write_text(f'[hooks]\non_change = ["{missing}", "{{port}}"]\n')
        config.chmod(0o600)
        done = subprocess.run(
            [
                *(sys.executable, "-m", "qbportsync"),
                "--once",
                "--json",
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                **os.environ,
                "PYTHONPATH": str(Path(qbportsync.__file__).parent.parent),
                "STATE_DIRECTORY": str(directory / "state"),
            },
        )
        self.assertEqual(done.returncode, 2, done.stdout + done.stderr)
        note = json.loads(done.stdout.splitlines()[-1])["note"]
        self.assertIn(f"hooks.on_change names {missing}", note)


class RealProcessTests(TestCase):
    """The hook as a real shell script, spawned by the real reactor."""

    def test_scriptSeesArgvAndEnvironment(self) -> None:
        """
        A script writes its argv and environment to a file: the filled-in
        arguments, the QBPORTSYNC_* values, PATH and HOME, and nothing else.
        """
        from twisted.internet import reactor

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        out = directory / "out"
        script = directory / "hook.sh"
        script.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$@" > "{out}.tmp"\n'
            f'env | sort >> "{out}.tmp"\n'
            f'mv "{out}.tmp" "{out}"\n'
            "echo done\n"
        )
        script.chmod(0o755)
        metrics = Metrics.create()
        hook = ChangeHook(
            reactor,
            (str(script), "{port}", "{previous_port}", "{strategy}", "{interface}"),
            10.0,
            metrics,
            {**os.environ, "QB_PORT_SYNC_QB_PASSWORD": SECRET},
        )
        hook.portChanged(PortChange(40000, None, "file", "wg0"))

        def check(ignored: object) -> None:
            lines = out.read_text().splitlines()
            self.assertEqual(lines[:4], ["40000", "", "file", "wg0"])
            env = dict(line.split("=", 1) for line in lines[4:] if "=" in line)
            env.pop("PWD", None)
            env.pop("SHLVL", None)
            env.pop("_", None)
            self.assertEqual(
                env,
                {
                    "PATH": os.environ.get("PATH"),
                    "HOME": os.environ.get("HOME"),
                    "QBPORTSYNC_PORT": "40000",
                    "QBPORTSYNC_PREVIOUS_PORT": "",
                    "QBPORTSYNC_STRATEGY": "file",
                    "QBPORTSYNC_INTERFACE": "wg0",
                },
            )
            self.assertNotIn(SECRET, out.read_text())
            self.assertEqual(
                sample(metrics, "qb_port_sync_hook_runs_total", result="ok"), 1
            )

        return hook.whenIdle().addCallback(check)

    def test_realTimeout(self) -> None:
        """A real hook that sleeps past its timeout is stopped and counted."""
        from twisted.internet import reactor

        metrics = Metrics.create()
        hook = ChangeHook(reactor, ("/bin/sleep", "30"), 0.2, metrics, {"PATH": "/bin"})
        hook.portChanged(PortChange(40000, None, "file", ""))

        def check(ignored: object) -> None:
            self.assertEqual(
                sample(metrics, "qb_port_sync_hook_runs_total", result="timeout"), 1
            )
            duration = sample(metrics, "qb_port_sync_hook_duration_seconds_sum")
            self.assertLess(duration, 2.0)

        idle: Deferred[None] = hook.whenIdle()
        return idle.addCallback(check)


class OnceHookTests(SynchronousTestCase):
    """The one-shot calls the hook only after a verified change of port."""

    def once(self, sinkPort: int, verified: bool = True) -> list[ApplyResult]:
        called: list[ApplyResult] = []
        source = FakeSource(once=Forwarded(40000, "file"))
        sink = FakeSink(port=sinkPort)
        d = Deferred.fromCoroutine(applyOnce(source, sink, "", called.append))
        sink.succeed(verified=verified)
        self.successResultOf(d)
        return called

    def test_newPort(self) -> None:
        """A verified change calls the hook with the port and the previous one."""
        self.assertEqual(
            [(r.port, r.previous) for r in self.once(6881)], [(40000, 6881)]
        )

    def test_noChangeNoHook(self) -> None:
        """Already on the port, or not kept: no hook."""
        self.assertEqual(self.once(6881, verified=False), [])
