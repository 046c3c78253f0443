"""Portal limits with several real worker processes against a sandbox at small limits.

The sandbox answers QUERY_LIMIT_EXCEEDED and OPERATION_TIME_LIMIT exactly as a portal does; the
service must keep under both while every request completes.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

import devenv
from app import create_app
from bitrix24.limits import OperatingBudget
from jobs import records
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

RATE, BURST = "5", "10"
OPERATING_LIMIT, OPERATING_WINDOW = "3", "20"
CANCEL_SECONDS = "0.3"
WORKERS = 3


@pytest.fixture(scope="module")
def small_portal(sandbox_factory: Callable[..., devenv.Process]) -> devenv.Process:
    return sandbox_factory("--documents", "60", "--rate", RATE, "--burst", BURST, "--durations-zero",
                           "--duration", f"catalog.document.cancel={CANCEL_SECONDS}",
                           "--operating-limit", OPERATING_LIMIT, "--operating-window", OPERATING_WINDOW)


@pytest.fixture
def stack(small_portal: devenv.Process, redis_proc: devenv.Process,
          tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two portals (a, b) on the small sandbox, several workers, and a web app on the same settings."""
    import httpx

    httpx.post(f"{small_portal.url}/_sandbox/reset", timeout=10).raise_for_status()
    conn = redis.Redis.from_url(redis_proc.url)
    conn.flushdb()
    portals = tmp_path / "portals.toml"
    portals.write_text(textwrap.dedent(f"""
        [portals.a]
        webhook_url = "{small_portal.extra['webhook']}"
        chat = "chat1"
        [portals.b]
        webhook_url = "{small_portal.extra['webhook']}"
        chat = "chat1"
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_proc.url, "B24_PORTALS_FILE": str(portals), "TRIGGER_API_KEYS": API_KEY,
                "B24_RATE_LIMIT": RATE, "B24_RATE_BURST": BURST, "B24_OPERATING_LIMIT": OPERATING_LIMIT,
                "B24_OPERATING_WINDOW": OPERATING_WINDOW, "B24_OPERATING_MARGIN": "1.0",
                "B24_READ_TIMEOUT": "5"})
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    workers = [devenv.start_worker(env, log=log) for log in logs]
    app = create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_portals_file": str(portals),
                      "trigger_api_keys": API_KEY})
    yield {"client": app.test_client(), "portal": SandboxView(small_portal.url), "conn": conn, "logs": logs}
    for worker in workers:
        worker.stop()


def submit(client: FlaskClient, portal: str, key: str, **body: Any) -> str:
    response = client.post("/v1/cancel", json={"portal": portal, **body}, headers={**bearer(), "Idempotency-Key": key})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def state_of(client: FlaskClient, request_id: str) -> dict[str, Any]:
    return client.get(f"/v1/requests/{request_id}", headers=bearer()).get_json()  # type: ignore[no-any-return]


def limit_errors(portal: SandboxView) -> dict[str, int]:
    by_error = portal.http.get("/_sandbox/stats").json()["by_error"]
    return {code: by_error.get(code, 0) for code in ("QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT")}


def test_many_requests_across_workers_never_trip_the_portals_limits(stack: dict[str, Any]) -> None:
    client, portal = stack["client"], stack["portal"]
    ids = [submit(client, "a", f"load-{n}", document_ids=[n + 1]) for n in range(14)]
    seen_retrying: dict[str, Any] = {}

    def all_done() -> bool:
        done = 0
        for request_id in ids:
            state = state_of(client, request_id)
            if state["state"] == "retrying" and state.get("resume_at"):
                seen_retrying[request_id] = state
            assert state["state"] != "failed", state
            done += state["state"] == "done"
        return done == len(ids)

    wait_for(all_done, timeout=90, interval=0.3, what="every request to finish")
    assert limit_errors(portal) == {"QUERY_LIMIT_EXCEEDED": 0, "OPERATION_TIME_LIMIT": 0}
    for n in range(14):
        assert portal.document(n + 1)["status"] != "Y"
    assert len(portal.messages()) == 14
    # 14 cancels of 0.3 s exceed the 3 s budget: some requests had to wait for it, and said so.
    assert seen_retrying, "no request ever showed it was waiting for the operating budget"
    assert any("paused" in s.get("waiting_for", "") for s in seen_retrying.values())
    logs = "".join(log.read_text() for log in stack["logs"])
    assert logs.count("portal method paused") >= 1
    assert logs.count("portal method paused") <= logs.count("portal method resumed") + 1


def test_external_query_limit_answers_are_absorbed(stack: dict[str, Any]) -> None:
    client, portal, conn = stack["client"], stack["portal"], stack["conn"]
    portal.faults({"kind": "query_limit", "method": "batch", "times": 3})
    request_id = submit(client, "a", "absorb", document_ids=[30])
    state = wait_for(lambda: (s := state_of(client, request_id))["state"] == "done" and s, timeout=60,
                     what="the request")
    assert state["documents"][0]["outcome"] == "cancelled"
    assert limit_errors(portal)["QUERY_LIMIT_EXCEEDED"] == 3  # the injected ones, and no more
    record = records.load(conn, request_id)
    assert record is not None and record["transient_failures"] == 0  # never counted as a failure
    assert conn.ttl("b24c:limit:{a}:slow") > 0  # and the portal's bucket runs slower for a while


def test_a_paused_method_blocks_neither_other_methods_nor_other_portals(stack: dict[str, Any]) -> None:
    client, portal, conn = stack["client"], stack["portal"], stack["conn"]
    OperatingBudget(conn, "a").pause("catalog.document.cancel", time.time() + 60)
    waiting = submit(client, "a", "paused", document_ids=[40])
    other_method = submit(client, "a", "other-method", document_numbers=["NO-SUCH-NUMBER"])
    other_portal = submit(client, "b", "other-portal", document_ids=[41])
    for request_id in (other_method, other_portal):
        wait_for(lambda r=request_id: state_of(client, r)["state"] == "done", timeout=40, what=request_id)
    assert portal.document(41)["status"] != "Y"
    state = wait_for(lambda: (s := state_of(client, waiting))["state"] == "retrying" and s, timeout=20,
                     what="the paused request to show it waits")
    assert state["resume_at"] and "paused" in state["waiting_for"]
    assert portal.document(40)["status"] == "Y"
    ready = client.get("/v1/health", headers=bearer()).get_json()  # the details are for admins
    assert "catalog.document.cancel" in ready["portals_held_back"]["a"]["paused_methods"]
    assert "b" not in ready["portals_held_back"]
