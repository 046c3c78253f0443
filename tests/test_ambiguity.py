"""The ambiguity rule on the cancel path, over real parts: our Redis, real `rq worker` processes, the sandbox.

After a cancel that got no answer, nothing that depends on its effect happens until it can no longer be
running on the portal (B24_EXECUTION_LIMIT + 5 s after it was sent); one document has one cancel in flight
across requests and workers; outcomes use the status read before the send; leases outlive long calls.
Durations are scaled down: the execution limit is 3 s and the read timeout 1.5 s, so a `slow` fault of
2.5 s is a call that times out on our side and then takes effect on the portal's.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient

import devenv
from app import create_app
from jobs import policy
from jobs.claims import KEY_PREFIX
from jobs.lifecycle import Lease, LeaseLost, check_current_lease, exclusively, lease_key
from tests.helpers import API_KEY, SandboxView, wait_for
from tests.test_pipeline import cancel_calls, finished, outcomes, reports, service_env, status, submit
from tests.test_sentry import horse_of

EXECUTION_LIMIT = 3.0
READ_TIMEOUT = 1.5
SLOW = 2.5  # longer than the read timeout, shorter than the execution limit
SETTLE = EXECUTION_LIMIT + policy.AMBIGUITY_MARGIN  # from a send to the earliest re-read


@pytest.fixture
def portal(sandbox: devenv.Process) -> SandboxView:
    return SandboxView(sandbox.url)


@pytest.fixture
def start_workers(redis_proc: devenv.Process, sandbox: devenv.Process,
                  tmp_path: Path) -> Iterator[Callable[..., list[devenv.Process]]]:
    """Start real workers with the scaled-down durations (and any overrides); stopped after the test."""
    started: list[devenv.Process] = []

    def start(count: int = 1, **overrides: str) -> list[devenv.Process]:
        scaled = {"B24_READ_TIMEOUT": str(READ_TIMEOUT), "B24_EXECUTION_LIMIT": str(EXECUTION_LIMIT)}
        env = service_env(redis_proc.url, sandbox.extra["webhook"], **{**scaled, **overrides})
        for _ in range(count):
            started.append(devenv.start_worker(env, log=tmp_path / f"worker-{len(started)}.log"))
        return started[-count:]

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def client(redis_proc: devenv.Process, sandbox: devenv.Process) -> FlaskClient:
    return create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_webhook_url": sandbox.extra["webhook"],
                       "b24_chat_id": "chat1", "trigger_api_keys": API_KEY}).test_client()


def batches_with(portal: SandboxView, doc_id: int) -> list[dict[str, Any]]:
    """The batch HTTP calls that carried a cancel of this document, oldest first (run or not)."""
    wanted = f"catalog.document.cancel?id={doc_id}"
    return [call for call in portal.calls("batch")
            if wanted in ((call.get("params") or {}).get("cmd") or {}).values()]


def reads_of(portal: SandboxView, doc_id: int) -> list[dict[str, Any]]:
    """Plain `catalog.document.list` calls (not batch commands) that read this document."""
    found = []
    for call in portal.calls("catalog.document.list"):
        ids = ((call.get("params") or {}).get("filter") or {}).get("@id") or []
        if call["batch"] is None and str(doc_id) in [str(i) for i in ids]:
            found.append(call)
    return found


def claims_left(conn: redis.Redis) -> list[bytes]:
    return list(conn.scan_iter(match=KEY_PREFIX + "*"))


def test_a_slow_cancel_is_sent_once_and_decided_only_once_it_cannot_be_running(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any], redis_conn: redis.Redis) -> None:
    start_workers()
    portal.faults({"kind": "slow", "method": "catalog.document.cancel", "times": 1, "seconds": SLOW})
    request_id = submit(client, "slow-batch", document_ids=[3, 4])
    state = finished(client, request_id, timeout=60)
    assert state["state"] == "done"
    assert outcomes(state) == {3: "cancelled", 4: "cancelled"}
    for doc_id in (3, 4):
        assert len(cancel_calls(portal, doc_id)) == 1  # never sent again beside the running one
        assert portal.document(doc_id)["status"] != "Y"
    [batch] = batches_with(portal, 3)
    before, settle = reads_of(portal, 3)  # the read before the send, and the one that decided
    assert before["time"] < batch["time"]
    assert settle["time"] >= batch["time"] + SETTLE - 0.5  # not 1-2 s later: once the call cannot be running
    assert len(reports(portal, request_id)) == 1
    assert claims_left(redis_conn) == []  # decided documents are given back


def test_two_requests_naming_one_document_send_one_cancel_and_both_decide_on_facts(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any], redis_conn: redis.Redis) -> None:
    start_workers(2)  # the second request runs on the other worker while the first waits to settle
    portal.faults({"kind": "slow", "method": "catalog.document.cancel", "times": 1, "seconds": SLOW})
    first = submit(client, "same-doc-1", document_ids=[5])
    wait_for(lambda: portal.calls("batch"), timeout=20, what="the first request's cancel to be sent")
    second = submit(client, "same-doc-2", document_ids=[5, 6])
    wait_for(lambda: "another request" in status(client, second).get("waiting_for", ""),
             timeout=20, what="the second request to wait for the first one's claim")
    one, two = finished(client, first, timeout=60), finished(client, second, timeout=60)
    assert outcomes(one) == {5: "cancelled"}
    assert outcomes(two) == {5: "already_not_conducted", 6: "cancelled"}
    calls = cancel_calls(portal, 5)
    assert len(calls) == 1 and calls[0]["applied"]  # one cancel for the document, across both requests
    later_reads = [r for r in reads_of(portal, 5) if r["time"] > calls[0]["time"]]
    assert later_reads  # the second request read the document once it was free, and decided on that
    assert len(reports(portal, first)) == 1 and len(reports(portal, second)) == 1
    assert claims_left(redis_conn) == []


def test_an_already_unconducted_document_under_applied_then_timeout_stays_already_not_conducted(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any]) -> None:
    start_workers()
    portal.seed({"id": 7, "docType": "S", "status": "N", "title": "Draft", "docNumber": "DR-7"})
    portal.faults({"kind": "applied_then_timeout", "method": "catalog.document.cancel", "times": 1, "seconds": 3})
    request_id = submit(client, "already-n", document_ids=[7, 8])
    state = finished(client, request_id, timeout=60)
    assert outcomes(state) == {7: "already_not_conducted", 8: "cancelled"}
    assert cancel_calls(portal, 7) == []  # read as not conducted before: no cancel at all
    assert len(cancel_calls(portal, 8)) == 1
    [message] = reports(portal, request_id)
    assert "already not conducted" in message["message"]


def test_a_proxys_page_or_a_2xx_without_json_is_ambiguous(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any]) -> None:
    start_workers()
    kinds = ["not_json", "proxy_timeout", "proxy_limit"]  # the first two ran behind the proxy; the last did not
    portal.faults(*({"kind": kind, "method": "catalog.document.cancel", "times": 1} for kind in kinds))
    requests = {submit(client, f"proxy-{doc_id}", document_ids=[doc_id]): doc_id for doc_id in (9, 10, 11)}
    for request_id, doc_id in requests.items():
        assert outcomes(finished(client, request_id, timeout=60)) == {doc_id: "cancelled"}
        assert portal.document(doc_id)["status"] != "Y"
        assert len(reports(portal, request_id)) == 1
    by_fault = {}
    for doc_id in requests.values():
        calls = cancel_calls(portal, doc_id)
        batches = batches_with(portal, doc_id)
        assert len([c for c in calls if c["applied"]]) == 1  # never cancelled twice
        by_fault[batches[0]["fault"]] = (calls, batches)
    assert set(by_fault) == set(kinds)
    for kind in ("not_json", "proxy_timeout"):
        calls, _ = by_fault[kind]
        assert len(calls) == 1  # it ran: the re-read after the wait showed it, so it was not sent again
    calls, batches = by_fault["proxy_limit"]
    assert len(calls) == 1 and len(batches) == 2  # the proxy refused the first batch: it never ran
    assert batches[1]["time"] >= batches[0]["time"] + SETTLE - 0.5  # sent again only once the first could not run


def test_a_dropped_cancel_is_sent_again_only_once_it_cannot_be_running(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any]) -> None:
    start_workers()
    portal.faults({"kind": "drop", "method": "catalog.document.cancel", "times": 1})
    request_id = submit(client, "dropped", document_ids=[12])
    state = finished(client, request_id, timeout=60)
    assert outcomes(state) == {12: "cancelled"}
    calls = cancel_calls(portal, 12)
    assert len(calls) == 1 and calls[0]["applied"]  # no double cancel
    first, second = batches_with(portal, 12)
    assert (first["fault"], second["fault"]) == ("drop", None)
    assert second["time"] >= first["time"] + SETTLE - 0.5  # sent again only once the first could not run
    assert len(reports(portal, request_id)) == 1


def test_a_horse_killed_during_an_unanswered_cancel_does_not_lead_to_a_second_cancel(
        client: FlaskClient, portal: SandboxView, start_workers: Callable[..., Any]) -> None:
    # The killed job is retried by RQ 10 s later (policy.CRASH_RETRY_INTERVALS), while the portal still runs
    # the first call (14 s): only the durable `sent_at` and the wait keep the retry from sending it again.
    limit, slow = 15.0, 14.0
    [worker] = start_workers(B24_EXECUTION_LIMIT=str(limit), B24_READ_TIMEOUT="30")
    portal.faults({"kind": "slow", "method": "catalog.document.cancel", "times": 1, "seconds": slow})
    request_id = submit(client, "killed-horse", document_ids=[13])
    wait_for(lambda: portal.calls("batch"), timeout=20, what="the slow cancel batch to be sent")
    horse = wait_for(lambda: horse_of(worker), timeout=10, what="the work-horse")
    os.kill(horse, signal.SIGKILL)
    state = finished(client, request_id, timeout=90)
    assert outcomes(state) == {13: "cancelled"}
    calls = cancel_calls(portal, 13)
    assert len(calls) == 1 and calls[0]["applied"]
    [batch] = batches_with(portal, 13)
    settle = reads_of(portal, 13)[-1]
    assert settle["time"] >= batch["time"] + limit + policy.AMBIGUITY_MARGIN - 0.5
    assert len(reports(portal, request_id)) == 1


def test_the_lease_is_renewed_through_a_call_longer_than_the_lease(
        redis_conn: redis.Redis, portal: SandboxView, sandbox: devenv.Process, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitrix24.client import Bitrix24Client

    monkeypatch.setattr(policy, "LEASE_SECONDS", 1.5)
    portal.faults({"kind": "slow", "method": "server.time", "times": 1, "seconds": 4})
    b24 = Bitrix24Client(sandbox.extra["webhook"], "default", httpx.Client(timeout=10),
                         before_send=check_current_lease)
    key = lease_key("cancel", "r" * 32)
    stolen: list[bool] = []
    done = threading.Event()

    def rival() -> None:  # another copy of the job tries to take the request all along
        while not done.is_set():
            stolen.append(Lease(redis_conn, "cancel", "r" * 32).acquire())
            time.sleep(0.2)

    watcher = threading.Thread(target=rival)

    def run(lease: Lease) -> Any:
        watcher.start()  # only once the lease is ours: the rival must find it taken, not take it first
        return b24.call("server.time").result

    started = time.monotonic()
    try:
        result = exclusively(redis_conn, "cancel", "r" * 32, run)
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join()
    assert time.monotonic() - started >= 4  # the call outlasted the lease more than twice
    assert result and len(stolen) >= 15 and not any(stolen)  # yet no other copy could take the request
    assert redis_conn.exists(key) == 0  # given back at the end


def test_a_run_that_lost_its_lease_makes_no_further_call(
        redis_conn: redis.Redis, portal: SandboxView, sandbox: devenv.Process, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitrix24.client import Bitrix24Client

    monkeypatch.setattr(policy, "LEASE_SECONDS", 0.9)
    b24 = Bitrix24Client(sandbox.extra["webhook"], "default", httpx.Client(timeout=10),
                         before_send=check_current_lease)
    key = lease_key("cancel", "s" * 32)

    def run(lease: Lease) -> Any:
        redis_conn.set(key, "another-run", px=5000)  # as if the lease had lapsed and another copy took it
        wait_for(lambda: lease.lost, timeout=5, what="the heartbeat to notice")
        return b24.call("catalog.document.cancel", {"id": 14})

    retry = exclusively(redis_conn, "cancel", "s" * 32, run)
    assert retry.intervals and retry.intervals[0] >= 1  # it waits for the run that holds the request
    assert portal.calls() == []  # and nothing reached the portal
    assert redis_conn.get(key) == b"another-run"  # the other run's lease is left alone
    with pytest.raises(LeaseLost):
        lost = Lease(redis_conn, "cancel", "t" * 32, seconds=0.5)
        lost.acquire()
        time.sleep(0.6)  # no heartbeat: the lease may have lapsed, so it counts as lost
        lost.check()
