"""The two Bitrix24 limits: the per-portal leaky bucket and the per-method operating-time budget.

Neither class locks; the portal calls them while holding its own lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Bitrix24 keeps operating time in 10 buckets that together make the window (10 x 60 s in the cloud).
OPERATING_BUCKETS = 10
# Calls that ran no longer than this are not recorded in the operating budget
# (`LoadLimiter::$minimalFixTime` in the Bitrix core).
MIN_RECORDED_SECONDS = 0.1


class LeakyBucket:
    """Counts requests; drains at `rate` per second; refuses a request that would pass `burst`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = 0.0
        self.updated = now

    def _drain(self, now: float) -> None:
        self.level = max(0.0, self.level - (now - self.updated) * self.rate)
        self.updated = now

    def try_add(self, now: float) -> bool:
        """Add one request if it fits under the burst; a refused request adds nothing."""
        self._drain(now)
        if self.level + 1 > self.burst:
            return False
        self.level += 1
        return True

    def current(self, now: float) -> float:
        """The counter's level after draining up to `now`."""
        self._drain(now)
        return self.level


@dataclass
class _Bucket:
    seconds: float
    first_time: float


class OperatingBudget:
    """Accumulated run time per (identity, method) over a sliding window of 10 buckets."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit = limit
        self.window = window
        self.bucket_size = window / OPERATING_BUCKETS
        self._buckets: dict[tuple[str, str], dict[int, _Bucket]] = {}

    def _live(self, key: tuple[str, str], now: float) -> dict[int, _Bucket]:
        buckets = self._buckets.get(key)
        if not buckets:
            return {}
        oldest = math.floor(now / self.bucket_size) - OPERATING_BUCKETS + 1
        for index in [i for i in buckets if i < oldest]:
            del buckets[index]
        return buckets

    def total(self, identity: str, method: str, now: float) -> float:
        """Seconds recorded for this identity and method within the window."""
        return sum((b.seconds for b in self._live((identity, method), now).values()), 0.0)

    def blocked(self, identity: str, method: str, now: float) -> bool:
        """Whether the method is over its budget, so the next call must be refused."""
        return self.total(identity, method, now) > self.limit

    def record(self, identity: str, method: str, seconds: float, now: float, force: bool = False) -> None:
        """Add a call's duration; calls not longer than 0.1 s are not recorded unless `force`d.

        `force` is for the end of a batch: the core sums one request's calls of a method and records
        the sum when it passes 0.1 s, so many short calls in one batch do count.
        """
        if seconds <= 0 or (seconds <= MIN_RECORDED_SECONDS and not force):
            return
        buckets = self._buckets.setdefault((identity, method), {})
        index = math.floor(now / self.bucket_size)
        bucket = buckets.get(index)
        if bucket is None:
            buckets[index] = _Bucket(seconds, now)
        else:
            bucket.seconds += seconds

    def reset_at(self, identity: str, method: str, now: float) -> int:
        """When the oldest live bucket expires (first call in it + window), else now + window."""
        buckets = self._live((identity, method), now)
        if buckets:
            oldest = buckets[min(buckets)]
            return math.ceil(oldest.first_time + self.window)
        return math.ceil(now + self.window)
