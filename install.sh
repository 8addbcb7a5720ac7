#!/bin/sh
# Install qb-port-sync from this source tree (or a wheel) into a private
# virtualenv, with its service files and a config that is never overwritten.
# Run it again to upgrade; --uninstall removes what it installed but keeps
# the config and the service user.
set -eu

usage() {
    cat <<'EOF'
Usage: install.sh [options]

  --prefix DIR     install under DIR (default /usr/local, or ~/.local with --user)
  --user           install for the current user: user systemd units and
                   ~/.config/qb-port-sync/config.toml, no service user
  --sysconfdir DIR where qb-port-sync/config.toml lives (default /etc for the
                   /usr and /usr/local prefixes, PREFIX/etc otherwise)
  --wheel FILE     install this wheel instead of the source tree beside install.sh
  --python PY      the Python (3.11 or newer) that creates the virtualenv
                   (default python3)
  --no-system      change nothing outside the prefix and the config directory:
                   no service user, no systemctl
  --uninstall      remove what an earlier run installed (the config stays)
  -h, --help       show this help

pip reads its usual PIP_* variables, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR
for an offline install from a directory of wheels.
EOF
}

say() {
    printf 'install.sh: %s\n' "$*"
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 2
}

SRCDIR=$(cd "$(dirname "$0")" && pwd)
PREFIX=
SYSCONFDIR=
USER_MODE=0
SYSTEM=1
UNINSTALL=0
WHEEL=
PYTHON=${PYTHON:-python3}
SERVICE_USER=qbportsync

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --sysconfdir) [ $# -ge 2 ] || die "--sysconfdir needs a directory"; SYSCONFDIR=$2; shift ;;
        --sysconfdir=*) SYSCONFDIR=${1#*=} ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$2; shift ;;
        --wheel=*) WHEEL=${1#*=} ;;
        --python) [ $# -ge 2 ] || die "--python needs a program"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --user) USER_MODE=1 ;;
        --no-system) SYSTEM=0 ;;
        --uninstall) UNINSTALL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

if [ "$USER_MODE" = 1 ]; then
    PREFIX=${PREFIX:-$HOME/.local}
    CONFDIR=${SYSCONFDIR:-${XDG_CONFIG_HOME:-$HOME/.config}}/qb-port-sync
    USERUNITDIR=${XDG_DATA_HOME:-$HOME/.local/share}/systemd/user
    SYSUNITDIR=
else
    PREFIX=${PREFIX:-/usr/local}
    case $PREFIX in
        /usr|/usr/local) CONFDIR=${SYSCONFDIR:-/etc}/qb-port-sync ;;
        *) CONFDIR=${SYSCONFDIR:-$PREFIX/etc}/qb-port-sync ;;
    esac
    # systemd looks in /usr/local/lib/systemd/{system,user} by itself.
    SYSUNITDIR=$PREFIX/lib/systemd/system
    USERUNITDIR=$PREFIX/lib/systemd/user
fi
case $PREFIX in
    /*) ;;
    *) PREFIX=$(pwd)/$PREFIX ;;
esac
VENV=$PREFIX/lib/qbportsync/venv
BINDIR=$PREFIX/bin
SHAREDIR=$PREFIX/share/qbportsync
CONFIG=$CONFDIR/config.toml

is_root() {
    [ "$(id -u)" = 0 ]
}

# Only touch systemd when it runs and we were not told to keep out.
systemctl_reload() {
    [ "$SYSTEM" = 1 ] || return 0
    command -v systemctl >/dev/null 2>&1 || return 0
    [ -d /run/systemd/system ] || return 0
    if [ "$USER_MODE" = 1 ]; then
        systemctl --user daemon-reload || say "systemctl --user daemon-reload failed"
    elif is_root; then
        systemctl daemon-reload || say "systemctl daemon-reload failed"
    fi
}

# install_unit SRC DEST: copy a unit with its program paths pointing into PREFIX.
install_unit() {
    mkdir -p "$(dirname "$2")"
    sed -e "s|/usr/bin/twistd |$VENV/bin/twistd |" \
        -e "s|/usr/bin/qb-port-sync |$BINDIR/qb-port-sync |" \
        -e "s|/etc/qb-port-sync/config.toml|$CONFIG|" \
        -e "s|/etc/qb-port-sync/%i.toml|$(dirname "$CONFIG")/%i.toml|" \
        "$1" > "$2.tmp"
    chmod 0644 "$2.tmp"
    mv "$2.tmp" "$2"
    say "installed $2"
}

create_service_user() {
    [ "$SYSTEM" = 1 ] && [ "$USER_MODE" = 0 ] && is_root || return 0
    [ "$(uname -s)" = Linux ] || return 0
    if id "$SERVICE_USER" >/dev/null 2>&1; then
        say "user $SERVICE_USER exists"
        return 0
    fi
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/bin/false
    useradd --system --no-create-home --home-dir /nonexistent \
        --shell "$nologin" --user-group "$SERVICE_USER"
    say "created system user $SERVICE_USER"
}

install_config() {
    mkdir -p "$CONFDIR"
    cp "$SRCDIR/config/config.example.toml" "$CONFDIR/config.example.toml.tmp"
    chmod 0644 "$CONFDIR/config.example.toml.tmp"
    mv "$CONFDIR/config.example.toml.tmp" "$CONFDIR/config.example.toml"
    if [ -e "$CONFIG" ]; then
        say "kept existing $CONFIG (the new example is $CONFDIR/config.example.toml)"
        return 0
    fi
    # The config may hold the qBittorrent password: owner (and service group) only.
    (umask 077 && cp "$CONFDIR/config.example.toml" "$CONFIG")
    if [ "$USER_MODE" = 0 ] && [ "$SYSTEM" = 1 ] && is_root \
        && id "$SERVICE_USER" >/dev/null 2>&1; then
        chgrp "$SERVICE_USER" "$CONFIG"
        chmod 0640 "$CONFIG"
    fi
    say "created $CONFIG: edit it before starting the service"
}

do_install() {
    [ -f "$SRCDIR/config/config.example.toml" ] \
        || die "run install.sh from the qbportsync source tree"
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
        target=$WHEEL
    else
        [ -f "$SRCDIR/pyproject.toml" ] || die "no pyproject.toml beside install.sh; use --wheel"
        target=$SRCDIR
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than Python 3.11"

    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
        say "created virtualenv $VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$target"
    # twistd runs unprivileged and cannot write the plugin cache itself.
    "$VENV/bin/python" -c \
        'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
        >/dev/null 2>&1 || say "could not refresh Twisted's plugin cache"

    mkdir -p "$BINDIR"
    ln -sf "$VENV/bin/qb-port-sync" "$BINDIR/qb-port-sync"
    say "installed $BINDIR/qb-port-sync"

    if [ -n "$SYSUNITDIR" ]; then
        install_unit "$SRCDIR/systemd/qb-port-sync.service" "$SYSUNITDIR/qb-port-sync.service"
        install_unit "$SRCDIR/systemd/qb-port-sync@.service" "$SYSUNITDIR/qb-port-sync@.service"
    fi
    install_unit "$SRCDIR/systemd/qb-port-sync.path" "$USERUNITDIR/qb-port-sync.path"
    install_unit "$SRCDIR/systemd/qb-port-sync-oneshot.service" \
        "$USERUNITDIR/qb-port-sync-oneshot.service"
    mkdir -p "$SHAREDIR"
    cp "$SRCDIR/launchd/org.qbportsync.qb-port-sync.plist" "$SHAREDIR/"

    create_service_user
    install_config
    systemctl_reload
    say "done"
}

remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf "$1"
        say "removed $1"
    fi
}

do_uninstall() {
    if [ -n "$SYSUNITDIR" ]; then
        remove "$SYSUNITDIR/qb-port-sync.service"
        remove "$SYSUNITDIR/qb-port-sync@.service"
    fi
    remove "$USERUNITDIR/qb-port-sync.path"
    remove "$USERUNITDIR/qb-port-sync-oneshot.service"
    # Only our own link: a qb-port-sync installed by something else stays.
    if [ "$(readlink "$BINDIR/qb-port-sync" 2>/dev/null || true)" = "$VENV/bin/qb-port-sync" ]; then
        remove "$BINDIR/qb-port-sync"
    fi
    remove "$PREFIX/lib/qbportsync"
    remove "$SHAREDIR"
    remove "$CONFDIR/config.example.toml"
    systemctl_reload
    if [ -e "$CONFIG" ]; then
        say "kept $CONFIG; delete it yourself if you no longer need it"
    fi
    say "done"
}

if [ "$UNINSTALL" = 1 ]; then
    do_uninstall
else
    do_install
fi
