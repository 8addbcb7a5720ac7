"""
Show qb-port-sync keeping a real qBittorrent on the port a VPN forwards.

Starts a throwaway qbittorrent-nox (isolated in a network namespace, every
outbound feature off), the real daemon, and then plays the VPN: rewrites the
forwarded-port file a few times and shows what qBittorrent does.  Cleans up
everything it started.  Run it through scripts/demo, as root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rig import QBittorrentRig, stopProcess, waitFor

# What the VPN does to the port file, step by step: how, content, and what
# qBittorrent should end up on (None: keep the port it has).
STEPS: list[tuple[str, str, int | None]] = [
    ("in place (truncate + write, like gluetun)", "51413", 51413),
    ("atomic rename (write a new file, rename it over)", "40123\n", 40123),
    ("in place, garbage", "hello\n", None),
    ("in place, empty (the VPN went down)", "", None),
    ("atomic rename", "45678\n", 45678),
    ("in place, two ports (gluetun lists one per line)", "60001\n60002", 60001),
]

_LOG_PREFIX = re.compile(r"^\S+ \[(?P<system>[^#\]]+)#(?P<level>\w+)\] ")


def heading(text: str) -> None:
    print(f"\n== {text}")


class Daemon:
    """The real qb-port-sync daemon as a child process, its log in a file."""

    def __init__(self, config: Path, logPath: Path, password: str) -> None:
        command = [str(Path(sys.executable).parent / "qb-port-sync")]
        argv = [*command, "--config", str(config), "--strategy", "file"]
        print("   $ " + " ".join(argv))
        env = dict(
            os.environ,
            QB_PORT_SYNC_QB_PASSWORD=password,
            STATE_DIRECTORY=str(config.parent / "state"),
        )
        self.logPath = logPath
        self._seen = 0
        with open(logPath, "wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own command)
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )

    def newLines(self) -> list[str]:
        """Log lines written since the last call, without timestamps."""
        lines = self.logPath.read_text(errors="replace").splitlines()
        fresh, self._seen = lines[self._seen :], len(lines)
        shown = []
        for line in fresh:
            m = _LOG_PREFIX.match(line)
            if m is None:
                shown.append(line)
            elif m["system"].startswith("qbportsync"):
                level = "" if m["level"] == "info" else f"{m['level'].upper()}: "
                shown.append(level + line[m.end() :])
        return shown

    def showLog(self, settle: float = 0.3) -> None:
        """Print what the daemon logged since last time."""
        waitFor(
            lambda: self.logPath.stat().st_size > 0, "the daemon to log", timeout=10
        )
        time.sleep(settle)
        for line in self.newLines():
            print(f"   daemon | {line}")

    def stop(self) -> None:
        stopProcess(self.process)


def writeInPlace(path: Path, content: str) -> None:
    with open(path, "w") as f:
        f.write(content)


def writeByRename(path: Path, content: str) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(content)
    os.replace(temporary, path)


def main() -> int:
    print(__doc__.strip().splitlines()[0])
    heading("1. A throwaway qBittorrent")
    try:
        rig = QBittorrentRig()
    except unittest.SkipTest as e:
        print(f"Cannot run the demo here: {e}.", file=sys.stderr)
        return 1
    with rig, tempfile.TemporaryDirectory(prefix="qbps-demo-") as tmp:
        directory = Path(tmp)
        version = rig.call("/api/v2/app/version").decode()
        print(
            f"   qbittorrent-nox {version} (pid {rig.pid}) in network namespace "
            f"{rig.namespace.name},\n"
            f"   Web UI at {rig.baseURL}, user {rig.username!r}, a random password;\n"
            "   DHT, LSD, PeX, UPnP/NAT-PMP off, and no route off this machine.\n"
            f"   It listens on port {rig.listenPort()} for now."
        )

        heading("2. A configuration for qb-port-sync")
        portFile = directory / "vpn" / "forwarded_port"
        config = directory / "config.toml"
        config.write_text(
            "[qbittorrent]\n"
            f'base_url = "{rig.baseURL}"\n'
            f'username = "{rig.username}"\n'
            "# password: from QB_PORT_SYNC_QB_PASSWORD, so it is in no file\n"
            "\n"
            "[protonvpn]\n"
            f'forwarded_port_path = "{portFile}"\n'
        )
        for line in config.read_text().splitlines():
            print(f"   {line}")

        heading("3. The daemon starts before the VPN has written any port")
        daemon = Daemon(config, directory / "daemon.log", rig.password)
        try:
            daemon.showLog(settle=1.0)
            heading("4. The VPN writes the forwarded port; qBittorrent follows")
            portFile.parent.mkdir()
            for number, (how, content, expected) in enumerate(STEPS, 1):
                print(f"\n-- step {number}: {how}: file says {content!r}")
                playStep(rig, daemon, portFile, how, content, expected)
        except AssertionError as e:
            print(f"\nThe demo failed: {e}", file=sys.stderr)
            return 1
        finally:
            heading("5. Cleaning up")
            daemon.stop()
            daemon.showLog(settle=0)
            print(f"   daemon stopped (exit code {daemon.process.returncode})")
    print(
        "   qBittorrent stopped, namespace and temporary files removed.\n\n"
        "Done: qBittorrent followed every port the file named and ignored the "
        "garbage and the empty file."
    )
    return 0


def playStep(
    rig: QBittorrentRig,
    daemon: Daemon,
    portFile: Path,
    how: str,
    content: str,
    expected: int | None,
) -> None:
    """Write the port file one way, show the daemon's reaction and the result."""
    before = rig.listenPort()
    started = time.monotonic()
    if how.startswith("atomic"):
        writeByRename(portFile, content)
    else:
        writeInPlace(portFile, content)
    if expected is None:
        daemon.showLog(settle=1.0)
        now = rig.listenPort()
        if now != before:
            raise AssertionError(f"qBittorrent moved from port {before} to {now}")
        print(f"   qBittorrent: still port {now}")
        return
    took = waitFor(
        lambda: rig.listenPort() == expected,
        f"qBittorrent to report port {expected}",
    )
    waitFor(
        lambda: expected in rig.listeningPorts(),
        f"libtorrent to listen on {expected}",
        timeout=5,
    )
    listening = time.monotonic() - started
    daemon.showLog()
    print(
        f"   qBittorrent: port {expected} after {took:.2f} s, "
        f"libtorrent listening on it after {listening:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
