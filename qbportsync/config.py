"""Configuration: TOML file, environment and defaults, as frozen records."""

from __future__ import annotations

from typing import Literal

from attrs import field, frozen

Protocol = Literal["TCP", "UDP", "BOTH"]


class ConfigError(Exception):
    """The configuration is unusable; the message names the file and key."""


@frozen
class QBittorrentConfig:
    base_url: str = "http://127.0.0.1:8080"
    username: str = "admin"
    password: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    ca_file: str | None = None
    timeout_secs: float = 10.0
    verify_interval_secs: float = 30.0


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
class Config:
    path: str | None = None
    qbittorrent: QBittorrentConfig = QBittorrentConfig()
    protonvpn: ProtonVPNConfig = ProtonVPNConfig()
    portmap: PortmapConfig = PortmapConfig()
    net: NetConfig = NetConfig()
    metrics: ListenConfig = ListenConfig()
    health: ListenConfig = ListenConfig()
