"""
The port file a VPN client writes (ProtonVPN's Linux app, gluetun), watched
with INotify on its directory, or polled where INotify is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from qbportsync.backoff import Backoff
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceError,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics
from qbportsync.sources.portfilepath import WatchPoint, unreadable, watchPoints
from qbportsync.sources.portfilereader import (
    PortFileProblem,
    parsePortFile,
    readPortFile,
)

if TYPE_CHECKING:
    from twisted.internet.inotify import INotify

_log = Logger()

# Linux's <sys/inotify.h> values: twisted.internet.inotify cannot even be
# imported where there is no INotify, and polling must still work there.
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_IGNORED = 0x8000

WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
GONE_MASK = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED


def _watchErrors() -> tuple[type[Exception], ...]:
    """
    What making an INotify or adding a watch raises; asked only where there
    is INotify, and not at import, which a one-shot run would pay for.
    """
    from twisted.internet.inotify import INotifyError

    return (OSError, INotifyError)


NotifierFactory = Callable[[], "INotify"]


@implementer(IPortSource)
class PortFileSource:
    """
    Report the port written in a file, at once and on every change, and
    why there is none while it cannot be read, is empty or holds garbage.

    Directories are watched rather than the file, so both in-place writes
    and atomic renames are seen; each symlink on the way is watched too, so
    a re-pointed link is followed; while the directory does not exist (VPN
    not connected yet) the entry of its first missing part is watched.  A
    failed read is retried with a growing wait.
    """

    name = "file"

    def __init__(
        self,
        reactor: IReactorTime,
        path: FilePath[str],
        metrics: Metrics,
        notifierFactory: NotifierFactory | None,
        pollInterval: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        """
        @param notifierFactory: makes a started INotify; None polls every
            C{pollInterval} seconds instead.
        @param backoff: the waits between retries of a failed read.
        """
        self._reactor = reactor
        self._path = path
        self._metrics = metrics
        self._notifierFactory = notifierFactory
        self._pollInterval = pollInterval
        self._backoff = backoff or Backoff(first=0.5, cap=30.0)
        self._deliver: Report | None = None
        self._notifier: INotify | None = None
        self._points: tuple[WatchPoint, ...] = ()
        self._interesting: set[bytes] = set()
        self._retry: IDelayedCall | None = None
        self._poller: LoopingCall | None = None
        self._lastContent: bytes | None = None
        self._everSeen = False
        self._trouble: str | None = None
        self._watchWarning: str | None = None

    def start(self, deliver: Report) -> None:
        """Read the file now, then follow it."""
        self._deliver = deliver
        _log.info("Watching the port file {path}", path=self._path.path)
        if self._notifierFactory is None:
            self._poller = LoopingCall(self._check)
            self._poller.clock = self._reactor
            self._poller.start(self._pollInterval, now=True)
        else:
            self._refresh()

    def stop(self) -> Deferred[None]:
        """Stop watching and retrying."""
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._cancelRetry()
        self._closeNotifier()
        self._deliver = None
        return succeed(None)

    def fetchOnce(self) -> Deferred[Forwarded]:
        """Read the file once, for the one-shot mode."""
        path = self._path.path
        try:
            port = parsePortFile(readPortFile(path))
        except FileNotFoundError:
            if not self._path.parent().isdir():
                return fail(
                    SourceUnavailable(
                        f"the directory {self._path.parent().path} does not exist: "
                        "is the VPN client installed and connected with port "
                        "forwarding on?"
                    )
                )
            return fail(SourceError(f"No port file at {path}: is the VPN connected?"))
        except OSError as e:
            trouble = unreadable(path, e)
            error = SourceUnavailable if trouble.permanent else SourceError
            return fail(error(trouble.cause))
        except PortFileProblem as e:
            return fail(SourceError(f"The port file {path} {e}"))
        if port is None:
            return fail(SourceError(f"The VPN is down: {path} is empty"))
        return succeed(Forwarded(port=port, source=self.name))

    def _refresh(self) -> None:
        """Follow the path again, watch what leads to the file, and read it."""
        if self._deliver is None:
            return
        self._cancelRetry()
        watching = self._watchPath()
        if self._check() and watching:
            self._backoff.reset()
        else:
            self._retry = self._reactor.callLater(self._backoff.next(), self._refresh)

    def _cancelRetry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _watchPath(self) -> bool:
        """Watch every point on the way to the file; False when INotify fails."""
        for _ in range(3):
            points = watchPoints(self._path.path)
            if self._notifier is None or points != self._points:
                self._closeNotifier()
                if not self._watch(points):
                    return False
            # A part of the path may have changed between the look and the watch.
            if watchPoints(self._path.path) == points:
                return True
        return False

    def _watch(self, points: tuple[WatchPoint, ...]) -> bool:
        assert self._notifierFactory is not None
        watchErrors = _watchErrors()
        directories = list(dict.fromkeys(point.directory for point in points))
        try:
            notifier = self._notifierFactory()
        except watchErrors:
            self._warnWatch("cannot start INotify (file descriptors used up?)")
            return False
        for directory in directories:
            try:
                notifier.watch(
                    FilePath(directory),
                    mask=WATCH_MASK,
                    callbacks=[partial(self._onEvent, notifier)],
                )
            except watchErrors:
                notifier.loseConnection()
                self._warnWatch(f"cannot watch {directory} (is it readable?)")
                return False
        self._notifier = notifier
        self._points = points
        self._interesting = {
            os.fsencode(os.path.join(point.directory, point.name)) for point in points
        }
        self._interesting.update(os.fsencode(d) for d in directories)
        if self._watchWarning is not None:
            self._watchWarning = None
            _log.info("Following the port file {path} again", path=self._path.path)
        return True

    def _warnWatch(self, why: str) -> None:
        if why != self._watchWarning:
            self._watchWarning = why
            _log.warn(
                "Cannot follow changes to the port file {path}: {why}; "
                "reading it again after growing waits instead",
                path=self._path.path,
                why=why,
            )

    def _closeNotifier(self) -> None:
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
            self._points = ()

    def _onEvent(
        self, notifier: INotify, ignored: object, path: FilePath[bytes], mask: int
    ) -> None:
        """INotify callback: follow the path again on news of any point on it."""
        if self._deliver is None or notifier is not self._notifier:
            return
        if mask & GONE_MASK:
            # A watched directory went away, and INotify closes itself on
            # IN_DELETE_SELF: watch anew.
            self._points = ()
        elif path.path not in self._interesting:
            return
        # Once INotify is done with its events: a new INotify may reuse the
        # descriptor of the one that is still reading them.
        self._cancelRetry()
        self._retry = self._reactor.callLater(0, self._refresh)

    def _check(self) -> bool:
        """Read the file and report what it says; False when worth retrying."""
        path = self._path.path
        try:
            port = parsePortFile(content := readPortFile(path))
        except FileNotFoundError:
            if self._everSeen:
                self._report(SourceTrouble(f"The VPN is down: {path} is gone", "file"))
            else:
                self._report(
                    SourceTrouble(
                        f"No port file at {path} yet: waiting for the VPN client",
                        "file",
                    )
                )
            return True
        except OSError as e:
            self._report(unreadable(path, e))
            return False
        except PortFileProblem as e:
            self._report(SourceTrouble(f"The port file {path} {e}", e.kind))
            return True
        if port is None:
            self._report(SourceTrouble(f"The VPN is down: {path} is empty", "file"))
        elif content != self._lastContent:
            self._lastContent = content
            self._everSeen = True
            self._trouble = None
            self._metrics.forwarded_port.set(port)
            _log.info("The port file {path} says {port}", path=path, port=port)
            assert self._deliver is not None
            self._deliver(Forwarded(port=port, source=self.name))
        return True

    def _report(self, trouble: SourceTrouble) -> None:
        """Report a trouble once; the next good read delivers its port again."""
        self._lastContent = None
        if trouble.cause != self._trouble:
            self._trouble = trouble.cause
            assert self._deliver is not None
            self._deliver(trouble)
