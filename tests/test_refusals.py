"""
Tests for L{qbportsync.refusals}: where the login-refusal record lives, and
how it keeps, shares and forgets refusals.  How the qBittorrent client uses
it is in C{tests.test_qbittorrent.BanAvoidanceTests}.
"""

from __future__ import annotations

import json
import math
import os
import time

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.refusals import (
    HASH_COST,
    LOCK_NAME,
    LOGIN_TRIES,
    RECORD_NAME,
    RETRY_AFTER_REFUSAL,
    Credentials,
    Refusal,
    RefusalStore,
    StoreError,
    stateDirectory,
)
from tests.rig import requireRoot

ORIGIN = "http://127.0.0.1:8080"
CHEAP = 2**4


def credentials(password: str = "wrong", origin: str = ORIGIN) -> Credentials:
    return Credentials(origin, "admin", password)


class StateDirectoryTests(SynchronousTestCase):
    """Where the record lives, from the environment and the user id."""

    def test_systemd(self) -> None:
        """systemd's STATE_DIRECTORY wins (the first of several)."""
        environ = {"STATE_DIRECTORY": "/var/lib/qb-port-sync:/var/lib/other"}
        for uid in (0, 1000):
            self.assertEqual(stateDirectory(environ, uid), "/var/lib/qb-port-sync")

    def test_root(self) -> None:
        """Root without systemd: /var/lib/qb-port-sync."""
        environ = {"XDG_STATE_HOME": "/root/.state", "HOME": "/root"}
        self.assertEqual(stateDirectory(environ, 0), "/var/lib/qb-port-sync")

    def test_user(self) -> None:
        """A user: $XDG_STATE_HOME/qb-port-sync, else ~/.local/state/qb-port-sync."""
        self.assertEqual(
            stateDirectory({"XDG_STATE_HOME": "/s", "HOME": "/home/u"}, 1000),
            "/s/qb-port-sync",
        )
        for xdg in ("", "relative/state"):
            self.assertEqual(
                stateDirectory({"XDG_STATE_HOME": xdg, "HOME": "/home/u"}, 1000),
                "/home/u/.local/state/qb-port-sync",
            )


class StoreTests(SynchronousTestCase):
    """The record file itself."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.store = RefusalStore(self.clock, self.mktemp(), hashCost=CHEAP)

    def verdict(self, who: Credentials | None = None) -> Refusal | None:
        turn = self.successResultOf(self.store.begin(who or credentials()))
        turn.release()
        return turn.refusal

    def refuse(self, who: Credentials | None = None) -> Refusal:
        turn = self.successResultOf(self.store.begin(who or credentials()))
        self.assertIsNone(turn.refusal)
        return turn.refused()

    def test_rules(self) -> None:
        """
        One refusal: one more try after the wait; two: none, until other
        credentials log in well, which forgets them.
        """
        self.assertIsNone(self.verdict())
        first = self.refuse()
        self.assertEqual(first.retryAt, self.clock.seconds() + RETRY_AFTER_REFUSAL)
        self.assertEqual(self.verdict(), first)
        self.clock.advance(RETRY_AFTER_REFUSAL)
        self.assertIsNone(self.verdict())
        last = self.refuse()
        self.assertEqual((last.refusals, last.retryAt), (LOGIN_TRIES, math.inf))
        self.assertEqual(self.verdict(), last)
        turn = self.successResultOf(self.store.begin(credentials("right")))
        self.assertIsNone(turn.refusal)
        turn.succeeded()
        self.assertIsNone(self.verdict())

    def test_perWebUI(self) -> None:
        """Refusals by one Web UI say nothing about another's."""
        self.refuse()
        self.assertIsNone(self.verdict(credentials(origin="http://10.0.0.2:8080")))

    def test_banned(self) -> None:
        """A ban holds every login to that Web UI for an hour, then ends."""
        turn = self.successResultOf(self.store.begin(credentials("right")))
        until = turn.banned().bannedUntil
        self.assertEqual(until, self.clock.seconds() + 3600)
        self.assertEqual(
            self.verdict(credentials("other")), Refusal(0, 0, until, until)
        )
        self.clock.advance(3600)
        self.assertIsNone(self.verdict(credentials("other")))

    def test_sharedBetweenStores(self) -> None:
        """Another store on the same directory (another process) sees it all."""
        self.refuse()
        other = RefusalStore(self.clock, self.store.directory, hashCost=CHEAP)
        turn = self.successResultOf(other.begin(credentials()))
        turn.release()
        self.assertEqual(turn.refusal, self.verdict())

    def test_lockWaitsWithoutBlocking(self) -> None:
        """A second turn waits, polling on the clock, until the first ends."""
        first = self.successResultOf(self.store.begin(credentials()))
        second = self.store.begin(credentials())
        self.clock.advance(1)
        self.assertNoResult(second)
        first.refused()
        self.clock.advance(0.1)
        turn = self.successResultOf(second)
        turn.release()
        self.assertIsNotNone(turn.refusal)

    def test_lockTimeout(self) -> None:
        """A lock held past lockTimeout fails the wait, naming the lock file."""
        first = self.successResultOf(self.store.begin(credentials()))
        self.addCleanup(first.release)
        second = self.store.begin(credentials())
        self.clock.advance(self.store.lockTimeout)
        error = self.failureResultOf(second, StoreError).value
        self.assertIn(os.path.join(self.store.directory, LOCK_NAME), str(error))

    def test_cancelWhileWaiting(self) -> None:
        """Cancelling a wait stops the polling: nothing is left on the clock."""
        first = self.successResultOf(self.store.begin(credentials()))
        self.addCleanup(first.release)
        second = self.store.begin(credentials())
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forget(self) -> None:
        """forget() deletes the record and says whether there was one."""
        self.refuse()
        self.assertTrue(self.store.forget())
        self.assertFalse(os.path.exists(self.store.path))
        self.assertIsNone(self.verdict())
        self.assertFalse(self.store.forget())

    def test_damaged(self) -> None:
        """A damaged record is replaced by a new one, with a warning."""
        os.makedirs(self.store.directory, exist_ok=True)
        for content in ("not json", '{"format": 1}', "[]"):
            with open(self.store.path, "w") as f:
                f.write(content)
            with capturedLogs() as events:
                self.assertIsNone(self.verdict())
            self.assertEqual(len(events), 1)
            self.assertIn("damaged", events[0]["log_format"])
            self.refuse()

    def test_keepsItsHashCost(self) -> None:
        """
        A record keeps the scrypt cost it was made with, so stores made with
        another cost still read it; new ones get the production cost.
        """
        self.refuse()
        other = RefusalStore(self.clock, self.store.directory)
        self.assertEqual(other.hashCost, HASH_COST)
        turn = self.successResultOf(other.begin(credentials()))
        turn.release()
        self.assertIsNotNone(turn.refusal)
        with open(self.store.path) as f:
            record = json.load(f)
        self.assertEqual(record["scrypt_n"], CHEAP)
        self.assertEqual(set(record), {"format", "salt", "scrypt_n", "origins"})

    def test_private(self) -> None:
        """The directory and the files are the user's alone."""
        self.refuse()
        modes = {
            name: os.stat(os.path.join(self.store.directory, name)).st_mode & 0o777
            for name in (RECORD_NAME, LOCK_NAME)
        }
        self.assertEqual(modes, {RECORD_NAME: 0o600, LOCK_NAME: 0o600})
        self.assertEqual(os.stat(self.store.directory).st_mode & 0o777, 0o700)

    def test_filesKeepTheDirectorysOwner(self) -> None:
        """
        Files root makes in a service user's directory stay that user's, so
        that a run by hand never locks the daemon out of its record.
        """
        requireRoot()
        os.makedirs(self.store.directory)
        os.chown(self.store.directory, 4242, 4343)
        self.refuse()
        owners = {
            (
                os.stat(os.path.join(self.store.directory, name)).st_uid,
                os.stat(os.path.join(self.store.directory, name)).st_gid,
            )
            for name in (RECORD_NAME, LOCK_NAME)
        }
        self.assertEqual(owners, {(4242, 4343)})
