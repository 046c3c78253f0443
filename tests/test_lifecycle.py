"""How jobs end when they cannot finish now: retry budgets, limit deferrals and backoff (real Redis)."""

from __future__ import annotations

import time

import pytest
import redis

from bitrix24.errors import Bitrix24Error
from jobs import policy, records
from jobs.lifecycle import retry_later


def new_request(conn: redis.Redis, request_id: str = "a" * 32) -> str:
    conn.hset(records.request_key(request_id), mapping=records.new_record({"portal": "p", "document_ids": [1]}))
    return request_id


def error(code: str, retryable: bool, http_status: int = 500) -> Bitrix24Error:
    return Bitrix24Error(code, "x", http_status, "catalog.document.cancel", retryable=retryable)


def test_transient_errors_use_the_retry_budget_then_give_up(redis_conn: redis.Redis) -> None:
    request_id = new_request(redis_conn)
    for attempt in range(1, policy.TRANSIENT_RETRY_MAX + 1):
        retry = retry_later(redis_conn, request_id, error("INTERNAL_SERVER_ERROR", True), "transient_failures")
        assert retry is not None, attempt
        record = records.load(redis_conn, request_id)
        assert record is not None and record["state"] == "retrying"
        assert float(record["resume_at"]) > time.time()
    assert retry_later(redis_conn, request_id, error("INTERNAL_SERVER_ERROR", True), "transient_failures") is None


def test_limit_answers_never_use_the_retry_budget(redis_conn: redis.Redis) -> None:
    request_id = new_request(redis_conn)
    for _ in range(policy.TRANSIENT_RETRY_MAX * 3):
        assert retry_later(redis_conn, request_id, error("QUERY_LIMIT_EXCEEDED", True, 503), "transient_failures")
    reset_at = time.time() + 120
    limited = error("OPERATION_TIME_LIMIT", True, 429)
    limited.reset_at = reset_at
    retry = retry_later(redis_conn, request_id, limited, "transient_failures")
    assert retry is not None and retry.intervals[0] >= 119
    record = records.load(redis_conn, request_id)
    assert record is not None and record["transient_failures"] == 0
    assert record["deferrals"] == policy.TRANSIENT_RETRY_MAX * 3 + 1


def test_permanent_errors_are_not_retried(redis_conn: redis.Redis) -> None:
    request_id = new_request(redis_conn)
    assert retry_later(redis_conn, request_id, error("NO_AUTH_FOUND", False, 401), "transient_failures") is None


def test_backoff_grows_with_jitter_and_stays_capped() -> None:
    first = [policy.transient_backoff(1) for _ in range(50)]
    fifth = [policy.transient_backoff(5) for _ in range(50)]
    late = [policy.transient_backoff(30) for _ in range(50)]
    assert max(first) <= 2 and min(fifth) >= 16 and len(set(fifth)) > 1
    assert max(late) <= policy.TRANSIENT_BACKOFF_CAP


def test_waiting_for_another_run_counts_and_ends_after_the_wait_budget(redis_conn: redis.Redis) -> None:
    from jobs.lifecycle import Lease, LimitsOutlasted, lease_key

    request_id = new_request(redis_conn)
    redis_conn.set(lease_key("cancel", request_id), "another-run", px=5000)
    retry = Lease(redis_conn, "cancel", request_id).wait()
    assert 4 <= retry.intervals[0] <= 5 and retry.max >= 1  # waits for the other run's lease to end
    record = records.load(redis_conn, request_id)
    assert record is not None and record["deferrals"] == 1
    redis_conn.hset(records.request_key(request_id), "deferrals", policy.DEFER_MAX)
    with pytest.raises(LimitsOutlasted):
        Lease(redis_conn, "cancel", request_id).wait()


@pytest.mark.parametrize("retries_left", [0, 1])
def test_a_job_rq_fails_from_its_intermediate_queue_ends_its_request_when_final(
        redis_conn: redis.Redis, retries_left: int) -> None:
    """RQ's intermediate-queue cleanup fails a job with no callback; the worker ends the request itself."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from jobs.worker import STUCK_IN_INTERMEDIATE_QUEUE, CancelWorker

    request_id = new_request(redis_conn, "b" * 32)
    queue = Queue(policy.CANCEL_QUEUE, connection=redis_conn, serializer=JSONSerializer)
    job = queue.enqueue("jobs.cancel.cancel_documents", request_id, job_id=policy.cancel_job_id(request_id))
    job.retries_left = retries_left
    job.retry_intervals = [10]
    job.save()
    worker = CancelWorker([queue], connection=redis_conn, serializer=JSONSerializer)
    worker.handle_job_failure(job, queue, exc_string=STUCK_IN_INTERMEDIATE_QUEUE)
    record = records.load(redis_conn, request_id)
    assert record is not None
    notify = Queue(policy.NOTIFY_QUEUE, connection=redis_conn, serializer=JSONSerializer)
    if retries_left:  # RQ retries it: the request goes on, nothing is reported yet
        assert record["state"] == "queued"
        assert notify.count == 0
        return
    assert record["state"] == "failed"
    assert record["documents"][0]["outcome"] == "failed"
    assert "intermediate queue" in record["error"]
    assert notify.job_ids == [policy.notify_job_id(request_id)]
