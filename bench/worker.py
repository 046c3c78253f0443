"""Benchmark: throughput of ONE worker process, limits out of the way, beside RQ's own no-op throughput.

    .venv/bin/python -m bench.worker [--requests 300] [--memory-requests 40]

Real processes on free loopback ports, stopped by PID: a private Redis, the sandbox portal
(`--durations-zero`, rate and burst far out of reach), and ONE worker started as the Procfile does
(`devenv.start_worker`) with B24_RATE_LIMIT/B24_RATE_BURST just as high.

* ours: N single-document requests submitted at once through the app's own `Submitter` (the intake's
  one-round-trip write of record + job, without HTTP so that no web process competes for the two
  cores), timed from the first submit until the last report is posted (the latest `finished_at` of the
  request records; every record must have a `message_id`, every document must be cancelled);
* RQ no-op, same worker process, same command: 2N one-hop no-ops (`jobs.policy.cancel_job_id`, the
  same number of RQ jobs as N requests make), and N two-hop no-op chains (`bench.noop.chain`, shaped like
  a request: the first job enqueues the second on `notify`), each batch enqueued at once and timed until
  RQ marks the last one finished;
* memory: a separate untimed phase (sampling /proc costs CPU) of a few requests, sampling the worker
  parent and every work-horse every 4 ms from /proc/<pid>/smaps_rollup: RSS, and the private (USS) part;
* CPU: user+system seconds of the worker (parent + reaped horses + scheduler), the sandbox and Redis,
  from /proc/<pid>/stat, per request.

Waiting polls one ZCARD (RQ's finished registry) every 50 ms; the times come from the records and jobs.
The figures and ratios are the last lines printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import redis
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from bench import noop
from bench.common import (
    NO_LIMIT_BURST,
    NO_LIMIT_RATE,
    SANDBOX_UNLIMITED,
    MemorySampler,
    Sandbox,
    Stack,
    loadavg,
    memory_kb,
    rq_time,
    service_env,
    tree_cpu_seconds,
    wait_for,
    wait_for_workers,
)
from jobs import policy, records
from jobs.enqueue import Submitter

PORTAL, SOURCE = "default", "api"
TTL = 14 * 86400


def finished_count(conn: redis.Redis, queue: str) -> int:
    return int(conn.zcard(FinishedJobRegistry(name=queue, connection=conn).key))


def submit_requests(conn: redis.Redis, phase: str, doc_ids: list[int]) -> tuple[float, list[str]]:
    """Submit one request per document at once; return the time of the first submit and the request ids."""
    submitter = Submitter(conn, TTL)
    ids = []
    started = time.time()
    for doc_id in doc_ids:
        key = f"thr-{phase}-{doc_id}"
        request_id = records.new_request_id()
        request = {"portal": PORTAL, "source": SOURCE, "document_ids": [doc_id], "reason": f"bench {phase}",
                   "external_id": None, "chat": None}
        result = submitter.submit(request_id, request, "jobs.cancel.cancel_documents", policy.cancel_job_id(request_id),
                                  idempotency_key=records.idempotency_key(PORTAL, SOURCE, "bench", key))
        if not result.created:
            raise RuntimeError(f"request {request_id} already existed")
        ids.append(request_id)
    return started, ids


def wait_until_finished(conn: redis.Redis, queue: str, target: int, timeout: float) -> None:
    wait_for(lambda: finished_count(conn, queue) >= target, timeout=timeout, interval=0.05,
             what=f"{target} finished jobs on {queue}")


def run_requests(conn: redis.Redis, phase: str, doc_ids: list[int], timeout: float) -> dict[str, Any]:
    before = finished_count(conn, policy.NOTIFY_QUEUE)
    started, ids = submit_requests(conn, phase, doc_ids)
    submitted = time.time()
    wait_until_finished(conn, policy.NOTIFY_QUEUE, before + len(ids), timeout)
    ends, missing = [], 0
    for request_id in ids:
        finished_at, message_id, state = conn.hmget(records.request_key(request_id),
                                                    ["finished_at", "message_id", "state"])
        if not message_id or state != b"done":
            missing += 1
        if finished_at:
            ends.append(float(finished_at))
    end = max(ends)
    return {"n": len(ids), "seconds": end - started, "submit_seconds": submitted - started, "missing": missing,
            "ids": ids}


def run_noops(conn: redis.Redis, phase: str, count: int, two_hop: bool, timeout: float) -> dict[str, Any]:
    """Enqueue `count` no-op jobs (or chains) at once; time until the last (hop) is finished."""
    queue = Queue(policy.CANCEL_QUEUE, connection=conn, serializer=JSONSerializer)
    target_queue = policy.NOTIFY_QUEUE if two_hop else policy.CANCEL_QUEUE
    before = finished_count(conn, target_queue)
    func = noop.TWO_HOP if two_hop else noop.ONE_HOP
    datas = [Queue.prepare_data(func, args=("x",), job_id=f"bench-{phase}-{i}") for i in range(count)]
    started = time.time()
    with conn.pipeline() as pipe:
        jobs = queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    wait_until_finished(conn, target_queue, before + count, timeout)
    last_ids = [noop.second_hop_id(j.id) if two_hop else j.id for j in jobs]
    with conn.pipeline() as pipe:
        for job_id in last_ids:
            pipe.hget(f"rq:job:{job_id}", "ended_at")
        ended = [rq_time(v) for v in pipe.execute()]
    end = max(e for e in ended if e is not None)
    return {"n": count, "jobs": count * (2 if two_hop else 1), "seconds": end - started}


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each process tree (a worker's horses once reaped, its scheduler child while alive)."""
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def measure_memory(conn: redis.Redis, worker_pid: int, phase: str, doc_ids: list[int],
                   timeout: float) -> dict[str, Any]:
    """Untimed: sample the worker parent and its horses from /proc while a few requests run."""
    idle = memory_kb(worker_pid)
    sampler = MemorySampler(worker_pid)
    sampler.start()
    try:
        run_requests(conn, phase, doc_ids, timeout)
    finally:
        sampler.stop()
    return {"idle": idle, "parent": sampler.parent_peak, "horse": sampler.horse_peak,
            "horses": len(sampler.horses_seen),
            "scheduler": sum(memory_kb(pid).get("Rss", 0) for pid in sampler.long_lived)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--memory-requests", type=int, default=40)
    args = parser.parse_args(argv)
    n = max(1, min(args.requests, 2000))
    mn = max(1, min(args.memory_requests, 500))
    warm = 5
    docs_total = warm + n + mn
    timeout = 90.0

    load_before = loadavg()
    stack = Stack("worker")
    try:
        redis_proc = stack.redis()
        sandbox_proc = stack.sandbox("--documents", str(docs_total), "--durations-zero", *SANDBOX_UNLIMITED)
        env = service_env(redis_proc.url, sandbox_proc.extra["webhook"], B24_RATE_LIMIT=NO_LIMIT_RATE,
                          B24_RATE_BURST=NO_LIMIT_BURST)
        conn = redis.Redis.from_url(redis_proc.url)
        worker = stack.worker(env, "worker")
        wait_for_workers(conn, 1, procs=[worker])
        sandbox = Sandbox(sandbox_proc.url)
        doc = iter(range(1, docs_total + 1))

        run_requests(conn, "warm", [next(doc) for _ in range(warm)], timeout)
        pids = {"worker": worker.pid, "sandbox": sandbox_proc.pid, "redis": redis_proc.pid}
        cpu0 = cpu_of(pids)
        ours = run_requests(conn, "ours", [next(doc) for _ in range(n)], timeout)
        cpu_ours = cpu_delta(cpu0, cpu_of(pids))

        cpu0 = cpu_of(pids)
        noop1 = run_noops(conn, "noop1", 2 * n, two_hop=False, timeout=timeout)
        cpu_noop1 = cpu_delta(cpu0, cpu_of(pids))
        noop2 = run_noops(conn, "noop2", n, two_hop=True, timeout=timeout)

        memory = measure_memory(conn, worker.pid, "memory", [next(doc) for _ in range(mn)], timeout)

        documents = sandbox.documents()
        still = sum(1 for d in range(warm + 1, warm + n + 1) if documents.get(d, {}).get("status") == "Y")
        stats = sandbox.stats()
        worker_log = (stack.dir / "worker.log").read_text(errors="replace")
    finally:
        stack.close()

    def rate(result: dict[str, Any], per: str = "n") -> float:
        return result[per] / result["seconds"]

    def worker_cpu(d: dict[str, float]) -> float:
        return d["worker"]

    mb = 1024.0
    print(f"machine: {load_before} before, {loadavg()} after; logs in {stack.dir}")
    print(f"run: 1 worker (devenv.start_worker, Procfile command), sandbox --durations-zero, limits out of reach; "
          f"{n} single-document requests submitted at once through jobs.enqueue.Submitter in "
          f"{ours['submit_seconds'] * 1000:.0f} ms")
    print(f"checks: requests not done with a message_id {ours['missing']}, documents still conducted {still}, "
          f"sandbox limit errors {stats.get('by_error', {}).get('QUERY_LIMIT_EXCEEDED', 0)}, "
          f"errors in the worker log {worker_log.count(' error ')}")
    print(f"CPU seconds during ours ({ours['seconds']:.1f} s wall): worker+horses+scheduler "
          f"{worker_cpu(cpu_ours):.1f}, sandbox {cpu_ours['sandbox']:.1f}, redis {cpu_ours['redis']:.1f} "
          f"-> worker {1000 * worker_cpu(cpu_ours) / n:.1f} ms CPU per request (2 jobs)")
    print(f"CPU seconds during {2 * n} one-hop no-ops ({noop1['seconds']:.1f} s wall): worker+horses+scheduler "
          f"{worker_cpu(cpu_noop1):.1f} -> {1000 * worker_cpu(cpu_noop1) / (2 * n):.1f} ms CPU per RQ job")
    idle, parent, horse = memory["idle"], memory["parent"], memory["horse"]
    print(f"memory, sampled every 4 ms over {mn} requests: worker parent idle RSS "
          f"{idle.get('Rss', 0) / mb:.1f} MB (private {idle.get('Private', 0) / mb:.1f} MB), "
          f"peak RSS {parent.get('Rss', 0) / mb:.1f} MB; horse peak RSS {horse.get('Rss', 0) / mb:.1f} MB "
          f"of which private {horse.get('Private', 0) / mb:.1f} MB ({memory['horses']} horses seen); "
          f"scheduler RSS {memory['scheduler'] / mb:.1f} MB")
    print()
    print(f"ours: {n} requests in {ours['seconds']:.2f} s = {rate(ours):.1f} requests/s = "
          f"{2 * rate(ours):.1f} RQ jobs/s (cancel + notify)")
    print(f"RQ no-op 1 hop: {noop1['n']} jobs in {noop1['seconds']:.2f} s = {rate(noop1):.1f} jobs/s")
    print(f"RQ no-op 2 hops: {noop2['n']} chains in {noop2['seconds']:.2f} s = {rate(noop2):.1f} chains/s = "
          f"{rate(noop2, 'jobs'):.1f} jobs/s")
    print(f"ratio ours/no-op (RQ jobs/s vs 1-hop jobs/s): {2 * rate(ours) / rate(noop1):.2f}; "
          f"(requests/s vs 2-hop chains/s): {rate(ours) / rate(noop2):.2f}")
    print(f"RSS MB: worker parent {memory['parent'].get('Rss', 0) / mb:.1f}, horse peak "
          f"{memory['horse'].get('Rss', 0) / mb:.1f} (private {memory['horse'].get('Private', 0) / mb:.1f}), "
          f"scheduler {memory['scheduler'] / mb:.1f}")
    return 0 if not ours["missing"] and not still else 1


if __name__ == "__main__":
    sys.exit(main())
