"""Liveness after crashes, over real parts: a Redis of this module's own (AOF on, so it can be restarted),
real `rq worker` processes started as the Procfile's worker line, and the sandbox over HTTP.

The workers run with short monitoring and maintenance intervals (WORKER_OPTIONS) so the module stays quick;
the bounds asserted are computed from those by the same policy.recovery_bound() that the Procfile's
production values are checked against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

import devenv
from app import create_app
from jobs import policy, records
from jobs.sweeper import sweep_stranded_jobs
from jobs.worker import CancelJob
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

MONITORING = 2  # --job-monitoring-interval for these tests (Procfile: 5)
MAINTENANCE = 2  # --maintenance-interval for these tests (Procfile: 10)
WORKER_OPTIONS = {"--job-monitoring-interval": str(MONITORING), "--maintenance-interval": str(MAINTENANCE)}
BOUND = policy.recovery_bound(MONITORING, MAINTENANCE)
SLACK = 15.0  # process start-up, a busy 2-core machine


class RedisServer:
    """This module's persistent Redis, which a test may restart on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc = devenv.start_redis(directory, persist=True)

    @property
    def url(self) -> str:
        return self.proc.url

    def restart(self, down_for: float) -> None:
        self.proc = devenv.restart_redis(self.proc, self.directory, down_for)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("liveness-redis"))
    yield server
    server.proc.stop()


@pytest.fixture
def conn(server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(server.url)
    connection.flushdb()
    yield connection
    connection.close()


def service_env(redis_url: str, webhook: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_url, "B24_WEBHOOK_URL": webhook, "B24_CHAT_ID": "chat1",
                "TRIGGER_API_KEYS": API_KEY, "B24_READ_TIMEOUT": "10", "B24_CONNECT_TIMEOUT": "1",
                # short, so a call left unanswered by a crash settles in seconds (the ambiguity rule)
                "B24_EXECUTION_LIMIT": "3"})
    return env


@pytest.fixture
def start_worker(server: RedisServer, sandbox: devenv.Process,
                 tmp_path: Path) -> Iterator[Callable[[str], tuple[devenv.Process, Path]]]:
    """Start workers (the Procfile's line, short intervals); all are killed, work-horses included, at the end."""
    started: list[devenv.Process] = []

    def start(name: str) -> tuple[devenv.Process, Path]:
        log = tmp_path / f"{name}.log"
        proc = devenv.start_worker(service_env(server.url, sandbox.extra["webhook"]), log=log,
                                   options=WORKER_OPTIONS)
        started.append(proc)
        return proc, log

    yield start
    for proc in started:
        proc.kill_tree()


@pytest.fixture
def client(server: RedisServer, sandbox: devenv.Process, conn: redis.Redis) -> FlaskClient:
    config = {"_env_file": None, "redis_url": server.url, "b24_webhook_url": sandbox.extra["webhook"],
              "b24_chat_id": "chat1", "trigger_api_keys": API_KEY}
    return create_app(config).test_client()


@pytest.fixture
def portal(sandbox: devenv.Process) -> SandboxView:
    return SandboxView(sandbox.url)


def submit(client: FlaskClient, key: str, document_ids: list[int]) -> str:
    response = client.post("/v1/cancel", json={"document_ids": document_ids, "reason": key},
                           headers={**bearer(), "Idempotency-Key": key})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def record(conn: redis.Redis, request_id: str) -> dict[str, Any]:
    found = records.load(conn, request_id)
    assert found is not None
    return found


def finished(conn: redis.Redis, request_id: str, timeout: float) -> dict[str, Any]:
    return wait_for(lambda: (r := record(conn, request_id))["state"] in ("done", "failed") and r,
                    timeout=timeout, interval=0.25, what=f"request {request_id} to finish")


def reports(portal: SandboxView, request_id: str) -> list[dict[str, Any]]:
    return [m for m in portal.messages() if f"#{request_id}" in (m.get("message") or "")]


def cancel_calls(portal: SandboxView, doc_id: int) -> list[dict[str, Any]]:
    return [c for c in portal.calls("catalog.document.cancel") if str((c.get("params") or {}).get("id")) == str(doc_id)]


def worker_registered(conn: redis.Redis, proc: devenv.Process) -> bool:
    for key in conn.smembers("rq:workers"):
        if conn.hget(key, "pid") == str(proc.pid).encode():
            return True
    return False


def scheduler_lock(conn: redis.Redis, queue: str = "cancel") -> str | None:
    owner = conn.get(RQScheduler.get_locking_key(queue))
    return owner.decode() if owner else None


def job_started_at(conn: redis.Redis, job_id: str) -> float | None:
    raw = conn.hget(Job.key_for(job_id), "started_at")
    if not raw:
        return None
    return datetime.strptime(raw.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def sent(conn: redis.Redis, request_id: str) -> bool:
    return any(doc.get("sent_at") for doc in record(conn, request_id)["documents"])


# -- RQ 3.0.0's retry race and the sweeper, on Redis directly -------------------------------------------


def make_job(conn: redis.Redis, job_id: str, queue: Queue) -> Job:
    job = Job.create("jobs.cancel.cancel_documents", args=["r-" + job_id], id=job_id, connection=conn,
                     serializer=JSONSerializer, origin=queue.name)
    job.save()
    return job


def test_a_retry_writes_its_status_with_its_registry_entry_or_not_at_all(conn: redis.Redis) -> None:
    queue = Queue("cancel", connection=conn, serializer=JSONSerializer)
    registry = ScheduledJobRegistry(queue=queue)
    for job_class, atomic in ((Job, False), (CancelJob, True)):
        job_id = f"retry-{job_class.__name__}"
        make_job(conn, job_id, queue)
        job = job_class.fetch(job_id, connection=conn, serializer=JSONSerializer)
        job.set_status(JobStatus.STARTED)
        now = datetime.now(UTC)
        for reschedule in (lambda p, job=job, now=now: job._handle_retry_result(  # a job returned Retry (every wait of ours)
                               queue=queue, pipeline=p, retry=Retry(max=5, interval=[30]), execution_id="e",
                               execution_started_at=now, execution_ended_at=now),
                           lambda p, job=job: job.retry(queue, p)):  # a crash or an abandoned job
            job.set_status(JobStatus.STARTED)
            job.retries_left = 2
            job.retry_intervals = [30]
            with conn.pipeline() as pipe:
                reschedule(pipe)
                # The worker is killed here, before its transaction is sent.
                status_before_commit = conn.hget(job.key, "status").decode()
                pipe.execute()
            # RQ's own Job leaves `scheduled` behind with no registry entry: the stranding; ours writes nothing.
            assert status_before_commit == ("started" if atomic else "scheduled"), job_class
            assert conn.hget(job.key, "status") == b"scheduled" and job_id in registry
            registry.remove(job_id)


def test_the_sweeper_puts_back_only_jobs_seen_stranded_twice_a_grace_apart(conn: redis.Redis) -> None:
    queue = Queue("cancel", connection=conn, serializer=JSONSerializer)
    scheduled, started = ScheduledJobRegistry(queue=queue), StartedJobRegistry(queue=queue)
    for job_id in ("lost-retry", "lost-pop", "lost-in-intermediate", "lost-start",
                   "waiting", "in-queue", "being-popped", "running", "done"):
        make_job(conn, job_id, queue)
    statuses = {"lost-retry": "scheduled", "lost-pop": "queued", "lost-in-intermediate": "queued",
                "lost-start": "started", "waiting": "scheduled", "in-queue": "queued",
                "being-popped": "queued", "running": "started", "done": "finished"}
    for job_id, status in statuses.items():
        conn.hset(Job.key_for(job_id), "status", status)
    future = int(time.time()) + 3600
    conn.zadd(scheduled.key, {"waiting": future})
    conn.rpush(queue.key, "in-queue")
    conn.rpush(queue.intermediate_queue_key, "lost-in-intermediate")
    conn.zadd(started.key, {"being-popped:exec1": future, "running:exec2": future})

    first = time.time()
    assert sweep_stranded_jobs(conn, ["cancel"], now=first) == {}  # first sighting: nothing is touched
    assert sweep_stranded_jobs(conn, ["cancel"], now=first + policy.STRANDED_GRACE - 1) == {}
    assert sweep_stranded_jobs(conn, ["notify"], now=first + policy.STRANDED_GRACE) == {}  # not its queues
    put_back = sweep_stranded_jobs(conn, ["cancel"], now=first + policy.STRANDED_GRACE)
    assert put_back == {"scheduled": 1, "queued": 2, "started": 1}
    assert scheduled.get_job_ids(cleanup=False) == ["lost-retry", "waiting"]
    assert conn.zscore(scheduled.key, "waiting") == future
    queued = [j.decode() for j in conn.lrange(queue.key, 0, -1)]
    assert queued[0] == "in-queue" and sorted(queued[1:]) == ["lost-in-intermediate", "lost-pop"]
    assert conn.llen(queue.intermediate_queue_key) == 0
    expired = started.get_expired_job_ids(time.time())
    assert expired == ["lost-start"]  # RQ's abandoned-job cleanup takes it from here
    assert sweep_stranded_jobs(conn, ["cancel"], now=first + 3 * policy.STRANDED_GRACE) == {}  # once only
    assert not conn.keys("b24c:stranded:*")


# -- crashes, over real workers ------------------------------------------------------------------------


def test_a_worker_killed_whole_mid_job_has_its_request_finished_by_another(
        conn: redis.Redis, client: FlaskClient, portal: SandboxView,
        start_worker: Callable[[str], tuple[devenv.Process, Path]]) -> None:
    first, _ = start_worker("first")
    wait_for(lambda: worker_registered(conn, first) and scheduler_lock(conn), timeout=30, what="the first worker")
    portal.faults({"kind": "slow", "method": "catalog.document.cancel", "times": 1, "seconds": 5})
    request_id = submit(client, "killed-worker", [3])
    job_id = policy.cancel_job_id(request_id)
    wait_for(lambda: sent(conn, request_id), timeout=30, interval=0.05, what="the cancel to be sent")
    time.sleep(0.5)
    first.kill_tree()  # worker, scheduler and work-horse, as a container kill
    killed_at = time.time()
    assert conn.hget(Job.key_for(job_id), "status") == b"started"  # abandoned mid-job

    second, second_log = start_worker("second")
    again = wait_for(lambda: (t := job_started_at(conn, job_id)) and t > killed_at and t, timeout=BOUND + SLACK,
                     interval=0.25, what="the abandoned job to run again")
    lease_lapses = policy.LEASE_SECONDS  # the killed run's lease holds the request until it lapses
    state = finished(conn, request_id, timeout=max(BOUND, lease_lapses) + 2 * SLACK)
    done_at = time.time()
    print(f"\nworker killed: job running again after {again - killed_at:.1f} s (bound {BOUND:.0f} s), "
          f"request finished after {done_at - killed_at:.1f} s (lease {policy.LEASE_SECONDS} s)")
    assert state["state"] == "done"
    assert [doc["outcome"] for doc in state["documents"]] == ["cancelled"]
    assert portal.document(3)["status"] != "Y"
    assert len(cancel_calls(portal, 3)) == 1
    assert len(wait_for(lambda: reports(portal, request_id), timeout=30, what="the report")) == 1
    assert second.alive()
    assert "AbandonedJobError" in second_log.read_text() or "abandoned" in second_log.read_text()


def test_the_scheduler_role_is_taken_over_when_its_worker_dies(
        conn: redis.Redis, client: FlaskClient, portal: SandboxView,
        start_worker: Callable[[str], tuple[devenv.Process, Path]]) -> None:
    holder, _ = start_worker("holder")
    old_owner = wait_for(lambda: scheduler_lock(conn), timeout=30, what="the first worker's scheduler lock")
    other, other_log = start_worker("other")
    wait_for(lambda: worker_registered(conn, other), timeout=30, what="the second worker")
    assert scheduler_lock(conn) == old_owner
    assert 0 < conn.pttl(RQScheduler.get_locking_key("cancel")) <= policy.SCHEDULER_LOCK_SECONDS * 1000

    portal.faults({"kind": "error500", "method": "catalog.document.cancel", "times": 3})
    request_id = submit(client, "scheduler-dies", [4])
    job_id = policy.cancel_job_id(request_id)
    registry = ScheduledJobRegistry("cancel", connection=conn)
    # Deferred for a transient error (a Retry with an interval): wait for one with at least a second to go.
    wait_for(lambda: (score := conn.zscore(registry.key, job_id)) and score >= time.time() + 1,
             timeout=60, interval=0.05, what="the request to be deferred")
    holder.kill_tree()
    killed_at = time.time()

    new_owner = wait_for(lambda: (o := scheduler_lock(conn)) and o != old_owner and o, timeout=BOUND + SLACK,
                         interval=0.25, what="another scheduler to take the lock")
    taken_after = time.time() - killed_at
    state = finished(conn, request_id, timeout=BOUND + 2 * SLACK)
    print(f"\nscheduler's worker killed: lock taken over after {taken_after:.1f} s "
          f"(bound {policy.SCHEDULER_LOCK_SECONDS + MAINTENANCE + MONITORING} s), "
          f"request finished after {time.time() - killed_at:.1f} s")
    assert taken_after <= policy.SCHEDULER_LOCK_SECONDS + MAINTENANCE + MONITORING + SLACK
    assert new_owner and "Acquired scheduler lock" in other_log.read_text()
    assert state["state"] == "done" and [doc["outcome"] for doc in state["documents"]] == ["cancelled"]
    assert portal.effective_cancels(4) == 1
    assert len(wait_for(lambda: reports(portal, request_id), timeout=30, what="the report")) == 1


def test_workers_ride_out_a_redis_restart_mid_job(
        server: RedisServer, conn: redis.Redis, client: FlaskClient, portal: SandboxView,
        start_worker: Callable[[str], tuple[devenv.Process, Path]]) -> None:
    worker, log = start_worker("survivor")
    owner = wait_for(lambda: worker_registered(conn, worker) and scheduler_lock(conn), timeout=30,
                     what="the worker and its scheduler")
    portal.faults({"kind": "slow", "method": "catalog.document.cancel", "times": 1, "seconds": 6})
    request_id = submit(client, "redis-restart", [5])
    wait_for(lambda: sent(conn, request_id), timeout=30, interval=0.05, what="the cancel to be sent")
    conn.close()

    down_at = time.time()
    server.restart(down_for=2.0)  # AOF: the queues, registries and records come back
    back_at = time.time()
    conn = redis.Redis.from_url(server.url)
    state = finished(conn, request_id, timeout=BOUND + SLACK)
    print(f"\nRedis down {back_at - down_at:.1f} s: request finished {time.time() - back_at:.1f} s after it came back")
    assert worker.alive() and worker_registered(conn, worker)  # the same process, still registered
    text = log.read_text()
    assert "Redis unreachable" in text  # it did hit the outage...
    assert "quitting" not in text  # ...and did not exit on it, as RQ's worker does
    assert state["state"] == "done" and [doc["outcome"] for doc in state["documents"]] == ["cancelled"]
    assert portal.effective_cancels(5) == 1
    assert len(wait_for(lambda: reports(portal, request_id), timeout=30, what="the report")) == 1
    # The scheduler rode it out too: still alive, still holding its lock.
    assert scheduler_lock(conn) == owner
    scheduler_pid = int(conn.hget(f"rq:scheduler:{owner}", "pid") or 0)
    assert scheduler_pid and os.path.exists(f"/proc/{scheduler_pid}")
    conn.close()


def test_a_retry_stranded_in_no_registry_is_put_back_and_runs_once(
        conn: redis.Redis, client: FlaskClient, portal: SandboxView,
        start_worker: Callable[[str], tuple[devenv.Process, Path]]) -> None:
    stranded = submit(client, "stranded", [6])
    waiting = submit(client, "waiting", [7])
    queue_key = Queue("cancel", connection=conn).key
    registry = ScheduledJobRegistry("cancel", connection=conn)
    stranded_job, waiting_job = policy.cancel_job_id(stranded), policy.cancel_job_id(waiting)
    # What RQ 3.0.0 leaves when a worker dies inside Job._handle_retry_result: `scheduled`, in no registry.
    conn.lrem(queue_key, 0, stranded_job)
    conn.hset(Job.key_for(stranded_job), "status", "scheduled")
    # A job legitimately waiting an hour: the sweeper must leave it alone.
    later = int(time.time()) + 3600
    conn.lrem(queue_key, 0, waiting_job)
    conn.hset(Job.key_for(waiting_job), "status", "scheduled")
    conn.zadd(registry.key, {waiting_job: later})
    assert conn.llen(queue_key) == 0

    started_at = time.time()
    _, log = start_worker("sweeper")
    state = finished(conn, stranded, timeout=policy.STRANDED_GRACE + 2 * (MAINTENANCE + MONITORING) + SLACK)
    ran_at = job_started_at(conn, stranded_job)
    print(f"\nstranded retry: running {ran_at - started_at:.1f} s after the worker started "
          f"(grace {policy.STRANDED_GRACE} s)")
    assert ran_at - started_at >= policy.STRANDED_GRACE - 1  # not on the first sighting
    assert state["state"] == "done" and [doc["outcome"] for doc in state["documents"]] == ["cancelled"]
    assert portal.effective_cancels(6) == 1
    assert "stranded jobs put back" in log.read_text()
    assert len(wait_for(lambda: reports(portal, stranded), timeout=30, what="the report")) == 1
    time.sleep(MAINTENANCE + MONITORING)  # more passes: the waiting job stays as it is
    assert conn.zscore(registry.key, waiting_job) == later
    assert conn.hget(Job.key_for(waiting_job), "status") == b"scheduled"
    assert portal.document(7)["status"] == "Y" and cancel_calls(portal, 6) and not cancel_calls(portal, 7)
    assert record(conn, waiting)["state"] == "queued"


def test_the_procfile_meets_the_90_second_promise() -> None:
    argv = devenv.worker_argv()
    monitoring = int(argv[argv.index("--job-monitoring-interval") + 1])
    maintenance = int(argv[argv.index("--maintenance-interval") + 1])
    assert policy.recovery_bound(monitoring, maintenance) <= 90
    assert policy.SCHEDULER_LOCK_SECONDS + maintenance + monitoring <= policy.recovery_bound(monitoring, maintenance)
    assert "jobs.worker.CancelWorker" in argv and "--with-scheduler" in argv
