"""qbportsync: keep qBittorrent listening on the port your VPN forwards."""

from qbportsync._version import __version__

__all__ = ["__version__"]
