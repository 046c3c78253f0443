"""Shared pieces of the end-to-end benchmarks (latency, worker, limits).

Every benchmark runs the real processes on free loopback ports and stops them by PID: a private Redis
(`devenv.start_redis`, never the one that may run on 6379), the sandbox portal (`python -m sandbox`),
real `rq worker` processes (`devenv.start_worker`, the Procfile's worker command) and, where it is
measured, the web process served by gunicorn (`devenv.start_web`).

Waiting for an outcome never polls the service's own API: Redis keyspace notifications on our private
Redis (`notify-keyspace-events Kh`) wake the benchmark when a request record or a job hash changes, and
it then reads one field. The moments a document was cancelled and a report posted come from the
sandbox's call log (`/_sandbox/calls`, `time` = when the sandbox began handling that call, taken on the
same machine clock), read once after the run, so nothing is polled while the service works.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

T = TypeVar("T")

API_KEY = "bench-api-key"
CHAT = "chat1"
HOST = "127.0.0.1"
# Limits far above anything a benchmark reaches: the sandbox's and the service's own.
NO_LIMIT_RATE = "1000000"
NO_LIMIT_BURST = "1000000"
SANDBOX_UNLIMITED = ["--rate", NO_LIMIT_RATE, "--burst", NO_LIMIT_BURST]


# -- processes ------------------------------------------------------------------------------------

def service_env(redis_url: str, webhook: str, **extra: str) -> dict[str, str]:
    """The environment the service's processes get: our Redis and sandbox, nothing from the caller's B24_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "REDIS_"))}
    env.update({"REDIS_URL": redis_url, "B24_WEBHOOK_URL": webhook, "B24_CHAT_ID": CHAT,
                "TRIGGER_API_KEYS": API_KEY})
    # gunicorn and rq from this virtualenv, as `make run` does.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Stack:
    """Processes started by one benchmark; `close()` stops each of them by PID, newest first."""

    def __init__(self, name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"b24-bench-{name}-"))
        self.procs: list[devenv.Process] = []

    def add(self, proc: devenv.Process) -> devenv.Process:
        self.procs.append(proc)
        return proc

    def redis(self) -> devenv.Process:
        return self.add(devenv.start_redis(self.dir / "redis"))

    def sandbox(self, *args: str) -> devenv.Process:
        return self.add(devenv.start_sandbox(args=list(args), log=self.dir / "sandbox.log"))

    def worker(self, env: dict[str, str], name: str = "worker") -> devenv.Process:
        """One real `rq worker` (devenv's Procfile command)."""
        return self.add(devenv.start_worker(env, log=self.dir / f"{name}.log"))

    def web(self, env: dict[str, str]) -> devenv.Process:
        return self.add(devenv.start_web(env, log=self.dir / "web.log"))

    def stop(self, proc: devenv.Process) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                proc.kill()
        self.procs.clear()


def wait_for_workers(conn: redis.Redis, count: int, timeout: float = 30.0,
                     procs: Sequence[devenv.Process] = ()) -> None:
    """Wait until `count` RQ workers have registered in Redis (and their schedulers had a moment to start)."""
    from rq import Worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} at start")
        if len(Worker.all(connection=conn)) >= count:
            time.sleep(0.5)  # let the scheduler child start and the parents settle in BLPOP
            return
        time.sleep(0.05)
    raise RuntimeError(f"{count} worker(s) did not register within {timeout:.0f}s")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- waiting on Redis without polling ------------------------------------------------------------

class KeyWatcher:
    """Wakes on every change of the watched keys (keyspace notifications), then runs a cheap check.

    Only our private Redis is configured (`notify-keyspace-events Kh`: hash commands). One pattern
    subscription per key prefix; events are filtered by key in this process.
    """

    def __init__(self, conn: redis.Redis, prefixes: Iterable[str]) -> None:
        conn.config_set("notify-keyspace-events", "Kh")
        db = conn.connection_pool.connection_kwargs.get("db", 0)
        self.channel_prefix = f"__keyspace@{db}__:"
        self.pubsub = conn.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(*[f"{self.channel_prefix}{p}*" for p in prefixes])
        # Drain the subscribe confirmations.
        while self.pubsub.get_message(timeout=0.05) is not None:
            pass

    def wait(self, key: str, check: Callable[[], T], timeout: float) -> T:
        """Return check()'s first truthy value, checking now and after each change of `key`."""
        wanted = (self.channel_prefix + key).encode()
        value = check()
        deadline = time.monotonic() + timeout
        while not value:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{key}: no outcome within {timeout:.0f}s")
            message = self.pubsub.get_message(timeout=min(left, 1.0))
            if message is None:
                value = check()  # belt and braces: a missed event costs at most a second
                continue
            channel = message.get("channel")
            if channel == wanted or (isinstance(channel, str) and channel.encode() == wanted):
                value = check()
        return value

    def close(self) -> None:
        self.pubsub.close()


# -- the sandbox's records -----------------------------------------------------------------------

class Sandbox:
    """The sandbox portal's control API (read once a run is over, or to reset between runs)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def calls(self) -> list[dict[str, Any]]:
        return self.http.get("/_sandbox/calls").raise_for_status().json()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_sandbox/stats").raise_for_status().json()  # type: ignore[no-any-return]

    def documents(self) -> dict[int, dict[str, Any]]:
        docs = self.http.get("/_sandbox/documents").raise_for_status().json()
        if isinstance(docs, dict):
            docs = docs.get("documents", [])
        return {int(d["id"]): d for d in docs}

    def messages(self) -> list[dict[str, Any]]:
        return self.http.get("/_sandbox/messages").raise_for_status().json()  # type: ignore[no-any-return]

    def reset(self, documents: int | None = None) -> None:
        body = {"documents": documents} if documents is not None else {}
        self.http.post("/_sandbox/reset", json=body).raise_for_status()

    def close(self) -> None:
        self.http.close()


def cancel_times(calls: list[dict[str, Any]]) -> dict[int, float]:
    """Document id -> when the sandbox began its first successful `catalog.document.cancel` (inner or direct)."""
    out: dict[int, float] = {}
    for call in calls:
        if call.get("method") != "catalog.document.cancel" or call.get("error"):
            continue
        try:
            doc_id = int(str((call.get("params") or {}).get("id")))
        except ValueError:
            continue
        out.setdefault(doc_id, float(call["time"]))
    return out


def message_times(calls: list[dict[str, Any]], tag: Callable[[str], str | None]) -> dict[str, float]:
    """Tag (found in the message text by `tag`) -> when the sandbox began the successful `im.message.add`."""
    out: dict[str, float] = {}
    for call in calls:
        if call.get("method") != "im.message.add" or call.get("error") or call.get("http_status") != 200:
            continue
        key = tag(str((call.get("params") or {}).get("MESSAGE", "")))
        if key is not None:
            out.setdefault(key, float(call["time"]))
    return out


def top_level(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HTTP requests only (inner batch commands have `batch` set)."""
    return [c for c in calls if c.get("batch") is None]


# -- numbers --------------------------------------------------------------------------------------

def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return "nan" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def rq_time(value: bytes | str | None) -> float | None:
    """An RQ timestamp (`2026-01-02T03:04:05.678901Z`, UTC) as unix time."""
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    text = text.rstrip("Z")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()


def job_times(conn: redis.Redis, job_id: str) -> dict[str, float | None]:
    raw = conn.hmget(f"rq:job:{job_id}", ["enqueued_at", "started_at", "ended_at"])
    return dict(zip(("enqueued_at", "started_at", "ended_at"), (rq_time(v) for v in raw)))


# -- processes' memory and CPU -------------------------------------------------------------------

def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss and private (USS) kB of one process, from smaps_rollup; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    if "Rss" in out:
        out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """utime+stime (+ reaped children's) of a process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17 -> indices 11..14
    used = int(fields[11]) + int(fields[12])
    if with_children:
        used += int(fields[13]) + int(fields[14])
    return used / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its reaped children and, recursively, its live children (e.g. gunicorn's worker)."""
    return cpu_seconds(pid) + sum(tree_cpu_seconds(child) for child in children(pid))


def loadavg() -> str:
    """The 1-minute load average and the core count: other processes on the machine skew every figure."""
    try:
        with open("/proc/loadavg") as f:
            one = f.read().split()[0]
    except OSError:
        one = "?"
    return f"load {one} on {os.cpu_count()} cores"


class MemorySampler(threading.Thread):
    """Samples a worker parent's memory and its children's (work-horses; the scheduler is told apart)."""

    def __init__(self, pid: int, interval: float = 0.004) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.long_lived = set(children(pid))  # the scheduler child exists before any job
        self.parent_peak: dict[str, int] = {}
        self.horse_peak: dict[str, int] = {}
        self.horses_seen: set[int] = set()
        self.stop_event = threading.Event()

    @staticmethod
    def _peak(into: dict[str, int], sample: dict[str, int]) -> None:
        for key, value in sample.items():
            into[key] = max(into.get(key, 0), value)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._peak(self.parent_peak, memory_kb(self.pid))
            for child in children(self.pid):
                if child in self.long_lived:
                    continue
                self.horses_seen.add(child)
                self._peak(self.horse_peak, memory_kb(child))
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def scheduler_memory(pid: int, long_lived: set[int]) -> dict[str, int]:
    peak: dict[str, int] = {}
    for child in long_lived:
        MemorySampler._peak(peak, memory_kb(child))
    return peak

