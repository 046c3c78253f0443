"""Injected faults on the sandbox portal: each kind, targeting, counting, and the CLI fault rates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest


class Portal:
    """Webhook calls and control calls against one sandbox."""

    def __init__(self, url: str, webhook: str) -> None:
        self.url = url
        self.webhook = webhook
        self.http = httpx.Client(timeout=10)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> httpx.Response:
        return self.http.post(self.webhook + method, json=params or {}, timeout=timeout)

    def control(self, verb: str, path: str, body: Any = None) -> Any:
        answer = self.http.request(verb, f"{self.url}/_sandbox/{path}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def faults(self, *rules: dict[str, Any]) -> None:
        self.control("POST", "faults", {"rules": list(rules)})

    def status(self, doc_id: int) -> str:
        return self.control("GET", f"documents/{doc_id}")["status"]


@pytest.fixture
def b24(sandbox: Any) -> Iterator[Portal]:
    portal = Portal(sandbox.url, sandbox.extra["webhook"])
    yield portal
    portal.http.close()


@pytest.mark.parametrize(("kind", "status", "code", "description"), [
    ("error500", 500, "INTERNAL_SERVER_ERROR", "Internal server error"),
    ("query_limit", 503, "QUERY_LIMIT_EXCEEDED", "Too many requests"),
    ("overload", 503, "OVERLOAD_LIMIT", "REST API is blocked due to overload"),
])
def test_error_faults_answer_and_apply_nothing(b24: Portal, kind: str, status: int, code: str,
                                               description: str) -> None:
    b24.faults({"kind": kind, "method": "catalog.document.cancel", "times": 1})
    answer = b24.call("catalog.document.cancel", {"id": 1})
    assert answer.status_code == status
    assert answer.json() == {"error": code, "error_description": description}
    assert b24.status(1) == "Y"
    assert b24.call("catalog.document.cancel", {"id": 1}).json()["result"] is True
    calls = b24.control("GET", "calls")
    assert [(c["http_status"], c["fault"]) for c in calls] == [(status, kind), (200, None)]


def test_drop_closes_the_connection_without_an_answer(b24: Portal) -> None:
    b24.faults({"kind": "drop", "method": "catalog.document.cancel", "times": 1})
    with pytest.raises(httpx.TransportError):
        b24.call("catalog.document.cancel", {"id": 2})
    assert b24.status(2) == "Y"
    call = b24.control("GET", "calls")[0]
    assert call["http_status"] is None and call["fault"] == "drop" and call["applied"] is False
    assert b24.control("GET", "stats")["by_status"] == {"dropped": 1}


def test_applied_then_timeout_applies_the_call_but_never_answers(b24: Portal) -> None:
    b24.faults({"kind": "applied_then_timeout", "method": "catalog.document.cancel",
                "times": 1, "seconds": 2})
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        b24.call("catalog.document.cancel", {"id": 3}, timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert b24.status(3) == "C"
    call = b24.control("GET", "calls")[0]
    assert (call["http_status"], call["fault"], call["applied"]) == (None, "applied_then_timeout", True)
    # The naive retry now meets the "not conducted" error: the double-post this fault is made for.
    retry = b24.call("catalog.document.cancel", {"id": 3})
    assert retry.status_code == 400 and "not been conducted" in retry.json()["error_description"]


@pytest.mark.parametrize(("kind", "status", "applied"), [
    ("not_json", 200, True), ("proxy_timeout", 408, True), ("proxy_limit", 429, False)])
def test_proxy_faults_answer_with_an_html_page(b24: Portal, kind: str, status: int, applied: bool) -> None:
    b24.faults({"kind": kind, "method": "catalog.document.cancel", "times": 1})
    answer = b24.call("catalog.document.cancel", {"id": 5})
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("text/html") and "<html>" in answer.text
    assert b24.status(5) == ("C" if applied else "Y")
    call = b24.control("GET", "calls")[0]
    assert (call["http_status"], call["fault"], call["applied"]) == (status, kind, applied)


def test_applied_then_timeout_closes_the_connection_after_the_stall(b24: Portal) -> None:
    b24.faults({"kind": "applied_then_timeout", "times": 1, "seconds": 0.3})
    with pytest.raises(httpx.TransportError):
        b24.call("catalog.document.cancel", {"id": 4}, timeout=5)
    assert b24.status(4) == "C"


def test_a_stall_does_not_block_other_requests(b24: Portal) -> None:
    b24.faults({"kind": "slow", "method": "catalog.document.cancel", "seconds": 3, "times": 1})
    results: list[httpx.Response] = []
    stalled = threading.Thread(target=lambda: results.append(b24.call("catalog.document.cancel", {"id": 5})))
    stalled.start()
    time.sleep(0.2)
    started = time.monotonic()
    with httpx.Client(timeout=5) as other:
        answer = other.post(b24.webhook + "catalog.document.mode.status", json={})
    assert answer.status_code == 200 and time.monotonic() - started < 1.0
    assert b24.status(5) == "Y"  # a slow call is processed only after its wait
    stalled.join(10)
    assert results[0].status_code == 200 and results[0].json()["result"] is True
    assert results[0].elapsed.total_seconds() >= 3
    assert b24.status(5) == "C"


def test_rules_match_methods_and_batches(b24: Portal) -> None:
    b24.faults({"kind": "error500", "method": "catalog.document.cancel"})
    assert b24.call("catalog.document.mode.status").status_code == 200
    assert b24.call("catalog.document.cancel", {"id": 1}).status_code == 500
    batch = b24.call("batch", {"cmd": {"a": "catalog.document.mode.status",
                                       "b": "catalog.document.cancel?id=1"}})
    assert batch.status_code == 500
    assert b24.call("batch", {"cmd": {"a": "catalog.document.mode.status"}}).status_code == 200
    assert b24.status(1) == "Y"


def test_times_and_rate(b24: Portal) -> None:
    b24.faults({"kind": "error500", "times": 2}, {"kind": "query_limit", "rate": 0})
    statuses = [b24.call("scope").status_code for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    rules = b24.control("GET", "faults")["rules"]
    assert [(r["kind"], r["remaining"], r["fired"]) for r in rules] == [
        ("error500", 0, 2), ("query_limit", None, 0)]
    b24.control("DELETE", "faults")
    assert b24.control("GET", "faults") == {"rules": []}


def test_half_rate_fires_about_half_the_time(b24: Portal) -> None:
    b24.control("POST", "config", {"rate": 1000, "burst": 1000})
    b24.faults({"kind": "query_limit", "rate": 0.5})
    statuses = [b24.call("scope").status_code for _ in range(200)]
    assert 60 < statuses.count(503) < 140


def test_bad_rules_are_refused(b24: Portal) -> None:
    for rule in ({"kind": "explode"}, {"kind": "drop", "rate": 2}, {"kind": "drop", "times": 0}):
        answer = b24.http.post(f"{b24.url}/_sandbox/faults", json={"rules": [rule]})
        assert answer.status_code == 400, rule
    assert b24.control("GET", "faults") == {"rules": []}


def test_cli_error_rate_is_a_rule_that_reset_restores(sandbox_factory: Callable[..., Any]) -> None:
    proc = sandbox_factory("--documents", "3", "--durations-zero", "--error-rate", "1.0")
    portal = Portal(proc.url, proc.extra["webhook"])
    try:
        assert portal.call("scope").status_code == 500
        assert [r["kind"] for r in portal.control("GET", "faults")["rules"]] == ["error500"]
        portal.control("DELETE", "faults")
        assert portal.call("scope").status_code == 200
        portal.control("POST", "reset")
        assert portal.call("scope").status_code == 500
    finally:
        portal.http.close()


def test_cli_fault_rules_of_any_kind_are_in_force_from_the_start(sandbox_factory: Callable[..., Any]) -> None:
    proc = sandbox_factory("--documents", "3", "--durations-zero",
                           "--fault", "applied_then_timeout,method=catalog.document.cancel,times=1,seconds=0.2",
                           "--fault", '{"kind": "overload", "method": "im.message.add"}')
    portal = Portal(proc.url, proc.extra["webhook"])
    try:
        rules = portal.control("GET", "faults")["rules"]
        assert [(r["kind"], r["method"], r["times"]) for r in rules] == [
            ("applied_then_timeout", "catalog.document.cancel", 1), ("overload", "im.message.add", None)]
        with pytest.raises(httpx.TransportError):
            portal.call("catalog.document.cancel", {"id": 1}, timeout=5)
        assert portal.status(1) == "C"
        overloaded = portal.call("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "x"})
        assert overloaded.status_code == 503 and overloaded.json()["error"] == "OVERLOAD_LIMIT"
        portal.control("POST", "reset")
        assert [r["remaining"] for r in portal.control("GET", "faults")["rules"]] == [1, None]
    finally:
        portal.http.close()


def test_bad_cli_fault_rule_stops_the_start() -> None:
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "sandbox", "--fault", "explode"], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert done.returncode == 2 and "--fault" in done.stderr
