"""Tests for qbportsync.config: search order, every key's rules, secrets."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import qbportsync
from qbportsync.config import (
    Config,
    ConfigError,
    GluetunConfig,
    HooksConfig,
    ListenConfig,
    NetConfig,
    PortmapConfig,
    ProtonVPNConfig,
    QBittorrentConfig,
    checkTrusted,
    defaultForwardedPortPath,
    findConfig,
    loadConfig,
    searchPath,
)
from tests.rig import skipOrFail

EXAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "config", "config.example.toml"
)
RUNTIME = "/run/user/4242"
PORT_FILE = "/run/user/4242/Proton/VPN/forwarded_port"
ENV = {"XDG_RUNTIME_DIR": RUNTIME}
SECRET = "s3cret-hunter2"


class ConfigTestCase(SynchronousTestCase):
    """Helpers: write a config file in a temporary directory, load it."""

    def write(self, text: str | bytes, mode: int = 0o600) -> str:
        path = os.path.abspath(str(self.mktemp()))
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.chmod(path, mode)
        return path

    def load(self, text: str, environ: Mapping[str, str] = ENV) -> Config:
        return loadConfig(self.write(text), environ, uid=4242)

    def loadError(self, text: str, environ: Mapping[str, str] = ENV) -> str:
        path = self.write(text)
        error = self.assertRaises(ConfigError, loadConfig, path, environ, uid=4242)
        message = str(error)
        self.assertTrue(
            message.startswith(f"{path}: "), f"file not named in {message!r}"
        )
        return message


class SearchPathTests(SynchronousTestCase):
    """Which files are looked for, in which order."""

    def test_xdgConfigHomeFirstOnLinux(self) -> None:
        """An absolute $XDG_CONFIG_HOME replaces ~/.config, then /etc."""
        self.assertEqual(
            searchPath({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}, "linux"),
            ["/x/qb-port-sync/config.toml", "/etc/qb-port-sync/config.toml"],
        )

    def test_homeConfigWithoutXDG(self) -> None:
        """Without $XDG_CONFIG_HOME, the user file is under $HOME/.config."""
        self.assertEqual(
            searchPath({"HOME": "/h"}, "linux"),
            ["/h/.config/qb-port-sync/config.toml", "/etc/qb-port-sync/config.toml"],
        )

    def test_relativeXDGIgnored(self) -> None:
        """A relative $XDG_CONFIG_HOME is invalid per the XDG rules: use HOME."""
        self.assertEqual(
            searchPath({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}, "linux")[0],
            "/h/.config/qb-port-sync/config.toml",
        )

    def test_macOSLibrary(self) -> None:
        """On macOS, /Library/Application Support comes before /etc."""
        self.assertEqual(
            searchPath({"HOME": "/Users/u"}, "darwin"),
            [
                "/Users/u/.config/qb-port-sync/config.toml",
                "/Library/Application Support/qb-port-sync/config.toml",
                "/etc/qb-port-sync/config.toml",
            ],
        )

    def test_noHome(self) -> None:
        """A service without HOME or XDG_CONFIG_HOME only looks in /etc."""
        self.assertEqual(searchPath({}, "linux"), ["/etc/qb-port-sync/config.toml"])

    def test_findConfigFirstExisting(self) -> None:
        """findConfig returns the first candidate the check says exists."""
        self.assertEqual(findConfig(["a", "b", "c"], {"b", "c"}.__contains__), "b")
        self.assertIsNone(findConfig(["a"], set().__contains__))


class FindingTests(ConfigTestCase):
    """loadConfig reads the right file."""

    def place(self, path: str, username: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f'[qbittorrent]\nusername = "{username}"\n')

    def test_eachLocationWinsInTurn(self) -> None:
        """Every search location is read when those before it are missing."""
        root = os.path.abspath(self.mktemp())
        environ = {"XDG_CONFIG_HOME": f"{root}/xdg", "HOME": f"{root}/home"}
        search = [
            path if path.startswith(root) else root + path
            for path in searchPath(environ, "darwin")
        ]
        self.assertEqual(len(search), 3)
        for index, path in enumerate(search):
            self.place(path, f"user{index}")
        for index, path in enumerate(search):
            config = loadConfig(None, environ, uid=1, search=search)
            self.assertEqual(
                (config.path, config.qbittorrent.username), (path, f"user{index}")
            )
            os.remove(path)
        self.assertIsNone(loadConfig(None, environ, uid=1, search=search).path)

    def test_realSearchPathReadsXDGConfigHome(self) -> None:
        """Without --config, $XDG_CONFIG_HOME/qb-port-sync/config.toml is read."""
        root = os.path.abspath(self.mktemp())
        path = f"{root}/qb-port-sync/config.toml"
        self.place(path, "xdg")
        config = loadConfig(None, {"XDG_CONFIG_HOME": root}, uid=1)
        self.assertEqual((config.path, config.qbittorrent.username), (path, "xdg"))

    def test_realSearchPathReadsHomeConfig(self) -> None:
        """Without $XDG_CONFIG_HOME, ~/.config/qb-port-sync/config.toml is read."""
        home = os.path.abspath(self.mktemp())
        path = f"{home}/.config/qb-port-sync/config.toml"
        self.place(path, "home")
        config = loadConfig(None, {"HOME": home}, uid=1)
        self.assertEqual((config.path, config.qbittorrent.username), (path, "home"))

    def test_explicitPathWins(self) -> None:
        """--config is read even when a file in the search path exists."""
        root = os.path.abspath(self.mktemp())
        self.place(f"{root}/qb-port-sync/config.toml", "xdg")
        explicit = self.write('[qbittorrent]\nusername = "explicit"\n')
        config = loadConfig(explicit, {"XDG_CONFIG_HOME": root}, uid=1)
        self.assertEqual(config.qbittorrent.username, "explicit")
        self.assertEqual(config.path, explicit)

    def test_missingExplicitFile(self) -> None:
        """A --config file that does not exist is an error, not defaults."""
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, loadConfig, path, {}, search=[])
        self.assertEqual(str(error), f"{path}: no such file (given with --config)")

    def test_unreadableFoundFile(self) -> None:
        """A config path that exists but cannot be read is an error naming it."""
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        error = self.assertRaises(ConfigError, loadConfig, None, {}, search=[path])
        self.assertEqual(str(error), f"{path}: cannot read the file: Is a directory")

    def test_noFileGivesDefaults(self) -> None:
        """With no file anywhere, every default applies and path is None."""
        missing = os.path.abspath(self.mktemp())
        self.assertEqual(
            loadConfig(None, ENV, uid=4242, search=[missing]),
            Config(protonvpn=ProtonVPNConfig(forwarded_port_path=PORT_FILE)),
        )


class ExampleFileTests(SynchronousTestCase):
    """config/config.example.toml stays complete and loadable."""

    def test_loadsAsDefaults(self) -> None:
        """The example file loads, and every value in it is the default."""
        self.assertEqual(
            loadConfig(EXAMPLE, ENV, uid=4242),
            Config(
                path=EXAMPLE,
                protonvpn=ProtonVPNConfig(forwarded_port_path=PORT_FILE),
            ),
        )

    def test_everyKeyPresent(self) -> None:
        """The example file shows every section and key the loader accepts."""
        with open(EXAMPLE, "rb") as f:
            example = tomllib.load(f)
        self.assertEqual(
            {name: sorted(table) for name, table in example.items()},
            {
                "qbittorrent": sorted(
                    [
                        "base_url",
                        "username",
                        "password",
                        "password_file",
                        "api_key",
                        "ca_file",
                        "timeout_secs",
                        "verify_interval_secs",
                        "check_listener",
                    ]
                ),
                "protonvpn": ["forwarded_port_path"],
                "portmap": sorted(
                    [
                        "internal_port",
                        "protocol",
                        "lifetime_secs",
                        "refresh_secs",
                        "autodiscover_gateway",
                        "gateway",
                        "bind_address",
                        "release_on_exit",
                    ]
                ),
                "net": ["bind_interface"],
                "metrics": ["address", "enabled", "port"],
                "health": ["address", "enabled", "port"],
                "gluetun": sorted(
                    ["url", "api_key", "username", "password", "poll_interval_secs"]
                ),
                "hooks": ["hook_timeout_secs", "on_change"],
            },
        )


class ValueTests(ConfigTestCase):
    """Accepted values are converted and normalised."""

    def test_everyKeyRead(self) -> None:
        """Each key's value ends up in its record field."""
        caFile = self.write("CA")
        config = self.load(
            f"""
            [qbittorrent]
            base_url = "https://qb.example:8443/qbt/"
            username = "alice"
            ca_file = "{caFile}"
            timeout_secs = 5
            verify_interval_secs = 12.5
            check_listener = "10.2.0.2"
            [protonvpn]
            forwarded_port_path = "/tmp/gluetun/forwarded_port"
            [portmap]
            internal_port = 51413
            protocol = "udp"
            lifetime_secs = 120
            refresh_secs = 300
            autodiscover_gateway = false
            gateway = "10.2.0.1"
            bind_address = "10.2.0.2"
            release_on_exit = true
            [net]
            bind_interface = "wg0"
            [metrics]
            enabled = true
            port = 9000
            address = "::1"
            [health]
            enabled = true
            port = 9001
            address = "0.0.0.0"
            """.replace("\n            ", "\n")
        )
        self.assertEqual(
            (
                config.qbittorrent,
                config.protonvpn,
                config.portmap,
                config.net,
                config.metrics,
                config.health,
            ),
            (
                QBittorrentConfig(
                    base_url="https://qb.example:8443/qbt",
                    username="alice",
                    ca_file=caFile,
                    timeout_secs=5.0,
                    verify_interval_secs=12.5,
                    check_listener="10.2.0.2",
                ),
                ProtonVPNConfig("/tmp/gluetun/forwarded_port"),
                PortmapConfig(
                    internal_port=51413,
                    protocol="UDP",
                    lifetime_secs=120,
                    refresh_secs=300,
                    autodiscover_gateway=False,
                    gateway="10.2.0.1",
                    bind_address="10.2.0.2",
                    release_on_exit=True,
                ),
                NetConfig("wg0"),
                ListenConfig(enabled=True, port=9000, address="::1"),
                ListenConfig(enabled=True, port=9001, address="0.0.0.0"),
            ),
        )
        self.assertIsInstance(config.qbittorrent.timeout_secs, float)

    def test_baseURLForms(self) -> None:
        """IPv6 hosts and bare hosts work; trailing slashes are dropped."""
        for given_, expected in [
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("https://qb.example/", "https://qb.example"),
            ("http://127.0.0.1:8080/a/b//", "http://127.0.0.1:8080/a/b"),
        ]:
            config = self.load(f'[qbittorrent]\nbase_url = "{given_}"\n')
            self.assertEqual(config.qbittorrent.base_url, expected)

    def test_protocolCaseInsensitive(self) -> None:
        """protocol accepts any letter case and is stored in capitals."""
        config = self.load('[portmap]\nprotocol = "Both"\n')
        self.assertEqual(config.portmap.protocol, "BOTH")

    def test_lifetimeUpperBound(self) -> None:
        """lifetime_secs may be as large as the 32-bit wire field allows."""
        config = self.load(f"[portmap]\nlifetime_secs = {2**32 - 1}\n")
        self.assertEqual(config.portmap.lifetime_secs, 2**32 - 1)

    def test_healthPortZeroSharesMetrics(self) -> None:
        """Health port 0 is resolved to the metrics port and address."""
        config = self.load(
            '[metrics]\nenabled = true\nport = 9000\naddress = "0.0.0.0"\n'
            "[health]\nenabled = true\n"
        )
        self.assertEqual(
            config.health, ListenConfig(enabled=True, port=9000, address="0.0.0.0")
        )

    def test_metricsPortZeroNotServed(self) -> None:
        """metrics enabled with port 0 means "not served", as in the reference."""
        with capturedLogs() as events:
            config = self.load("[metrics]\nenabled = true\nport = 0\n")
        self.assertEqual(config.metrics, ListenConfig(enabled=False, port=0))
        self.assertIn(
            "metrics.enabled is true but metrics.port is 0: not serving it",
            formatEvent(events[-1]),
        )

    def test_healthServedWithoutMetrics(self) -> None:
        """With metrics not served, health on its own port still is."""
        config = self.load(
            "[metrics]\nenabled = true\nport = 0\n"
            "[health]\nenabled = true\nport = 9001\n"
        )
        self.assertEqual(config.metrics.enabled, False)
        self.assertEqual(config.health, ListenConfig(enabled=True, port=9001))

    def test_healthPortZeroWithMetricsPortOnly(self) -> None:
        """Health port 0 follows metrics.port even while metrics is disabled."""
        config = self.load("[metrics]\nport = 9100\n[health]\nenabled = true\n")
        self.assertEqual(config.health, ListenConfig(enabled=True, port=9100))

    def test_containerDefaults(self) -> None:
        """
        The image's environment makes the endpoints listen on every address
        and serves the health check on its port, with metrics off.
        """
        environ = {
            **ENV,
            "QB_PORT_SYNC_LISTEN_ADDRESS": "0.0.0.0",
            "QB_PORT_SYNC_HEALTH_PORT": "9000",
        }
        config = self.load("[metrics]\nenabled = true\nport = 9100\n", environ)
        self.assertEqual(
            (config.metrics, config.health),
            (
                ListenConfig(enabled=True, port=9100, address="0.0.0.0"),
                ListenConfig(enabled=True, port=9000, address="0.0.0.0"),
            ),
        )

    def test_fileBeatsContainerDefaults(self) -> None:
        """Keys the file sets win over the image's environment."""
        environ = {
            **ENV,
            "QB_PORT_SYNC_LISTEN_ADDRESS": "0.0.0.0",
            "QB_PORT_SYNC_HEALTH_PORT": "9000",
        }
        config = self.load(
            '[health]\nenabled = false\n[metrics]\naddress = "::1"\n', environ
        )
        self.assertEqual(config.health, ListenConfig(address="0.0.0.0"))
        self.assertEqual(config.metrics.address, "::1")

    def test_badContainerDefaults(self) -> None:
        """A wrong value in the environment is refused, naming the variable."""
        for name, value in (
            ("QB_PORT_SYNC_LISTEN_ADDRESS", "everywhere"),
            ("QB_PORT_SYNC_HEALTH_PORT", "70000"),
        ):
            error = self.assertRaises(
                ConfigError, loadConfig, None, {**ENV, name: value}, uid=4242, search=[]
            )
            self.assertIn(f"environment variable {name} must be", str(error))

    def test_disabledListenerKeepsPortZero(self) -> None:
        """Disabled metrics and health may keep port 0."""
        config = self.load("[metrics]\nenabled = false\n[health]\nport = 0\n")
        self.assertEqual((config.metrics, config.health), (ListenConfig(),) * 2)

    def test_caFileHomeExpanded(self) -> None:
        """ca_file starting with ~/ is read from HOME in the given environment."""
        home = os.path.abspath(self.mktemp())
        os.mkdir(home)
        with open(os.path.join(home, "ca.pem"), "w") as f:
            f.write("CA")
        config = self.load('[qbittorrent]\nca_file = "~/ca.pem"\n', {"HOME": home})
        self.assertEqual(config.qbittorrent.ca_file, os.path.join(home, "ca.pem"))

    def test_emptyFilesMeanNone(self) -> None:
        """Empty ca_file and password_file mean "not set", not the cwd."""
        config = self.load('[qbittorrent]\nca_file = ""\npassword_file = ""\n')
        self.assertEqual(
            (config.qbittorrent.ca_file, config.qbittorrent.password), (None, "")
        )


class ErrorTests(ConfigTestCase):
    """Each kind of mistake is refused with the file, key and what is allowed."""

    def test_wrongTypeMessage(self) -> None:
        """A wrong type names file, dotted key, the rule and the value."""
        path = self.write('[qbittorrent]\ntimeout_secs = "ten"\n')
        error = self.assertRaises(ConfigError, loadConfig, path, ENV, uid=1)
        self.assertEqual(
            str(error),
            f"{path}: qbittorrent.timeout_secs must be a positive number of "
            'seconds, got "ten"',
        )

    def test_unknownKey(self) -> None:
        """A misspelt key is refused, listing the keys that are allowed."""
        message = self.loadError('[qbittorrent]\nbaseurl = "http://h"\n')
        self.assertIn("unknown key qbittorrent.baseurl", message)
        self.assertIn("base_url, username, password", message)

    def test_unknownSection(self) -> None:
        """A misspelt section is refused, listing the sections allowed."""
        message = self.loadError('[qbitorrent]\nbase_url = "http://h"\n')
        self.assertIn("unknown section qbitorrent", message)
        self.assertIn("[qbittorrent], [protonvpn], [portmap]", message)

    def test_topLevelKey(self) -> None:
        """A key outside any section is refused."""
        message = self.loadError('base_url = "http://h"\n')
        self.assertIn("unknown top-level key base_url", message)

    def test_sectionNotATable(self) -> None:
        """A known section name used as a plain key is refused."""
        message = self.loadError("metrics = true\n")
        self.assertIn("metrics must be a table", message)

    def test_wrongTypes(self) -> None:
        """Strings, booleans and numbers are each checked."""
        for text, key in [
            ("[qbittorrent]\nusername = 1\n", "qbittorrent.username must be a string"),
            ('[portmap]\nrelease_on_exit = "yes"\n', "portmap.release_on_exit must"),
            ('[portmap]\ninternal_port = "80"\n', "portmap.internal_port must be"),
            ("[net]\nbind_interface = []\n", "net.bind_interface must be a string"),
            ("[protonvpn]\nforwarded_port_path = {}\n", "forwarded_port_path must"),
        ]:
            self.assertIn(key, self.loadError(text))

    def test_boolIsNotAnInteger(self) -> None:
        """true is refused where a port or a number of seconds is expected."""
        for text, key in [
            ("[portmap]\ninternal_port = true\n", "portmap.internal_port"),
            ("[metrics]\nport = false\n", "metrics.port"),
            ("[qbittorrent]\ntimeout_secs = true\n", "qbittorrent.timeout_secs"),
            ("[portmap]\nlifetime_secs = true\n", "portmap.lifetime_secs"),
        ]:
            self.assertIn(f"{key} must be", self.loadError(text))

    def test_portOutOfRange(self) -> None:
        """Ports outside 0..65535 are refused with the range."""
        message = self.loadError("[portmap]\ninternal_port = 65536\n")
        self.assertIn(
            "portmap.internal_port must be a whole number from 0 to 65535, got 65536",
            message,
        )

    @given(
        key=st.sampled_from(
            [("portmap", "internal_port"), ("metrics", "port"), ("health", "port")]
        ),
        port=st.integers(min_value=-(2**63), max_value=2**63 - 1).filter(
            lambda n: not 0 <= n <= 65535
        ),
    )
    def test_anyPortOutOfRange(self, key: tuple[str, str], port: int) -> None:
        """Any integer outside 0..65535 for any port key names that key."""
        section, name = key
        message = self.loadError(f"[{section}]\n{name} = {port}\n")
        self.assertIn(f"{section}.{name} must be a whole number", message)
        self.assertIn(f"got {port}", message)

    def test_healthPortZeroWithoutMetricsPort(self) -> None:
        """Health port 0 with no metrics port to share is refused."""
        message = self.loadError("[health]\nenabled = true\n")
        self.assertIn("health.port is 0, which means the metrics port", message)

    def test_sharedPortDifferentAddress(self) -> None:
        """Health sharing the metrics port must share its address too."""
        message = self.loadError(
            "[metrics]\nenabled = true\nport = 9000\n"
            '[health]\nenabled = true\naddress = "::1"\n'
        )
        self.assertIn(
            'health.address must equal metrics.address ("127.0.0.1")', message
        )

    def test_badSeconds(self) -> None:
        """Timeouts and intervals must be finite and above zero."""
        for value in ["0", "-1", "inf", "nan", "0.0"]:
            message = self.loadError(f"[qbittorrent]\nverify_interval_secs = {value}\n")
            self.assertIn(
                "qbittorrent.verify_interval_secs must be a positive number", message
            )

    def test_badWholeSeconds(self) -> None:
        """lifetime_secs and refresh_secs must be whole numbers in range."""
        for text in [
            "lifetime_secs = 0",
            f"lifetime_secs = {2**32}",
            "refresh_secs = 0",
            "refresh_secs = 1.5",
        ]:
            key = text.split(" ")[0]
            message = self.loadError(f"[portmap]\n{text}\n")
            self.assertIn(f"portmap.{key} must be a whole number from 1 to", message)

    def test_badURL(self) -> None:
        """base_url must be http(s) with a host, no query or fragment."""
        for url in [
            "ftp://qb.example",
            "http://",
            "127.0.0.1:8080",
            "qb.example",
            "http://h:99999",
            "http://h/?q=1",
            "http://h/#top",
            "http://h /x",
            "",
        ]:
            message = self.loadError(f'[qbittorrent]\nbase_url = "{url}"\n')
            self.assertIn(
                "qbittorrent.base_url must be an http:// or https:// URL", message
            )

    def test_badProtocol(self) -> None:
        """protocol is TCP, UDP or BOTH only."""
        message = self.loadError('[portmap]\nprotocol = "SCTP"\n')
        self.assertIn(
            'portmap.protocol must be "TCP", "UDP" or "BOTH", got "SCTP"', message
        )

    def test_badGatewayAddresses(self) -> None:
        """gateway and bind_address must be IPv4 literals when set."""
        for key, value in [
            ("gateway", "10.2.0"),
            ("gateway", "::1"),
            ("gateway", "vpn.example"),
            ("bind_address", "fe80::1"),
        ]:
            message = self.loadError(f'[portmap]\n{key} = "{value}"\n')
            self.assertIn(f"portmap.{key} must be empty or an IPv4 address", message)

    def test_badCheckListener(self) -> None:
        """check_listener is "auto", "off" or an IPv4 address."""
        for value in ["on", "", "::1", "wg0"]:
            message = self.loadError(f'[qbittorrent]\ncheck_listener = "{value}"\n')
            self.assertIn(
                'qbittorrent.check_listener must be "auto", "off" or an IPv4 address',
                message,
            )
        for value in ["auto", "off", "10.2.0.2"]:
            config = self.load(f'[qbittorrent]\ncheck_listener = "{value}"\n')
            self.assertEqual(config.qbittorrent.check_listener, value)

    def test_badListenAddress(self) -> None:
        """metrics and health addresses must be IP literals, never empty."""
        for section, value in [("metrics", "localhost"), ("health", "")]:
            message = self.loadError(f'[{section}]\naddress = "{value}"\n')
            self.assertIn(f"{section}.address must be an IPv4 or IPv6", message)

    def test_unreadablePasswordFile(self) -> None:
        """A password_file that cannot be read is refused, naming the path."""
        missing = os.path.abspath(self.mktemp())
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        for path, reason in [
            (missing, "No such file or directory"),
            (directory, "Is a directory"),
        ]:
            message = self.loadError(f'[qbittorrent]\npassword_file = "{path}"\n')
            self.assertIn(
                f"qbittorrent.password_file must name a readable file, "
                f"but {path}: {reason}",
                message,
            )

    def test_unreadableCAFile(self) -> None:
        """A ca_file that cannot be read is refused, naming the path."""
        missing = os.path.abspath(self.mktemp())
        message = self.loadError(f'[qbittorrent]\nca_file = "{missing}"\n')
        self.assertIn(
            f"qbittorrent.ca_file must name a readable file, but {missing}", message
        )

    def test_malformedTOML(self) -> None:
        """Broken TOML is reported with the line tomllib found it on."""
        message = self.loadError('[qbittorrent]\nusername = "a"\nbase_url = \n')
        self.assertIn("not valid TOML", message)
        self.assertIn("line 3", message)

    def test_notUTF8(self) -> None:
        """A file that is not UTF-8 is refused."""
        path = self.write(b'[net]\nbind_interface = "\xff"\n')
        error = self.assertRaises(ConfigError, loadConfig, path, ENV)
        self.assertEqual(str(error), f"{path}: not UTF-8 text, which TOML requires")


class PasswordTests(ConfigTestCase):
    """Where the password and API key come from."""

    def passwordFile(self, content: str) -> str:
        return self.write(content)

    def test_configWins(self) -> None:
        """A password in the file beats the environment and password_file."""
        pwFile = self.passwordFile("from-file\n")
        config = self.load(
            f'[qbittorrent]\npassword = "from-config"\npassword_file = "{pwFile}"\n',
            {"QB_PORT_SYNC_QB_PASSWORD": "from-env"},
        )
        self.assertEqual(config.qbittorrent.password, "from-config")
        self.assertIn("qbittorrent.password in ", config.qbittorrent.password_from)

    def test_environmentNext(self) -> None:
        """QB_PORT_SYNC_QB_PASSWORD beats password_file."""
        pwFile = self.passwordFile("from-file\n")
        config = self.load(
            f'[qbittorrent]\npassword = ""\npassword_file = "{pwFile}"\n',
            {"QB_PORT_SYNC_QB_PASSWORD": "from-env"},
        )
        self.assertEqual(config.qbittorrent.password, "from-env")
        self.assertEqual(config.qbittorrent.password_from, "$QB_PORT_SYNC_QB_PASSWORD")

    def test_environmentWithoutFile(self) -> None:
        """The environment variable works even when no config file exists."""
        config = loadConfig(
            None, {"QB_PORT_SYNC_QB_PASSWORD": "from-env"}, uid=1, search=[]
        )
        self.assertEqual(config.qbittorrent.password, "from-env")

    def test_passwordFileLast(self) -> None:
        """password_file is used when the others are empty, one newline dropped."""
        for content, expected in [
            ("from-file\n", "from-file"),
            ("from-file", "from-file"),
            ("from-file\r\n", "from-file"),
            ("two\n\n", "two\n"),
            (" spaced \n", " spaced "),
        ]:
            pwFile = self.passwordFile(content)
            config = self.load(
                f'[qbittorrent]\npassword_file = "{pwFile}"\n',
                {"QB_PORT_SYNC_QB_PASSWORD": ""},
            )
            self.assertEqual(config.qbittorrent.password, expected)
            self.assertEqual(
                config.qbittorrent.password_from,
                f"qbittorrent.password_file ({pwFile})",
            )

    def test_noPassword(self) -> None:
        """With no source at all the password is empty, and that is said."""
        qbittorrent = self.load("").qbittorrent
        self.assertEqual(qbittorrent.password, "")
        self.assertIn("no password set", qbittorrent.password_from)

    def test_apiKeyPrecedence(self) -> None:
        """api_key in the file beats QB_PORT_SYNC_QB_API_KEY, which is the fallback."""
        environ = {"QB_PORT_SYNC_QB_API_KEY": "qbt_env"}
        self.assertEqual(
            self.load(
                '[qbittorrent]\napi_key = "qbt_file"\n', environ
            ).qbittorrent.api_key,
            "qbt_file",
        )
        self.assertEqual(self.load("", environ).qbittorrent.api_key, "qbt_env")

    def test_reprHidesSecrets(self) -> None:
        """The loaded record's repr shows neither password nor API key."""
        config = self.load(
            f'[qbittorrent]\npassword = "{SECRET}"\napi_key = "{SECRET}k"\n'
        )
        self.assertNotIn(SECRET, repr(config))


class ForwardedPathTests(ConfigTestCase):
    """Where the ProtonVPN port file is looked for."""

    def test_xdgRuntimeDir(self) -> None:
        """Empty forwarded_port_path uses $XDG_RUNTIME_DIR."""
        config = self.load(
            '[protonvpn]\nforwarded_port_path = ""\n',
            {"XDG_RUNTIME_DIR": "/run/user/1000"},
        )
        self.assertEqual(
            config.protonvpn.forwarded_port_path,
            "/run/user/1000/Proton/VPN/forwarded_port",
        )

    def test_uidWithoutXDG(self) -> None:
        """Without $XDG_RUNTIME_DIR, /run/user/<uid> is used."""
        config = loadConfig(self.write(""), {"XDG_RUNTIME_DIR": ""}, uid=977)
        self.assertEqual(
            config.protonvpn.forwarded_port_path,
            "/run/user/977/Proton/VPN/forwarded_port",
        )

    def test_defaultUidIsOwn(self) -> None:
        """Without an injected uid, the process's own uid is used."""
        self.assertEqual(
            defaultForwardedPortPath({}, os.getuid()),
            f"/run/user/{os.getuid()}/Proton/VPN/forwarded_port",
        )
        config = loadConfig(None, {}, search=[])
        self.assertEqual(
            config.protonvpn.forwarded_port_path,
            defaultForwardedPortPath({}, os.getuid()),
        )

    def test_tildeExpanded(self) -> None:
        """~/ in forwarded_port_path is the HOME of the given environment."""
        config = self.load(
            '[protonvpn]\nforwarded_port_path = "~/vpn/port"\n', {"HOME": "/home/q"}
        )
        self.assertEqual(config.protonvpn.forwarded_port_path, "/home/q/vpn/port")

    def test_explicitPathKept(self) -> None:
        """An absolute forwarded_port_path is used as written."""
        config = self.load(
            '[protonvpn]\nforwarded_port_path = "/tmp/gluetun/forwarded_port"\n'
        )
        self.assertEqual(
            config.protonvpn.forwarded_port_path, "/tmp/gluetun/forwarded_port"
        )


class PermissionWarningTests(ConfigTestCase):
    """Secrets that other users can read are warned about, not refused."""

    def warnings(self, events: Sequence[LogEvent]) -> list[str]:
        return [
            formatEvent(event)
            for event in events
            if event.get("log_namespace") == "qbportsync.config"
        ]

    def test_sharedConfigWithPassword(self) -> None:
        """A config file holding a password with mode 0644 gives one warning."""
        path = self.write(f'[qbittorrent]\npassword = "{SECRET}"\n', mode=0o644)
        with capturedLogs() as events:
            loadConfig(path, ENV, uid=1)
        self.assertEqual(
            self.warnings(events),
            [
                f"{path} holds a password or API key but other users can read it "
                f"(mode 0644); fix it with: chmod 600 {path}"
            ],
        )
        self.assertEqual(events[-1]["log_level"].name, "warn")

    def test_sharedConfigWithAPIKey(self) -> None:
        """An API key counts as a secret too; group access is enough to warn."""
        path = self.write('[qbittorrent]\napi_key = "qbt_x"\n', mode=0o640)
        with capturedLogs() as events:
            loadConfig(path, ENV, uid=1)
        self.assertEqual(len(self.warnings(events)), 1)

    def test_privateConfig(self) -> None:
        """Mode 0600 gives no warning."""
        path = self.write(f'[qbittorrent]\npassword = "{SECRET}"\n', mode=0o600)
        with capturedLogs() as events:
            loadConfig(path, ENV, uid=1)
        self.assertEqual(self.warnings(events), [])

    def test_sharedConfigWithoutSecret(self) -> None:
        """A world-readable config without a password is fine."""
        path = self.write('[qbittorrent]\nusername = "bob"\n', mode=0o644)
        with capturedLogs() as events:
            loadConfig(path, ENV, uid=1)
        self.assertEqual(self.warnings(events), [])

    def test_sharedPasswordFile(self) -> None:
        """A password_file readable by others is warned about, by its path."""
        pwFile = self.write(f"{SECRET}\n", mode=0o644)
        path = self.write(f'[qbittorrent]\npassword_file = "{pwFile}"\n')
        with capturedLogs() as events:
            config = loadConfig(path, ENV, uid=1)
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"{pwFile} holds a password", warnings[0])
        self.assertIn(f"chmod 600 {pwFile}", warnings[0])
        self.assertNotIn(SECRET, warnings[0])
        self.assertEqual(config.qbittorrent.password, SECRET)


class SecretLeakTests(ConfigTestCase):
    """No error message ever repeats a password or API key."""

    def test_errorsNeverEchoSecrets(self) -> None:
        """Errors near or about the secrets do not contain them."""
        for text in [
            f'[qbittorrent]\npassword = "{SECRET}"\ntimeout_secs = "x"\n',
            f'[qbittorrent]\npasswd = "{SECRET}"\n',
            f'[qbittorrent]\npassword = "{SECRET}\n',
            f"[qbittorrent]\npassword = {SECRET}\n",
            f'[qbittorrent]\napi_key = "{SECRET}\nusername = 1\n',
            f'[qbittorrent]\nbase_url = "http://admin:{SECRET}@qb.example"\n',
            f'[qbittorrent]\nbase_url = "http://admin:{SECRET}@qb.example:99999"\n',
            f'[qbittorrent]\npassword = "{SECRET}"\n[qbittorrent]\n',
            f'password = "{SECRET}"\n',
            f'[qbittorrent]\nbase_url = "http://qb.example/?token={SECRET}"\n',
            f'[qbittorrent]\nbase_url = "http://qb.example/#{SECRET}"\n',
            f'[qbittorrent]\nbase_url = "http://u:{SECRET}@qb.example:1/?{SECRET}"\n',
            f'[qbittorrent]\nbase_url = "http://u:{SECRET}/x@[::1"\n',
            f'[gluetun]\nurl = "http://127.0.0.1:8000/?apikey={SECRET}"\n',
        ]:
            self.assertNotIn(SECRET, self.loadError(text), text)

    def test_badURLShownRedacted(self) -> None:
        """A refused URL is shown with its credentials and query hidden."""
        message = self.loadError(
            f'[qbittorrent]\nbase_url = "https://qb.example/x?apikey={SECRET}"\n'
        )
        self.assertIn(
            "qbittorrent.base_url must be an http:// or https:// URL with a host "
            'and no query or fragment, such as "http://127.0.0.1:8080", '
            'got "https://qb.example/x?***"',
            message,
        )
        message = self.loadError(
            f'[qbittorrent]\nbase_url = "http://admin:{SECRET}@qb.example"\n'
        )
        self.assertIn(
            "qbittorrent.base_url must not carry a user name or password, "
            'got "http://***@qb.example"; use qbittorrent.username and '
            "qbittorrent.password",
            message,
        )

    def test_wrongTypeSecretShowsOnlyType(self) -> None:
        """A password of the wrong type is described by its type, not value."""
        message = self.loadError("[qbittorrent]\npassword = 8675309\n")
        self.assertNotIn("8675309", message)
        self.assertIn("qbittorrent.password must be a string, got an integer", message)
        message = self.loadError("[qbittorrent]\napi_key = [1234567]\n")
        self.assertNotIn("1234567", message)
        self.assertIn("got an array", message)

    def test_undecodablePasswordFile(self) -> None:
        """A password file that is not UTF-8 is refused without its content."""
        pwFile = self.write(b"\xff" + SECRET.encode())
        message = self.loadError(f'[qbittorrent]\npassword_file = "{pwFile}"\n')
        self.assertIn("qbittorrent.password_file must name a UTF-8 text file", message)
        self.assertNotIn(SECRET, message)


class GluetunConfigTests(ConfigTestCase):
    """The [gluetun] section: URL, credentials from file or environment."""

    def test_everyKeyRead(self) -> None:
        """Each [gluetun] key ends up in its field, the URL normalised."""
        config = self.load(
            "[gluetun]\n"
            'url = "http://127.0.0.1:8000/"\n'
            f'api_key = "{SECRET}"\n'
            'username = "bob"\n'
            f'password = "{SECRET}2"\n'
            "poll_interval_secs = 2.5\n"
        )
        self.assertEqual(
            config.gluetun,
            GluetunConfig(
                url="http://127.0.0.1:8000",
                api_key=SECRET,
                username="bob",
                password=f"{SECRET}2",
                poll_interval_secs=2.5,
            ),
        )
        self.assertNotIn(SECRET, repr(config))

    def test_environment(self) -> None:
        """Empty secrets come from QB_PORT_SYNC_GLUETUN_API_KEY / _PASSWORD."""
        config = self.load(
            '[gluetun]\nurl = "http://gluetun:8000"\n',
            {
                **ENV,
                "QB_PORT_SYNC_GLUETUN_API_KEY": "k",
                "QB_PORT_SYNC_GLUETUN_PASSWORD": "p",
            },
        )
        self.assertEqual((config.gluetun.api_key, config.gluetun.password), ("k", "p"))

    def test_badURL(self) -> None:
        """A URL with credentials is refused without echoing them."""
        message = self.loadError(
            f'[gluetun]\nurl = "http://u:{SECRET}@127.0.0.1:8000"\n'
        )
        self.assertIn("gluetun.url must not carry a user name or password", message)
        self.assertIn("use gluetun.username and gluetun.password", message)
        self.assertNotIn(SECRET, message)
        message = self.loadError('[gluetun]\nurl = "ftp://x"\n')
        self.assertIn("gluetun.url must be an http:// or https:// URL", message)

    def test_badPollInterval(self) -> None:
        """poll_interval_secs must be a positive number."""
        message = self.loadError("[gluetun]\npoll_interval_secs = 0\n")
        self.assertIn("gluetun.poll_interval_secs must be a positive number", message)


class HooksConfigTests(ConfigTestCase):
    """The [hooks] section: the program must exist and be executable."""

    def executable(self, name: str = "hook", mode: int = 0o755) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, mode)
        return path

    def test_absoluteProgram(self) -> None:
        """An absolute executable path is kept with its arguments."""
        hook = self.executable()
        config = self.load(
            f'[hooks]\non_change = ["{hook}", "{{port}}", "--x"]\n'
            "hook_timeout_secs = 5\n"
        )
        self.assertEqual(
            config.hooks,
            HooksConfig(on_change=(hook, "{port}", "--x"), hook_timeout_secs=5.0),
        )

    def test_programFromPath(self) -> None:
        """A bare name is looked up in $PATH and stored as an absolute path."""
        hook = self.executable("open-port")
        config = self.load(
            '[hooks]\non_change = ["open-port", "{port}"]\n',
            {**ENV, "PATH": os.path.dirname(hook)},
        )
        self.assertEqual(config.hooks.on_change, (hook, "{port}"))

    def test_missingProgram(self) -> None:
        """A program that does not exist is a config error naming it."""
        missing = os.path.abspath(self.mktemp())
        message = self.loadError(f'[hooks]\non_change = ["{missing}"]\n')
        self.assertIn(
            f"hooks.on_change names {missing}, which is not an executable", message
        )
        message = self.loadError(
            '[hooks]\non_change = ["no-such-hook-program"]\n',
            {**ENV, "PATH": "/nonexistent"},
        )
        self.assertIn("no-such-hook-program, which is not a program in $PATH", message)

    def test_notExecutable(self) -> None:
        """A file without execute permission is refused, with the chmod fix."""
        hook = self.executable(mode=0o644)
        message = self.loadError(f'[hooks]\non_change = ["{hook}"]\n')
        self.assertIn(f"chmod +x {hook}", message)

    def test_wrongShape(self) -> None:
        """on_change must be an array of strings starting with a program."""
        for text in ['on_change = "/bin/true"', "on_change = [1]", 'on_change = [""]']:
            message = self.loadError(f"[hooks]\n{text}\n")
            self.assertIn("hooks.on_change must", message)


_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(qbportsync.__file__)))
"""The package under test, wherever this test imported it from."""
NOBODY = 65534
"""Another user: what root's tests give files to, to play someone else."""


class IntegrityTests(ConfigTestCase):
    """
    Files that someone other than root or us could change are refused, as
    OpenSSH refuses them: real files and directories, with real owners.
    """

    def directory(self, mode: int = 0o755, owner: int = 0) -> str:
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        os.chmod(path, mode)
        os.chown(path, owner, -1)
        return path

    def place(
        self, directory: str, name: str, text: str, mode: int = 0o600, owner: int = 0
    ) -> str:
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        os.chown(path, owner, -1)
        return path

    def refused(self, path: str, uid: int = 4242) -> str:
        message = str(self.assertRaises(ConfigError, loadConfig, path, ENV, uid=uid))
        self.assertTrue(message.startswith(f"{path}: other users could change it: "))
        return message

    def test_worldWritableConfig(self) -> None:
        """A config file anyone can write is refused with the chmod that fixes it."""
        path = self.place(self.directory(), "config.toml", "", mode=0o666)
        self.assertEqual(
            self.refused(path),
            f"{path}: other users could change it: {path} is writable by all "
            f"users (mode 0666), not only by its owner; fix it with: "
            f"chmod go-w {path}",
        )

    def test_groupWritableConfig(self) -> None:
        """Write access for a group of ordinary users is enough to refuse."""
        path = self.place(self.directory(), "config.toml", "", mode=0o620)
        os.chown(path, -1, NOBODY)
        group = grp.getgrgid(NOBODY).gr_name
        self.assertIn(
            f"is writable by its group {group} (mode 0620)", self.refused(path)
        )

    def test_adminGroupMayWrite(self) -> None:
        """Root's group (and macOS's admin) writing is root writing."""
        path = self.place(self.directory(mode=0o775), "config.toml", "", mode=0o660)
        self.assertEqual(checkTrusted(path, 4242), None)
        os.chown(path, -1, NOBODY)
        self.assertIn("its group", checkTrusted(path, 4242) or "")
        self.assertEqual(checkTrusted(path, 4242, frozenset({0, NOBODY})), None)

    def test_foreignOwner(self) -> None:
        """A config file of another user is refused with the chown that fixes it."""
        path = self.place(self.directory(), "config.toml", "", owner=NOBODY)
        self.assertEqual(
            self.refused(path),
            f"{path}: other users could change it: {path} belongs to uid 65534 "
            "(nobody), not to root or uid 4242; fix it with: chown root "
            f"{path}",
        )

    def test_ownFileOfTheRunningUser(self) -> None:
        """The user running qbportsync may own its files and directories."""
        directory = self.directory(owner=NOBODY)
        path = self.place(directory, "config.toml", "[qbittorrent]\n", owner=NOBODY)
        self.assertEqual(loadConfig(path, ENV, uid=NOBODY).path, path)

    def test_writableDirectoryAbove(self) -> None:
        """A directory above it that others can write is named, with its fix."""
        outer = self.directory(mode=0o777)
        inner = os.path.join(outer, "qb-port-sync")
        os.mkdir(inner, 0o755)
        path = self.place(inner, "config.toml", "")
        message = self.refused(path)
        self.assertIn(f"{outer} is writable by all users (mode 0777)", message)
        self.assertTrue(message.endswith(f"fix it with: chmod go-w {outer}"), message)

    def test_foreignDirectoryAbove(self) -> None:
        """A directory above it that another user owns is refused."""
        outer = self.directory(owner=NOBODY)
        path = self.place(outer, "config.toml", "")
        self.assertIn(f"{outer} belongs to uid 65534", self.refused(path))

    def test_stickyDirectory(self) -> None:
        """In a sticky directory (like /tmp) our own file is accepted."""
        sticky = self.directory(mode=0o1777)
        path = self.place(sticky, "config.toml", "[qbittorrent]\n")
        self.assertEqual(loadConfig(path, ENV, uid=4242).path, path)

    def test_stickyDirectoryForeignFile(self) -> None:
        """In a sticky directory a file of another user is still refused."""
        sticky = self.directory(mode=0o1777)
        path = self.place(sticky, "config.toml", "", owner=NOBODY)
        self.assertIn(f"fix it with: chown root {path}", self.refused(path))

    def test_foreignSymlink(self) -> None:
        """A link of another user in a sticky directory could be re-pointed."""
        good = self.place(self.directory(), "config.toml", "")
        link = os.path.join(self.directory(mode=0o1777), "config.toml")
        os.symlink(good, link)
        os.lchown(link, NOBODY, -1)
        self.assertIn(f"{link} belongs to uid 65534", self.refused(link))

    def test_symlinkIntoWritableDirectory(self) -> None:
        """Through a good link, the real file's directories are checked too."""
        writable = self.directory(mode=0o777)
        target = self.place(writable, "config.toml", "")
        link = os.path.join(self.directory(), "config.toml")
        os.symlink(target, link)
        self.assertIn(
            f"fix it with: chmod go-w {os.path.realpath(writable)}", self.refused(link)
        )

    def test_secretFiles(self) -> None:
        """password_file, ca_file and the hook program are held to the same rule."""
        writable = self.directory(mode=0o777)
        password = self.place(writable, "password", SECRET)
        ca = self.place(self.directory(), "ca.pem", "", owner=NOBODY)
        hook = self.place(self.directory(), "hook", "#!/bin/sh\n", mode=0o757)
        for key, value, problem in [
            ("qbittorrent.password_file", password, f"chmod go-w {writable}"),
            ("qbittorrent.ca_file", ca, f"chown root {ca}"),
            ("hooks.on_change", [hook], f"chmod go-w {hook}"),
        ]:
            section, name = key.split(".")
            message = self.loadError(f"[{section}]\n{name} = {json.dumps(value)}\n")
            self.assertIn(
                f"{key} names {value[0] if isinstance(value, list) else value}, "
                "which other users could change: ",
                message,
            )
            self.assertTrue(message.endswith(problem), message)
            self.assertNotIn(SECRET, message)

    def test_readOnlyMount(self) -> None:
        """
        A file on a read-only mount (a container's :ro volume, owned by a
        user of the host) is accepted: no one here can change it.
        """
        unshare = shutil.which("unshare")
        if unshare is None:
            skipOrFail("unshare (util-linux) is needed for a private mount")
        directory = self.directory(owner=NOBODY)
        path = self.place(directory, "config.toml", "[qbittorrent]\n", 0o666, NOBODY)
        load = (
            "from qbportsync.config import loadConfig; "
            f"print(loadConfig({path!r}, {{}}, uid=4242).path)"
        )
        self.refused(path)
        result = subprocess.run(
            [
                unshare,
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-euc",
                'mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; '
                'exec "$2" -c "$3"',
                "sh",
                directory,
                sys.executable,
                load,
            ],
            env={**os.environ, "PYTHONPATH": _SOURCE},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.returncode, result.stdout), (0, f"{path}\n"), result)

    def test_exitCode(self) -> None:
        """The daemon refuses to start with exit status 2, naming the fix."""
        path = self.place(self.directory(), "config.toml", "", mode=0o646)
        result = subprocess.run(
            [sys.executable, "-m", "qbportsync", "--once", "--config", path],
            env={**os.environ, "PYTHONPATH": _SOURCE},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(f"{path} is writable by all users (mode 0646)", result.stderr)
        self.assertIn(f"fix it with: chmod go-w {path}", result.stderr)
