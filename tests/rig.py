"""
A real, isolated qbittorrent-nox for integration tests and the demo.

Everything here is synchronous and uses only the standard library, so that
trial tests, subprocess-driven tests and C{scripts/demo.py} can all share it.

qBittorrent runs inside a network namespace this module creates.  The
namespace has a loopback and one veth link to the host carrying a small
subnet from a documentation range, and no default route: nothing inside can
reach any address beyond that link, whatever libtorrent tries (DHT bootstrap,
LSD, UPnP, NAT-PMP).  The host side of the link carries two addresses: the
I{client} address, which the code under test uses by default, and the
I{admin} address, which the rig's own helpers bind to, so that the rig's
logins never reset or add to qBittorrent's count of failed logins for the
client.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import http.client
import http.cookiejar
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

REQUIRE_ENV = "QBPORTSYNC_REQUIRE_INTEGRATION"
CHECKOUT = Path(__file__).absolute().parent.parent
"""The checkout these tests are in."""

# Documentation ranges, in order of preference.  A range the host already
# routes (this machine's own LAN is 192.0.2.0/24) is skipped: a more specific
# route there would cut the host off from its real neighbours.
_CANDIDATE_RANGES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
_PREFIX = 29
_LOCK_PATH = "/run/qbportsync-rig.lock"
_NAME_PREFIX = "qbps"

_LOGIN_FAILURE = "WebAPI login failure"


def skipOrFail(reason: str) -> NoReturn:
    """
    Skip the current test, or fail it when the environment demands that
    integration tests run (CI).
    """
    if os.environ.get(REQUIRE_ENV) == "1":
        raise AssertionError(f"{reason} (and {REQUIRE_ENV}=1)")
    raise unittest.SkipTest(reason)


def requireTool(name: str) -> str:
    """Return the path of executable C{name}, or skip (or fail)."""
    path = shutil.which(name)
    if path is None:
        skipOrFail(f"{name} is not installed")
    return path


def requireRoot() -> None:
    """Skip (or fail) unless running as root, needed for network namespaces."""
    if os.geteuid() != 0:
        skipOrFail("network namespaces need root")


def requireQBittorrent() -> None:
    """Skip (or fail) unless a qBittorrent rig can be built here."""
    requireRoot()
    requireTool("ip")
    requireTool("ss")
    requireTool("qbittorrent-nox")


def waitFor(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> float:
    """
    Poll C{predicate} until it is true; return the seconds it took.  Raise
    C{AssertionError} naming C{what} after C{timeout} seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def stopProcess(process: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """SIGTERM C{process} by its PID, SIGKILL it after C{grace} seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(grace)
    return process.returncode


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def checkoutEnvironment(**extra: str) -> dict[str, str]:
    """Our environment with this checkout first on C{PYTHONPATH}, and C{extra}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(CHECKOUT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.update(extra)
    return env


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *argv], check=True, capture_output=True, text=True, timeout=10
    )


def _pidAlive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetworkNamespace:
    """
    A uniquely named network namespace linked to the host by one veth pair,
    with no route beyond the link.  Use L{create}; call L{close} to delete.
    """

    def __init__(
        self,
        name: str,
        hostInterface: str,
        network: ipaddress.IPv4Network,
    ) -> None:
        self.name = name
        self.hostInterface = hostInterface
        self.network = network
        hosts = list(network.hosts())
        self.clientAddress = str(hosts[0])
        """Host side: the source address of ordinary connections into it."""
        self.address = str(hosts[1])
        """Inside the namespace."""
        self.adminAddress = str(hosts[2])
        """Host side: the source address the rig's own helpers use."""
        self._closed = False

    @classmethod
    def create(cls) -> NetworkNamespace:
        """Create and configure a new namespace and its link."""
        requireRoot()
        requireTool("ip")
        # The PID in the name lets a later rig clean up after a killed one.
        name = f"{_NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        # Interface names are limited to 15 characters.
        hostInterface = f"{_NAME_PREFIX}{secrets.token_hex(5)}"
        with open(_LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _removeStaleNamespaces()
            network = _freeSubnet()
            _ip("netns", "add", name)
            namespace = cls(name, hostInterface, network)
            try:
                namespace._configure()
            except BaseException:
                namespace.close()
                raise
        return namespace

    def _configure(self) -> None:
        # No IPv6 inside (sysctl needs procps, which may be missing); the
        # default also holds for the link made next, and made again by bounce.
        self.run(
            [
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            ]
        )
        self.run(["ip", "link", "set", "lo", "up"])
        self._link()
        routes = self.run(["ip", "-4", "route", "show", "default"]).stdout.strip()
        if routes:
            raise RuntimeError(f"namespace {self.name} has a default route: {routes}")

    def _link(self) -> None:
        """Create the veth pair, address both ends and bring them up."""
        plen = str(self.network.prefixlen)
        _ip(
            "link",
            "add",
            self.hostInterface,
            "type",
            "veth",
            "peer",
            "name",
            "qbps0",
            "netns",
            self.name,
        )
        Path(f"/proc/sys/net/ipv6/conf/{self.hostInterface}/disable_ipv6").write_text(
            "1"
        )
        _ip("addr", "add", f"{self.clientAddress}/{plen}", "dev", self.hostInterface)
        _ip("addr", "add", f"{self.adminAddress}/{plen}", "dev", self.hostInterface)
        _ip("link", "set", self.hostInterface, "up")
        self.run(["ip", "addr", "add", f"{self.address}/{plen}", "dev", "qbps0"])
        self.run(["ip", "link", "set", "qbps0", "up"])

    def bounce(self) -> None:
        """
        Delete the veth pair and create it again with the same names and
        addresses, as C{wg-quick down} then C{up} does to a VPN interface.
        """
        _ip("link", "delete", self.hostInterface)
        self._link()

    def command(self, argv: list[str]) -> list[str]:
        """C{argv} wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run C{argv} inside the namespace and return its output."""
        return subprocess.run(
            self.command(argv), check=True, capture_output=True, text=True, timeout=10
        )

    def listeningSockets(self, proto: str = "tcp") -> set[tuple[str, int]]:
        """(address, port) of every tcp or udp socket listening in the namespace."""
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        out = self.run(["ss", "-H", "-l", "-n", flag]).stdout
        sockets = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                address, port = fields[3].rsplit(":", 1)
                # ss writes "[::]" and "198.51.100.2%qbps0" for bound sockets.
                address = address.split("%")[0].strip("[]")
                sockets.add((address, int(port)))
        return sockets

    def close(self) -> None:
        """Delete the namespace; the veth pair goes with it."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "delete", self.name)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", self.hostInterface)

    def __repr__(self) -> str:
        return f"<NetworkNamespace {self.name} {self.network}>"


def _removeStaleNamespaces() -> None:
    """
    Delete namespaces left behind by rigs whose process died without cleaning
    up, stopping what still runs in them.
    """
    names = _ip("netns", "list").stdout.split()
    for name in names:
        m = re.fullmatch(rf"{_NAME_PREFIX}-(\d+)-[0-9a-f]+", name)
        if m is None or _pidAlive(int(m.group(1))):
            continue
        pids = _ip("netns", "pids", name).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "delete", name)


def _freeSubnet() -> ipaddress.IPv4Network:
    """A /29 that no host route or address overlaps, from a free range."""
    taken: list[ipaddress.IPv4Network] = []
    foreign: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        fields = [*line.split(), ""]
        # The destination comes first, or second after a type like "local".
        net = _network(fields[0]) or _network(fields[1])
        if net is None:
            continue
        device = fields[fields.index("dev") + 1] if "dev" in fields else ""
        (taken if device.startswith(_NAME_PREFIX) else foreign).append(net)
    for rangeText in _CANDIDATE_RANGES:
        candidate = ipaddress.IPv4Network(rangeText)
        if any(candidate.overlaps(net) for net in foreign):
            continue
        for subnet in candidate.subnets(new_prefix=_PREFIX):
            if not any(subnet.overlaps(net) for net in taken):
                return subnet
    raise RuntimeError("no free documentation subnet left for a test namespace")


def _network(text: str) -> ipaddress.IPv4Network | None:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        return None


def _pbkdf2Entry(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 100_000, 64)
    b64 = base64.b64encode
    return f"@ByteArray({b64(salt).decode()}:{b64(key).decode()})"


def writeProfile(
    *,
    address: str,
    webuiPort: int,
    listenPort: int,
    username: str,
    password: str,
    maxAuthFailCount: int,
    banDuration: int,
) -> str:
    # Each outbound feature is off here *and* the namespace has no route out:
    # either alone has been enough so far, both together are the promise.
    return f"""\
[LegalNotice]
Accepted=true

[Meta]
MigrationVersion=4

[BitTorrent]
Session\\DHTEnabled=false
Session\\LSDEnabled=false
Session\\PeXEnabled=false
Session\\Port={listenPort}
Session\\UseRandomPort=false

[Network]
PortForwardingEnabled=false

[RSS]
AutoDownloader\\EnableProcessing=false
Session\\EnableProcessing=false

[Application]
FileLogger\\Enabled=true

[Preferences]
Connection\\ResolvePeerCountries=false
DynDNS\\Enabled=false
MailNotification\\enabled=false
WebUI\\Enabled=true
WebUI\\Address={address}
WebUI\\Port={webuiPort}
WebUI\\UseUPnP=false
WebUI\\Username={username}
WebUI\\Password_PBKDF2="{_pbkdf2Entry(password)}"
WebUI\\LocalHostAuth=true
WebUI\\MaxAuthenticationFailCount={maxAuthFailCount}
WebUI\\BanDuration={banDuration}
"""


def startQBittorrent(
    command: Callable[[list[str]], list[str]], directory: Path, webuiPort: int
) -> subprocess.Popen[bytes]:
    """
    Start qbittorrent-nox on the profile in C{directory}, with a home of its
    own there, through C{command} (which runs it inside a namespace); its
    output goes to C{directory}/qbittorrent-nox.out.
    """
    home = directory / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LANG": "C.UTF-8",
    }
    argv = ["qbittorrent-nox", f"--profile={directory}", f"--webui-port={webuiPort}"]
    with open(directory / "qbittorrent-nox.out", "ab") as output:
        # stdin not a tty: qbittorrent-nox then skips its legal-notice prompt.
        return subprocess.Popen(
            command(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )


class _SourceBoundHandler(urllib.request.HTTPHandler):
    def __init__(self, sourceAddress: str) -> None:
        super().__init__()
        self._connection = functools.partial(
            http.client.HTTPConnection, source_address=(sourceAddress, 0)
        )

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class WebSession:
    """
    A blocking Web API session from one host source address, with its own
    cookie jar.
    """

    def __init__(self, baseURL: str, sourceAddress: str) -> None:
        self.baseURL = baseURL
        self.cookies = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(
            _SourceBoundHandler(sourceAddress),
            urllib.request.HTTPCookieProcessor(self.cookies),
        )

    def request(
        self, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """GET C{path}, or POST C{form} to it; return status and body."""
        data = None if form is None else urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(self.baseURL + path, data=data)
        try:
            with self._opener.open(req, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()

    def login(self, username: str, password: str) -> tuple[int, bytes]:
        """Try to log in; return status and body (C{Ok.} on success in 4.x)."""
        return self.request(
            "/api/v2/auth/login", {"username": username, "password": password}
        )


class Rig:
    """
    Something a test builds and must tear down: whatever is pushed on
    C{self._cleanup} is undone, last first, by L{close} or on leaving a
    C{with} block, even after a failure half-way through building it.
    """

    def __init__(self) -> None:
        self._cleanup = contextlib.ExitStack()

    def close(self) -> None:
        """Undo everything, last first."""
        self._cleanup.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        excType: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class QBittorrentRig(Rig):
    """
    A throwaway qbittorrent-nox in its own network namespace, with a known
    random password and every outbound feature off.  Use as a context manager
    or call L{close}; cleanup stops the process by PID, deletes the namespace
    and the profile directory, even after a failure.
    """

    def __init__(
        self,
        *,
        webuiPort: int = 8080,
        listenPort: int = 6881,
        username: str = "admin",
        maxAuthFailCount: int = 5,
        banDuration: int = 3600,
        startTimeout: float = 10.0,
    ) -> None:
        requireQBittorrent()
        self.webuiPort = webuiPort
        self.username = username
        self.password = secrets.token_urlsafe(18)
        self.startTimeout = startTimeout
        self.process: subprocess.Popen[bytes] | None = None
        super().__init__()
        try:
            self.directory = Path(
                self._cleanup.enter_context(
                    tempfile.TemporaryDirectory(prefix="qbps-rig-")
                )
            )
            self.namespace = NetworkNamespace.create()
            self._cleanup.callback(self.namespace.close)
            self._cleanup.callback(self.stop)
            config = self.directory / "qBittorrent" / "config"
            config.mkdir(parents=True)
            (config / "qBittorrent.conf").write_text(
                writeProfile(
                    address=self.namespace.address,
                    webuiPort=webuiPort,
                    listenPort=listenPort,
                    username=username,
                    password=self.password,
                    maxAuthFailCount=maxAuthFailCount,
                    banDuration=banDuration,
                )
            )
            self.admin = WebSession(self.baseURL, self.namespace.adminAddress)
            self.start()
        except BaseException:
            self._cleanup.close()
            raise

    @property
    def baseURL(self) -> str:
        """The Web UI's URL as seen from the host."""
        return f"http://{self.namespace.address}:{self.webuiPort}"

    @property
    def logPath(self) -> Path:
        """qBittorrent's own log file; it survives restarts."""
        return self.directory / "qBittorrent" / "data" / "logs" / "qbittorrent.log"

    @property
    def pid(self) -> int:
        """The PID of the running qbittorrent-nox."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> float:
        """Start qbittorrent-nox; return seconds until its Web UI answered."""
        assert self.process is None or self.process.poll() is not None
        self.process = process = startQBittorrent(
            self.namespace.command, self.directory, self.webuiPort
        )
        # A fresh session: qBittorrent forgets every SID when it restarts.
        self.admin = WebSession(self.baseURL, self.namespace.adminAddress)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"qbittorrent-nox exited with {process.returncode}: "
                    f"{self.output()[-2000:]}"
                )
            try:
                self.admin.request("/api/v2/app/version")
            except OSError:
                return False
            return True

        return waitFor(answers, "the Web UI to answer", self.startTimeout, 0.01)

    def stop(self, grace: float = 5.0) -> None:
        """Stop qbittorrent-nox by its PID: SIGTERM, then SIGKILL."""
        if self.process is not None:
            stopProcess(self.process, grace)

    def restart(self, listenPort: int | None = None) -> float:
        """
        Stop and start again, first setting the listening port it will start
        with when C{listenPort} is given (as if its configuration had been
        reset); return seconds until the Web UI answered.
        """
        self.stop()
        if listenPort is not None:
            conf = self.directory / "qBittorrent" / "config" / "qBittorrent.conf"
            text = re.sub(
                r"^Session\\Port=\d+$",
                lambda _: f"Session\\Port={listenPort}",
                conf.read_text(),
                flags=re.MULTILINE,
            )
            conf.write_text(text)
        return self.start()

    def output(self) -> str:
        """What qbittorrent-nox wrote to stdout and stderr."""
        path = self.directory / "qbittorrent-nox.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self) -> str:
        """qBittorrent's log file, all runs."""
        path = self.logPath
        return path.read_text(errors="replace") if path.exists() else ""

    def failedLogins(self, address: str | None = None) -> list[str]:
        """
        The log's failed-login lines, for one source address or all.
        qBittorrent writes them as it answers, so the file is current.
        """
        lines = [line for line in self.log().splitlines() if _LOGIN_FAILURE in line]
        if address is not None:
            lines = [line for line in lines if f"IP: {address}," in line]
        return lines

    def login(self) -> None:
        """Log the rig's admin session in."""
        status, body = self.admin.login(self.username, self.password)
        if (status, body) != (200, b"Ok."):
            raise AssertionError(f"rig login failed: {status} {body!r}")

    def call(self, path: str, form: dict[str, str] | None = None) -> bytes:
        """A Web API call from the admin session, logging in when needed."""
        status, body = self.admin.request(path, form)
        if status == 403:
            self.login()
            status, body = self.admin.request(path, form)
        if status != 200:
            raise AssertionError(f"{path} answered {status}: {body!r}")
        return body

    def preferences(self) -> dict[str, Any]:
        """qBittorrent's preferences, as its API reports them."""
        result: dict[str, Any] = json.loads(self.call("/api/v2/app/preferences"))
        return result

    def setPreferences(self, preferences: dict[str, Any]) -> None:
        """Change preferences behind the back of the code under test."""
        self.call("/api/v2/app/setPreferences", {"json": json.dumps(preferences)})

    def listenPort(self) -> int:
        """The listening port qBittorrent reports."""
        port: int = self.preferences()["listen_port"]
        return port

    def listeningPorts(self) -> set[int]:
        """TCP ports qBittorrent really listens on, other than its Web UI."""
        sockets = self.namespace.listeningSockets("tcp")
        return {port for _, port in sockets} - {self.webuiPort}

    def loginStatus(self, sourceAddress: str) -> tuple[int, bytes]:
        """
        Log in with the right password from C{sourceAddress} (a host address
        of this rig's link).  A success resets qBittorrent's failure count
        for that address.
        """
        return WebSession(self.baseURL, sourceAddress).login(
            self.username, self.password
        )

    def isBanned(self, sourceAddress: str) -> bool:
        """Whether qBittorrent refuses even a right login from C{sourceAddress}."""
        return self.loginStatus(sourceAddress)[0] == 403

    def __repr__(self) -> str:
        return f"<QBittorrentRig {self.baseURL} in {self.namespace.name}>"
