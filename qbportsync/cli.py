"""
The C{qb-port-sync} command: the daemon in the foreground, or with C{--once}
one reactor run that applies the forwarded port and reports how it went.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TextIO

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import Logger, LogLevel, globalLogBeginner
from twisted.python import usage
from twisted.python.failure import Failure

from qbportsync.config import ConfigError, loadConfig
from qbportsync.hooks import ChangeHook
from qbportsync.interfaces import (
    ApplyResult,
    IPortSink,
    IPortSource,
    SourceError,
    SourceUnavailable,
)
from qbportsync.logs import makeLogObserver
from qbportsync.metrics import Metrics
from qbportsync.qbittorrent import QBittorrentError
from qbportsync.refusals import RefusalStore, StoreError, stateDirectory
from qbportsync.tap import (
    EXIT_CONFIG,
    EXIT_TRANSIENT,
    EXIT_UNSUPPORTED,
    Options,
    daemonService,
    makeSink,
    makeSource,
    refusalStore,
)

_log = Logger()


@frozen
class Outcome:
    """What one one-shot run did: the JSON line, and the exit code."""

    code: int
    strategy: str
    detected_port: int | None = None
    applied: bool = False
    verified: bool = False
    note: str = ""

    def asJSON(self) -> str:
        """The one line a script reads."""
        return json.dumps(
            {
                "strategy": self.strategy,
                "detected_port": self.detected_port,
                "applied": self.applied,
                "verified": self.verified,
                "note": self.note,
            },
            separators=(",", ":"),
        )

    def asSentence(self) -> str:
        """The one line a person reads."""
        if self.code != 0:
            return f"Failed ({self.strategy}): {self.note}"
        state = "now listens" if self.applied else "already listened"
        extra = f" ({self.note})" if self.note else ""
        return (
            f"qBittorrent {state} on forwarded port {self.detected_port}, "
            f"verified, learnt from {self.strategy}{extra}."
        )


async def applyOnce(
    source: IPortSource,
    sink: IPortSink,
    bindInterface: str,
    onNewPort: Callable[[ApplyResult], object] = lambda result: None,
) -> Outcome:
    """
    Learn the port once, apply it, read it back; call C{onNewPort} when
    qBittorrent verifiably took a new port.
    """
    try:
        forwarded = await source.fetchOnce()
    except (ConfigError, SourceUnavailable) as e:
        # What only the source can find out (no route to a gateway, a
        # WireGuard link without one) is code 3
        # whatever the strategy: auto, which tries several, says 3 for all.
        return Outcome(EXIT_UNSUPPORTED, source.name, note=str(e))
    except SourceError as e:
        return Outcome(EXIT_TRANSIENT, source.name, note=str(e))
    if not 1 <= forwarded.port <= 65535:
        return Outcome(
            EXIT_TRANSIENT,
            source.name,
            forwarded.port,
            note=f"{source.name} gave port {forwarded.port}, which is not a port "
            "qBittorrent can listen on; nothing was applied",
        )
    try:
        result = await sink.apply(forwarded.port, bindInterface)
    except QBittorrentError as e:
        return Outcome(EXIT_TRANSIENT, source.name, forwarded.port, note=str(e))
    notes = [n for n in (forwarded.note, result.note) if n]
    if result.verified and result.applied and result.previous != result.port:
        onNewPort(result)
    if not result.verified:
        notes.append(f"qBittorrent did not keep port {forwarded.port}")
    return Outcome(
        0 if result.verified else EXIT_TRANSIENT,
        source.name,
        forwarded.port,
        applied=result.applied,
        verified=result.verified,
        note="; ".join(notes),
    )


@frozen
class Plan:
    """What the one-shot run uses, built from the configuration."""

    source: IPortSource
    sink: IPortSink
    bindInterface: str
    hook: ChangeHook


def prepare(
    reactor: Any, options: Options, environ: Mapping[str, str], uid: int
) -> Plan | Outcome:
    """Load the configuration and build what the one-shot run uses, or say why not."""
    strategy = options["strategy"]
    try:
        config = loadConfig(options["config"], environ)
        refusals = refusalStore(reactor, config, environ, uid)
        sink = makeSink(reactor, config, refusals)
        # Nothing is exported, and the port is read once: no watching.
        source = makeSource(
            reactor, config, strategy, Metrics.discarding(), sink, watch=False
        )
    except ConfigError as e:
        return Outcome(EXIT_CONFIG, strategy, note=str(e))
    except SourceUnavailable as e:
        return Outcome(EXIT_UNSUPPORTED, strategy, note=str(e))
    hook = ChangeHook(
        reactor,
        config.hooks.on_change,
        config.hooks.hook_timeout_secs,
        Metrics.discarding(),
        environ,
    )
    return Plan(source, sink, config.net.bind_interface, hook)


async def oneShot(
    reactor: Any,
    options: Options,
    environ: Mapping[str, str],
    uid: int,
    *,
    _prepare: Callable[
        [Any, Options, Mapping[str, str], int], Plan | Outcome
    ] = prepare,
) -> Outcome:
    """
    The C{--once} run, from the configuration to the port read back, and the
    on-change hook when the port changed.  Any error becomes the outcome,
    unexpected ones too (exit 1, their traceback logged at debug level only).
    """
    try:
        plan = _prepare(reactor, options, environ, uid)
        if isinstance(plan, Outcome):
            return plan
        outcome = await applyOnce(
            plan.source,
            plan.sink,
            plan.bindInterface,
            plan.hook.onNewPort(plan.source.name, plan.bindInterface),
        )
        await plan.hook.whenIdle()
        return outcome
    except Exception:
        failure = Failure()
        _log.failure("The one-shot run failed", failure, level=LogLevel.debug)
        name = failure.type.__name__ if failure.type else "error"
        return Outcome(
            EXIT_TRANSIENT,
            options["strategy"],
            note=f"unexpected {name}: {failure.getErrorMessage()} (run with "
            "--log-level debug for the traceback)",
        )


def report(outcome: Outcome, asJSON: bool, stdout: TextIO, stderr: TextIO) -> None:
    """
    Print the outcome once: the JSON line on stdout, or a sentence, on
    stdout for a success and on stderr for a failure.
    """
    if asJSON:
        print(outcome.asJSON(), file=stdout, flush=True)
    else:
        print(outcome.asSentence(), file=stderr if outcome.code else stdout)


def forgetRefusals(
    reactor: Any, environ: Mapping[str, str], uid: int, out: TextIO
) -> int:
    """C{--forget-refusals}: delete the login-refusal record; the exit code."""
    store = RefusalStore(reactor, stateDirectory(environ, uid))
    try:
        forgot = store.forget()
    except StoreError as e:
        print(f"qb-port-sync: {e}", file=out)
        return EXIT_TRANSIENT
    if forgot:
        print(f"Forgot the refused logins recorded in {store.path}.", file=out)
    else:
        print(f"No refused logins were recorded ({store.path}).", file=out)
    return 0


def startLogging(level: LogLevel, stream: TextIO) -> None:
    """Send log events at C{level} and above to C{stream} (or the journal)."""
    globalLogBeginner.beginLoggingTo(
        [makeLogObserver(stream, level)], redirectStandardIO=False
    )


async def main(
    reactor: Any,
    argv: list[str],
    environ: Mapping[str, str],
    stdout: TextIO,
    stderr: TextIO,
    uid: int,
    *,
    _startLogging: Callable[[LogLevel, TextIO], None] = startLogging,
) -> None:
    """
    Parse C{argv}, run, and exit with the code the run chose.  With
    C{--once --json}, every exit prints exactly one JSON line, usage errors
    included.
    """
    if argv[:1] == ["check"]:
        from qbportsync.check import runCheck

        _startLogging(LogLevel.critical, stderr)
        code = await runCheck(reactor, argv[1:], environ, uid, stdout, stderr)
        raise SystemExit(code)
    options = Options(stdout)
    try:
        options.parseOptions(argv)  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        if "--once" in argv and "--json" in argv:
            report(
                Outcome(EXIT_CONFIG, options["strategy"], note=str(e)),
                True,
                stdout,
                stderr,
            )
        else:
            print(
                f"qb-port-sync: {e}\nRun 'qb-port-sync --help' for the options.",
                file=stderr,
            )
        raise SystemExit(EXIT_CONFIG) from None
    if options["forget-refusals"]:
        code = forgetRefusals(
            reactor, environ, uid, stderr if options["once"] else stdout
        )
        if code or not options["once"]:
            raise SystemExit(code)
    if options["once"]:
        _startLogging(options.logLevel, stderr)
        outcome = await oneShot(reactor, options, environ, uid)
        report(outcome, options["json"], stdout, stderr)
        raise SystemExit(outcome.code)
    _startLogging(options.logLevel, stdout)
    service = daemonService(reactor, options, environ, uid, stderr)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    await Deferred()


def run() -> NoReturn:
    """Console-script entry point."""
    try:
        react(main, [sys.argv[1:], os.environ, sys.stdout, sys.stderr, os.getuid()])
    finally:
        # The process ends here: spare the interpreter a last collection of
        # every object it holds (a tenth of a second of a one-shot run).
        gc.freeze()
