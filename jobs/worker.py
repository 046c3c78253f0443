"""The worker class the Procfile runs, and the job class it uses.

Besides reporting killed work-horses, CancelWorker keeps jobs alive through crashes (README, Reliability):
- an abandoned job (its worker killed whole) is found within policy.recovery_bound() seconds: its
  started-registry entry lasts one monitoring interval plus HEARTBEAT_GRACE (RQ: plus 60 s), and a
  maintenance pass runs every maintenance interval whether the worker is idle (its dequeue waits no longer
  than that, RQ's waits worker_ttl - 15 = 405 s) or busy (checked between heartbeats while a job runs; RQ
  runs maintenance only between jobs);
- the scheduler is jobs.scheduler.LiveScheduler, and every worker without one tries for its locks at each
  pass; the per-queue maintenance lock lasts MAINTENANCE_LOCK_SECONDS (RQ: 899 s);
- Redis errors in heartbeats, maintenance and state writes are waited out (jobs.outage) instead of ending
  the worker and abandoning its job;
- CancelJob writes a retried job's status in the same transaction as its scheduled-registry entry, and each
  pass runs jobs.sweeper, which puts back any job whose status and registries disagree;
- each pass also starts the scheduled offline-queue pull of any installed portal that has none (jobs.offline).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
from redis.client import Pipeline
from rq import worker_registration
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.executions import Execution
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import HerokuWorker, WorkerStatus

from jobs import policy
from jobs.context import worker_context
from jobs.hooks import drop_lease, end_request, report_lost_job
from jobs.offline import keep_polling
from jobs.outage import REDIS_OUTAGE_ERRORS, ride_out
from jobs.scheduler import LiveScheduler
from jobs.sweeper import sweep_stranded_jobs

SWEEP_TURN_KEY = "b24c:sweeper:turn"
# What RQ 3.0.0 passes as exc_string when its maintenance fails a job left in a queue's intermediate list.
STUCK_IN_INTERMEDIATE_QUEUE = "Job was stuck in intermediate queue."
# Free a maintenance lock only if it is still ours (it may have lapsed and been taken by another worker).
RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class CancelJob(Job):
    """RQ's Job whose retry paths write the status in the transaction that files the job for its retry.

    RQ 3.0.0's `Job._handle_retry_result` (a job returned `Retry`: every wait of ours) and `Job.retry` (a
    crash or an abandoned job) call `set_status(SCHEDULED)` straight to Redis, while the scheduled-registry
    entry waits in the caller's pipeline. A kill between the two left a job `scheduled` in no registry,
    which nothing ever ran again. (The retry-result path lost its `pipeline=` in rq/rq PR #2373; RQ's own
    main branch still has it.) Here the status goes into that same pipeline.
    """

    _status_pipeline: Pipeline | None = None

    def set_status(self, status: JobStatus, pipeline: Pipeline | None = None) -> None:
        """RQ's set_status, into the retry's pipeline while one is open."""
        super().set_status(status, pipeline=pipeline if pipeline is not None else self._status_pipeline)

    @contextlib.contextmanager
    def _statuses_in(self, pipeline: Pipeline) -> Iterator[None]:
        self._status_pipeline = pipeline
        try:
            yield
        finally:
            self._status_pipeline = None

    def retry(self, queue: Queue, pipeline: Pipeline) -> None:
        """RQ's retry (crash or abandoned job), with the status in `pipeline`."""
        with self._statuses_in(pipeline):
            super().retry(queue, pipeline)

    def _handle_retry_result(self, queue: Queue, pipeline: Pipeline, retry: Retry,  # type: ignore[override]
                             **kwargs: Any) -> None:
        """RQ's handling of a returned Retry, with the status in `pipeline` (RQ's other arguments as given)."""
        with self._statuses_in(pipeline):
            super()._handle_retry_result(queue=queue, pipeline=pipeline, retry=retry, **kwargs)


class CancelWorker(HerokuWorker):
    """RQ's HerokuWorker (a SIGTERM lets the job fail into its retry at once) that also reports work-horses
    killed by a signal, which RQ does not pass to exception handlers or callbacks, and keeps jobs alive
    through crashes and Redis restarts (module docstring)."""

    job_class = CancelJob
    # RQ's own dequeue loop retries a lost Redis with pauses doubling up to 60 s; a restarted Redis should
    # be noticed within seconds.
    max_connection_wait_time = policy.REDIS_BACKOFF_CAP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `rq worker` passes its --job-class (rq.job.Job by default) to the worker and its queues: the
        # retry fix must hold however the worker is started.
        if not issubclass(self.job_class, CancelJob):
            self.job_class = CancelJob
            for queue in self.queues:
                queue.job_class = CancelJob

    @property
    def dequeue_timeout(self) -> int:
        """An idle worker wakes for maintenance every maintenance interval (RQ: worker_ttl - 15 s)."""
        return max(1, min(self.worker_ttl - 15, int(self.maintenance_interval)))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """A running job's started-registry entry lasts one monitoring interval plus HEARTBEAT_GRACE."""
        # Not cut to the job's remaining time as RQ does: between its timeout and the parent's hard kill
        # (timeout + 60 s) the job still runs, and must not look abandoned.
        return int(self.job_monitoring_interval + policy.HEARTBEAT_GRACE)

    # -- riding out Redis outages -------------------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's worker heartbeat; on its own (not in a pipeline) it waits out a Redis outage."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        ride_out(lambda: super(CancelWorker, self).heartbeat(timeout), "worker heartbeat", self.log)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """RQ's set_state; on its own it waits out a Redis outage."""
        if pipeline is not None:
            super().set_state(state, pipeline=pipeline)
            return
        self._state = state
        ride_out(lambda: super(CancelWorker, self).set_state(state), "worker state", self.log)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's `rq suspend` check; with Redis unreachable the worker goes on to its (retrying) dequeue."""
        ride_out(lambda: super(CancelWorker, self).check_for_suspension(burst), "suspension check", self.log)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        """Every monitoring interval while a job runs: heartbeat (waiting out an outage), then maintenance if due."""
        ride_out(lambda: super(CancelWorker, self).maintain_heartbeats(job, execution), "job heartbeat", self.log)
        # Our own entries are fresh now, so this pass cannot take our running job for abandoned.
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in a work-horse; a Redis outage that outlasted the retries leaves the worker running."""
        try:
            super().execute_job(job, queue)
        except REDIS_OUTAGE_ERRORS as exc:
            # The job is still `started` in its started registry: if its outcome was not written, RQ's
            # abandoned-job cleanup retries it once the entry lapses (policy.recovery_bound()).
            self.log.warning("Worker %s: job %s ended while Redis was unreachable (%s)", self.name, job.id, exc)
            self._horse_pid = 0
            self.set_state(WorkerStatus.IDLE)

    # -- maintenance ----------------------------------------------------------------------------------

    def run_maintenance_tasks(self) -> None:
        """RQ's maintenance (restart or take over the scheduler, clean registries); skipped while Redis is away."""
        try:
            super().run_maintenance_tasks()
        except REDIS_OUTAGE_ERRORS as exc:
            # last_cleaned_at is left as it was, so the next loop tries again.
            self.log.warning("Worker %s: maintenance skipped, Redis unreachable (%s)", self.name, exc)

    def clean_registries(self) -> None:
        """Put back stranded jobs, then RQ's cleanup, for each queue whose (short-lived) maintenance lock we get."""
        held = [queue for queue in self.queues if self._lock_maintenance(queue)]
        try:
            if held and self._sweep_due():
                put_back = sweep_stranded_jobs(self.connection, [queue.name for queue in held])
                if put_back:
                    self.log.warning("Worker %s: stranded jobs put back: %s", self.name, put_back)
            if held:
                self._keep_offline_polls()
            for queue in held:
                self.log.info("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
        finally:
            for queue in held:
                self._unlock_maintenance(queue)
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ declares it None until the first pass

    def _keep_offline_polls(self) -> None:
        # Every installed portal with offline rules has a scheduled pull (jobs.offline): started here on the first
        # pass after a start, and again if a scheduled pull was lost.
        try:
            started = keep_polling(self.connection, worker_context().settings)
        except REDIS_OUTAGE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - maintenance goes on; the next pass tries again
            self.log.warning("Worker %s: offline pulls not checked (%s)", self.name, exc)
            return
        if started:
            self.log.info("Worker %s: scheduled pulls started for %d portals", self.name, started)

    def _sweep_due(self) -> bool:
        # The sweep scans every job hash: one sweep per maintenance interval across all workers, not one per
        # worker's pass (the key lapses; nobody deletes it).
        return bool(self.connection.set(SWEEP_TURN_KEY, self.name, nx=True, ex=max(1, int(self.maintenance_interval))))

    def _lock_maintenance(self, queue: Queue) -> bool:
        # RQ's key, so that other RQ workers on these queues still take turns with us.
        return bool(self.connection.set(queue.registry_cleaning_key, self.name, nx=True,
                                        ex=policy.MAINTENANCE_LOCK_SECONDS))

    def _unlock_maintenance(self, queue: Queue) -> None:
        try:
            self.connection.eval(RELEASE_IF_OURS, 1, queue.registry_cleaning_key, self.name)
        except REDIS_OUTAGE_ERRORS:
            pass  # it lapses within MAINTENANCE_LOCK_SECONDS

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
        """RQ's _start_scheduler with LiveScheduler; without the locks now, maintenance tries again each pass."""
        self.scheduler = LiveScheduler(
            self.queues, connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format, log_format=log_format, serializer=self.serializer)
        try:
            self.scheduler.acquire_locks()
        except REDIS_OUTAGE_ERRORS as exc:
            self.log.warning("Worker %s: scheduler locks not tried, Redis unreachable (%s)", self.name, exc)
            return
        if not self.scheduler.acquired_locks:
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()
        else:
            self.scheduler.start()

    # -- jobs -----------------------------------------------------------------------------------------

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Run the job (in the work-horse), then add what it counted to the shared metrics."""
        try:
            return super().perform_job(job, queue, execution)
        finally:
            try:
                worker_context().tally.flush(job.connection)
            except redis.RedisError:
                self.log.warning("metrics not flushed: Redis unreachable")

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Execution | None = None) -> None:
        """RQ's failure handling; a job that RQ fails from outside its run ends its request too.

        RQ's intermediate-queue cleanup (rq/intermediate_queue.py) fails a job "stuck in intermediate queue"
        through this method alone: no failure callback runs, so without this its request would stay open.
        """
        final = not job.should_retry
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                   execution=execution)
        if final and exc_string == STUCK_IN_INTERMEDIATE_QUEUE:
            end_request(self.connection, job, "stuck in RQ's intermediate queue")

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        report_lost_job(job, f"work-horse killed (wait status {ret_val})")
        drop_lease(self.connection, job)
        if not job.retries_left:
            end_request(self.connection, job, f"work-horse killed (wait status {ret_val})")
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)

