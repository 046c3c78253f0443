"""The sandbox's two Bitrix24 limits (leaky bucket, operating time) and its start-up flags."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.test_sandbox import Portal


@pytest.fixture(scope="module")
def small_bucket(sandbox_factory: Callable[..., Any]) -> Any:
    return sandbox_factory("--documents", "5", "--durations-zero", "--rate", "2", "--burst", "5")


@pytest.fixture
def bucket(small_bucket: Any) -> Iterator[Portal]:
    portal = Portal(small_bucket.url, small_bucket.extra["webhook"])
    portal.control("POST", "reset")
    yield portal
    portal.http.close()


def test_leaky_bucket_refuses_over_burst_and_refusals_do_not_count(bucket: Portal) -> None:
    statuses = [bucket.call("scope").status_code for _ in range(7)]
    assert statuses == [200] * 5 + [503] * 2
    refused = bucket.call("scope")
    assert refused.json() == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    time.sleep(0.6)  # drains 1.2 requests at 2/s: room for exactly one more if refusals added nothing
    assert bucket.call("scope").status_code == 200
    assert bucket.call("scope").status_code == 503


def test_batch_counts_once_and_control_and_oauth_do_not_count(bucket: Portal) -> None:
    commands = {f"c{i}": "catalog.document.mode.status" for i in range(20)}
    for _ in range(30):
        bucket.control("GET", "stats")
    bucket.http.get(f"{bucket.url}/oauth/token/", params={"grant_type": "refresh_token"})
    statuses = [bucket.call("batch", {"cmd": commands}).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [503]


@pytest.fixture(scope="module")
def tight_budget(sandbox_factory: Callable[..., Any]) -> Any:
    return sandbox_factory("--documents", "8", "--durations-zero", "--rate", "100", "--burst", "1000",
                           "--operating-limit", "1", "--operating-window", "3",
                           "--duration", "catalog.document.cancel=0.4",
                           "--duration", "catalog.document.list=0.05")


def test_operating_limit_blocks_one_method_until_reset(tight_budget: Any) -> None:
    portal = Portal(tight_budget.url, tight_budget.extra["webhook"])
    portal.control("POST", "reset")
    operating = []
    for doc_id in (1, 2, 3):
        answer = portal.call("catalog.document.cancel", {"id": doc_id})
        assert answer.status_code == 200, answer.text
        operating.append(answer.json()["time"]["operating"])
    assert operating == pytest.approx([0.4, 0.8, 1.2], abs=0.05)
    reset_at = answer.json()["time"]["operating_reset_at"]
    assert time.time() < reset_at <= time.time() + 4

    blocked = portal.call("catalog.document.cancel", {"id": 4})
    assert blocked.status_code == 429
    assert blocked.json() == {"error": "OPERATION_TIME_LIMIT",
                              "error_description": "Method is blocked due to operation time limit."}
    listed = portal.call("catalog.document.list", {"select": ["id"]})
    assert listed.status_code == 200
    assert listed.json()["time"]["operating"] == 0  # 0.05 s calls are not recorded
    inner = portal.call("batch", {"cmd": {"c": "catalog.document.cancel?id=4"}}).json()["result"]
    assert inner["result_error"]["c"]["error"] == "OPERATION_TIME_LIMIT"
    assert portal.control("GET", "documents/4")["status"] == "Y"

    # The budget belongs to the webhook: the OAuth app still may call the method.
    token = portal.control("POST", "oauth/tokens")["access_token"]
    app_call = portal.http.post(f"{portal.url}/rest/catalog.document.cancel", json={"id": 5, "auth": token})
    assert app_call.status_code == 200
    assert app_call.json()["time"]["operating"] == pytest.approx(0.4, abs=0.05)

    time.sleep(max(0.0, reset_at - time.time()) + 0.1)
    again = portal.call("catalog.document.cancel", {"id": 4})
    assert again.status_code == 200
    assert again.json()["time"]["operating"] == pytest.approx(0.4, abs=0.05)
    portal.http.close()


def test_short_calls_in_one_batch_count_together(tight_budget: Any) -> None:
    # The core sums one HTTP request's calls of a method and records the sum once it passes 0.1 s:
    # one 0.05 s list is not recorded, four in one batch (0.2 s) are.
    portal = Portal(tight_budget.url, tight_budget.extra["webhook"])
    portal.control("POST", "reset")
    try:
        one = portal.call("batch", {"cmd": {"a": "catalog.document.list?select[]=id"}}).json()["result"]
        assert one["result_time"]["a"]["operating"] == 0
        assert portal.call("catalog.document.list", {"select": ["id"]}).json()["time"]["operating"] == 0
        four = portal.call("batch", {"cmd": {k: "catalog.document.list?select[]=id" for k in "abcd"}}).json()
        assert four["result"]["result_time"]["d"]["operating"] == 0  # not yet recorded during the batch
        after = portal.call("catalog.document.list", {"select": ["id"]}).json()["time"]["operating"]
        assert after == pytest.approx(0.2, abs=0.05)
    finally:
        portal.http.close()


def test_start_up_flags(sandbox_factory: Callable[..., Any]) -> None:
    proc = sandbox_factory("--documents", "6", "--seed", "7", "--plan", "enterprise", "--language", "ru",
                           "--cancelled-status", "N", "--token-lifetime", "60",
                           "--application-token", "tok-1", "--member-id", "abc123")
    portal = Portal(proc.url, proc.extra["webhook"])
    try:
        config = portal.control("GET", "config")
        assert (config["rate"], config["burst"], config["language"]) == (5.0, 250, "ru")
        assert (config["application_token"], config["member_id"], config["token_lifetime"]) == (
            "tok-1", "abc123", 60)
        assert config["durations"]["catalog.document.cancel"] == 0.3
        documents = portal.control("GET", "documents")
        assert len(documents) == 6 and {d["docType"] for d in documents} == {"A", "S", "M", "R", "D"}
        answer = portal.call("catalog.document.cancel", {"id": 1})
        # Default durations are accounted (0.3 s for a cancel) although nothing sleeps that long.
        assert answer.json()["time"]["operating"] == pytest.approx(0.3, abs=0.05)
        assert answer.json()["time"]["processing"] >= 0.3
        assert answer.elapsed.total_seconds() < 0.3
        assert portal.control("GET", "documents/1")["status"] == "N"
        again = portal.call("catalog.document.cancel", {"id": 1})
        assert again.json()["error_description"] == (
            "Ошибка отмены проведения документа: Документ еще не проведен")
        token = portal.control("POST", "oauth/tokens")
        assert token["expires_in"] == 60 and token["member_id"] == "abc123"
    finally:
        portal.http.close()


def test_same_seed_same_documents_other_seed_other_documents(sandbox_factory: Callable[..., Any],
                                                             sandbox: Any) -> None:
    shared = httpx.get(f"{sandbox.url}/_sandbox/documents").json()
    other = sandbox_factory("--documents", "20", "--seed", "2", "--durations-zero")
    different = httpx.get(f"{other.url}/_sandbox/documents").json()
    assert [d["docNumber"] for d in different] == [d["docNumber"] for d in shared]
    assert [d["docType"] for d in different] != [d["docType"] for d in shared]
    httpx.post(f"{other.url}/_sandbox/reset", json={"documents": 20}).raise_for_status()
    assert httpx.get(f"{other.url}/_sandbox/documents").json() == different


def test_plan_buckets_standard_50_enterprise_250(sandbox: Any) -> None:
    portal = Portal(sandbox.url, sandbox.extra["webhook"])
    try:
        statuses = [portal.call("scope").status_code for _ in range(53)]
        assert statuses[:50] == [200] * 50 and statuses[-1] == 503  # 2/s drains < 1 call meanwhile
        portal.control("POST", "config", {"plan": "enterprise"})
        portal.control("POST", "reset")  # back to standard: the plan is a start-up setting
        assert portal.control("GET", "config")["burst"] == 50
        portal.control("POST", "config", {"plan": "enterprise"})
        config = portal.control("GET", "config")
        assert (config["rate"], config["burst"]) == (5.0, 250)
        statuses = [portal.call("scope").status_code for _ in range(265)]
        assert statuses[:250] == [200] * 250 and 503 in statuses[250:]
    finally:
        portal.http.close()


def test_start_prints_the_webhook_and_page_urls() -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import devenv

    port = devenv.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", str(port), "--documents", "2"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
        assert lines == [f"sandbox portal webhook: http://127.0.0.1:{port}/rest/1/sandbox/",
                         f"sandbox portal page:    http://127.0.0.1:{port}/"]
        assert httpx.get(f"http://127.0.0.1:{port}/rest/1/sandbox/scope", timeout=5).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
