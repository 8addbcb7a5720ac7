"""
The C{auto} strategy: the port file where a VPN client writes one, else the
gateway (PCP, falling back to NAT-PMP).  The choice says why it was made,
in the log and in the one-shot JSON note.

The daemon keeps deciding: while on the gateway it looks for the port file
(every few seconds and on every network change) and switches to it when it
appears, and a gateway that keeps failing is probed anew, PCP then NAT-PMP,
on a backoff.  A port file that is there but may not be read is chosen all
the same, so that its source says what permission to fix instead of auto
falling back to the gateway in silence.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

from attrs import evolve, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from qbportsync.backoff import Backoff
from qbportsync.config import ConfigError
from qbportsync.interfaces import (
    Forwarded,
    INetworkEvents,
    IPortSource,
    NetworkChange,
    Report,
    SourceTrouble,
    SourceUnavailable,
)
from qbportsync.sources.portfilepath import unreadable

_log = Logger()

FILE_CHECK_SECS = 5.0
"""While on the gateway, how often auto looks for the port file."""

REPROBE_AFTER = 3
"""Troubles in a row from the gateway before its protocols are probed anew."""

SILENCE_SECS = 120.0
"""
A gateway source that says nothing (no port, no trouble) for this long,
counted from the end of its last lease, is probed anew.
"""


@frozen
class Choice:
    """What C{auto} picked: which kind of source, and why in one line."""

    kind: str
    """"file", "gateway" or "gluetun"."""
    reason: str


def pathExists(path: str) -> bool:
    """
    Whether C{path} exists; raises L{PermissionError} when a directory on the
    way may not be searched, so that "cannot tell" is not taken for "no".
    """
    try:
        os.stat(path)
    except PermissionError:
        raise
    except (OSError, ValueError):
        return False
    return True


def portFileEvidence(path: str, exists: Callable[[str], bool]) -> str | None:
    """
    Why the port file is the source to use: it or its directory exists, or
    cannot be checked for want of a permission (its source then reports
    the fix).  None when neither exists.
    """
    directory = os.path.dirname(path)
    try:
        if exists(path):
            return f"{path} exists"
        if directory and exists(directory):
            return f"its directory {directory} exists"
    except PermissionError as e:
        return f"{path} may be there but cannot be checked: {unreadable(path, e).cause}"
    return None


def choose(
    path: str, platform: str, exists: Callable[[str], bool], gluetunURL: str = ""
) -> Choice:
    """
    gluetun's control server when C{[gluetun] url} is set.  Else, on Linux,
    the port file if it or its directory exists (or is hidden behind a
    permission), else the gateway; on macOS the gateway (no VPN client there
    writes a port file).  Raises L{SourceUnavailable} elsewhere.
    """
    if gluetunURL:
        return Choice(
            "gluetun", "auto chose gluetun's control server: [gluetun] url is set"
        )
    if platform == "darwin":
        return Choice("gateway", "auto chose the gateway (PCP, then NAT-PMP) on macOS")
    if not platform.startswith("linux"):
        raise SourceUnavailable(
            f"--strategy auto knows Linux and macOS, not {platform}; "
            "choose --strategy file, pcp or natpmp"
        )
    evidence = portFileEvidence(path, exists)
    if evidence is not None:
        return Choice("file", f"auto chose the port file: {evidence}")
    return Choice(
        "gateway",
        f"auto chose the gateway (PCP, then NAT-PMP): no {path} nor its directory",
    )


@implementer(IPortSource)
class AutoSource:
    """
    The chosen source, with the reason for the choice in its notes; in the
    daemon, the port file as soon as it appears, and a failing gateway
    probed anew.
    """

    def __init__(
        self,
        clock: IReactorTime,
        choice: Choice,
        build: Mapping[str, Callable[[], IPortSource]],
        lookForFile: Callable[[], str | None] | None = None,
        *,
        networkEvents: INetworkEvents | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """
        @param build: makes a new source of each kind.
        @param lookForFile: while on the gateway, why to switch to the port
            file now (see L{portFileEvidence}), or None to stay.
        """
        self._clock = clock
        self._choice = choice
        self._build = build
        self._lookForFile = lookForFile
        self._events = networkEvents
        self._backoff = backoff or Backoff(first=30.0, cap=600.0)
        self._current = build[choice.kind]()
        self._listening: IPortSource | None = None
        self._deliver: Report = lambda seen: None
        self._troubles = 0
        self._reprobe: IDelayedCall | None = None
        self._silence: IDelayedCall | None = None
        self._watch: LoopingCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._swap: Deferred[None] | None = None
        self._stopped = False

    @property
    def reason(self) -> str:
        """Why the source serving now was chosen."""
        return self._choice.reason

    @property
    def name(self) -> str:
        """The chosen source's own name: what actually serves."""
        name: str = self._current.name
        return name

    def _explain(self, forwarded: Forwarded) -> Forwarded:
        note = "; ".join(n for n in (forwarded.note, self.reason) if n)
        return evolve(forwarded, note=note)

    def start(self, deliver: Report) -> None:
        self._deliver = deliver
        _log.info("{reason}", reason=self.reason)
        self._listen(self._current)
        if self._choice.kind == "gateway" and self._lookForFile is not None:
            self._watch = LoopingCall(self._checkForFile)
            self._watch.clock = self._clock
            self._watch.start(FILE_CHECK_SECS, now=False)
            if self._events is not None:
                self._unsubscribe = self._events.subscribe(self._networkChanged)

    def _listen(self, source: IPortSource) -> None:
        self._listening = source

        def heard(seen: Forwarded | SourceTrouble) -> object:
            if source is not self._listening:
                return None  # a replaced source's last words
            if isinstance(seen, Forwarded):
                self._troubles = 0
                self._backoff.reset()
                self._expectWord(seen.expires)
                seen = self._explain(seen)
            elif self._choice.kind == "gateway":
                self._expectWord(None)
                self._troubled()
            return self._deliver(seen)

        self._expectWord(None)
        source.start(heard)

    def _expectWord(self, expires: float | None) -> None:
        """Wait for the gateway source to speak again before its lease ends."""
        self._cancelSilence()
        if self._choice.kind != "gateway" or self._stopped:
            return
        now = self._clock.seconds()
        wait = max(expires - now, 0.0) if expires is not None else 0.0
        self._silence = self._clock.callLater(wait + SILENCE_SECS, self._silent)

    def _cancelSilence(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None

    def _silent(self) -> None:
        self._silence = None
        _log.info(
            "the gateway source has said nothing for {seconds:.0f} s",
            seconds=SILENCE_SECS,
        )
        self._troubles = REPROBE_AFTER - 1
        self._troubled()

    def _troubled(self) -> None:
        self._troubles += 1
        if self._troubles < REPROBE_AFTER or self._reprobe is not None:
            return
        delay = self._backoff.next()
        _log.info(
            "the gateway keeps failing; probing PCP, then NAT-PMP, anew in "
            "{delay:.0f} s",
            delay=delay,
        )
        self._reprobe = self._clock.callLater(delay, self._reprobeNow)

    def _reprobeNow(self) -> None:
        self._reprobe = None
        self._troubles = 0
        self._replace(self._choice)

    def _networkChanged(self, change: NetworkChange) -> None:
        self._checkForFile()

    def _checkForFile(self) -> None:
        if self._lookForFile is None or self._swap is not None or self._stopped:
            return
        evidence = self._lookForFile()
        if evidence is None:
            return
        self._stopWatching()
        choice = Choice(
            "file", f"auto switched from the gateway to the port file: {evidence}"
        )
        _log.info("{reason}", reason=choice.reason)
        self._replace(choice)

    def _stopWatching(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._reprobe is not None and self._reprobe.active():
            self._reprobe.cancel()
        self._reprobe = None
        self._cancelSilence()

    def _replace(self, choice: Choice) -> None:
        """Stop the source serving now, then start a new one of C{choice}."""
        old, self._listening = self._current, None
        self._cancelSilence()
        swap = Deferred.fromCoroutine(self._swapTo(old, choice))
        if not swap.called:
            self._swap = swap

    async def _swapTo(self, old: IPortSource, choice: Choice) -> None:
        try:
            await old.stop()
        except Exception:
            _log.failure("stopping the {name} source failed", name=old.name)
        self._swap = None
        if self._stopped:
            return
        self._choice = choice
        self._current = self._build[choice.kind]()
        self._listen(self._current)

    def stop(self) -> Deferred[None]:
        self._stopped = True
        self._stopWatching()
        if self._swap is not None:
            # The swap stops the old source and, seeing us stopped, starts none.
            return self._swap
        self._listening = None
        stopped: Deferred[None] = self._current.stop()
        return stopped

    def fetchOnce(self) -> Deferred[Forwarded]:
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        _log.info("{reason}", reason=self.reason)
        try:
            forwarded: Forwarded = await self._current.fetchOnce()
        except ConfigError as e:
            # No port file and no gateway to ask: nothing here can work.
            raise SourceUnavailable(f"{self.reason}, but {e}") from e
        return self._explain(forwarded)


def autoSource(
    path: str,
    fileSource: Callable[[], IPortSource],
    gatewaySource: Callable[[], IPortSource],
    *,
    clock: IReactorTime,
    networkEvents: INetworkEvents | None = None,
    platform: str = sys.platform,
    exists: Callable[[str], bool] = pathExists,
    gluetunURL: str = "",
    gluetunSource: Callable[[], IPortSource] | None = None,
) -> AutoSource:
    """Choose and build the source for C{--strategy auto}."""
    choice = choose(path, platform, exists, gluetunURL if gluetunSource else "")
    makers = {"file": fileSource, "gateway": gatewaySource}
    if gluetunSource is not None:
        makers["gluetun"] = gluetunSource

    def lookForFile() -> str | None:
        return portFileEvidence(path, exists)

    linux = platform.startswith("linux")
    return AutoSource(
        clock,
        choice,
        makers,
        lookForFile if linux else None,
        networkEvents=networkEvents,
    )
