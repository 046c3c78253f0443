"""What the workers did, counted in the work-horse and added to Redis hashes once per job.

Workers are separate processes on separate machines, so their counts live in Redis, where the web
process's `/metrics` reads them. Each job flushes its counts in one pipeline when it ends.
"""

from __future__ import annotations

from collections import defaultdict

import redis

KEY_PREFIX = "b24c:metrics:"
# name -> (help text, label names); every counter the workers keep.
COUNTERS = {
    "bitrix24_calls": ("Bitrix24 calls by portal, method and result (ok or the error code)",
                       ("portal", "method", "result")),
    "document_outcomes": ("Document outcomes by portal", ("portal", "outcome")),
    "limiter_wait_seconds": ("Seconds jobs slept waiting for a portal's rate limit", ("portal",)),
    "limiter_deferrals": ("Jobs rescheduled to wait for a portal's limits", ("portal", "limit")),
    "offline_records": ("Offline event records pulled, by portal and outcome: request, repeat, malformed, no_rule",
                        ("portal", "outcome")),
}
SEPARATOR = "\t"


class Tally:
    """Counts kept by one work-horse until its job ends."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, tuple[str, ...]], float] = defaultdict(float)

    def observe(self, name: str, *labels: str, amount: float = 1.0) -> None:
        """Add `amount` to the counter `name` with these label values."""
        self.counts[(name, labels)] += amount

    def flush(self, conn: redis.Redis) -> None:
        """Add the counts to Redis in one round trip and start again from zero."""
        if not self.counts:
            return
        with conn.pipeline(transaction=False) as pipe:
            for (name, labels), amount in self.counts.items():
                pipe.hincrbyfloat(KEY_PREFIX + name, SEPARATOR.join(labels), amount)
            pipe.execute()
        self.counts.clear()


def read(conn: redis.Redis) -> dict[str, dict[tuple[str, ...], float]]:
    """Every counter from Redis, by name and label values."""
    with conn.pipeline(transaction=False) as pipe:
        for name in COUNTERS:
            pipe.hgetall(KEY_PREFIX + name)
        hashes = pipe.execute()
    return {name: {tuple(k.decode().split(SEPARATOR)): float(v) for k, v in raw.items()}
            for name, raw in zip(COUNTERS, hashes, strict=True)}
