"""Chaos run: exactly once while Bitrix24 fails, workers die and Redis restarts and fails over.

    .venv/bin/python -m bench.chaos [--requests 1000] [--duration 300] [--kill-interval 10] [--workers 3]
                                    [--seed 10] [--max-documents 3] [--overlap 0.02] [--settle 120]
                                    [--appendfsync everysec|always] [--no-sentinel]

Real processes on free loopback ports, every one stopped by PID at the end (also on a failure or Ctrl-C):
* Redis: a primary and a replica, both with AOF (`appendonly yes`, `appendfsync everysec` unless told
  otherwise), and two Sentinels watching them; the service gets `REDIS_URL=redis+sentinel://...` and
  `REDIS_MIN_REPLICAS=1`. With `--no-sentinel`: one Redis with AOF and a plain `redis://` URL (no failover);
* the sandbox portal (`--durations-zero`, limits out of reach) with documents 1..N, all conducted;
* the web process under gunicorn (`devenv.start_web`) and 2-3 `rq worker` processes started as the
  Procfile's worker line (`devenv.start_worker`).
The service runs with B24_READ_TIMEOUT=2 s and B24_EXECUTION_LIMIT=5 s, so that the ambiguity rule
(a call without an answer settles B24_EXECUTION_LIMIT + 5 s after it was sent: 65 s in production) plays
out in seconds; the sandbox's stalls stay within those 5 s, as Bitrix24's stay within its 60 s.

Chaos, for `--duration` seconds, seeded by `--seed`:
* traffic: `--requests` `POST /v1/cancel` spread evenly over the duration, each with its own
  Idempotency-Key and 1..`--max-documents` documents no other request names, except a share
  (`--overlap`) that also name one document of a recent request (one effective cancel per document is
  still the rule). A 5xx or a connection error is sent again with the same key (a 200 then means the
  first try was stored);
* sandbox faults on cancel batches and on `im.message.add`, each call independently: 10 % HTTP 500,
  5 % `applied_then_timeout` (applied, then no answer), 5 % dropped connections, 3 % `slow` past the read
  timeout (4.5 s: no answer in time, applied later) and 3 % `slow` within it (1 s);
* every `--kill-interval` seconds, alternately, a worker (the whole process tree: parent, scheduler and
  work-horse, as when its machine dies; restarted 1 s later, as a supervisor would) or a work-horse
  alone is SIGKILLed. A worker that exits on its own is restarted too, and counted;
* at a third of the duration the Redis primary is SIGKILLed and started again on its AOF 2 s later; at
  two thirds it is SIGKILLed for good and the Sentinels fail over to the replica (the old primary then
  comes back as a replica of the new one).
When the chaos stops (the duration is over and every request was answered), the faults are cleared and
the run waits up to `--settle` seconds (120) for every accepted request to end, reading the request
records' `state`. Then it checks, from the sandbox's own documents, chat and call log:
* every accepted request (202, or 200 on a resend) ended (`done`/`failed`) within the settle time;
* no document got two effective cancels (`applied` cancel calls per document in the call log), and no
  cancel for a document was sent while an earlier one for it had not yet run on the portal (the portal
  refuses a second reversal, so only the timing shows a second call in flight);
* every accepted request has exactly one report (chat messages carrying its request id);
* none was lost (every accepted request id has a record and a report).
Those counts are the last lines printed, then `check: PASSED` or `check: FAILED` (exit code 1).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.sentinel import Sentinel

import devenv
from bench.common import (
    API_KEY,
    HOST,
    NO_LIMIT_BURST,
    NO_LIMIT_RATE,
    SANDBOX_UNLIMITED,
    Sandbox,
    Stack,
    children,
    loadavg,
    service_env,
    wait_for_workers,
)
from jobs import policy, records

# -- what the run does (defaults of the command line) ---------------------------------------------

REQUESTS = 1000
# Spread over five minutes: about 3.3 requests/s, which 3 workers on 2 shared cores keep up with.
DURATION = 300.0
KILL_INTERVAL = 10.0
WORKERS = 3
SEED = 10
MAX_DOCUMENTS = 3
# A few requests also name a document of a recent request, to exercise the per-document claim.
OVERLAP = 0.02
# How far back an overlapping request looks for a document: recent enough to be in flight at once.
OVERLAP_WINDOW = 10
# After the chaos stops, every accepted request must end within this long.
SETTLE = 120.0

# The service's timeouts for this run: short, so the ambiguity rule runs in seconds, not minutes.
READ_TIMEOUT = 2.0
EXECUTION_LIMIT = 5.0
# A `slow` call runs this long on the portal: past the read timeout and past the moment a service without
# the ambiguity rule tries again (1-2 s after the timeout), but within the execution limit, so a service
# that waits for the limit never has a second call in flight.
LONG_STALL = EXECUTION_LIMIT - 0.5
# A `slow` call answered in time.
SHORT_STALL = READ_TIMEOUT / 2
# An `applied_then_timeout` call keeps the connection this long after it took effect (the client gives up first).
LOST_ANSWER_STALL = READ_TIMEOUT + 0.5
# The share of matching calls each fault hits, unconditionally (converted to the sandbox's ordered rules).
FAULTS: tuple[tuple[str, float, float | None], ...] = (
    ("error500", 0.10, None),
    ("applied_then_timeout", 0.05, LOST_ANSWER_STALL),
    ("drop", 0.05, None),
    ("slow", 0.03, LONG_STALL),
    ("slow", 0.03, SHORT_STALL),
)
FAULTED_METHODS = ("catalog.document.cancel", "im.message.add")

# Redis: the restart's outage, and how long a Sentinel waits before it calls the primary down (longer
# than the restart, so the restart is not a failover too).
REDIS_OUTAGE = 2.0
MASTER_NAME = "mymaster"
SENTINEL_DOWN_AFTER_MS = 5000
# Two Sentinels that see the primary down at the same moment each vote for themselves and retry only after
# twice the failover timeout; the second one waits this much longer, so the first is elected at once.
SENTINEL_STAGGER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000
# Set on every node as it starts. Redis delays a full resync by 5 s by default (to serve several replicas
# with one transfer); with one replica that only widens the window in which it is empty after a restart.
NODE_CONFIG = {"repl-diskless-sync-delay": "0"}
# How long a replica may take to be in sync with its primary before the run says so.
SYNC_TIMEOUT = 30.0
# A failover (down-after, vote, promotion) normally takes 6-8 s; give up on it after this long.
FAILOVER_TIMEOUT = 60.0

# A killed worker is started again after this long, as a supervisor would.
SUPERVISOR_DELAY = 1.0
# A horse kill waits this long for some worker to be running a job; if none is, the kill is skipped.
HORSE_WAIT = 5.0
# Requests in flight at once from the bench (each holds a thread while Redis is away and it resends).
SENDERS = 8
# One request is sent again (same key) on a 5xx or no answer, this often and this long at most.
SEND_TRIES = 60
SEND_DEADLINE = 90.0
SEND_PAUSE = 0.5
HTTP_TIMEOUT = 10.0

ENDED = ("done", "failed")
REQUEST_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{32})(?![0-9a-f])")
PORTAL, SOURCE = "default", "api"


@dataclass
class ChaosConfig:
    """One run's parameters (the command line's options)."""

    requests: int = REQUESTS
    duration: float = DURATION
    kill_interval: float = KILL_INTERVAL
    workers: int = WORKERS
    seed: int = SEED
    max_documents: int = MAX_DOCUMENTS
    overlap: float = OVERLAP
    settle: float = SETTLE
    appendfsync: str = "everysec"
    sentinel: bool = True


@dataclass
class Sent:
    """One request as the bench sent it, and how the intake answered in the end."""

    index: int
    key: str
    documents: list[int]
    request_id: str | None = None
    status: int | None = None
    tries: int = 0
    resends: int = 0


@dataclass
class Result:
    """What one run did and found; `passed` is the verdict."""

    start_error: str | None = None
    settle: float = SETTLE
    worker_kills: int = 0
    horse_kills: int = 0
    redis_restarts: int = 0
    failovers: int = 0
    faults_fired: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    accepted: int = 0
    ended: int = 0
    cancelled_twice: int = 0
    sent_while_running: int = 0
    one_report: int = 0
    lost: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every invariant held (and the run started at all)."""
        return (self.start_error is None and self.accepted == self.sent > 0 and self.ended == self.accepted
                and self.cancelled_twice == 0 and self.sent_while_running == 0
                and self.one_report == self.accepted and self.lost == 0)


# -- Redis: a primary with AOF, a replica, two Sentinels ------------------------------------------

class RedisSet:
    """The Redis nodes of one run, restarted and failed over on demand; stopped by the stack."""

    def __init__(self, stack: Stack, sentinel: bool, appendfsync: str) -> None:
        self.stack = stack
        self.sentinel = sentinel
        self.appendfsync = appendfsync
        self.nodes: dict[int, devenv.Process] = {}
        self.dirs: dict[int, Path] = {}
        primary = self._start(stack.dir / "redis-a", None, None)
        self.sentinels: list[devenv.Process] = []
        self.sentinel_client: Sentinel | None = None
        if sentinel:
            self._start(stack.dir / "redis-b", None, primary)
            for i in range(2):
                self.sentinels.append(stack.add(devenv.start_sentinel(
                    stack.dir / f"sentinel-{i + 1}", primary, service=MASTER_NAME, quorum=1,
                    down_after_ms=SENTINEL_DOWN_AFTER_MS + i * SENTINEL_STAGGER_MS,
                    failover_timeout_ms=SENTINEL_FAILOVER_TIMEOUT_MS)))
            self.sentinel_client = Sentinel(self._sentinel_addresses(), socket_timeout=1.0)
        self.first_primary = primary
        if sentinel and not self.replicas_in_sync(SYNC_TIMEOUT):
            raise RuntimeError(f"the replica did not sync with the primary within {SYNC_TIMEOUT:.0f} s")

    def replicas_in_sync(self, timeout: float) -> bool:
        """Wait until every replica's link to the primary is up (bounded); whether it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                primary = self.primary_port()
                links = [redis.Redis(port=port, socket_timeout=1.0).info("replication").get("master_link_status")
                         for port in self.nodes if port != primary]
                if links and all(link == "up" for link in links):
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.1)
        return False

    def _start(self, directory: Path, port: int | None, replica_of: int | None) -> int:
        proc = self.stack.add(devenv.start_redis(directory, port=port, persist=True, replica_of=replica_of))
        node_port = int(proc.url.rsplit(":", 1)[1].split("/")[0])
        with redis.Redis(port=node_port, socket_timeout=5.0) as node:
            for name, value in {**NODE_CONFIG, "appendfsync": self.appendfsync}.items():
                node.config_set(name, value)
        self.nodes[node_port] = proc
        self.dirs[node_port] = directory
        return node_port

    def _sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", int(s.url.rsplit(":", 1)[1])) for s in self.sentinels]

    def service_url(self) -> str:
        """The REDIS_URL the service gets."""
        if self.sentinel:
            hosts = ",".join(f"{h}:{p}" for h, p in self._sentinel_addresses())
            return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"
        return f"redis://127.0.0.1:{self.first_primary}/0"

    def client(self) -> redis.Redis:
        """The bench's own connection to whichever node is the primary."""
        if self.sentinel_client is not None:
            return self.sentinel_client.master_for(MASTER_NAME, socket_timeout=5.0)
        return redis.Redis.from_url(self.service_url(), socket_timeout=5.0)

    def primary_port(self) -> int:
        """The port of the primary (as the Sentinels see it)."""
        if self.sentinel_client is None:
            return self.first_primary
        return int(self.sentinel_client.discover_master(MASTER_NAME)[1])

    def _kill(self, port: int) -> None:
        proc = self.nodes.pop(port)
        proc.kill()
        if proc in self.stack.procs:
            self.stack.procs.remove(proc)

    def restart_primary(self, outage: float) -> str:
        """SIGKILL the primary, wait `outage` seconds, start it again on the same AOF and port."""
        port = self.primary_port()
        began = time.monotonic()
        self._kill(port)
        time.sleep(outage)
        self._start(self.dirs[port], port, None)
        return f"Redis primary :{port} SIGKILLed and back on its AOF after {time.monotonic() - began:.1f} s"

    def fail_over(self) -> str:
        """SIGKILL the primary for good; wait for the Sentinels to promote the replica; rejoin it as a replica."""
        synced = "in sync" if self.replicas_in_sync(0.5) else "NOT in sync"
        old = self.primary_port()
        began = time.monotonic()
        self._kill(old)
        assert self.sentinel_client is not None
        new = old
        deadline = began + FAILOVER_TIMEOUT
        while new == old and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                new = self.primary_port()
            except redis.RedisError:
                continue
        promoted = time.monotonic() - began
        if new == old:
            return f"Sentinel failover: no new primary {FAILOVER_TIMEOUT:.0f} s after :{old} was SIGKILLed"
        # The old primary comes back as a replica of the new one, so a replica exists again (REDIS_MIN_REPLICAS).
        self._start(self.dirs[old], old, new)
        return (f"Sentinel failover: primary :{old} SIGKILLed (its replica {synced}), replica :{new} promoted after "
                f"{promoted:.1f} s; :{old} back as its replica")


class Clock:
    """Seconds since the chaos began, for the event log."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    def wait_until(self, moment: float, stop: threading.Event) -> bool:
        """Sleep until `moment`; False when the run is being stopped."""
        return not stop.wait(max(0.0, moment - self.now()))


# -- workers: started as the Procfile does, killed by PID -----------------------------------------

class Workers:
    """The run's `rq worker` processes under a supervisor: one that exits, or that the chaos kills (its whole
    tree, or only its work-horse), is started again SUPERVISOR_DELAY later."""

    def __init__(self, stack: Stack, env: dict[str, str], count: int) -> None:
        self.stack = stack
        self.env = env
        self.started = 0
        self.lock = threading.Lock()
        self.exits: list[str] = []
        self.procs = [self._start() for _ in range(count)]

    def _start(self) -> devenv.Process:
        self.started += 1
        return self.stack.worker(self.env, f"worker-{self.started}")

    @staticmethod
    def horse_of(proc: devenv.Process) -> int | None:
        """The worker's work-horse, if it runs a job: the child in a process group of its own (RQ's setpgrp)."""
        for child in children(proc.pid):
            try:
                if os.getpgid(child) == child:
                    return child
            except ProcessLookupError:
                continue
        return None

    def kill_worker(self, rng: random.Random) -> str:
        """SIGKILL one worker's whole tree (parent, scheduler, horse), then start a new worker."""
        with self.lock:
            index = rng.randrange(len(self.procs))
            proc = self.procs[index]
            tree = [proc.pid, *devenv.descendants(proc.pid)]
            busy = self.horse_of(proc) is not None
            proc.kill_tree()
            self.stack.procs.remove(proc)
            time.sleep(SUPERVISOR_DELAY)
            self.procs[index] = self._start()
        return (f"worker pid {proc.pid} SIGKILLed with its {len(tree) - 1} children "
                f"({'running a job' if busy else 'idle'}); restarted")

    def kill_horse(self, rng: random.Random) -> str | None:
        """SIGKILL the work-horse of some busy worker, waiting up to HORSE_WAIT for one to be busy."""
        deadline = time.monotonic() + HORSE_WAIT
        while time.monotonic() < deadline:
            with self.lock:
                for proc in rng.sample(self.procs, len(self.procs)):
                    horse = self.horse_of(proc)
                    if horse is not None:
                        _sigkill(horse)
                        return f"work-horse pid {horse} of worker pid {proc.pid} SIGKILLed"
            time.sleep(0.02)
        return None

    def supervise(self, clock: Clock, done: threading.Event, log: Callable[[str], None]) -> None:
        """Start again, SUPERVISOR_DELAY later, any worker that exited on its own, until `done`."""
        while not done.wait(SUPERVISOR_DELAY):
            with self.lock:
                for index, proc in enumerate(self.procs):
                    if proc.alive() or done.is_set():
                        continue
                    code = proc.popen.returncode
                    for pid in devenv.descendants(proc.pid):
                        _sigkill(pid)
                    self.stack.procs.remove(proc)
                    self.procs[index] = self._start()
                    self.exits.append(f"{clock.now():.1f} s")
                    log(f"{clock.now():6.1f} s  worker pid {proc.pid} exited on its own (code {code}); restarted")

    def close(self) -> None:
        """Stop every worker, then any work-horse that outlived it (horses have their own process group)."""
        with self.lock:
            for proc in self.procs:
                tree = devenv.descendants(proc.pid)
                self.stack.stop(proc)
                for pid in tree:
                    _sigkill(pid)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- traffic --------------------------------------------------------------------------------------

def plan_requests(cfg: ChaosConfig, rng: random.Random) -> tuple[list[Sent], int]:
    """Each request's documents (fresh ones, a few overlapping a recent request's) and how many exist."""
    planned: list[Sent] = []
    next_doc = 1
    for index in range(cfg.requests):
        count = rng.randint(1, cfg.max_documents)
        docs = list(range(next_doc, next_doc + count))
        next_doc += count
        if planned and rng.random() < cfg.overlap:
            earlier = rng.choice(planned[-OVERLAP_WINDOW:])
            docs[-1] = rng.choice(earlier.documents)
            next_doc -= 1
        planned.append(Sent(index, f"chaos-{cfg.seed}-{index}", docs))
    return planned, next_doc - 1


def send_one(http: httpx.Client, sent: Sent, stop: threading.Event) -> None:
    """POST one request, sending again with the same key on a 5xx or no answer (bounded)."""
    deadline = time.monotonic() + SEND_DEADLINE
    body = {"document_ids": sent.documents, "reason": f"chaos run, request {sent.index}"}
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": sent.key}
    while sent.tries < SEND_TRIES and time.monotonic() < deadline and not stop.is_set():
        sent.tries += 1
        try:
            answer = http.post("/v1/cancel", json=body, headers=headers)
        except httpx.HTTPError:
            sent.status = None
        else:
            sent.status = answer.status_code
            if answer.status_code in (200, 202):
                sent.request_id = str(answer.json().get("request_id"))
                return
            if answer.status_code < 500 and answer.status_code != 429:
                return  # refused for good: a fault of the bench, reported as not accepted
        sent.resends += 1
        time.sleep(SEND_PAUSE)


def send_all(http: httpx.Client, planned: list[Sent], duration: float, stop: threading.Event) -> None:
    """Send the requests evenly over `duration` seconds, SENDERS at a time."""
    gap = duration / max(1, len(planned))
    start = time.monotonic()

    def task(sent: Sent) -> None:
        delay = start + sent.index * gap - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        send_one(http, sent, stop)

    with concurrent.futures.ThreadPoolExecutor(SENDERS, thread_name_prefix="send") as pool:
        for future in [pool.submit(task, sent) for sent in planned]:
            future.result()


# -- the chaos schedule ---------------------------------------------------------------------------

def schedule(cfg: ChaosConfig) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """Kill times (alternately a worker and a horse) and the Redis events, each between two kills."""
    kills = []
    moment, kind = cfg.kill_interval, "worker"
    while moment < cfg.duration:
        kills.append((moment, kind))
        kind = "horse" if kind == "worker" else "worker"
        moment += cfg.kill_interval
    between = cfg.kill_interval / 2

    def slot(share: float) -> float:
        return (cfg.duration * share // cfg.kill_interval) * cfg.kill_interval + between

    restart = slot(1 / 3)
    failover = max(slot(2 / 3), restart + cfg.kill_interval)
    redis_events = [(restart, "restart")] + ([(failover, "failover")] if cfg.sentinel else [])
    return kills, redis_events


def run_kills(clock: Clock, kills: list[tuple[float, str]], workers: Workers, rng: random.Random,
              result: Result, stop: threading.Event, log: Callable[[str], None]) -> None:
    for moment, kind in kills:
        if not clock.wait_until(moment, stop):
            return
        at = clock.now()
        if kind == "worker":
            text = workers.kill_worker(rng)
            result.worker_kills += 1
        else:
            killed = workers.kill_horse(rng)
            text = killed or f"no work-horse running within {HORSE_WAIT:.0f} s; kill skipped"
            result.horse_kills += killed is not None
        log(f"{at:6.1f} s  {text}")


def run_redis_events(clock: Clock, events: list[tuple[float, str]], nodes: RedisSet, result: Result,
                     stop: threading.Event, log: Callable[[str], None]) -> None:
    for moment, kind in events:
        if not clock.wait_until(moment, stop):
            return
        at = clock.now()
        try:
            if kind == "restart":
                text = nodes.restart_primary(REDIS_OUTAGE)
                result.redis_restarts += 1
            else:
                text = nodes.fail_over()
                result.failovers += "promoted" in text
        except Exception as exc:  # noqa: BLE001 - the run goes on and says what failed
            text = f"{kind} failed: {type(exc).__name__}: {exc}"
        log(f"{at:6.1f} s  {text}")


# -- checks, from the sandbox's own records -------------------------------------------------------

def wait_for_endings(conn: redis.Redis, request_ids: list[str], settle: float) -> tuple[dict[str, str], float]:
    """Poll the records' `state` once a second until all ended or `settle` passed: state by id, seconds waited."""
    began = time.monotonic()
    states: dict[str, str] = {}
    while True:
        pending = [rid for rid in request_ids if states.get(rid) not in ENDED]
        if pending:
            try:
                pipe = conn.pipeline(transaction=False)
                for rid in pending:
                    pipe.hget(records.request_key(rid), "state")
                for rid, value in zip(pending, pipe.execute()):
                    states[rid] = value.decode() if value else "missing"
            except redis.RedisError:
                pass
            pending = [rid for rid in request_ids if states.get(rid) not in ENDED]
        waited = time.monotonic() - began
        if not pending or waited >= settle:
            return states, waited
        time.sleep(min(1.0, settle - waited))


def cancel_calls(calls: list[dict[str, Any]]) -> dict[int, list[tuple[float, float, bool]]]:
    """Document id -> its cancel calls as (HTTP request arrived, cancel ran, applied), in arrival order."""
    arrived = {c["seq"]: float(c["time"]) for c in calls if c.get("batch") is None}
    out: dict[int, list[tuple[float, float, bool]]] = collections.defaultdict(list)
    for call in calls:
        if call.get("method") != "catalog.document.cancel":
            continue
        try:
            doc_id = int(str((call.get("params") or {}).get("id")))
        except ValueError:
            continue
        ran = float(call["time"])
        sent = arrived.get(call["batch"], ran) if call.get("batch") is not None else ran
        out[doc_id].append((sent, ran, bool(call.get("applied"))))
    for entries in out.values():
        entries.sort()
    return out


def sent_while_running(entries: list[tuple[float, float, bool]]) -> int:
    """Cancels sent while an earlier cancel of the same document had arrived but not yet run."""
    return sum(1 for i, (sent, _, _) in enumerate(entries)
               if any(earlier_sent < sent < earlier_ran for earlier_sent, earlier_ran, _ in entries[:i]))


def reports_by_request(messages: list[dict[str, Any]], wanted: set[str]) -> collections.Counter[str]:
    """Request id -> chat messages that carry it."""
    counts: collections.Counter[str] = collections.Counter()
    for message in messages:
        for rid in set(REQUEST_ID.findall(str(message.get("message", "")))) & wanted:
            counts[rid] += 1
    return counts


def fault_rules() -> list[dict[str, Any]]:
    """The sandbox's ordered rules giving each fault its unconditional share of matching calls."""
    rules = []
    for method in FAULTED_METHODS:
        left = 1.0
        for kind, share, seconds in FAULTS:
            rule: dict[str, Any] = {"kind": kind, "method": method, "rate": round(share / left, 6)}
            if seconds is not None:
                rule["seconds"] = seconds
            rules.append(rule)
            left -= share
    return rules


def fired(rules: list[dict[str, Any]]) -> dict[str, int]:
    """How often each fault fired, by kind (slow split by its stall)."""
    out: collections.Counter[str] = collections.Counter()
    for rule in rules:
        name = rule["kind"] if rule["kind"] != "slow" else f"slow {rule['seconds']:g} s"
        out[name] += int(rule.get("fired", 0))
    return dict(out)


# -- the run --------------------------------------------------------------------------------------

def run(cfg: ChaosConfig, log: Callable[[str], None] = print) -> Result:
    """Start everything, run the chaos, check the invariants; every process is stopped by PID at the end."""
    result = Result(settle=cfg.settle)
    rng = random.Random(cfg.seed)
    planned, documents = plan_requests(cfg, rng)
    load_before = loadavg()
    stack = Stack("chaos")
    workers: Workers | None = None
    stop = threading.Event()  # the chaos is over
    done = threading.Event()  # the run is over: the supervisor stops too
    threads: list[threading.Thread] = []
    supervisor: threading.Thread | None = None
    try:
        nodes = RedisSet(stack, cfg.sentinel, cfg.appendfsync)
        sandbox_proc = stack.sandbox("--documents", str(documents), "--durations-zero", "--seed", str(cfg.seed),
                                     *SANDBOX_UNLIMITED)
        sandbox = Sandbox(sandbox_proc.url)
        env = service_env(nodes.service_url(), sandbox_proc.extra["webhook"], B24_RATE_LIMIT=NO_LIMIT_RATE,
                          B24_RATE_BURST=NO_LIMIT_BURST, B24_READ_TIMEOUT=str(READ_TIMEOUT),
                          B24_EXECUTION_LIMIT=str(EXECUTION_LIMIT),
                          REDIS_MIN_REPLICAS="1" if cfg.sentinel else "0",
                          HOST=HOST, PORT=str(devenv.free_port()), WEB_CONCURRENCY="2")
        conn = nodes.client()
        workers = Workers(stack, env, cfg.workers)
        try:
            wait_for_workers(conn, cfg.workers, procs=workers.procs)
            web = stack.web(env)
        except RuntimeError as exc:
            tail = " | ".join(_log_tail(stack.dir / "worker-1.log", 3) + _log_tail(stack.dir / "web.log", 3))
            result.start_error = f"the service did not start with REDIS_URL={nodes.service_url()}: {exc}; {tail}"
            log(f"start: {result.start_error}")
            return _verdict(result, log)
        sandbox.http.post("/_sandbox/faults", json={"rules": fault_rules()}).raise_for_status()

        log(f"machine: {load_before}; logs in {stack.dir}")
        log(f"run: {cfg.requests} requests with 1-{cfg.max_documents} documents ({documents} documents, "
            f"overlap {cfg.overlap:.0%}), over {cfg.duration:.0f} s, {cfg.workers} workers, seed {cfg.seed}")
        log(f"service: B24_READ_TIMEOUT={READ_TIMEOUT:g} s, B24_EXECUTION_LIMIT={EXECUTION_LIMIT:g} s: a call "
            f"without an answer settles {EXECUTION_LIMIT + policy.AMBIGUITY_MARGIN:g} s after it was sent (65 s in "
            f"production); sandbox stalls: slow {LONG_STALL:g} s and {SHORT_STALL:g} s, lost answers "
            f"{LOST_ANSWER_STALL:g} s")
        log(f"redis: AOF appendonly yes, appendfsync {cfg.appendfsync}; " + (
            f"primary + replica + 2 Sentinels, REDIS_URL={nodes.service_url()}, REDIS_MIN_REPLICAS=1"
            if cfg.sentinel else f"one node, REDIS_URL={nodes.service_url()} (--no-sentinel: no failover)"))
        log("faults on " + " and ".join(FAULTED_METHODS) + ": " + ", ".join(
            f"{share:.0%} {kind}" + (f" {seconds:g} s" if seconds else "") for kind, share, seconds in FAULTS))

        kills, redis_events = schedule(cfg)
        clock = Clock()
        supervisor = threading.Thread(target=workers.supervise, args=(clock, done, log), daemon=True)
        supervisor.start()
        threads = [
            threading.Thread(target=run_kills, args=(clock, kills, workers, rng, result, stop, log), daemon=True),
            threading.Thread(target=run_redis_events, args=(clock, redis_events, nodes, result, stop, log),
                             daemon=True),
        ]
        for thread in threads:
            thread.start()
        with httpx.Client(base_url=web.url, timeout=HTTP_TIMEOUT) as http:
            send_all(http, planned, cfg.duration, stop)
        clock.wait_until(cfg.duration, stop)
        stop.set()
        for thread in threads:
            thread.join(FAILOVER_TIMEOUT + 10)
        chaos_seconds = clock.now()
        rules = sandbox.http.get("/_sandbox/faults").raise_for_status().json()["rules"]
        result.faults_fired = fired(rules)
        sandbox.http.delete("/_sandbox/faults").raise_for_status()
        log(f"{chaos_seconds:6.1f} s  chaos stopped: faults cleared; waiting up to {cfg.settle:.0f} s for every "
            "request to end")

        accepted = [s for s in planned if s.request_id]
        result.sent = len(planned)
        result.accepted = len(accepted)
        ids = [s.request_id for s in accepted if s.request_id]
        states, waited = wait_for_endings(conn, ids, cfg.settle)
        result.ended = sum(1 for rid in ids if states.get(rid) in ENDED)
        time.sleep(1.0)  # a report posted as the last record ended is in the chat log by now
        calls, messages, docs = sandbox.calls(), sandbox.messages(), sandbox.documents()
        _check(result, accepted, states, calls, messages, docs)
        log("faults fired: " + ", ".join(f"{k} {v}" for k, v in result.faults_fired.items()))
        log(f"intake: {sum(s.status == 202 for s in accepted)} answered 202, {sum(s.status == 200 for s in accepted)}"
            f" 200 on a resend of a stored request, {sum(s.resends for s in planned)} resends after a 5xx or no "
            f"answer; not accepted {result.sent - result.accepted}")
        log(f"waited {waited:.1f} s after the chaos; states of requests not ended: "
            f"{dict(collections.Counter(states.get(rid, 'missing') for rid in ids if states.get(rid) not in ENDED))}")
        result.lines.append(f"workers that exited on their own (restarted by the bench as a supervisor would): "
                            f"{len(workers.exits)}" + (f", at {', '.join(workers.exits)}" if workers.exits else ""))
        for line in result.lines:
            log(line)
        log(f"machine: {loadavg()} after")
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        stop.set()
        done.set()
        if supervisor is not None:
            supervisor.join(SUPERVISOR_DELAY * 10)
        if workers is not None:
            workers.close()
        stack.close()
    return _verdict(result, log)


def _check(result: Result, accepted: list[Sent], states: dict[str, str], calls: list[dict[str, Any]],
           messages: list[dict[str, Any]], docs: dict[int, dict[str, Any]]) -> None:
    ids = {s.request_id for s in accepted if s.request_id}
    by_doc = cancel_calls(calls)
    result.cancelled_twice = sum(1 for entries in by_doc.values() if sum(applied for _, _, applied in entries) > 1)
    result.sent_while_running = sum(sent_while_running(entries) for entries in by_doc.values())
    after_applied = sum(1 for entries in by_doc.values() for i, (sent, _, _) in enumerate(entries)
                        if any(a and ran < sent for _, ran, a in entries[:i]))
    reports = reports_by_request(messages, ids)
    result.one_report = sum(1 for rid in ids if reports[rid] == 1)
    result.lost = sum(1 for rid in ids if states.get(rid) == "missing" or reports[rid] == 0)
    named = {d for s in accepted if states.get(s.request_id or "") == "done" for d in s.documents}
    conducted = sum(1 for d in named if docs.get(d, {}).get("status") == "Y")
    result.lines = [
        (f"reports: {sum(1 for rid in ids if reports[rid] == 0)} requests with none, "
         f"{sum(1 for rid in ids if reports[rid] > 1)} with two or more "
         f"({sum(reports[rid] - 1 for rid in ids if reports[rid] > 1)} extra messages)"),
        (f"cancel calls: {sum(len(e) for e in by_doc.values())} reached the portal for {len(by_doc)} documents; "
         f"{after_applied} were sent after one for the same document had applied (refused by the portal)"),
        (f"documents still conducted that a request ended `done` named: {conducted}; accepted requests without "
         f"a record: {sum(1 for rid in ids if states.get(rid) == 'missing')}"),
    ]


def _verdict(result: Result, log: Callable[[str], None]) -> Result:
    log("")
    log(f"accepted {result.accepted}")
    log(f"ended within {result.settle:.0f} s {result.ended}")
    log(f"documents cancelled twice {result.cancelled_twice}")
    log(f"cancels sent while an earlier one for the document had not yet run {result.sent_while_running}")
    log(f"requests with exactly one report {result.one_report}")
    log(f"lost {result.lost}")
    log(f"check: {'PASSED' if result.passed else 'FAILED'}")
    return result


def _log_tail(path: Path, lines: int) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(errors="replace").splitlines()[-lines:]]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.chaos`: run once with the command line's parameters; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds of chaos (and of traffic)")
    parser.add_argument("--kill-interval", type=float, default=KILL_INTERVAL)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-documents", type=int, default=MAX_DOCUMENTS)
    parser.add_argument("--overlap", type=float, default=OVERLAP, help="share of requests naming a recent request's document")
    parser.add_argument("--settle", type=float, default=SETTLE, help="seconds every request has to end after the chaos")
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec")
    parser.add_argument("--no-sentinel", dest="sentinel", action="store_false",
                        help="one Redis and a plain redis:// URL: the restart, no failover")
    args = parser.parse_args(argv)
    cfg = ChaosConfig(requests=max(1, args.requests), duration=max(1.0, args.duration),
                      kill_interval=max(1.0, args.kill_interval), workers=max(1, args.workers), seed=args.seed,
                      max_documents=max(1, args.max_documents), overlap=min(max(args.overlap, 0.0), 1.0),
                      settle=max(0.0, args.settle), appendfsync=args.appendfsync, sentinel=args.sentinel)
    return 0 if run(cfg, log=lambda line: print(line, flush=True)).passed else 1


if __name__ == "__main__":
    sys.exit(main())
