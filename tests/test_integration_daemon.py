"""
The real daemon, as a subprocess, against a real qbittorrent-nox.

Driven only through the command-line contract: C{python -m qbportsync
--config FILE --strategy file} (the daemon) and C{... --once --json} (the
one-shot), with the password in C{QB_PORT_SYNC_QB_PASSWORD}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from qbportsync.sync import RESTORE_SPACING_SECS
from tests.rig import (
    QBittorrentRig,
    checkoutEnvironment,
    freePort,
    requireQBittorrent,
    stopProcess,
    waitFor,
)

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

    def writeConfig(
        self,
        verifyInterval: float = 30.0,
        baseURL: str | None = None,
        bindInterface: str = "",
        healthPort: int = 0,
    ) -> Path:
        """Write a config for the rig; the password stays out of it."""
        path = self.directory / "config.toml"
        text = (
            "[qbittorrent]\n"
            f'base_url = "{baseURL or self.rig.baseURL}"\n'
            f'username = "{self.rig.username}"\n'
            f"verify_interval_secs = {verifyInterval}\n"
            "\n"
            "[protonvpn]\n"
            f'forwarded_port_path = "{self.portFile}"\n'
            "\n"
            "[net]\n"
            f'bind_interface = "{bindInterface}"\n'
        )
        if healthPort:
            text += f"\n[health]\nenabled = true\nport = {healthPort}\n"
        path.write_text(text)
        return path

    def environment(self, password: str | None) -> dict[str, str]:
        """The subprocess environment: this package first, the password."""
        return checkoutEnvironment(
            PYTHONUNBUFFERED="1",
            # The test's own login-refusal record, never the host's.
            STATE_DIRECTORY=str(self.directory / "state"),
            **{PASSWORD_ENV: self.rig.password if password is None else password},
        )

    def spawn(
        self,
        argv: list[str],
        password: str | None = None,
        inNamespace: bool = False,
    ) -> _Run:
        """
        Start C{python -m qbportsync ARGV}, inside qBittorrent's namespace
        when asked; stop it by PID in cleanup.
        """
        stem = self.directory / f"run-{len(self.runs)}"
        stdout: IO[bytes]
        stderr: IO[bytes]
        with (
            open(stem.with_suffix(".stdout"), "wb") as stdout,
            open(stem.with_suffix(".stderr"), "wb") as stderr,
        ):
            command = [
                sys.executable,
                "-m",
                "qbportsync",
                *argv,
                "--log-level",
                "debug",
            ]
            if inNamespace:
                # ip netns exec keeps the PID: stopping it stops the daemon.
                command = self.rig.namespace.command(command)
            process = subprocess.Popen(
                command,
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
        self,
        verifyInterval: float = 30.0,
        password: str | None = None,
        inNamespace: bool = False,
        **config: Any,
    ) -> _Run:
        """
        Start the long-running daemon following the port file; its /status
        is served on C{self.healthPort} unless it runs in the namespace.
        """
        if not inNamespace:
            config.setdefault("healthPort", freePort())
            self.healthPort = config["healthPort"]
        path = self.writeConfig(verifyInterval, **config)
        return self.spawn(
            ["--config", str(path), "--strategy", "file"],
            password=password,
            inNamespace=inNamespace,
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

    def status(self) -> dict[str, Any]:
        """The running daemon's /status document."""
        url = f"http://127.0.0.1:{self.healthPort}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            document: dict[str, Any] = json.load(response)
            return document

    def waitForStatus(
        self, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Wait until the daemon's /status satisfies C{predicate}; return it."""
        seen: list[dict[str, Any]] = []

        def check() -> bool:
            try:
                seen[:] = [self.status()]
            except OSError:
                return False
            return predicate(seen[0])

        try:
            waitFor(check, f"/status to show {what}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last: {seen}\n{self.outputs()}") from None
        return seen[0]

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
        # Once the daemon has read the last port and applied it, no earlier
        # port is left to apply late.
        self.waitForStatus(
            lambda s: (
                s["source_port"] == s["applied_port"] == ports[-1] and s["healthy"]
            ),
            f"port {ports[-1]} read, applied and verified",
        )
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
        self.waitForStatus(
            lambda s: s["source_port"] == 46001 and s["last_attempt_failed"],
            "port 46001 read and its apply failed",
        )
        self.rig.start()
        self.waitForPort(46001)

    def test_ignoresEmptyAndGarbage(self) -> None:
        """An empty file or garbage leaves qBittorrent on the last good port."""
        self.writeInPlace("47000")
        daemon = self.startDaemon()
        self.waitForPort(47000)
        for content in ["", "not a port\n", "0", "70000"]:
            self.writeInPlace(content)
            self.waitForStatus(
                lambda s: s["source_trouble"] is not None, f"{content!r} read"
            )
            self.assertEqual(self.rig.listenPort(), 47000, f"after {content!r}")
            self.writeInPlace("47000")
            self.waitForStatus(lambda s: s["healthy"], "port 47000 read again")
        self.writeInPlace("47001")
        self.waitForPort(47001)
        self.assertIsNone(daemon.process.poll(), self.outputs())

    def test_wrongPasswordBurnsOneTry(self) -> None:
        """
        With a wrong password the daemon fails one login and then waits: ten
        port changes, each read by the daemon, bring no second try, no ban,
        and it keeps running.
        """
        client = self.rig.namespace.clientAddress
        self.writeInPlace("48000")
        daemon = self.startDaemon(password="not-the-password")
        waitFor(lambda: self.rig.failedLogins(client) != [], "a failed login")
        for port in range(48001, 48011):
            self.writeInPlace(str(port))
            self.waitForStatus(
                lambda s, port=port: s["source_port"] == port, f"port {port} read"
            )
        self.assertEqual(len(self.rig.failedLogins(client)), 1, self.rig.log())
        self.assertIsNone(daemon.process.poll(), self.outputs())
        self.assertNotEqual(self.rig.listenPort(), 48010)
        self.assertFalse(self.rig.isBanned(client))


def peerConnects(address: str, port: int) -> bool:
    """Whether a TCP connection from the host to C{address}:C{port} completes."""
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


_REQUEST_LINE = re.compile(rb"(?:GET|POST) (/api/v2/\S+) HTTP/1\.[01]\r\n")


class CountingProxy:
    """
    A TCP proxy on 127.0.0.1 in front of qBittorrent's Web UI that notes the
    time and path of every Web API request passing through it.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.requests: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            for s in (client, upstream):
                s.settimeout(0.2)
                self._sockets.append(s)
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        pending = b""
        while not self._stopping.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if count:
                pending += data
                now = time.monotonic()
                with self._lock:
                    for match in _REQUEST_LINE.finditer(pending):
                        self.requests.append((now, match.group(1).decode()))
                pending = pending[pending.rfind(b"\r\n") + 2 :]
            try:
                sink.sendall(data)
            except OSError:
                return

    def busiestWindow(self, seconds: float = 15.0) -> int:
        """The most requests in any C{seconds} window."""
        with self._lock:
            times = [t for t, _ in self.requests]
        return max(
            (sum(1 for u in times if t <= u < t + seconds) for t in times), default=0
        )

    def close(self) -> None:
        """Stop accepting and pumping; join every thread."""
        self._stopping.set()
        self._server.close()
        for s in self._sockets:
            s.close()
        for thread in self._threads:
            thread.join(5)


class ListenerHealTests(DaemonTestCase):
    """
    qBittorrent bound to its interface stops accepting connections when the
    interface is deleted and created again; the daemon, in the same network
    namespace, makes it listen again.
    """

    def bindAndListen(self, port: int) -> None:
        """Wait until qBittorrent is bound to qbps0 and a peer can connect."""
        waitFor(
            lambda: self.rig.preferences()["current_network_interface"] == "qbps0",
            "qBittorrent to be bound to qbps0",
        )
        waitFor(
            lambda: peerConnects(self.rig.namespace.address, port),
            f"a peer to connect to port {port}",
            timeout=5,
        )

    def bounceAndShowRefused(self, port: int) -> float:
        """Bounce the link; a peer is refused; the time the link came back."""
        self.rig.namespace.bounce()
        back = time.monotonic()
        self.assertFalse(
            peerConnects(self.rig.namespace.address, port),
            "qBittorrent still accepts connections after the interface bounce",
        )
        return back

    def waitForHeal(self, port: int, since: float, how: str) -> float:
        """Wait (at most 10 s) until a peer connects again; the seconds taken."""
        try:
            waitFor(
                lambda: peerConnects(self.rig.namespace.address, port),
                f"a peer to connect to port {port} again",
                timeout=10 - (time.monotonic() - since),
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.outputs()}") from None
        healed = time.monotonic() - since
        print(f"\n  listener healed ({how}) {healed:.2f} s after {self.id()}", end=" ")
        return healed

    def healLines(self, run: _Run) -> list[str]:
        return [
            line for line in run.output().splitlines() if "made it listen again" in line
        ]

    def test_interfaceBounceHealedByEvents(self) -> None:
        """
        The interface is deleted and created again: connections are refused,
        and the daemon, told by netlink, heals it within 10 s, in one line.
        """
        self.writeInPlace("40600")
        # A verify far off: only the network events can heal within 10 s.
        daemon = self.startDaemon(
            verifyInterval=120, bindInterface="qbps0", inNamespace=True
        )
        self.waitForPort(40600)
        self.bindAndListen(40600)
        back = self.bounceAndShowRefused(40600)
        self.waitForHeal(40600, back, "network events")
        waitFor(lambda: self.healLines(daemon) != [], "the daemon's heal line", 5)
        self.assertEqual(len(self.healLines(daemon)), 1, daemon.output())
        self.assertIn("network interface qbps0 changed", self.healLines(daemon)[0])
        self.assertIsNone(daemon.process.poll(), self.outputs())

    def test_deadListenerHealedByVerify(self) -> None:
        """
        A daemon started after the bounce hears no network event: its first
        verify connects, finds the listener dead, and heals it.
        """
        self.rig.setPreferences(
            {"current_network_interface": "qbps0", "listen_port": 40700}
        )
        self.bindAndListen(40700)
        self.bounceAndShowRefused(40700)
        self.writeInPlace("40700")
        started = time.monotonic()
        daemon = self.startDaemon(
            verifyInterval=1, bindInterface="qbps0", inNamespace=True
        )
        self.waitForHeal(40700, started, "verify")
        waitFor(lambda: self.healLines(daemon) != [], "the daemon's heal line", 5)
        [line] = self.healLines(daemon)
        self.assertIn("periodic check", line)


class TugOfWarTests(DaemonTestCase):
    """Something else keeps resetting qBittorrent's port: the daemon backs off."""

    def test_backsOffFromRival(self) -> None:
        """
        A rival sets its own port every second while the daemon verifies
        every 2 s: at most 7 Web API requests in any 15 s (0.5/s), one
        warning naming the culprits, and /status says the port is contested.
        """
        seconds = 90.0 if os.environ.get("QBPORTSYNC_SLOW") == "1" else 20.0
        proxy = CountingProxy((self.rig.namespace.address, self.rig.webuiPort))
        self.addCleanup(proxy.close)
        # Requests through the proxy carry its address as Host, as behind any
        # reverse proxy that does not pass the Host header through.
        self.rig.setPreferences({"web_ui_host_header_validation_enabled": False})
        self.writeInPlace("40800")
        daemon = self.startDaemon(
            verifyInterval=2, baseURL=f"http://127.0.0.1:{proxy.port}"
        )
        self.waitForPort(40800)
        started = time.monotonic()
        writes = 0
        while time.monotonic() - started < seconds:
            self.rig.setPreferences({"listen_port": 40999})
            writes += 1
            time.sleep(1)
        status = self.status()
        busiest = proxy.busiestWindow()
        total = len(proxy.requests)
        print(
            f"\n  tug-of-war for {seconds:.0f} s ({writes} rival writes): "
            f"{total} requests, {total / seconds:.2f}/s on average, "
            f"at most {busiest} in 15 s ({busiest / 15:.2f}/s)",
            end=" ",
        )
        self.assertLessEqual(busiest, 7, proxy.requests)
        self.assertIs(status["contested"], True, status)
        self.assertIsNotNone(status["contested_since"])
        warnings = [
            line for line in daemon.output().splitlines() if "keeps changing" in line
        ]
        self.assertEqual(len(warnings), 1, daemon.output())
        self.assertIn("VPN_PORT_FORWARDING_UP_COMMAND", warnings[0])
