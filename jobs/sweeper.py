"""Find jobs whose RQ status and registries disagree, and put them back where RQ will run them.

RQ keeps a job's state in two places: the `status` field of its hash, and the list or registry it sits in
(queue list, intermediate list, started, scheduled). Its cleanup trusts both to agree. They can part:
- `scheduled` in no scheduled registry: RQ 3.0.0's retry paths write the status outside the transaction
  that adds the registry entry (jobs.worker.CancelJob closes that for our workers; jobs written by any
  other RQ process, or before the fix, can still be left so);
- `queued` in no queue list: the job was popped (BLPOP, or BLMOVE into the intermediate list) by a worker
  that died, or lost its connection to a restarting Redis, before it registered the job as started. RQ
  rescues intermediate-list jobs only after two maintenance passes a minute apart, and BLPOP-ed ones never;
- `started` in no started registry: an entry lost with the last second of an AOF or a failover.

The check and the repair run in one Lua script per job, so they see one consistent state; and a job is
put back only when it was seen stranded at an earlier pass at least STRANDED_GRACE seconds before, so
RQ's own moves, which pass through such states for milliseconds, are never mistaken for strandings.
Put back means: a `scheduled` job into its scheduled registry, due now (the job itself re-checks any wait
that matters, as it must on any early run); a `queued` job onto its queue; a `started` job into its
started registry, already expired, so that RQ's abandoned-job cleanup retries it or fails it with its
failure callback (AbandonedJobError), as for a killed worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from jobs import policy

log = logging.getLogger("b24cancel.sweeper")

MARKER_PREFIX = "b24c:stranded:"
# A sighting is forgotten after this many graces, so that a job seen stranded long ago and consistent since
# (its marker outlived a pause in the passes) needs two fresh sightings again.
MARKER_LIFETIME_GRACES = 10
# Job hashes read per round trip while looking for candidates.
SCAN_BATCH = 1000
# The statuses that claim a place in a queue or registry.
CLAIMING = ("scheduled", "queued", "started")

# KEYS: job hash, queue list, intermediate list, scheduled registry, started registry, marker, RQ's queue set.
# ARGV: job id, now, grace, marker lifetime.  Returns 0 (left alone) or 1/2/3 (put back as scheduled/queued/started).
CHECK_AND_REPAIR = """
local id = ARGV[1]
local status = redis.call('HGET', KEYS[1], 'status')
local function running()
  local prefix = id .. ':'
  for _, member in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    if member == id or string.sub(member, 1, #prefix) == prefix then return true end
  end
  return false
end
local stranded = false
if status == 'scheduled' then
  stranded = not redis.call('ZSCORE', KEYS[4], id)
elseif status == 'queued' then
  stranded = (not redis.call('LPOS', KEYS[2], id)) and not running()
elseif status == 'started' then
  stranded = not running()
end
if not stranded then
  redis.call('DEL', KEYS[6])
  return 0
end
local now = tonumber(ARGV[2])
local seen = redis.call('GET', KEYS[6])
local tag = status .. ':'
if (not seen) or string.sub(seen, 1, #tag) ~= tag then
  redis.call('SET', KEYS[6], tag .. ARGV[2], 'EX', ARGV[4])
  return 0
end
if now - tonumber(string.sub(seen, #tag + 1)) < tonumber(ARGV[3]) then
  return 0
end
redis.call('DEL', KEYS[6])
if status == 'scheduled' then
  redis.call('ZADD', KEYS[4], math.floor(now), id)
  return 1
elseif status == 'queued' then
  redis.call('LREM', KEYS[3], 0, id)
  redis.call('RPUSH', KEYS[2], id)
  redis.call('SADD', KEYS[7], KEYS[2])
  return 2
end
redis.call('ZADD', KEYS[5], 0, id .. ':stranded')
return 3
"""
REPAIRS = {1: "scheduled", 2: "queued", 3: "started"}


def candidates(conn: redis.Redis, queue_names: Iterable[str]) -> list[tuple[str, str]]:
    """(job id, queue name) of every job of these queues whose status claims a place in a queue or registry."""
    wanted = set(queue_names)
    prefix = Job.redis_job_namespace_prefix
    found: list[tuple[str, str]] = []
    batch: list[str] = []

    def read(keys: list[str]) -> None:
        with conn.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, "status", "origin")
            rows = pipe.execute()
        for key, (status, origin) in zip(keys, rows):
            origin_name = origin.decode() if isinstance(origin, bytes) else origin
            status_name = status.decode() if isinstance(status, bytes) else status
            if origin_name in wanted and status_name in CLAIMING:
                found.append((key[len(prefix):], origin_name))

    for raw in conn.scan_iter(match=f"{prefix}*", count=SCAN_BATCH, _type="hash"):
        key = raw.decode() if isinstance(raw, bytes) else raw
        if ":" in key[len(prefix):]:
            continue  # a job's side keys (dependents, dependencies), not a job
        batch.append(key)
        if len(batch) >= SCAN_BATCH:
            read(batch)
            batch = []
    if batch:
        read(batch)
    return found


def sweep_stranded_jobs(conn: redis.Redis, queue_names: Iterable[str], now: float | None = None,
                        grace: float = policy.STRANDED_GRACE) -> dict[str, int]:
    """Put back the jobs of these queues seen stranded at an earlier pass `grace` s ago; count them by status."""
    moment = time.time() if now is None else now
    script = conn.register_script(CHECK_AND_REPAIR)
    jobs = candidates(conn, queue_names)
    put_back: dict[str, int] = {}
    if not jobs:
        return put_back
    queues = {name: Queue(name, connection=conn) for _, name in jobs}
    with conn.pipeline(transaction=False) as pipe:
        for job_id, name in jobs:
            queue = queues[name]
            keys = [Job.key_for(job_id), queue.key, queue.intermediate_queue_key,
                    ScheduledJobRegistry(queue=queue).key, StartedJobRegistry(queue=queue).key,
                    MARKER_PREFIX + job_id, Queue.redis_queues_keys]
            script(keys=keys, args=[job_id, f"{moment:.3f}", grace, int(grace * MARKER_LIFETIME_GRACES) + 1],
                   client=pipe)
        outcomes = pipe.execute()
    for (job_id, name), outcome in zip(jobs, outcomes):
        if outcome:
            status = REPAIRS[int(outcome)]
            put_back[status] = put_back.get(status, 0) + 1
            log.warning("stranded job put back", extra={"job_id": job_id, "queue": name, "status": status})
    return put_back
