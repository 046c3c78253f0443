"""How a job ends when it cannot finish now: rescheduled for later, or failed for good."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NoReturn

import redis
from rq import Retry, get_current_job

from jobs import policy, records

log = logging.getLogger("b24cancel.jobs")


class RequestFailed(Exception):
    """The request ended without success and nothing more will be tried; the job goes to the failed registry."""


def defer(conn: redis.Redis, request_id: str, until: float, why: str, **fields: Any) -> Retry:
    """Save `fields`, show the request as retrying until `until`, and reschedule the job through RQ's scheduler.

    A returned `Retry` is counted apart from the enqueue-time one, so waiting for a limit never uses up
    the crash-retry budget.
    """
    records.save(conn, request_id, state="retrying", resume_at=f"{until:.3f}", waiting_for=why, **fields)
    records.increment(conn, request_id, "deferrals")
    delay = max(1, math.ceil(until - time.time()))
    log.info("job rescheduled", extra={"request_id": request_id, "delay_s": delay, "why": why})
    return Retry(max=policy.DEFER_MAX, interval=[delay])


def final_failure(message: str) -> NoReturn:
    """Fail the job for good: no RQ retry, one Sentry event, the job kept in the failed registry."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    raise RequestFailed(message)
