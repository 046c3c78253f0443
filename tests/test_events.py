"""Bitrix24 outgoing events and the portals file: intake checks, and rules end to end over real parts."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient

import devenv
from app import create_app
from jobs import records
from settings import SettingsError, load_settings
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

SHOP_TOKEN = "shop-app-token-1"
OTHER_TOKEN = "other-app-token-2"
METRICS_TOKEN = "events-metrics-token"


def portals_toml(shop_url: str, other_url: str = "https://other.bitrix24.com/rest/1/othercode/") -> str:
    return textwrap.dedent(f"""
        [portals.shop]
        webhook_url = "{shop_url}"
        application_token = "{SHOP_TOKEN}"
        member_id = "shopmember"
        chat = "chat1"
        robot_secret = "shop-robot"

        [[portals.shop.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        params = {{ entityTypeId = 2 }}
        when = {{ stageId = ["C1:LOSE", "C1:APOLOGY"] }}
        documents_field = "ufCrm_InventoryDocs"
        reason = "Deal {{id}} moved to {{stageId}}"

        [[portals.shop.rules]]
        event = "ONSHIPMENTENTITYSAVED"
        read = "sale.shipment.get"
        when = {{ deducted = "N" }}
        documents_by = {{ docNumber = "{{accountNumber}}" }}
        reason = "Shipment {{id}} returned"

        [portals.other]
        webhook_url = "{other_url}"
        application_token = "{OTHER_TOKEN}"
        member_id = "othermember"
        chat = "chat5"
    """)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portals.toml"
    path.write_text(text)
    return path


# ---- the portals file -------------------------------------------------------------------------------

def test_portals_file_defines_portals_with_rules(tmp_path: Path) -> None:
    settings = load_settings(_env_file=None, b24_portals_file=str(write(tmp_path, portals_toml(
        "https://shop.bitrix24.com/rest/1/shopcode/"))))
    assert sorted(settings.portals) == ["other", "shop"]
    assert len(settings.portals["shop"].rules) == 2
    assert settings.portal_for_event("shopmember", None).name == "shop"  # type: ignore[union-attr]
    assert settings.portal_for_event(None, "other.bitrix24.com").name == "other"  # type: ignore[union-attr]
    assert settings.portal(None) is None  # two portals: a name is needed


@pytest.mark.parametrize("text, expected", [
    ('[portals.a]\nwebhook_url = "https://a.bitrix24.com/rest/1/x/"\nchat = "chat1"\ncolour = "red"\n',
     "portals.a.colour: unknown key"),
    ('[portals.a]\nwebhook_url = "https://a/rest/x/"\nchat = "chat1"\n', "portals.a.webhook_url"),
    (('[portals.a]\nwebhook_url = "https://a.bitrix24.com/rest/1/x/"\nchat = "chat1"\n'
      '[portals.a]\nchat = "chat2"\n'), "not valid TOML"),
    (('[portals.a]\nwebhook_url = "https://a.bitrix24.com/rest/1/x/"\nchat = "chat1"\n'
      '[portals.A]\nwebhook_url = "https://b.bitrix24.com/rest/1/y/"\nchat = "chat1"\n'), "duplicates"),
    (('[portals.a]\nwebhook_url = "https://a.bitrix24.com/rest/1/x/"\nchat = "chat1"\n'
      '[[portals.a.rules]]\nevent = "X"\nread = "crm.item.get"\n'), "documents_field or documents_by"),
])
def test_bad_portals_file_fails_with_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None, b24_portals_file=str(write(tmp_path, text)))
    assert expected in str(info.value)
    assert "/rest/1/x/" not in str(info.value)


def test_portals_file_and_single_portal_variables_together_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, portals_toml("https://shop.bitrix24.com/rest/1/shopcode/"))
    with pytest.raises(SettingsError, match="not both"):
        load_settings(_env_file=None, b24_portals_file=str(path), b24_webhook_url="https://a.bitrix24.com/rest/1/x/",
                      b24_chat_id="chat1")


# ---- the events endpoint over the Flask test client --------------------------------------------------

@pytest.fixture
def events_client(tmp_path: Path, redis_conn: redis.Redis, redis_url: str) -> FlaskClient:
    path = write(tmp_path, portals_toml("https://shop.bitrix24.com/rest/1/shopcode/"))
    app = create_app({"_env_file": None, "redis_url": redis_url, "b24_portals_file": str(path),
                      "trigger_api_keys": API_KEY, "metrics_token": METRICS_TOKEN})
    return app.test_client()


def event_form(event: str = "ONCRMDEALUPDATE", object_id: str = "12", token: str = SHOP_TOKEN,
               member_id: str = "shopmember", ts: str = "1766047124") -> dict[str, str]:
    return {"event": event, "event_handler_id": "975", "data[FIELDS][ID]": object_id, "ts": ts,
            "auth[domain]": "shop.bitrix24.com", "auth[client_endpoint]": "https://shop.bitrix24.com/rest/",
            "auth[server_endpoint]": "https://oauth.bitrix.info/rest/", "auth[member_id]": member_id,
            "auth[application_token]": token}


def jobs_in(conn: redis.Redis) -> list[bytes]:
    return list(conn.lrange("rq:queue:cancel", 0, -1))


def test_wrong_or_foreign_token_and_unknown_portal_get_the_same_401(events_client: FlaskClient,
                                                                    redis_conn: redis.Redis) -> None:
    wrong = events_client.post("/v1/bitrix24/events", data=event_form(token="nope"))
    foreign = events_client.post("/v1/bitrix24/events", data=event_form(token=OTHER_TOKEN))
    unknown = events_client.post("/v1/bitrix24/events", data=event_form(member_id="stranger"))
    missing = events_client.post("/v1/bitrix24/events", data={k: v for k, v in event_form().items()
                                                               if k != "auth[application_token]"})
    for response in (wrong, foreign, unknown, missing):
        assert response.status_code == 401
    assert wrong.get_json() == unknown.get_json() == foreign.get_json()
    assert jobs_in(redis_conn) == []


def test_event_without_a_rule_is_counted_and_enqueues_nothing(events_client: FlaskClient,
                                                             redis_conn: redis.Redis) -> None:
    response = events_client.post("/v1/bitrix24/events", data=event_form(event="ONCRMCONTACTADD"))
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored"
    assert jobs_in(redis_conn) == []
    metrics = events_client.get("/metrics", headers=bearer(METRICS_TOKEN)).get_data(as_text=True)
    # Counted under "other": names no rule names never become label values.
    assert 'b24cancel_events_total{event="other",portal="shop",result="no_rule"}' in metrics
    assert "ONCRMCONTACTADD" not in metrics


def test_repeat_delivery_is_one_request(events_client: FlaskClient, redis_conn: redis.Redis) -> None:
    first = events_client.post("/v1/bitrix24/events", data=event_form())
    again = events_client.post("/v1/bitrix24/events", data=event_form())
    later = events_client.post("/v1/bitrix24/events", data=event_form(ts="1766047999"))
    assert first.status_code == again.status_code == later.status_code == 200
    assert first.get_json()["request_id"] == again.get_json()["request_id"] != later.get_json()["request_id"]
    assert len(jobs_in(redis_conn)) == 2


def test_events_must_be_form_encoded(events_client: FlaskClient) -> None:
    assert events_client.post("/v1/bitrix24/events", json=event_form()).status_code == 415


def test_portals_list_names_and_health_without_secrets(events_client: FlaskClient) -> None:
    assert events_client.get("/v1/portals").status_code == 401
    body = events_client.get("/v1/portals", headers=bearer())
    text = body.get_data(as_text=True)
    assert [p["name"] for p in body.get_json()["portals"]] == ["shop", "other"]
    for secret in ("shopcode", "othercode", SHOP_TOKEN, OTHER_TOKEN, "shop-robot"):
        assert secret not in text
    assert body.get_json()["portals"][0]["url"] == "https://shop.bitrix24.com/rest/1/****/"


# ---- end to end: the sandbox fires real events at a real web process ---------------------------------

@pytest.fixture
def stack(redis_proc: devenv.Process, sandbox: devenv.Process, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """gunicorn web + one worker on the portals file, pointed at the sandbox."""
    redis.Redis.from_url(redis_proc.url).flushdb()
    path = write(tmp_path, portals_toml(sandbox.extra["webhook"]).replace("shopmember", member_id(sandbox)))
    port = devenv.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_proc.url, "B24_PORTALS_FILE": str(path), "TRIGGER_API_KEYS": API_KEY,
                "HOST": "127.0.0.1", "PORT": str(port), "B24_READ_TIMEOUT": "2", "WEB_CONCURRENCY": "2",
                "B24_RATE_LIMIT": "1000", "B24_RATE_BURST": "1000"})
    web = devenv.start_web(env, log=tmp_path / "web.log")
    worker = devenv.start_worker(env, log=tmp_path / "worker.log")
    yield {"url": f"http://127.0.0.1:{port}", "portal": SandboxView(sandbox.url), "redis": redis_proc.url}
    worker.stop()
    web.stop()


def member_id(sandbox: devenv.Process) -> str:
    return str(httpx.get(f"{sandbox.url}/_sandbox/config", timeout=5).json()["member_id"])


def fire(portal: SandboxView, url: str, event: str, object_id: int, ts: int | None = None,
         token: str = SHOP_TOKEN) -> dict[str, Any]:
    body = {"url": f"{url}/v1/bitrix24/events", "event": event, "id": object_id, "application_token": token}
    if ts is not None:
        body["ts"] = ts
    return portal.http.post("/_sandbox/events/send", json=body).raise_for_status().json()  # type: ignore[no-any-return]


def request_status(url: str, request_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/requests/{request_id}", headers=bearer(), timeout=5).json()  # type: ignore[no-any-return]


def test_lost_deal_event_cancels_its_documents_and_explains_the_rule(stack: dict[str, Any]) -> None:
    portal: SandboxView = stack["portal"]
    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 12, "fields": {
        "stageId": "C1:LOSE", "ufCrm_InventoryDocs": [3, 4]}}).raise_for_status()
    sent = fire(portal, stack["url"], "ONCRMDEALUPDATE", 12, ts=1766047124)
    assert sent["status"] == 200
    request_id = httpx.Response(200, text=sent["body"]).json()["request_id"]
    state = wait_for(lambda: (s := request_status(stack["url"], request_id))["state"] == "done" and s.get("message_id")
                     and s, timeout=40, what="the event's request to finish")
    assert {d["id"]: d["outcome"] for d in state["documents"]} == {3: "cancelled", 4: "cancelled"}
    assert portal.document(3)["status"] != "Y" and portal.document(4)["status"] != "Y"
    rule = state["resolution"]["rules"][0]
    assert rule["matched"] is True
    assert rule["when"]["stageId"]["value"] == "C1:LOSE"
    assert state["reason"] == "Deal 12 moved to C1:LOSE"
    messages = [m for m in portal.messages() if request_id in m["message"]]
    assert len(messages) == 1
    assert "/crm/deal/details/12/" in messages[0]["message"]
    assert "ONCRMDEALUPDATE" in messages[0]["message"]

    again = fire(portal, stack["url"], "ONCRMDEALUPDATE", 12, ts=1766047124)
    assert httpx.Response(200, text=again["body"]).json()["request_id"] == request_id
    assert len([m for m in portal.messages() if request_id in m["message"]]) == 1


def test_deal_in_another_stage_cancels_nothing(stack: dict[str, Any]) -> None:
    portal: SandboxView = stack["portal"]
    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 13, "fields": {
        "stageId": "C1:WON", "ufCrm_InventoryDocs": [5]}}).raise_for_status()
    sent = fire(portal, stack["url"], "ONCRMDEALUPDATE", 13)
    request_id = httpx.Response(200, text=sent["body"]).json()["request_id"]
    state = wait_for(lambda: (s := request_status(stack["url"], request_id))["state"] == "done" and s,
                     timeout=30, what="resolution")
    assert state["documents"] == []
    assert state["resolution"]["rules"][0]["matched"] is False
    assert portal.document(5)["status"] == "Y"
    assert portal.calls("catalog.document.cancel") == []
    assert portal.messages() == []
    conn = redis.Redis.from_url(stack["redis"])
    assert conn.exists(f"rq:job:cancel-{request_id}") == 0


def test_returned_shipment_is_found_by_document_number(stack: dict[str, Any]) -> None:
    portal: SandboxView = stack["portal"]
    number = portal.document(6)["docNumber"]
    portal.http.post("/_sandbox/sale/shipments", json={"id": 7, "fields": {
        "deducted": "N", "accountNumber": number}}).raise_for_status()
    sent = fire(portal, stack["url"], "ONSHIPMENTENTITYSAVED", 7)
    request_id = httpx.Response(200, text=sent["body"]).json()["request_id"]
    state = wait_for(lambda: (s := request_status(stack["url"], request_id))["state"] == "done" and s,
                     timeout=40, what="the shipment's request")
    assert [(d["id"], d["outcome"]) for d in state["documents"]] == [(6, "cancelled")]
    assert state["reason"] == "Shipment 7 returned"


def test_token_of_another_portal_is_refused_end_to_end(stack: dict[str, Any]) -> None:
    portal: SandboxView = stack["portal"]
    sent = fire(portal, stack["url"], "ONCRMDEALUPDATE", 12, token=OTHER_TOKEN)
    assert sent["status"] == 401


def test_a_burst_of_300_events_is_all_accepted_and_all_resolved(stack: dict[str, Any]) -> None:
    """300 events at once from 32 connections: every one answered 2xx and resolved (timing: bench/events.py)."""
    from concurrent.futures import ThreadPoolExecutor

    portal: SandboxView = stack["portal"]
    portal.config(rate=10_000, burst=10_000)  # this test is about our intake, not the portal's limits
    conn = redis.Redis.from_url(stack["redis"])
    for n in range(300):
        portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 1000 + n,
                                                      "fields": {"stageId": "C1:WON"}}).raise_for_status()
    forms = [event_form(object_id=str(1000 + n), member_id=member_id_of(portal), ts=str(1766000000 + n))
             for n in range(300)]
    with httpx.Client(base_url=stack["url"], timeout=10,
                      limits=httpx.Limits(max_connections=32)) as http, ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda form: http.post("/v1/bitrix24/events", data=form), forms))
    assert [a.status_code for a in answers] == [200] * 300
    ids = {a.json()["request_id"] for a in answers}
    assert len(ids) == 300

    def resolved() -> bool:
        return all((records.load(conn, rid) or {}).get("state") == "done" for rid in ids)

    wait_for(resolved, timeout=120, interval=1, what="all 300 events to be resolved")
    assert portal.calls("catalog.document.cancel") == []


def member_id_of(portal: SandboxView) -> str:
    return str(portal.http.get("/_sandbox/config").json()["member_id"])


def test_events_without_a_timestamp_are_refused(events_client: FlaskClient, redis_conn: redis.Redis) -> None:
    form = {k: v for k, v in event_form().items() if k != "ts"}
    response = events_client.post("/v1/bitrix24/events", data=form)
    assert response.status_code == 400 and response.get_json()["field"] == "ts"
    assert jobs_in(redis_conn) == []


def test_an_object_that_cannot_be_read_is_reported_in_the_chat(stack: dict[str, Any]) -> None:
    portal: SandboxView = stack["portal"]
    portal.permissions(scopes=["catalog", "im"])  # the webhook lost the crm scope
    sent = fire(portal, stack["url"], "ONCRMDEALUPDATE", 12)
    request_id = httpx.Response(200, text=sent["body"]).json()["request_id"]
    state = wait_for(lambda: (s := request_status(stack["url"], request_id))["state"] == "failed" and s,
                     timeout=30, what="the request to fail")
    assert "insufficient_scope" in state["error"]
    [message] = wait_for(lambda: [m for m in portal.messages() if request_id in m["message"]], timeout=20,
                         what="the report")
    assert "Could not read the object" in message["message"] and "insufficient_scope" in message["message"]


def test_check_config_lists_portals_without_secrets(events_client: FlaskClient) -> None:
    result = events_client.application.test_cli_runner().invoke(args=["check-config"])
    assert result.exit_code == 0
    assert "shop: https://shop.bitrix24.com/rest/1/****/" in result.output and "other:" in result.output
    for secret in ("shopcode", "othercode", SHOP_TOKEN, OTHER_TOKEN):
        assert secret not in result.output
