"""A request's reports form one thread in the chat, the right person is mentioned, over real parts.

A real `rq worker` (the Procfile's command), our own Redis, the sandbox over HTTP: assertions are on the
sandbox's messages (with their `reply_id`), its call log, its page, and the request record. As in
tests/test_ambiguity_reports.py the portal's execution limit is 3 s, so an unanswered post settles in 8 s.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient

import devenv
from jobs import policy, records
from tests.helpers import SandboxView, bearer, wait_for
from tests.test_ambiguity_reports import (  # noqa: F401 - client, conn and portal are the same fixtures
    EXECUTION_LIMIT,
    client,
    conn,
    ended,
    portal,
    replay,
    worker_and_app,
)


def portals_file(tmp: Path, webhook: str) -> Path:
    path = tmp / "portals.toml"
    path.write_text(textwrap.dedent(f"""
        [portals.shop]
        webhook_url = "{webhook}"
        chat = "chat1"

        [portals.lager]
        webhook_url = "{webhook}"
        chat = "chat1"
        language = "de"
        mention = "none"
    """))
    return path


@pytest.fixture(scope="module")
def stack(redis_proc: devenv.Process, shared_sandbox: devenv.Process,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real worker for the module, on a portals file with two portals on the sandbox."""
    tmp = tmp_path_factory.mktemp("threads")
    yield from worker_and_app(redis_proc.url, portals_file(tmp, shared_sandbox.extra["webhook"]), tmp)


def submit(client: FlaskClient, key: str, **body: Any) -> str:
    response = client.post("/v1/cancel", json=body, headers={**bearer(), "Idempotency-Key": key})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def carrying(portal: SandboxView, request_id: str) -> list[dict[str, Any]]:
    return [m for m in portal.messages() if f"#{request_id}" in m["message"]]


def rest(portal: SandboxView, method: str, params: dict[str, Any]) -> httpx.Response:
    """A REST call as the webhook user, straight to the sandbox."""
    return portal.http.post(f"/rest/1/sandbox/{method}", json=params)


def failed_with_a_report(client: FlaskClient, portal: SandboxView, conn: redis.Redis, doc_id: int,
                         key: str) -> tuple[str, dict[str, Any]]:
    """A request whose cancel batch keeps failing: it ends failed, reported once (its retries cut short)."""
    portal.faults({"kind": "error500", "method": "batch"})
    request_id = submit(client, key, document_ids=[doc_id], reason="thread", portal="shop")
    record_key = records.request_key(request_id)
    wait_for(lambda: int(conn.hget(record_key, "transient_failures") or 0) >= 1, timeout=20, what="a first failure")
    conn.hset(record_key, "transient_failures", policy.TRANSIENT_RETRY_MAX)  # history, as if spent
    state = ended(client, request_id, state="failed", timeout=60)
    [first] = carrying(portal, request_id)
    assert state["message_id"] == first["id"] and first["reply_id"] is None
    portal.clear_faults()
    return request_id, first


def test_a_replayed_requests_report_is_one_reply_to_its_first_report_even_when_the_post_loses_its_answer(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    responsible = portal.document(8)["responsibleId"]
    request_id, first = failed_with_a_report(client, portal, conn, 8, "thread-replay")
    assert f"[user={responsible}]" in first["message"]  # the failed document's responsible user is told
    assert conn.hget(records.request_key(request_id), "first_message_id") == str(first["id"]).encode()

    # the reply lands but its answer is lost: the job waits it out, finds it by its last line, posts nothing more
    portal.faults({"kind": "applied_then_timeout", "method": "im.message.add", "times": 1, "seconds": 2})
    assert "cancel-" + request_id in replay(client, request_id)
    state = wait_for(lambda: (s := ended(client, request_id))["message_id"] != first["id"] and s, timeout=60,
                     what="the replayed request to be reported")
    assert state["documents"][0]["outcome"] == "cancelled"
    again, second = carrying(portal, request_id)
    assert again == first and second["id"] == state["message_id"]
    assert second["reply_id"] == first["id"] and second["dialog_id"] == "chat1"
    assert "replay 2" in second["message"] and "[user=" not in second["message"]  # nobody to bother now
    posts = portal.calls("im.message.add")
    assert len(posts) == 2 and posts[1]["params"]["REPLY_ID"] == first["id"] and posts[1]["fault"]
    assert portal.calls("im.dialog.messages.get")  # the lost answer was looked for, not posted again
    assert conn.hget(records.request_key(request_id), "first_message_id") == str(first["id"]).encode()

    # the sandbox page shows the reply under its parent, colours and the mention as the user's name
    page = portal.http.get("/").text
    parent, replies, child = (page.index(f'id="m{first["id"]}"'), page.index('class="replies"'),
                              page.index(f'id="m{second["id"]}"'))
    assert parent < replies < child
    assert '<span style="color:#1a7f37">cancelled: 1</span>' in page
    names = {1: "Anna Admin", 2: "Boris Storekeeper", 3: "Vera Accountant"}
    assert f'<b class="mention">@{names[responsible]}</b>' in page


def test_a_thread_that_cannot_be_replied_to_gets_the_report_on_its_own_once(
        client: FlaskClient, portal: SandboxView, conn: redis.Redis) -> None:
    request_id, first = failed_with_a_report(client, portal, conn, 9, "thread-elsewhere")
    portal.http.post("/_sandbox/chats", json={"id": "chat2", "members": [1, 3]}).raise_for_status()
    elsewhere = rest(portal, "im.message.add", {"DIALOG_ID": "chat2", "MESSAGE": "another chat"}).json()["result"]
    # as if the report chat had been changed since the first report: the thread lives in another chat now
    conn.hset(records.request_key(request_id), "first_message_id", str(elsewhere))
    assert "cancel-" + request_id in replay(client, request_id)
    state = wait_for(lambda: (s := ended(client, request_id))["message_id"] != first["id"] and s, timeout=40,
                     what="the replayed request to be reported")
    again, second = carrying(portal, request_id)
    assert again == first and second["id"] == state["message_id"] and second["reply_id"] is None
    refused = [c for c in portal.calls("im.message.add") if c.get("error") == "REPLY_FROM_OTHER_CHAT_ERROR"]
    assert len(refused) == 1 and refused[0]["params"]["REPLY_ID"] == elsewhere
    assert len([m for m in portal.messages() if m["dialog_id"] == "chat1"]) == 2


def test_the_sandbox_takes_replies_only_to_readable_messages_of_the_same_chat(portal: SandboxView) -> None:
    portal.http.post("/_sandbox/chats", json={"id": "chat2", "members": [1]}).raise_for_status()
    portal.http.post("/_sandbox/chats", json={"id": "chat3", "members": [2]}).raise_for_status()
    parent = rest(portal, "im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "parent"}).json()["result"]
    other = rest(portal, "im.message.add", {"DIALOG_ID": "chat2", "MESSAGE": "other"}).json()["result"]
    hidden = portal.http.post("/_sandbox/messages", json={"dialog_id": "chat3", "author_id": 2,
                                                         "message": "not for user 1"}).json()["id"]
    reply = rest(portal, "im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "child", "REPLY_ID": parent})
    assert reply.status_code == 200
    for reply_id, code, description in [
            (other, "REPLY_FROM_OTHER_CHAT_ERROR", "You can only reply to a message within the same chat"),
            (hidden, "REPLY_ACCESS_ERROR", "Action unavailable"),
            (99999, "REPLY_ACCESS_ERROR", "Action unavailable"),
            ("x", "PARAMS_ERROR", "Incorrect params")]:
        answer = rest(portal, "im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "no", "REPLY_ID": reply_id})
        assert answer.status_code == 400 and answer.json() == {"error": code, "error_description": description}
    messages = portal.messages()
    assert [m["message"] for m in messages] == ["parent", "other", "not for user 1", "child"]  # nothing else
    assert messages[-1]["reply_id"] == parent
    history = rest(portal, "im.dialog.messages.get", {"DIALOG_ID": "chat1"}).json()["result"]["messages"]
    assert [m["params"] for m in history] == [{"REPLY_ID": parent}, []]


def test_a_refused_document_mentions_its_responsible_unless_the_portal_says_none(
        client: FlaskClient, portal: SandboxView) -> None:
    portal.permissions(deny_cancel_doc_types=["M"])
    portal.seed({"id": 30, "docType": "M", "status": "Y", "title": "Umlagerung 30", "responsibleId": 3},
                {"id": 31, "docType": "A", "status": "Y", "title": "Arrival 31", "responsibleId": 2},
                {"id": 32, "docType": "M", "status": "Y", "title": "Umlagerung 32", "responsibleId": 2})
    shop = submit(client, "mention-shop", document_ids=[30, 31], portal="shop")
    lager = submit(client, "mention-lager", document_ids=[32], portal="lager")
    ended(client, shop)
    ended(client, lager)
    [english] = carrying(portal, shop)
    [german] = carrying(portal, lager)
    lines = english["message"].splitlines()
    refused = lines.index(next(line for line in lines if line.startswith("• ") and "#30 " in line))
    assert lines[refused + 1] == "    Bitrix24 answered: Insufficient permissions to save the document."
    assert lines[refused + 2].startswith("    What to do: Check the webhook user's rights")
    assert lines[refused + 3] == "    Responsible: [user=3]user 3[/user]"
    assert english["message"].count("[user=") == 1  # not for the cancelled document 31
    assert "abgelehnt" in german["message"] and "Bestandsverwaltung" in german["message"]
    assert "[user=" not in german["message"]  # mention = "none"


def test_the_thread_is_the_first_report_or_for_an_older_record_its_last_one() -> None:
    from jobs.notify import thread_of

    assert thread_of({"first_message_id": "7", "message_id": "9"}) == "7"
    assert thread_of({"message_id": "9"}) == "9"  # written before threads: the earlier round's report
    assert thread_of({}) is None and thread_of({"first_message_id": "x"}) is None
