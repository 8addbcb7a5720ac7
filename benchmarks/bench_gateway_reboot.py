"""
Gateway reboot -> a peer reaches qBittorrent again, for real: miniupnpd in
a namespace is stopped and started again (its epoch back to 0, every
mapping gone), and a peer in the wan namespace tries a TCP handshake with
qBittorrent through the gateway's external address until one completes.
The daemon runs at its default lease and check intervals, so what brings
the mapping back is the gateway's announcement, not a renewal that happens
to fall due.  Needs root and the gateway tools (scripts/setup --tests).

    .venv/bin/python -m benchmarks.bench_gateway_reboot [REBOOTS] [PROTOCOL...]
"""

from __future__ import annotations

import math
import statistics
import sys
import time

from benchmarks.bench_speed import percentile
from tests.rig_gateway import (
    GATEWAY_EXTERNAL,
    Agent,
    ClientQBittorrent,
    Daemon,
    GatewayRig,
    writeDaemonConfig,
)

RECOVERY_LIMIT_SECS = 90.0
"""Past a renewal at half the default lease: a reboot not noticed at all."""
SETTLE_SECS = 40.0
"""
Between a recovery and the next reboot: past the daemon's renewal period at
the default lease (NAT-PMP 30 s, PCP up to 37.5 s), within which it acts on
one announcement only.
"""
CONNECT_TIMEOUT_SECS = 0.3


def reachable(
    peer: Agent, client: Agent, qbittorrent: ClientQBittorrent, limit: float
) -> float:
    """Seconds until a peer's handshake with qBittorrent completes."""
    started = time.monotonic()
    port = qbittorrent.listenPortVia(client)
    while time.monotonic() - started < limit:
        if port:
            ok, _ = peer.connect(GATEWAY_EXTERNAL, port, CONNECT_TIMEOUT_SECS)
            if ok:
                return time.monotonic() - started
        else:
            port = qbittorrent.listenPortVia(client)
        time.sleep(0.02)
    raise RuntimeError(f"no peer reached qBittorrent within {limit:g} s")


def run(protocol: str, reboots: int) -> tuple[list[float], list[float | None]]:
    """
    Seconds from each gateway restart to a peer's completed handshake, and
    the random waits (RFC 6886 §3.7, 0-5 s) the daemon drew before remapping.
    """
    with GatewayRig() as rig:
        qbittorrent = ClientQBittorrent(rig)
        client = Agent(rig, rig.client)
        peer = Agent(rig, rig.wan)
        config = writeDaemonConfig(rig, qbittorrent, verifyInterval=30.0)
        daemon = Daemon(rig, config, protocol, client)
        try:
            reachable(peer, client, qbittorrent, 30)
            times: list[float] = []
            drawn: list[float | None] = []
            for _ in range(reboots):
                time.sleep(SETTLE_SECS)
                seen = len(daemon.output().splitlines())
                rig.restart()  # returns once miniupnpd has its address
                if rig.mappings():
                    raise RuntimeError("the mapping outlived the reboot")
                times.append(reachable(peer, client, qbittorrent, RECOVERY_LIMIT_SECS))
                waits = [
                    float(line.rsplit(" in ", 1)[-1].split("s")[0])
                    for line in daemon.output().splitlines()[seen:]
                    if "mapping again in" in line
                ]
                # None: no announcement acted on, the renewal brought it back.
                drawn.append(waits[0] if waits else None)
                print(
                    f"  {protocol}: reachable after {times[-1]:.2f} s "
                    f"(random wait drawn: {waits[0] if waits else 'none'} s)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            daemon.stop()
    return times, drawn


def main(argv: list[str]) -> None:
    reboots = int(argv[0]) if argv else 8
    protocols = argv[1:] or ["natpmp", "pcp"]
    print(
        "| protocol | reboots | p50 | p90 | max | mean random wait | "
        "p50 beyond the wait |\n|---|---|---|---|---|---|---|"
    )
    for protocol in protocols:
        times, drawn = run(protocol, reboots)
        ordered = sorted(times)
        waits = [w for w in drawn if w is not None]
        beyond = [t - w for t, w in zip(times, drawn, strict=True) if w is not None]
        print(
            f"| {protocol} | {reboots} | {statistics.median(ordered):.2f} s | "
            f"{percentile(ordered, 90):.2f} s | {ordered[-1]:.2f} s | "
            f"{statistics.mean(waits) if waits else math.nan:.2f} s | "
            f"{statistics.median(beyond) if beyond else math.nan:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
