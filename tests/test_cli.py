"""The operator's command line over `make run`'s kind of stack: our Redis, a real `rq worker`, the sandbox.

`requests`, `show`, `cancel` and `doctor` run as `flask --app app ...` does (click's runner on the real app,
and once as a subprocess), against the real Redis and the sandbox over HTTP; the tests assert on what
really happened: documents cancelled in the sandbox, chat messages, Redis keys, exit codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import Result
from flask import Flask

import devenv
from app import create_app
from jobs import records
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

ROOT = Path(__file__).resolve().parent.parent
ROBOT_SECRET = "cli-robot-secret-5d1c"
APP_TOKEN = "cli-app-token-77e0"
MEMBER_ID = "clishopmember"
TTL_DAYS = 10


def portals_file(tmp: Path, webhook: str, name: str = "portals.toml") -> Path:
    """Two portals on the sandbox: `shop` (a rule that reads sale) and `outlet` (a rule that reads crm)."""
    path = tmp / name
    path.write_text(textwrap.dedent(f"""
        [portals.shop]
        webhook_url = "{webhook}"
        application_token = "{APP_TOKEN}"
        robot_secret = "{ROBOT_SECRET}"
        member_id = "{MEMBER_ID}"
        chat = "chat1"

        [[portals.shop.rules]]
        event = "ONSHIPMENTENTITYSAVED"
        read = "sale.shipment.get"
        when = {{ deducted = "N" }}
        documents_by = {{ docNumber = "{{accountNumber}}" }}

        [portals.outlet]
        webhook_url = "{webhook}"
        chat = "chat1"

        [[portals.outlet.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        params = {{ entityTypeId = 2 }}
        documents_field = "ufCrm_InventoryDocs"
    """))
    return path


def service_env(redis_url: str, path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_url, "B24_PORTALS_FILE": str(path), "TRIGGER_API_KEYS": API_KEY,
                "B24_READ_TIMEOUT": "2", "B24_CONNECT_TIMEOUT": "1", "B24_EXECUTION_LIMIT": "3",
                "REQUEST_TTL_DAYS": str(TTL_DAYS)})
    return env


@pytest.fixture(scope="module")
def stack(redis_proc: devenv.Process, shared_sandbox: devenv.Process,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real worker for the module, and the app the commands run in, on the same portals file."""
    tmp = tmp_path_factory.mktemp("cli")
    path = portals_file(tmp, shared_sandbox.extra["webhook"])
    env = service_env(redis_proc.url, path)
    worker = devenv.start_worker(env, log=tmp / "worker.log")
    app = create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_portals_file": str(path),
                      "trigger_api_keys": API_KEY, "request_ttl_days": TTL_DAYS})
    yield {"worker": worker, "app": app, "env": env, "path": path, "tmp": tmp,
           "redis": redis.Redis.from_url(redis_proc.url), "webhook": shared_sandbox.extra["webhook"]}
    worker.stop()


@pytest.fixture
def app(stack: dict[str, Any]) -> Flask:
    return stack["app"]  # type: ignore[no-any-return]


@pytest.fixture
def conn(stack: dict[str, Any]) -> redis.Redis:
    return stack["redis"]  # type: ignore[no-any-return]


@pytest.fixture
def portal(sandbox: devenv.Process) -> Iterator[SandboxView]:
    view = SandboxView(sandbox.url)
    yield view
    view.http.post("/_sandbox/reset").raise_for_status()  # permissions back to the seed's for the next test


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def assert_no_secret(output: str, stack: dict[str, Any]) -> None:
    webhook = stack["webhook"]
    for secret in (webhook, "/rest/1/sandbox", API_KEY, ROBOT_SECRET, APP_TOKEN):
        assert secret not in output, f"{secret!r} in output"


def record_state(conn: redis.Redis, request_id: str) -> dict[str, Any]:
    return records.load(conn, request_id) or {}


def finished(conn: redis.Redis, request_id: str, timeout: float = 40) -> dict[str, Any]:
    """The record once its report is posted (or it failed for good)."""
    return wait_for(lambda: (r := record_state(conn, request_id)).get("state") in ("done", "failed")
                    and (r.get("message_id") or r.get("report_error")) and r,
                    timeout=timeout, what=f"request {request_id} to finish")


def request_keys(conn: redis.Redis) -> set[bytes]:
    return set(conn.keys("b24c:req:*"))


def queued(conn: redis.Redis) -> int:
    return int(conn.llen("rq:queue:cancel"))


# -- cancel ---------------------------------------------------------------------------------------

def test_cancel_command_cancels_through_the_worker_and_show_tells_it(
        app: Flask, conn: redis.Redis, portal: SandboxView, stack: dict[str, Any]) -> None:
    result = run(app, "cancel", "--portal", "shop", "--reason", "Returned by hand", "3", "4")
    assert result.exit_code == 0, result.output
    request_id = result.output.strip()
    assert len(request_id) == 32 and all(c in "0123456789abcdef" for c in request_id)
    record = finished(conn, request_id)
    assert record["state"] == "done"
    assert record["request"]["caller"] == "operator" and record["request"]["portal"] == "shop"
    assert {doc["id"]: doc["outcome"] for doc in record["documents"]} == {3: "cancelled", 4: "cancelled"}
    for doc_id in (3, 4):
        assert portal.document(doc_id)["status"] != "Y"
        assert portal.effective_cancels(doc_id) == 1
    [message] = [m for m in portal.messages() if f"#{request_id}" in m["message"]]
    assert "Returned by hand" in message["message"]
    assert conn.zscore(records.index_key("shop"), request_id) is not None

    shown = run(app, "show", request_id)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"request {request_id}: done"
    assert "caller operator" in lines[1] and "portal shop" in lines[1]
    assert "  reason: Returned by hand" in lines
    assert any(line.startswith("  #3 ") and line.endswith(": cancelled") for line in lines)
    assert any(line.startswith("  #4 ") and line.endswith(": cancelled") for line in lines)
    assert f"report: message {message['id']} in chat1" in lines
    assert any(line.startswith("attempts 1, transient failures 0, waits for limits 0") for line in lines)
    as_json = json.loads(run(app, "show", "--json", request_id).output)
    assert as_json["message_id"] == message["id"] and as_json["caller"] == "operator"
    assert_no_secret(shown.output + json.dumps(as_json), stack)

    # The same documents again, as a new request: the worker sees them cancelled and sends nothing.
    again = run(app, "cancel", "--portal", "shop", "3")
    assert again.exit_code == 0, again.output
    second = finished(conn, again.output.strip())
    assert second["documents"][0]["outcome"] == "already_not_conducted"
    assert portal.effective_cancels(3) == 1


def test_cancel_with_a_key_is_idempotent_and_refusals_enqueue_nothing(
        app: Flask, conn: redis.Redis, portal: SandboxView, stack: dict[str, Any]) -> None:
    first = run(app, "cancel", "--portal", "outlet", "--key", "by-hand-1", "5")
    assert first.exit_code == 0, first.output
    request_id = first.output.strip()
    finished(conn, request_id)
    before_keys, before_queue = request_keys(conn), queued(conn)
    before_index = conn.zcard(records.index_key("outlet"))

    repeat = run(app, "cancel", "--portal", "outlet", "--key", "by-hand-1", "5")
    assert repeat.exit_code == 0
    assert repeat.output.startswith(f"{request_id} (already submitted with this --key")

    refusals = {
        ("cancel", "--portal", "nowhere", "5"): "unknown portal 'nowhere'",
        ("cancel", "5"): "--portal is required: several portals are configured (outlet, shop)",
        ("cancel", "--portal", "outlet", "five"): "bad document id 'five'",
        ("cancel", "--portal", "outlet", "-1"): "No such option",
        # The API's own checks (the cancel body's model), with its messages, which name the field.
        ("cancel", "--portal", "outlet", "0"): "Error: document_ids[0]: ",
        ("cancel", "--portal", "outlet", "6", "99999999999"): "Error: document_ids[1]: ",
        ("cancel", "--portal", "outlet", "6", "6"): "Error: document_ids: ",
        ("cancel", "--portal", "outlet", "--chat", "chat9", "6"): "chat chat9 is not allowed",
        ("cancel", "--portal", "outlet", "--chat", "7", "6"): "Error: chat: must be a group chat",
        ("cancel", "--portal", "outlet", "--key", "by-hand-1", "6"): "already used with a different request",
        ("cancel", "--portal", "outlet"): "Missing argument",
    }
    for args, message in refusals.items():
        result = run(app, *args)
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output, (args, result.output)
    assert request_keys(conn) == before_keys
    assert queued(conn) == before_queue
    assert conn.zcard(records.index_key("outlet")) == before_index
    assert portal.effective_cancels(5) == 1
    assert portal.effective_cancels(6) == 0
    assert len([m for m in portal.messages() if f"#{request_id}" in m["message"]]) == 1


# -- the index and `requests` ---------------------------------------------------------------------

def test_every_submit_indexes_its_request_in_the_same_script_and_the_index_expires_with_the_records(
        app: Flask, conn: redis.Redis, portal: SandboxView, monkeypatch: pytest.MonkeyPatch) -> None:
    client = app.test_client()
    api = client.post("/v1/cancel", json={"portal": "outlet", "document_ids": [8]},
                      headers={**bearer(), "Idempotency-Key": "index-api"})
    robot = client.post(f"/v1/bitrix24/robot?portal=shop&key={ROBOT_SECRET}&document_ids=9")
    event = client.post("/v1/bitrix24/events", data={
        "event": "ONSHIPMENTENTITYSAVED", "data[FIELDS][ID]": "1", "ts": str(int(time.time())),
        "auth[member_id]": MEMBER_ID, "auth[application_token]": APP_TOKEN})
    assert (api.status_code, robot.status_code, event.status_code) == (202, 202, 200)
    api_id, robot_id, event_id = (answer.get_json()["request_id"] for answer in (api, robot, event))
    created = {rid: float(conn.hget(records.request_key(rid), "created_at") or 0)
               for rid in (api_id, robot_id, event_id)}
    assert conn.zscore(records.index_key("outlet"), api_id) == created[api_id]
    assert conn.zscore(records.index_key("shop"), robot_id) == created[robot_id]
    assert conn.zscore(records.index_key("shop"), event_id) == created[event_id]
    assert conn.zscore(records.index_key("outlet"), robot_id) is None
    listed = {entry["request_id"]: entry for entry in json.loads(run(app, "requests", "--json").output)["requests"]}
    assert (listed[event_id]["caller"], listed[event_id]["source"]) == ("bitrix24", "event")
    assert (listed[api_id]["caller"], listed[api_id]["portal"]) == ("default", "outlet")
    shown = run(app, "show", event_id).output.splitlines()
    assert shown[1] == "  portal shop, caller bitrix24, from event, event ONSHIPMENTENTITYSAVED for object 1"
    ttl = TTL_DAYS * 86400
    for name in ("shop", "outlet"):
        assert ttl - 5 <= conn.ttl(records.index_key(name)) <= ttl
    # A repeat (same key) writes nothing, the index included.
    size = conn.zcard(records.index_key("outlet"))
    again = client.post("/v1/cancel", json={"portal": "outlet", "document_ids": [8]},
                        headers={**bearer(), "Idempotency-Key": "index-api"})
    assert again.status_code == 200 and conn.zcard(records.index_key("outlet")) == size

    # Entries older than the records' TTL are trimmed by a submit whose id starts with 0.
    stale = "e" * 32
    conn.zadd(records.index_key("shop"), {stale: time.time() - ttl - 60})
    monkeypatch.setattr(records, "new_request_id", lambda: "0" + "a" * 31)
    trimmed = run(app, "cancel", "--portal", "shop", "10")
    assert trimmed.exit_code == 0, trimmed.output
    assert conn.zscore(records.index_key("shop"), stale) is None
    assert conn.zscore(records.index_key("shop"), "0" + "a" * 31) is not None
    assert conn.zscore(records.index_key("shop"), robot_id) is not None
    for rid in (api_id, robot_id, event_id, "0" + "a" * 31):
        finished(conn, rid)


def test_requests_lists_recent_requests_with_filters_and_skips_expired_records(
        app: Flask, conn: redis.Redis, portal: SandboxView, stack: dict[str, Any]) -> None:
    # A failed one: the webhook lost the catalog scope (a permanent error), so the document fails.
    portal.permissions(scopes=["im", "crm", "sale"])
    failed_id = run(app, "cancel", "--portal", "outlet", "--reason", "will fail", "12").output.strip()
    assert finished(conn, failed_id)["state"] == "failed"
    portal.permissions(scopes=["catalog", "im", "crm", "sale"])
    done_id = run(app, "cancel", "--portal", "shop", "11").output.strip()
    robot = app.test_client().post(f"/v1/bitrix24/robot?portal=shop&key={ROBOT_SECRET}&document_ids=13")
    robot_id = robot.get_json()["request_id"]
    assert finished(conn, done_id)["state"] == "done"
    finished(conn, robot_id)
    # One older than the window, and one whose record has expired (its index entry is still there).
    old = run(app, "cancel", "--portal", "shop", "14").output.strip()
    finished(conn, old)
    conn.zadd(records.index_key("shop"), {old: time.time() - 3 * 3600})
    conn.hset(records.request_key(old), "created_at", f"{time.time() - 3 * 3600:.3f}")
    expired = run(app, "cancel", "--portal", "shop", "15").output.strip()
    finished(conn, expired)
    conn.delete(records.request_key(expired))

    table = run(app, "requests", "--since", "2h")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["ID", "CALLER", "PORTAL", "STATE", "DOCS", "OUTCOMES", "AGE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {failed_id, done_id, robot_id} <= set(rows)
    assert old not in rows and expired not in rows
    assert rows[failed_id][1:6] == ["operator", "outlet", "failed", "1", "1"]
    assert rows[failed_id][6] == "failed"
    assert rows[done_id][1:7] == ["operator", "shop", "done", "1", "1", "cancelled"]
    assert rows[robot_id][1:4] == ["bitrix24", "shop", "done"]
    # Newest first.
    order = [line.split()[0] for line in lines[1:]]
    assert order.index(robot_id) < order.index(done_id) < order.index(failed_id)
    assert_no_secret(table.output, stack)

    only_failed = run(app, "requests", "--state", "failed", "--since", "2h").output
    assert failed_id in only_failed and done_id not in only_failed and robot_id not in only_failed
    only_outlet = run(app, "requests", "--portal", "outlet").output
    assert failed_id in only_outlet and done_id not in only_outlet
    with_old = run(app, "requests", "--since", "4h", "--portal", "shop").output
    assert old in with_old and expired not in with_old
    conn.hset(records.request_key(done_id), "state", "retrying")
    retrying = run(app, "requests", "--state", "retrying").output
    assert done_id in retrying and failed_id not in retrying

    listed = json.loads(run(app, "requests", "--json", "--since", "2h").output)["requests"]
    by_id = {entry["request_id"]: entry for entry in listed}
    assert by_id[failed_id]["state"] == "failed" and by_id[failed_id]["outcomes"] == {"failed": 1}
    assert by_id[failed_id]["documents"][0]["id"] == 12 and by_id[failed_id]["reason"] == "will fail"
    assert by_id[robot_id]["caller"] == "bitrix24" and by_id[robot_id]["source"] == "robot"
    assert 0 <= by_id[done_id]["age_seconds"] < 600
    assert old not in by_id and expired not in by_id

    shown = run(app, "show", failed_id).output.splitlines()
    at = shown.index("  #12: failed")
    assert shown[at + 1].startswith("      insufficient_scope: ")
    assert shown[at + 2] == "      what to do: Add the scopes catalog and im to the incoming webhook."
    assert shown[-1].startswith("error: catalog.document.list: insufficient_scope")

    for args, message in {("requests", "--portal", "nowhere"): "unknown portal 'nowhere'",
                          ("requests", "--since", "two hours"): "give a number and a unit",
                          ("requests", "--state", "lost"): "Invalid value for '--state'",
                          ("show", "not-an-id"): "a request id is 32 hexadecimal digits",
                          ("show", expired): f"no request {expired}"}.items():
        result = run(app, *args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)


# -- doctor ---------------------------------------------------------------------------------------

DOCTOR_LINE = re.compile(r"^(\S+): (ok|FAIL) +(.+?): (.*)$")


def doctor_lines(result: Result) -> dict[str, str]:
    """`portal: check` -> `ok` or `FAIL` with its text."""
    found = {}
    for line in result.output.splitlines():
        match = DOCTOR_LINE.match(line)
        if match:
            found[f"{match[1]}: {match[3]}"] = f"{match[2]} {match[4]}"
    return found


def test_doctor_passes_on_a_healthy_portal_through_the_shared_limiter(
        app: Flask, conn: redis.Redis, portal: SandboxView, stack: dict[str, Any]) -> None:
    conn.delete("b24c:limit:{shop}:tat", "b24c:limit:{outlet}:tat")
    before = len(portal.calls())
    result = run(app, "doctor")
    assert result.exit_code == 0, result.output
    lines = doctor_lines(result)
    for name in ("shop", "outlet"):
        for check in ("reachable", "scopes", "inventory", "chat chat1"):
            assert lines[f"{name}: {check}"].startswith("ok "), result.output
    assert lines["shop: scopes"] == "ok catalog, im, sale granted"
    assert lines["outlet: scopes"] == "ok catalog, crm, im granted"
    assert "the webhook user (1) is a member" in lines["shop: chat chat1"]
    assert result.output.splitlines()[-1] == "all checks passed"
    methods = [call["method"] for call in portal.calls()[before:]]
    assert sorted(methods) == sorted(["scope", "catalog.document.mode.status", "im.dialog.get"] * 2)
    assert conn.exists("b24c:limit:{shop}:tat") and conn.exists("b24c:limit:{outlet}:tat")
    assert_no_secret(result.output, stack)


def test_doctor_fails_with_a_clear_line_for_each_permission_switched_off(
        app: Flask, portal: SandboxView, stack: dict[str, Any]) -> None:
    portal.permissions(scopes=["catalog", "im"])
    result = run(app, "doctor")
    assert result.exit_code == 1
    lines = doctor_lines(result)
    assert lines["shop: scopes"].startswith("FAIL missing sale (sale for rule ONSHIPMENTENTITYSAVED reads "
                                            "sale.shipment.get); fix: add them to the incoming webhook")
    assert lines["outlet: scopes"].startswith("FAIL missing crm (crm for rule ONCRMDEALUPDATE reads crm.item.get)")
    assert lines["shop: inventory"].startswith("ok ") and lines["shop: chat chat1"].startswith("ok ")
    assert result.output.splitlines()[-1] == "2 check(s) failed"

    portal.permissions(scopes=["catalog", "crm", "sale"])  # no im
    lines = doctor_lines(result := run(app, "doctor", "--portal", "shop"))
    assert result.exit_code == 1
    assert lines["shop: scopes"].startswith("FAIL missing im (im for posting reports)")
    assert lines["shop: chat chat1"].startswith("FAIL im.dialog.get failed: insufficient_scope (HTTP 403)")
    assert "outlet: scopes" not in lines

    portal.permissions(scopes=["catalog", "im", "crm", "sale"], inventory_enabled=False)
    lines = doctor_lines(result := run(app, "doctor"))
    assert result.exit_code == 1
    assert lines["shop: inventory"] == ("FAIL inventory management is off, so documents cannot be cancelled; fix: "
                                        "turn it on in Inventory management settings (on a plan that includes it)")
    assert lines["shop: scopes"].startswith("ok ")

    portal.permissions(inventory_enabled=True, chat_members={"chat1": [2]})
    lines = doctor_lines(result := run(app, "doctor"))
    assert result.exit_code == 1
    assert lines["shop: chat chat1"] == ("FAIL the webhook user (1) is not a member of chat1, or chat1 does not "
                                         "exist, so reports cannot be posted; fix: add the user to the chat, or set "
                                         "the right chat id")
    assert lines["outlet: inventory"].startswith("ok ")
    assert_no_secret(result.output, stack)


def test_doctor_says_an_unreachable_portal_cannot_be_reached_without_its_secret(
        conn: redis.Redis, stack: dict[str, Any]) -> None:
    webhook = f"http://127.0.0.1:{devenv.free_port()}/rest/7/s3cr3tc0de/"
    path = stack["tmp"] / "unreachable.toml"
    path.write_text(f'[portals.gone]\nwebhook_url = "{webhook}"\nchat = "chat1"\n')
    app = create_app({"_env_file": None, "redis_url": stack["env"]["REDIS_URL"], "b24_portals_file": str(path),
                      "b24_connect_timeout": 1.0})
    result = run(app, "doctor")
    assert result.exit_code == 1
    lines = doctor_lines(result)
    assert lines["gone: reachable"].startswith("FAIL http://127.0.0.1:")
    assert "/rest/7/****/: TRANSPORT_CONNECT" in lines["gone: reachable"]
    assert lines["gone: other checks"] == "FAIL skipped: the portal could not be reached"
    assert "s3cr3tc0de" not in result.output


def test_the_commands_run_as_flask_subprocesses_on_the_configured_redis_and_portals(
        conn: redis.Redis, portal: SandboxView, stack: dict[str, Any]) -> None:
    env = {**stack["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def flask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["flask", "--app", "app", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    cancelled = flask("cancel", "--portal", "shop", "--reason", "from a shell", "16")
    assert cancelled.returncode == 0, cancelled.stderr
    request_id = cancelled.stdout.strip()
    finished(conn, request_id)
    assert portal.document(16)["status"] != "Y"
    listed = flask("requests", "--json", "--portal", "shop")
    assert listed.returncode == 0, listed.stderr
    assert request_id in {entry["request_id"] for entry in json.loads(listed.stdout)["requests"]}
    healthy = flask("doctor")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    portal.permissions(chat_members={"chat1": [2]})
    unhealthy = flask("doctor")
    assert unhealthy.returncode == 1
    assert "shop: FAIL chat chat1: the webhook user (1) is not a member of chat1" in unhealthy.stdout
    refused = flask("cancel", "--portal", "nowhere", "5")
    assert refused.returncode == 1 and "Error: unknown portal 'nowhere'" in refused.stderr
    for output in (cancelled, listed, healthy, unhealthy, refused):
        assert_no_secret(output.stdout + output.stderr, stack)


def test_operator_is_a_reserved_caller_name(tmp_path: Path, stack: dict[str, Any]) -> None:
    from settings import SettingsError, key_sha256, load_settings

    path = tmp_path / "portals.toml"
    path.write_text(f'[portals.shop]\nwebhook_url = "{stack["webhook"]}"\nchat = "chat1"\n'
                    f'[callers.operator]\nkey_sha256 = "{key_sha256("k")}"\nportals = ["shop"]\n')
    with pytest.raises(SettingsError, match="caller name 'operator' is reserved"):
        load_settings(_env_file=None, b24_portals_file=str(path))
    refused = run(stack["app"], "new-key", "operator")
    assert refused.exit_code != 0 and "not sandbox, bitrix24, operator" in refused.output
