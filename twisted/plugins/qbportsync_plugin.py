"""twistd plugin: C{twistd qbportsync} runs the port-sync daemon."""

from twisted.application.service import ServiceMaker

qbportsync = ServiceMaker(
    "qbportsync",
    "qbportsync.tap",
    "Keep qBittorrent listening on the port the VPN forwards.",
    "qbportsync",
)
