"""
The real daemon and one-shot (C{python -m qbportsync}) reading the gluetun
emulation (L{tests.fakegluetun}, a subprocess on 127.0.0.1) and applying
its port to a real qbittorrent-nox, with the on-change hook a real script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from twisted.trial.unittest import SynchronousTestCase

import qbportsync
from tests.rig import (
    QBittorrentRig,
    checkoutEnvironment,
    requireQBittorrent,
    stopProcess,
    waitFor,
)

API_KEY = "gluetun-Integration-Key-5150"
BASIC_USER = "bob"
BASIC_PASSWORD = "gluetun-Integration-Pass-6160"
PASSWORD_ENV = "QB_PORT_SYNC_QB_PASSWORD"
KEY_ENV = "QB_PORT_SYNC_GLUETUN_API_KEY"
GLUETUN_PASSWORD_ENV = "QB_PORT_SYNC_GLUETUN_PASSWORD"
ROOT = Path(qbportsync.__file__).parent.parent


class Gluetun:
    """The emulation as a subprocess; L{setPort} changes what it forwards."""

    def __init__(
        self,
        test: SynchronousTestCase,
        port: int,
        old: bool = False,
        basic: bool = False,
    ):
        """With C{basic}, user and password instead of the API key."""
        auth = ["", BASIC_USER, BASIC_PASSWORD] if basic else [API_KEY, "", ""]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakegluetun",
                str(port),
                *auth,
                *(["old"] if old else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=checkoutEnvironment(PYTHONUNBUFFERED="1"),
            cwd=ROOT,
        )
        test.addCleanup(stopProcess, self.process)
        assert self.process.stdout is not None
        ports = {}
        for _ in range(2):
            line = self.process.stdout.readline().decode().split()
            if len(line) != 2:
                raise AssertionError(f"fakegluetun said {line!r}")
            ports[line[0]] = int(line[1])
        self.url = f"http://127.0.0.1:{ports['listening']}"
        self._control = f"http://127.0.0.1:{ports['control']}/_test/port"

    def setPort(self, port: int) -> None:
        request = urllib.request.Request(
            self._control, data=str(port).encode(), method="PUT"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()


class GluetunIntegrationTests(SynchronousTestCase):
    """gluetun's port reaches a real qBittorrent; the hook sees each change."""

    def setUp(self) -> None:
        requireQBittorrent()
        self.rig = QBittorrentRig()
        self.addCleanup(self.rig.close)
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.hookOutput = self.directory / "hook.out"
        self.hook = self.directory / "hook.sh"
        self.hook.write_text(
            "#!/bin/sh\n"
            f'echo "$*|$QBPORTSYNC_PORT|$QBPORTSYNC_PREVIOUS_PORT|'
            f'$QBPORTSYNC_STRATEGY|$QB_PORT_SYNC_QB_PASSWORD" >> "{self.hookOutput}"\n'
            'echo "hook saw $1"\n'
        )
        self.hook.chmod(0o755)
        self.outputs: list[Path] = []

    def config(
        self, gluetun: Gluetun, pollInterval: float = 0.25, username: str = ""
    ) -> Path:
        path = self.directory / "config.toml"
        path.write_text(
            "[qbittorrent]\n"
            f'base_url = "{self.rig.baseURL}"\n'
            f'username = "{self.rig.username}"\n'
            "[gluetun]\n"
            f'url = "{gluetun.url}"\n'
            f'username = "{username}"\n'
            f"poll_interval_secs = {pollInterval}\n"
            "[hooks]\n"
            f'on_change = ["{self.hook}", "{{port}}", "{{previous_port}}"]\n'
        )
        path.chmod(0o600)
        return path

    def spawn(
        self, argv: list[str], key: str = API_KEY, password: str = ""
    ) -> subprocess.Popen[bytes]:
        output = self.directory / f"run-{len(self.outputs)}.out"
        self.outputs.append(output)
        out: IO[bytes]
        with open(output, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "qbportsync", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=checkoutEnvironment(
                    PYTHONUNBUFFERED="1",
                    **{
                        PASSWORD_ENV: self.rig.password,
                        KEY_ENV: key,
                        GLUETUN_PASSWORD_ENV: password,
                        "STATE_DIRECTORY": str(self.directory / "state"),
                    },
                ),
                cwd=self.directory,
            )
        self.addCleanup(stopProcess, process)
        self.addCleanup(self.assertNoSecrets, output)
        return process

    def assertNoSecrets(self, output: Path) -> None:
        text = output.read_text(errors="replace")
        self.assertNotIn(API_KEY, text)
        self.assertNotIn(BASIC_PASSWORD, text)
        self.assertNotIn(self.rig.password, text)

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.outputs)

    def hookLines(self) -> list[str]:
        if not self.hookOutput.exists():
            return []
        return self.hookOutput.read_text().splitlines()

    def waitForPort(self, port: int, timeout: float = 10.0) -> float:
        try:
            return waitFor(
                lambda: self.rig.listenPort() == port,
                f"qBittorrent to report {port}",
                timeout,
                interval=0.01,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.output()}") from None

    def test_daemonFollowsGluetun(self) -> None:
        """
        The daemon applies gluetun's port, then each new one within a poll
        interval; the hook runs for each change with the previous port, and
        never sees our password.
        """
        gluetun = Gluetun(self, 45000)
        self.spawn(["--config", str(self.config(gluetun)), "--strategy", "gluetun"])
        self.waitForPort(45000)
        latencies = []
        for port in (45001, 45002, 45003):
            gluetun.setPort(port)
            started = time.monotonic()
            self.waitForPort(port)
            latencies.append(time.monotonic() - started)
        waitFor(lambda: len(self.hookLines()) == 4, "four hook runs", 5)
        self.assertEqual(
            self.hookLines(),
            [
                "45000 6881|45000|6881|gluetun|",
                "45001 45000|45001|45000|gluetun|",
                "45002 45001|45002|45001|gluetun|",
                "45003 45002|45003|45002|gluetun|",
            ],
        )
        waitFor(
            lambda: "hook saw 45003" in self.output(), "the hook's output logged", 5
        )
        # Polled every 0.25 s: each change lands within a poll and an update.
        self.assertLess(max(latencies), 1.5, latencies)

    def test_oldGluetunChosenByAuto(self) -> None:
        """
        auto picks gluetun when [gluetun] url is set; a gluetun without
        /v1/portforward is read on the old route.
        """
        gluetun = Gluetun(self, 45100, old=True)
        config = str(self.config(gluetun))
        code = self.spawn(["--once", "--json", "--config", config]).wait(30)
        self.assertEqual(code, 0, self.output())
        [line] = [
            line
            for line in self.outputs[0].read_text().splitlines()
            if line.startswith("{")
        ]
        result = json.loads(line)
        self.assertEqual(
            (result["strategy"], result["detected_port"], result["verified"]),
            ("gluetun", 45100, True),
        )
        self.assertIn("auto chose gluetun's control server", result["note"])
        self.assertEqual(self.rig.listenPort(), 45100)
        self.assertEqual(self.hookLines(), ["45100 6881|45100|6881|gluetun|"])

    def test_basicAuth(self) -> None:
        """
        gluetun with auth = "basic": the daemon authenticates with the user
        from the config and the password from QB_PORT_SYNC_GLUETUN_PASSWORD.
        """
        gluetun = Gluetun(self, 45300, basic=True)
        config = self.config(gluetun, username=BASIC_USER)
        self.spawn(
            ["--config", str(config), "--strategy", "gluetun"],
            key="",
            password=BASIC_PASSWORD,
        )
        self.waitForPort(45300)

    def test_wrongKey(self) -> None:
        """
        A wrong API key: the one-shot exits 1 (auth) naming [gluetun] api_key; the
        daemon says so, and qBittorrent keeps its port.
        """
        gluetun = Gluetun(self, 45200)
        config = str(self.config(gluetun))
        process = self.spawn(
            ["--once", "--json", "--strategy", "gluetun", "--config", config],
            key="wrong-key",
        )
        self.assertEqual(process.wait(30), 1, self.output())
        [line] = [
            line
            for line in self.outputs[0].read_text().splitlines()
            if line.startswith("{")
        ]
        result = json.loads(line)
        self.assertIn(
            "refused the API key ([gluetun] api_key) (HTTP 401)", result["note"]
        )
        self.spawn(["--config", config, "--strategy", "gluetun"], key="wrong-key")
        waitFor(
            lambda: "refused the API key" in self.outputs[1].read_text(),
            "the daemon to report the refusal",
            10,
        )
        self.assertEqual(self.rig.listenPort(), 6881)
        self.assertEqual(self.hookLines(), [])
