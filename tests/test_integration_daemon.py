"""
The real daemon, as a subprocess, against a real qbittorrent-nox.

Driven only through the command-line contract: C{python -m qbportsync
--config FILE --strategy file} (the daemon) and C{... --once --json} (the
one-shot), with the password in C{QB_PORT_SYNC_QB_PASSWORD}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

import qbportsync
from qbportsync.sync import RESTORE_SPACING_SECS
from tests.rig import QBittorrentRig, requireQBittorrent, stopProcess, waitFor

PASSWORD_ENV = "QB_PORT_SYNC_QB_PASSWORD"
SLACK_SECS = 10.0
"""Added to waits sized from the configuration: a loaded machine is slow."""


class _Run:
    """One daemon or one-shot process and the files holding its output."""

    def __init__(self, process: subprocess.Popen[bytes], stem: Path) -> None:
        self.process = process
        self.stem = stem

    def stdout(self) -> str:
        return self.stem.with_suffix(".stdout").read_text(errors="replace")

    def output(self) -> str:
        """Everything it wrote, stdout then stderr."""
        stderr = self.stem.with_suffix(".stderr").read_text(errors="replace")
        return self.stdout() + stderr


class DaemonTestCase(SynchronousTestCase):
    """Common set-up: a rig, a port file, a config, and the runs to stop."""

    rigOptions: ClassVar[dict[str, Any]] = {}

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig(**self.rigOptions)
        self.addCleanup(self.rig.close)
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.portFile = self.directory / "vpn" / "forwarded_port"
        self.portFile.parent.mkdir()
        self.runs: list[_Run] = []
        # Registered before the stops, so it runs after them: it reads all
        # output each process ever wrote.
        self.addCleanup(self.assertNoSecrets)

    def writeConfig(self, verifyInterval: float = 30.0) -> Path:
        """Write a config for the rig; the password stays out of it."""
        path = self.directory / "config.toml"
        path.write_text(
            "[qbittorrent]\n"
            f'base_url = "{self.rig.baseURL}"\n'
            f'username = "{self.rig.username}"\n'
            f"verify_interval_secs = {verifyInterval}\n"
            "\n"
            "[protonvpn]\n"
            f'forwarded_port_path = "{self.portFile}"\n'
        )
        return path

    def environment(self, password: str | None) -> dict[str, str]:
        """The subprocess environment: this package first, the password."""
        env = dict(os.environ)
        packageRoot = str(Path(qbportsync.__file__).parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [packageRoot, *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env[PASSWORD_ENV] = self.rig.password if password is None else password
        return env

    def spawn(self, argv: list[str], password: str | None = None) -> _Run:
        """Start C{python -m qbportsync ARGV}; stop it by PID in cleanup."""
        stem = self.directory / f"run-{len(self.runs)}"
        stdout: IO[bytes]
        stderr: IO[bytes]
        with (
            open(stem.with_suffix(".stdout"), "wb") as stdout,
            open(stem.with_suffix(".stderr"), "wb") as stderr,
        ):
            process = subprocess.Popen(
                [sys.executable, "-m", "qbportsync", *argv, "--log-level", "debug"],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=self.environment(password),
                cwd=self.directory,
            )
        run = _Run(process, stem)
        self.runs.append(run)
        self.addCleanup(stopProcess, process)
        return run

    def startDaemon(
        self, verifyInterval: float = 30.0, password: str | None = None
    ) -> _Run:
        """Start the long-running daemon following the port file."""
        config = self.writeConfig(verifyInterval)
        return self.spawn(
            ["--config", str(config), "--strategy", "file"], password=password
        )

    def runOnce(self, password: str | None = None) -> tuple[int, dict[str, Any]]:
        """Run the one-shot; return its exit code and its JSON line."""
        config = self.writeConfig()
        run = self.spawn(
            ["--once", "--strategy", "file", "--json", "--config", str(config)],
            password=password,
        )
        code = run.process.wait(30)
        lines = run.stdout().splitlines()
        self.assertEqual(len(lines), 1, f"one JSON line expected:\n{run.output()}")
        result: dict[str, Any] = json.loads(lines[0])
        return code, result

    def writeInPlace(self, content: str) -> None:
        """Truncate and write the port file, as gluetun does."""
        with open(self.portFile, "w") as f:
            f.write(content)

    def writeByRename(self, content: str) -> None:
        """Replace the port file atomically with a rename."""
        temporary = self.portFile.with_name(self.portFile.name + ".tmp")
        temporary.write_text(content)
        os.replace(temporary, self.portFile)

    def waitForPort(self, port: int, timeout: float = 15.0) -> float:
        """Wait until qBittorrent reports C{port}; return the seconds it took."""
        try:
            return waitFor(
                lambda: self.rig.listenPort() == port,
                f"qBittorrent to report listen_port {port}",
                timeout,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.outputs()}") from None

    def waitForListening(self, port: int) -> None:
        """Wait until libtorrent really listens on C{port}."""
        waitFor(
            lambda: port in self.rig.listeningPorts(),
            f"libtorrent to listen on {port}",
            timeout=5,
        )

    def outputs(self) -> str:
        """Every run's output, for failure messages."""
        return "\n".join(
            f"--- output of run {i} ---\n{run.output()}"
            for i, run in enumerate(self.runs)
        )

    def assertNoSecrets(self) -> None:
        """Neither the password nor a session cookie appears in any output."""
        for run in self.runs:
            text = run.output()
            self.assertNotIn(self.rig.password, text)
            self.assertNotIn("SID=", text)


class OnceTests(DaemonTestCase):
    """C{--once --json} against a real qBittorrent."""

    def test_appliesAndVerifies(self) -> None:
        """The one-shot applies the file's port, verifies it, and exits 0."""
        self.writeInPlace("41234")
        code, result = self.runOnce()
        self.assertEqual(
            (code, result),
            (
                0,
                {
                    "strategy": "file",
                    "detected_port": 41234,
                    "applied": True,
                    "verified": True,
                    "note": result.get("note"),
                },
            ),
        )
        self.assertEqual(self.rig.listenPort(), 41234)
        self.waitForListening(41234)

    def test_secondRunChangesNothing(self) -> None:
        """A second one-shot with the same port reports applied=false, exit 0."""
        self.writeInPlace("41235\n")
        self.assertEqual(self.runOnce()[0], 0)
        code, result = self.runOnce()
        self.assertEqual(
            (code, result["applied"], result["verified"]), (0, False, True)
        )
        self.assertEqual(result["detected_port"], 41235)
        self.assertEqual(self.rig.listenPort(), 41235)

    def test_wrongPassword(self) -> None:
        """A wrong password: exit 1, nothing applied, one failed login, no ban."""
        before = self.rig.listenPort()
        self.writeInPlace("41236")
        code, result = self.runOnce(password="not-the-password")
        self.assertEqual((code, result["applied"]), (1, False))
        self.assertEqual(
            len(self.rig.failedLogins(self.rig.namespace.clientAddress)), 1
        )
        self.assertEqual(self.rig.listenPort(), before)
        self.assertFalse(self.rig.isBanned(self.rig.namespace.clientAddress))


class FollowTests(DaemonTestCase):
    """The daemon keeps qBittorrent on the port the file names."""

    def test_followsSuccessiveWrites(self) -> None:
        """
        Twenty writes, alternately in place and by rename: qBittorrent follows
        each one and ends listening on the last.
        """
        self.writeInPlace("42000")
        daemon = self.startDaemon()
        self.waitForPort(42000)
        ports = [42001 + i for i in range(20)]
        for i, port in enumerate(ports):
            if i % 2:
                self.writeByRename(f"{port}\n")
            else:
                self.writeInPlace(str(port))
            self.waitForPort(port)
        self.waitForListening(ports[-1])
        self.assertIsNone(daemon.process.poll(), self.outputs())
        self.assertIn(str(ports[-1]), daemon.output())

    def test_burstEndsOnLast(self) -> None:
        """Twenty writes in a burst: qBittorrent ends on the last one."""
        self.writeInPlace("43000")
        self.startDaemon()
        self.waitForPort(43000)
        ports = [43001 + i for i in range(20)]
        for i, port in enumerate(ports):
            if i % 2:
                self.writeByRename(str(port))
            else:
                self.writeInPlace(str(port))
        self.waitForPort(ports[-1])
        self.waitForListening(ports[-1])
        # Nothing applied late may move it away again.
        time.sleep(1)
        self.assertEqual(self.rig.listenPort(), ports[-1])

    def test_restoresDrift(self) -> None:
        """A port changed behind the daemon's back is set back."""
        self.writeInPlace("44000")
        self.startDaemon(verifyInterval=1)
        self.waitForPort(44000)
        self.rig.setPreferences({"listen_port": 44999})
        self.assertEqual(self.rig.listenPort(), 44999)
        # Set back after the next check, and never sooner than the spacing
        # after the daemon's own apply.
        self.waitForPort(44000, timeout=RESTORE_SPACING_SECS + 1 + SLACK_SECS)
        self.waitForListening(44000)

    def test_qbittorrentRestart(self) -> None:
        """
        After qBittorrent restarts (its session gone, its port reset), the
        daemon logs in again and re-applies the port.
        """
        client = self.rig.namespace.clientAddress
        self.writeInPlace("45000")
        self.startDaemon(verifyInterval=1)
        self.waitForPort(45000)
        logins = self.rig.log().count(f"WebAPI login success. IP: {client}")
        self.rig.restart(listenPort=45999)
        self.waitForPort(45000, timeout=RESTORE_SPACING_SECS + 1 + SLACK_SECS)
        self.assertGreater(
            self.rig.log().count(f"WebAPI login success. IP: {client}"), logins
        )
        self.waitForListening(45000)

    def test_changeWhileQBittorrentIsDown(self) -> None:
        """A port written while qBittorrent is down is applied once it is back."""
        self.writeInPlace("46000")
        self.startDaemon()
        self.waitForPort(46000)
        self.rig.stop()
        self.writeByRename("46001")
        time.sleep(0.5)
        self.rig.start()
        self.waitForPort(46001)

    def test_ignoresEmptyAndGarbage(self) -> None:
        """An empty file or garbage leaves qBittorrent on the last good port."""
        self.writeInPlace("47000")
        daemon = self.startDaemon()
        self.waitForPort(47000)
        for content in ["", "not a port\n", "0", "70000"]:
            self.writeInPlace(content)
            time.sleep(0.3)
            self.assertEqual(self.rig.listenPort(), 47000, f"after {content!r}")
        self.writeInPlace("47001")
        self.waitForPort(47001)
        self.assertIsNone(daemon.process.poll(), self.outputs())

    def test_wrongPasswordBurnsOneTry(self) -> None:
        """
        With a wrong password the daemon fails one login and then waits: no
        second try within ten seconds, no ban, and it keeps running.
        """
        client = self.rig.namespace.clientAddress
        self.writeInPlace("48000")
        daemon = self.startDaemon(password="not-the-password")
        waitFor(lambda: self.rig.failedLogins(client) != [], "a failed login")
        # Port changes must not trigger logins either.
        for port in range(48001, 48011):
            self.writeInPlace(str(port))
            time.sleep(1)
        self.assertEqual(len(self.rig.failedLogins(client)), 1, self.rig.log())
        self.assertIsNone(daemon.process.poll(), self.outputs())
        self.assertNotEqual(self.rig.listenPort(), 48010)
        self.assertFalse(self.rig.isBanned(client))
