"""
The port file a VPN client writes (ProtonVPN's Linux app, gluetun), watched
with INotify on its directory, or polled where INotify is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceError,
    SourceUnavailable,
)
from qbportsync.metrics import Metrics

if TYPE_CHECKING:
    from twisted.internet.inotify import INotify

_log = Logger()

READ_LIMIT = 4096
"""A port file is a few bytes; read no more than this of it."""

# Linux's <sys/inotify.h> values: twisted.internet.inotify cannot even be
# imported where there is no INotify, and polling must still work there.
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000

WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
GONE_MASK = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED

NotifierFactory = Callable[[], "INotify"]


class PortFileError(ValueError):
    """The port file holds something that is not a port."""


def parsePortFile(content: bytes) -> int | None:
    """
    The port on the first line, or None when the file is empty (VPN down).
    gluetun may list several ports, one a line: the first one is ours.
    """
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        raise PortFileError(f"not text: {content[:40]!r}") from None
    lines = text.strip().splitlines()
    if not lines:
        return None
    first = lines[0].strip()
    if not (first.isascii() and first.isdigit()):
        raise PortFileError(f"not a port number: {first[:40]!r}")
    port = int(first)
    if not 1 <= port <= 65535:
        raise PortFileError(f"port {port} is outside 1-65535")
    return port


def _nearestExisting(path: FilePath[str]) -> FilePath[str]:
    """The path itself if it is a directory, else its nearest existing ancestor."""
    while not path.isdir() and path.parent() != path:
        path = path.parent()
    return path


@implementer(IPortSource)
class PortFileSource:
    """
    Report the port written in a file, at once and on every change.

    The directory is watched rather than the file, so both in-place writes
    and atomic renames are seen; while the directory does not exist (VPN not
    connected yet) its nearest existing ancestor is watched instead.
    """

    name = "file"

    def __init__(
        self,
        reactor: IReactorTime,
        path: FilePath[str],
        metrics: Metrics,
        notifierFactory: NotifierFactory | None,
        pollInterval: float = 2.0,
    ) -> None:
        """
        @param notifierFactory: makes a started INotify; None polls every
            C{pollInterval} seconds instead.
        """
        self._reactor = reactor
        self._path = path
        self._metrics = metrics
        self._notifierFactory = notifierFactory
        self._pollInterval = pollInterval
        self._deliver: Report | None = None
        self._notifier: INotify | None = None
        self._watched: FilePath[str] | None = None
        self._poller: LoopingCall | None = None
        self._lastContent: bytes | None = None

    def start(self, deliver: Report) -> None:
        """Read the file now, then follow it."""
        self._deliver = deliver
        _log.info("Watching the port file {path}", path=self._path.path)
        if self._notifierFactory is None:
            self._poller = LoopingCall(self._check)
            self._poller.clock = self._reactor
            self._poller.start(self._pollInterval, now=True)
        else:
            self._rewatch()

    def stop(self) -> Deferred[None]:
        """Stop watching."""
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._closeNotifier()
        self._deliver = None
        return succeed(None)

    def fetchOnce(self) -> Deferred[Forwarded]:
        """Read the file once, for the one-shot mode."""
        if not self._path.parent().isdir():
            return fail(
                SourceUnavailable(
                    f"the directory {self._path.parent().path} does not exist: "
                    "is the VPN client installed and connected with port "
                    "forwarding on?"
                )
            )
        try:
            content = self._read()
        except OSError as e:
            return fail(SourceError(f"cannot read {self._path.path}: {e.strerror}"))
        try:
            port = parsePortFile(content)
        except PortFileError as e:
            return fail(SourceError(f"{self._path.path}: {e}"))
        if port is None:
            return fail(
                SourceError(f"{self._path.path} is empty: the VPN is disconnected")
            )
        return succeed(Forwarded(port=port, source=self.name))

    def _read(self) -> bytes:
        with self._path.open("r") as f:
            return f.read(READ_LIMIT)

    def _rewatch(self) -> None:
        """Watch the file's directory, or its nearest ancestor until it exists."""
        target = _nearestExisting(self._path.parent())
        if target != self._watched:
            self._closeNotifier()
            assert self._notifierFactory is not None
            self._notifier = self._notifierFactory()
            self._notifier.watch(target, mask=WATCH_MASK, callbacks=[self._onEvent])
            self._watched = target
            if target != self._path.parent():
                _log.info(
                    "Waiting for {directory} to appear (VPN not connected yet?)",
                    directory=self._path.parent().path,
                )
            # It may have appeared between the look and the watch.
            if _nearestExisting(self._path.parent()) != target:
                self._rewatch()
                return
        self._check()

    def _closeNotifier(self) -> None:
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
            self._watched = None

    def _onEvent(self, ignored: object, path: FilePath[bytes], mask: int) -> None:
        """INotify callback: re-read on news of our file, re-watch on news of dirs."""
        if self._deliver is None:
            return
        if mask & GONE_MASK or self._watched != self._path.parent():
            # Our directory went away, or an ancestor changed while we wait
            # for it: INotify closes itself on IN_DELETE_SELF, so start anew.
            self._reactor.callLater(0, self._rewatchIfRunning)
            return
        if path.basename() == self._path.asBytesMode().basename():
            self._check()

    def _rewatchIfRunning(self) -> None:
        if self._deliver is not None:
            self._closeNotifier()
            self._rewatch()

    def _check(self) -> None:
        """Read the file; deliver its port when it changed and is valid."""
        try:
            content = self._read()
        except FileNotFoundError:
            if self._lastContent is None:
                message = "No port file at {path} yet: waiting for the VPN client"
            else:
                message = "The port file {path} is gone: keeping the last port"
            self._noteContent(b"", message)
            return
        except OSError as e:
            self._metrics.errors.labels(kind="file").inc()
            _log.error(
                "Cannot read the port file {path}: {why}",
                path=self._path.path,
                why=e.strerror,
            )
            return
        if content == self._lastContent:
            return
        try:
            port = parsePortFile(content)
        except PortFileError as e:
            self._lastContent = content
            self._metrics.errors.labels(kind="parse").inc()
            _log.warn(
                "Ignoring the port file {path}: {why}; keeping the last port",
                path=self._path.path,
                why=str(e),
            )
            return
        if port is None:
            self._noteContent(
                content,
                "The port file {path} is empty (VPN down?): keeping the last port",
            )
            return
        self._lastContent = content
        self._metrics.forwarded_port.set(port)
        _log.info("The port file {path} says {port}", path=self._path.path, port=port)
        assert self._deliver is not None
        self._deliver(Forwarded(port=port, source=self.name))

    def _noteContent(self, content: bytes, message: str) -> None:
        if content != self._lastContent:
            self._lastContent = content
            _log.info(message, path=self._path.path)
