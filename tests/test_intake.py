"""Intake over the Flask test client against a real Redis: auth, validation, idempotency, one job per request."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

import devenv
from app import create_app
from tests.helpers import API_KEY, ROBOT_SECRET, WEBHOOK_SECRET, bearer, dumps, signed_headers

DUMMY_WEBHOOK = "http://127.0.0.1:9/rest/1/intakeonly/"


def make_app(redis_url: str, **overrides: Any) -> Flask:
    config = {"_env_file": None, "redis_url": redis_url, "b24_webhook_url": DUMMY_WEBHOOK, "b24_chat_id": "chat1",
              "trigger_api_keys": API_KEY, "trigger_secrets": WEBHOOK_SECRET, "b24_robot_secret": ROBOT_SECRET}
    config.update(overrides)
    app = create_app(config)
    app.testing = True
    return app


@pytest.fixture
def client(redis_conn: redis.Redis, redis_url: str) -> FlaskClient:
    return make_app(redis_url).test_client()


def queued(conn: redis.Redis, name: str = "cancel") -> list[str]:
    return [job_id.decode() for job_id in conn.lrange(f"rq:queue:{name}", 0, -1)]


def post(client: FlaskClient, body: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/v1/cancel", data=data, headers={"Content-Type": "application/json", **bearer(),
                                                         **(headers or {})}, **kwargs)


GOOD = {"document_ids": [142, 143], "reason": "Shipment RMA-2291 returned", "external_id": "RMA-2291"}


def test_accepted_request_is_one_real_rq_job_and_a_record(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = post(client, GOOD, {"Idempotency-Key": "rma-2291"})
    assert response.status_code == 202
    body = response.get_json()
    request_id = body["request_id"]
    assert body["status_url"] == f"/v1/requests/{request_id}"
    assert queued(redis_conn) == [f"cancel-{request_id}"]
    job = Job.fetch(f"cancel-{request_id}", connection=redis_conn, serializer=JSONSerializer)
    assert job.func_name == "jobs.cancel.cancel_documents"
    assert job.args == [request_id]
    assert job.get_status() == "queued"
    assert job.retries_left == 3
    assert Queue("cancel", connection=redis_conn, serializer=JSONSerializer).count == 1
    status = client.get(body["status_url"], headers=bearer()).get_json()
    assert status["state"] == "queued"
    assert [d["id"] for d in status["documents"]] == [142, 143]
    assert status["reason"] == "Shipment RMA-2291 returned"


def test_job_arguments_carry_no_secret(client: FlaskClient, redis_conn: redis.Redis) -> None:
    post(client, GOOD, {"Idempotency-Key": "secret-check"})
    dump = b"".join(redis_conn.dump(key) or b"" for key in redis_conn.keys("*"))
    for secret in (API_KEY.encode(), b"intakeonly", ROBOT_SECRET.encode()):
        assert secret not in dump


def test_repeat_key_answers_200_with_same_id_and_enqueues_nothing(client: FlaskClient,
                                                                 redis_conn: redis.Redis) -> None:
    first = post(client, GOOD, {"Idempotency-Key": "same"})
    second = post(client, GOOD, {"Idempotency-Key": "same"})
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.get_json()["request_id"] == second.get_json()["request_id"]
    assert len(queued(redis_conn)) == 1


def test_repeat_after_request_finished_still_enqueues_nothing(client: FlaskClient, redis_conn: redis.Redis) -> None:
    first = post(client, GOOD, {"Idempotency-Key": "done-one"}).get_json()
    redis_conn.delete("rq:queue:cancel")  # as if a worker took and finished it
    redis_conn.hset(f"b24c:req:{first['request_id']}", "state", "done")
    again = post(client, GOOD, {"Idempotency-Key": "done-one"})
    assert again.status_code == 200
    assert queued(redis_conn) == []


def test_record_and_key_live_for_the_retention_setting(redis_conn: redis.Redis, redis_url: str) -> None:
    client = make_app(redis_url, request_ttl_days=10).test_client()
    request_id = post(client, GOOD, {"Idempotency-Key": "ttl"}).get_json()["request_id"]
    ttl = redis_conn.ttl(f"b24c:req:{request_id}")
    assert 10 * 86400 - 5 <= ttl <= 10 * 86400
    [idem] = redis_conn.keys("b24c:idem:*")
    assert redis_conn.hget(idem, "id") == request_id.encode()
    assert 10 * 86400 - 5 <= redis_conn.ttl(idem) <= 10 * 86400


def test_without_key_every_request_is_new(client: FlaskClient, redis_conn: redis.Redis) -> None:
    ids = {post(client, GOOD).get_json()["request_id"] for _ in range(3)}
    assert len(ids) == 3
    assert len(queued(redis_conn)) == 3


def test_standard_webhooks_signature_is_accepted_and_webhook_id_dedupes(client: FlaskClient,
                                                                        redis_conn: redis.Redis) -> None:
    body = dumps(GOOD)
    first = client.post("/v1/cancel", data=body, headers=signed_headers(body, "msg_1"))
    second = client.post("/v1/cancel", data=body, headers=signed_headers(body, "msg_1"))
    assert (first.status_code, second.status_code) == (202, 200)
    assert len(queued(redis_conn)) == 1


@pytest.mark.parametrize("headers, why", [
    ({}, "missing"),
    (bearer("wrong-key"), "wrong key"),
    ({"Authorization": "Basic abc"}, "wrong scheme"),
])
def test_bad_bearer_credentials_get_401(client: FlaskClient, redis_conn: redis.Redis,
                                        headers: dict[str, str], why: str) -> None:
    response = client.post("/v1/cancel", data=dumps(GOOD), headers={"Content-Type": "application/json", **headers})
    assert response.status_code == 401, why
    assert response.get_json()["error"] == "unauthorized"
    assert queued(redis_conn) == []


def test_stale_wrong_or_malformed_signatures_get_401(client: FlaskClient, redis_conn: redis.Redis) -> None:
    body = dumps(GOOD)
    stale = signed_headers(body, "msg_old", when=datetime.now(tz=UTC) - timedelta(minutes=6))
    future = signed_headers(body, "msg_new", when=datetime.now(tz=UTC) + timedelta(minutes=6))
    other = signed_headers(body, "msg_x", secret="whsec_" + "b3RoZXJzZWNyZXRvdGhlcnNlY3JldDEyMzQ=")
    malformed = {**signed_headers(body, "msg_m"), "webhook-signature": "garbage-without-comma"}
    tampered = signed_headers(body, "msg_t")
    for headers in (stale, future, other, malformed):
        assert client.post("/v1/cancel", data=body, headers=headers).status_code == 401
    assert client.post("/v1/cancel", data=body.replace(b"142", b"999"), headers=tampered).status_code == 401
    assert queued(redis_conn) == []


@pytest.mark.parametrize("body, field", [
    ({"reason": "x"}, "document_ids"),
    ({"document_ids": []}, "document_ids"),
    ({"document_ids": "142"}, "document_ids"),
    ({"document_ids": [1, "2"]}, "document_ids"),
    ({"document_ids": [1.5]}, "document_ids"),
    ({"document_ids": [True]}, "document_ids"),
    ({"document_ids": [0]}, "document_ids"),
    ({"document_ids": [-3]}, "document_ids"),
    ({"document_ids": [5, 5]}, "document_ids"),
    ({"document_ids": list(range(1, 502))}, "document_ids"),
    ({"document_numbers": []}, "document_numbers"),
    ({"document_numbers": ["A", "A"]}, "document_numbers"),
    ({"document_ids": [1], "document_numbers": ["A"]}, "document_ids"),
    ({"document_ids": [1], "chat": "general"}, "chat"),
    ({"document_ids": [1], "reason": 5}, "reason"),
    ({"document_ids": [1], "colour": "red"}, "colour"),
])
def test_invalid_fields_get_400_naming_the_field(client: FlaskClient, redis_conn: redis.Redis,
                                                 body: dict[str, Any], field: str) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert response.get_json()["field"] == field
    assert queued(redis_conn) == []


def test_malformed_json_gets_400(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = post(client, b'{"document_ids": [1,')
    assert response.status_code == 400
    assert "JSON" in response.get_json()["message"]
    assert post(client, b"[1, 2]").status_code == 400
    assert queued(redis_conn) == []


def test_wrong_content_type_gets_415(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = client.post("/v1/cancel", data="document_ids=1", headers={**bearer(),
                           "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert queued(redis_conn) == []


def test_unknown_portal_gets_404(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = post(client, {**GOOD, "portal": "elsewhere"})
    assert response.status_code == 404
    assert response.get_json()["field"] == "portal"
    assert queued(redis_conn) == []


def test_body_over_64_kib_gets_413(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = post(client, {"document_ids": [1], "reason": "x" * (65 * 1024)})
    assert response.status_code == 413
    assert response.get_json()["error"] == "too_large"
    assert queued(redis_conn) == []


def test_redis_down_gets_503_and_nothing_is_claimed(tmp_path: Any) -> None:
    proc = devenv.start_redis(tmp_path / "r")
    app = make_app(proc.url)
    client = app.test_client()
    proc.stop()
    response = post(client, GOOD, {"Idempotency-Key": "while-down"})
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert set(ready.get_json()) == {"error", "message"} and ready.get_json()["error"] == "unavailable"
    assert client.get("/healthz").status_code == 200


def test_robot_call_is_accepted_with_its_document_reference(client: FlaskClient, redis_conn: redis.Redis) -> None:
    url = f"/v1/bitrix24/robot?portal=default&key={ROBOT_SECRET}&document_ids=142,143&reason=Deal+lost"
    form = {"document_id[]": ["crm", "CCrmDocumentDeal", "DEAL_12"]}
    response = client.post(url, data=form)
    assert response.status_code == 202
    status = client.get(response.get_json()["status_url"], headers=bearer()).get_json()
    assert status["source"] == "robot"
    assert status["source_ref"] == "crm, CCrmDocumentDeal, DEAL_12"
    assert status["reason"] == "Deal lost"
    assert client.post(url, data=form).status_code == 200  # the same robot delivery again
    assert len(queued(redis_conn)) == 1


def test_robot_with_wrong_key_gets_401(client: FlaskClient, redis_conn: redis.Redis) -> None:
    assert client.post("/v1/bitrix24/robot?document_ids=1&key=nope").status_code == 401
    assert client.post("/v1/bitrix24/robot?document_ids=1").status_code == 401
    assert client.post(f"/v1/bitrix24/robot?document_ids=x&key={ROBOT_SECRET}").status_code == 400
    assert queued(redis_conn) == []


def test_status_of_unknown_request_is_404_and_needs_credentials(client: FlaskClient) -> None:
    assert client.get("/v1/requests/" + "0" * 32, headers=bearer()).status_code == 404
    assert client.get("/v1/requests/" + "0" * 32).status_code == 401
    assert client.get("/v1/requests/not-an-id", headers=bearer()).status_code == 404


def test_sandbox_key_works_only_in_sandbox_mode_from_loopback(redis_conn: redis.Redis, redis_url: str) -> None:
    plain = make_app(redis_url).test_client()
    assert post(plain, GOOD, bearer("sandbox")).status_code == 401
    sandbox = make_app(redis_url, sandbox_mode=True).test_client()
    accepted = post(sandbox, GOOD, bearer("sandbox"))
    assert accepted.status_code == 202
    assert sandbox.get(accepted.get_json()["status_url"], headers=bearer("sandbox")).get_json()["caller"] == "sandbox"
    remote = post(sandbox, GOOD, bearer("sandbox"), environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert remote.status_code == 401


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.get("/v1/cancel").status_code == 405


def test_fast_path_writes_the_job_hash_rq_itself_writes(client: FlaskClient, redis_conn: redis.Redis) -> None:
    from jobs import policy
    from jobs.enqueue import ON_FAILURE

    request_id = post(client, GOOD, {"Idempotency-Key": "same-as-rq"}).get_json()["request_id"]
    ours = {k.decode(): v for k, v in redis_conn.hgetall(f"rq:job:cancel-{request_id}").items()}
    queue = Queue("reference", connection=redis_conn, serializer=JSONSerializer)
    queue.enqueue("jobs.cancel.cancel_documents", request_id, job_id="reference", job_timeout=policy.JOB_TIMEOUT,
                  result_ttl=policy.RESULT_TTL, failure_ttl=policy.FAILURE_TTL, on_failure=ON_FAILURE,
                  retry=Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS),
                  description=f"cancel_documents({request_id})")
    theirs = {k.decode(): v for k, v in redis_conn.hgetall("rq:job:reference").items()}
    for moment in ("created_at", "enqueued_at"):
        assert ours.pop(moment) and theirs.pop(moment)
    assert theirs.pop("origin") == b"reference" and ours.pop("origin") == b"cancel"
    # The same data, compressed with a smaller window (jobs.enqueue.compress).
    assert zlib.decompress(ours.pop("data")) == zlib.decompress(theirs.pop("data"))
    assert ours == theirs
    job = Job.fetch(f"cancel-{request_id}", connection=redis_conn, serializer=JSONSerializer)
    assert (job.func_name, job.args, job.origin, job.retries_left) == ("jobs.cancel.cancel_documents",
                                                                        [request_id], "cancel", 3)


def test_a_signed_request_cannot_be_replayed_as_new_with_another_idempotency_key(
        client: FlaskClient, redis_conn: redis.Redis) -> None:
    body = dumps(GOOD)
    headers = signed_headers(body, "msg_replay")
    first = client.post("/v1/cancel", data=body, headers={**headers, "Idempotency-Key": "a"})
    again = client.post("/v1/cancel", data=body, headers={**headers, "Idempotency-Key": "b"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert len(queued(redis_conn)) == 1


def test_robot_refuses_unknown_portals_like_wrong_keys_and_odd_ids(client: FlaskClient,
                                                                   redis_conn: redis.Redis) -> None:
    unknown = client.post(f"/v1/bitrix24/robot?portal=elsewhere&key={ROBOT_SECRET}&document_ids=1")
    wrong = client.post("/v1/bitrix24/robot?portal=default&key=nope&document_ids=1")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.get_json() == wrong.get_json()
    for ids in ("1_000", "\u0663", "1.5", "99999999999"):
        assert client.post(f"/v1/bitrix24/robot?key={ROBOT_SECRET}&document_ids={ids}").status_code == 400
    numbers = client.post(f"/v1/bitrix24/robot?key={ROBOT_SECRET}&document_numbers=RMA 2291,RMA 2292")
    assert numbers.status_code == 202
    status = client.get(numbers.get_json()["status_url"], headers=bearer()).get_json()
    assert [d["number"] for d in status["documents"]] == ["RMA 2291", "RMA 2292"]
    assert post(client, {"document_ids": [2**31]}).status_code == 400


def test_submit_never_overwrites_a_job_hash_it_did_not_write(client: FlaskClient, redis_conn: redis.Redis,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import records

    taken = "f" * 32
    redis_conn.hset(f"rq:job:cancel-{taken}", mapping={"status": "finished", "data": "someone else's"})
    monkeypatch.setattr(records, "new_request_id", lambda: taken)
    response = post(client, GOOD, {"Idempotency-Key": "collides"})
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable"
    assert redis_conn.hgetall(f"rq:job:cancel-{taken}") == {b"status": b"finished", b"data": b"someone else's"}
    assert queued(redis_conn) == []
    assert redis_conn.keys("b24c:*") == []  # neither a record nor the idempotency key
