"""
A port file source in a process of its own, for the tests that need what a
test process cannot give itself: a lowered descriptor limit, or an identity
that permissions apply to (the test drops root's override capabilities).

    python -m tests.portfileprocess PATH [--nofile N] [--first-retry S] [--once]

Writes one JSON line per event on standard output: C{started} (with
C{overrides}: whether it may ignore file permissions), C{port}, C{trouble},
C{filled}, C{freed}, C{once}; each with C{t}, the monotonic clock (shared by
every process on the host).  Reads commands from standard input: C{fill}
opens descriptors until none is left, C{free} closes them.  Ends when
standard input closes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import sys
import time
from typing import Any


def emit(event: str, **fields: Any) -> None:
    """One line on standard output, written without opening anything."""
    line = json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n"
    os.write(1, line.encode())


CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def overridesPermissions() -> bool:
    """Whether this process may read and enter what permissions forbid."""
    if os.geteuid() != 0:
        return False
    with open("/proc/self/status") as status:
        (line,) = [x for x in status if x.startswith("CapEff:")]
    effective = int(line.split()[1], 16)
    return bool(effective & (1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--nofile", type=int)
    parser.add_argument("--first-retry", type=float, default=0.5)
    parser.add_argument("--once", action="store_true")
    options = parser.parse_args(argv)
    emit("started", overrides=overridesPermissions())
    if options.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (options.nofile, options.nofile))

    from twisted.internet import inotify, reactor, stdio
    from twisted.protocols.basic import LineOnlyReceiver
    from twisted.python.filepath import FilePath

    from qbportsync.backoff import Backoff
    from qbportsync.interfaces import Forwarded
    from qbportsync.metrics import Metrics
    from qbportsync.sources.portfile import PortFileSource

    def startedINotify() -> inotify.INotify:
        notifier = inotify.INotify(reactor)
        notifier.startReading()
        return notifier

    first = options.first_retry
    source = PortFileSource(
        reactor,
        FilePath(options.path),
        Metrics.create(),
        startedINotify,
        backoff=Backoff(first=first, cap=max(first, 30.0)),
    )
    if options.once:
        d = source.fetchOnce()
        d.addCallbacks(
            lambda forwarded: emit("once", port=forwarded.port),
            lambda failure: emit(
                "once",
                error=failure.type.__name__,
                message=failure.getErrorMessage(),
            ),
        )
        return

    fillers: list[int] = []

    class Commands(LineOnlyReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line == b"fill":
                while True:
                    try:
                        fillers.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError as e:
                        assert e.errno == errno.EMFILE, e
                        break
                emit("filled", count=len(fillers))
            elif line == b"free":
                while fillers:
                    os.close(fillers.pop())
                emit("freed")

        def connectionLost(self, reason: object = None) -> None:
            source.stop()
            reactor.stop()

    def deliver(seen: object) -> None:
        if isinstance(seen, Forwarded):
            emit("port", port=seen.port)
        else:
            emit("trouble", cause=seen.cause, kind=seen.kind, permanent=seen.permanent)

    stdio.StandardIO(Commands())
    reactor.callWhenRunning(source.start, deliver)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
