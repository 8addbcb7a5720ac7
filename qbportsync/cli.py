"""
The C{qb-port-sync} command: the daemon in the foreground, or with C{--once}
one reactor run that applies the forwarded port and reports how it went.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TextIO

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import LogLevel, globalLogBeginner
from twisted.python import usage

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
from qbportsync.tap import (
    EXIT_CONFIG,
    EXIT_TRANSIENT,
    EXIT_UNSUPPORTED,
    Options,
    buildService,
    loadConfigOrExit,
    makeSink,
    makeSource,
)


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
    except ConfigError as e:
        return Outcome(EXIT_CONFIG, source.name, note=str(e))
    except SourceUnavailable as e:
        return Outcome(EXIT_UNSUPPORTED, source.name, note=str(e))
    except SourceError as e:
        return Outcome(EXIT_TRANSIENT, source.name, note=str(e))
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


async def oneShot(
    reactor: Any, options: Options, environ: Mapping[str, str], out: TextIO
) -> int:
    """The C{--once} run: print one line, return the exit code."""
    try:
        config = loadConfig(options["config"], environ)
    except ConfigError as e:
        print(f"qb-port-sync: {e}", file=sys.stderr)
        outcome = Outcome(EXIT_CONFIG, options["strategy"], note=str(e))
    else:
        sink = makeSink(reactor, config)
        try:
            source = makeSource(
                reactor, config, options["strategy"], Metrics.create(), sink
            )
        except SourceUnavailable as e:
            outcome = Outcome(EXIT_UNSUPPORTED, options["strategy"], note=str(e))
        else:
            hook = ChangeHook(
                reactor,
                config.hooks.on_change,
                config.hooks.hook_timeout_secs,
                Metrics.create(),
                environ,
            )
            outcome = await applyOnce(
                source,
                sink,
                config.net.bind_interface,
                hook.onNewPort(source.name, config.net.bind_interface),
            )
            await hook.whenIdle()
    if options["json"]:
        print(outcome.asJSON(), file=out)
    else:
        print(outcome.asSentence(), file=out)
    return outcome.code


def runDaemon(
    reactor: Any, options: Options, environ: Mapping[str, str]
) -> Deferred[None]:
    """Run the service until the reactor stops (SIGTERM, SIGINT)."""
    config = loadConfigOrExit(options["config"], environ)
    service = buildService(reactor, config, options["strategy"], environ)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    return Deferred()


def startLogging(level: LogLevel, stream: TextIO) -> None:
    """Send log events at C{level} and above to C{stream} (or the journal)."""
    globalLogBeginner.beginLoggingTo(
        [makeLogObserver(stream, level)], redirectStandardIO=False
    )


async def main(reactor: Any, argv: list[str]) -> None:
    """Parse C{argv}, run, and exit with the code the run chose."""
    options = Options()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(argv)  # type: ignore[no-untyped-call]
    except usage.UsageError as e:
        print(f"qb-port-sync: {e}\n\n{options}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    if options["once"]:
        startLogging(options.logLevel, sys.stderr)
        raise SystemExit(await oneShot(reactor, options, os.environ, sys.stdout))
    startLogging(options.logLevel, sys.stdout)
    await runDaemon(reactor, options, os.environ)


def run() -> NoReturn:
    """Console-script entry point."""
    react(main, [sys.argv[1:]])
