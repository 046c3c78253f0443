"""RQ's scheduler, made to hand over quickly and to outlive a Redis restart.

RQ 3.0.0's `RQScheduler` holds its per-queue lock for `interval + 60` = 61 s, lets a scheduler holding only
some locks look for the others every `DEFAULT_SCHEDULER_FALLBACK_PERIOD` (120 s), and dies on the first
Redis error (its process ends with the exception). A dead scheduler's deferred jobs then wait until its
lock lapses and a worker's maintenance pass starts another. Here the lock lasts SCHEDULER_LOCK_SECONDS,
Redis errors are waited out, and a scheduler whose worker is gone stops and frees its locks.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from rq.scheduler import RQScheduler
from rq.scripts import ACQUIRE_OR_REFRESH_LOCK_SCRIPT, acquire_or_refresh_lock
from rq.utils import now, utcformat

from jobs import policy
from jobs.outage import REDIS_OUTAGE_ERRORS, Backoff


class LiveScheduler(RQScheduler):
    """RQScheduler with a SCHEDULER_LOCK_SECONDS lock that rides out Redis outages and stops with its worker."""

    lock_seconds = policy.SCHEDULER_LOCK_SECONDS

    @property
    def should_reacquire_locks(self) -> bool:
        """Whether to try for queues whose locks another scheduler held: every lock lifetime, not 120 s."""
        if self._queue_names == self.acquired_locks:
            return False
        if not self.lock_acquisition_time:
            return True
        return (datetime.now() - self.lock_acquisition_time).total_seconds() > self.lock_seconds

    def acquire_locks(self, auto_start: bool = False) -> set[str]:
        """RQ's acquire_locks with our lock lifetime: take or refresh each queue's lock; start if asked."""
        successful = set()
        for name in self._queue_names:
            outcome = acquire_or_refresh_lock(self.connection, self.get_locking_key(name), self.name,
                                              self.lock_seconds)
            if outcome == "acquired":
                self.log.info("Acquired scheduler lock for %s", name)
                successful.add(name)
            elif outcome == "refreshed":
                successful.add(name)
        self._scheduled_job_registries = []
        self._acquired_locks = successful
        self.lock_acquisition_time = datetime.now()  # type: ignore[assignment]  # RQ declares it None at first
        if self._acquired_locks and auto_start and (not self._process or not self._process.is_alive()):
            self.start()
        return successful

    def heartbeat(self) -> None:
        """RQ's heartbeat with our lock lifetime: refresh the locks we hold, drop those another scheduler took."""
        self.last_heartbeat = now()
        lock_names = sorted(self._acquired_locks)
        lock_script = self.connection.register_script(ACQUIRE_OR_REFRESH_LOCK_SCRIPT)
        with self.connection.pipeline() as pipeline:
            pipeline.hset(self.key, "last_heartbeat", utcformat(self.last_heartbeat))
            pipeline.expire(self.key, self.lock_seconds)
            for name in lock_names:
                lock_script(keys=[self.get_locking_key(name)], args=[self.name, self.lock_seconds], client=pipeline)
            results = pipeline.execute()
        lost = {name for name, outcome in zip(lock_names, results[2:]) if outcome == 0}
        if lost:
            self.log.warning("Scheduler locks for %s were taken over by another scheduler", ", ".join(sorted(lost)))
            self._acquired_locks -= lost
            self._scheduled_job_registries = []

    def work(self) -> None:
        """Move due jobs to their queues every `interval`, waiting out Redis errors, until stopped or orphaned."""
        self._install_signal_handlers()
        worker_pid = os.getppid()
        born = False
        backoff = Backoff()
        while not self._stop_requested:
            if os.getppid() != worker_pid:
                # Our worker was killed without us (only its PID, not its group): free the locks for a
                # live worker's scheduler rather than run on as an orphan nobody supervises.
                self.log.warning("Scheduler: worker %s is gone; stopping", worker_pid)
                break
            try:
                if not born:
                    self.register_birth()
                    born = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
                backoff.reset()
                pause = float(self.interval)
            except REDIS_OUTAGE_ERRORS as exc:
                # A lock that lapsed meanwhile is re-taken by the next heartbeat, or dropped if another
                # scheduler has it: either way one scheduler serves each queue again.
                pause = backoff.next()
                self.log.warning("Scheduler: Redis unreachable (%s); retrying in %.1f s", exc, pause)
            time.sleep(pause)
        try:
            self.stop()
        except REDIS_OUTAGE_ERRORS:
            self.log.warning("Scheduler: could not free its locks (Redis unreachable); they lapse in %d s",
                             self.lock_seconds)
