"""Benchmark: `POST /v1/cancel` throughput and latency against a bare Flask app and a naive Flask+RQ intake.

One run, only on 127.0.0.1, about a minute:

1. starts a private Redis (`devenv.start_redis` on a temp dir; never the one on 6379);
2. serves, one after the other and with the same `gunicorn -c gunicorn.conf.py` (HOST/PORT from the
   environment, the same WEB_CONCURRENCY), `bench.baselines:bare_app`, `bench.baselines:naive_app`
   and our `app:app`;
3. drives each with wrk (32 connections, 2 threads, a warm-up then a fixed duration, `--latency`); every
   request has a distinct `Idempotency-Key` (thread id + counter, from a wrk Lua script), a valid bearer key
   and the body `{"document_ids": [142, 143], "reason": "bench"}`; the script counts answers by status;
4. after our runs (`ours`, and `replica`: ours on a primary with a replica started here and REDIS_MIN_REPLICAS=1)
   checks Redis: 202 answers = request records = job ids in `rq:queue:cancel`, every listed
   job has its `rq:job:*` hash and its record, every `rq:job:*` has its record, and a sample of jobs loads
   with RQ's JSON serializer;
5. prints, as the last lines, req/s, p50 and p99 per app, the ratios ours/bare and ours/naive, the machine
   and the wrk settings; stops everything it started by PID.

wrk, Redis and gunicorn share the machine's cores, and so does anything else running: each run also prints
the CPU cores used by the server, Redis, wrk and "other" processes (from /proc), and the server's CPU
microseconds per request, which barely moves with background load when req/s does. On a busy machine use
`--rounds 3` (each app's median run is reported) and look at the CPU cost per request.

    make bench                          # installs wrk if missing, then runs this (python -m bench)
    .venv/bin/python -m bench.intake [--duration 10] [--warmup 2] [--connections 32] [--threads 2] [--rounds 1]
    .venv/bin/python bench/intake.py --apps ours

Gunicorn settings other than the config file's can be tried without editing it through gunicorn's own
`GUNICORN_CMD_ARGS` (e.g. `GUNICORN_CMD_ARGS="--worker-class gthread --threads 4"`), which this passes on.
Exit code: 0 when every run worked and the Redis check passed, 1 otherwise, 2 when wrk is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

HOST = "127.0.0.1"  # the benchmark only ever talks to this machine
GUNICORN_CONFIG = ROOT / "gunicorn.conf.py"
API_KEY = "bench-key"
BODY = '{"document_ids": [142, 143], "reason": "bench"}'
# What our intake scopes an Idempotency-Key by: TRIGGER_API_KEYS is the caller `default`.
PORTAL, SOURCE, CALLER = "default", "api", "default"
APPS = {
    "bare": "bench.baselines:bare_app",
    "naive": "bench.baselines:naive_app",
    "ours": "app:app",
    # Ours again, on a primary with one replica and REDIS_MIN_REPLICAS=1: each 202 waits for the replica's
    # acknowledgement (WAIT in the submit's own pipeline). The cost of durable acceptance.
    "replica": "app:app",
}
# The goals the service aims at (README, "Performance").
GOAL_RATIO_BARE = 0.55
GOAL_P99_MS = 25.0
# Time for the server to finish requests wrk had sent when it stopped, before we look at Redis.
DRAIN_SECONDS = 1.0
# Job hashes loaded with RQ (Job.fetch_many) to prove they are real RQ jobs.
RQ_SAMPLE = 200

# wrk Lua: every request gets `Idempotency-Key: <run>-<thread>-<n>`; answers are counted by status in
# each thread and summed in done(). `request()` is called once per request written (also after reconnects).
WRK_SCRIPT = r"""
local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

function init(args)
  run = args[1] or "run"
  sent, answered, s202, s200, other2xx, non2xx = 0, 0, 0, 0, 0, 0
  body = '__BODY__'
  base = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer __KEY__"}
end

function request()
  sent = sent + 1
  base["Idempotency-Key"] = run .. "-" .. tid .. "-" .. sent
  return wrk.format("POST", "/v1/cancel", base, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status == 202 then s202 = s202 + 1
  elseif status == 200 then s200 = s200 + 1
  elseif status > 200 and status < 300 then other2xx = other2xx + 1
  else non2xx = non2xx + 1 end
end

function done(summary, latency, requests)
  local t = {sent = 0, answered = 0, s202 = 0, s200 = 0, other2xx = 0, non2xx = 0}
  for _, thread in ipairs(threads) do
    io.write(string.format("BENCH_THREAD tid=%d sent=%d\n", thread:get("tid"), thread:get("sent")))
    for name, _ in pairs(t) do t[name] = t[name] + thread:get(name) end
  end
  io.write(string.format("BENCH_COUNTS sent=%d answered=%d s202=%d s200=%d other2xx=%d non2xx=%d\n",
    t.sent, t.answered, t.s202, t.s200, t.other2xx, t.non2xx))
end
""".replace("__BODY__", BODY).replace("__KEY__", API_KEY)


class BenchError(Exception):
    """The benchmark could not run; the message says why and what to do."""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    counts: dict[str, int]
    sent_per_thread: dict[int, int]
    socket_errors: str
    raw: str


@dataclass
class AppRun:
    name: str
    result: WrkResult | None = None
    workers: int = 0
    error: str | None = None
    check: list[str] = field(default_factory=list)
    check_ok: bool | None = None
    # CPU cores used during the measured run: server (gunicorn), redis, wrk, and everything else.
    cpu: dict[str, float] = field(default_factory=dict)
    # CPU microseconds per answered request, of the server (all gunicorn processes) and of Redis.
    cost_us: dict[str, float] = field(default_factory=dict)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk is not installed. Run `make bench` (it installs wrk with apt-get, then runs the "
                         "benchmarks), or `apt-get install -y wrk` as root.")
    return path


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    value, unit = float(match[1]), match[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> WrkResult:
    """req/s, p50, p99, request count, the Lua counters and socket errors from wrk's output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    counts = re.search(r"^BENCH_COUNTS (.*)$", out, re.MULTILINE)
    if not (rps and p50 and p99 and total and counts):
        raise BenchError(f"could not parse wrk's output:\n{out}")
    sock = re.search(r"^\s+Socket errors: (.*)$", out, re.MULTILINE)
    return WrkResult(
        rps=float(rps[1]), p50_ms=to_ms(p50[1]), p99_ms=to_ms(p99[1]), requests=int(total[1]),
        counts={k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts[1])},
        sent_per_thread={int(t): int(n) for t, n in re.findall(r"^BENCH_THREAD tid=(\d+) sent=(\d+)$", out, re.MULTILINE)},
        socket_errors=sock[1] if sock else "none", raw=out,
    )


def run_wrk(wrk: str, script: Path, port: int, seconds: float, args: argparse.Namespace, run_id: str) -> WrkResult:
    # wrk takes whole seconds only ("-d1.5s" is a usage error).
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s",
            "-s", str(script), f"http://{HOST}:{port}/v1/cancel", "--", run_id]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def gunicorn_settings(env: dict[str, str]) -> dict[str, Any]:
    """The values the config file computes under `env` (what every app is served with)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        values = runpy.run_path(str(GUNICORN_CONFIG))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {k: values.get(k) for k in ("workers", "worker_class", "threads", "keepalive", "preload_app")}


TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (gunicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def child_count(pid: int) -> int:
    return len(children(pid))


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / TICK, total / TICK


def start_gunicorn(spec: str, env: dict[str, str], log: Path) -> devenv.Process:
    """gunicorn -c gunicorn.conf.py <spec>, on env's HOST/PORT, in its own process group; wait until it listens."""
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG), spec]
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    finally:
        out.close()
    proc = devenv.Process(name=f"gunicorn {spec}", popen=popen, url=f"http://{HOST}:{env['PORT']}")
    devenv.wait_for_port(proc, HOST, int(env["PORT"]))
    # Let the workers finish forking (preload_app: quick); the warm-up absorbs the rest.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and child_count(proc.pid) < 1:
        time.sleep(0.05)
    return proc


def idempotency_key_for(key: str) -> str:
    """The Redis key our intake maps an Idempotency-Key to (jobs.records.idempotency_key, recomputed
    independently)."""
    return "b24c:idem:" + hashlib.sha256(f"{PORTAL}\x00{SOURCE}\x00{CALLER}\x00{key}".encode()).hexdigest()[:32]


def scan_keys(conn: Any, pattern: str) -> list[bytes]:
    return list(conn.scan_iter(match=pattern, count=5000))


def exists_many(conn: Any, keys: list[str], chunk: int = 5000) -> list[bool]:
    found: list[bool] = []
    for start in range(0, len(keys), chunk):
        pipe = conn.pipeline(transaction=False)
        for key in keys[start:start + chunk]:
            pipe.exists(key)
        found += [bool(n) for n in pipe.execute()]
    return found


def check_ours(conn: Any, result: WrkResult, run_id: str) -> tuple[bool, list[str]]:
    """Redis after our run: answers, records and jobs agree, and every job is a loadable RQ job."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    lines: list[str] = []
    ok = True
    c = result.counts
    records = {k.decode()[len("b24c:req:"):] for k in scan_keys(conn, "b24c:req:*")}
    queued = [j.decode() for j in conn.lrange("rq:queue:cancel", 0, -1)]
    job_keys = {k.decode()[len("rq:job:"):] for k in scan_keys(conn, "rq:job:*")}
    unanswered = c["sent"] - c["answered"]

    def expect(cond: bool, text: str) -> None:
        nonlocal ok
        ok &= cond
        lines.append(f"  [{'ok' if cond else 'FAIL'}] {text}")

    expect(c["non2xx"] == 0 and c["other2xx"] == 0,
           f"every answer was 2xx: {c['s202']} x 202, {c['s200']} x 200, {c['other2xx']} other 2xx, "
           f"{c['non2xx']} non-2xx")
    expect(c["s200"] == 0, f"no answer was a duplicate (200): {c['s200']}")
    expect(len(queued) == len(set(queued)), f"job ids in rq:queue:cancel are distinct: {len(queued)} listed, "
                                            f"{len(set(queued))} distinct")
    expect(len(records) == len(queued) == len(job_keys),
           f"request records = job ids in rq:queue:cancel = rq:job:* hashes: {len(records)} = {len(queued)} = "
           f"{len(job_keys)}")
    in_flight = len(records) - c["s202"]
    exact = in_flight == 0
    expect(0 <= in_flight <= unanswered,
           f"202 answers = request records: {c['s202']} vs {len(records)}"
           + ("" if exact else f" (the {in_flight} extra are requests wrk had sent when its time ran out and the "
                                f"server completed after it stopped reading; {unanswered} were unanswered)"))
    # Every record belongs to a key wrk sent in this run, and every sent key has at most one record: the
    # idempotency keys are all keys wrk sent and map one to one onto the records.
    sent_keys = {idempotency_key_for(f"{run_id}-{tid}-{n}") for tid, count in result.sent_per_thread.items()
                 for n in range(1, count + 1)}
    idem_keys = [k.decode() for k in scan_keys(conn, "b24c:idem:*")]
    strays = set(idem_keys) - sent_keys
    mapped: list[bytes | None] = []
    for start in range(0, len(idem_keys), 5000):
        pipe = conn.pipeline(transaction=False)
        for key in idem_keys[start:start + 5000]:
            pipe.hget(key, "id")
        mapped += pipe.execute()
    mapped_ids = {m.decode() for m in mapped if m}
    expect(not strays and len(mapped_ids) == len(idem_keys) and mapped_ids == records,
           f"every record is for a key wrk sent ({len(sent_keys)} keys sent): {len(strays)} strays; "
           f"{len(idem_keys)} idempotency keys map one to one onto the {len(records)} records: "
           f"{mapped_ids == records}")
    listed_ids = [j.removeprefix("cancel-") for j in queued]
    missing_hash = [j for j, there in zip(queued, exists_many(conn, [f"rq:job:{j}" for j in queued])) if not there]
    missing_rec = [j for j, rid in zip(queued, listed_ids) if rid not in records]
    expect(not missing_hash and not missing_rec,
           f"every listed job has its rq:job hash and its record: {len(missing_hash)} without hash, "
           f"{len(missing_rec)} without record (full check of {len(queued)})")
    orphans = [j for j in job_keys if not j.startswith("cancel-") or j[len("cancel-"):] not in records]
    expect(not orphans, f"every rq:job:* has its record: {len(orphans)} orphans of {len(job_keys)}")
    sample = queued[:: max(1, len(queued) // RQ_SAMPLE)][:RQ_SAMPLE]
    jobs = Job.fetch_many(sample, connection=conn, serializer=JSONSerializer)
    good = sum(1 for job_id, job in zip(sample, jobs)
               if job is not None and job.func_name == "jobs.cancel.cancel_documents"
               and job.args == [job_id[len("cancel-"):]] and job.origin == "cancel")
    expect(good == len(sample), f"sampled jobs load with RQ's JSON serializer as cancel_documents(request_id): "
                                f"{good}/{len(sample)}")
    return ok, lines


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc={os.cpu_count()}, model name={model}"


def bench_app(name: str, wrk: str, script: Path, env: dict[str, str], args: argparse.Namespace,
              tmp: Path, conn: Any, redis_pid: int, run_id: str, replica: Any = None) -> AppRun:
    run = AppRun(name)
    app_env = dict(env, PORT=str(devenv.free_port()))
    log = tmp / f"gunicorn-{name}.log"
    proc: devenv.Process | None = None
    try:
        proc = start_gunicorn(APPS[name], app_env, log)
        port = int(app_env["PORT"])
        if args.warmup > 0:
            run_wrk(wrk, script, port, args.warmup, args, f"warm-{run_id}")
        time.sleep(DRAIN_SECONDS)
        conn.flushdb()  # our private Redis: the measured run starts from nothing
        server = [proc.pid, *children(proc.pid)]
        run.workers = len(server) - 1
        before = (time.monotonic(), machine_busy()[0], cpu_seconds(server), cpu_seconds([redis_pid]),
                  resource.getrusage(resource.RUSAGE_CHILDREN))
        run.result = run_wrk(wrk, script, port, args.duration, args, run_id)
        after = (time.monotonic(), machine_busy()[0], cpu_seconds(server), cpu_seconds([redis_pid]),
                 resource.getrusage(resource.RUSAGE_CHILDREN))
        wall = after[0] - before[0]
        wrk_cpu = (after[4].ru_utime + after[4].ru_stime) - (before[4].ru_utime + before[4].ru_stime)
        server_user, server_sys = after[2][0] - before[2][0], after[2][1] - before[2][1]
        redis_cpu = sum(after[3]) - sum(before[3])
        run.cpu = {"server": (server_user + server_sys) / wall, "redis": redis_cpu / wall, "wrk": wrk_cpu / wall}
        run.cpu["other"] = max(0.0, (after[1] - before[1]) / wall - sum(run.cpu.values()))
        answered = max(1, run.result.counts["answered"])
        run.cost_us = {"server": (server_user + server_sys) / answered * 1e6,
                       "server user": server_user / answered * 1e6, "server sys": server_sys / answered * 1e6,
                       "redis": redis_cpu / answered * 1e6}
        time.sleep(DRAIN_SECONDS)
        if name in ("ours", "replica"):
            run.check_ok, run.check = check_ours(conn, run.result, run_id)
        if replica is not None:
            conn.set("bench:fence", "1")
            conn.wait(1, 5000)
            same = replica.dbsize() == conn.dbsize()
            run.check_ok = bool(run.check_ok) and same
            run.check.append(f"  [{'ok' if same else 'FAIL'}] the replica holds every key of the primary: "
                             f"{replica.dbsize()} = {conn.dbsize()}")
        elif name == "naive":
            n = conn.llen("rq:queue:cancel")
            run.check = [f"  naive: {run.result.counts['s202']} x 202, {n} jobs in rq:queue:cancel"]
    except (BenchError, RuntimeError, subprocess.TimeoutExpired) as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        run.error = f"{exc}\n--- {log.name} (tail) ---\n{tail}"
    finally:
        if proc is not None:
            proc.stop()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per app (10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per app (2; 0 for none)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat bare, naive, ours this many times and report each app's median run (1)")
    parser.add_argument("--apps", default="bare,naive,ours,replica",
                        help="comma-separated subset of bare,naive,ours,replica")
    parser.add_argument("--verbose", action="store_true", help="print wrk's full output")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.apps.split(",") if n.strip()]
    if not names or any(n not in APPS for n in names) or args.rounds < 1:
        parser.error(f"--apps must name some of {', '.join(APPS)}; --rounds must be >= 1")
    try:
        wrk = require_wrk()
    except BenchError as exc:
        print(f"bench.intake: {exc}", file=sys.stderr)
        return 2

    import redis

    runs: dict[str, list[AppRun]] = {name: [] for name in names}
    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="b24-bench-intake-") as tmpdir:
        tmp = Path(tmpdir)
        script = tmp / "cancel.lua"
        script.write_text(WRK_SCRIPT)
        redis_proc = devenv.start_redis(tmp / "redis")
        pair: tuple[devenv.Process, devenv.Process] | None = None
        try:
            pair = start_pair(tmp) if "replica" in names else None
            conn = redis.Redis.from_url(redis_proc.url)
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_"))}
            env.update(HOST=HOST, REDIS_URL=redis_proc.url, B24_WEBHOOK_URL="http://127.0.0.1:9/rest/1/benchcode/",
                       B24_CHAT_ID="chat1", TRIGGER_API_KEYS=API_KEY, PYTHONPATH=str(ROOT))
            settings = gunicorn_settings(env)
            print(f"Redis {redis_proc.url} (pid {redis_proc.pid}); gunicorn -c {GUNICORN_CONFIG.name}: {settings}"
                  + (f"; GUNICORN_CMD_ARGS={env['GUNICORN_CMD_ARGS']!r}" if env.get("GUNICORN_CMD_ARGS") else ""),
                  flush=True)
            print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
            for round_ in range(1, args.rounds + 1):
                for name in names:
                    if name == "replica" and pair is not None:
                        primary, replica = pair
                        run = bench_app(name, wrk, script, dict(env, REDIS_URL=primary.url, REDIS_MIN_REPLICAS="1"),
                                        args, tmp, redis.Redis.from_url(primary.url), primary.pid,
                                        f"run{round_}-{name}", replica=redis.Redis.from_url(replica.url))
                    else:
                        run = bench_app(name, wrk, script, env, args, tmp, conn, redis_proc.pid,
                                        f"run{round_}-{name}")
                    runs[name].append(run)
                    print_run(run, round_, args)
            conn.close()
        finally:
            for proc in (pair or ()):
                proc.stop()
            redis_proc.stop()
    return report(runs, args, settings)


def start_pair(tmp: Path) -> tuple[devenv.Process, devenv.Process]:
    """A second Redis primary with one replica (loopback, free ports), the replica synced, for the `replica` run."""
    import redis

    primary = devenv.start_redis(tmp / "primary")
    replica = devenv.start_redis(tmp / "replica", replica_of=int(primary.url.rsplit(":", 1)[1].split("/")[0]))
    conn = redis.Redis.from_url(replica.url)
    deadline = time.monotonic() + 20
    while conn.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            primary.stop()
            replica.stop()
            raise BenchError("the bench's replica did not sync with its primary within 20 s")
        time.sleep(0.1)
    print(f"Redis primary {primary.url} (pid {primary.pid}) with replica {replica.url} (pid {replica.pid}) "
          "for the replica run (REDIS_MIN_REPLICAS=1)", flush=True)
    return primary, replica


def print_run(run: AppRun, round_: int, args: argparse.Namespace) -> None:
    label = f"{run.name}" + (f" (round {round_})" if args.rounds > 1 else "")
    if run.error or run.result is None:
        print(f"{label}: FAILED: {run.error}", flush=True)
        return
    r = run.result
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    cost = ", ".join(f"{k} {v:.0f}" for k, v in run.cost_us.items())
    print(f"{label}: {r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {r.requests} requests, "
          f"{run.workers} workers; CPU cores used: {cpu}; CPU us per request: {cost}; counts {r.counts}; "
          f"socket errors: {r.socket_errors}", flush=True)
    if args.verbose:
        print(r.raw)
    for line in run.check:
        print(line, flush=True)


def median_run(runs: list[AppRun]) -> AppRun | None:
    good = sorted((run for run in runs if run.result), key=lambda run: run.result.rps)  # type: ignore[union-attr]
    return good[(len(good) - 1) // 2] if good else None


def report(all_runs: dict[str, list[AppRun]], args: argparse.Namespace, settings: dict[str, Any]) -> int:
    flat = [run for runs in all_runs.values() for run in runs]
    chosen = {name: median_run(runs) for name, runs in all_runs.items()}
    failed = any(run.error for run in flat)
    checks = [run.check_ok for name in ("ours", "replica") for run in all_runs.get(name, [])
              if run.check_ok is not None]
    if checks:
        print(f"check: {'PASSED' if all(checks) else 'FAILED'} (202 answers = request records = jobs in "
              f"rq:queue:cancel; every job has its record{'; every round' if len(checks) > 1 else ''})")
    non2xx = {name: sum(run.result.counts["non2xx"] for run in runs if run.result) for name, runs in all_runs.items()}
    print("non-2xx answers: " + ", ".join(f"{k} {v}" for k, v in non2xx.items()))
    if args.rounds > 1:
        for name, runs in all_runs.items():
            print(f"{name} req/s per round: " + ", ".join(f"{run.result.rps:.0f}" if run.result else "failed"
                                                          for run in runs) + " (median below)")

    def ratio(a: str, b: str) -> float | None:
        ra, rb = chosen.get(a), chosen.get(b)
        if ra and rb and ra.result and rb.result and rb.result.rps:
            return ra.result.rps / rb.result.rps
        return None

    vs_bare, vs_naive = ratio("ours", "bare"), ratio("ours", "naive")
    ours = chosen.get("ours")
    if ours and ours.result and vs_bare is not None:
        met = vs_bare >= GOAL_RATIO_BARE and ours.result.p99_ms <= GOAL_P99_MS
        print(f"goal (ours >= {GOAL_RATIO_BARE}x bare and p99 <= {GOAL_P99_MS:g} ms at {args.connections} "
              f"connections): {'met' if met else 'NOT met'}")
    costs = {name: run.cost_us for name, run in chosen.items() if run and run.cost_us}
    if costs:
        print("CPU per request, server + Redis (steadier than req/s on a shared machine): "
              + ", ".join(f"{name} {c['server'] + c['redis']:.0f} us" for name, c in costs.items()))
    other = [run.cpu["other"] for run in flat if run.cpu]
    if other:
        print(f"other processes on this machine used {min(other):.2f}-{max(other):.2f} cores during the runs"
              + (" (busy machine: figures are low and noisy)" if max(other) > 0.2 else ""))
    print()
    print(f"{'app':<7}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}{'server CPU us/req':>19}")
    for name, run in chosen.items():
        if run and run.result:
            r = run.result
            print(f"{name:<7}{r.rps:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.counts['non2xx']:>9}"
                  f"{run.cost_us.get('server', 0):>19.0f}")
        else:
            print(f"{name:<7}{'failed':>10}")
    print(f"ratio ours/bare = {vs_bare:.2f}" if vs_bare is not None else "ratio ours/bare = n/a")
    paired = paired_ratios(all_runs.get("ours", []), all_runs.get("bare", []))
    if len(paired) > 1:
        print("ratio ours/bare per round (each round's runs back to back): "
              + ", ".join(f"{value:.2f}" for value in paired) + f"; median {statistics.median(paired):.2f}")
    print(f"ratio ours/naive = {vs_naive:.2f}" if vs_naive is not None else "ratio ours/naive = n/a")
    if "replica" in all_runs:
        for base in ("ours", "bare", "naive"):
            value = ratio("replica", base)
            print(f"ratio replica/{base} = {value:.2f}" if value is not None else f"ratio replica/{base} = n/a")
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    workers = ",".join(f"{name}={run.workers}" for name, run in chosen.items() if run)
    cmd_args = os.environ.get("GUNICORN_CMD_ARGS")
    print(f"wrk: -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency (after {args.warmup:g} s "
          f"warm-up{f', median of {args.rounds} rounds' if args.rounds > 1 else ''}), Lua script with distinct "
          f"Idempotency-Key; gunicorn {GUNICORN_CONFIG.name}: {settings.get('worker_class')} workers ({workers}), "
          f"threads={settings.get('threads') or 1}, keepalive={settings.get('keepalive')}"
          + (f", GUNICORN_CMD_ARGS={cmd_args!r}" if cmd_args else ""))
    ok = not failed and all(checks) and all(v == 0 for v in non2xx.values())
    return 0 if ok else 1


def paired_ratios(ours: list[Any], bare: list[Any]) -> list[float]:
    """ours/bare req/s within each round: the two ran seconds apart, so a machine that got slower or faster
    between rounds moves both (a steadier figure on a shared machine than the ratio of medians)."""
    return [o.result.rps / b.result.rps for o, b in zip(ours, bare, strict=False)
            if o.result and b.result and b.result.rps]


if __name__ == "__main__":
    sys.exit(main())
