"""Queue names, job ids and every retry, wait and retention number the jobs use, each with its reason."""

from __future__ import annotations

import random

CANCEL_QUEUE = "cancel"
NOTIFY_QUEUE = "notify"

# A cancel job makes a handful of HTTP calls with a 30 s read timeout each; 10 minutes is far past any
# honest run, and short enough that a stuck job is noticed.
JOB_TIMEOUT = 600
# Finished jobs are only a debugging aid: the request record (its own TTL) is the source of truth.
RESULT_TTL = 3600
# Failed jobs stay where `rq requeue` can replay them for a week, not RQ's default of a year.
FAILURE_TTL = 7 * 86400
# A request record (and its idempotency key) must outlive its failed job, or a replay would run a job
# whose record is gone. A job fails at most this long after its request came in (its deferrals waiting
# for limits, DEFER_MAX times up to OPERATING_DEFER, come to about a day and a half), so REQUEST_TTL_DAYS
# must be at least FAILURE_TTL plus this: the service refuses to start otherwise.
RECORD_OUTLIVES_FAILURE = 2 * 86400

# Crashes and abandoned jobs (a killed worker) are retried by RQ this often, at these intervals.
# Bitrix24 errors never use this budget: the job classifies them and reschedules itself.
CRASH_RETRY_MAX = 3
# Short enough that every crash, the third included, has its job running again within the 90 s the
# service promises (recovery_bound below); the job's own lease and ambiguity waits still hold it back.
CRASH_RETRY_INTERVALS = [10, 20, 30]

# Liveness after crashes (jobs/worker.py, jobs/scheduler.py, jobs/sweeper.py). The Procfile runs the worker
# with `--job-monitoring-interval 5 --maintenance-interval 10`; recovery_bound(5, 10) is 71 s.
# A running job's started-registry entry outlives its worker's last heartbeat by this (RQ: 60 s): long
# enough to ride out a Redis restart or failover of a few seconds, short enough to find a dead worker soon.
HEARTBEAT_GRACE = 20
# The scheduler lock (RQ: 61 s): the active scheduler refreshes it every second; a dead scheduler's queues
# are free after this, and another worker takes them at its next maintenance pass.
SCHEDULER_LOCK_SECONDS = 20
# The per-queue maintenance lock (RQ: 899 s, so a worker killed mid-pass stops all cleanup for 15
# minutes): a pass takes well under a second.
MAINTENANCE_LOCK_SECONDS = 10
# A job whose status and registries disagree (in no queue, no registry) is put back once it has been
# seen so at two passes this far apart; RQ's own moves between them are single transactions or milliseconds.
STRANDED_GRACE = 10
# How long a worker retries one Redis operation (heartbeat, maintenance, state) before it gives up on it
# and carries on, and the longest pause between tries, so that a returning Redis is noticed within it.
REDIS_OUTAGE_BUDGET = 30.0
REDIS_BACKOFF_CAP = 2.0
# RQ's scheduler looks for due jobs this often (seconds; RQScheduler's interval).
SCHEDULER_POLL = 1


def recovery_bound(job_monitoring_interval: float, maintenance_interval: float) -> float:
    """Worst case, in seconds, from a worker killed mid-job to that job queued to run again.

    Its last heartbeat came just before the kill, so its started-registry entry expires monitoring +
    grace later; a maintenance pass follows within maintenance + monitoring (a busy worker checks between
    heartbeats); RQ reschedules the job after its crash-retry interval and the scheduler polls. A scheduler
    that died too is replaced sooner (SCHEDULER_LOCK_SECONDS + one pass).
    """
    return (job_monitoring_interval + HEARTBEAT_GRACE + maintenance_interval + job_monitoring_interval
            + max(CRASH_RETRY_INTERVALS) + SCHEDULER_POLL)

# Transient Bitrix24 failures (5xx, timeouts, dropped connections): how many reschedules before the
# request is reported as failed, and the backoff base and cap in seconds (jittered).
TRANSIENT_RETRY_MAX = 6
TRANSIENT_BACKOFF_BASE = 2.0
TRANSIENT_BACKOFF_CAP = 300.0
# A job waiting for a limit (rate or operating budget) reschedules itself; this bounds how many
# times, so a portal blocked for days still ends in the failed registry instead of looping forever.
DEFER_MAX = 2000
# A QUERY_LIMIT_EXCEEDED that outlasted the client's resends: try again after this long (seconds).
RATE_LIMIT_DEFER = 10
# An OPERATION_TIME_LIMIT without a reset time: one bucket of Bitrix24's 10-minute window.
OPERATING_DEFER = 60
# One run of a request's job at a time: a lease that a heartbeat renews every third of its life while the job
# runs. It outlives one Bitrix24 call whatever happens to the heartbeat (bitrix24.client.CALL_DEADLINE_SECONDS,
# 60 s), and is short enough that a killed run's lease lapses (at most 75 s after the kill) by the time RQ runs
# the abandoned job again (at most 71 s, README "Liveness after crashes"): the request runs again within 90 s.
LEASE_SECONDS = 75
# The ambiguity rule: after a call that got no answer, nothing that depends on its effect (re-read, re-send,
# chat search) happens until the call can no longer be running on Bitrix24's side: its execution limit
# (the setting B24_EXECUTION_LIMIT, 60 s in the cloud) plus this margin, counted from when it was sent.
AMBIGUITY_MARGIN = 5.0
# A document's claim (jobs/claims.py) outlives the ambiguity window by this much: room for the rescheduled
# job to be picked up and to re-read the document before another request may take the document.
CLAIM_SLACK = 90.0
# A request waiting for another request's claim on a document looks again this often (seconds; only Redis
# is read until the claim is free).
CLAIM_RECHECK = 5
# How long a replica has to confirm a guarding write (REDIS_MIN_REPLICAS) before the write counts as lost.
REPLICA_WAIT_MS = 1000
# Waits up to this long sleep inside the job; longer ones reschedule it through RQ's scheduler.
MAX_SLEEP = 5.0

# Documents per list call, and per batch: Bitrix24 pages lists at 50 and refuses batches over 50
# commands. A cancel batch also reads the documents after the cancels (one command); the read before
# is a call of its own, so that its answer is not lost with the batch's.
BATCH_SIZE = 50
CANCELS_PER_BATCH = BATCH_SIZE - 1
# Documents one request may name (the intake refuses more).
MAX_DOCUMENTS = 500


# The first job of a request, by what the intake accepted: a cancel, or an event to resolve.
FIRST_JOBS = {"cancel": "jobs.cancel.cancel_documents", "resolve": "jobs.resolve.resolve_event"}


def first_job_id(kind: str, request_id: str) -> str:
    """The id of a request's first job (`cancel-<id>` or `resolve-<id>`)."""
    return f"{kind}-{request_id}"


def cancel_job_id(request_id: str) -> str:
    """The cancel job's id: derived from the request, so one request never has two cancel jobs."""
    return f"cancel-{request_id}"


def notify_job_id(request_id: str) -> str:
    """The report job's id: one per request."""
    return f"notify-{request_id}"


def transient_backoff(failures: int) -> int:
    """Seconds before the next try after `failures` transient failures: exponential, half of it random (equal jitter), >= 1."""
    ceiling = min(TRANSIENT_BACKOFF_CAP, TRANSIENT_BACKOFF_BASE * (2 ** max(failures - 1, 0)))
    return max(1, round(random.uniform(ceiling / 2, ceiling)))


def settled_after(sent_at: float, execution_limit: float) -> float:
    """When a call sent at `sent_at` (unix time) that got no answer can no longer be running on Bitrix24."""
    return sent_at + execution_limit + AMBIGUITY_MARGIN
