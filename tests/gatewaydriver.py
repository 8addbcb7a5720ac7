"""
Our gateway source in daemon mode, run as a subprocess inside the rig's
client namespace, reporting what happens as JSON lines; and L{Driver}, which
starts it and reads them.  Shared by the NAT-PMP and PCP integration tests.

    python -m tests.gatewaydriver natpmp|pcp CONFIG [RANDOM]

RANDOM fixes every random draw (e.g. the 0–5 s wait after a gateway reboot).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.rig import waitFor
from tests.rig_gateway import PROJECT, GatewayRig


class Driver:
    """The driver process in the client namespace, and its JSON events."""

    def __init__(
        self, rig: GatewayRig, strategy: str, config: Path, randomValue: str = ""
    ) -> None:
        stem = f"{strategy}-driver-{time.monotonic_ns()}"
        self.output = rig.directory / f"{stem}.jsonl"
        self.errors = rig.directory / f"{stem}.err"
        argv = [sys.executable, "-m", "tests.gatewaydriver", strategy, str(config)]
        if randomValue:
            argv.append(randomValue)
        with open(self.output, "wb") as out, open(self.errors, "wb") as err:
            self.process = subprocess.Popen(
                rig.command(rig.client, argv),
                cwd=PROJECT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        rig.adopt(self.process)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        text = self.output.read_text(errors="replace")
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [e for e in events if kind is None or e["event"] == kind]

    def waitFor(self, kind: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"driver exited: {self.errors.read_text(errors='replace')[-3000:]}"
                )
            return len(self.events(kind)) >= count

        waitFor(seen, f"{count} {kind} events", timeout, 0.01)
        return self.events(kind)[count - 1]

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the driver stops the source and reports its metrics."""
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(15)
        return self.events("stopped")[-1]


def _drive(strategy: str, configPath: str, randomValue: str | None) -> None:
    """Run the source, apply what it delivers, print one JSON event a line."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from twisted.logger import formatEvent, globalLogBeginner

    from qbportsync.config import loadConfig
    from qbportsync.interfaces import Forwarded
    from qbportsync.metrics import Metrics
    from qbportsync.refusals import RefusalStore
    from qbportsync.sources.gatewaysource import NATPMPSource, PCPSource
    from qbportsync.tap import makeSink

    def emit(event: str, **fields: object) -> None:
        print(
            json.dumps({"event": event, "mono": time.monotonic(), **fields}), flush=True
        )

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("qbportsync."):
            emit("log", text=formatEvent(event), level=event["log_level"].name)

    async def main(reactor: Any) -> None:
        config = loadConfig(configPath, os.environ)
        # The rig's own directory, never the host's /var/lib/qb-port-sync.
        state = os.path.join(os.path.dirname(os.path.abspath(configPath)), "state")
        sink = makeSink(reactor, config, RefusalStore(reactor, state))
        metrics = Metrics.create()
        drawn: list[float] = []

        def rnd() -> float:
            drawn.append(random.random() if randomValue is None else float(randomValue))
            return drawn[-1]

        kind = {"natpmp": NATPMPSource, "pcp": PCPSource}[strategy]
        source = kind(reactor, config, metrics, sink.listenPort, random=rnd)

        def deliver(forwarded: Forwarded) -> None:
            emit(
                "forwarded",
                port=forwarded.port,
                source=forwarded.source,
                expires=forwarded.expires,
            )
            d = sink.apply(forwarded.port, "")
            d.addCallback(lambda r: emit("applied", port=r.port, verified=r.verified))
            d.addErrback(lambda f: emit("apply-failed", error=f.getErrorMessage()))

        async def finish() -> None:
            await source.stop()
            registry = metrics.registry
            dropped = sum(
                s.value
                for m in registry.collect()
                if m.name == "qb_port_sync_datagrams_dropped"
                for s in m.samples
                if s.name.endswith("_total")
            )
            emit(
                "stopped",
                dropped=dropped,
                epoch_resets=registry.get_sample_value(
                    "qb_port_sync_gateway_epoch_resets_total"
                ),
                random=drawn[0] if drawn else None,
            )

        # SIGTERM stops the reactor; stopping the source runs first.
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(finish())
        )
        source.start(deliver)
        await Deferred()

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
