"""Benchmark: how close to the portal's rate limit the service runs, and what a naive client does instead.

    .venv/bin/python -m bench.limits [--requests 60] [--rate 2] [--burst 50] [--workers 4]

The sandbox portal runs with the STANDARD plan's request limit by default (a leaky bucket of 50
draining 2/s; `--rate/--burst` scale it, and the output says so) and its default simulated method
durations (they are never slept, only counted against the operating-time budget, far from its limit
here). N single-document requests arrive at once (submitted through the app's own `Submitter`, the
intake's one-round-trip write), and 4 real workers (`devenv.start_worker`, the Procfile command) work
them off. Each request needs three HTTP requests to the portal: a `catalog.document.list` read before the
cancel (its own call, so that its answer is never lost with the cancel's: the ambiguity rule), one `batch`
(cancel, read) and one `im.message.add`. The naive client needs two (cancel, post): it keeps no facts.

Three runs, each on a reset sandbox (empty bucket) and a flushed private Redis (empty limiter):
1. ours, default settings: the limiter uses B24_RATE_HEADROOM=0.8 of the plan's burst (2/s, burst 40);
2. ours, B24_RATE_HEADROOM=1.0: the limiter uses the portal's full limit;
3. naive (`bench.naive_client`): 4 threads straight to the portal, a 503 -> sleep 1 s and send again.

For each: the HTTP requests it needed (top-level calls in the sandbox call log not refused with 503;
inner batch commands excluded), the lower bound the portal's limit allows for them,
max(0, (calls - burst) / rate), the measured time from the first submit to the last report posted
(the call log's time of the last successful `im.message.add`), its ratio to the bound, and the limit
errors the portal answered (`/_sandbox/stats` by_error QUERY_LIMIT_EXCEEDED, OPERATION_TIME_LIMIT).
For ours also the bound of the share the limiter allows itself, and how often jobs were rescheduled
to wait for the limit (the records' `deferrals`). The figures are the last lines printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from bench.common import (
    Sandbox,
    Stack,
    loadavg,
    message_times,
    service_env,
    top_level,
    wait_for,
    wait_for_workers,
)
from bench.naive_client import NaiveClient, naive_posts
from bench.worker import submit_requests
from bitrix24.limits import DEFAULT_HEADROOM, PLAN_LIMITS, bucket_limits
from jobs import policy, records


def bound(calls: int, rate: float, burst: float) -> float:
    return max(0.0, (calls - burst) / rate)


def portal_figures(sandbox: Sandbox, calls: list[dict[str, Any]], started: float,
                   posted: dict[str, float]) -> dict[str, Any]:
    stats = sandbox.stats()
    http = top_level(calls)
    refused_calls = [(i, c) for i, c in enumerate(http) if c.get("http_status") == 503]
    refused = len(refused_calls)
    first_503 = (f"call #{refused_calls[0][0] + 1} ({refused_calls[0][1].get('method')}) at "
                 f"{float(refused_calls[0][1]['time']) - started:.2f} s") if refused_calls else "none"
    by_error = stats.get("by_error", {})
    return {"calls": calls, "http": len(http), "needed": len(http) - refused, "refused": refused,
            "qle": int(by_error.get("QUERY_LIMIT_EXCEEDED", 0)), "otl": int(by_error.get("OPERATION_TIME_LIMIT", 0)),
            "total": (max(posted.values()) - started) if posted else float("nan"), "posted": len(posted),
            "first_503": first_503,
            "by_method": {m: sum(1 for c in http if c.get("method") == m) for m in ("batch", "im.message.add")}}


def run_ours(stack: Stack, conn: redis.Redis, sandbox: Sandbox, env: dict[str, str], workers: int,
             doc_ids: list[int], phase: str, timeout: float) -> dict[str, Any]:
    sandbox.reset(len(doc_ids))
    conn.flushdb()  # our private Redis: records, queues and the limiter's keys start empty
    procs = [stack.worker(env, f"worker-{phase}-{i}") for i in range(workers)]
    try:
        wait_for_workers(conn, workers, procs=procs)
        finished_key = FinishedJobRegistry(name=policy.NOTIFY_QUEUE, connection=conn).key
        failed_keys = [FailedJobRegistry(name=q, connection=conn).key for q in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE)]
        started, ids = submit_requests(conn, phase, doc_ids)
        wait_for(lambda: conn.zcard(finished_key) + sum(conn.zcard(k) for k in failed_keys) >= len(ids),
                 timeout=timeout, interval=0.1, what=f"{len(ids)} requests ({phase})")
        wall = time.time() - started
        states: dict[str, int] = {}
        deferrals = 0
        for request_id in ids:
            state, deferred = conn.hmget(records.request_key(request_id), ["state", "deferrals"])
            key = state.decode() if isinstance(state, bytes) else str(state or "missing")
            states[key] = states.get(key, 0) + 1
            deferrals += int(deferred or 0)
    finally:
        for proc in procs:
            stack.stop(proc)
    tags = {f"#{rid}" for rid in ids}
    calls = sandbox.calls()
    posted = message_times(calls, lambda text: next((t for t in tags if t in text), None))
    out = portal_figures(sandbox, calls, started, posted)
    out.update(states=states, deferrals=deferrals, wall=wall)
    return out


def run_naive(sandbox: Sandbox, webhook: str, doc_ids: list[int]) -> dict[str, Any]:
    sandbox.reset(len(doc_ids))
    client = NaiveClient(webhook)
    started = time.time()
    wall = client.run(doc_ids)
    calls = sandbox.calls()
    out = portal_figures(sandbox, calls, started, naive_posts(calls))
    out.update(failures=len(client.failures), retries=client.retries, wall=wall)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="requests arriving at once (default 60)")
    parser.add_argument("--rate", type=float, default=PLAN_LIMITS["standard"][0], help="portal drain rate per second")
    parser.add_argument("--burst", type=int, default=PLAN_LIMITS["standard"][1], help="portal bucket size")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma-separated runs to skip: default,full,naive")
    parser.add_argument("--also-headroom", type=float, default=None,
                        help="one more run of ours with this B24_RATE_HEADROOM (e.g. 0.97)")
    args = parser.parse_args(argv)
    n = max(1, min(args.requests, 1000))
    rate, burst, workers = args.rate, args.burst, max(1, min(args.workers, 8))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    standard = (rate, burst) == PLAN_LIMITS["standard"]
    limits_text = (f"standard plan limits (rate {rate:g}/s, burst {burst})" if standard
                   else f"SCALED limits (rate {rate:g}/s, burst {burst}; standard is 2/s, 50)")
    expected_calls = 3 * n  # read, batch (cancel + read), post
    timeout = min(600.0, 3 * bound(expected_calls, *bucket_limits("standard", rate, burst, DEFAULT_HEADROOM)) + 60)

    load_before = loadavg()
    stack = Stack("limits")
    results: dict[str, dict[str, Any]] = {}
    try:
        redis_proc = stack.redis()
        sandbox_proc = stack.sandbox("--documents", str(n), "--rate", f"{rate:g}", "--burst", str(burst))
        sandbox = Sandbox(sandbox_proc.url)
        conn = redis.Redis.from_url(redis_proc.url)
        base = {} if standard else {"B24_RATE_LIMIT": f"{rate:g}", "B24_RATE_BURST": str(burst)}
        doc_ids = list(range(1, n + 1))
        if "default" not in skip:
            env = service_env(redis_proc.url, sandbox_proc.extra["webhook"], **base)
            results["ours, default headroom 0.8"] = run_ours(stack, conn, sandbox, env, workers, doc_ids, "default",
                                                             timeout)
        if "full" not in skip:
            env = service_env(redis_proc.url, sandbox_proc.extra["webhook"], B24_RATE_HEADROOM="1.0", **base)
            results["ours, B24_RATE_HEADROOM=1.0"] = run_ours(stack, conn, sandbox, env, workers, doc_ids, "full",
                                                              timeout)
        if args.also_headroom is not None:
            headroom = f"{args.also_headroom:g}"
            env = service_env(redis_proc.url, sandbox_proc.extra["webhook"], B24_RATE_HEADROOM=headroom, **base)
            results[f"ours, B24_RATE_HEADROOM={headroom}"] = run_ours(stack, conn, sandbox, env, workers, doc_ids,
                                                                     "extra", timeout)
        if "naive" not in skip:
            results["naive, 4 threads, 503 -> sleep 1 s"] = run_naive(sandbox, sandbox_proc.extra["webhook"], doc_ids)
    finally:
        stack.close()

    print(f"machine: {load_before} before, {loadavg()} after; logs in {stack.dir}")
    print(f"run: {n} single-document requests at once, {limits_text}, sandbox default method durations; "
          f"ours with {workers} workers")
    ok = True
    for name, r in results.items():
        extra = ""
        if "states" in r:
            extra = f", request states {r['states']}, job deferrals for the limit {r['deferrals']}"
            ok = ok and r["states"].get("done", 0) == n
        else:
            extra = f", client retries {r['retries']}, failures {r['failures']}"
            ok = ok and not r["failures"]
        ok = ok and r["posted"] == n
        print(f"{name}: {r['http']} HTTP requests ({r['by_method']['batch']} batch, {r['by_method']['im.message.add']} "
              f"im.message.add), {r['refused']} refused with 503 (first: {r['first_503']}), {r['posted']}/{n} reports posted{extra}")
    print()
    for name, r in results.items():
        b = bound(r["needed"], rate, burst)
        line = (f"{name}: calls needed {r['needed']}, portal bound {b:.1f} s, measured {r['total']:.1f} s, "
                f"ratio {r['total'] / b if b else float('nan'):.2f}")
        if name.startswith("ours, default"):
            own = bound(r["needed"], *bucket_limits("standard", rate, burst, DEFAULT_HEADROOM))
            line += (f" (bound of the limits it gives itself, 80% of the burst, {own:.1f} s, "
                     f"ratio {r['total'] / own if own else float('nan'):.2f})")
        line += f"; limit errors QUERY_LIMIT_EXCEEDED {r['qle']}, OPERATION_TIME_LIMIT {r['otl']}"
        if "retries" in r:
            line += f"; 503s {r['refused']}"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
