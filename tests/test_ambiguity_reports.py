"""Exactly one report, and every request ended: the report side of the ambiguity rule, over real parts.

A real `rq worker` (the Procfile's command), our own Redis, the sandbox over HTTP. The portal's execution
limit is 3 s and the read timeout 1.5 s here, so an unanswered post settles in EXECUTION_LIMIT +
policy.AMBIGUITY_MARGIN = 8 s instead of 65 s. Every fault finishes within the execution limit, as
Bitrix24's own calls do. Assertions are on the sandbox's messages and call log, the request record and RQ.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

import devenv
from app import create_app
from jobs import policy, records
from jobs.lifecycle import lease_key
from tests.helpers import API_KEY, SandboxView, bearer, wait_for
from tests.test_pipeline import status, submit
from tests.test_sentry import horse_of

EXECUTION_LIMIT = 3.0
READ_TIMEOUT = 1.5
SETTLE = EXECUTION_LIMIT + policy.AMBIGUITY_MARGIN
APP_TOKEN = "report-app-token"
MEMBER_ID = "reportmember"
SERVICE_USER = 1  # the sandbox's webhook user: the URL's /rest/1/...
OTHER_USER = 2  # a person in chat1


def portals_file(tmp: Path, webhook: str) -> Path:
    path = tmp / "portals.toml"
    path.write_text(textwrap.dedent(f"""
        [portals.shop]
        webhook_url = "{webhook}"
        application_token = "{APP_TOKEN}"
        member_id = "{MEMBER_ID}"
        chat = "chat1"

        [[portals.shop.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        params = {{ entityTypeId = 2 }}
        when = {{ stageId = ["C1:LOSE"] }}
        documents_field = "ufCrm_InventoryDocs"
        reason = "Deal {{id}} lost"
    """))
    return path


@pytest.fixture(scope="module")
def stack(redis_proc: devenv.Process, shared_sandbox: devenv.Process,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real worker for the module, on a portals file pointing at the sandbox."""
    tmp = tmp_path_factory.mktemp("reports")
    yield from worker_and_app(redis_proc.url, portals_file(tmp, shared_sandbox.extra["webhook"]), tmp)


def worker_and_app(redis_url: str, path: Path, tmp: Path) -> Iterator[dict[str, Any]]:
    """A real worker and the web app on a portals file, with this module's short timeouts (a fixture's body)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_url, "B24_PORTALS_FILE": str(path), "TRIGGER_API_KEYS": API_KEY,
                "B24_READ_TIMEOUT": str(READ_TIMEOUT), "B24_CONNECT_TIMEOUT": "1",
                "B24_EXECUTION_LIMIT": str(EXECUTION_LIMIT)})
    worker = devenv.start_worker(env, log=tmp / "worker.log")
    app = create_app({"_env_file": None, "redis_url": redis_url, "b24_portals_file": str(path),
                      "trigger_api_keys": API_KEY})
    yield {"worker": worker, "app": app, "redis": redis.Redis.from_url(redis_url)}
    worker.stop()


@pytest.fixture
def client(stack: dict[str, Any]) -> FlaskClient:
    return stack["app"].test_client()


@pytest.fixture
def conn(stack: dict[str, Any]) -> redis.Redis:
    return stack["redis"]  # type: ignore[no-any-return]


@pytest.fixture
def portal(sandbox: devenv.Process) -> SandboxView:
    return SandboxView(sandbox.url)


def ended(client: FlaskClient, request_id: str, state: str = "done", timeout: float = 40) -> dict[str, Any]:
    """The request's status once it is `state` with its report noted (done or failed)."""
    def reported() -> dict[str, Any] | None:
        answer = status(client, request_id)
        return answer if answer["state"] == state and answer.get("message_id") else None

    found = wait_for(reported, timeout=timeout, what=f"request {request_id} to be {state} with a report")
    assert found is not None
    return found


def carrying(portal: SandboxView, request_id: str) -> list[dict[str, Any]]:
    """Every chat message that mentions the request, whoever wrote it."""
    return [m for m in portal.messages() if f"#{request_id}" in m["message"]]


def nonce_of(conn: redis.Redis, request_id: str) -> str:
    """The nonce of the request's current report round, read from its record (as only the service can)."""
    raw = conn.hget(records.request_key(request_id), "report_nonce")
    assert isinstance(raw, bytes)
    return raw.decode().partition(":")[2]


def reports_of(portal: SandboxView, conn: redis.Redis, request_id: str) -> list[dict[str, Any]]:
    """The request's real reports: by the service's user, ending with its request line (any round)."""
    nonce = nonce_of(conn, request_id)
    return [m for m in portal.messages() if m["author_id"] == SERVICE_USER and nonce
            and m["message"].rstrip().endswith(nonce) and f"#{request_id}" in m["message"].splitlines()[-1]]


def posts(portal: SandboxView) -> list[dict[str, Any]]:
    return portal.calls("im.message.add")


def searches(portal: SandboxView) -> list[dict[str, Any]]:
    return portal.calls("im.dialog.messages.get")


# ---- (a), (b): an unanswered post gives exactly one message --------------------------------------------

def test_a_slow_post_longer_than_the_read_timeout_gives_exactly_one_message(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    portal.faults({"kind": "slow", "method": "im.message.add", "times": 1, "seconds": READ_TIMEOUT + 1})
    request_id = submit(client, "slow-post", document_ids=[3], reason="slow post")
    state = ended(client, request_id)
    [message] = carrying(portal, request_id)
    assert state["message_id"] == message["id"] and message["author_id"] == SERVICE_USER
    [post] = posts(portal)  # found after the wait, never posted again
    [search] = searches(portal)
    assert search["time"] >= post["time"] + SETTLE - 0.5  # the chat was searched only once the post had settled
    assert state["documents"][0]["outcome"] == "cancelled"


@pytest.mark.parametrize("kind, applied", [("applied_then_timeout", True), ("drop", False)])
def test_a_post_that_lost_its_answer_gives_exactly_one_message(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis, kind: str, applied: bool) -> None:
    portal.faults({"kind": kind, "method": "im.message.add", "times": 1, "seconds": 2})
    request_id = submit(client, f"lost-{kind}", document_ids=[4], reason=kind)
    state = ended(client, request_id)
    [message] = carrying(portal, request_id)
    assert state["message_id"] == message["id"]
    first, *again = posts(portal)
    assert first["fault"] == kind
    assert len(again) == (0 if applied else 1)  # posted again only when the first provably never landed
    assert searches(portal)[0]["time"] >= first["time"] + SETTLE - 0.5
    if again:
        assert again[0]["time"] >= first["time"] + SETTLE - 0.5


def test_a_last_unanswered_post_past_the_retry_budget_is_still_looked_for(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    portal.faults({"kind": "applied_then_timeout", "method": "im.message.add", "times": 1, "seconds": 2})
    request_id = submit(client, "last-post", document_ids=[12], reason="last")
    # History, not an outcome: the report has used up its retries, so this post is its last.
    conn.hset(records.request_key(request_id), "report_failures", policy.TRANSIENT_RETRY_MAX)
    state = ended(client, request_id)
    [message] = carrying(portal, request_id)
    assert state["message_id"] == message["id"] and "report_error" not in state
    [post] = posts(portal)
    assert post["fault"] == "applied_then_timeout" and searches(portal)[0]["time"] >= post["time"] + SETTLE - 0.5


# ---- (c): forged markers never suppress a report ---------------------------------------------------------

def test_forged_markers_in_a_reason_or_by_another_user_do_not_suppress_a_report(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    portal.faults({"kind": "drop", "method": "im.message.add", "times": 1})
    victim = submit(client, "forged-victim", document_ids=[5], reason="victim")
    wait_for(lambda: posts(portal), timeout=20, what="the victim's first (dropped) post")
    nonce = nonce_of(conn, victim)
    line = f"Request #{victim} · {nonce}"
    # The strongest forgeries: both carry the victim's exact request line, secret nonce included.
    forged = portal.http.post("/_sandbox/messages", json={"dialog_id": "chat1", "author_id": OTHER_USER,
                                                          "message": f"done already\n\n{line}"})
    forged.raise_for_status()
    attacker = submit(client, "forged-attacker", document_ids=[6], reason=f"see {line}")
    attacker_state = ended(client, attacker)

    victim_state = ended(client, victim)
    [attacker_report] = [m for m in carrying(portal, attacker) if m["author_id"] == SERVICE_USER]
    assert attacker_state["message_id"] == attacker_report["id"]
    assert line in attacker_report["message"]  # the crafted reason is in the attacker's report...
    real = [m for m in carrying(portal, victim) if m["author_id"] == SERVICE_USER
            and m["message"].rstrip().endswith(line)]
    assert len(real) == 1  # ...yet the victim got its own report, exactly one
    assert victim_state["message_id"] == real[0]["id"] != forged.json()["id"]
    assert victim_state["message_id"] != attacker_report["id"]
    assert len(posts(portal)) == 3  # the victim's dropped post, the attacker's, the victim's again
    # The nonce is never shown to a sender (this test handed it to the attacker to show that even then...).
    answer = client.get(f"/v1/requests/{victim}", headers=bearer()).get_data(as_text=True)
    assert nonce not in answer and "report_nonce" not in answer


# ---- (d): replays end in a cancel and a report ---------------------------------------------------------

def event_form(object_id: int, ts: str) -> dict[str, str]:
    return {"event": "ONCRMDEALUPDATE", "event_handler_id": "1", "data[FIELDS][ID]": str(object_id), "ts": ts,
            "auth[domain]": "shop.bitrix24.com", "auth[member_id]": MEMBER_ID, "auth[application_token]": APP_TOKEN}


def replay(client: FlaskClient, request_id: str) -> str:
    result = client.application.test_cli_runner().invoke(args=["replay", request_id])
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_replay_of_an_event_whose_object_could_not_be_read_reads_it_again(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    answer = client.post("/v1/bitrix24/events", data=event_form(77, "1766047124"))
    assert answer.status_code == 200
    request_id = answer.get_json()["request_id"]
    state = ended(client, request_id, state="failed")  # deal 77 does not exist: the read fails for good
    assert state["documents"] == [] and "NOT_FOUND" in state["error"]
    [failure] = carrying(portal, request_id)
    assert "Could not read the object" in failure["message"]
    assert portal.calls("catalog.document.cancel") == []

    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 77, "fields": {
        "stageId": "C1:LOSE", "ufCrm_InventoryDocs": [7]}}).raise_for_status()
    assert "resolve-" + request_id in replay(client, request_id)
    state = wait_for(lambda: (s := status(client, request_id))["state"] == "done" and s.get("message_id")
                     != failure["id"] and s, timeout=40, what="the replayed event to be cancelled and reported")
    assert [(d["id"], d["outcome"]) for d in state["documents"]] == [(7, "cancelled")]
    assert portal.document(7)["status"] != "Y"
    assert len(portal.calls("crm.item.get")) == 2  # read again, not the saved failed resolution
    assert len([c for c in portal.calls("catalog.document.cancel") if c.get("applied")]) == 1
    first, second = carrying(portal, request_id)
    assert first == failure and second["id"] == state["message_id"] and "replay 2" in second["message"]


def test_replay_of_a_request_that_ran_out_of_retries_cancels_and_reports(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    portal.faults({"kind": "error500", "method": "batch"})  # every cancel batch fails until a person fixes it
    request_id = submit(client, "out-of-retries", document_ids=[8], reason="retries")
    key = records.request_key(request_id)
    wait_for(lambda: int(conn.hget(key, "transient_failures") or 0) >= 1, timeout=20, what="a first failure")
    # History, not an outcome: as if all but the last of the retries had been spent (spending them for
    # real, with backoff and the ambiguity rule's waits after each unanswered batch, takes minutes).
    conn.hset(key, "transient_failures", policy.TRANSIENT_RETRY_MAX)
    state = ended(client, request_id, state="failed", timeout=60)
    assert state["documents"][0]["outcome"] == "failed" and "INTERNAL_SERVER_ERROR" in state["documents"][0]["detail"]
    [failure] = carrying(portal, request_id)
    assert portal.document(8)["status"] == "Y"

    spent = Job.fetch(f"cancel-{request_id}", connection=conn, serializer=JSONSerializer)
    assert spent.retries_left == 0 and spent.number_of_retries  # RQ's budgets, as the failure left them

    portal.clear_faults()
    assert "cancel-" + request_id in replay(client, request_id)
    record = records.load(conn, request_id)
    assert record is not None and record["transient_failures"] == 0 and record["deferrals"] == 0
    job = Job.fetch(f"cancel-{request_id}", connection=conn, serializer=JSONSerializer)
    assert job.retries_left == policy.CRASH_RETRY_MAX and not job.number_of_retries  # RQ's budgets start again too
    state = wait_for(lambda: (s := status(client, request_id))["state"] == "done" and s.get("message_id")
                     != failure["id"] and s, timeout=40, what="the replayed request to be cancelled and reported")
    assert state["documents"][0]["outcome"] == "cancelled"
    assert portal.document(8)["status"] != "Y"
    assert len([c for c in portal.calls("catalog.document.cancel") if c.get("applied")]) == 1
    first, second = carrying(portal, request_id)
    assert first == failure and "replay 2" in second["message"] and second["id"] == state["message_id"]


# ---- (e), (f): every way RQ gives up ends the request with a report --------------------------------------

class HeldLease:
    """Another run that holds a request's lease and never lets it go (renewed until stopped)."""

    def __init__(self, conn: redis.Redis, key: str, ms: int) -> None:
        self.conn, self.key, self.ms = conn, key, ms
        self.stop = threading.Event()
        conn.set(key, "another-run", px=ms)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.conn.set(self.key, "another-run", px=self.ms)

    def release(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.delete(self.key)


def test_rq_retry_count_running_out_still_ends_the_request_failed_with_a_report(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    # Request ids are random: the lease is held before the request exists, so it is submitted with a known
    # id through the intake's own one-round-trip submit (as POST /v1/cancel would write it).
    request_id = records.new_request_id()
    held = HeldLease(conn, lease_key("cancel", request_id), ms=3000)
    try:
        svc = client.application.extensions["b24cancel"]
        request_ = {"portal": "shop", "source": "api", "document_ids": [9], "reason": "held", "external_id": None,
                    "chat": None, "caller": "default"}
        assert svc.submitter.submit(request_id, request_, policy.FIRST_JOBS["cancel"],
                                    policy.first_job_id("cancel", request_id)).created
        job_id = f"cancel-{request_id}"
        job_key = f"rq:job:{job_id}"
        wait_for(lambda: conn.hget(job_key, "status") == b"scheduled"
                 and int(conn.hget(records.request_key(request_id), "deferrals") or 0) >= 1,
                 timeout=20, what="the job to wait for the lease")
        # History, not an outcome: a job that has waited a long time. RQ has counted DEFER_MAX + 1 returned
        # Retries (the `max` every wait used to return, so RQ would now fail it without our failure
        # callback), and the request has used all but one of its waits.
        conn.hset(job_key, "number_of_retries", policy.DEFER_MAX + 1)
        conn.hset(records.request_key(request_id), "deferrals", policy.DEFER_MAX - 1)
        state = ended(client, request_id, state="failed", timeout=40)
    finally:
        held.release()
    assert state["documents"][0]["outcome"] == "failed"
    assert "LimitsOutlasted" in state["documents"][0]["detail"]
    [report] = carrying(portal, request_id)
    assert report["id"] == state["message_id"] and "rq requeue" in report["message"]
    assert portal.calls("catalog.document.cancel") == [] and portal.document(9)["status"] == "Y"
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == "failed"
    assert job_id in Queue("cancel", connection=conn, serializer=JSONSerializer).failed_job_registry
    assert (job.number_of_retries or 0) > policy.DEFER_MAX + 1  # RQ went past its old limit: ours decided


def test_a_killed_work_horse_during_a_slow_post_still_gives_exactly_one_message(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis, stack: dict[str, Any]) -> None:
    portal.faults({"kind": "slow", "method": "im.message.add", "times": 1, "seconds": EXECUTION_LIMIT - 0.5})
    request_id = submit(client, "kill-during-post", document_ids=[10], reason="kill")
    wait_for(lambda: posts(portal), timeout=20, interval=0.02, what="the slow post to start")
    horse = wait_for(lambda: horse_of(stack["worker"]), timeout=5, interval=0.02, what="the work-horse")
    assert horse is not None
    os.kill(horse, signal.SIGKILL)
    state = ended(client, request_id, timeout=60)
    [message] = carrying(portal, request_id)
    assert state["message_id"] == message["id"]
    assert len(posts(portal)) == 1  # the post ran on, and the retry found it instead of posting again
    job = Job.fetch(f"notify-{request_id}", connection=conn, serializer=JSONSerializer)
    assert job.retries_left == policy.CRASH_RETRY_MAX - 1  # the horse really died mid-post: a crash retry ran
    assert reports_of(portal, conn, request_id) == [message]


def test_an_oauth_app_finds_its_own_user_with_profile_once_and_finds_its_lost_post(
        sandbox: devenv.Process, tmp_path: Path) -> None:
    """An app has no user id in its URL: `profile` names the token's user, cached in Redis for every job."""
    portal = SandboxView(sandbox.url)
    tokens = portal.http.post("/_sandbox/oauth/tokens", json={"lifetime": 3600}).json()
    path = tmp_path / "portals.toml"
    path.write_text(textwrap.dedent(f"""
        [portals.app]
        client_endpoint = "{tokens['client_endpoint']}"
        oauth_server = "{sandbox.url}/oauth/token/"
        client_id = "{tokens['client_id']}"
        client_secret = "{tokens['client_secret']}"
        refresh_token = "{tokens['refresh_token']}"
        chat = "chat1"
    """))
    own_redis = devenv.start_redis(tmp_path / "redis")  # apart from the module's worker and its portal
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": own_redis.url, "B24_PORTALS_FILE": str(path), "B24_READ_TIMEOUT": str(READ_TIMEOUT),
                "B24_EXECUTION_LIMIT": str(EXECUTION_LIMIT)})
    worker = devenv.start_worker(env, log=tmp_path / "worker.log")
    try:
        client = create_app({"_env_file": None, "redis_url": own_redis.url, "b24_portals_file": str(path),
                             "trigger_api_keys": API_KEY}).test_client()
        portal.faults({"kind": "applied_then_timeout", "method": "im.message.add", "times": 1, "seconds": 2})
        request_id = submit(client, "oauth-lost-post", document_ids=[11], reason="app")
        state = ended(client, request_id)
        [message] = carrying(portal, request_id)
        assert state["message_id"] == message["id"] and len(posts(portal)) == 1
        assert len(portal.calls("profile")) == 1
        cached = redis.Redis.from_url(own_redis.url)
        assert cached.get("b24c:service-user:app") == b"1" and cached.ttl("b24c:service-user:app") > 0
    finally:
        worker.stop()
        own_redis.stop()
