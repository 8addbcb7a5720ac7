"""
A child process for tests.test_web's flood test: the daemon's web service,
built as the daemon builds it, on 127.0.0.1 with a port of its choosing,
under a lowered descriptor limit.

Meanwhile it does the daemon's own kind of work every millisecond (opens a
file, opens a UDP socket, as the port file and gateway sources do), counting
how often that failed and the most descriptors it saw open.  Beside
/healthz its root has /probe, which answers with those numbers as JSON.

Usage: python -m tests.webchild LIMIT; prints the port on one line once
listening, then runs until killed.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys

from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Request

from qbportsync.web import Connections


class OwnWork:
    """The daemon's own use of descriptors, tried again and again."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.peak = 0

    def __call__(self) -> None:
        try:
            with (
                open(__file__, "rb") as f,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            ):
                f.read(1)
                udp.bind(("127.0.0.1", 0))
                self.peak = max(self.peak, len(os.listdir("/proc/self/fd")))
            self.done += 1
        except OSError:
            self.failed += 1


class Probe(Resource):
    """Say how the daemon's own work went, and what is open now."""

    isLeaf = True

    def __init__(self, work: OwnWork, connections: Connections) -> None:
        super().__init__()
        self._work = work
        self._connections = connections

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "connections": len(self._connections),
                "open": len(os.listdir("/proc/self/fd")),
                "peak": self._work.peak,
                "done": self._work.done,
                "failed": self._work.failed,
            }
        ).encode()


def main(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    from twisted.internet import reactor

    from qbportsync.config import Config, ListenConfig
    from qbportsync.metrics import Metrics
    from qbportsync.status import SyncStatus
    from qbportsync.web import makeWebService

    status = SyncStatus(
        strategy="file",
        source_port=51413,
        applied_port=51413,
        verified=True,
        last_success=reactor.seconds(),  # type: ignore[attr-defined]
    )
    config = Config(
        metrics=ListenConfig(True, 0, "127.0.0.1"),
        health=ListenConfig(True, 0, "127.0.0.1"),
    )
    service = makeWebService(
        reactor,  # type: ignore[arg-type]
        reactor,  # type: ignore[arg-type]
        config,
        lambda: status,
        Metrics.create(),
    )
    service.listen()
    (listener,) = service.listeners
    work = OwnWork()
    LoopingCall(work).start(0.001)
    listener.site.resource.putChild(b"probe", Probe(work, listener.site.connections))
    print(service.ports[0].getHost().port, flush=True)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]))
