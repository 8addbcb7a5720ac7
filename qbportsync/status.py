"""The daemon's state as operators see it: health check and /status."""

from __future__ import annotations

from attrs import frozen

LEASE_MARGIN_SECS = 10.0
"""A lease this close to expiry and not yet renewed makes the daemon unhealthy."""


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
    last_attempt_failed: bool = False


def isHealthy(status: SyncStatus, now: float) -> bool:
    """
    Healthy once qBittorrent was updated and verified, the last attempt did
    not fail, and any gateway lease is not about to run out.
    """
    if status.last_success is None or not status.verified:
        return False
    if status.last_attempt_failed:
        return False
    return not (
        status.lease_expires is not None
        and status.lease_expires - now < LEASE_MARGIN_SECS
    )
