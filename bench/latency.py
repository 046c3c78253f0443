"""Benchmark: latency of one request at idle, trigger -> document cancelled -> report posted.

    .venv/bin/python -m bench.latency [--requests 200] [--noop 200] [--py-spy PATH]

Real processes on free loopback ports, stopped by PID: a private Redis, the sandbox portal
(`--durations-zero`, rate and burst far out of reach), ONE worker started as the Procfile does
(`devenv.start_worker`: `rq worker -c jobs.worker_config -w jobs.worker.CancelWorker --with-scheduler
--serializer json cancel notify`) and the web process under gunicorn (`devenv.start_web`). The service's
own limiter is set just as high (B24_RATE_LIMIT/B24_RATE_BURST), so no limit plays any part.

Requests go one at a time over HTTP (`POST /v1/cancel`, one document each). The next one is sent when
the previous report job has finished and the worker had 20 ms to go back to waiting on its queues.

How the moments are taken (nothing polls the service while it works):
* sent: the benchmark's clock just before the POST;
* document cancelled: the sandbox call log's time of the inner `catalog.document.cancel` command (when
  the sandbox began applying it; the status flips under the same lock microseconds later). Every
  document is checked to be no longer `Y` at the end;
* report posted: the call log's time of the `im.message.add` that carries the request's tag;
* done: the benchmark wakes on a Redis keyspace notification for the request record and reads
  `message_id` (one HGET per change of the record);
* stages: RQ's own `enqueued_at`/`started_at`/`ended_at` of the cancel and notify jobs.
All on the same machine clock.

In the same run, with the same worker process, RQ's own cost: a no-op job (`jobs.policy.cancel_job_id`,
preloaded, no import) enqueued on `cancel`, timed from enqueue until RQ marks it finished; and a two-hop
no-op (`bench.noop.chain`: the first job enqueues the second on `notify`, as our cancel job enqueues the
report).

The figures and ratios are the last lines printed.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import noop
from bench.common import (
    API_KEY,
    HOST,
    NO_LIMIT_BURST,
    NO_LIMIT_RATE,
    SANDBOX_UNLIMITED,
    KeyWatcher,
    Sandbox,
    Stack,
    cancel_times,
    job_times,
    loadavg,
    message_times,
    ms,
    pct,
    service_env,
    wait_for_workers,
)
from jobs import policy, records

SPY_REQUESTS = 100  # requests of the profiled phase (--py-spy), not part of the figures
IDLE_GAP = 0.02  # seconds between the previous report job finishing and the next request
TAG = re.compile(r"#([0-9a-f]{32})\b")
PORTAL, SOURCE = "default", "api"


@dataclass
class Sample:
    """One request's moments (unix time)."""

    doc_id: int
    request_id: str
    sent: float
    answered: float
    done: float
    finished: float = 0.0  # the report job marked finished (observed)
    cancelled: float | None = None
    posted: float | None = None
    jobs: dict[str, dict[str, float | None]] = field(default_factory=dict)


def job_finished(conn: redis.Redis, job_key: str) -> bool:
    return bool(conn.hget(job_key, "status") == b"finished")


def run_requests(http: httpx.Client, conn: redis.Redis, watcher: KeyWatcher, phase: str,
                 doc_ids: list[int]) -> list[Sample]:
    """Send one request per document, one at a time, each after the previous finished."""
    samples = []
    for doc_id in doc_ids:
        key = f"lat-{phase}-{doc_id}"
        sent = time.time()
        answer = http.post("/v1/cancel", json={"document_ids": [doc_id], "reason": f"bench {phase}"},
                           headers={"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key})
        answered = time.time()
        if answer.status_code != 202:
            raise RuntimeError(f"intake answered {answer.status_code}: {answer.text[:200]}")
        request_id = answer.json()["request_id"]  # random: known from the answer only
        record_key = records.request_key(request_id)
        watcher.wait(record_key, partial(conn.hget, record_key, "message_id"), timeout=30)
        done = time.time()
        notify_key = f"rq:job:{policy.notify_job_id(request_id)}"
        watcher.wait(notify_key, partial(job_finished, conn, notify_key), timeout=30)
        samples.append(Sample(doc_id, request_id, sent, answered, done, finished=time.time()))
        time.sleep(IDLE_GAP)
    return samples


def run_noops(conn: redis.Redis, watcher: KeyWatcher, phase: str, count: int, two_hop: bool) -> list[dict[str, Any]]:
    """Enqueue a no-op (or the two-hop chain) one at a time; time enqueue -> RQ marks the last hop finished."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    queue = Queue(policy.CANCEL_QUEUE, connection=conn, serializer=JSONSerializer)
    out = []
    for i in range(count):
        job_id = f"bench-{phase}-{i}"
        last = noop.second_hop_id(job_id) if two_hop else job_id
        last_key = f"rq:job:{last}"
        sent = time.time()
        queue.enqueue(noop.TWO_HOP if two_hop else noop.ONE_HOP, "x", job_id=job_id)
        watcher.wait(last_key, partial(job_finished, conn, last_key), timeout=30)
        done = time.time()
        out.append({"sent": sent, "done": done, "first": job_times(conn, job_id), "last": job_times(conn, last)})
        time.sleep(IDLE_GAP)
    return out


def attach_portal_times(samples: list[Sample], calls: list[dict[str, Any]], conn: redis.Redis) -> None:
    cancelled = cancel_times(calls)
    posted = message_times(calls, lambda text: (m.group(1) if (m := TAG.search(text)) else None))
    for s in samples:
        s.cancelled = cancelled.get(s.doc_id)
        s.posted = posted.get(s.request_id)
        s.jobs = {"cancel": job_times(conn, policy.cancel_job_id(s.request_id)),
                  "notify": job_times(conn, policy.notify_job_id(s.request_id))}


def stage_lines(samples: list[Sample]) -> list[tuple[str, list[float]]]:
    """Where the time of one request goes, stage by stage (seconds)."""
    stages: dict[str, list[float]] = collections.defaultdict(list)
    for s in samples:
        c, n = s.jobs["cancel"], s.jobs["notify"]
        points = [("intake: POST sent -> cancel job enqueued (web, Redis)", s.sent, c["enqueued_at"]),
                  ("cancel job picked up: enqueued -> started (dequeue, fork, horse prep)", c["enqueued_at"],
                   c["started_at"]),
                  ("cancel job: started -> document cancelled (our code before the batch)", c["started_at"],
                   s.cancelled),
                  ("cancel job: cancelled -> report job enqueued", s.cancelled, n["enqueued_at"]),
                  ("report job picked up: enqueued -> started (cancel horse ends, fork)", n["enqueued_at"],
                   n["started_at"]),
                  ("report job: started -> message posted (our code before the post)", n["started_at"], s.posted),
                  ("report job: posted -> record done (seen by the bench)", s.posted, s.done)]
        for name, a, b in points:
            if a is not None and b is not None:
                stages[name].append(b - a)
    return list(stages.items())


def noop_stage_lines(results: list[dict[str, Any]], two_hop: bool) -> list[tuple[str, list[float]]]:
    stages: dict[str, list[float]] = collections.defaultdict(list)
    for r in results:
        f, last = r["first"], r["last"]
        pts = [("enqueue -> started (dequeue, fork, horse prep)", f["enqueued_at"], f["started_at"]),
               ("started -> ended (run + RQ bookkeeping)", f["started_at"], f["ended_at"])]
        if two_hop:
            pts += [("hop 2 enqueued -> started (hop 1 horse ends, fork)", last["enqueued_at"], last["started_at"]),
                    ("hop 2 started -> ended", last["started_at"], last["ended_at"])]
        for name, a, b in pts:
            if a is not None and b is not None:
                stages[name].append(b - a)
    return list(stages.items())


def py_spy_summary(raw: Path) -> list[str]:
    """Where the work-horses spent their samples, from py-spy's raw (collapsed) output."""
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if "main_work_horse" not in stack:
            continue
        n = int(n_text)
        total += n
        if "create_ssl_context" in stack or "load_verify_locations" in stack:
            cat = "httpx.Client(): ssl.create_default_context + CA bundle"
        elif "_find_and_load" in stack:
            cat = "imports"
        elif "cancel_documents" in stack or "post_report" in stack:
            if "Bitrix24Client._post" in stack:
                cat = "our job: HTTP call to the portal"
            elif "redis" in stack:
                cat = "our job: Redis round trips (records, limiter)"
            elif "render" in stack:
                cat = "our job: rendering the report"
            else:
                cat = "our job: other Python"
        elif "_finalize_success" in stack or "handle_job_success" in stack:
            cat = "RQ: finishing the job (result, registries)"
        elif "prepare_job_execution" in stack:
            cat = "RQ: preparing the job (heartbeat, registries)"
        else:
            cat = "RQ: other horse work"
        cats[cat] += n
    if not total:
        return ["py-spy: no work-horse samples"]
    return [f"  {100 * v / total:5.1f}%  {k}" for k, v in cats.most_common()] + [f"  ({total} horse samples)"]


def print_stages(title: str, stages: list[tuple[str, list[float]]]) -> None:
    print(title)
    for name, values in stages:
        print(f"  {ms(pct(values, 50)):>7} ms p50  {ms(pct(values, 99)):>7} ms p99  {name}")


def summarize(samples: list[Sample]) -> dict[str, float]:
    to_cancel = [s.cancelled - s.sent for s in samples if s.cancelled]
    to_post = [s.posted - s.sent for s in samples if s.posted]
    return {"n": len(samples), "cancel50": pct(to_cancel, 50), "cancel99": pct(to_cancel, 99),
            "post50": pct(to_post, 50), "post99": pct(to_post, 99),
            "done50": pct([s.done - s.sent for s in samples], 50),
            "finished50": pct([s.finished - s.sent for s in samples], 50),
            "finished99": pct([s.finished - s.sent for s in samples], 99),
            "intake50": pct([s.answered - s.sent for s in samples], 50),
            "missing": sum(1 for s in samples if not s.cancelled or not s.posted)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="measured requests (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--noop", type=int, default=200, help="no-op jobs for each RQ baseline (default 200)")
    parser.add_argument("--py-spy", default=None, help="path of a py-spy binary: profile the worker in an extra, unmeasured phase")
    args = parser.parse_args(argv)
    n, warm = max(1, min(args.requests, 2000)), max(0, args.warmup)
    docs_total = warm + n + (SPY_REQUESTS if args.py_spy else 0)

    load_before = loadavg()
    stack = Stack("latency")
    try:
        redis_proc = stack.redis()
        sandbox_proc = stack.sandbox("--documents", str(docs_total), "--durations-zero", *SANDBOX_UNLIMITED)
        from devenv import free_port

        env = service_env(redis_proc.url, sandbox_proc.extra["webhook"], B24_RATE_LIMIT=NO_LIMIT_RATE,
                          B24_RATE_BURST=NO_LIMIT_BURST, HOST=HOST, PORT=str(free_port()))
        conn = redis.Redis.from_url(redis_proc.url)
        watcher = KeyWatcher(conn, [records.KEY_PREFIX, "rq:job:"])
        worker = stack.worker(env, "worker")
        wait_for_workers(conn, 1, procs=[worker])
        web = stack.web(env)
        http = httpx.Client(base_url=web.url, timeout=30)
        sandbox = Sandbox(sandbox_proc.url)

        doc = iter(range(1, docs_total + 1))
        run_requests(http, conn, watcher, "warm", [next(doc) for _ in range(warm)])
        started = time.monotonic()
        ours = run_requests(http, conn, watcher, "ours", [next(doc) for _ in range(n)])
        ours_seconds = time.monotonic() - started
        spy_out = stack.dir / "py-spy.txt"
        if args.py_spy:
            # A separate, unmeasured phase: py-spy slows the processes it samples.
            spy = subprocess.Popen([args.py_spy, "record", "-p", str(worker.pid), "--subprocesses", "--nonblocking",
                                    "-r", "250", "-f", "raw", "-o", str(spy_out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(1.0)
            run_requests(http, conn, watcher, "profiled", [next(doc) for _ in range(SPY_REQUESTS)])
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
        noop1 = run_noops(conn, watcher, "noop1", args.noop, two_hop=False)
        noop2 = run_noops(conn, watcher, "noop2", args.noop, two_hop=True)

        calls = sandbox.calls()
        attach_portal_times(ours, calls, conn)
        documents = sandbox.documents()
        still_conducted = [s.doc_id for s in ours if documents.get(s.doc_id, {}).get("status") == "Y"]
        batches = sum(1 for c in calls if c.get("method") == "batch")
        posts = sum(1 for c in calls if c.get("method") == "im.message.add")
        worker_log = (stack.dir / "worker.log").read_text(errors="replace")
    finally:
        stack.close()

    o = summarize(ours)
    noop1_t = [r["done"] - r["sent"] for r in noop1]
    noop2_t = [r["done"] - r["sent"] for r in noop2]
    print(f"machine: {load_before} before, {loadavg()} after; logs in {stack.dir}")
    print(f"run: {n} requests one at a time over HTTP (gunicorn), 1 worker, sandbox --durations-zero, limits out "
          f"of reach; {ours_seconds:.1f} s; sandbox saw {batches} batch and {posts} im.message.add calls in all")
    print(f"checks: documents still conducted {len(still_conducted)}, requests without a cancel or post in the "
          f"call log {o['missing']}, errors in the worker log {worker_log.count(' error ')}")
    print_stages("where one request's time goes (ours, RQ job timestamps + sandbox call log):", stage_lines(ours))
    print_stages("RQ no-op, one hop:", noop_stage_lines(noop1, False))
    print_stages("RQ no-op, two hops:", noop_stage_lines(noop2, True))
    if args.py_spy and spy_out.exists():
        print(f"py-spy (250 Hz, a separate phase of {SPY_REQUESTS} requests), where the work-horses spent their samples:")
        for line in py_spy_summary(spy_out):
            print(line)
    print()
    print(f"intake (HTTP 202) p50 {ms(o['intake50'])} ms")
    print(f"ours: to document cancelled p50 {ms(o['cancel50'])} ms, p99 {ms(o['cancel99'])} ms")
    print(f"ours: to message posted     p50 {ms(o['post50'])} ms, p99 {ms(o['post99'])} ms   "
          f"(goal p50 <= 150, p99 <= 400)")
    print(f"ours: to report job finished p50 {ms(o['finished50'])} ms, p99 {ms(o['finished99'])} ms")
    print(f"RQ no-op 1 hop: enqueue -> finished p50 {ms(pct(noop1_t, 50))} ms, p99 {ms(pct(noop1_t, 99))} ms")
    print(f"RQ no-op 2 hops: enqueue -> finished p50 {ms(pct(noop2_t, 50))} ms, p99 {ms(pct(noop2_t, 99))} ms")
    print(f"ratio ours/no-op 2 hops (p50, to message posted): {o['post50'] / pct(noop2_t, 50):.2f}; "
          f"(p50, job finished vs job finished): {o['finished50'] / pct(noop2_t, 50):.2f}; "
          f"ours beyond RQ's 2-hop cost: {ms(o['finished50'] - pct(noop2_t, 50))} ms p50")
    ok = not still_conducted and not o["missing"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
