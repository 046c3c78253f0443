"""How a job ends when it cannot finish now: rescheduled for later, or failed for good."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import redis
from rq import Retry, get_current_job

from bitrix24.errors import OPERATING_LIMITED, RATE_LIMITED, Bitrix24Error
from jobs import policy, records

log = logging.getLogger("b24cancel.jobs")
T = TypeVar("T")


class RequestFailed(Exception):
    """The request ended without success and nothing more will be tried; the job goes to the failed registry."""


class LimitsOutlasted(Exception):
    """The job waited for a portal's limits DEFER_MAX times; it gives up so that a person looks."""


RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def lease_key(kind: str, request_id: str) -> str:
    """The Redis key of a request's lease for one kind of job (cancel, notify, resolve)."""
    return f"b24c:lease:{kind}:{request_id}"


class Lease:
    """One run at a time of one kind of job for one request (an abandoned job may be re-run while the
    original still runs: RQ is at-least-once)."""

    def __init__(self, conn: redis.Redis, kind: str, request_id: str) -> None:
        self.conn = conn
        self.key = lease_key(kind, request_id)
        self.token = uuid.uuid4().hex
        self.ms = policy.LEASE_SECONDS * 1000

    def acquire(self) -> bool:
        """Take the lease unless another run holds it."""
        return bool(self.conn.set(self.key, self.token, nx=True, px=self.ms))

    def renew(self) -> None:
        """Extend the lease we hold (called as the job saves progress)."""
        self.conn.eval(RENEW_LUA, 1, self.key, self.token, self.ms)

    def release(self) -> None:
        """Give the lease back, if it is still ours."""
        self.conn.eval(RELEASE_LUA, 1, self.key, self.token)

    def wait(self) -> Retry:
        """Reschedule this copy of the job for when the other run's lease ends.

        Each wait counts as one of the request's deferrals (only that counter is touched: the other run
        owns the record), so a lease that never ends still ends the request after DEFER_MAX waits.
        """
        remaining = self.conn.pttl(self.key)
        delay = max(1, math.ceil(remaining / 1000)) if remaining and remaining > 0 else 1
        request_id = self.key.rsplit(":", 1)[-1]  # lease_key() ends with the request id
        waited = records.increment(self.conn, request_id, "deferrals")
        if waited > policy.DEFER_MAX:
            give_up(f"request {request_id} waited {policy.DEFER_MAX} times (another run held it); giving up")
        log.info("another run holds the request; waiting", extra={"lease": self.key, "delay_s": delay})
        return reschedule(delay, policy.DEFER_MAX - waited)


def exclusively(conn: redis.Redis, kind: str, request_id: str,
                run: Callable[[Lease], T]) -> T | Retry:
    """Run `run(lease)` holding the request's lease for this kind of job, or wait for the other run."""
    lease = Lease(conn, kind, request_id)
    if not lease.acquire():
        return lease.wait()
    try:
        return run(lease)
    finally:
        lease.release()


def reschedule(delay: int, left: int) -> Retry:
    """The `Retry` a job returns to run again in `delay` seconds; RQ always honours it.

    RQ counts returned Retries in `job.number_of_retries` and never resets it (rq/job.py
    `_handle_retry_result`); once that count reaches the returned `Retry.max`, rq/worker/base.py
    `handle_job_retry` fails the job without calling its failure callback, and the request would stay
    `retrying` with no report. So RQ's count must never be what runs out: `max` is always one more than
    what RQ has counted (plus what our own budget has left, for RQ's log line), and our counters
    (`deferrals`, the transient budgets) decide when to stop, by ending the request themselves.
    """
    job = get_current_job()
    counted = (job.number_of_retries or 0) if job is not None else 0
    return Retry(max=counted + max(left, 1), interval=[max(1, delay)])


def give_up(message: str) -> NoReturn:
    """Our wait budget is spent: fail the job for good so the failure callback ends the request with a report."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    raise LimitsOutlasted(message)


def defer(conn: redis.Redis, request_id: str, until: float, why: str, **fields: Any) -> Retry:
    """Save `fields`, show the request as retrying until `until`, and reschedule the job through RQ's scheduler.

    A returned `Retry` is counted apart from the enqueue-time one, so waiting for a limit never uses up
    the crash-retry budget; and it is one RQ never refuses (see `reschedule`).
    """
    records.save(conn, request_id, state="retrying", resume_at=f"{until:.3f}", waiting_for=why, **fields)
    deferrals = records.increment(conn, request_id, "deferrals")
    if deferrals > policy.DEFER_MAX:
        give_up(f"request {request_id} waited {policy.DEFER_MAX} times ({why}); giving up")
    delay = max(1, math.ceil(until - time.time()))
    log.info("job rescheduled", extra={"request_id": request_id, "delay_s": delay, "why": why})
    return reschedule(delay, policy.DEFER_MAX - deferrals)


def retry_later(conn: redis.Redis, request_id: str, err: Bitrix24Error, counter: str,
                not_before: float | None = None, **fields: Any) -> Retry | None:
    """A Retry for an error worth trying again, or None when it is permanent or retries are used up.

    Limit answers (QUERY_LIMIT_EXCEEDED that outlasted the client's resends, OPERATION_TIME_LIMIT)
    never count against the request's retry budget; other transient errors do, with backoff.
    `not_before` (the ambiguity rule: when an unanswered call can no longer be running) delays the
    next try at least that long.
    """
    floor = not_before or 0.0
    if err.code == RATE_LIMITED:
        return defer(conn, request_id, max(floor, time.time() + policy.RATE_LIMIT_DEFER), str(err), **fields)
    if err.code == OPERATING_LIMITED:
        until = err.reset_at or time.time() + policy.OPERATING_DEFER
        return defer(conn, request_id, max(floor, until), str(err), **fields)
    if err.retryable:
        failures = records.increment(conn, request_id, counter)
        if failures <= policy.TRANSIENT_RETRY_MAX:
            until = max(floor, time.time() + policy.transient_backoff(failures))
            return defer(conn, request_id, until, str(err), **fields)
    return None


def final_failure(message: str) -> NoReturn:
    """Fail the job for good: no RQ retry, one Sentry event, the job kept in the failed registry."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0
    raise RequestFailed(message)
