"""Failure paths RQ does not route through its exception handlers: abandoned jobs and killed work-horses.

Sentry's RQ integration only sees exceptions raised inside a job. A job whose worker was killed is
found later by RQ's maintenance (AbandonedJobError, through the job's failure callback); a work-horse
killed by a signal or the OOM killer is seen only by its parent (CancelWorker). Both are reported here.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import sentry_sdk
from rq.exceptions import AbandonedJobError
from rq.job import Job

log = logging.getLogger("b24cancel.jobs")


def on_job_failure(job: Job, connection: Any, exc_type: type[BaseException] | None,
                   value: BaseException | None, traceback: TracebackType | None) -> None:
    """Failure callback of every job: report an abandoned job (other failures reach Sentry on their own)."""
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        report_lost_job(job, "abandoned: its worker stopped heartbeating (killed or lost)")


def report_lost_job(job: Job, why: str) -> None:
    """One log line and one Sentry event for a job that died outside Python's reach."""
    final = not job.retries_left
    # A warning, not an error: Sentry's logging integration would turn an error line into a second event.
    log.warning("job lost", extra={"job_id": job.id, "why": why, "will_retry": not final})
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("job_id", job.id)
        scope.set_tag("func", job.func_name)
        sentry_sdk.capture_message(f"RQ job {job.func_name} {why}", level="error")
