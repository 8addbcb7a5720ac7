"""
End to end, for real: how long from a write to the port file until the real
qbittorrent-nox listens on the new port, and how much memory the real daemon
holds after many changes.  Needs root (it builds a network namespace).

    .venv/bin/python -m benchmarks.bench_file_to_qbittorrent [CHANGES]

The latency is measured by polling qBittorrent's preferences from outside
every millisecond, so it includes up to a millisecond of polling slack.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.rig import QBittorrentRig, stopProcess, waitFor


def rssKiB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main(changes: int) -> None:
    with QBittorrentRig() as rig, tempfile.TemporaryDirectory() as tmp:
        portFile = Path(tmp) / "vpn" / "forwarded_port"
        portFile.parent.mkdir()
        portFile.write_text("30000\n")
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[qbittorrent]\nbase_url = "{rig.baseURL}"\n'
            f'username = "{rig.username}"\n'
            f'[protonvpn]\nforwarded_port_path = "{portFile}"\n'
        )
        env = dict(os.environ, QB_PORT_SYNC_QB_PASSWORD=rig.password)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qbportsync", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            waitFor(lambda: rig.listenPort() == 30000, "the first port", 15)
            rssStart = rssKiB(daemon.pid)
            latencies = []
            for i in range(changes):
                port = 30001 + i
                started = time.perf_counter()
                if i % 2:
                    portFile.write_text(f"{port}\n")  # in place
                else:
                    staged = portFile.with_suffix(".new")
                    staged.write_text(f"{port}\n")
                    staged.rename(portFile)  # atomic rename
                waitFor(
                    lambda want=port: rig.listenPort() == want,
                    f"port {port}",
                    10,
                    0.001,
                )
                latencies.append(time.perf_counter() - started)
            rssEnd = rssKiB(daemon.pid)
        finally:
            stopProcess(daemon)
    latencies.sort()
    print(f"changes followed:            {changes}")
    print(f"write -> listening, median:  {statistics.median(latencies) * 1e3:.1f} ms")
    print(f"write -> listening, p95:     {latencies[int(changes * 0.95)] * 1e3:.1f} ms")
    print(f"write -> listening, max:     {latencies[-1] * 1e3:.1f} ms")
    print(f"daemon RSS after start:      {rssStart / 1024:.1f} MiB")
    print(f"daemon RSS after changes:    {rssEnd / 1024:.1f} MiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
