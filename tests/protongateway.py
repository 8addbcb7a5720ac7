"""
A ProtonVPN-style port-forwarding gateway, for the lifecycle tests: it runs
in the rig's I{gw} namespace in place of miniupnpd, answers NAT-PMP and PCP
on udp/5351, and grants every client the same external port X whatever it
asks, forwarding X to port X of the client (not to the internal port the
request named), for UDP and TCP alike, with a fixed lifetime.  The
forwarding is real: nft rules in miniupnpd's chains.  With C{refuse}, it
refuses every mapping at once instead (NAT-PMP result 2, PCP
NOT_AUTHORIZED), as a gateway without port forwarding for this account.
One JSON line per datagram heard.

    python -m tests.protongateway BIND EXTERNAL PORT LIFETIME [refuse]
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time

_PROTOCOLS = {1: "udp", 2: "tcp"}
"""NAT-PMP opcodes."""
_IANA = {17: "udp", 6: "tcp"}
"""PCP protocol numbers."""
_NOT_AUTHORIZED = 2
"""NAT-PMP's "refused" and PCP's NOT_AUTHORIZED alike."""


class ProtonGateway:
    """The gateway's state: its epoch and the rules it installed."""

    def __init__(self, external: str, port: int, lifetime: int, refuse: bool) -> None:
        self.external = external
        self.port = port
        self.lifetime = lifetime
        self.refuse = refuse
        self.started = time.monotonic()
        self.installed: set[tuple[str, str]] = set()

    def epoch(self) -> int:
        return int(time.monotonic() - self.started)

    def forward(self, protocol: str, client: str) -> None:
        """Forward external port X to the client's port X, once."""
        if (protocol, client) in self.installed:
            return
        self.installed.add((protocol, client))
        port = self.port
        for rule in (
            f"add rule inet filter prerouting_miniupnpd ip daddr {self.external} "
            f"{protocol} dport {port} dnat ip to {client}:{port}",
            f"add rule inet filter miniupnpd ip daddr {client} "
            f"{protocol} dport {port} accept",
        ):
            subprocess.run(["nft", *rule.split()], check=True, timeout=10)

    def natpmp(self, data: bytes, client: str) -> bytes | None:
        if len(data) == 2 and data[1] == 0:
            address = socket.inet_aton(self.external)
            return struct.pack("!BBHI", 0, 128, 0, self.epoch()) + address
        if len(data) != 12 or data[1] not in _PROTOCOLS:
            return None
        _, op, _, internal, _, lifetime = struct.unpack("!BBHHHI", data)
        granted, external = 0, 0
        if self.refuse:
            return struct.pack(
                "!BBHIHHI", 0, 128 + op, _NOT_AUTHORIZED, self.epoch(), internal, 0, 0
            )
        if lifetime:
            self.forward(_PROTOCOLS[op], client)
            granted, external = self.lifetime, self.port
        return struct.pack(
            "!BBHIHHI", 0, 128 + op, 0, self.epoch(), internal, external, granted
        )

    def pcp(self, data: bytes, client: str) -> bytes | None:
        if len(data) < 24 or data[1] & 0x80:
            return None
        opcode = data[1] & 0x7F
        (lifetime,) = struct.unpack("!I", data[4:8])
        if opcode == 0:
            return struct.pack("!BBBBII12x", 2, 0x80, 0, 0, 0, self.epoch())
        if opcode != 1 or len(data) < 60:
            return None
        nonce, protocol, internal = data[24:36], data[36], data[40:42]
        granted, external, result = 0, 0, 0
        if self.refuse:
            granted, result = self.lifetime, _NOT_AUTHORIZED
        elif lifetime and protocol in _IANA:
            self.forward(_IANA[protocol], client)
            granted, external = self.lifetime, self.port
        mapped = ipaddress.IPv4Address(self.external).packed
        header = struct.pack("!BBBBII12x", 2, 0x81, 0, result, granted, self.epoch())
        body = nonce + bytes([protocol, 0, 0, 0]) + internal
        body += struct.pack("!H", external) + b"\0" * 10 + b"\xff\xff" + mapped
        return header + body


def serve(bind: str, external: str, port: int, lifetime: int, refuse: bool) -> None:
    """Answer on C{bind}:5351 until killed."""
    gateway = ProtonGateway(external, port, lifetime, refuse)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((bind, 5351))
        print(json.dumps({"listening": True}), flush=True)
        while True:
            data, (client, clientPort) = server.recvfrom(2048)
            handler = gateway.pcp if data[:1] == b"\x02" else gateway.natpmp
            answer = handler(data, client)
            print(
                json.dumps(
                    {
                        "mono": time.monotonic(),
                        "client": client,
                        "request": data.hex(),
                        "answer": answer.hex() if answer else None,
                    }
                ),
                flush=True,
            )
            if answer is not None:
                server.sendto(answer, (client, clientPort))


if __name__ == "__main__":
    serve(
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5:] == ["refuse"],
    )
