"""
How the port file is reached: the directory entries to watch so that a
re-pointed symlink or a directory that appears is followed, and why the file
cannot be read when a permission is in the way, with the fix.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

from attrs import frozen

from qbportsync.interfaces import SourceTrouble

MAX_SYMLINKS = 40
"""As Linux's own limit when it resolves a path."""


@frozen
class WatchPoint:
    """A name in a directory whose change can change what a path leads to."""

    directory: str
    name: str


def watchPoints(path: str) -> tuple[WatchPoint, ...]:
    """
    Where to watch to follow C{path}: the entry of each symlink on the way
    (a re-pointed link leads elsewhere), then the file's own entry.  The way
    stops at a missing name, watched in its directory until it appears, or
    at a directory we may not search, whose own entry is watched so that a
    fix of its permissions is seen.
    """
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    pending = [part for part in path.split(os.sep) if part]
    points: list[WatchPoint] = []
    current = os.sep
    links = 0
    while pending:
        name = pending.pop(0)
        if name in (".", ".."):
            current = current if name == "." else os.path.dirname(current)
            continue
        entry = os.path.join(current, name)
        try:
            mode = os.lstat(entry).st_mode
        except FileNotFoundError:
            points.append(WatchPoint(current, name))
            break
        except OSError:
            if current != os.sep:
                parent, blocked = os.path.split(current)
                points.append(WatchPoint(parent, blocked))
            break
        if stat.S_ISLNK(mode):
            points.append(WatchPoint(current, name))
            links += 1
            if links > MAX_SYMLINKS:
                break
            target = os.readlink(entry)
            current = os.sep if os.path.isabs(target) else current
            pending[:0] = [part for part in target.split(os.sep) if part]
        elif pending:
            current = entry
        else:
            points.append(WatchPoint(current, name))
    return tuple(points)


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _closedDirectory(path: str) -> str | None:
    """The first directory above C{path} that we may not search, if any."""
    effective = os.access in os.supports_effective_ids
    directory = os.path.dirname(os.path.abspath(path))
    ancestors = []
    while directory not in ancestors:
        ancestors.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(ancestors):
        if os.path.isdir(directory) and not os.access(
            directory, os.X_OK, effective_ids=effective
        ):
            return directory
    return None


def unreadable(path: str, error: OSError) -> SourceTrouble:
    """Why C{path} cannot be read, with the fix when it is a permission."""
    prefix = f"Cannot read the port file {path}"
    if error.errno != errno.EACCES:
        return SourceTrouble(f"{prefix}: {error.strerror}; retrying", kind="file")
    user = _userName(os.geteuid())
    closed = _closedDirectory(path)
    if closed is None:
        return SourceTrouble(
            f"{prefix}: permission denied; let {user} read it "
            f"(chmod a+r, or setfacl -m u:{user}:r {path})",
            kind="file",
        )
    status = os.stat(closed)
    owner = _userName(status.st_uid)
    return SourceTrouble(
        f"{prefix}: the directory {closed} (owner {owner}, mode "
        f"{stat.S_IMODE(status.st_mode):04o}) does not let {user} in; run "
        f"qbportsync as {owner}, or let {user} in with "
        f"setfacl -m u:{user}:rx {closed}",
        kind="file",
        permanent=True,
    )
