"""
Where log events go: one text line each on a stream, or native journald
entries with their structured fields when systemd runs us with our output
going to the journal.

The journal's native protocol is written here directly (KEY=value lines in
one datagram), so no C library or extra package is needed.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    textFileLogObserver,
)
from zope.interface import implementer

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "qbportsync"
REDACTED = "<redacted>"

PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}
"""syslog priorities: debug, info, warning, err, crit."""

_SECRET = re.compile(
    r"pass(word|wd|phrase)?|secret|api_?key|token|cookie|authori[sz]ation|(^|_)sid$",
    re.IGNORECASE,
)
# Keys of twisted.python.log's legacy events: already in MESSAGE, or noise.
_LEGACY = frozenset(
    {"message", "format", "isError", "system", "time", "why", "failure", "printed"}
)
_OURS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TWISTED_NAMESPACE"})
_FIELD_MAX = 64

QUIET_NAMESPACES = (
    "twisted.web.client._HTTP11ClientFactory",
    "log_legacy",
    "twisted.internet.base",
)
"""
Loggers whose info lines only show at debug level: a "Starting factory" per
HTTP request, Twisted's old-style lines for every port and protocol started
or stopped, and the reactor's "Main loop terminated" that ends every
one-shot.  Their warnings and errors still show.
"""


def isSecretField(name: str) -> bool:
    """Whether a field named C{name} may hold a password, key or cookie."""
    return _SECRET.search(name) is not None


def _redacted(event: LogEvent) -> LogEvent:
    if not any(isSecretField(key) for key in event):
        return event
    return {
        key: REDACTED if isSecretField(key) else value for key, value in event.items()
    }


@implementer(ILogObserver)
class _Redacting:
    """Passes events on with the value of every secret-named field replaced."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        self._observer(_redacted(event))


def _fieldName(key: str) -> str | None:
    """
    C{key} as a journal field name (upper case, digits, underscores, not
    starting with an underscore or digit, at most 64 long), or None.
    """
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_0123456789")
    return name[:_FIELD_MAX] or None


def journalFields(event: LogEvent) -> list[tuple[str, str]]:
    """
    The journal fields for C{event}: message, priority, identifier, the
    logger's namespace, then each structured field upper-cased, secrets left
    out.
    """
    level = event.get("log_level", LogLevel.info)
    message = eventAsText(event, includeTimestamp=False, includeSystem=False)
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITIES.get(level, 6))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
    ]
    namespace = event.get("log_namespace")
    if namespace:
        fields.append(("TWISTED_NAMESPACE", str(namespace)))
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or isSecretField(key):
            continue
        name = _fieldName(key)
        if name is None or name in _OURS:
            continue
        fields.append((name, str(value)))
    return fields


def encodeJournalEntry(fields: Iterable[tuple[str, str]]) -> bytes:
    """
    One datagram of the journal's native protocol: C{NAME=value} lines, and
    for a value holding a newline, the name, a newline, the value's length as
    a little-endian 64-bit integer, the value and a newline.
    """
    parts = []
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)))
            parts.append(data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


@implementer(ILogObserver)
class JournaldLogObserver:
    """
    Sends each event to journald as a native entry; an event the journal
    will not take (socket gone, entry too large) goes to C{fallback}.
    """

    def __init__(self, socketPath: str, fallback: ILogObserver) -> None:
        self._socketPath = socketPath
        self._fallback = fallback

    def __call__(self, event: LogEvent) -> None:
        entry = encodeJournalEntry(journalFields(event))
        try:
            # A socket per entry: nothing to close, nothing to reconnect when
            # journald restarts; a daemon logs a few lines a minute.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
                journal.sendto(entry, self._socketPath)
        except OSError:
            self._fallback(event)


def _journalHasStream(stream: IO[Any], environ: Mapping[str, str]) -> bool:
    """
    Whether systemd connected C{stream} to the journal: C{$JOURNAL_STREAM} is
    its device and inode (systemd.exec(5)).
    """
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return environ.get("JOURNAL_STREAM") == f"{info.st_dev}:{info.st_ino}"


def makeLogObserver(
    stream: IO[Any],
    level: LogLevel,
    journald: bool | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    socketPath: str = JOURNAL_SOCKET,
) -> ILogObserver:
    """
    An observer for every event at C{level} or above, secrets redacted:
    native journald entries when C{journald} is true, or when it is None and
    systemd has pointed C{stream} at the journal; else one line of text each
    on C{stream}.  Without the journal's socket, text on C{stream} it is.
    """
    text = textFileLogObserver(stream)
    if journald is None:
        journald = _journalHasStream(stream, environ)
    if journald and os.path.exists(socketPath):
        observer: ILogObserver = JournaldLogObserver(socketPath, text)
    else:
        observer = text
    levels = LogLevelFilterPredicate(defaultLogLevel=level)
    if level != LogLevel.debug:
        for namespace in QUIET_NAMESPACES:
            levels.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))
    return FilteringLogObserver(_Redacting(observer), [levels])


def twistdObserver() -> ILogObserver:
    """
    For C{twistd --logger=qbportsync.logs.twistdObserver}: info and above,
    to the journal under systemd, else to standard output.
    """
    return makeLogObserver(sys.stdout, LogLevel.info)
