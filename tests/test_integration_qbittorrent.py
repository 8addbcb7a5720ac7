"""
L{qbportsync.qbittorrent.QBittorrentClient} against a real qbittorrent-nox
(the Debian package) in a network namespace, with the real reactor and treq;
and the one-shot command's login-refusal record, across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase, TestCase

import qbportsync
from qbportsync.config import QBittorrentConfig
from qbportsync.interfaces import ApplyResult
from qbportsync.qbittorrent import LoginRefused, QBittorrentClient, makeHTTPClient
from qbportsync.refusals import RECORD_NAME, RETRY_AFTER_REFUSAL, RefusalStore
from tests.rig import QBittorrentRig, requireQBittorrent, stopProcess, waitFor


class ClientTestCase(TestCase):
    """A fresh rig per test, and clients for it."""

    rigOptions: ClassVar[dict[str, Any]] = {}

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig(**self.rigOptions)
        self.addCleanup(self.rig.close)

    def client(self, password: str | None = None) -> QBittorrentClient:
        """A client as the daemon makes it, with the rig's password by default."""
        from twisted.internet import reactor

        config = QBittorrentConfig(
            base_url=self.rig.baseURL,
            username=self.rig.username,
            password=self.rig.password if password is None else password,
        )
        return QBittorrentClient(
            reactor,
            makeHTTPClient(reactor, config),
            config,
            RefusalStore(reactor, self.mktemp()),
        )

    def logins(self) -> int:
        """Successful logins from the client's address, in every run's log."""
        client = self.rig.namespace.clientAddress
        return self.rig.log().count(f"WebAPI login success. IP: {client}\n")

    def waitForListening(self, port: int) -> None:
        """Wait until libtorrent really listens on C{port} and on no other."""
        waitFor(
            lambda: self.rig.listeningPorts() == {port},
            f"libtorrent to listen on {port} only",
        )


class ApplyTests(ClientTestCase):
    """Setting and reading the port."""

    async def test_version(self) -> None:
        """version() reports what qBittorrent's own API reports."""
        expected = self.rig.call("/api/v2/app/version").decode()
        self.assertEqual(await self.client().version(), expected)

    async def test_listenPort(self) -> None:
        """listenPort() reads the port qBittorrent is set to."""
        self.rig.setPreferences({"listen_port": 41999})
        self.assertEqual(await self.client().listenPort(), 41999)

    async def test_applies(self) -> None:
        """apply() sets the port, verifies it, and libtorrent listens on it."""
        before = self.rig.listenPort()
        result = await self.client().apply(41234)
        self.assertEqual(
            result, ApplyResult(41234, before, applied=True, verified=True)
        )
        self.assertEqual(self.rig.listenPort(), 41234)
        self.waitForListening(41234)

    async def test_alreadySet(self) -> None:
        """
        A second apply() of the same port changes nothing, reports
        applied=False, and reuses the session: one login for both.
        """
        client = self.client()
        await client.apply(41235)
        result = await client.apply(41235)
        self.assertEqual(
            result, ApplyResult(41235, 41235, applied=False, verified=True)
        )
        self.assertEqual(self.logins(), 1)

    async def test_turnsOffRandomPortAndUPnP(self) -> None:
        """apply() turns off random_port and qBittorrent's own UPnP/NAT-PMP."""
        self.rig.setPreferences({"random_port": True, "upnp": True})
        result = await self.client().apply(41236)
        self.assertTrue(result.applied and result.verified)
        prefs = self.rig.preferences()
        self.assertEqual(
            (prefs["listen_port"], prefs["random_port"], prefs["upnp"]),
            (41236, False, False),
        )

    async def test_bindsInterface(self) -> None:
        """
        apply() binds qBittorrent to an interface it lists, and libtorrent
        then listens on that interface's address only.
        """
        result = await self.client().apply(41237, bindInterface="qbps0")
        self.assertEqual(
            (result.applied, result.verified, result.note), (True, True, "")
        )
        self.assertEqual(self.rig.preferences()["current_network_interface"], "qbps0")
        address = self.rig.namespace.address
        waitFor(
            lambda: (
                {(a, p) for a, p in self.rig.namespace.listeningSockets() if p == 41237}
                == {(address, 41237)}
            ),
            f"libtorrent to listen on {address}:41237 only",
        )

    async def test_unknownInterface(self) -> None:
        """
        An interface qBittorrent does not list: the port is set anyway,
        unbound, and the note says why.
        """
        result = await self.client().apply(41238, bindInterface="nosuch0")
        self.assertEqual((result.applied, result.verified), (True, True))
        self.assertIn("nosuch0", result.note)
        prefs = self.rig.preferences()
        self.assertEqual(
            (prefs["listen_port"], prefs["current_network_interface"]), (41238, "")
        )

    async def test_reloginAfterRestart(self) -> None:
        """
        After qBittorrent restarts, its old session cookie is refused; the
        client logs in again once and applies the port.
        """
        client = self.client()
        await client.apply(41239)
        self.rig.restart(listenPort=41240)
        result = await client.apply(41239)
        self.assertEqual(result, ApplyResult(41239, 41240, applied=True, verified=True))
        self.assertEqual(self.logins(), 2)
        self.waitForListening(41239)


class LoginRefusedTests(ClientTestCase):
    """A wrong password never costs more than one try."""

    async def test_wrongPasswordTriesOnce(self) -> None:
        """
        Several apply() calls with a wrong password make one failed login in
        all; the address is not banned and a right login still works.
        """
        client = self.client(password="not-the-password")
        before = self.rig.listenPort()
        for _ in range(4):
            with self.assertRaises(LoginRefused) as caught:
                await client.apply(41300)
            self.assertEqual(caught.exception.reason, "credentials")
        address = self.rig.namespace.clientAddress
        self.assertEqual(len(self.rig.failedLogins(address)), 1, self.rig.log())
        self.assertEqual(self.rig.listenPort(), before)
        result = await self.client().apply(41300)
        self.assertTrue(result.applied and result.verified)

    async def test_failureIsNotLogged(self) -> None:
        """The refusal's message names the URL but not the password."""
        client = self.client(password="not-the-password")
        with self.assertRaises(LoginRefused) as caught:
            await client.apply(41301)
        self.assertIn(self.rig.baseURL, str(caught.exception))
        self.assertNotIn("not-the-password", str(caught.exception))
        self.assertNotIn("not-the-password", repr(client))


class BannedTests(ClientTestCase):
    """A real ban is told apart from a wrong password."""

    rigOptions = {"maxAuthFailCount": 1, "banDuration": 60}

    async def test_banned(self) -> None:
        """Once qBittorrent bans the address, the refusal says so."""
        with self.assertRaises(LoginRefused) as caught:
            await self.client(password="not-the-password").apply(41400)
        self.assertEqual(caught.exception.reason, "credentials")
        with self.assertRaises(LoginRefused) as caught:
            await self.client().apply(41400)
        self.assertEqual(caught.exception.reason, "banned")
        self.assertTrue(self.rig.isBanned(self.rig.namespace.clientAddress))


class RefusalTestCase(SynchronousTestCase):
    """
    A fresh rig that bans after C{maxAuthFailCount} failed logins, a
    configuration without the password, and one state directory for every
    C{python -m qbportsync} process the test starts.
    """

    maxAuthFailCount: ClassVar[int] = 3

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig(maxAuthFailCount=self.maxAuthFailCount)
        self.addCleanup(self.rig.close)
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.state = self.directory / "state"
        portFile = self.directory / "forwarded_port"
        portFile.write_text("41500\n")
        self.config = self.directory / "config.toml"
        self.config.write_text(
            "[qbittorrent]\n"
            f'base_url = "{self.rig.baseURL}"\n'
            f'username = "{self.rig.username}"\n'
            "[protonvpn]\n"
            f'forwarded_port_path = "{portFile}"\n'
        )
        self.client = self.rig.namespace.clientAddress

    def command(self, password: str, *argv: str) -> tuple[list[str], dict[str, str]]:
        """C{python -m qbportsync ARGV} on the rig, and its environment."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(qbportsync.__file__).parent.parent)
        env["QB_PORT_SYNC_QB_PASSWORD"] = password
        env["STATE_DIRECTORY"] = str(self.state)
        command = [sys.executable, "-m", "qbportsync", *argv]
        command += ["--strategy", "file", "--config", str(self.config)]
        return command, env

    def once(self, password: str) -> tuple[int, dict[str, Any]]:
        """One one-shot run: its exit code and its JSON line."""
        argv, env = self.command(password, "--once", "--json")
        done = subprocess.run(
            argv,
            env=env,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 1, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertNotIn(password, done.stdout + done.stderr)
        result: dict[str, Any] = json.loads(lines[0])
        return done.returncode, result

    def daemon(self, password: str, log: Path) -> subprocess.Popen[bytes]:
        """The daemon, its output in C{log}; stopped by PID in cleanup."""
        argv, env = self.command(password)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(stopProcess, process)
        return process

    def ageRecord(self, seconds: float) -> None:
        """Move every refusal in the record C{seconds} into the past."""
        path = self.state / RECORD_NAME
        record = json.loads(path.read_text())
        for origin in record["origins"].values():
            for entry in origin.get("refused", {}).values():
                entry["last_refusal"] -= seconds
        path.write_text(json.dumps(record))


class OneShotRefusalTests(RefusalTestCase):
    """Wrong-password one-shots with a limit of 3, as some set-ups have."""

    def test_sixWrongPasswordRuns(self) -> None:
        """
        Six wrong-password runs, the second half ten minutes after the first:
        two failed logins in all, each later run refused by the record with
        the fix in its note; not banned, and once the password is fixed the
        next run applies the port at once.
        """
        wrong = "not-the-password"
        notes = []
        for run in range(6):
            if run == 3:
                self.ageRecord(RETRY_AFTER_REFUSAL)
            code, result = self.once(wrong)
            self.assertEqual((code, result["applied"]), (1, False), result)
            notes.append(result["note"])
        self.assertEqual(len(self.rig.failedLogins(self.client)), 2, self.rig.log())
        for note in notes[1:3] + notes[4:]:
            self.assertIn("not logging in", note)
            self.assertIn("$QB_PORT_SYNC_QB_PASSWORD", note)
            self.assertIn(str(self.state / RECORD_NAME), note)
            self.assertIn("--forget-refusals", note)
        self.assertIn("one more try", notes[0])
        self.assertIn("no more tries", notes[3])
        code, result = self.once(self.rig.password)
        self.assertEqual((code, result["applied"], result["verified"]), (0, True, True))
        self.assertEqual(self.rig.listenPort(), 41500)
        self.assertEqual(len(self.rig.failedLogins(self.client)), 2)
        self.assertFalse(self.rig.isBanned(self.client))


class OneShotRefusalFiveTests(OneShotRefusalTests):
    """The same with qBittorrent's default limit of 5."""

    maxAuthFailCount = 5


class DaemonRefusalTests(RefusalTestCase):
    """The daemon keeps its refusals in the same record."""

    def test_sharedWithOneShotsAndRestarts(self) -> None:
        """
        After the daemon's failed login, neither a one-shot nor the daemon
        restarted sends another: one failed login in all, and the restarted
        daemon says why.
        """
        wrong = "not-the-password"
        first = self.daemon(wrong, self.directory / "daemon-1.log")
        waitFor(lambda: self.rig.failedLogins(self.client) != [], "a failed login")
        code, result = self.once(wrong)
        self.assertEqual(code, 1)
        self.assertIn("not logging in", result["note"])
        stopProcess(first)
        log = self.directory / "daemon-2.log"
        self.daemon(wrong, log)
        waitFor(
            lambda: "not logging in" in log.read_text(errors="replace"),
            "the restarted daemon to read the refusal",
        )
        self.assertEqual(len(self.rig.failedLogins(self.client)), 1, self.rig.log())
        self.assertNotIn(wrong, log.read_text(errors="replace"))


class RigTests(ClientTestCase):
    """The rig keeps its promise of isolation."""

    def test_noRouteOffTheLink(self) -> None:
        """Inside the namespace the only route is the link's; no IPv6 at all."""
        namespace = self.rig.namespace
        routes = namespace.run(["ip", "-4", "route", "show", "table", "all"]).stdout
        main = [
            line
            for line in routes.splitlines()
            if not line.startswith(("local", "broadcast"))
        ]
        self.assertEqual([line.split()[0] for line in main], [str(namespace.network)])
        self.assertEqual(namespace.run(["ip", "-6", "addr"]).stdout, "")

    def test_outboundFeaturesOff(self) -> None:
        """DHT, LSD, PeX, UPnP/NAT-PMP and the GeoIP download are off."""
        prefs = self.rig.preferences()
        keys = ["dht", "lsd", "pex", "upnp", "web_ui_upnp", "resolve_peer_countries"]
        self.assertEqual({key: prefs[key] for key in keys}, dict.fromkeys(keys, False))
        self.assertNotIn("geolocation", self.rig.log())
