"""Shared fixtures: a private Redis, the sandbox portal and worker processes, each started and stopped by PID.

Nothing here touches the Redis that may already run on 127.0.0.1:6379.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devenv.Process]:
    """A Redis of our own on a free port (redis-server from PATH, else the embedded Valkey)."""
    proc = devenv.start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc: devenv.Process) -> str:
    return redis_proc.url


@pytest.fixture
def redis_conn(redis_proc: devenv.Process) -> Iterator[redis.Redis]:
    """A connection to our private Redis, emptied before each test (it is ours alone)."""
    conn = redis.Redis.from_url(redis_proc.url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def sandbox_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., devenv.Process]]:
    """Start sandbox portals with given CLI arguments; all are stopped at the end of the session."""
    procs: list[devenv.Process] = []
    logs = tmp_path_factory.mktemp("sandbox-logs")

    def start(*args: str) -> devenv.Process:
        proc = devenv.start_sandbox(args=list(args), log=logs / f"sandbox-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def shared_sandbox(sandbox_factory: Callable[..., devenv.Process]) -> devenv.Process:
    """One sandbox for the session, with durations at zero and generous limits."""
    return sandbox_factory("--documents", "20", "--seed", "1", "--durations-zero")


@pytest.fixture
def sandbox(shared_sandbox: devenv.Process) -> devenv.Process:
    """The shared sandbox, reset to its seed before the test."""
    httpx.post(f"{shared_sandbox.url}/_sandbox/reset", timeout=10).raise_for_status()
    return shared_sandbox
