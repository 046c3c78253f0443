"""The worker class the Procfile runs."""

from __future__ import annotations

from typing import Any

import redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import HerokuWorker

from jobs.context import worker_context
from jobs.hooks import drop_lease, end_request, report_lost_job


class CancelWorker(HerokuWorker):
    """RQ's HerokuWorker (a SIGTERM lets the job fail into its retry at once) that also reports
    work-horses killed by a signal, which RQ does not pass to exception handlers or callbacks."""

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Run the job (in the work-horse), then add what it counted to the shared metrics."""
        try:
            return super().perform_job(job, queue, execution)
        finally:
            try:
                worker_context().tally.flush(job.connection)
            except redis.RedisError:
                self.log.warning("metrics not flushed: Redis unreachable")

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        report_lost_job(job, f"work-horse killed (wait status {ret_val})")
        drop_lease(self.connection, job)
        if not job.retries_left:
            end_request(self.connection, job, f"work-horse killed (wait status {ret_val})")
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
