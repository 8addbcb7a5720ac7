"""
The login-refusal record on disk, shared by every qb-port-sync process.

qBittorrent bans an address after C{WebUI\\MaxAuthenticationFailCount}
failed logins (5 by default, 3 on some set-ups), and its count never decays:
only a good login or the end of a ban resets it, and every process on the
host adds to it.  So before sending a login, the daemon and each one-shot
run consult one record, kept in a file under the state directory and locked
while a login is under way:

    - with the same credentials, at most L{LOGIN_TRIES} failed logins before
      a good one, the second no sooner than L{RETRY_AFTER_REFUSAL} seconds
      after the first; new credentials always get one try;
    - after a ban, no login until L{BAN_SECS} have passed;
    - a good login forgets everything recorded for that Web UI.

Credentials are recorded only as a slow keyed hash (scrypt, with a random
salt kept in the same file) of the Web UI's origin, the user name and the
password or API key: changing any of them makes a new record, and the file
never holds a secret.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pwd
import secrets
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

LOGIN_TRIES = 2
"""Failed logins with the same credentials before a good one, at most."""
RETRY_AFTER_REFUSAL = 600.0
"""Seconds between the first refused login and the last try."""
BAN_SECS = 3600.0
"""How long to send no login once banned: qBittorrent's default ban."""

APP_DIR = "qb-port-sync"
RECORD_NAME = "login-refusals.json"
LOCK_NAME = "login-refusals.lock"
LOCK_POLL_SECS = 0.02

HASH_COST = 2**14
"""scrypt's N: 16 MiB and some 50-250 ms per hash, and so per password
guessed from the file; paid only when the record holds a refusal."""
_MAX_HASH_COST = 2**18


class StoreError(Exception):
    """The record cannot be read or written; the message names the path."""


def stateDirectory(environ: Mapping[str, str], uid: int) -> str:
    """
    Where qb-port-sync keeps what must outlive a process: systemd's
    C{$STATE_DIRECTORY}, else C{$XDG_STATE_HOME/qb-port-sync} (default
    C{~/.local/state/qb-port-sync}) for a user, else C{/var/lib/qb-port-sync}
    for root.
    """
    given = environ.get("STATE_DIRECTORY", "")
    if given:
        # systemd joins several StateDirectory= entries with colons.
        return given.split(":")[0]
    if uid == 0:
        return f"/var/lib/{APP_DIR}"
    xdg = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(xdg):
        # The XDG specification says to ignore a relative path.
        home = environ.get("HOME", "") or pwd.getpwuid(uid).pw_dir
        xdg = os.path.join(home, ".local", "state")
    return os.path.join(xdg, APP_DIR)


@frozen
class Credentials:
    """What a login is made with; hashed, never stored."""

    origin: str
    """The Web UI's scheme, host and port: qBittorrent counts per address."""
    username: str
    secret: str = field(repr=False)


@frozen
class Refusal:
    """Why no login may be sent now, from the record."""

    refusals: int
    """Failed logins recorded for these credentials since the last good one."""
    lastRefusal: float
    """POSIX time of the last of them (0 if none)."""
    bannedUntil: float
    """POSIX time before which qBittorrent is taken to ban us (0 if not)."""
    retryAt: float
    """POSIX time of the next allowed try; C{inf} when only new credentials
    (or forgetting the record) will do."""


class RefusalStore:
    """
    The record file in C{directory}.  L{begin} waits for the lock without
    blocking the reactor; whoever holds it may send one login.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        directory: str,
        lockTimeout: float = 30.0,
        hashCost: int = HASH_COST,
    ) -> None:
        self._reactor = reactor
        self.directory = directory
        self.lockTimeout = lockTimeout
        self.hashCost = hashCost
        """scrypt's N for a new record; an existing one keeps its own."""
        self._keys: dict[tuple[str, int, Credentials], str] = {}

    def __repr__(self) -> str:
        return f"<RefusalStore {self.path}>"

    @property
    def path(self) -> str:
        """The record file: deleting it forgets every refusal."""
        return os.path.join(self.directory, RECORD_NAME)

    def begin(self, credentials: Credentials) -> Deferred[LoginTurn]:
        """
        Lock the record (polling, up to C{lockTimeout} seconds, while another
        process logs in) and read what it says about C{credentials}.  The
        caller must end the turn with exactly one of the L{LoginTurn}'s
        methods.
        """
        try:
            fd = self._openLock()
        except OSError as e:
            return fail(self._error("cannot open", self._lockPath, e))
        started = self._reactor.seconds()
        pending: list[IDelayedCall] = []

        def cancel(d: Deferred[LoginTurn]) -> None:
            for call in pending:
                call.cancel()
            os.close(fd)

        locked: Deferred[LoginTurn] = Deferred(cancel)

        def attempt() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self._reactor.seconds() - started >= self.lockTimeout:
                    os.close(fd)
                    locked.errback(
                        StoreError(
                            f"{self._lockPath} stayed locked for "
                            f"{self.lockTimeout:g} s: another qb-port-sync is "
                            "logging in to qBittorrent"
                        )
                    )
                else:
                    pending[:] = [self._reactor.callLater(LOCK_POLL_SECS, attempt)]
                return
            try:
                turn = LoginTurn(
                    self, fd, credentials, self._read(), self._reactor.seconds()
                )
            except StoreError as e:
                os.close(fd)
                locked.errback(e)
            else:
                locked.callback(turn)

        attempt()
        return locked

    def forget(self) -> bool:
        """
        Delete the record, waiting for the lock (the command line's
        C{--forget-refusals}); whether there was one.
        """
        try:
            fd = self._openLock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.unlink(self.path)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self._error("cannot delete", self.path, e) from e
        return True

    @property
    def _lockPath(self) -> str:
        # A file apart from the record, so that deleting the record (as the
        # refusal message suggests) never leaves a holder locking nothing.
        return os.path.join(self.directory, LOCK_NAME)

    def _openLock(self) -> int:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self._lockPath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._giveToOwner(fd)
        return fd

    def _giveToOwner(self, fd: int) -> None:
        # root running --once by hand must not leave files in the service
        # user's /var/lib/qb-port-sync that the service can no longer read.
        owner = os.stat(self.directory)
        if os.fstat(fd).st_uid != owner.st_uid:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, owner.st_uid, owner.st_gid)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return self._empty()
        except OSError as e:
            raise self._error("cannot read", self.path, e) from e
        except ValueError:
            data = None
        if not _wellFormed(data):
            _log.warn(
                "The login-refusal record {path} is damaged; starting a new one",
                path=self.path,
            )
            return self._empty()
        assert isinstance(data, dict)
        return data

    def _write(self, data: dict[str, Any]) -> None:
        temporary = self.path + ".new"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._giveToOwner(fd)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except OSError as e:
            raise self._error("cannot write", self.path, e) from e

    def _empty(self) -> dict[str, Any]:
        return {
            "format": 1,
            "salt": secrets.token_hex(16),
            "scrypt_n": self.hashCost,
            "origins": {},
        }

    def _key(self, data: dict[str, Any], credentials: Credentials) -> str:
        salt, cost = data["salt"], data["scrypt_n"]
        cached = self._keys.get((salt, cost, credentials))
        if cached is None:
            material = "\0".join(
                (credentials.origin, credentials.username, credentials.secret)
            )
            cached = hashlib.scrypt(
                material.encode("utf-8"),
                salt=bytes.fromhex(salt),
                n=cost,
                r=8,
                p=1,
                dklen=16,
                maxmem=2 * 128 * 8 * cost,
            ).hex()
            self._keys = {(salt, cost, credentials): cached}
        return cached

    def _error(self, doing: str, path: str, e: OSError) -> StoreError:
        why = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
        return StoreError(
            f"{doing} the login-refusal record {path} ({why}); qb-port-sync "
            "keeps it so that no run gets this address banned by qBittorrent: "
            "make that directory writable, or set STATE_DIRECTORY (or "
            "XDG_STATE_HOME) to a writable directory"
        )


class LoginTurn:
    """
    The locked record, for one login: L{refusal} says whether it may be
    sent; then L{succeeded}, L{refused}, L{banned} or L{release} records the
    outcome and unlocks.
    """

    def __init__(
        self,
        store: RefusalStore,
        fd: int,
        credentials: Credentials,
        data: dict[str, Any],
        now: float,
    ) -> None:
        self._store = store
        self._fd: int | None = fd
        self._credentials = credentials
        self._data = data
        self._now = now
        self.refusal: Refusal | None = self._verdict()

    @property
    def path(self) -> str:
        """The record file."""
        return self._store.path

    def _origin(self) -> dict[str, Any]:
        origins: dict[str, Any] = self._data["origins"]
        origin: dict[str, Any] = origins.get(self._credentials.origin, {})
        return origin

    def _keyed(self) -> str | None:
        # Hash only when the record holds something for this Web UI: the
        # usual run, with nothing refused, pays no scrypt at all.
        if not self._origin().get("refused"):
            return None
        return self._store._key(self._data, self._credentials)

    def _verdict(self) -> Refusal | None:
        origin = self._origin()
        bannedUntil = float(origin.get("banned_until", 0.0))
        if bannedUntil > self._now:
            return Refusal(0, 0.0, bannedUntil, bannedUntil)
        refused: dict[str, dict[str, float]] = origin.get("refused", {})
        key = self._keyed()
        if key is None or key not in refused:
            return None  # new credentials always get one try
        mine = refused[key]
        count, last = int(mine["refusals"]), float(mine["last_refusal"])
        total = sum(int(r["refusals"]) for r in refused.values())
        if count >= LOGIN_TRIES or total >= LOGIN_TRIES:
            return Refusal(count, last, 0.0, float("inf"))
        if self._now < last + RETRY_AFTER_REFUSAL:
            return Refusal(count, last, 0.0, last + RETRY_AFTER_REFUSAL)
        return None

    def succeeded(self) -> None:
        """A good login: qBittorrent forgot its count, so do we."""
        if self._credentials.origin in self._data["origins"]:
            del self._data["origins"][self._credentials.origin]
            self._finish(write=True)
        else:
            self._finish(write=False)

    def refused(self) -> Refusal:
        """
        qBittorrent refused the credentials: count it; what the record now
        says about the next try.
        """
        key = self._store._key(self._data, self._credentials)
        origin = self._data["origins"].setdefault(self._credentials.origin, {})
        refused = origin.setdefault("refused", {})
        count = int(refused.get(key, {}).get("refusals", 0)) + 1
        refused[key] = {"refusals": count, "last_refusal": self._now}
        after = self._verdict()
        self._finish(write=True)
        assert after is not None
        return after

    def banned(self) -> Refusal:
        """qBittorrent says the address is banned: its count ends with the ban."""
        until = self._now + BAN_SECS
        self._data["origins"][self._credentials.origin] = {"banned_until": until}
        self._finish(write=True)
        return Refusal(0, 0.0, until, until)

    def release(self) -> None:
        """No login was sent, or it got no answer: nothing to record."""
        self._finish(write=False)

    def _finish(self, write: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if write:
                self._store._write(self._data)
        finally:
            os.close(fd)


def _wellFormed(data: object) -> bool:
    if not (isinstance(data, dict) and data.get("format") == 1):
        return False
    salt, cost, origins = data.get("salt"), data.get("scrypt_n"), data.get("origins")
    if not (isinstance(salt, str) and len(salt) == 32 and isinstance(origins, dict)):
        return False
    if not (isinstance(cost, int) and 2 <= cost <= _MAX_HASH_COST):
        return False
    if cost & (cost - 1):
        return False
    try:
        bytes.fromhex(salt)
        for origin in origins.values():
            float(origin.get("banned_until", 0.0))
            for entry in origin.get("refused", {}).values():
                int(entry["refusals"]), float(entry["last_refusal"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return True
