"""
Latency and memory of port changes through PortSync and the real qBittorrent
client, over real HTTP on 127.0.0.1 to the qBittorrent emulation.

    .venv/bin/python -m benchmarks.bench_apply [CHANGES]

Each change is: the source reports a port, PortSync sets it in qBittorrent
and reads it back (two requests: the preferences are known from the last
read).  Prints the latency of a change
and the memory held after all of them, so that a leak (old ports, Deferreds,
timers, connections) shows up as growth.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react
from twisted.logger import globalLogBeginner
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from qbportsync.config import QBittorrentConfig
from qbportsync.metrics import Metrics
from qbportsync.qbittorrent import QBittorrentClient, makeHTTPClient
from qbportsync.refusals import RefusalStore
from qbportsync.status import SyncStatus
from qbportsync.sync import PortSync
from tests.fakeqbittorrent import FakeQBittorrent
from tests.fakes import FakeSource


async def main(reactor: Any, changes: int) -> None:
    # Without an observer Twisted buffers every log event: not our memory.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    fake = FakeQBittorrent("4.5")
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    fake.webUIPort = port.getHost().port
    config = QBittorrentConfig(
        base_url=f"http://127.0.0.1:{port.getHost().port}", password=fake.password
    )
    pool = HTTPConnectionPool(reactor, persistent=True)
    state = tempfile.TemporaryDirectory(prefix="qbps-bench-")
    refusals = RefusalStore(reactor, state.name)
    http = makeHTTPClient(reactor, config, pool)
    client = QBittorrentClient(reactor, http, config, refusals)
    source = FakeSource()
    waiting: dict[int, Deferred[None]] = {}

    def onStatus(status: SyncStatus) -> None:
        d = waiting.pop(status.applied_port or 0, None)
        if d is not None and status.verified:
            d.callback(None)

    sync = PortSync(reactor, source, client, Metrics.create(), onStatus=onStatus)
    sync.startService()

    async def change(i: int) -> float:
        wanted = 20000 + i % 40000
        done: Deferred[None] = Deferred()
        waiting[wanted] = done
        started = time.perf_counter()
        source.emit(wanted)
        await done
        fake.requests.clear()
        return time.perf_counter() - started

    for i in range(100):  # warm up: imports, first login, connection pool
        await change(i)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    latencies = [await change(i + 1) for i in range(changes)]
    await deferLater(reactor, 0.1, lambda: None)
    after = tracemalloc.take_snapshot()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.stop()
    await sync.stopService()
    await pool.closeCachedConnections()
    await port.stopListening()
    state.cleanup()
    latencies.sort()
    print(f"changes applied and verified: {changes}")
    median = statistics.median(latencies)
    print(f"latency median:               {median * 1e3:.2f} ms")
    print(
        f"latency p99:                  {latencies[int(changes * 0.99)] * 1e3:.2f} ms"
    )
    print(f"changes per second:           {changes / sum(latencies):.0f}")
    print(f"memory growth over the run:   {grown / 1024:.1f} KiB")
    print(f"logins made:                  {fake.loginAttempts}")


if __name__ == "__main__":
    react(main, [int(sys.argv[1]) if len(sys.argv) > 1 else 2000])
