"""How a job ends when it cannot finish now: rescheduled for later, or failed for good."""

from __future__ import annotations

import contextvars
import logging
import math
import threading
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


class LeaseLost(Exception):
    """This run no longer holds its request's lease (another copy may run): it must make no further effect."""


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
    original still runs: RQ is at-least-once).

    While the job runs, a heartbeat thread renews the lease every third of its life, so it never lapses
    under a live job, even through one long call. A renewal that finds the lease gone or another run's
    marks it lost: `check()` then raises LeaseLost, and every send checks first.
    """

    def __init__(self, conn: redis.Redis, kind: str, request_id: str, seconds: float | None = None) -> None:
        self.conn = conn
        self.key = lease_key(kind, request_id)
        self.token = uuid.uuid4().hex
        self.ms = int((seconds or policy.LEASE_SECONDS) * 1000)
        self.lost = False
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lease unless another run holds it."""
        taken = bool(self.conn.set(self.key, self.token, nx=True, px=self.ms))
        self._renewed = time.monotonic()
        return taken

    def renew(self) -> bool:
        """Extend the lease we hold; False (and marked lost) when it is no longer ours."""
        if self.lost:
            return False
        started = time.monotonic()
        if self.conn.eval(RENEW_LUA, 1, self.key, self.token, self.ms):
            self._renewed = started
            return True
        self.lost = True
        log.warning("lease lost: another run may hold the request; no further effects from this one",
                    extra={"lease": self.key})
        return False

    def check(self) -> None:
        """Raise LeaseLost unless the lease is surely still ours (renewed within its life)."""
        if self.lost or time.monotonic() - self._renewed >= self.ms / 1000:
            raise LeaseLost(f"{self.key} is no longer held by this run")

    def release(self) -> None:
        """Give the lease back, if it is still ours."""
        self.conn.eval(RELEASE_LUA, 1, self.key, self.token)

    def start_heartbeat(self) -> None:
        """Renew the lease from a daemon thread every third of its life until `stop_heartbeat`."""
        self._heart = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.key}", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        """Stop renewing (the job is over); waits for a renewal in progress."""
        self._stop.set()
        if self._heart is not None:
            self._heart.join(timeout=self.ms / 1000)

    def _beat(self) -> None:
        interval = self.ms / 1000 / LEASE_RENEWALS
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except redis.RedisError as exc:  # try again next beat; check() fails once the lease may have lapsed
                log.warning("lease not renewed: Redis unreachable", extra={"lease": self.key, "error": str(exc)})

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


# Renewals per lease life: a renewal may fail twice (a Redis blip) before the lease could lapse.
LEASE_RENEWALS = 3
# The lease of the job running in this work-horse, for the client's check before each send.
_current_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("current_lease", default=None)


def check_current_lease() -> None:
    """Raise LeaseLost if the job running here has lost its lease (the client calls it before each send)."""
    lease = _current_lease.get()
    if lease is not None:
        lease.check()


def exclusively(conn: redis.Redis, kind: str, request_id: str,
                run: Callable[[Lease], T]) -> T | Retry:
    """Run `run(lease)` holding the request's lease for this kind of job, or wait for the other run.

    The lease is renewed by a heartbeat while `run` runs; if it is lost, `run` is stopped at its next
    send (LeaseLost) and this copy waits for the run that holds it now.
    """
    lease = Lease(conn, kind, request_id)
    if not lease.acquire():
        return lease.wait()
    lease.start_heartbeat()
    current = _current_lease.set(lease)
    try:
        return run(lease)
    except LeaseLost:
        log.warning("run stopped: its lease was lost", extra={"lease": lease.key})
        return lease.wait()
    finally:
        _current_lease.reset(current)
        lease.stop_heartbeat()
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
