"""Waiting out a Redis restart or failover of a few seconds in the worker and its scheduler.

RQ 3.0.0 retries only its dequeue on a Redis error; anywhere else (the heartbeat while a job runs, a
maintenance pass, the scheduler's loop) the first `ConnectionError` ends the process and leaves its job
abandoned. These helpers retry an idempotent Redis operation with a bounded backoff instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from jobs import policy

T = TypeVar("T")

# Errors that mean "Redis is not there right now" (a restart, a failover, AOF still loading: BusyLoadingError
# is a ConnectionError; READONLY is a replica promoted or demoted under us), not a bug in the command.
REDIS_OUTAGE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError,
                                                    redis.exceptions.TimeoutError,
                                                    redis.exceptions.ReadOnlyError)


class Backoff:
    """Pauses of 0.25 s doubling up to REDIS_BACKOFF_CAP, so that a returning Redis is noticed quickly."""

    first = 0.25

    def __init__(self) -> None:
        self.pause = self.first

    def next(self) -> float:
        """The pause before the next try."""
        pause = self.pause
        self.pause = min(self.pause * 2, policy.REDIS_BACKOFF_CAP)
        return pause

    def reset(self) -> None:
        """Start again from the shortest pause (after a success)."""
        self.pause = self.first


def ride_out(action: Callable[[], T], what: str, log: logging.Logger,
             budget: float = policy.REDIS_OUTAGE_BUDGET) -> T | None:
    """Run an idempotent Redis `action`, retrying through an outage for up to `budget` s; None if it never worked."""
    deadline = time.monotonic() + budget
    backoff = Backoff()
    failures = 0
    while True:
        try:
            result = action()
        except REDIS_OUTAGE_ERRORS as exc:
            failures += 1
            pause = backoff.next()
            if time.monotonic() + pause > deadline:
                log.warning("%s given up after %d tries: Redis unreachable (%s)", what, failures, exc)
                return None
            if failures == 1:
                log.warning("%s: Redis unreachable (%s); retrying for up to %.0f s", what, exc, budget)
            time.sleep(pause)
            continue
        if failures:
            log.warning("%s done after %d failed tries: Redis is back", what, failures)
        return result
