"""Durable acceptance against a real Redis primary and replica (and two sentinels), started here on loopback.

With REDIS_MIN_REPLICAS=1 a 2xx means a replica has the request; a write no replica confirmed is answered 503
and its retry with the same key gets the same request. A guarding write in a job raises NotReplicated rather
than let an effect outside Redis happen. With a `redis+sentinel://` URL the web, a real `rq worker` and the
limiter follow a failover.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel
from flask import Flask

import devenv
from app import create_app
from jobs import policy
from jobs.durability import NotReplicated, durable
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

DUMMY_WEBHOOK = "http://127.0.0.1:9/rest/1/intakeonly/"
SERVICE = "mymaster"


@dataclass
class Pair:
    """A primary and its replica, each a process of ours on its own loopback port."""

    directory: Path
    primary: devenv.Process
    replica: devenv.Process

    @property
    def primary_port(self) -> int:
        return int(self.primary.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def replica_port(self) -> int:
        return int(self.replica.url.rsplit(":", 1)[1].split("/")[0])

    def restart_replica(self) -> None:
        """Start the replica again on its port and wait until it has synced with the primary."""
        self.replica = devenv.start_redis(self.directory / "replica", port=self.replica_port,
                                          replica_of=self.primary_port)
        wait_synced(self.replica)


def wait_synced(replica: devenv.Process, timeout: float = 60) -> None:
    """Wait until the replica's link to its primary is up (its first sync is done)."""
    conn = redis.Redis.from_url(replica.url)
    try:
        wait_for(lambda: conn.info("replication").get("master_link_status") == "up", timeout=timeout,
                 what="the replica's link to its primary")
    finally:
        conn.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    primary = devenv.start_redis(tmp_path / "primary")
    replica = devenv.start_redis(tmp_path / "replica", replica_of=int(primary.url.rsplit(":", 1)[1].split("/")[0]))
    started = Pair(tmp_path, primary, replica)
    try:
        wait_synced(replica)
        yield started
    finally:
        started.replica.stop()
        started.primary.stop()


def make_app(redis_url: str, **overrides: Any) -> Flask:
    config = {"_env_file": None, "redis_url": redis_url, "b24_webhook_url": DUMMY_WEBHOOK, "b24_chat_id": "chat1",
              "trigger_api_keys": API_KEY, "redis_min_replicas": 1}
    config.update(overrides)
    app = create_app(config)
    app.testing = True
    return app


def cancel(client: Any, key: str, ids: list[int]) -> Any:
    return client.post("/v1/cancel", data=json.dumps({"document_ids": ids, "reason": "durability"}),
                       headers={"Content-Type": "application/json", "Idempotency-Key": key, **bearer()})


def test_intake_answers_2xx_only_once_a_replica_has_the_request(pair: Pair) -> None:
    client = make_app(pair.primary.url).test_client()
    primary = redis.Redis.from_url(pair.primary.url)
    replica = redis.Redis.from_url(pair.replica.url)

    accepted = cancel(client, "durable-1", [1])
    assert accepted.status_code == 202
    first_id = accepted.get_json()["request_id"]
    # WAIT confirmed it before the answer: the replica has the record and the job, no sleeping needed.
    assert replica.exists(f"b24c:req:{first_id}") and replica.exists(f"rq:job:cancel-{first_id}")

    pair.replica.stop()
    started = time.monotonic()
    refused = cancel(client, "durable-2", [2])
    waited = time.monotonic() - started
    assert refused.status_code == 503
    body = refused.get_json()
    assert body["error"] == "unavailable" and "same idempotency key" in body["message"]
    assert policy.REPLICA_WAIT_MS / 1000 * 0.9 <= waited < policy.REPLICA_WAIT_MS / 1000 + 2
    # The write did reach the primary: the 503 says the request may exist, and it does.
    records = [key for key in primary.scan_iter("b24c:req:*")]
    assert len(records) == 2
    assert primary.llen("rq:queue:cancel") == 2

    # A repeat while no replica confirms is refused too: no 2xx the failover could take back.
    assert cancel(client, "durable-2", [2]).status_code == 503

    pair.restart_replica()
    replica = redis.Redis.from_url(pair.replica.url)
    retried = cancel(client, "durable-2", [2])
    assert retried.status_code == 200
    second_id = retried.get_json()["request_id"]
    assert retried.get_json()["duplicate"] is True
    assert f"b24c:req:{second_id}".encode() in records
    # One record and one job for the key, on the primary and on the replica.
    for conn in (primary, replica):
        assert sorted(conn.lrange("rq:queue:cancel", 0, -1)) == sorted(
            [f"cancel-{first_id}".encode(), f"cancel-{second_id}".encode()])
        assert len(list(conn.scan_iter("b24c:req:*"))) == 2
        assert len(list(conn.scan_iter("rq:job:*"))) == 2


def test_durable_write_raises_not_replicated_without_a_replica(pair: Pair) -> None:
    conn = redis.Redis.from_url(pair.primary.url)
    replica = redis.Redis.from_url(pair.replica.url)

    results = durable(conn, 1, lambda pipe: pipe.set("b24c:claim:doc:1", "owner-a", nx=True, ex=60))
    assert results == [True]
    assert replica.get("b24c:claim:doc:1") == b"owner-a"

    pair.replica.stop()
    started = time.monotonic()
    with pytest.raises(NotReplicated):
        durable(conn, 1, lambda pipe: pipe.set("b24c:claim:doc:2", "owner-b", nx=True, ex=60))
    waited = time.monotonic() - started
    assert policy.REPLICA_WAIT_MS / 1000 * 0.9 <= waited < policy.REPLICA_WAIT_MS / 1000 + 1
    # With REDIS_MIN_REPLICAS=0 the same write is a plain write that returns at once.
    started = time.monotonic()
    assert durable(conn, 0, lambda pipe: pipe.set("b24c:claim:doc:3", "owner-c")) == [True]
    assert time.monotonic() - started < 0.5


def test_web_and_worker_follow_a_sentinel_failover(pair: Pair, sandbox: devenv.Process, tmp_path: Path) -> None:
    sentinels = [devenv.start_sentinel(tmp_path / f"sentinel-{n}", pair.primary_port, SERVICE) for n in range(2)]
    url = f"redis+sentinel://{','.join(s.url for s in sentinels)}/{SERVICE}/0"
    portal = SandboxView(sandbox.url)
    conducted = [n for n in range(1, 21) if portal.document(n)["status"] == "Y"][:2]
    assert len(conducted) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "REDIS_"))}
    env.update({"REDIS_URL": url, "REDIS_MIN_REPLICAS": "1", "B24_WEBHOOK_URL": sandbox.extra["webhook"],
                "B24_CHAT_ID": "chat1", "TRIGGER_API_KEYS": API_KEY})
    worker = devenv.start_worker(env, log=tmp_path / "worker.log")
    client = make_app(url, b24_webhook_url=sandbox.extra["webhook"]).test_client()
    watcher = redis.sentinel.Sentinel([tuple(s.url.split(":")) for s in sentinels], socket_timeout=1)

    def state(request_id: str) -> str:
        return str(client.get(f"/v1/requests/{request_id}", headers=bearer()).get_json()["state"])

    def accept(key: str, doc: int) -> str:
        """Send until the intake answers 2xx, with the same key each time (503s while Redis fails over)."""
        answers: list[int] = []

        def send() -> Any:
            response = cancel(client, key, [doc])
            answers.append(response.status_code)
            return response if response.status_code in (200, 202) else None

        response = wait_for(send, timeout=60, interval=0.5, what=f"the intake to accept {key}")
        assert set(answers) <= {200, 202, 503}, answers
        return str(response.get_json()["request_id"])

    try:
        before = accept("failover-before", conducted[0])
        wait_for(lambda: state(before) == "done", timeout=60, what="the request accepted before the failover")
        # Everything the worker wrote is on the replica before the primary dies (WAIT after a write of ours).
        direct = redis.Redis.from_url(pair.primary.url)
        direct.set("test:fence", "1")
        assert direct.wait(1, 5000) == 1

        old_port = pair.primary_port
        pair.primary.kill()
        wait_for(lambda: _master_port(watcher) == pair.replica_port, timeout=60,
                 what="Sentinel to promote the replica")
        new_primary = pair.replica_port
        # The old primary comes back as a replica of the new one, so REDIS_MIN_REPLICAS=1 can be met again.
        pair.primary = devenv.start_redis(pair.directory / "primary-again", port=old_port, replica_of=new_primary)
        wait_synced(pair.primary)

        after = accept("failover-after", conducted[1])
        assert after != before
        wait_for(lambda: state(after) == "done", timeout=90, what="the request accepted after the failover")
        assert state(before) == "done"  # its record survived on the new primary
        assert worker.alive(), "the worker rode out the failover"
    finally:
        worker.stop()
        for sentinel in sentinels:
            sentinel.stop()
    for doc in conducted:
        assert portal.document(doc)["status"] != "Y"
        assert portal.effective_cancels(doc) == 1
    for request_id in (before, after):
        assert len([m for m in portal.messages() if f"#{request_id}" in (m.get("message") or "")]) == 1
    new = redis.Redis(port=pair.replica_port)
    assert len(list(new.scan_iter("b24c:req:*"))) == 2  # two requests, none doubled by a retry


def _master_port(watcher: redis.sentinel.Sentinel) -> int | None:
    try:
        return int(watcher.discover_master(SERVICE)[1])
    except (redis.sentinel.MasterNotFoundError, redis.RedisError):
        return None
