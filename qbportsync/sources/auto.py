"""
The C{auto} strategy: the port file where a VPN client writes one, else the
gateway (PCP, falling back to NAT-PMP).  The choice says why it was made,
in the log and in the one-shot JSON note.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from attrs import evolve, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from qbportsync.config import ConfigError
from qbportsync.interfaces import (
    Forwarded,
    IPortSource,
    Report,
    SourceTrouble,
    SourceUnavailable,
)

_log = Logger()


@frozen
class Choice:
    """What C{auto} picked: which kind of source, and why in one line."""

    kind: str
    """"file", "gateway" or "gluetun"."""
    reason: str


def choose(
    path: str, platform: str, exists: Callable[[str], bool], gluetunURL: str = ""
) -> Choice:
    """
    gluetun's control server when C{[gluetun] url} is set.  Else, on Linux,
    the port file if it or its directory exists, else the gateway; on macOS
    the gateway (no VPN client there writes a port file).  Raises
    L{SourceUnavailable} elsewhere.
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
    if exists(path):
        return Choice("file", f"auto chose the port file: {path} exists")
    directory = os.path.dirname(path)
    if directory and exists(directory):
        return Choice(
            "file", f"auto chose the port file: its directory {directory} exists"
        )
    return Choice(
        "gateway",
        f"auto chose the gateway (PCP, then NAT-PMP): no {path} nor its directory",
    )


@implementer(IPortSource)
class AutoSource:
    """The chosen source, with the reason for the choice in its notes."""

    def __init__(self, chosen: IPortSource, reason: str) -> None:
        self._chosen = chosen
        self.reason = reason

    @property
    def name(self) -> str:
        """The chosen source's own name: what actually served."""
        name: str = self._chosen.name
        return name

    def _explain(self, forwarded: Forwarded) -> Forwarded:
        note = "; ".join(n for n in (forwarded.note, self.reason) if n)
        return evolve(forwarded, note=note)

    def start(self, deliver: Report) -> None:
        _log.info("{reason}", reason=self.reason)

        def explained(seen: Forwarded | SourceTrouble) -> object:
            if isinstance(seen, Forwarded):
                seen = self._explain(seen)
            return deliver(seen)

        self._chosen.start(explained)

    def stop(self) -> Deferred[None]:
        stopped: Deferred[None] = self._chosen.stop()
        return stopped

    def fetchOnce(self) -> Deferred[Forwarded]:
        return Deferred.fromCoroutine(self._fetchOnce())

    async def _fetchOnce(self) -> Forwarded:
        _log.info("{reason}", reason=self.reason)
        try:
            forwarded: Forwarded = await self._chosen.fetchOnce()
        except ConfigError as e:
            # No port file and no gateway to ask: nothing here can work.
            raise SourceUnavailable(f"{self.reason}, but {e}") from e
        return self._explain(forwarded)


def autoSource(
    path: str,
    fileSource: Callable[[], IPortSource],
    gatewaySource: Callable[[], IPortSource],
    *,
    platform: str = sys.platform,
    exists: Callable[[str], bool] = os.path.exists,
    gluetunURL: str = "",
    gluetunSource: Callable[[], IPortSource] | None = None,
) -> AutoSource:
    """Choose and build the source for C{--strategy auto}."""
    choice = choose(path, platform, exists, gluetunURL if gluetunSource else "")
    makers = {"file": fileSource, "gateway": gatewaySource}
    if gluetunSource is not None:
        makers["gluetun"] = gluetunSource
    return AutoSource(makers[choice.kind](), choice.reason)
