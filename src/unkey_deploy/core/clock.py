"""Time comes from an injected clock, so decisions (rate limits, billing hours) are testable."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall time (for records) and monotonic time (for durations and rate limits)."""

    def now(self) -> datetime:
        """Timezone-aware UTC wall time."""
        ...

    def time_ns(self) -> int:
        """Nanoseconds since the epoch (UTC)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to (``advance``)."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._ns = start_ns
        self._mono = 1000.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._ns / 1e9, UTC)

    def time_ns(self) -> int:
        return self._ns

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._ns += int(seconds * 1e9)
        self._mono += seconds


SYSTEM_CLOCK = SystemClock()
