"""Accepting a request in one Redis round trip: dedupe, request record and RQ job, atomically.

RQ's own `enqueue` costs several round trips and has no "only if this key is new". We build the
job with RQ (`Queue.create_job`, the JSON serializer) so it is a real RQ job that workers, `rq info`
and the failed registry understand, then write it with one Lua script. The script first looks up the
sender's idempotency key: a repeat with the same body gets the first request's id, a repeat with another
body is refused, and in both cases nothing is written. Otherwise it writes the record, the job and the
idempotency key (which maps to the new random request id), all or nothing.

Most of a job's fields are the same for every request (callbacks, retry policy, TTLs, origin). They
are taken once, at start-up, from a template job that RQ builds, and written into the script; a
request sends only what differs (its id, payload and times). `tests/test_units.py` checks that the
hash we write is the one RQ writes.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import redis
from redis.exceptions import NoScriptError
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.exceptions import DuplicateJobError
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from jobs import policy, records
from jobs.durability import durable

# Abandoned jobs (their worker was killed) do not reach RQ's exception handlers; this callback
# reports them (see jobs/hooks.py).
ON_FAILURE = Callback("jobs.hooks.on_job_failure")

# The job fields that differ per request; every other field comes from the template.
PER_REQUEST_JOB_FIELDS = ("data", "created_at", "enqueued_at", "description")
# The record fields that differ per request (state, attempts... are the same for every new record).
PER_REQUEST_RECORD_FIELDS = ("request", "documents", "created_at", "updated_at")
LUA_LITERAL = re.compile(r"^[\x20-\x7e]*$")

SUBMIT_SCRIPT = """
-- KEYS[1] request record, KEYS[2] job hash, KEYS[3] queue list, KEYS[4] set of queues,
-- KEYS[5] idempotency key (absent when the sender gave none)
-- ARGV[1] record TTL, ARGV[2] job id, ARGV[3] queue key, ARGV[4] request JSON, ARGV[5] documents JSON,
-- ARGV[6] unix time, ARGV[7] job data, ARGV[8] job time (RQ's format), ARGV[9] job description,
-- ARGV[10] request id, ARGV[11] the request's fingerprint
-- Returns {outcome, request id}: see SUBMIT_OUTCOMES.
if KEYS[5] then
  local seen = redis.call('HMGET', KEYS[5], 'id', 'fingerprint')
  if seen[1] then
    if seen[2] ~= ARGV[11] then
      return {2, seen[1]}
    end
    return {0, seen[1]}
  end
end
-- The ids are random, so these exist only if something else wrote them: never overwrite them.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return {3, ARGV[10]}
end
redis.call('HSET', KEYS[1], 'request', ARGV[4], 'documents', ARGV[5], 'created_at', ARGV[6],
           'updated_at', ARGV[6] %(record_constants)s)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('HSET', KEYS[2], 'data', ARGV[7], 'created_at', ARGV[8], 'enqueued_at', ARGV[8],
           'description', ARGV[9] %(job_constants)s)
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
if KEYS[5] then
  redis.call('HSET', KEYS[5], 'id', ARGV[10], 'fingerprint', ARGV[11])
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[1]))
end
return {1, ARGV[10]}
"""
# What the submit script answers, by its first value.
SUBMIT_OUTCOMES = {0: "duplicate", 1: "created", 2: "key_reused", 3: "conflict"}



Outcome = Literal["created", "duplicate", "key_reused", "conflict"]


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submit and the request id it concerns.

    `created`: a new request; `duplicate`: a repeat of the key with the same body (the first request's
    id); `key_reused`: the key was used with another body (the first request's id, not to be shown);
    `conflict`: the new id's record or job hash already existed (written by something else), nothing written.
    """

    request_id: str
    outcome: Outcome

    @property
    def created(self) -> bool:
        return self.outcome == "created"

    @classmethod
    def read(cls, reply: list[Any]) -> Submitted:
        """The outcome from the submit script's reply."""
        code, request_id = reply
        text = request_id.decode() if isinstance(request_id, bytes) else str(request_id)
        return cls(request_id=text, outcome=SUBMIT_OUTCOMES[int(code)])  # type: ignore[arg-type]


def compress(data: bytes) -> bytes:
    """A job's `data` as RQ stores it (zlib, which `zlib.decompress` reads), with a 512-byte window.

    `zlib.compress` sets up a 256 KiB state for every call, which costs more than the rest of the job: a
    job's data is under 100 bytes, so a small window and memory level compress it as well, much faster.
    """
    packer = zlib.compressobj(1, zlib.DEFLATED, 9, 1)
    return packer.compress(data) + packer.flush()


def build_job(queue: Queue, func: str, request_id: str, job_id: str) -> Any:
    """The RQ job for `func(request_id)` as RQ's `enqueue` would write it."""
    job = queue.create_job(
        func, args=(request_id,), job_id=job_id, timeout=policy.JOB_TIMEOUT,
        result_ttl=policy.RESULT_TTL, failure_ttl=policy.FAILURE_TTL,
        retry=Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS),
        on_failure=ON_FAILURE, description=f"{func.rsplit('.', 1)[-1]}({request_id})",
    )
    # What Queue.enqueue_job sets before writing (without its INFO call for the server's version).
    job.origin = queue.name
    job.enqueued_at = now()
    job._status = JobStatus.QUEUED
    return job


def _lua_pairs(fields: dict[str, Any], encoder: Any) -> str:
    """`, 'name', 'value'` for each constant field, as Lua literals."""
    parts = []
    for name, value in fields.items():
        text = encoder.encode(value).decode("ascii")
        if not LUA_LITERAL.match(text) or not LUA_LITERAL.match(name):
            raise ValueError(f"job field {name} cannot be written as a Lua literal")
        parts.append(f", {json.dumps(name)}, {json.dumps(text)}")
    return "".join(parts)


class Submitter:
    """Writes requests and their first job; built once per process, used by every request."""

    def __init__(self, conn: redis.Redis, record_ttl: int, min_replicas: int = 0) -> None:
        self.conn = conn
        self.record_ttl = record_ttl
        self.min_replicas = min_replicas
        self.queues = {name: Queue(name, connection=conn, serializer=JSONSerializer)
                       for name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE)}
        self._scripts: dict[tuple[str, str], Any] = {}
        for func in policy.FIRST_JOBS.values():  # built here, not on a request: the first pays nothing extra
            self._script(self.queues[policy.CANCEL_QUEUE], func)

    def _script(self, queue: Queue, func: str) -> Any:
        """The submit script for jobs of `func` on `queue`, with the constant fields written in."""
        key = (queue.name, func)
        if key not in self._scripts:
            template = build_job(queue, func, "0" * 32, "template").to_dict()
            record = records.new_record({})
            encoder = self.conn.get_encoder()
            source = SUBMIT_SCRIPT % {
                "job_constants": _lua_pairs({k: v for k, v in template.items()
                                             if k not in PER_REQUEST_JOB_FIELDS}, encoder),
                "record_constants": _lua_pairs({k: v for k, v in record.items()
                                                if k not in PER_REQUEST_RECORD_FIELDS}, encoder),
            }
            self._scripts[key] = self.conn.register_script(source)
        return self._scripts[key]

    def submit(self, request_id: str, request: dict[str, Any], func: str, job_id: str,
               queue: str = policy.CANCEL_QUEUE, idempotency_key: str | None = None) -> Submitted:
        """Write the record, enqueue `func(request_id)` and map the idempotency key to it, unless the key is
        known already; one round trip (with REDIS_MIN_REPLICAS, the same round trip carries a WAIT)."""
        q = self.queues[queue]
        script = self._script(q, func)
        record = records.new_record(request)
        data = compress(JSONSerializer.dumps([func, None, [request_id], {}]))
        keys = [records.request_key(request_id), f"{q.job_class.redis_job_namespace_prefix}{job_id}", q.key,
                Queue.redis_queues_keys]
        if idempotency_key:
            keys.append(idempotency_key)
        args = [self.record_ttl, job_id, q.key, record["request"], record["documents"], record["created_at"],
                data, utcformat(now()), f"{func.rsplit('.', 1)[-1]}({request_id})", request_id,
                records.fingerprint(request, record["request"]) if idempotency_key else ""]
        return Submitted.read(self._run(script, keys=keys, args=args))

    def _run(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run the submit script; with REDIS_MIN_REPLICAS > 0 its EVALSHA and a WAIT share one pipeline (one
        round trip), and NotReplicated means the write may exist on the primary only."""
        if not self.min_replicas:
            # EVALSHA through execute_command (redis-py's retries and pool, without Script.__call__'s wrappers);
            # a Redis whose script cache is empty (restarted, or a new primary) gets the script once.
            try:
                return self.conn.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.conn.script_load(script.script)
                return self.conn.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

        def write(pipe: Any) -> None:
            # EVALSHA directly: a Script registered on a pipeline costs a SCRIPT EXISTS round trip per execute.
            pipe.evalsha(script.sha, len(keys), *keys, *args)

        try:
            return durable(self.conn, self.min_replicas, write)[0]
        except NoScriptError:
            # A new primary after a failover starts with an empty script cache; the script did not run.
            self.conn.script_load(script.script)
            return durable(self.conn, self.min_replicas, write)[0]


# A follow-up job with the same id in one of these states is already on its way: leave it.
PENDING = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED)


def enqueue_followup(conn: redis.Redis, queue: str, func: str, request_id: str, job_id: str) -> bool:
    """From inside a job: enqueue the request's next job (report after cancel, cancel after resolve).

    At most one such job is pending: RQ would push a second copy of the same id onto the queue (and run
    it twice), so a pending one is left alone, and a finished one (an earlier round) is replaced.
    Returns whether a job was enqueued.
    """
    q = Queue(queue, connection=conn, serializer=JSONSerializer)
    for _ in range(2):
        try:
            q.enqueue(func, request_id, job_id=job_id, job_timeout=policy.JOB_TIMEOUT, result_ttl=policy.RESULT_TTL,
                      failure_ttl=policy.FAILURE_TTL, on_failure=ON_FAILURE, unique=True,
                      retry=Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS))
            return True
        except DuplicateJobError:
            try:
                existing = q.fetch_job(job_id)
            except Exception:  # noqa: BLE001 - an unreadable leftover hash is replaced like a finished one
                existing = None
            if existing is not None and existing.get_status(refresh=False) in PENDING:
                return False
            if existing is not None:
                existing.delete()  # an earlier round's finished or failed job, with its registry entries
            else:
                conn.delete(f"{q.job_class.redis_job_namespace_prefix}{job_id}")
    return False
