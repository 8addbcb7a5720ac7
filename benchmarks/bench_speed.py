"""
How fast a new port reaches a real qbittorrent-nox, side by side with the
floor, and what the daemon costs: one run, one qBittorrent.  Needs root
(the rig puts qBittorrent in a network namespace) and inotify-tools.

    .venv/bin/python -m benchmarks.bench_speed [--changes N] [--footprint N]
        [--idle-secs S] [--once-runs N]

1. Latency, from the moment a contender is given a port until libtorrent
   listens on it, seen in C{/proc/PID/net/tcp} (state 0A) polled in a tight
   loop, for three contenders taking turns port by port:
   - the floor: C{setPreferences} on a kept-alive connection, in process;
   - C{inotifywait -m} piped into C{curl}, a port file written;
   - the qbportsync daemon, a port file written (its periodic check is
     pushed out of the run, so that the other contenders' ports are no
     conflict to it).
2. One-shot: C{--once} with the port already applied, against the time to
   import Twisted's reactor and treq.
3. Footprint: the daemon's RSS growth over many changes, and the CPU it
   uses idle at the default settings.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlencode

from tests.rig import QBittorrentRig, stopProcess, waitFor

FIRST_PORT = 30000
PAUSE_SECS = 0.05
"""Between changes, for the contender to finish its requests."""
LISTEN_TIMEOUT_SECS = 5.0

CURL_SCRIPT = """\
dir=$1 file=$2 url=$3 cookies=$4
inotifywait -m -e close_write -e moved_to --format %f "$dir" |
while read -r name; do
    [ "$name" = "$file" ] || continue
    port=$(cat "$dir/$file")
    form="json={\\"listen_port\\":$port,\\"random_port\\":false,\\"upnp\\":false}"
    curl -s -o /dev/null -b "$cookies" --data-urlencode "$form" \\
        "$url/api/v2/app/setPreferences"
done
"""


class Listening:
    """Reads qBittorrent's TCP sockets straight from its C{/proc} entry."""

    def __init__(self, pid: int, pause: float = 0.0) -> None:
        """
        @param pause: seconds to sleep between two reads; 0 spins, which
            takes a CPU from the contenders on a small machine.
        """
        self._fd = os.open(f"/proc/{pid}/net/tcp", os.O_RDONLY)
        self._pause = pause

    def close(self) -> None:
        os.close(self._fd)

    def now(self, port: int) -> bool:
        """Whether something in qBittorrent's namespace listens on C{port}."""
        # local address, remote 0:0, state 0A (LISTEN)
        needle = f":{port:04X} 00000000:0000 0A".encode()
        table = b""
        while chunk := os.pread(self._fd, 1 << 16, len(table)):
            table += chunk
        return needle in table

    def wait(self, port: int) -> float:
        """Poll until C{port} listens; the perf_counter then."""
        deadline = time.perf_counter() + LISTEN_TIMEOUT_SECS
        while True:
            now = time.perf_counter()
            if self.now(port):
                return now
            if now > deadline:
                raise RuntimeError(f"qBittorrent did not listen on {port}")
            if self._pause:
                time.sleep(self._pause)


def wanted(port: int) -> str:
    """The setPreferences form the daemon sends (without an interface)."""
    return json.dumps({"listen_port": port, "random_port": False, "upnp": False})


def login(rig: QBittorrentRig) -> str:
    """A fresh session id for the rig's qBittorrent."""
    conn = http.client.HTTPConnection(rig.namespace.address, rig.webuiPort)
    form = urlencode({"username": rig.username, "password": rig.password})
    conn.request(
        "POST",
        "/api/v2/auth/login",
        form,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    for header, value in response.getheaders():
        if header.lower() == "set-cookie" and value.startswith("SID="):
            return value.split(";")[0].removeprefix("SID=")
    raise RuntimeError(f"login answered {response.status} without SID")


class Floor:
    """C{setPreferences} on one kept-alive connection: nothing can be faster."""

    name = "floor: keep-alive setPreferences in process"

    def __init__(self, rig: QBittorrentRig) -> None:
        self._cookie = f"SID={login(rig)}"
        self._conn = http.client.HTTPConnection(rig.namespace.address, rig.webuiPort)

    def give(self, port: int) -> None:
        self._conn.request(
            "POST",
            "/api/v2/app/setPreferences",
            urlencode({"json": wanted(port)}),
            {
                "Cookie": self._cookie,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )

    def settle(self) -> None:
        response = self._conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"setPreferences answered {response.status}")

    def close(self) -> None:
        self._conn.close()


def writePort(path: Path, port: int) -> None:
    """Write C{port} as gluetun does (in place) on odd ports, else by rename."""
    if port % 2:
        path.write_text(f"{port}\n")
    else:
        staged = path.with_name(path.name + ".new")
        staged.write_text(f"{port}\n")
        staged.rename(path)


class CurlScript:
    """The shell way: C{inotifywait -m} piped into one C{curl} per change."""

    name = "inotifywait -m + curl script"

    def __init__(self, rig: QBittorrentRig, directory: Path) -> None:
        portDir = directory / "curl"
        portDir.mkdir()
        self._portFile = portDir / "forwarded_port"
        cookies = directory / "curl-cookies"
        cookies.write_text(
            f"{rig.namespace.address}\tFALSE\t/\tFALSE\t0\tSID\t{login(rig)}\n"
        )
        script = directory / "follow.sh"
        script.write_text(CURL_SCRIPT)
        # A session of its own, so that the pipeline goes with its leader's PID.
        argv = [str(script), str(portDir), "forwarded_port", rig.baseURL, str(cookies)]
        self._process = subprocess.Popen(
            ["sh", *argv],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._process.stderr is not None
        for _ in range(2):  # "Setting up watches.", "Watches established."
            line = self._process.stderr.readline()
        if "Watches established" not in line:
            self.close()
            raise RuntimeError(f"inotifywait: {line!r}")

    def give(self, port: int) -> None:
        writePort(self._portFile, port)

    def settle(self) -> None:
        time.sleep(PAUSE_SECS)

    def close(self) -> None:
        # The script, inotifywait and curl are in one process group: its id
        # is the PID of the shell started here.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        stopProcess(self._process)


def configure(
    rig: QBittorrentRig, directory: Path, portFile: Path, extra: str = ""
) -> tuple[Path, dict[str, str]]:
    """
    A configuration following C{portFile}, named after its directory, and
    an environment with the password and C{directory} as the state directory.
    """
    config = directory / f"{portFile.parent.name}.toml"
    config.write_text(
        f'[qbittorrent]\nbase_url = "{rig.baseURL}"\n'
        f'username = "{rig.username}"\n{extra}'
        f'[protonvpn]\nforwarded_port_path = "{portFile}"\n'
    )
    env = dict(
        os.environ,
        QB_PORT_SYNC_QB_PASSWORD=rig.password,
        STATE_DIRECTORY=str(directory),
    )
    return config, env


def startDaemon(
    rig: QBittorrentRig,
    directory: Path,
    portFile: Path,
    extra: str = "",
    inside: bool = False,
) -> subprocess.Popen[bytes]:
    """
    The real daemon following C{portFile}; the password in its environment.
    C{inside}: in qBittorrent's namespace, where no other link comes and goes.
    """
    config, env = configure(rig, directory, portFile, extra)
    argv = [sys.executable, "-m", "qbportsync", "--config", str(config)]
    return subprocess.Popen(
        rig.namespace.command(argv) if inside else argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Daemon:
    """The qbportsync daemon following a port file."""

    name = "qbportsync daemon, port file"

    def __init__(
        self, rig: QBittorrentRig, directory: Path, listening: Listening, first: int
    ) -> None:
        portDir = directory / "daemon"
        portDir.mkdir()
        self._portFile = portDir / "forwarded_port"
        self._portFile.write_text(f"{first}\n")
        self.process = startDaemon(
            rig, directory, self._portFile, "verify_interval_secs = 86400\n"
        )
        waitFor(lambda: listening.now(first), "the daemon's first port", 30, 0.01)
        # Past the first apply's read-back: the next contender's port must not
        # look to the daemon like a rival's.
        time.sleep(0.5)

    def give(self, port: int) -> None:
        writePort(self._portFile, port)

    def settle(self) -> None:
        time.sleep(PAUSE_SECS)

    def close(self) -> None:
        stopProcess(self.process)


def percentile(sorted_: list[float], p: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    return sorted_[min(len(sorted_) - 1, max(0, round(p / 100 * len(sorted_)) - 1))]


def rssKiB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpuSecs(pid: int) -> float:
    """
    CPU time of C{pid}'s threads so far, from the scheduler's nanosecond
    counts (C{/proc/PID/stat} counts in ticks of 10 ms: too coarse for an
    idle daemon).
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    code = subprocess.run(
        argv, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode
    return time.perf_counter() - started, code


def latencies(
    rig: QBittorrentRig, directory: Path, listening: Listening, changes: int
) -> tuple[dict[str, list[float]], Daemon]:
    """Each contender's latencies, taking turns port by port."""
    floor = Floor(rig)
    curl = CurlScript(rig, directory)
    daemon = Daemon(rig, directory, listening, FIRST_PORT)
    contenders: list[Floor | CurlScript | Daemon] = [floor, curl, daemon]
    results: dict[str, list[float]] = {c.name: [] for c in contenders}
    port = FIRST_PORT
    try:
        for turn in range(changes + 5):  # the first rounds warm up
            for contender in contenders:
                port += 1
                started = time.perf_counter()
                contender.give(port)
                seen = listening.wait(port)
                contender.settle()
                if turn >= 5:
                    results[contender.name].append(seen - started)
                time.sleep(PAUSE_SECS)
    except BaseException:
        daemon.close()
        raise
    finally:
        floor.close()
        curl.close()
    return results, daemon


def footprint(daemon: Daemon, listening: Listening, changes: int) -> tuple[int, int]:
    """The daemon's RSS (KiB) before and after C{changes} more ports."""
    before = rssKiB(daemon.process.pid)
    for i in range(changes):
        port = 40000 + i
        daemon.give(port)
        listening.wait(port)
        time.sleep(0.01)
    time.sleep(1)
    return before, rssKiB(daemon.process.pid)


def idleCPU(
    rig: QBittorrentRig, directory: Path, listening: Listening, secs: float
) -> float:
    """
    CPU seconds per hour of a daemon at the defaults with nothing to do, in
    qBittorrent's namespace: the host's network changes (other tests'
    links) would wake it, as they would not on a quiet host.
    """
    portFile = directory / "idle" / "forwarded_port"
    portFile.parent.mkdir()
    portFile.write_text("45000\n")
    daemon = startDaemon(rig, directory, portFile, inside=True)
    try:
        waitFor(lambda: listening.now(45000), "the idle daemon's port", 30, 0.01)
        time.sleep(2)  # past the first verify's listener probe
        before = cpuSecs(daemon.pid)
        time.sleep(secs)
        used = cpuSecs(daemon.pid) - before
    finally:
        stopProcess(daemon)
    return used * 3600 / secs


def oneShot(
    rig: QBittorrentRig, directory: Path, runs: int
) -> tuple[float, float, float, float]:
    """
    Median wall times of C{--once} (port in place), of the import floor,
    of the import floor leaving as C{--once} does (heap frozen, no last
    collection), and of a login, which every one-shot run makes and
    qBittorrent takes its time to check.  Every module runs from compiled
    bytecode, as an installed package does.
    """
    portFile = directory / "once" / "forwarded_port"
    portFile.parent.mkdir()
    portFile.write_text("46000\n")
    config, env = configure(rig, directory, portFile)
    env["PYTHONPYCACHEPREFIX"] = str(directory / "pycache")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    once = [sys.executable, "-m", "qbportsync", "--once", "--config", str(config)]
    imports = "import twisted.internet.reactor, treq"
    floor = [sys.executable, "-c", imports]
    frozen = [sys.executable, "-c", f"{imports}, gc; gc.freeze()"]
    # Applies the port, compiles the bytecode, warms the page cache.
    _, code = timed(once, env)
    if code != 0:
        raise RuntimeError(f"--once exited with {code}")
    timed(frozen, env)
    onceTimes, floorTimes, frozenTimes, loginTimes = [], [], [], []
    for _ in range(runs):
        onceTimes.append(timed(once, env)[0])
        floorTimes.append(timed(floor, env)[0])
        frozenTimes.append(timed(frozen, env)[0])
        started = time.perf_counter()
        login(rig)
        loginTimes.append(time.perf_counter() - started)
    return (
        statistics.median(onceTimes),
        statistics.median(floorTimes),
        statistics.median(frozenTimes),
        statistics.median(loginTimes),
    )


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    version = subprocess.run(
        ["qbittorrent-nox", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return [
        f"machine: {os.cpu_count()} CPU ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {version}",
    ]


def report(
    out: Callable[[str], object], results: dict[str, list[float]], floorName: str
) -> None:
    floor = sorted(results[floorName])
    fp50, fp99 = percentile(floor, 50), percentile(floor, 99)
    out(
        "| contender | p50 | p90 | p99 | p50 / floor | p99 / floor |\n"
        "|---|---|---|---|---|---|"
    )
    for name, unsorted in results.items():
        values = sorted(unsorted)
        p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
        out(
            f"| {name} | {p50 * 1e3:.1f} ms | {p90 * 1e3:.1f} ms | "
            f"{p99 * 1e3:.1f} ms | {p50 / fp50:.2f}× | {p99 / fp99:.2f}× |"
        )


def main(argv: list[str], out: IO[str] = sys.stdout) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--changes", type=int, default=300, help="per contender")
    parser.add_argument("--footprint", type=int, default=1000, help="changes")
    parser.add_argument("--idle-secs", type=float, default=600.0)
    parser.add_argument("--once-runs", type=int, default=15)
    parser.add_argument(
        "--poll-us",
        type=float,
        default=100.0,
        help="microseconds between two reads of /proc/PID/net/tcp (0: spin)",
    )
    args = parser.parse_args(argv)
    if shutil.which("inotifywait") is None or shutil.which("curl") is None:
        raise SystemExit("needs inotifywait (inotify-tools) and curl")

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    with QBittorrentRig() as rig, tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for line in machine():
            say(line)
        listening = Listening(rig.pid, args.poll_us / 1e6)
        try:
            results, daemon = latencies(rig, directory, listening, args.changes)
            say(f"\nfile or call -> libtorrent listening, {args.changes} changes each:")
            report(say, results, Floor.name)
            try:
                before, after = footprint(daemon, listening, args.footprint)
            finally:
                daemon.close()
            say(
                f"\ndaemon RSS: {before / 1024:.1f} MiB, then "
                f"{after / 1024:.1f} MiB after {args.footprint} more changes "
                f"({(after - before) / 1024:+.2f} MiB)"
            )
            perHour = idleCPU(rig, directory, listening, args.idle_secs)
            say(
                f"daemon idle CPU at the defaults: {perHour:.2f} s per hour "
                f"(measured over {args.idle_secs:g} s)"
            )
            once, imports, frozen, loggingIn = oneShot(rig, directory, args.once_runs)
            say(
                f"--once, port in place: {once:.3f} s (median of {args.once_runs}); "
                f"importing twisted.internet.reactor and treq: {imports:.3f} s "
                f"(difference {once - imports:+.3f} s); the same imports leaving "
                f"as --once does (gc.freeze()): {frozen:.3f} s (difference "
                f"{once - frozen:+.3f} s); a login alone: {loggingIn:.3f} s"
            )
        finally:
            listening.close()


if __name__ == "__main__":
    main(sys.argv[1:])
