"""The daemon's state as operators see it: health check and /status."""

from __future__ import annotations

from datetime import UTC, datetime

from attrs import frozen

LEASE_MARGIN_SECS = 10.0
"""
A lease this close to expiry and not yet renewed makes the daemon unhealthy;
a quarter of the lease when that is shorter, since renewals come at half.
"""


@frozen
class SyncStatus:
    """A snapshot of what PortSync knows; replaced, never mutated."""

    strategy: str
    source_port: int | None = None
    """The forwarded port the source last reported."""
    applied_port: int | None = None
    """The port qBittorrent was last verified to listen on."""
    verified: bool = False
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    lease_expires: float | None = None
    """POSIX time the gateway's lease ends; None for a port file."""
    lease_lifetime: float | None = None
    """Seconds the gateway granted the lease for; None for a port file."""
    last_attempt_failed: bool = False
    source_trouble: str | None = None
    """Why the source cannot learn the port now; None when it can."""
    source_trouble_since: float | None = None
    contested: bool = False
    """Something else keeps changing qBittorrent's port (a tug-of-war)."""
    contested_since: float | None = None
    listening: bool | None = None
    """
    Whether a TCP connect to qBittorrent's port completed at the last
    check, after any heal; None when not checked.
    """


def unhealthyReason(status: SyncStatus, now: float) -> str | None:
    """Why the daemon is unhealthy at POSIX time C{now}, or None if it is not."""
    if status.source_trouble is not None:
        return status.source_trouble
    if status.last_success is None:
        return "qBittorrent has not been updated yet"
    if status.source_port is not None and status.source_port != status.applied_port:
        return f"port {status.source_port} is not applied to qBittorrent yet"
    if status.contested:
        return "something else keeps changing qBittorrent's port"
    if status.listening is False:
        return "qBittorrent refuses connections on its port"
    if not status.verified:
        return "qBittorrent's port was not verified"
    if status.last_attempt_failed:
        return "the last attempt failed"
    if status.lease_expires is not None:
        margin = LEASE_MARGIN_SECS
        if status.lease_lifetime is not None:
            margin = min(margin, status.lease_lifetime / 4)
        if status.lease_expires - now < margin:
            return "the gateway lease is about to expire unrenewed"
    return None


def isHealthy(status: SyncStatus, now: float) -> bool:
    """
    Healthy once qBittorrent was updated and verified, the last attempt did
    not fail, and any gateway lease is not about to run out.
    """
    return unhealthyReason(status, now) is None


def _timestamp(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def statusDocument(status: SyncStatus, now: float) -> dict[str, object]:
    """The JSON object that /status serves; timestamps in RFC 3339, UTC."""
    reason = unhealthyReason(status, now)
    return {
        "healthy": reason is None,
        "reason": reason,
        "strategy": status.strategy,
        "source_port": status.source_port,
        "applied_port": status.applied_port,
        "verified": status.verified,
        "last_success": _timestamp(status.last_success),
        "last_error": status.last_error,
        "last_error_at": _timestamp(status.last_error_at),
        "last_attempt_failed": status.last_attempt_failed,
        "lease_expires": _timestamp(status.lease_expires),
        "source_trouble": status.source_trouble,
        "source_trouble_since": _timestamp(status.source_trouble_since),
        "contested": status.contested,
        "contested_since": _timestamp(status.contested_since),
        "listening": status.listening,
        "now": _timestamp(now),
    }


def statusLine(status: SyncStatus) -> str:
    """One line for systemd's STATUS=, e.g. C{port 51413 via natpmp, verified}."""
    if status.applied_port is None:
        if status.last_error is not None:
            return f"no port applied yet ({status.strategy}): {status.last_error}"
        return f"waiting for a forwarded port ({status.strategy})"
    line = f"port {status.applied_port} via {status.strategy}"
    line += ", verified" if status.verified else ", not verified"
    if status.contested:
        line += ", contested by another program"
    if status.last_attempt_failed and status.last_error is not None:
        line += f"; last attempt failed: {status.last_error}"
    return line
