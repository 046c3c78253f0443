"""Accepting a request in one Redis round trip: dedupe, request record and RQ job, atomically.

RQ's own `enqueue` costs several round trips and has no "only if this key is new". We build the
job with RQ (`Queue.create_job`, the JSON serializer) so it is a real RQ job that workers, `rq info`
and the failed registry understand, then write it with one Lua script that first checks the request
record: if it exists, the request is a repeat and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.serializers import JSONSerializer

from jobs import policy, records

SUBMIT_SCRIPT = """
-- KEYS[1] request record, KEYS[2] job hash, KEYS[3] queue list, KEYS[4] set of queues
-- ARGV[1] record TTL, ARGV[2] job id, ARGV[3] queue key, ARGV[4] count of record args, then record
-- field/value pairs, then job field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + n))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('HSET', KEYS[2], unpack(ARGV, 5 + n))
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
return 1
"""

# Abandoned jobs (their worker was killed) do not reach RQ's exception handlers; this callback
# reports them (see jobs/hooks.py).
ON_FAILURE = Callback("jobs.hooks.on_job_failure")


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submit: the request id and whether this call created it."""

    request_id: str
    created: bool


class Submitter:
    """Writes requests and their first job; built once per process, used by every request."""

    def __init__(self, conn: redis.Redis, record_ttl: int) -> None:
        self.conn = conn
        self.record_ttl = record_ttl
        self.queues = {name: Queue(name, connection=conn, serializer=JSONSerializer)
                       for name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE)}
        self.script = conn.register_script(SUBMIT_SCRIPT)

    def submit(self, request_id: str, request: dict[str, Any], func: str, job_id: str,
               queue: str = policy.CANCEL_QUEUE) -> Submitted:
        """Write the record and enqueue `func(request_id)` unless the record exists; one round trip."""
        q = self.queues[queue]
        job = q.create_job(
            func, args=(request_id,), job_id=job_id, timeout=policy.JOB_TIMEOUT,
            result_ttl=policy.RESULT_TTL, failure_ttl=policy.FAILURE_TTL,
            retry=Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS),
            on_failure=ON_FAILURE, description=f"{func.rsplit('.', 1)[-1]}({request_id})",
        )
        q._prepare_for_queue(job)  # origin, enqueued_at, timeout, status: what Queue.enqueue_job sets
        record_args: list[Any] = []
        for name, value in records.new_record(request).items():
            record_args += [name, value]
        job_args: list[Any] = []
        for name, value in job.to_dict().items():
            job_args += [name, value]
        created = self.script(
            keys=[records.request_key(request_id), job.key, q.key, Queue.redis_queues_keys],
            args=[self.record_ttl, job.id, q.key, len(record_args), *record_args, *job_args],
        )
        return Submitted(request_id=request_id, created=bool(created))


def enqueue_followup(conn: redis.Redis, queue: str, func: str, request_id: str, job_id: str) -> None:
    """From inside a job: enqueue the request's next job (report after cancel, cancel after resolve)."""
    Queue(queue, connection=conn, serializer=JSONSerializer).enqueue(
        func, request_id, job_id=job_id, job_timeout=policy.JOB_TIMEOUT, result_ttl=policy.RESULT_TTL,
        failure_ttl=policy.FAILURE_TTL, on_failure=ON_FAILURE,
        retry=Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS))
