"""How a job ends when it cannot finish now: rescheduled for later, or failed for good."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NoReturn

import redis
from rq import Retry, get_current_job

from bitrix24.errors import OPERATING_LIMITED, RATE_LIMITED, Bitrix24Error
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


def retry_later(conn: redis.Redis, request_id: str, err: Bitrix24Error, counter: str, **fields: Any) -> Retry | None:
    """A Retry for an error worth trying again, or None when it is permanent or retries are used up.

    Limit answers (QUERY_LIMIT_EXCEEDED that outlasted the client's resends, OPERATION_TIME_LIMIT)
    never count against the request's retry budget; other transient errors do, with backoff.
    """
    if err.code == RATE_LIMITED:
        return defer(conn, request_id, time.time() + policy.RATE_LIMIT_DEFER, str(err), **fields)
    if err.code == OPERATING_LIMITED:
        return defer(conn, request_id, err.reset_at or time.time() + policy.OPERATING_DEFER, str(err), **fields)
    if err.retryable:
        failures = records.increment(conn, request_id, counter)
        if failures <= policy.TRANSIENT_RETRY_MAX:
            return defer(conn, request_id, time.time() + policy.transient_backoff(failures), str(err), **fields)
    return None


def final_failure(message: str) -> NoReturn:
    """Fail the job for good: no RQ retry, one Sentry event, the job kept in the failed registry."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    raise RequestFailed(message)
