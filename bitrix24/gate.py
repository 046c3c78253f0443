"""The limits one portal's calls pass through: the shared leaky bucket and the operating budget.

Short waits sleep here; a wait longer than `max_sleep`, or a paused method, raises Throttled so
the caller reschedules its job instead of holding a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from bitrix24.client import Observer
from bitrix24.errors import Throttled
from bitrix24.limits import LeakyBucket, OperatingBudget, bucket_limits

log = logging.getLogger("b24cancel.limits")

# After a QUERY_LIMIT_EXCEEDED we did not cause, run slower for this long (another app shares the portal).
PENALTY_SECONDS = 30.0


class PortalGate:
    """Implements bitrix24.client.Gate over Redis for one portal."""

    def __init__(self, portal: str, bucket: LeakyBucket, budget: OperatingBudget, max_sleep: float,
                 sleep: Callable[[float], None] = time.sleep, observe: Observer | None = None) -> None:
        self.portal = portal
        self.observe = observe
        self.bucket = bucket
        self.budget = budget
        self.max_sleep = max_sleep
        self.sleep = sleep

    @classmethod
    def for_portal(cls, conn: redis.Redis, portal: Any, settings: Any, max_sleep: float,
                   observe: Observer | None = None) -> PortalGate:
        """The gate for a configured portal, with its plan's limits and the settings' overrides."""
        rate, capacity = bucket_limits(portal.plan, settings.b24_rate_limit, settings.b24_rate_burst,
                                       settings.b24_rate_headroom)
        return cls(portal.name, LeakyBucket(conn, portal.name, rate, capacity),
                   OperatingBudget(conn, portal.name, limit=settings.b24_operating_limit,
                                   window=settings.b24_operating_window, margin=settings.b24_operating_margin),
                   max_sleep, observe=observe)

    def before(self, methods: Sequence[str]) -> None:
        """Refuse a paused method, then take one token (sleeping a short wait)."""
        paused, resumed = self.budget.check(list(methods))
        for method in resumed:
            log.info("portal method resumed", extra={"portal": self.portal, "method": method})
        for method, until in paused.items():
            self._count("limiter_deferrals", "operating")
            raise Throttled(until, f"{method} paused by the operating-time budget")
        wait = self.bucket.reserve(1, max_wait=self.max_sleep)
        if wait > self.max_sleep:
            self._count("limiter_deferrals", "rate")
            raise Throttled(time.time() + wait, "request-rate limit")
        if wait > 0:
            self._count("limiter_wait_seconds", amount=wait)
            self.sleep(wait)

    def after(self, method: str, timing: Mapping[str, Any] | None) -> None:
        """Record the answer's operating time; log when the method enters a pause."""
        if not timing:
            return
        pause = self.budget.record(method, _number(timing.get("operating")), _number(timing.get("operating_reset_at")))
        if pause is not None and pause.new:
            self.budget.announce(method)
            log.warning("portal method paused", extra={"portal": self.portal, "method": method,
                                                       "until": round(pause.until), "why": "operating budget"})

    def rate_limited(self) -> None:
        """The portal said QUERY_LIMIT_EXCEEDED anyway: drain our bucket and slow down for a while."""
        log.warning("portal answered QUERY_LIMIT_EXCEEDED; slowing down", extra={"portal": self.portal,
                                                                                   "for_s": PENALTY_SECONDS})
        self.bucket.penalize(PENALTY_SECONDS)

    def operating_limited(self, method: str, reset_at: float | None) -> float:
        """The portal blocked the method: pause it until the reset (the last known one when not given)."""
        pause = self.budget.pause(method, reset_at)
        if pause.new:
            self.budget.announce(method)
            log.warning("portal method paused", extra={"portal": self.portal, "method": method,
                                                       "until": round(pause.until), "why": "OPERATION_TIME_LIMIT"})
        return pause.until


    def _count(self, name: str, *labels: str, amount: float = 1.0) -> None:
        if self.observe:
            self.observe(name, self.portal, *labels, amount=amount)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
