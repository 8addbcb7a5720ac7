"""
The PortSync service: carries each forwarded port from a source into
qBittorrent, retries failures, puts the port back when it drifts (less and
less often when something else keeps changing it), and has qBittorrent's
listener checked and healed when it may have died.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from attrs import define, evolve
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from qbportsync.backoff import Backoff
from qbportsync.interfaces import (
    ApplyResult,
    Forwarded,
    INetworkEvents,
    IPortSink,
    IPortSource,
    NetworkChange,
    SourceTrouble,
)
from qbportsync.listener import ListenerCheck, ListenerHealer
from qbportsync.metrics import Metrics
from qbportsync.qbittorrent import LoginRefused
from qbportsync.status import SyncStatus

_log = Logger()

MAX_RETRY_SECS = 60.0
"""Never wait longer: a gateway lease may last only 60 s."""

RESTORE_SPACING_SECS = 15.0
"""
A drifted port is set back no sooner than this after our last apply of it
ended: before a tug-of-war is recognised, no 15 s holds two applies.
"""
CONTEST_MEMORY_SECS = 600.0
"""A drift this soon after we last set our port back means a tug-of-war."""
CONTEST_FIRST_SECS = 20.0
"""
The first wait between rounds of a tug-of-war.  With Backoff's +/-20 %
jitter it is at least 16 s, so one round (at most four requests) per 15 s:
0.27 requests/s at most, whatever verify_interval_secs is.
"""
CONTEST_CAP_SECS = 300.0
CONTEST_QUIET_SECS = 600.0
"""The tug-of-war is over once our port was kept this long."""
NETWORK_SETTLE_SECS = 1.0
"""
Connect to qBittorrent this long after the last change to the bound
interface: bringing a VPN up adds its link, address and routes in a burst.
"""
CULPRITS = (
    "qBittorrent's own UPnP/NAT-PMP (Tools > Options > Connection), another "
    "script or container setting the port (such as gluetun's "
    "VPN_PORT_FORWARDING_UP_COMMAND), or a second qb-port-sync"
)


@define
class _Contest:
    """A tug-of-war over qBittorrent's port: something keeps changing it."""

    lastConflict: float
    backoff: Backoff
    ours: bool = False
    """Our port was in place at the end of the last round."""


class PortSync(Service):
    """
    Keep qBittorrent listening on the latest forwarded port.

    Ports that arrive while an update is under way are not queued: when it
    ends, only the latest one is applied.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        source: IPortSource,
        sink: IPortSink,
        metrics: Metrics,
        *,
        bindInterface: str = "",
        verifyInterval: float = 30.0,
        rnd: Callable[[], float] = random.random,
        onStatus: Callable[[SyncStatus], object] = lambda status: None,
        onNewPort: Callable[[ApplyResult], object] = lambda result: None,
        healer: ListenerHealer | None = None,
        networkEvents: INetworkEvents | None = None,
    ) -> None:
        """
        @param onNewPort: called, without waiting for it, each time
            qBittorrent verifiably listens on a port other than before.
        @param healer: checks that qBittorrent accepts connections on its
            port, and heals it, after each verify, after C{bindInterface}
            changed (told by C{networkEvents}), and when the source gives
            the same port again after trouble (the VPN reconnected).
        """
        self._reactor = reactor
        self._source = source
        self._sink = sink
        self._metrics = metrics
        self._bindInterface = bindInterface
        self._backoff = Backoff(first=1.0, cap=MAX_RETRY_SECS, rnd=rnd)
        self._rnd = rnd
        self._onStatus = onStatus
        self._onNewPort = onNewPort
        self._status = SyncStatus(strategy=source.name)
        self._wanted: int | None = None
        self._settled: int | None = None
        """The port qBittorrent was last seen to listen on, as we want."""
        self._inFlight: Deferred[object] | None = None
        self._retry: IDelayedCall | None = None
        self._gaveUp = False
        """qBittorrent refused our login too often: only a restart helps."""
        self._checkFailing = False
        self._generation = 0
        """Bumped by every apply and new port: a check begun before is stale."""
        self._lastRestore: float | None = None
        """When we last set our port back after finding another."""
        self._lastApply: tuple[int, float] | None = None
        """The port of the last apply qBittorrent answered, and when."""
        self._contest: _Contest | None = None
        self._healer = healer
        self._networkEvents = networkEvents
        self._unsubscribe: Callable[[], None] | None = None
        self._healing: Deferred[None] | None = None
        self._pendingCheck: str | None = None
        """Why the listener must be checked once qBittorrent is left alone."""
        self._networkSettle: IDelayedCall | None = None
        self._firstAttempt: list[Deferred[None]] | None = []
        self._verifier = LoopingCall(self._verify)
        self._verifier.clock = reactor
        self._verifyInterval = verifyInterval

    @property
    def status(self) -> SyncStatus:
        """The latest snapshot of what this service knows."""
        return self._status

    def whenFirstAttempted(self) -> Deferred[None]:
        """Fires once the first update of qBittorrent has succeeded or failed."""
        d: Deferred[None] = Deferred()
        if self._firstAttempt is None:
            d.callback(None)
        else:
            self._firstAttempt.append(d)
        return d

    def startService(self) -> None:
        """Start the source and the periodic check of qBittorrent's port."""
        Service.startService(self)
        _log.info(
            "Syncing the forwarded port into qBittorrent (source: {strategy})",
            strategy=self._source.name,
        )
        self._source.start(self.portSeen)
        self._verifier.start(self._verifyInterval, now=False)
        if self._healer is not None and self._networkEvents is not None:
            self._unsubscribe = self._networkEvents.subscribe(self._networkChanged)

    def stopService(self) -> Deferred[None]:
        """Stop the source, the timers and any request in flight."""
        Service.stopService(self)
        if self._verifier.running:
            self._verifier.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._networkSettle is not None and self._networkSettle.active():
            self._networkSettle.cancel()
        self._networkSettle = None
        self._cancelRetry()
        if self._inFlight is not None:
            self._inFlight.cancel()
        if self._healing is not None:
            self._healing.cancel()
        return self._source.stop()

    def portSeen(self, seen: Forwarded | SourceTrouble) -> None:
        """The source reports a port, or why it has none."""
        if isinstance(seen, SourceTrouble):
            self._sourceTrouble(seen)
        else:
            self._forwarded(seen)

    def _sourceTrouble(self, trouble: SourceTrouble) -> None:
        """Show the source's trouble until it delivers a port; log each cause once."""
        if self._status.source_trouble == trouble.cause:
            return
        self._metrics.errors.labels(kind=trouble.kind).inc()
        _log.warn("{cause}", cause=trouble.cause)
        self._setStatus(
            source_trouble=trouble.cause,
            source_trouble_since=self._reactor.seconds(),
        )

    def _forwarded(self, forwarded: Forwarded) -> None:
        """Apply a port from the source unless qBittorrent has it already."""
        reconnected = self._status.source_trouble is not None
        if reconnected:
            _log.info("The port source works again")
            self._setStatus(source_trouble=None, source_trouble_since=None)
        lifetime = None
        if forwarded.expires is not None:
            lifetime = forwarded.expires - self._reactor.seconds()
        self._setStatus(
            source_port=forwarded.port,
            lease_expires=forwarded.expires,
            lease_lifetime=lifetime,
        )
        if forwarded.expires is not None:
            self._metrics.lease_expiry.set(forwarded.expires)
        if forwarded.port != self._wanted:
            _log.info(
                "The VPN forwards port {port} ({source})",
                port=forwarded.port,
                source=forwarded.source,
            )
            self._wanted = forwarded.port
            self._generation += 1
            if self._contest is not None:
                self._contest.ours = False
            # A new port is worth trying at once, even while waiting to retry.
            self._cancelRetry()
        elif reconnected:
            self._checkListener("the VPN reconnected with the same port")
        self._update()

    def _update(self) -> None:
        """Start an update if one is needed and none is running."""
        if self._gaveUp or not self.running:
            return
        if self._busy():
            return
        port = self._wanted
        if port is None or port == self._settled:
            return
        self._generation += 1
        started = self._reactor.seconds()
        d = self._sink.apply(port, self._bindInterface)
        self._inFlight = d.addCallbacks(
            self._applied, self._failed, errbackArgs=(port,)
        ).addCallback(self._observeDuration, started)
        self._inFlight.addBoth(self._finished, port)

    def _applied(self, result: ApplyResult) -> None:
        now = self._reactor.seconds()
        self._lastApply = (result.port, now)
        self._backoff.reset()
        self._metrics.qbittorrent_up.set(1)
        if not result.verified:
            self._recordError(
                f"qBittorrent did not keep port {result.port}", "qbittorrent"
            )
            self._conflict(result.port, "right after we set it")
            return
        self._settled = result.port
        self._metrics.current_port.set(result.port)
        self._metrics.last_update.set(now)
        if result.applied:
            self._metrics.port_updates.inc()
        if self._contest is not None:
            # Each round sets the same port again: only a new one is news.
            if result.applied and result.port != self._status.applied_port:
                self._onNewPort(result)
            self._contestRound(result)
        elif result.applied:
            _log.info(
                "qBittorrent now listens on port {port} (was {previous}){note}",
                port=result.port,
                previous=result.previous,
                note=f"; {result.note}" if result.note else "",
            )
            if result.previous != result.port:
                self._onNewPort(result)
        else:
            _log.info(
                "qBittorrent already listens on port {port}{note}",
                port=result.port,
                note=f"; {result.note}" if result.note else "",
            )
        self._setStatus(
            applied_port=result.port,
            verified=True,
            last_success=now,
            last_attempt_failed=False,
            # A new listening socket: what a connect found before is moot.
            listening=None if result.applied else self._status.listening,
        )

    def _conflict(self, port: int, when: str) -> None:
        """
        qBittorrent lost our port to someone else: count it, say so once per
        tug-of-war, and set it back only after a growing wait.
        """
        now = self._reactor.seconds()
        self._metrics.conflicts.inc()
        contest = self._contest
        if contest is None:
            contest = self._contest = _Contest(
                lastConflict=now,
                backoff=Backoff(
                    first=CONTEST_FIRST_SECS, cap=CONTEST_CAP_SECS, rnd=self._rnd
                ),
            )
            _log.warn(
                "Something else keeps changing qBittorrent's listening port "
                "(port {port} was replaced {when}): likely {culprits}. Setting "
                "it back less and less often, up to every {cap:.0f} s",
                port=port,
                when=when,
                culprits=CULPRITS,
                cap=CONTEST_CAP_SECS,
            )
            self._setStatus(contested=True, contested_since=now)
        contest.lastConflict = now
        contest.ours = False
        self._settled = None
        self._setStatus(verified=False)
        self._cancelRetry()
        self._retry = self._reactor.callLater(contest.backoff.next(), self._retryNow)

    def _contestRound(self, result: ApplyResult) -> None:
        """One round of a tug-of-war ended with our port in place."""
        contest = self._contest
        assert contest is not None
        now = self._reactor.seconds()
        if result.applied and contest.ours:
            self._metrics.conflicts.inc()
            contest.lastConflict = now
        contest.ours = True
        quiet = now - contest.lastConflict
        if quiet >= CONTEST_QUIET_SECS:
            _log.info(
                "qBittorrent has kept port {port} for {quiet:.0f} s: no longer "
                "contested",
                port=result.port,
                quiet=quiet,
            )
            self._contest = None
            self._lastRestore = None
            self._setStatus(contested=False, contested_since=None)
            return
        _log.debug(
            "Port {port} set back in qBittorrent (contested): {what}",
            port=result.port,
            what="it had been changed again" if result.applied else "it was kept",
        )
        self._cancelRetry()
        self._retry = self._reactor.callLater(
            contest.backoff.next(), self._contestRetry
        )

    def _contestRetry(self) -> None:
        """The next round of a tug-of-war: read the port, set it if it moved."""
        self._retry = None
        self._settled = None
        self._update()

    def _failed(self, failure: Failure, port: int) -> None:
        if not self.running:
            return  # cancelled by stopService
        if failure.check(LoginRefused):
            refused = failure.value
            assert isinstance(refused, LoginRefused)
            if refused.new:
                _log.error("{why}", why=str(refused), reason=refused.reason)
            self._recordError(str(refused), "auth")
            if refused.retryAt == math.inf:
                self._gaveUp = True
            else:
                self._scheduleRetry(at=refused.retryAt)
            return
        self._metrics.qbittorrent_up.set(0)
        self._recordError(failure.getErrorMessage(), "qbittorrent")
        _log.warn(
            "Could not set port {port} in qBittorrent: {why}; trying again in "
            "{delay:.1f} s",
            port=port,
            why=failure.getErrorMessage(),
            delay=self._scheduleRetry(),
        )

    def _observeDuration(self, ignored: object, started: float) -> None:
        self._metrics.apply_duration.observe(self._reactor.seconds() - started)

    def _finished(self, result: object, port: int) -> None:
        self._inFlight = None
        if isinstance(result, Failure):
            _log.failure("Unexpected error while updating qBittorrent", result)
        if port != self._wanted:
            # A port that came during this apply is worth trying at once, as
            # it would have been a moment later, whatever this one's outcome.
            self._cancelRetry()
        waiting, self._firstAttempt = self._firstAttempt or [], None
        for d in waiting:
            d.callback(None)
        self._update()
        self._checkPendingListener()

    def _busy(self) -> bool:
        """An apply, a wait to retry or a heal has qBittorrent's port in hand."""
        return (
            self._inFlight is not None
            or self._retry is not None
            or self._healing is not None
        )

    def _networkChanged(self, change: NetworkChange) -> None:
        """The bound interface (or an unknown one) changed: check soon after."""
        if self._bindInterface and change.interface not in ("", self._bindInterface):
            return
        if self._networkSettle is not None and self._networkSettle.active():
            self._networkSettle.reset(NETWORK_SETTLE_SECS)
            return
        self._networkSettle = self._reactor.callLater(
            NETWORK_SETTLE_SECS,
            self._checkListener,
            f"network interface {change.interface or '?'} changed",
        )

    def _checkListener(self, trigger: str) -> None:
        """Connect to qBittorrent's port now, or once it is left alone."""
        if self._healer is None or not self.running:
            return
        port = self._settled
        # A wait to retry does not hold it back: a tug-of-war waits minutes.
        if (
            port is None
            or port != self._wanted
            or self._inFlight is not None
            or self._healing is not None
        ):
            self._pendingCheck = trigger
            return
        self._pendingCheck = None
        self._healing = self._healer.check(port, trigger).addCallbacks(
            self._listenerChecked, self._listenerUncheckable
        )
        self._healing.addBoth(self._healed)

    def _checkPendingListener(self) -> None:
        if self._pendingCheck is not None:
            self._checkListener(self._pendingCheck)

    def _listenerChecked(self, check: ListenerCheck | None) -> None:
        listening = None if check is None else check.listening
        if listening != self._status.listening:
            self._setStatus(listening=listening)

    def _listenerUncheckable(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        self._metrics.errors.labels(kind="qbittorrent").inc()
        _log.warn(
            "Could not make qBittorrent listen again: {why}",
            why=failure.getErrorMessage(),
        )

    def _healed(self, result: object) -> None:
        self._healing = None
        if isinstance(result, Failure):
            _log.failure("Unexpected error while checking the listener", result)
        self._update()
        self._checkPendingListener()

    def _recordError(self, message: str, kind: str) -> None:
        self._metrics.errors.labels(kind=kind).inc()
        self._setStatus(
            last_error=message,
            last_error_at=self._reactor.seconds(),
            last_attempt_failed=True,
        )

    def _scheduleRetry(self, at: float | None = None) -> float:
        """Try again after a growing delay, or at C{at} if that is later."""
        delay = self._backoff.next()
        if at is not None:
            delay = max(delay, at - self._reactor.seconds())
        self._retry = self._reactor.callLater(delay, self._retryNow)
        return delay

    def _retryNow(self) -> None:
        self._retry = None
        self._update()

    def _cancelRetry(self) -> None:
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None

    def _verify(self) -> Deferred[None] | None:
        """Check qBittorrent still listens on our port; set it back if not."""
        if self._wanted is None or self._settled != self._wanted:
            return None
        if self._busy():
            return None
        generation = self._generation
        return self._sink.listenPort().addCallbacks(
            self._checked, self._uncheckable, callbackArgs=(generation,)
        )

    def _checked(self, port: int, generation: int) -> None:
        self._metrics.qbittorrent_up.set(1)
        self._metrics.current_port.set(port)
        if self._checkFailing:
            self._checkFailing = False
            _log.info("qBittorrent answers again")
        if generation != self._generation:
            # An apply began meanwhile: its own outcome is what counts.
            return
        if port == self._settled:
            if self._status.last_attempt_failed:
                self._setStatus(verified=True, last_attempt_failed=False)
            self._checkListener("periodic check")
            return
        settled = self._settled
        assert settled is not None
        now = self._reactor.seconds()
        if (
            self._lastRestore is not None
            and now - self._lastRestore < CONTEST_MEMORY_SECS
        ):
            self._conflict(settled, f"by {port} again")
            return
        wait = 0.0
        if self._lastApply is not None and self._lastApply[0] == settled:
            wait = max(0.0, self._lastApply[1] + RESTORE_SPACING_SECS - now)
        _log.warn(
            "qBittorrent listens on {actual} instead of {port} (restarted, or"
            " changed by someone): setting it back{when}",
            actual=port,
            port=settled,
            when=f" in {wait:.0f} s" if wait else "",
        )
        self._lastRestore = now
        self._settled = None
        self._setStatus(verified=False)
        if wait:
            self._retry = self._reactor.callLater(wait, self._retryNow)
        else:
            self._update()

    def _uncheckable(self, failure: Failure) -> None:
        # Only our own timeouts and HTTP failures end here; the next check
        # or the next port tries again.
        self._metrics.qbittorrent_up.set(0)
        self._recordError(failure.getErrorMessage(), "qbittorrent")
        # Said once per outage, not at every check: it may last for days.
        level = LogLevel.debug if self._checkFailing else LogLevel.warn
        self._checkFailing = True
        _log.emit(
            level,
            "Could not check qBittorrent's port: {why}; checking again every "
            "{interval:.0f} s",
            why=failure.getErrorMessage(),
            interval=self._verifyInterval,
        )

    def _setStatus(self, **changes: Any) -> None:
        self._status = evolve(self._status, **changes)
        self._onStatus(self._status)
