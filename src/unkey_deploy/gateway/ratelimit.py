"""Per-key token buckets (in process; a decision on the injected clock)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from ..core.clock import Clock
from ..core.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """``rate`` tokens per second up to ``burst``; each request takes one token.

    Buckets live in this process: with N gateway processes a key gets up to N times the rate.
    Idle buckets are dropped once there are many, since a full bucket carries no state.
    """

    MAX_BUCKETS = 100_000

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Take one token for ``key`` or raise RateLimited with the seconds until one is free."""
        now = self.clock.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.MAX_BUCKETS:
                    self._evict(now)
                b = self._buckets[key] = _Bucket(self.burst, now)
            else:
                b.tokens = min(self.burst, b.tokens + (now - b.updated) * self.rate)
                b.updated = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = (1.0 - b.tokens) / self.rate
        raise RateLimited(
            f"rate limit exceeded for this key ({self.rate:g} requests/s, burst {self.burst:g})",
            retry_after=math.ceil(wait * 1000) / 1000,
            suggestion=f"retry after {math.ceil(wait)} s (the Retry-After header)",
        )

    def _evict(self, now: float) -> None:
        full_after = self.burst / self.rate
        for k in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[k]
