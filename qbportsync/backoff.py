"""
Growing waits between retries, shared by every retry loop in the daemon.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from attrs import define, field


@define
class Backoff:
    """
    Waits that start at C{first} seconds, double up to C{cap}, and are
    spread by +/-C{jitter} so that many daemons do not retry in step.
    """

    first: float = 1.0
    cap: float = 60.0
    jitter: float = 0.2
    rnd: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)

    def next(self) -> float:
        """Count one more failure in a row; the seconds to wait before retrying."""
        self.failures += 1
        base = min(self.cap, self.first * 2.0 ** min(self.failures - 1, 32))
        return base * (1 - self.jitter + 2 * self.jitter * self.rnd())

    def reset(self) -> None:
        """A success: the next failure waits C{first} again."""
        self.failures = 0
