"""
Reading a port file safely and parsing what it holds.

The file is data from another program, never a path to anything else's
content: only a regular file is opened (never a FIFO or a device), without
blocking, and no more than L{READ_LIMIT} bytes of it are read.  Errors say
what is wrong and how many bytes, never what the bytes are, so a symlink to
a secret cannot put the secret into a log line.
"""

from __future__ import annotations

import os
import stat

READ_LIMIT = 4096
"""A port file is a few bytes; a bigger one is refused, not cut."""

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_FILE_TYPES = [
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


class PortFileProblem(Exception):
    """
    The port file gives no port.  The message completes "The port file
    PATH ..." and never holds the file's content.
    """

    kind = "file"
    """Metric label of the error: "file" for the file, "parse" for its content."""


class NotARegularFile(PortFileProblem):
    """The path leads to a FIFO, a directory, a device or a socket."""


class UnusableContent(PortFileProblem):
    """The file holds something that is not a port, or too much of it."""

    kind = "parse"


def _requireRegular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    for test, name in _FILE_TYPES:
        if test(mode):
            raise NotARegularFile(f"is {name}, not a regular file")
    raise NotARegularFile("is not a regular file")


def readPortFile(path: str) -> bytes:
    """
    The whole content of the regular file at C{path} (symlinks followed).

    @raise OSError: it cannot be opened or read (missing, permissions,
        descriptors exhausted...): worth retrying.
    @raise PortFileProblem: it is not a regular file, or it is larger than
        L{READ_LIMIT}.
    """
    # Checked before opening, because opening a device can have effects;
    # checked again on the descriptor, because the path can change between.
    _requireRegular(os.stat(path).st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _requireRegular(os.fstat(fd).st_mode)
        chunks = []
        size = 0
        while size <= READ_LIMIT:
            chunk = os.read(fd, READ_LIMIT + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > READ_LIMIT:
        raise UnusableContent(f"is larger than {READ_LIMIT} bytes")
    return b"".join(chunks)


def parsePortFile(content: bytes) -> int | None:
    """
    The first port of a port file, or None when it is blank (VPN down).

    ProtonVPN writes one decimal port and maybe a newline; gluetun writes
    several ports joined by newlines, the first one ours.  Every line must
    be a port, so a file that merely starts with a number is refused.

    @raise UnusableContent: anything else.
    """
    lines = [line.strip() for line in content.split(b"\n")]
    ports = []
    for line in filter(None, lines):
        if not line.isdigit():
            raise UnusableContent(
                f"holds {len(content)} bytes that are not a port number"
            )
        # At most five digits, so that a long number (a PIN, a key) is
        # neither converted nor echoed.
        number = int(line) if len(line) <= 5 else None
        if number == 0:
            raise UnusableContent("holds port 0, which forwards nothing")
        if number is None or number > 65535:
            raise UnusableContent("holds a number outside the ports 1-65535")
        ports.append(number)
    return ports[0] if ports else None
