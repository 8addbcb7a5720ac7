"""
The PCP source against the emulated gateway: every case of
test_natpmp_emulated, and what PCP adds (client address, nonces, fallback).
"""

from __future__ import annotations

from qbportsync.sources import pcp
from qbportsync.sources.gatewaysource import GatewaySource, PCPSource
from tests import test_natpmp_emulated
from tests.fakeudp import GATEWAY, path


class PCPEmulatedTests(test_natpmp_emulated.NATPMPEmulatedTests):
    """PCP against the emulated gateway."""

    method = "pcp"

    def sourceClass(self) -> type[GatewaySource]:
        return PCPSource

    def pcpRequests(self, since: float = 0.0) -> list[pcp.MapRequest]:
        out = []
        for at, _, data in self.gateway.heard:
            if at >= since and data[:1] == b"\x02":
                request = pcp.decodeRequest(data)
                assert isinstance(request, pcp.MapRequest)
                out.append(request)
        return out

    def test_speaksPCP(self) -> None:
        """A gateway that speaks PCP is asked in PCP, and nothing else."""
        source = self.started()
        self.untilReachable(5)
        self.letPass(120)
        self.assertEqual(source.name, "pcp")
        self.assertEqual(len(self.pcpRequests()), len(self.gateway.heard))

    def test_newAddressInClientField(self) -> None:
        """After a new tunnel address, PCP's client field carries it."""
        self.started()
        self.untilReachable(5)
        changed = self.reactor.seconds()
        self.paths.current = path(GATEWAY, "198.51.100.3")
        self.gateway.mappings.clear()
        self.events.announce("address", "wg0")
        self.untilReachable(5)
        clients = {r.clientAddress for r in self.pcpRequests(changed)}
        self.assertEqual(clients, {"198.51.100.3"})

    def test_nonceSurvivesNewSocket(self) -> None:
        """A new socket from the same address renews with the same nonce."""
        self.started()
        self.untilReachable(5)
        first = self.pcpRequests()[-1].nonce
        old = self.socket()
        old.closedByReactor()
        self.letPass(10)
        self.assertTrue(self.reachable())
        self.assertEqual(
            {r.nonce for r in self.pcpRequests() if r.protocol == "TCP"}, {first}
        )
        self.assertEqual(self.troubles(), [])

    def test_natpmpOnlyGateway(self) -> None:
        """A NAT-PMP-only gateway is asked in NAT-PMP at once, and converges."""
        source = self.makeSource(allowed=(1024, 2000))
        self.gateway.speaksPCP = False
        self.start(source)
        self.assertLess(self.untilReachable(5), 0.01)
        self.assertEqual(source.name, "natpmp")
        self.assertEqual(self.ports(), [1024])

    def test_downAtStartThenPCP(self) -> None:
        """A gateway silent at start, PCP later: asked in PCP again, mapped."""
        source = self.makeSource()
        self.gateway.up = False
        self.start(source)
        self.letPass(120)
        (cause,) = {t.cause for t in self.troubles()}
        self.assertEqual(cause, f"natpmp: gateway {GATEWAY} does not answer NAT-PMP")
        self.gateway.up = True
        elapsed = self.untilReachable(60)
        self.assertEqual(source.name, "pcp")
        print(f"\npcp gateway down at start, then up: reachable in {elapsed} s")
