"""
How fast the NAT-PMP and PCP codecs decode what a gateway sends, good and
malformed: a datagram arriving costs this much CPU before it is used or
dropped.

    .venv/bin/python -m benchmarks.bench_codecs [ROUNDS]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

from qbportsync.sources import natpmp, pcp
from qbportsync.sources.wire import ParseError, Result


def rate(
    decode: Callable[[bytes], object], datagrams: list[bytes], rounds: int
) -> float:
    """Datagrams decoded (or rejected) per second."""
    started = time.perf_counter()
    for _ in range(rounds):
        for datagram in datagrams:
            with contextlib.suppress(ParseError):
                decode(datagram)
    return rounds * len(datagrams) / (time.perf_counter() - started)


def main(rounds: int) -> None:
    natpmpGood = natpmp.encodeResponse(
        natpmp.MapResponse("TCP", Result.SUCCESS, 1000, 6881, 40000, 60)
    )
    pcpGood = pcp.encodeResponse(
        pcp.MapResponse(
            Result.SUCCESS,
            120,
            1000,
            os.urandom(12),
            "TCP",
            6881,
            40000,
            "203.0.113.5",
        )
    )
    garbage = [os.urandom(n) for n in (2, 12, 16, 60, 1100)]
    print(f"rounds: {rounds}")
    for name, decode, good in (
        ("NAT-PMP", natpmp.decodeResponse, natpmpGood),
        ("PCP", pcp.decodeResponse, pcpGood),
    ):
        print(
            f"{name} map response decoded:  {rate(decode, [good], rounds):>10,.0f} /s"
        )
        print(
            f"{name} random bytes rejected: {rate(decode, garbage, rounds):>10,.0f} /s"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
