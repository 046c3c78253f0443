"""The pipeline end to end over real parts: our Redis, a real `rq worker` process, the sandbox over HTTP.

Each test asserts on what really happened: document statuses and chat messages in the sandbox, the
calls the sandbox received, and the request record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job
from rq.serializers import JSONSerializer

import devenv
from app import create_app
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

READ_TIMEOUT = "1.5"  # seconds: short, so "applied, then timed out" answers time out quickly
# seconds Bitrix24 may run a call (60 in the cloud): short, so the ambiguity rule's wait (this + 5 s) is short
EXECUTION_LIMIT = "3"


def service_env(redis_url: str, webhook: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_url, "B24_WEBHOOK_URL": webhook, "B24_CHAT_ID": "chat1",
                "TRIGGER_API_KEYS": API_KEY, "B24_READ_TIMEOUT": READ_TIMEOUT, "B24_CONNECT_TIMEOUT": "1",
                "B24_EXECUTION_LIMIT": EXECUTION_LIMIT})
    env.update(extra)
    return env


METRICS_TOKEN = "pipeline-metrics-token"


@pytest.fixture(scope="module")
def worker(redis_proc: devenv.Process, shared_sandbox: devenv.Process,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One real worker process for the module; yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = devenv.start_worker(service_env(redis_proc.url, shared_sandbox.extra["webhook"]), log=log)
    yield log
    proc.stop()


@pytest.fixture
def portal(sandbox: devenv.Process) -> SandboxView:
    return SandboxView(sandbox.url)


@pytest.fixture
def client(redis_proc: devenv.Process, shared_sandbox: devenv.Process, worker: Path) -> FlaskClient:
    env = service_env(redis_proc.url, shared_sandbox.extra["webhook"])
    config = {"_env_file": None, "redis_url": env["REDIS_URL"], "b24_webhook_url": env["B24_WEBHOOK_URL"],
              "b24_chat_id": "chat1", "trigger_api_keys": API_KEY, "metrics_token": METRICS_TOKEN}
    return create_app(config).test_client()


def app_of(client: FlaskClient) -> Any:
    return client.application


def submit(client: FlaskClient, key: str, **body: Any) -> str:
    response = client.post("/v1/cancel", json=body, headers={**bearer(), "Idempotency-Key": key})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def status(client: FlaskClient, request_id: str) -> dict[str, Any]:
    return client.get(f"/v1/requests/{request_id}", headers=bearer()).get_json()  # type: ignore[no-any-return]


def finished(client: FlaskClient, request_id: str, timeout: float = 40) -> dict[str, Any]:
    return wait_for(lambda: (s := status(client, request_id))["state"] in ("done", "failed") and s,
                    timeout=timeout, what=f"request {request_id} to finish")


def reports(portal: SandboxView, request_id: str) -> list[dict[str, Any]]:
    return [m for m in portal.messages() if f"#{request_id}" in (m.get("message") or "")]


def cancel_calls(portal: SandboxView, doc_id: int) -> list[dict[str, Any]]:
    return [c for c in portal.calls("catalog.document.cancel") if str((c.get("params") or {}).get("id")) == str(doc_id)]


def outcomes(state: dict[str, Any]) -> dict[int, str]:
    return {doc["id"]: doc["outcome"] for doc in state["documents"]}


def test_returned_shipment_of_three_documents_is_cancelled_and_reported_once(
        client: FlaskClient, portal: SandboxView) -> None:
    request_id = submit(client, "rma-1", document_ids=[3, 4, 5], reason="Shipment RMA-1 returned",
                        external_id="RMA-1")
    state = finished(client, request_id)
    assert state["state"] == "done"
    assert outcomes(state) == {3: "cancelled", 4: "cancelled", 5: "cancelled"}
    for doc_id in (3, 4, 5):
        assert portal.document(doc_id)["status"] != "Y"
        assert len(cancel_calls(portal, doc_id)) == 1
    [message] = reports(portal, request_id)
    assert message["dialog_id"] == "chat1"
    for doc_id in (3, 4, 5):
        assert f"/shop/documents/details/{doc_id}/" in message["message"]
    assert "Shipment RMA-1 returned" in message["message"]
    assert "RMA-1" in message["message"]
    assert state["message_id"] == message["id"]
    assert len(portal.calls("batch")) == 1  # three cancels, one request against the rate limit


def test_repeat_delivery_in_flight_or_finished_adds_no_job_call_or_message(
        client: FlaskClient, portal: SandboxView, redis_proc: devenv.Process) -> None:
    body = {"document_ids": [6], "reason": "dup"}
    first = client.post("/v1/cancel", json=body, headers={**bearer(), "Idempotency-Key": "dup-1"})
    in_flight = client.post("/v1/cancel", json=body, headers={**bearer(), "Idempotency-Key": "dup-1"})
    assert (first.status_code, in_flight.status_code) == (202, 200)
    request_id = first.get_json()["request_id"]
    finished(client, request_id)
    wait_for(lambda: reports(portal, request_id), what="the report")
    calls_before = len(portal.calls())
    after = client.post("/v1/cancel", json=body, headers={**bearer(), "Idempotency-Key": "dup-1"})
    assert after.status_code == 200 and after.get_json()["request_id"] == request_id
    conn = redis.Redis.from_url(redis_proc.url)
    assert conn.llen("rq:queue:cancel") == 0
    assert len(portal.calls()) == calls_before
    assert len(reports(portal, request_id)) == 1
    assert len(cancel_calls(portal, 6)) == 1


def test_already_cancelled_refused_and_unknown_number_each_get_their_outcome(
        client: FlaskClient, portal: SandboxView) -> None:
    portal.seed({"id": 7, "docType": "S", "status": "C", "title": "Old adjustment", "docNumber": "OLD-7"})
    portal.permissions(deny_cancel_doc_types=["M"])
    portal.seed({"id": 8, "docType": "M", "status": "Y", "title": "Moving", "docNumber": "MV-8"})
    request_id = submit(client, "mixed", document_ids=[7, 8, 9], reason="mixed")
    state = finished(client, request_id)
    assert outcomes(state) == {7: "already_not_conducted", 8: "refused", 9: "cancelled"}
    refused = next(d for d in state["documents"] if d["id"] == 8)
    assert "Insufficient permissions" in refused["detail"]
    assert portal.document(8)["status"] == "Y"
    assert state["state"] == "done"
    [message] = reports(portal, request_id)
    assert "refused" in message["message"] and "already not conducted" in message["message"]

    number_request = submit(client, "numbers", document_numbers=["NO-SUCH-NUMBER", portal.document(10)["docNumber"]])
    state = finished(client, number_request)
    by_number = {d.get("number"): d["outcome"] for d in state["documents"]}
    assert by_number["NO-SUCH-NUMBER"] == "not_found"
    assert by_number[portal.document(10)["docNumber"]] == "cancelled"
    assert portal.document(10)["status"] != "Y"


def test_plan_without_inventory_is_a_refusal_with_the_portals_words(client: FlaskClient, portal: SandboxView) -> None:
    portal.permissions(plan_has_inventory=False)
    request_id = submit(client, "plan", document_ids=[11])
    state = finished(client, request_id)
    assert outcomes(state) == {11: "refused"}
    assert "plan" in state["documents"][0]["detail"]
    assert portal.document(11)["status"] == "Y"
    assert len(reports(portal, request_id)) == 1


def test_missing_document_is_not_found(client: FlaskClient, portal: SandboxView) -> None:
    request_id = submit(client, "missing", document_ids=[999])
    state = finished(client, request_id)
    assert outcomes(state) == {999: "not_found"}
    assert len(reports(portal, request_id)) == 1


def test_cancelled_status_read_back_as_N_still_counts(client: FlaskClient, portal: SandboxView) -> None:
    portal.config(cancelled_status="N")
    portal.seed({"id": 12, "docType": "A", "status": "N", "title": "Draft", "docNumber": "DR-12"})
    request_id = submit(client, "status-n", document_ids=[12, 13])
    state = finished(client, request_id)
    assert outcomes(state) == {12: "already_not_conducted", 13: "cancelled"}
    assert portal.document(13)["status"] == "N"


@pytest.mark.parametrize("kind", ["error500", "drop", "applied_then_timeout"])
def test_faults_on_cancel_still_cancel_each_document_once(client: FlaskClient, portal: SandboxView,
                                                          kind: str) -> None:
    portal.faults({"kind": kind, "method": "catalog.document.cancel", "times": 1, "seconds": 4})
    request_id = submit(client, f"fault-{kind}", document_ids=[14])
    state = finished(client, request_id)
    assert outcomes(state) == {14: "cancelled"}
    assert portal.document(14)["status"] != "Y"
    applied = [c for c in cancel_calls(portal, 14) if c.get("http_status") == 200]
    refused_again = [c for c in cancel_calls(portal, 14) if c.get("error") == "0"]
    assert refused_again == []  # never sent again after it had worked
    assert len(applied) == 1 or kind == "applied_then_timeout"
    if kind == "applied_then_timeout":
        assert len(cancel_calls(portal, 14)) == 1  # re-read showed it done: not sent again
    assert len(reports(portal, request_id)) == 1


def test_batch_applied_then_timed_out_is_settled_by_rereading(client: FlaskClient, portal: SandboxView) -> None:
    portal.faults({"kind": "applied_then_timeout", "method": "batch", "times": 1, "seconds": 4})
    request_id = submit(client, "batch-timeout", document_ids=[15, 16, 17])
    state = finished(client, request_id)
    assert set(outcomes(state).values()) == {"cancelled"}
    for doc_id in (15, 16, 17):
        assert len(cancel_calls(portal, doc_id)) == 1
        assert portal.document(doc_id)["status"] != "Y"
    assert len(reports(portal, request_id)) == 1


@pytest.mark.parametrize("kind", ["error500", "drop", "applied_then_timeout"])
def test_faults_on_the_chat_post_never_post_twice(client: FlaskClient, portal: SandboxView, kind: str) -> None:
    portal.faults({"kind": kind, "method": "im.message.add", "times": 1, "seconds": 4})
    request_id = submit(client, f"chat-{kind}", document_ids=[18])
    state = finished(client, request_id)
    assert state["state"] == "done"
    [message] = wait_for(lambda: reports(portal, request_id), what="the report")
    assert state["message_id"] == message["id"]
    assert len(cancel_calls(portal, 18)) == 1


def test_missing_scope_fails_the_request_reports_it_and_keeps_the_job(
        client: FlaskClient, portal: SandboxView, redis_proc: devenv.Process) -> None:
    portal.permissions(scopes=["im"])
    request_id = submit(client, "no-scope", document_ids=[19])
    state = finished(client, request_id)
    assert state["state"] == "failed"
    assert outcomes(state) == {19: "failed"}
    assert "insufficient_scope" in state["documents"][0]["detail"]
    assert portal.document(19)["status"] == "Y"
    [message] = reports(portal, request_id)
    assert "catalog" in message["message"]  # says what to fix: add the scope
    conn = redis.Redis.from_url(redis_proc.url)
    job = Job.fetch(f"cancel-{request_id}", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "failed"
    # the read before the cancel met the permanent error: it is not retried, and nothing was cancelled
    assert len(portal.calls("catalog.document.list")) == 1
    assert portal.calls("catalog.document.cancel") == []

    portal.permissions(scopes=["catalog", "im"])  # a person fixes the webhook, then replays the request
    result = app_of(client).test_cli_runner().invoke(args=["replay", request_id])
    assert result.exit_code == 0, result.output
    assert f"cancel-{request_id}" in result.output
    state = wait_for(lambda: (s := status(client, request_id))["state"] == "done" and s, timeout=40,
                     what="the replayed request")
    assert outcomes(state) == {19: "cancelled"}
    assert portal.document(19)["status"] != "Y"
    assert len(reports(portal, request_id)) == 2  # the first report, and the replay's
    assert "replay 2" in reports(portal, request_id)[1]["message"]


def test_metrics_show_what_the_workers_did(client: FlaskClient, portal: SandboxView) -> None:
    request_id = submit(client, "metrics-1", document_ids=[20])
    finished(client, request_id)
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    page = wait_for(lambda: (text := client.get("/metrics", headers=metrics).get_data(as_text=True))
                    and 'b24cancel_document_outcomes_total{outcome="cancelled",portal="default"}' in text and text,
                    timeout=10, what="the worker's counts in /metrics")
    assert 'b24cancel_bitrix24_calls_total{method="catalog.document.cancel",portal="default",result="ok"}' in page
    assert 'b24cancel_bitrix24_calls_total{method="im.message.add",portal="default",result="ok"}' in page
    assert 'b24cancel_intake_requests_total{endpoint="api.cancel",status="202"}' in page
    assert "b24cancel_queue_depth" in page


def test_a_second_run_of_a_request_waits_for_the_one_holding_it(
        client: FlaskClient, portal: SandboxView, redis_proc: devenv.Process) -> None:
    from jobs import policy, records
    from jobs.lifecycle import lease_key

    conn = redis.Redis.from_url(redis_proc.url)
    request_id = records.new_request_id()  # submitted under an id we know beforehand, as the intake would
    conn.set(lease_key("cancel", request_id), "another-run", px=3000)  # as if an earlier copy still ran
    request_ = {"portal": "default", "source": "api", "document_ids": [2], "reason": None, "external_id": None,
                "chat": None}
    submitted = app_of(client).extensions["b24cancel"].submitter.submit(
        request_id, request_, policy.FIRST_JOBS["cancel"], policy.cancel_job_id(request_id))
    assert submitted.created
    time.sleep(1.5)
    assert cancel_calls(portal, 2) == []  # nothing sent while the other run holds the request
    state = finished(client, request_id)
    assert outcomes(state) == {2: "cancelled"}
    assert len(cancel_calls(portal, 2)) == 1


def test_a_job_that_fails_for_good_ends_its_request_and_reports_it(
        client: FlaskClient, portal: SandboxView, redis_proc: devenv.Process) -> None:
    from rq import Queue

    from jobs import hooks, records

    conn = redis.Redis.from_url(redis_proc.url)
    request_id = records.new_request_id()
    conn.hset(records.request_key(request_id), mapping=records.new_record(
        {"portal": "default", "source": "api", "document_ids": [3]}, state="running"))
    conn.expire(records.request_key(request_id), 3600)
    job = Queue("cancel", connection=conn, serializer=JSONSerializer).create_job(
        "jobs.cancel.cancel_documents", args=(request_id,), job_id=f"cancel-{request_id}")
    hooks.end_request(conn, job, "JobTimeoutException")
    state = finished(client, request_id)
    assert state["state"] == "failed"
    assert "JobTimeoutException" in state["documents"][0]["detail"]
    [message] = wait_for(lambda: reports(portal, request_id), what="the failure report")
    assert "rq requeue" in message["message"]


def test_an_unanswered_post_is_found_in_a_busy_chat_and_not_repeated(
        client: FlaskClient, portal: SandboxView) -> None:
    portal.config(rate=10_000, burst=10_000)  # the chatter below is not what this test limits
    portal.faults({"kind": "applied_then_timeout", "method": "im.message.add", "times": 1, "seconds": 3})
    request_id = submit(client, "busy-chat", document_ids=[5])
    wait_for(lambda: reports(portal, request_id), timeout=20, what="the report to land")
    # meanwhile the chat moves on: 120 other messages arrive before the retry looks
    chatter = portal.http.post  # the sandbox stores messages sent by anyone with the webhook
    for n in range(120):
        chatter(f"{portal.url}/rest/1/sandbox/im.message.add.json", json={"DIALOG_ID": "chat1", "MESSAGE": f"noise {n}"})
    state = finished(client, request_id)
    assert state["state"] == "done"
    [message] = reports(portal, request_id)
    assert state["message_id"] == message["id"]
    later = [m for m in portal.messages() if m["id"] > message["id"]]
    assert len(later) >= 100  # the report was past the first page of history when the retry looked
