"""
The on-change hook: a program the user names in C{[hooks] on_change}, run
each time qBittorrent verifiably listens on a new port (to open it in a
firewall, tell a tracker, ...).

It runs beside the sync, never in its way: one run at a time, and changes
that come while it runs collapse into one more run, with the latest port,
after it ends.  No shell is involved, its environment holds nothing of ours
but PATH and HOME, it is stopped after C{hook_timeout_secs}, and what it
prints goes to our log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from qbportsync.interfaces import ApplyResult
from qbportsync.metrics import Metrics

_log = Logger()

KILL_GRACE_SECS = 5.0
"""After SIGTERM at the timeout, this long before SIGKILL."""
LINE_LIMIT = 1000
"""Characters of one output line that reach the log; the rest is cut."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@frozen
class PortChange:
    """What the hook is told: the new port and what we know around it."""

    port: int
    previous: int | None
    strategy: str
    interface: str

    def placeholders(self) -> dict[str, str]:
        """Each placeholder's text; an unknown previous port is empty."""
        return {
            "{port}": str(self.port),
            "{previous_port}": "" if self.previous is None else str(self.previous),
            "{strategy}": self.strategy,
            "{interface}": self.interface,
        }


def hookArguments(template: Sequence[str], change: PortChange) -> list[str]:
    """C{template} with every placeholder replaced in each argument."""
    values = change.placeholders()
    argv = []
    for argument in template:
        filled = argument
        for placeholder, value in values.items():
            filled = filled.replace(placeholder, value)
        argv.append(filled)
    return argv


def hookEnvironment(environ: Mapping[str, str], change: PortChange) -> dict[str, str]:
    """
    The hook's whole environment: PATH and HOME from ours, and the change as
    C{QBPORTSYNC_*}.  Nothing else, so no secret of ours can reach it.
    """
    values = change.placeholders()
    return {
        "PATH": environ.get("PATH") or DEFAULT_PATH,
        "HOME": environ.get("HOME") or "/",
        "QBPORTSYNC_PORT": values["{port}"],
        "QBPORTSYNC_PREVIOUS_PORT": values["{previous_port}"],
        "QBPORTSYNC_STRATEGY": values["{strategy}"],
        "QBPORTSYNC_INTERFACE": values["{interface}"],
    }


@frozen
class HookOutcome:
    """How one run ended."""

    result: str
    """One of L{qbportsync.metrics.HOOK_RESULTS}."""
    duration: float
    exitCode: int | None = None
    signal: int | None = None


class _HookProcess(ProcessProtocol):
    """Logs the hook's output line by line and reports how it ended."""

    def __init__(self, reactor: IReactorTime, program: str, timeout: float) -> None:
        self._reactor = reactor
        self._program = program
        self._timeout = timeout
        self._started = reactor.seconds()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}
        self._timer: IDelayedCall | None = None
        self._timedOut = False
        self.ended: Deferred[HookOutcome] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()
        self._timer = self._reactor.callLater(self._timeout, self._terminate)

    def _terminate(self) -> None:
        self._timedOut = True
        _log.warn(
            "The on-change hook {program} still runs after {timeout:g} s: "
            "stopping it (SIGTERM, then SIGKILL after {grace:g} s)",
            program=self._program,
            timeout=self._timeout,
            grace=KILL_GRACE_SECS,
        )
        self._signal("TERM")
        self._timer = self._reactor.callLater(KILL_GRACE_SECS, self._signal, "KILL")

    def _signal(self, name: str) -> None:
        assert self.transport is not None
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess(name)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._buffers:
            return
        lines = (self._buffers[childFD] + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._logLine(childFD, line)
        # A line that never ends is cut into pieces rather than held forever.
        while len(rest) > LINE_LIMIT * 4:
            self._logLine(childFD, rest[: LINE_LIMIT * 4])
            rest = rest[LINE_LIMIT * 4 :]
        self._buffers[childFD] = rest

    def _logLine(self, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if len(text) > LINE_LIMIT:
            text = text[:LINE_LIMIT] + "..."
        _log.info(
            "on-change hook {stream}: {line}",
            stream="stdout" if childFD == 1 else "stderr",
            line=text,
        )

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._buffers.items():
            if rest:
                self._logLine(childFD, rest)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        duration = self._reactor.seconds() - self._started
        value = reason.value
        exitCode: int | None = getattr(value, "exitCode", None)
        signal: int | None = getattr(value, "signal", None)
        if self._timedOut:
            result = "timeout"
        elif isinstance(value, error.ProcessDone):
            result = "ok"
        else:
            result = "failed"
        self.ended.callback(HookOutcome(result, duration, exitCode, signal))


class ChangeHook:
    """
    Runs C{[hooks] on_change} for each new port, one run at a time, the
    latest change next.
    """

    def __init__(
        self,
        reactor: Any,
        argv: Sequence[str],
        timeout: float,
        metrics: Metrics,
        environ: Mapping[str, str],
    ) -> None:
        """
        @param reactor: provides L{IReactorProcess} and L{IReactorTime}.
        @param argv: the program (an absolute path) and its arguments, with
            placeholders.
        """
        self._reactor = reactor
        self._argv = tuple(argv)
        self._timeout = timeout
        self._metrics = metrics
        self._environ = dict(environ)
        self._running: Deferred[HookOutcome] | None = None
        self._next: PortChange | None = None
        self._idle: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<ChangeHook {self._argv[0] if self._argv else '(none)'}>"

    def portChanged(self, change: PortChange) -> None:
        """Run the hook for C{change} now, or after the run under way."""
        if not self._argv:
            return
        if self._running is not None:
            if self._next is not None:
                _log.info(
                    "Port {port} replaces {skipped} as the next on-change hook run",
                    port=change.port,
                    skipped=self._next.port,
                )
            self._next = change
            return
        self._run(change)

    def onNewPort(self, strategy: str, interface: str) -> Callable[[ApplyResult], None]:
        """What PortSync and the one-shot call when qBittorrent took a new port."""

        def applied(result: ApplyResult) -> None:
            self.portChanged(
                PortChange(result.port, result.previous, strategy, interface)
            )

        return applied

    def whenIdle(self) -> Deferred[None]:
        """Fires when no run is under way or waiting (the one-shot mode waits)."""
        if self._running is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _run(self, change: PortChange) -> None:
        program = self._argv[0]
        argv = hookArguments(self._argv, change)
        process = _HookProcess(self._reactor, program, self._timeout)
        _log.info(
            "Running the on-change hook {program} for port {port}",
            program=program,
            port=change.port,
        )
        reactor: IReactorProcess = self._reactor
        try:
            reactor.spawnProcess(
                process, program, argv, env=hookEnvironment(self._environ, change)
            )
        except (OSError, error.ProcessExitedAlready) as e:
            # The file was checked at start; it may have gone since.
            self._record(HookOutcome("error", 0.0))
            _log.error(
                "Cannot run the on-change hook {program}: {why}",
                program=program,
                why=e,
            )
            self._afterRun()
            return
        self._running = process.ended
        process.ended.addCallback(self._ended, program, change)

    def _ended(self, outcome: HookOutcome, program: str, change: PortChange) -> None:
        self._running = None
        self._record(outcome)
        if outcome.result == "ok":
            _log.info(
                "The on-change hook {program} for port {port} succeeded "
                "in {duration:.3f} s",
                program=program,
                port=change.port,
                duration=outcome.duration,
            )
        else:
            how = (
                f"exited with status {outcome.exitCode}"
                if outcome.exitCode is not None
                else f"was killed by signal {outcome.signal}"
            )
            _log.warn(
                "The on-change hook {program} for port {port} {how} after "
                "{duration:.3f} s",
                program=program,
                port=change.port,
                how=how,
                duration=outcome.duration,
                result=outcome.result,
            )
        self._afterRun()

    def _afterRun(self) -> None:
        change, self._next = self._next, None
        if change is not None:
            self._run(change)
            return
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def _record(self, outcome: HookOutcome) -> None:
        self._metrics.hook_runs.labels(result=outcome.result).inc()
        if outcome.result != "error":
            self._metrics.hook_duration.observe(outcome.duration)
