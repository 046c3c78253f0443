"""Profile `POST /v1/cancel` in-process: Flask's test client against a private real Redis.

    .venv/bin/python -m bench.profile_intake [--requests 5000] [--top 25]

1. Costs without a profiler (best of 3 batches, wall and CPU time of this process per call): the full
   POST, the same POST with `Submitter.submit` replaced by a stub, a bare Flask POST, `Submitter.submit`
   alone, the submit script with precomputed arguments, and a PING.
2. cProfile over `--requests` POSTs: the time inside each step of the request path (inclusive, per
   request and as a share), then the top functions by own time.

Profiled times are inflated by cProfile (most for code that makes many small calls, such as redis-py's
argument packing); the shares and the un-profiled costs in (1) are what to compare.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

BODY = b'{"document_ids": [142, 143], "reason": "bench"}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}
# (label, file suffix, function name) of the steps reported from the profile, in request order.
STEPS = [
    ("whole request through the test client", "flask/testing.py", "open"),
    ("  Flask.wsgi_app (the app's share)", "flask/app.py", "wsgi_app"),
    ("    view handlers/api.py:cancel", "handlers/api.py", "cancel"),
    ("      authenticate_trigger", "handlers/intake.py", "authenticate_trigger"),
    ("      parse_cancel_body", "handlers/intake.py", "parse_cancel_body"),
    ("      choose_portal", "handlers/intake.py", "choose_portal"),
    ("      cancel_request (validation)", "handlers/intake.py", "cancel_request"),
    ("      idempotency_key", "handlers/intake.py", "idempotency_key"),
    ("      intake.submit", "handlers/intake.py", "submit"),
    ("        Submitter.submit", "jobs/enqueue.py", "submit"),
    ("          Queue.create_job (RQ)", "rq/queue.py", "create_job"),
    ("          Queue._prepare_for_queue (RQ)", "rq/queue.py", "_prepare_for_queue"),
    ("          Job.to_dict (RQ, zlib + dates)", "rq/job.py", "to_dict"),
    ("          records.new_record", "jobs/records.py", "new_record"),
    ("          Script.__call__ (EVALSHA round trip)", "redis/commands/core.py", "__call__"),
    ("            pack 60+ args (redis-py, pure Python)", "redis/connection.py", "pack"),
    ("            send (sendall)", "redis/connection.py", "send_packed_command"),
    ("            read reply (wait + parse)", "redis/connection.py", "read_response"),
    ("        url_for status_url", "flask/helpers.py", "url_for"),
    ("    Flask.finalize_request (JSON reply, after_request)", "flask/app.py", "finalize_request"),
    ("      metrics count() (after_request)", "handlers/metrics.py", "count"),
]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cost(fn: Callable[[], object], n: int = 2000) -> tuple[float, float]:
    """(wall, cpu) microseconds per call, best of 3 batches after a warm-up."""
    for _ in range(200):
        fn()
    best = (float("inf"), float("inf"))
    for _ in range(3):
        wall, used = time.perf_counter(), cpu()
        for _ in range(n):
            fn()
        best = min(best, ((time.perf_counter() - wall) / n * 1e6, (cpu() - used) / n * 1e6))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_intake")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="b24-profile-") as tmpdir:
        redis_proc = devenv.start_redis(Path(tmpdir) / "redis")
        try:
            for name in [k for k in os.environ if k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_"))]:
                del os.environ[name]
            os.environ.update(REDIS_URL=redis_proc.url, B24_WEBHOOK_URL="http://127.0.0.1:9/rest/1/benchcode/",
                              B24_CHAT_ID="chat1", TRIGGER_API_KEYS="bench-key")
            run(args)
        finally:
            redis_proc.stop()
    return 0


def run(args: argparse.Namespace) -> None:
    from flask import Flask

    import app as app_module
    from jobs import policy, records
    from jobs.enqueue import Submitted

    app = app_module.create_app()
    client = app.test_client()
    svc = app.extensions["b24cancel"]
    counter = [0]

    def post() -> None:
        counter[0] += 1
        answer = client.post("/v1/cancel", data=BODY, headers={**HEADERS, "Idempotency-Key": f"k-{counter[0]}"})
        if answer.status_code not in (200, 202):
            raise SystemExit(f"unexpected {answer.status_code}: {answer.get_data(as_text=True)}")

    bare = Flask("bare")
    bare.post("/v1/cancel")(lambda: ({"request_id": "0" * 32, "status_url": "/v1/requests/" + "0" * 32}, 202))
    bare_client = bare.test_client()
    request_ = {"portal": "default", "source": "api", "document_ids": [142, 143], "reason": "bench",
                "external_id": None, "chat": None}
    real_submit = svc.submitter.submit

    def submit_only() -> None:
        counter[0] += 1
        rid = records.new_request_id()
        real_submit(rid, request_, "jobs.cancel.cancel_documents", policy.cancel_job_id(rid),
                    idempotency_key=records.idempotency_key("default", "api", "default", f"s-{counter[0]}"))

    print("un-profiled cost per call (best of 3 x 2000), wall / CPU of this process:")
    rows: list[tuple[str, Callable[[], object]]] = [
        ("full POST /v1/cancel (test client)", post),
        ("bare Flask POST (test client)", lambda: bare_client.post("/v1/cancel", data=BODY, headers=HEADERS)),
        ("Submitter.submit alone", submit_only),
        ("Redis PING", svc.redis.ping),
    ]
    for label, fn in rows:
        wall, used = cost(fn)
        print(f"  {label:58s} {wall:7.0f} us / {used:5.0f} us")
    svc.submitter.submit = lambda *a, **k: Submitted("0" * 32, "created")  # type: ignore[method-assign]
    wall, used = cost(post)
    print(f"  {'POST with Submitter.submit stubbed out':58s} {wall:7.0f} us / {used:5.0f} us")
    svc.submitter.submit = real_submit  # type: ignore[method-assign]

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(args.requests):
        post()
    profiler.disable()
    per_request = (time.perf_counter() - started) / args.requests
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"\ncProfile, {args.requests} POSTs, {per_request * 1e6:.0f} us per request under the profiler; "
          "inclusive time per step:")
    for label, suffix, func in STEPS:
        cum = sum(v[3] for (path, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
                  if name == func and path.endswith(suffix))
        print(f"  {label:58s} {cum / args.requests * 1e6:7.0f} us  {100 * cum / total:5.1f}%")
    print(f"\ntop {args.top} by own time:")
    rows_ = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]  # type: ignore[attr-defined]
    for (path, line, name), (_, calls, own, cum, _) in rows_:
        where = "/".join(Path(path).parts[-2:]) if path != "~" else ""
        print(f"  {100 * own / total:5.1f}%  {calls / args.requests:6.1f} calls/req  {name} ({where}:{line})")


if __name__ == "__main__":
    sys.exit(main())
