"""Configuration: TOML file, environment and defaults, as frozen records.

`loadConfig` is the one entry point: it finds the file (`searchPath`), parses
it with `tomllib`, checks every key, resolves the password and the port file
path, and returns a `Config`.  Anything wrong raises `ConfigError`, whose
message names the file, the dotted key and what is allowed, and never carries
a password or API key.  Secrets readable by other users are not an error:
they are logged as warnings through `twisted.logger` and loading goes on.
Files that other users could change are an error, as OpenSSH holds them:
the configuration, the password, CA and hook files, and every directory
above them, must be owned by root or by the user running qbportsync and
writable by their owner only (`checkTrusted`).
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import math
import os
import pwd
import shutil
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

from attrs import field, frozen
from twisted.logger import Logger

from qbportsync.urls import redact

_log = Logger()

Protocol = Literal["TCP", "UDP", "BOTH"]

APP_DIR = "qb-port-sync"
CONFIG_NAME = "config.toml"
PASSWORD_ENV = "QB_PORT_SYNC_QB_PASSWORD"  # noqa: S105 -- a variable name
API_KEY_ENV = "QB_PORT_SYNC_QB_API_KEY"
GLUETUN_PASSWORD_ENV = "QB_PORT_SYNC_GLUETUN_PASSWORD"  # noqa: S105 -- a name
GLUETUN_API_KEY_ENV = "QB_PORT_SYNC_GLUETUN_API_KEY"
LISTEN_ADDRESS_ENV = "QB_PORT_SYNC_LISTEN_ADDRESS"
"""Default [metrics] and [health] address; the container image sets 0.0.0.0."""
HEALTH_PORT_ENV = "QB_PORT_SYNC_HEALTH_PORT"
"""Serve the health check on this port unless [health] says otherwise."""
_MAX_LIFETIME = 2**32 - 1
_NO_FILE = "(no configuration file)"


class ConfigError(Exception):
    """The configuration is unusable; the message names the file and key."""


@frozen
class QBittorrentConfig:
    base_url: str = "http://127.0.0.1:8080"
    username: str = "admin"
    password: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    password_from: str = field(default="", eq=False)
    """Where the password came from, for messages: a key, variable or file."""
    ca_file: str | None = None
    timeout_secs: float = 10.0
    verify_interval_secs: float = 30.0
    check_listener: str = "auto"
    """"auto", "off", or the IPv4 address to connect to qBittorrent's port on."""


@frozen
class ProtonVPNConfig:
    forwarded_port_path: str = ""
    """Already resolved: never empty after loading."""


@frozen
class PortmapConfig:
    internal_port: int = 0
    protocol: Protocol = "BOTH"
    lifetime_secs: int = 60
    refresh_secs: int = 45
    autodiscover_gateway: bool = True
    gateway: str = ""
    bind_address: str = ""
    release_on_exit: bool = False


@frozen
class NetConfig:
    bind_interface: str = ""


@frozen
class ListenConfig:
    enabled: bool = False
    port: int = 0
    address: str = "127.0.0.1"


@frozen
class GluetunConfig:
    url: str = ""
    """gluetun's control server; empty: C{auto} does not consider gluetun."""
    api_key: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    poll_interval_secs: float = 10.0


@frozen
class HooksConfig:
    on_change: tuple[str, ...] = ()
    """The program (an absolute path once loaded) and its arguments."""
    hook_timeout_secs: float = 30.0


@frozen
class Config:
    path: str | None = None
    qbittorrent: QBittorrentConfig = QBittorrentConfig()
    protonvpn: ProtonVPNConfig = ProtonVPNConfig()
    portmap: PortmapConfig = PortmapConfig()
    net: NetConfig = NetConfig()
    metrics: ListenConfig = ListenConfig()
    health: ListenConfig = ListenConfig()
    gluetun: GluetunConfig = GluetunConfig()
    hooks: HooksConfig = HooksConfig()


_KEYS: dict[str, tuple[str, ...]] = {
    "qbittorrent": (
        "base_url",
        "username",
        "password",
        "password_file",
        "api_key",
        "ca_file",
        "timeout_secs",
        "verify_interval_secs",
        "check_listener",
    ),
    "protonvpn": ("forwarded_port_path",),
    "portmap": (
        "internal_port",
        "protocol",
        "lifetime_secs",
        "refresh_secs",
        "autodiscover_gateway",
        "gateway",
        "bind_address",
        "release_on_exit",
    ),
    "net": ("bind_interface",),
    "metrics": ("enabled", "port", "address"),
    "health": ("enabled", "port", "address"),
    "gluetun": ("url", "api_key", "username", "password", "poll_interval_secs"),
    "hooks": ("on_change", "hook_timeout_secs"),
}
_SECRET_KEYS = frozenset({"password", "api_key"})


def searchPath(environ: Mapping[str, str], platform: str = sys.platform) -> list[str]:
    """
    The files `loadConfig` looks for when no path is given, first match wins.

    The per-user file follows the XDG base directory rules: an absolute
    `$XDG_CONFIG_HOME` replaces `$HOME/.config`.
    """
    paths = []
    xdgHome = environ.get("XDG_CONFIG_HOME", "")
    home = environ.get("HOME", "")
    if os.path.isabs(xdgHome):
        paths.append(os.path.join(xdgHome, APP_DIR, CONFIG_NAME))
    elif home:
        paths.append(os.path.join(home, ".config", APP_DIR, CONFIG_NAME))
    if platform == "darwin":
        paths.append(f"/Library/Application Support/{APP_DIR}/{CONFIG_NAME}")
    paths.append(f"/etc/{APP_DIR}/{CONFIG_NAME}")
    return paths


def findConfig(
    candidates: Iterable[str], exists: Callable[[str], bool] = os.path.lexists
) -> str | None:
    """The first candidate that exists (a dangling link counts, to be reported)."""
    for candidate in candidates:
        if exists(candidate):
            return candidate
    return None


def defaultForwardedPortPath(environ: Mapping[str, str], uid: int) -> str:
    """Where ProtonVPN's Linux app writes the forwarded port for this user."""
    runtime = environ.get("XDG_RUNTIME_DIR", "") or f"/run/user/{uid}"
    return os.path.join(runtime, "Proton", "VPN", "forwarded_port")


def loadConfig(
    path: str | None,
    environ: Mapping[str, str],
    *,
    platform: str = sys.platform,
    uid: int | None = None,
    search: Sequence[str] | None = None,
) -> Config:
    """
    Find, read and check the configuration.

    @param path: the file given with C{--config}; it must exist.  With
        L{None}, the first existing file of C{search} is read, or nothing.
    @param environ: the process environment (C{os.environ} in production).
    @param uid: the user id for the default port file path; L{None} means
        C{os.getuid()}.
    @param search: the files to look for; L{None} means L{searchPath}.
    @raise ConfigError: naming the file and the key at fault.
    """
    if path is not None:
        if not os.path.lexists(path):
            raise ConfigError(f"{path}: no such file (given with --config)")
        found: str | None = path
    else:
        if search is None:
            search = searchPath(environ, platform)
        found = findConfig(search)
    if uid is None:
        uid = os.getuid()
    tables = {}
    if found is not None:
        tables = _readToml(found)
        problem = checkTrusted(found, uid)
        if problem is not None:
            raise ConfigError(f"{found}: other users could change it: {problem}")
    return _Loader(found, environ, uid).build(tables)


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _pathChain(path: str, follow: bool) -> list[str]:
    """C{path} and each directory above it, from the root down."""
    path = os.path.realpath(path) if follow else os.path.abspath(path)
    chain = [path]
    while (parent := os.path.dirname(chain[-1])) != chain[-1]:
        chain.append(parent)
    return chain[::-1]


def _onReadOnlyMount(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _adminGroups(platform: str) -> frozenset[int]:
    groups = {0}
    if platform == "darwin":
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrnam("admin").gr_gid)
    return frozenset(groups)


ADMIN_GROUPS = _adminGroups(sys.platform)
"""
Groups whose members may act as root anyway, so that their write access
is no one else's: root's own group, and on macOS the administrators (who
may use sudo, and own Homebrew's directories there, group-writable).
"""


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def checkTrusted(
    path: str, uid: int, adminGroups: frozenset[int] = ADMIN_GROUPS
) -> str | None:
    """
    Why someone other than root or C{uid} could change what C{path} holds,
    with the command that fixes it, or L{None} when no one else can.

    Like OpenSSH's checks of its own files: C{path} and every directory
    above it, both as written (a symbolic link on the way must belong to
    root or C{uid} too) and with links resolved, must be owned by root or
    C{uid} and writable by their owner only.  A directory with the sticky
    bit (C{/tmp}) is fine: there no one can replace what another user owns,
    and what lies below it is checked for its owner.  So is anything on a
    read-only mount, such as a container's C{:ro} volume, whose owner is a
    user of the host: no one here can change it; and write access for one
    of the C{adminGroups}.
    """
    trusted = {0, uid}
    for follow in (False, True):
        for step in _pathChain(path, follow):
            try:
                info = os.lstat(step)
            except OSError as e:
                return f"cannot check who may change {step}: {e.strerror}"
            if not stat.S_ISLNK(info.st_mode) and _onReadOnlyMount(step):
                continue
            if info.st_uid not in trusted:
                return (
                    f"{step} belongs to {_owner(info.st_uid)}, "
                    f"not to root or {_owner(uid)}; fix it with: chown root {step}"
                )
            mode = stat.S_IMODE(info.st_mode)
            writers = mode & 0o022
            if info.st_gid in adminGroups:
                writers &= ~0o020
            if (
                stat.S_ISLNK(info.st_mode)
                or not writers
                or (stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX)
            ):
                continue
            group = f"its group {_group(info.st_gid)}"
            who = {0o020: group, 0o002: "all users"}.get(
                writers, f"{group} and all users"
            )
            return (
                f"{step} is writable by {who} (mode {mode:04o}), not only by its "
                f"owner; fix it with: chmod go-w {step}"
            )
    return None


def _readToml(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message carries the line and column, never a value.
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, which TOML requires") from None


def _describe(value: object) -> str:
    """A value as TOML would spell it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _kind(value: object) -> str:
    """The TOML type of a value, for errors about secrets: never the value."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return name
    if isinstance(value, float):
        return "a float"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date or time"


def _expandUser(path: str, environ: Mapping[str, str]) -> str:
    home = environ.get("HOME", "")
    if home and (path == "~" or path.startswith("~/")):
        return home + path[1:]
    return os.path.expanduser(path)


class _Section:
    """Reads the keys of one TOML table, checking each against its rule."""

    def __init__(self, file: str, name: str, table: Mapping[str, object]) -> None:
        self.file = file
        self.name = name
        self.table = table

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.name}.{key} {problem}")

    def withDefaults(self, defaults: Mapping[str, object]) -> _Section:
        """This table, with C{defaults} for the keys it does not set."""
        return _Section(self.file, self.name, {**defaults, **self.table})

    def _wrong(self, key: str, allowed: str, value: object) -> ConfigError:
        got = _kind(value) if key in _SECRET_KEYS else _describe(value)
        return self.fail(key, f"must be {allowed}, got {got}")

    def string(self, key: str, default: str) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.table.get(key, default)
        # bool is a subclass of int: `port = true` must not read as port 1.
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not low <= value <= high
        ):
            raise self._wrong(key, f"a whole number from {low} to {high}", value)
        return value

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, 0, 65535)

    def seconds(self, key: str, default: float) -> float:
        value = self.table.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self._wrong(key, "a positive number of seconds", value)
        return float(value)

    def ipv4(self, key: str, default: str) -> str:
        value = self.string(key, default)
        if value:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise self._wrong(
                    key, 'empty or an IPv4 address such as "10.2.0.1"', value
                ) from None
        return value

    def listenAddress(self, key: str, default: str) -> str:
        value = self.string(key, default)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise self._wrong(
                key,
                'an IPv4 or IPv6 address such as "127.0.0.1" or "::1" '
                '(use "0.0.0.0" or "::" for every interface)',
                value,
            ) from None
        return value

    def readableFile(self, key: str, environ: Mapping[str, str]) -> str | None:
        value = self.string(key, "")
        if not value:
            return None
        path = _expandUser(value, environ)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise self.fail(
                key, f"must name a readable file, but {path}: {e.strerror}"
            ) from None
        return path


class _Loader:
    """Turns parsed TOML tables into a `Config`, checking every key."""

    def __init__(self, file: str | None, environ: Mapping[str, str], uid: int) -> None:
        self.path = file
        self.file = _NO_FILE if file is None else file
        self.environ = environ
        self.uid = uid

    def build(self, tables: Mapping[str, object]) -> Config:
        sections = self.sections(tables)
        self.environDefaults(sections)
        metrics = self.listen(sections["metrics"])
        return Config(
            path=self.path,
            qbittorrent=self.qbittorrent(sections["qbittorrent"]),
            protonvpn=self.protonvpn(sections["protonvpn"]),
            portmap=self.portmap(sections["portmap"]),
            net=NetConfig(bind_interface=sections["net"].string("bind_interface", "")),
            metrics=metrics,
            health=self.health(sections["health"], metrics),
            gluetun=self.gluetun(sections["gluetun"]),
            hooks=self.hooks(sections["hooks"]),
        )

    def environDefaults(self, sections: dict[str, _Section]) -> None:
        """
        Container images set defaults the file may override: the address the
        endpoints listen on, and a port for the health check.
        """
        address = self.environ.get(LISTEN_ADDRESS_ENV, "")
        if address:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(
                    f"environment variable {LISTEN_ADDRESS_ENV} must be an IP "
                    f'address such as "0.0.0.0", got {_describe(address)}'
                ) from None
            for name in ("metrics", "health"):
                sections[name] = sections[name].withDefaults({"address": address})
        port = self.environ.get(HEALTH_PORT_ENV, "")
        if port:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(
                    f"environment variable {HEALTH_PORT_ENV} must be a port "
                    f"from 1 to 65535, got {_describe(port)}"
                )
            health = sections["health"]
            if "enabled" not in health.table and "port" not in health.table:
                sections["health"] = health.withDefaults(
                    {"enabled": True, "port": int(port)}
                )

    def sections(self, tables: Mapping[str, object]) -> dict[str, _Section]:
        allowedSections = ", ".join(f"[{name}]" for name in _KEYS)
        sections = {}
        for name, table in tables.items():
            if name not in _KEYS:
                what = "section" if isinstance(table, dict) else "top-level key"
                raise ConfigError(
                    f"{self.file}: unknown {what} {name}; "
                    f"allowed sections: {allowedSections}"
                )
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{self.file}: {name} must be a table (a [{name}] section)"
                )
        for name, allowed in _KEYS.items():
            table = cast(dict[str, object], tables.get(name, {}))
            for key in table:
                if key not in allowed:
                    raise ConfigError(
                        f"{self.file}: unknown key {name}.{key}; "
                        f"allowed keys in [{name}]: {', '.join(allowed)}"
                    )
            sections[name] = _Section(self.file, name, table)
        return sections

    def qbittorrent(self, section: _Section) -> QBittorrentConfig:
        defaults = QBittorrentConfig()
        password = section.string("password", defaults.password)
        apiKey = section.string("api_key", defaults.api_key)
        if password or apiKey:
            self.warnIfShared(self.file, "a password or API key")
        passwordFile = section.string("password_file", "")
        filePassword = ""
        if passwordFile:
            path = _expandUser(passwordFile, self.environ)
            filePassword = self.readPassword(section, path)
            self.requireTrusted(section, "password_file", path)
            self.warnIfShared(path, "a password")
        caFile = section.readableFile("ca_file", self.environ)
        if caFile is not None:
            self.requireTrusted(section, "ca_file", caFile)
        envPassword = self.environ.get(PASSWORD_ENV, "")
        return QBittorrentConfig(
            base_url=self.baseURL(section, "base_url", defaults.base_url),
            username=section.string("username", defaults.username),
            password=(password or envPassword or filePassword),
            api_key=apiKey or self.environ.get(API_KEY_ENV, ""),
            password_from=(
                f"qbittorrent.password in {self.file}"
                if password
                else f"${PASSWORD_ENV}"
                if envPassword
                else f"qbittorrent.password_file ({passwordFile})"
                if passwordFile
                else f"no password set: qbittorrent.password in {self.file}, "
                f"${PASSWORD_ENV} or qbittorrent.password_file"
            ),
            ca_file=caFile,
            timeout_secs=section.seconds("timeout_secs", defaults.timeout_secs),
            verify_interval_secs=section.seconds(
                "verify_interval_secs", defaults.verify_interval_secs
            ),
            check_listener=self.checkListener(section, defaults.check_listener),
        )

    def checkListener(self, section: _Section, default: str) -> str:
        value = section.string("check_listener", default)
        if value in ("auto", "off"):
            return value
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise section.fail(
                "check_listener",
                'must be "auto", "off" or an IPv4 address such as "10.2.0.2", '
                f"got {_describe(value)}",
            ) from None
        return value

    def baseURL(self, section: _Section, key: str, default: str) -> str:
        value = section.string(key, default)
        allowed = (
            "an http:// or https:// URL with a host and no query or fragment, "
            'such as "http://127.0.0.1:8080"'
        )
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises ValueError when out of range
        except ValueError:
            raise section.fail(
                key, f"must be {allowed}, got {_describe(redact(value))}"
            ) from None
        if "@" in parts.netloc:
            raise section.fail(
                key,
                "must not carry a user name or password, "
                f"got {_describe(redact(value))}; "
                f"use {section.name}.username and {section.name}.password",
            )
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
            or any(c.isspace() for c in value)
        ):
            # Printed without what may be a secret: credentials, query, fragment.
            raise section.fail(
                key, f"must be {allowed}, got {_describe(redact(value))}"
            )
        return urlunsplit(parts._replace(path=parts.path.rstrip("/")))

    def readPassword(self, section: _Section, path: str) -> str:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise section.fail(
                "password_file", f"must name a readable file, but {path}: {e.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise section.fail(
                "password_file", f"must name a UTF-8 text file, but {path} is not"
            ) from None
        return text.removesuffix("\n").removesuffix("\r")

    def requireTrusted(self, section: _Section, key: str, path: str) -> None:
        """Refuse a file named by C{key} that other users could change."""
        problem = checkTrusted(path, self.uid)
        if problem is not None:
            raise section.fail(
                key, f"names {path}, which other users could change: {problem}"
            )

    def warnIfShared(self, path: str, holds: str) -> None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return
        if mode & 0o077:
            _log.warn(
                "{file} holds {holds} but other users can read it "
                "(mode {mode:04o}); fix it with: chmod 600 {file}",
                file=path,
                holds=holds,
                mode=mode,
            )

    def protonvpn(self, section: _Section) -> ProtonVPNConfig:
        value = section.string("forwarded_port_path", "")
        if value:
            path = _expandUser(value, self.environ)
        else:
            path = defaultForwardedPortPath(self.environ, self.uid)
        return ProtonVPNConfig(forwarded_port_path=path)

    def portmap(self, section: _Section) -> PortmapConfig:
        defaults = PortmapConfig()
        protocol = section.string("protocol", defaults.protocol)
        if protocol.upper() not in ("TCP", "UDP", "BOTH"):
            raise section.fail(
                "protocol", f'must be "TCP", "UDP" or "BOTH", got {_describe(protocol)}'
            )
        return PortmapConfig(
            internal_port=section.port("internal_port", defaults.internal_port),
            protocol=cast(Protocol, protocol.upper()),
            lifetime_secs=section.integer(
                "lifetime_secs", defaults.lifetime_secs, 1, _MAX_LIFETIME
            ),
            refresh_secs=section.integer(
                "refresh_secs", defaults.refresh_secs, 1, _MAX_LIFETIME
            ),
            autodiscover_gateway=section.boolean(
                "autodiscover_gateway", defaults.autodiscover_gateway
            ),
            gateway=section.ipv4("gateway", defaults.gateway),
            bind_address=section.ipv4("bind_address", defaults.bind_address),
            release_on_exit=section.boolean(
                "release_on_exit", defaults.release_on_exit
            ),
        )

    def listen(self, section: _Section) -> ListenConfig:
        defaults = ListenConfig()
        enabled = section.boolean("enabled", defaults.enabled)
        port = section.port("port", defaults.port)
        if enabled and port == 0:
            # As in the reference: port 0 means "not served", not an error.
            _log.info(
                "{file}: {section}.enabled is true but {section}.port is 0: "
                "not serving it",
                file=self.file,
                section=section.name,
            )
            enabled = False
        return ListenConfig(
            enabled=enabled,
            port=port,
            address=section.listenAddress("address", defaults.address),
        )

    def health(self, section: _Section, metrics: ListenConfig) -> ListenConfig:
        """Health's port 0 means "on the metrics port": resolve it here."""
        enabled = section.boolean("enabled", False)
        port = section.port("port", 0)
        if not enabled or port != 0:
            health = self.listen(section)
        elif metrics.port == 0:
            raise section.fail(
                "port",
                "is 0, which means the metrics port, but metrics.port is 0 too; "
                "set one of them to a port from 1 to 65535",
            )
        else:
            address = section.listenAddress("address", metrics.address)
            health = ListenConfig(enabled=True, port=metrics.port, address=address)
        if (
            health.enabled
            and metrics.enabled
            and health.port == metrics.port
            and health.address != metrics.address
        ):
            raise section.fail(
                "address",
                f"must equal metrics.address ({_describe(metrics.address)}) "
                f"when both listen on port {health.port}, "
                f"got {_describe(health.address)}",
            )
        return health

    def gluetun(self, section: _Section) -> GluetunConfig:
        defaults = GluetunConfig()
        password = section.string("password", "")
        apiKey = section.string("api_key", "")
        if password or apiKey:
            self.warnIfShared(self.file, "a password or API key")
        url = ""
        if section.string("url", ""):
            url = self.baseURL(section, "url", "")
        return GluetunConfig(
            url=url,
            api_key=apiKey or self.environ.get(GLUETUN_API_KEY_ENV, ""),
            username=section.string("username", defaults.username),
            password=password or self.environ.get(GLUETUN_PASSWORD_ENV, ""),
            poll_interval_secs=section.seconds(
                "poll_interval_secs", defaults.poll_interval_secs
            ),
        )

    def hooks(self, section: _Section) -> HooksConfig:
        defaults = HooksConfig()
        argv = section.table.get("on_change", [])
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise section.fail(
                "on_change",
                "must be an array of strings (the program, then its arguments), "
                f"got {_describe(argv)}",
            )
        if argv:
            argv = [self.executable(section, argv[0]), *argv[1:]]
        return HooksConfig(
            on_change=tuple(argv),
            hook_timeout_secs=section.seconds(
                "hook_timeout_secs", defaults.hook_timeout_secs
            ),
        )

    def executable(self, section: _Section, program: str) -> str:
        """The absolute path of C{program}, looked up in C{$PATH} without a slash."""
        if not program:
            raise section.fail("on_change", 'must start with a program, got ""')
        path = _expandUser(program, self.environ)
        if "/" not in path:
            found = shutil.which(path, path=self.environ.get("PATH", os.defpath))
            if found is None:
                raise section.fail(
                    "on_change", f"names {path}, which is not a program in $PATH"
                )
            path = found
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise section.fail(
                "on_change",
                f"names {path}, which is not an executable file "
                f"(fix it with: chmod +x {path}, or name the right program)",
            )
        self.requireTrusted(section, "on_change", path)
        return os.path.abspath(path)
