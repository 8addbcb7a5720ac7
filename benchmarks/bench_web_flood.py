"""
/healthz under a flood of idle connections: the daemon's web service runs
in a child limited to 256 descriptors (tests.webchild); this process opens
1,000 connections that send half a request line and idle, then times
/healthz requests from a legitimate client, and reads how many descriptors
the child had open at most and whether its own work ever failed.  Once with
the flood from another address (127.0.0.2), once from the client's own.

    .venv/bin/python -m benchmarks.bench_web_flood [REQUESTS]
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

LIMIT = 256
HOSTILE = 1000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get(port: int, path: str) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def flood(port: int, source: str) -> list[socket.socket]:
    sockets = []
    for _ in range(HOSTILE):
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        s.connect_ex(("127.0.0.1", port))
        sockets.append(s)
    waiting = list(sockets)
    deadline = time.monotonic() + 20
    while waiting and time.monotonic() < deadline:
        _, writable, _ = select.select([], waiting, [], 1)
        for s in writable:
            waiting.remove(s)
            with contextlib.suppress(OSError):
                s.send(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    return sockets


def run(source: str, requests: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.webchild", str(LIMIT)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
    )
    sockets: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        started = time.monotonic()
        sockets = flood(port, source)
        flooded = time.monotonic() - started
        firstOK = None
        latencies = []
        refused = 0
        deadline = time.monotonic() + 30
        while len(latencies) < requests and time.monotonic() < deadline:
            try:
                answer, seconds = get(port, "/healthz")
            except OSError:
                refused += 1
                continue
            if answer.startswith(b"HTTP/1.1 200 "):
                firstOK = firstOK or time.monotonic() - started
                latencies.append(seconds * 1000)
        probe = json.loads(get(port, "/probe")[0].partition(b"\r\n\r\n")[2])
        latencies.sort()
        print(
            f"flood from {source}: {HOSTILE} connections opened in {flooded:.2f} s; "
            f"first 200 after {firstOK:.3f} s; {refused} attempts refused; "
            f"/healthz ms p50 {statistics.median(latencies):.1f} "
            f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.1f} "
            f"max {latencies[-1]:.1f} over {len(latencies)}; "
            f"descriptors at most {probe['peak']} of {probe['limit']}; "
            f"own work {probe['done']} done, {probe['failed']} failed"
        )
    finally:
        for s in sockets:
            s.close()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


def main(requests: int) -> None:
    run("127.0.0.2", requests)
    run("127.0.0.1", requests)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
