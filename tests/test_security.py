"""Callers, idempotency and signatures, attacked over the real web process (gunicorn) with a real Redis.

Each test reproduces what a sender with a valid key (or a captured signed request, or no credentials at all)
tried against the intake, asserts that it was refused, and that nothing was stored or enqueued because of
it. No worker runs here: every accepted request stays in Redis where the test can count it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

import devenv
from tests.helpers import ROBOT_SECRET, WEBHOOK_SECRET, dumps, signed_headers

# Two portals with names that appear nowhere else, so a leak of either is easy to find.
NORTH, SOUTH = "northshop", "southshop"
DUMMY_WEBHOOK = "http://127.0.0.1:9/rest/1/securitycode/"
WAREHOUSE_KEY = "warehouse-key-8c1f2b7e9d"  # caller `warehouse`: northshop, may name chat7
ERP_KEY = "erp-key-3a6d0c5f41"  # caller `erp`: northshop, no chats of its own
OPS_KEY = "ops-key-b29e7d4c10"  # caller `ops`: admin, no portal to submit to
BODY = {"portal": NORTH, "document_ids": [142, 143], "reason": "Shipment RMA-2291 returned"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


PORTALS_FILE = textwrap.dedent(f"""
    [portals.{NORTH}]
    webhook_url = "{DUMMY_WEBHOOK}"
    chat = "chat1"
    chats = ["chat9"]
    robot_secret = "{ROBOT_SECRET}"

    [portals.{SOUTH}]
    webhook_url = "{DUMMY_WEBHOOK}"
    chat = "chat2"

    [callers.warehouse]
    key_sha256 = "{sha(WAREHOUSE_KEY)}"
    portals = ["{NORTH}"]
    chats = ["chat7"]

    [callers.erp]
    key_sha256 = ["{sha('an-old-erp-key')}", "{sha(ERP_KEY)}"]
    portals = ["{NORTH}"]

    [callers.signer]
    secret = "{WEBHOOK_SECRET}"
    portals = ["{NORTH}"]

    [callers.ops]
    key_sha256 = "{sha(OPS_KEY)}"
    admin = true
""")


@pytest.fixture(scope="module")
def web(redis_proc: devenv.Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gunicorn serving the app (as the Procfile does) on a portals file with four callers; yields its URL."""
    tmp = tmp_path_factory.mktemp("security")
    portals = tmp / "portals.toml"
    portals.write_text(PORTALS_FILE)
    port = devenv.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_"))}
    env.update({"REDIS_URL": redis_proc.url, "B24_PORTALS_FILE": str(portals), "HOST": "127.0.0.1",
                "PORT": str(port), "WEB_CONCURRENCY": "2"})
    proc = devenv.start_web(env, log=tmp / "web.log")
    yield proc.url
    proc.stop()


@pytest.fixture
def http(web: str, redis_conn: redis.Redis) -> Iterator[httpx.Client]:
    """An HTTP client for the web process; Redis is emptied before each test (redis_conn) and after it, so
    the jobs left queued here are never run by a later module's worker."""
    with httpx.Client(base_url=web, timeout=10) as client:
        yield client
    redis_conn.flushdb()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def cancel(http: httpx.Client, key: str, body: dict[str, Any], idempotency_key: str | None = None) -> httpx.Response:
    headers = bearer(key) | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
    return http.post("/v1/cancel", json=body, headers=headers)


def stored(conn: redis.Redis) -> dict[str, int]:
    """What the intake has written: request records, idempotency keys, job hashes and queued jobs."""
    return {"records": len(conn.keys("b24c:req:*")), "idempotency keys": len(conn.keys("b24c:idem:*")),
            "job hashes": len(conn.keys("rq:job:*")), "queued": int(conn.llen("rq:queue:cancel"))}


def nothing_stored() -> dict[str, int]:
    return {"records": 0, "idempotency keys": 0, "job hashes": 0, "queued": 0}


def raw_request(url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[int, Any]:
    """Send exactly these header lines over a socket (an empty value is sent as `Name:`); (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" if value else f"{name}:" for name, value in headers]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload) if payload else None


def test_the_same_key_from_two_callers_makes_two_requests_each_only_its_own(
        http: httpx.Client, redis_conn: redis.Redis) -> None:
    first = cancel(http, WAREHOUSE_KEY, BODY, "rma-2291")
    other = cancel(http, ERP_KEY, BODY, "rma-2291")
    assert (first.status_code, other.status_code) == (202, 202)
    mine, theirs = first.json()["request_id"], other.json()["request_id"]
    assert mine != theirs
    # Each caller's repeat finds its own request, never the other's.
    assert cancel(http, WAREHOUSE_KEY, BODY, "rma-2291").json() == {**first.json(), "duplicate": True}
    assert cancel(http, ERP_KEY, BODY, "rma-2291").json() == {**other.json(), "duplicate": True}
    assert stored(redis_conn) == {"records": 2, "idempotency keys": 2, "job hashes": 2, "queued": 2}
    assert sorted(j.decode() for j in redis_conn.lrange("rq:queue:cancel", 0, -1)) == sorted(
        [f"cancel-{mine}", f"cancel-{theirs}"])

    # Reading another caller's request is answered exactly like an unknown one.
    own = http.get(f"/v1/requests/{mine}", headers=bearer(WAREHOUSE_KEY))
    assert own.status_code == 200 and own.json()["caller"] == "warehouse"
    foreign = http.get(f"/v1/requests/{theirs}", headers=bearer(WAREHOUSE_KEY))
    unknown = http.get(f"/v1/requests/{'0' * 32}", headers=bearer(WAREHOUSE_KEY))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json()
    # An admin sees both.
    assert {http.get(f"/v1/requests/{rid}", headers=bearer(OPS_KEY)).json()["caller"]
            for rid in (mine, theirs)} == {"warehouse", "erp"}


def test_request_ids_are_random_not_derived_from_the_key(http: httpx.Client, redis_conn: redis.Redis) -> None:
    ids = [cancel(http, WAREHOUSE_KEY, BODY, "same-key").json()["request_id"]]
    redis_conn.flushdb()  # the key is forgotten: the same key now makes a new request, with a new id
    ids.append(cancel(http, WAREHOUSE_KEY, BODY, "same-key").json()["request_id"])
    assert ids[0] != ids[1]
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)


def test_a_different_body_under_the_same_key_gets_422_and_writes_nothing(
        http: httpx.Client, redis_conn: redis.Redis) -> None:
    first = cancel(http, WAREHOUSE_KEY, BODY, "rma-7")
    assert first.status_code == 202
    before = stored(redis_conn)
    reused = cancel(http, WAREHOUSE_KEY, {**BODY, "document_ids": [999]}, "rma-7")
    assert reused.status_code == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert "request_id" not in reused.json()  # the first request's id is not handed out
    assert first.json()["request_id"] not in reused.text
    assert stored(redis_conn) == before == {"records": 1, "idempotency keys": 1, "job hashes": 1, "queued": 1}
    assert redis_conn.lrange("rq:queue:cancel", 0, -1) == [f"cancel-{first.json()['request_id']}".encode()]
    # The same body again is still the first request.
    assert cancel(http, WAREHOUSE_KEY, BODY, "rma-7").json()["request_id"] == first.json()["request_id"]


def test_a_signed_request_replayed_with_an_empty_or_junk_authorization_is_one_request(
        web: str, http: httpx.Client, redis_conn: redis.Redis) -> None:
    body = dumps(BODY)
    signed = list(signed_headers(body, "msg_replay_1").items())
    status, answer = raw_request(web, "POST", "/v1/cancel", signed, body)
    assert status == 202, answer
    replays = [
        [*signed, ("Authorization", "")],  # what the review sent: `Authorization:` and no key
        [*signed, ("Authorization", "")],
        [*signed, ("Authorization", "junk")],
        [*signed, ("Authorization", "Bearer not-a-key")],
        [*signed, ("Authorization", f"Bearer {WAREHOUSE_KEY}"), ("Idempotency-Key", "fresh")],
    ]
    for headers in replays:
        again, repeat = raw_request(web, "POST", "/v1/cancel", headers, body)
        assert again == 200 and repeat == {**answer, "duplicate": True}, (headers[-1], again, repeat)
    assert stored(redis_conn) == {"records": 1, "idempotency keys": 1, "job hashes": 1, "queued": 1}
    # A junk signature with a valid bearer key is judged as a (bad) signature: refused, nothing stored.
    forged = [(k, "v1,Zm9yZ2Vk" if k == "webhook-signature" else v) for k, v in signed]
    status, refused = raw_request(web, "POST", "/v1/cancel",
                                  [*forged, ("Authorization", f"Bearer {WAREHOUSE_KEY}")], body)
    assert status == 401 and refused["error"] == "unauthorized"
    assert stored(redis_conn)["records"] == 1


def test_a_signature_does_not_authorize_reads(web: str, http: httpx.Client, redis_conn: redis.Redis) -> None:
    body = dumps(BODY)
    captured = signed_headers(body, "msg_read_1")
    accepted = http.post("/v1/cancel", content=body, headers=captured)
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    empty = signed_headers(b"", "msg_read_2")  # signed over an empty body, as a GET has
    for headers in (captured, empty):
        for path in (f"/v1/requests/{request_id}", "/v1/portals", "/v1/health"):
            answer = http.get(path, headers=headers)
            assert answer.status_code == 401, path
            assert answer.json()["error"] == "unauthorized"
            assert NORTH not in answer.text and SOUTH not in answer.text
    # Even with a valid admin key beside it, a signature on a read is refused.
    assert http.get("/v1/portals", headers={**empty, **bearer(OPS_KEY)}).status_code == 401
    assert stored(redis_conn) == {"records": 1, "idempotency keys": 1, "job hashes": 1, "queued": 1}


@pytest.mark.parametrize("key, chat, why", [
    (WAREHOUSE_KEY, "5", "a user's direct dialog"),
    (WAREHOUSE_KEY, "1", "a user's direct dialog"),
    (WAREHOUSE_KEY, "chat8", "a chat no list allows"),
    (ERP_KEY, "chat7", "another caller's chat"),
    (WAREHOUSE_KEY, "chat2", "another portal's chat"),
])
def test_a_chat_override_that_no_list_allows_is_refused(http: httpx.Client, redis_conn: redis.Redis,
                                                        key: str, chat: str, why: str) -> None:
    answer = cancel(http, key, {**BODY, "chat": chat}, f"chat-{chat}")
    assert answer.status_code == 400, why
    assert answer.json()["field"] == "chat"
    assert stored(redis_conn) == nothing_stored()


def test_a_chat_override_is_allowed_from_the_callers_or_portals_list(http: httpx.Client,
                                                                     redis_conn: redis.Redis) -> None:
    for chat in ("chat1", "chat7", "chat9"):  # the portal's own, the caller's list, the portal's list
        answer = cancel(http, WAREHOUSE_KEY, {**BODY, "chat": chat})
        assert answer.status_code == 202, answer.json()
    assert stored(redis_conn)["queued"] == 3
    assert cancel(http, ERP_KEY, {**BODY, "chat": "chat9"}).status_code == 202  # the portal's list: anyone's


def test_a_caller_cannot_submit_to_or_probe_a_portal_it_lacks(http: httpx.Client, redis_conn: redis.Redis) -> None:
    theirs = cancel(http, WAREHOUSE_KEY, {**BODY, "portal": SOUTH})
    missing = cancel(http, WAREHOUSE_KEY, {**BODY, "portal": "nosuchshop"})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["message"].replace(SOUTH, "X") == missing.json()["message"].replace("nosuchshop", "X")
    assert cancel(http, OPS_KEY, BODY).status_code == 404  # admin reads everything, but submits to its portals only
    assert stored(redis_conn) == nothing_stored()
    # Its only portal is chosen when it names none.
    assert cancel(http, WAREHOUSE_KEY, {"document_ids": [5]}).status_code == 202


def test_only_admins_see_portals_and_health_details(http: httpx.Client, redis_conn: redis.Redis) -> None:
    for path in ("/v1/portals", "/v1/health"):
        assert http.get(path).status_code == 401
        refused = http.get(path, headers=bearer(WAREHOUSE_KEY))
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        assert NORTH not in refused.text and SOUTH not in refused.text
    listed = http.get("/v1/portals", headers=bearer(OPS_KEY)).json()
    assert [p["name"] for p in listed["portals"]] == [NORTH, SOUTH]
    assert "securitycode" not in json.dumps(listed)
    details = http.get("/v1/health", headers=bearer(OPS_KEY)).json()
    assert details["queue_depth"] == {"cancel": 0, "notify": 0} and "workers" in details
    assert stored(redis_conn) == nothing_stored()


def test_liveness_and_readiness_name_nothing_without_credentials(http: httpx.Client) -> None:
    live, ready = http.get("/healthz"), http.get("/readyz")
    assert (live.status_code, ready.status_code) == (200, 200)
    assert live.json() == {"status": "ok"}
    assert ready.json() == {"status": "ready"}
    for answer in (live, ready):
        assert NORTH not in answer.text and SOUTH not in answer.text


def test_requests_bitrix24_made_belong_to_no_caller(http: httpx.Client, redis_conn: redis.Redis) -> None:
    robot = http.post(f"/v1/bitrix24/robot?portal={NORTH}&key={ROBOT_SECRET}&document_ids=42",
                      data={"document_id[]": ["crm", "CCrmDocumentDeal", "DEAL_1"]})
    assert robot.status_code == 202
    request_id = robot.json()["request_id"]
    for key in (WAREHOUSE_KEY, ERP_KEY):
        assert http.get(f"/v1/requests/{request_id}", headers=bearer(key)).status_code == 404
    seen = http.get(f"/v1/requests/{request_id}", headers=bearer(OPS_KEY)).json()
    assert (seen["source"], seen["caller"]) == ("robot", None)
    assert stored(redis_conn) == {"records": 1, "idempotency keys": 1, "job hashes": 1, "queued": 1}
    # The robot URL may name only the portal's chats: it has no caller whose list could allow more.
    robot_url = f"/v1/bitrix24/robot?portal={NORTH}&key={ROBOT_SECRET}&document_ids=43&chat="
    assert http.post(robot_url + "chat7").status_code == 400
    assert http.post(robot_url + "5").status_code == 400
    assert stored(redis_conn)["records"] == 1
    assert http.post(robot_url + "chat9").status_code == 202


def test_a_rotated_key_works_while_both_hashes_are_listed(http: httpx.Client, redis_conn: redis.Redis) -> None:
    assert cancel(http, "an-old-erp-key", BODY).status_code == 202  # the old key, still listed
    assert cancel(http, ERP_KEY, BODY).status_code == 202  # the new one
    assert cancel(http, "erp-key-3a6d0c5f4", BODY).status_code == 401  # one character short
    assert stored(redis_conn)["records"] == 2
    dump = b"".join(redis_conn.dump(key) or b"" for key in redis_conn.keys("*"))
    assert ERP_KEY.encode() not in dump and b"an-old-erp-key" not in dump  # keys are never stored
