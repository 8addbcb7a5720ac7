"""
The packaging artefacts: systemd units, launchd plist, Homebrew formula,
install.sh, Dockerfile, CI workflow, and the sdist and wheel themselves.

Tests that need built artefacts read them from C{QBPORTSYNC_DIST} (a
directory with the sdist and the wheel) and C{QBPORTSYNC_WHEELHOUSE} (wheels
of every runtime dependency), which C{scripts/check-packaging} sets. Without
them those tests skip; check-packaging runs this module again with them and
fails on any skip when C{QBPORTSYNC_SLOW=1}.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import tomllib
import unittest
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from qbportsync._version import __version__
from qbportsync.config import loadConfig
from qbportsync.logs import twistdObserver
from qbportsync.refusals import stateDirectory
from qbportsync.tap import Options
from tests.rig import requireTool

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "systemd" / "qb-port-sync.service"
PATH_UNIT = ROOT / "systemd" / "qb-port-sync.path"
ONESHOT = ROOT / "systemd" / "qb-port-sync-oneshot.service"
TEMPLATE = ROOT / "systemd" / "qb-port-sync@.service"
PLIST = ROOT / "launchd" / "org.qbportsync.qb-port-sync.plist"
FORMULA = ROOT / "Formula" / "qbportsync.rb"
INSTALL_SH = ROOT / "install.sh"
PKGBUILD = ROOT / "PKGBUILD"

Unit = dict[str, dict[str, list[str]]]


def parseUnit(text: str) -> Unit:
    """
    Read a systemd unit into section -> key -> values, keeping every
    assignment of a repeated key in order (systemd's own semantics).
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def single(unit: Unit, section: str, key: str) -> str:
    """The one value of C{key}, which must be set exactly once."""
    values = unit[section][key]
    if len(values) != 1:
        raise AssertionError(f"{section}.{key} set {len(values)} times: {values}")
    return values[0]


def needsBuild(reason: str) -> NoReturn:
    """
    Skip a test that needs built artefacts. scripts/check-packaging provides
    them and fails if any test here skips, so CI never loses these tests.
    """
    raise unittest.SkipTest(f"{reason}; scripts/check-packaging runs this test")


def builtArtefact(pattern: str) -> Path:
    """The one file matching C{pattern} in C{QBPORTSYNC_DIST}."""
    dist = os.environ.get("QBPORTSYNC_DIST")
    if not dist:
        needsBuild("QBPORTSYNC_DIST is not set: no built sdist or wheel to inspect")
    matches = sorted(Path(dist).glob(pattern))
    if len(matches) != 1:
        raise AssertionError(f"expected one {pattern} in {dist}, found {matches}")
    return matches[0]


def runQuiet(
    argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a checker bounded in time, capturing its words; callers check the code."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False
    )


def markerEnvironments(pythonVersion: str) -> list[dict[str, str]]:
    """Marker environments of macOS and Linux on the given Python."""
    return [
        {
            "sys_platform": sysPlatform,
            "platform_system": system,
            "os_name": "posix",
            "platform_python_implementation": "CPython",
            "implementation_name": "cpython",
            "python_version": pythonVersion,
            "python_full_version": f"{pythonVersion}.0",
        }
        for sysPlatform, system in (("darwin", "Darwin"), ("linux", "Linux"))
    ]


def runtimeClosure(
    requirements: Iterable[str], environments: list[dict[str, str]]
) -> dict[str, list[Requirement]]:
    """
    Every distribution that C{requirements} pull in, directly or not, read
    from the installed distributions' metadata, with the requirements that
    named each one. A requirement counts if its marker holds in any of
    C{environments}, with any extra that was asked of its distribution.
    """
    found: dict[str, list[Requirement]] = {}
    extras: dict[str, set[str]] = {}
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        known = name in found
        found.setdefault(name, []).append(requirement)
        wanted = extras.setdefault(name, set())
        if known and requirement.extras <= wanted:
            continue
        wanted |= requirement.extras
        for line in importlib.metadata.requires(name) or []:
            child = Requirement(line)
            marker: Marker | None = child.marker
            if marker is None or any(
                marker.evaluate({**env, "extra": extra})
                for env in environments
                for extra in ["", *sorted(wanted)]
            ):
                pending.append(child)
    return found


def formulaResources(text: str) -> dict[str, tuple[str, str]]:
    """The formula's resources: name -> (url, sha256)."""
    pattern = re.compile(
        r'resource "([^"]+)" do\s+url "([^"]+)"\s+sha256 "([^"]+)"\s+end'
    )
    resources: dict[str, tuple[str, str]] = {}
    for name, url, sha in pattern.findall(text):
        if name in resources:
            raise AssertionError(f"resource {name} listed twice")
        resources[name] = (url, sha)
    return resources


def fakeRoot(executables: Iterable[str], units: Mapping[str, str]) -> Path:
    """
    A directory tree for C{systemd-analyze --root}: the host's stock system
    units (verify needs the targets they define), the given units in
    /etc/systemd/system, and an executable stub at each path in C{executables}.
    """
    root = Path(tempfile.mkdtemp(prefix="qbps-root-"))
    shutil.copytree(
        "/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True
    )
    for path in executables:
        stub = root / path.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for name, text in units.items():
        (etc / name).write_text(text)
    return root


class SystemServiceTests(SynchronousTestCase):
    """systemd/qb-port-sync.service."""

    def setUp(self) -> None:
        self.unit = parseUnit(SERVICE.read_text())

    def test_execStartParsesWithTwistd(self) -> None:
        """twistd accepts the command line, finds our plugin, passes the config on."""
        argv = shlex.split(single(self.unit, "Service", "ExecStart"))
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual(options.subCommand, "qbportsync")
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertIs(options["logger"], twistdObserver)
        self.assertEqual(options.subOptions["config"], "/etc/qb-port-sync/config.toml")

    def test_stateDirectory(self) -> None:
        """
        systemd gives the daemon a writable directory, and the daemon keeps
        its login-refusal record there: where a root --once run keeps it too.
        """
        name = single(self.unit, "Service", "StateDirectory")
        environ = {"STATE_DIRECTORY": f"/var/lib/{name}"}
        self.assertEqual(stateDirectory(environ, 999), stateDirectory({}, 0))

    def test_portFileStaysReadable(self) -> None:
        """
        ProtectHome also covers /run/user, where ProtonVPN writes its port
        file: only read-only keeps that file readable.
        """
        self.assertEqual(single(self.unit, "Service", "ProtectHome"), "read-only")
        service = self.unit["Service"]
        for key in ("InaccessiblePaths", "TemporaryFileSystem", "ProcSubset"):
            self.assertNotIn(key, service)

    def test_systemdAnalyzeVerify(self) -> None:
        """systemd-analyze verify finds nothing to say about the unit."""
        tool = requireTool("systemd-analyze")
        root = fakeRoot(["/usr/bin/twistd"], {SERVICE.name: SERVICE.read_text()})
        self.addCleanup(shutil.rmtree, root)
        result = runQuiet([tool, "verify", f"--root={root}", SERVICE.name])
        self.assertEqual(
            (result.returncode, result.stdout + result.stderr), (0, ""), "verify"
        )

    def test_systemdAnalyzeVerifyIsStrict(self) -> None:
        """The verify check above would notice a misspelt directive."""
        tool = requireTool("systemd-analyze")
        broken = SERVICE.read_text().replace("ProtectHome=", "ProtectHom=")
        root = fakeRoot(["/usr/bin/twistd"], {SERVICE.name: broken})
        self.addCleanup(shutil.rmtree, root)
        result = runQuiet([tool, "verify", f"--root={root}", SERVICE.name])
        self.assertIn("ProtectHom", result.stdout + result.stderr)

    def test_exposure(self) -> None:
        """systemd-analyze security rates the sandbox 2.0 or better ("OK")."""
        tool = requireTool("systemd-analyze")
        root = fakeRoot(["/usr/bin/twistd"], {SERVICE.name: SERVICE.read_text()})
        self.addCleanup(shutil.rmtree, root)
        result = runQuiet(
            [tool, "security", "--offline=yes", f"--root={root}", SERVICE.name]
        )
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        if match is None:
            self.fail(f"no exposure level in: {result.stdout}{result.stderr}")
        self.assertLessEqual(float(match.group(1)), 2.0)


class TemplateServiceTests(SynchronousTestCase):
    """systemd/qb-port-sync@.service: one daemon per VPN."""

    def test_instanceConfig(self) -> None:
        """Instance NAME runs our plugin with /etc/qb-port-sync/NAME.toml."""
        unit = parseUnit(TEMPLATE.read_text().replace("%i", "proton1"))
        options = ServerOptions()
        options.parseOptions(shlex.split(single(unit, "Service", "ExecStart"))[1:])
        self.assertEqual(options.subCommand, "qbportsync")
        self.assertEqual(options.subOptions["config"], "/etc/qb-port-sync/proton1.toml")

    def test_sameSandboxAsTheService(self) -> None:
        """Every setting but the command and environment file is the service's."""
        perInstance = ("ExecStart", "EnvironmentFile")
        template, service = (
            {
                k: v
                for k, v in parseUnit(u.read_text())["Service"].items()
                if k not in perInstance
            }
            for u in (TEMPLATE, SERVICE)
        )
        self.assertEqual(template, service)

    def test_systemdAnalyzeVerifyInANamespace(self) -> None:
        """
        An instance with the documented NetworkNamespacePath= drop-in passes
        systemd-analyze verify without a word.
        """
        tool = requireTool("systemd-analyze")
        root = fakeRoot(["/usr/bin/twistd"], {TEMPLATE.name: TEMPLATE.read_text()})
        self.addCleanup(shutil.rmtree, root)
        dropIn = root / "etc/systemd/system/qb-port-sync@proton1.service.d"
        dropIn.mkdir(parents=True)
        (dropIn / "netns.conf").write_text(
            "[Service]\nNetworkNamespacePath=/run/netns/proton1\n"
        )
        result = runQuiet(
            [tool, "verify", f"--root={root}", "qb-port-sync@proton1.service"]
        )
        self.assertEqual(
            (result.returncode, result.stdout + result.stderr), (0, ""), "verify"
        )


def verifyUserUnits(
    testCase: SynchronousTestCase, units: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run C{systemd-analyze --user verify} on C{units} in a private user tree."""
    tool = requireTool("systemd-analyze")
    home = Path(tempfile.mkdtemp(prefix="qbps-user-"))
    testCase.addCleanup(shutil.rmtree, home)
    (home / "run").mkdir(mode=0o700)
    unitDir = home / "config" / "systemd" / "user"
    unitDir.mkdir(parents=True)
    for name, text in units.items():
        (unitDir / name).write_text(text)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    return runQuiet([tool, "--user", "verify", *units], env=env)


class UserUnitTests(SynchronousTestCase):
    """systemd/qb-port-sync.path and systemd/qb-port-sync-oneshot.service."""

    def test_pathWatchesTheDefaultPortFile(self) -> None:
        """
        The path unit starts the one-shot when the file the one-shot reads by
        default changes (%t is $XDG_RUNTIME_DIR).
        """
        unit = parseUnit(PATH_UNIT.read_text())
        environ = {"XDG_RUNTIME_DIR": "/run/user/1000"}
        watched = single(unit, "Path", "PathChanged").replace("%t", "/run/user/1000")
        config = loadConfig(None, environ, uid=1000, search=[])
        self.assertEqual(watched, config.protonvpn.forwarded_port_path)
        self.assertEqual(single(unit, "Path", "Unit"), ONESHOT.name)

    def test_oneshotCommand(self) -> None:
        """The one-shot's command line is a --once run from the port file."""
        unit = parseUnit(ONESHOT.read_text())
        self.assertEqual(single(unit, "Service", "Type"), "oneshot")
        argv = shlex.split(single(unit, "Service", "ExecStart"))
        self.assertTrue(argv[0].endswith("/qb-port-sync"), argv[0])
        options = Options()
        options.parseOptions(argv[1:])
        self.assertEqual((options["once"], options["strategy"]), (True, "file"))

    def test_systemdAnalyzeVerify(self) -> None:
        """systemd-analyze --user verify finds nothing to say about either unit."""
        stub = Path(tempfile.mkdtemp(prefix="qbps-bin-")) / "qb-port-sync"
        self.addCleanup(shutil.rmtree, stub.parent)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
        oneshot = ONESHOT.read_text().replace("/usr/bin/qb-port-sync", str(stub))
        result = verifyUserUnits(
            self, {PATH_UNIT.name: PATH_UNIT.read_text(), ONESHOT.name: oneshot}
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


class LaunchdTests(SynchronousTestCase):
    """launchd/org.qbportsync.qb-port-sync.plist."""

    def setUp(self) -> None:
        with PLIST.open("rb") as f:
            self.job = plistlib.load(f)

    def test_label(self) -> None:
        """The label matches the file name, as launchctl expects."""
        self.assertEqual(self.job["Label"] + ".plist", PLIST.name)

    def test_programArguments(self) -> None:
        """The job runs qb-port-sync with options the CLI accepts."""
        argv = self.job["ProgramArguments"]
        self.assertTrue(argv[0].startswith("/"), argv[0])
        self.assertTrue(argv[0].endswith("/qb-port-sync"), argv[0])
        options = Options()
        options.parseOptions(argv[1:])
        self.assertEqual(
            options["config"], "/Library/Application Support/qb-port-sync/config.toml"
        )
        self.assertFalse(options["once"])

    def test_keepAlive(self) -> None:
        """launchd starts the job at load and restarts it when it fails."""
        self.assertIs(self.job["RunAtLoad"], True)
        self.assertEqual(self.job["KeepAlive"], {"SuccessfulExit": False})
        self.assertNotEqual(self.job.get("UserName", "root"), "root")


class FormulaTests(SynchronousTestCase):
    """Formula/qbportsync.rb."""

    def setUp(self) -> None:
        self.text = FORMULA.read_text()

    def pythonVersion(self) -> str:
        """The Python the formula builds its virtualenv with."""
        match = re.search(r'depends_on "python@(3\.\d+)"', self.text)
        if match is None:
            self.fail("the formula names no python@3.x")
        return match.group(1)

    def test_rubySyntax(self) -> None:
        """ruby -c accepts the formula."""
        ruby = requireTool("ruby")
        result = runQuiet([ruby, "-c", str(FORMULA)])
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "Syntax OK"))

    def test_resourcesAreTheRuntimeClosure(self) -> None:
        """
        The resources are exactly the distributions that qbportsync's runtime
        dependencies pull in, read from the installed metadata for the
        formula's Python on macOS and Linux.
        """
        with (ROOT / "pyproject.toml").open("rb") as f:
            dependencies = tomllib.load(f)["project"]["dependencies"]
        closure = runtimeClosure(dependencies, markerEnvironments(self.pythonVersion()))
        resources = formulaResources(self.text)
        self.assertEqual(
            sorted(canonicalize_name(name) for name in resources), sorted(closure)
        )

    def test_resourceVersionsSatisfyRequirements(self) -> None:
        """Each pinned sdist satisfies every requirement that names it."""
        with (ROOT / "pyproject.toml").open("rb") as f:
            dependencies = tomllib.load(f)["project"]["dependencies"]
        closure = runtimeClosure(dependencies, markerEnvironments(self.pythonVersion()))
        for name, (url, sha) in formulaResources(self.text).items():
            filename = url.rsplit("/", 1)[1]
            match = re.fullmatch(r"(.+)-([^-]+)\.tar\.gz", filename)
            if match is None:
                self.fail(f"{name}: {url} is not an sdist")
            self.assertEqual(canonicalize_name(match.group(1)), canonicalize_name(name))
            self.assertRegex(sha, r"^[0-9a-f]{64}$")
            self.assertTrue(url.startswith("https://files.pythonhosted.org/"), url)
            version = Version(match.group(2))
            for requirement in closure.get(canonicalize_name(name), []):
                self.assertIn(version, requirement.specifier, f"{name}: {requirement}")


# Arch names Python packages python-<name>; these keep another spelling.
ARCH_NAMES = {"prometheus-client": "python-prometheus_client"}


def pkgbuildArrays(*names: str) -> dict[str, list[str]]:
    """Read bash variables and arrays out of the PKGBUILD by sourcing it."""
    # ${!x} with x="name[@]" expands a whole array, even in macOS's bash 3.2.
    script = r'source "$1"; shift; for v; do x="$v[@]"; printf "%s\n" "${!x}"; '
    script += "echo; done"
    result = runQuiet(["bash", "-c", script, "bash", str(PKGBUILD), *names])
    if result.returncode != 0:
        raise AssertionError(f"sourcing the PKGBUILD failed: {result.stderr}")
    blocks = result.stdout.split("\n\n")
    return {name: block.split() for name, block in zip(names, blocks, strict=False)}


class PKGBUILDTests(SynchronousTestCase):
    """PKGBUILD; scripts/check-packaging runs makepkg on it."""

    def test_version(self) -> None:
        """The PKGBUILD and the formula package the current version."""
        version = __version__.short()
        self.assertEqual(pkgbuildArrays("pkgver")["pkgver"], [version])
        self.assertIn(f"/qbportsync-{version}.tar.gz", FORMULA.read_text())

    def test_dependencies(self) -> None:
        """The package depends on python and the Arch names of our dependencies."""
        with (ROOT / "pyproject.toml").open("rb") as f:
            dependencies = tomllib.load(f)["project"]["dependencies"]
        names = [canonicalize_name(Requirement(d).name) for d in dependencies]
        expected = ["python"] + [ARCH_NAMES.get(n, f"python-{n}") for n in names]
        self.assertEqual(sorted(pkgbuildArrays("depends")["depends"]), sorted(expected))


class InstallScriptTests(SynchronousTestCase):
    """install.sh."""

    def test_shellcheck(self) -> None:
        """shellcheck has nothing to say about install.sh."""
        tool = requireTool("shellcheck")
        result = runQuiet([tool, str(INSTALL_SH)])
        self.assertEqual((result.returncode, result.stdout), (0, ""))

    def test_usage(self) -> None:
        """--help lists the options; an unknown option is a usage error (exit 2)."""
        shown = runQuiet(["sh", str(INSTALL_SH), "--help"])
        self.assertEqual(shown.returncode, 0)
        for option in ("--prefix", "--user", "--uninstall", "--no-system", "--wheel"):
            self.assertIn(option, shown.stdout)
        wrong = runQuiet(["sh", str(INSTALL_SH), "--frobnicate"])
        self.assertEqual(wrong.returncode, 2)
        self.assertIn("unknown option: --frobnicate", wrong.stderr)

    def test_roundTrip(self) -> None:
        """
        install.sh installs into a prefix, runs again without touching the
        config, and uninstalls everything but the config.
        """
        wheel = builtArtefact("qbportsync-*.whl")
        wheelhouse = os.environ.get("QBPORTSYNC_WHEELHOUSE")
        if not wheelhouse:
            needsBuild("QBPORTSYNC_WHEELHOUSE is not set: no offline dependencies")
        prefix = Path(tempfile.mkdtemp(prefix="qbps-prefix-"))
        self.addCleanup(shutil.rmtree, prefix)
        env = {
            **os.environ,
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(wheelhouse),
        }
        python = os.environ.get("QBPORTSYNC_SYSPYTHON", "python3")
        command = [
            "sh",
            str(INSTALL_SH),
            "--prefix",
            str(prefix),
            "--no-system",
            "--wheel",
            str(wheel),
            "--python",
            python,
        ]

        first = runQuiet(command, env=env)
        self.assertEqual(first.returncode, 0, first.stderr)
        version = runQuiet([str(prefix / "bin" / "qb-port-sync"), "--version"])
        self.assertEqual(version.stdout.split()[0], "qbportsync")
        config = prefix / "etc" / "qb-port-sync" / "config.toml"
        self.assertEqual(stat.S_IMODE(config.stat().st_mode), 0o600)
        service = parseUnit(
            (prefix / "lib" / "systemd" / "system" / SERVICE.name).read_text()
        )
        twistd = shlex.split(single(service, "Service", "ExecStart"))[0]
        self.assertEqual(twistd, str(prefix / "lib/qbportsync/venv/bin/twistd"))
        self.assertTrue(os.access(twistd, os.X_OK))
        help = runQuiet([twistd, "qbportsync", "--help"], cwd=str(prefix))
        self.assertIn("--config", help.stdout)

        config.write_text("# mine\n")
        second = runQuiet(command, env=env)
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertEqual(config.read_text(), "# mine\n")

        gone = runQuiet([*command, "--uninstall"], env=env)
        self.assertEqual(gone.returncode, 0, gone.stderr)
        left = sorted(
            str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir()
        )
        self.assertEqual(left, ["etc/qb-port-sync/config.toml"])

    def test_installedUnitsVerify(self) -> None:
        """Units that install.sh writes pass systemd-analyze verify, real binaries."""
        tool = requireTool("systemd-analyze")
        wheel = builtArtefact("qbportsync-*.whl")
        wheelhouse = os.environ.get("QBPORTSYNC_WHEELHOUSE")
        if not wheelhouse:
            needsBuild("QBPORTSYNC_WHEELHOUSE is not set: no offline dependencies")
        prefix = Path(tempfile.mkdtemp(prefix="qbps-prefix-"))
        self.addCleanup(shutil.rmtree, prefix)
        env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
        python = os.environ.get("QBPORTSYNC_SYSPYTHON", "python3")
        installed = runQuiet(
            [
                *("sh", str(INSTALL_SH), "--prefix", str(prefix), "--no-system"),
                *("--wheel", str(wheel), "--python", python),
            ],
            env=env,
        )
        self.assertEqual(installed.returncode, 0, installed.stderr)
        systemDir = prefix / "lib" / "systemd" / "system"
        instance = prefix / "qb-port-sync@proton1.service"
        instance.write_text((systemDir / TEMPLATE.name).read_text())
        for unit in (systemDir / SERVICE.name, instance):
            result = runQuiet([tool, "verify", str(unit)])
            self.assertEqual(
                (result.returncode, result.stdout + result.stderr), (0, ""), unit
            )
        userDir = prefix / "lib" / "systemd" / "user"
        user = verifyUserUnits(
            self,
            {
                PATH_UNIT.name: (userDir / PATH_UNIT.name).read_text(),
                ONESHOT.name: (userDir / ONESHOT.name).read_text(),
            },
        )
        self.assertEqual((user.returncode, user.stdout + user.stderr), (0, ""))


class DockerfileTests(SynchronousTestCase):
    """
    .dockerignore; scripts/check-packaging builds the image and runs it (as
    a non-root user, a one-shot, the health check).
    """

    def test_dockerignore(self) -> None:
        """The build context leaves out VCS data, test leftovers and build output."""
        ignored = (ROOT / ".dockerignore").read_text().split()
        for pattern in (".git", "_trial_temp*", "build", "dist", "tests", ".venv"):
            self.assertIn(pattern, ignored)
        for needed in ("qbportsync", "pyproject.toml", "README.rst", "config"):
            self.assertNotIn(needed, ignored)


def loadYAML(path: Path) -> dict[str, Any]:
    """Parse a YAML file with Ruby's standard library (Python has none)."""
    ruby = requireTool("ruby")
    script = "puts JSON.dump(YAML.load_file(ARGV[0]))"
    result = runQuiet([ruby, "-ryaml", "-rjson", "-e", script, str(path)])
    if result.returncode != 0:
        raise AssertionError(f"{path} is not valid YAML: {result.stderr}")
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


class WorkflowTests(SynchronousTestCase):
    """.github/workflows/ci.yml."""

    def setUp(self) -> None:
        self.workflow = loadYAML(ROOT / ".github" / "workflows" / "ci.yml")

    def test_scriptsExist(self) -> None:
        """Every script of this tree that a CI step runs is there, executable."""
        runs = "\n".join(
            step.get("run", "")
            for job in self.workflow["jobs"].values()
            for step in job["steps"]
        )
        scripts = set(re.findall(r"(?<![\w/.-])(scripts/[\w.-]+)", runs))
        self.assertTrue(scripts, runs)
        for script in scripts:
            self.assertTrue(os.access(ROOT / script, os.X_OK), script)


class ComposeExampleTests(SynchronousTestCase):
    """docs/compose.example.yml."""

    def test_service(self) -> None:
        """
        qb-port-sync reads its config and gluetun's port file read-only, in
        gluetun's network, and never needs the Docker socket.
        """
        compose = loadYAML(ROOT / "docs" / "compose.example.yml")
        service = compose["services"]["qb-port-sync"]
        volumes = service["volumes"]
        self.assertIn("./config.toml:/etc/qb-port-sync/config.toml:ro", volumes)
        self.assertIn("gluetun-port:/tmp/gluetun:ro", volumes)
        self.assertEqual(service["network_mode"], "service:gluetun")
        self.assertEqual(service["build"], "..")
        self.assertNotIn("docker.sock", " ".join(volumes))


class DistributionTests(SynchronousTestCase):
    """The sdist and the wheel that scripts/check-packaging built."""

    def test_wheel(self) -> None:
        """
        The wheel carries the twistd plugin, py.typed, the licence and the
        console script, and no tests, plugin cache or namespace __init__.
        """
        wheel = builtArtefact("qbportsync-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            entryPoints = next(
                archive.read(n).decode()
                for n in names
                if n.endswith(".dist-info/entry_points.txt")
            )
        self.assertIn("twisted/plugins/qbportsync_plugin.py", names)
        self.assertIn("qbportsync/py.typed", names)
        self.assertTrue(any(n.endswith(".dist-info/licenses/LICENSE") for n in names))
        self.assertIn("qb-port-sync = qbportsync.cli:run", entryPoints)
        for unwanted in (
            "twisted/__init__.py",
            "twisted/plugins/__init__.py",
            "twisted/plugins/dropin.cache",
        ):
            self.assertNotIn(unwanted, names)
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
        self.assertEqual([n for n in names if "_trial_temp" in n], [])

    def test_sdist(self) -> None:
        """
        The sdist carries what distribution packages build from, and none of
        the files a test run leaves behind.
        """
        sdist = builtArtefact("qbportsync-*.tar.gz")
        with tarfile.open(sdist) as archive:
            names = {
                name.split("/", 1)[1] for name in archive.getnames() if "/" in name
            }
        for wanted in (
            "twisted/plugins/qbportsync_plugin.py",
            "qbportsync/py.typed",
            "config/config.example.toml",
            "systemd/qb-port-sync.service",
            "systemd/qb-port-sync@.service",
            "systemd/qb-port-sync.path",
            "systemd/qb-port-sync-oneshot.service",
            "launchd/" + PLIST.name,
            "PKGBUILD",
            "qbportsync.install",
            "install.sh",
            "LICENSE",
            "CONTRIBUTING.md",
            "tests/test_packaging.py",
        ):
            self.assertIn(wanted, names)
        leftovers = [
            n
            for n in names
            if "_trial_temp" in n
            or n.endswith((".pyc", "dropin.cache"))
            or "__pycache__" in n
        ]
        self.assertEqual(leftovers, [])
