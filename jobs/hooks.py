"""Failure paths RQ does not route through the job's own code: final crashes, abandoned jobs and killed
work-horses.

Every way RQ 3.0 gives up on a job ends its request here, with a report: a final raised failure, a job
timeout and an abandoned job reach `on_job_failure` (rq/worker/base.py `_finalize_failure`, rq/registry.py
`StartedJobRegistry.cleanup`); a killed work-horse reaches CancelWorker.handle_work_horse_killed. RQ's
limit on returned Retries would fail a job without either (rq/worker/base.py `handle_job_retry`), so our
jobs never let it run out (jobs/lifecycle.py `reschedule`).

Sentry's RQ integration only sees exceptions raised inside a job. A job whose worker was killed is
found later by RQ's maintenance (AbandonedJobError, through the job's failure callback); a work-horse
killed by a signal or the OOM killer is seen only by its parent (CancelWorker). Both are reported here.
And whatever ended a job for good, its request must not stay `running`: it is marked failed and, when
there are documents, reported, so the chat says what happened.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import redis
import sentry_sdk
from rq.exceptions import AbandonedJobError
from rq.job import Job

from jobs import policy, records
from jobs.details import STOPPED, UNANSWERED
from jobs.enqueue import enqueue_followup
from jobs.lifecycle import RequestFailed, lease_key

log = logging.getLogger("b24cancel.jobs")

# Jobs that end a request's processing when they fail for good, what failed (for the report), and the
# kind of lease each holds while it runs.
REQUEST_JOBS = {"jobs.cancel.cancel_documents": "cancel", "jobs.resolve.resolve_event": "resolve",
                "jobs.notify.post_report": "report"}
LEASES = {"jobs.cancel.cancel_documents": "cancel", "jobs.resolve.resolve_event": "resolve",
          "jobs.notify.post_report": "notify", "jobs.offline.pull_offline": "offline"}


def on_job_failure(job: Job, connection: Any, exc_type: type[BaseException] | None,
                   value: BaseException | None, traceback: TracebackType | None) -> None:
    """Failure callback of every job: report an abandoned job; end the request when nothing will retry it."""
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        report_lost_job(job, "abandoned: its worker stopped heartbeating (killed or lost)")
    if not job.retries_left and not (exc_type is not None and issubclass(exc_type, RequestFailed)):
        end_request(connection, job, exc_type.__name__ if exc_type else "unknown error")


def report_lost_job(job: Job, why: str) -> None:
    """One log line and one Sentry event for a job that died outside Python's reach."""
    final = not job.retries_left
    # A warning, not an error: Sentry's logging integration would turn an error line into a second event.
    log.warning("job lost", extra={"job_id": job.id, "why": why, "will_retry": not final})
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("job_id", job.id)
        scope.set_tag("func", job.func_name)
        sentry_sdk.capture_message(f"RQ job {job.func_name} {why}", level="error")


def drop_lease(conn: redis.Redis, job: Job) -> None:
    """A killed work-horse cannot release its request's lease: its parent does, so the retry need not wait."""
    kind = LEASES.get(job.func_name or "")
    if kind and job.args:
        conn.delete(lease_key(kind, str(job.args[0])))


def end_request(conn: redis.Redis, job: Job, why: str) -> None:
    """The job failed for good outside its own handling: mark its request failed and report what is known."""
    stage = REQUEST_JOBS.get(job.func_name or "")
    if stage is None or not job.args:
        return
    request_id = str(job.args[0])
    record = records.load(conn, request_id)
    if record is None or record.get("state") in ("done", "failed"):
        return
    detail = STOPPED.format(stage=stage, why=why)
    if stage == "report":
        records.save(conn, request_id, state="failed", report_error=detail, finished_at=records.now_text())
        return
    docs = record.get("documents") or []
    for doc in docs:
        if doc.get("outcome") is None:
            unsure = f" ({UNANSWERED})" if doc.pop("sent_at", None) or doc.pop("sent", None) else ""
            doc.update(outcome="failed", detail=detail + unsure)
    records.save(conn, request_id, documents=docs, state="failed", error=detail, finished_at=records.now_text())
    log.warning("request ended by a failed job", extra={"request_id": request_id, "job_id": job.id, "why": why})
    # Always reported, a failed resolve too (no documents: the report says the event's object was not read).
    enqueue_followup(conn, policy.NOTIFY_QUEUE, "jobs.notify.post_report", request_id,
                     policy.notify_job_id(request_id))
