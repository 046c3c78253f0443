"""The sandbox portal over HTTP: methods, errors, envelope, batch, auth and the control API.

Every test runs against the shared sandbox (`--documents 20 --seed 1 --durations-zero`), reset first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

TIME_KEYS = {"start", "finish", "duration", "processing", "date_start", "date_finish",
             "operating_reset_at", "operating"}


class Portal:
    """A thin client for one sandbox: REST calls through the webhook, control calls under /_sandbox."""

    def __init__(self, url: str, webhook: str) -> None:
        self.url = url
        self.webhook = webhook
        self.http = httpx.Client(timeout=10)

    def call(self, method: str, params: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(self.webhook + method, json=params or {})

    def ok(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = self.call(method, params)
        assert answer.status_code == 200, answer.text
        return answer.json()["result"]

    def control(self, verb: str, path: str, body: Any = None) -> Any:
        answer = self.http.request(verb, f"{self.url}/_sandbox/{path}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def document(self, doc_id: int) -> dict[str, Any]:
        return self.control("GET", f"documents/{doc_id}")

    def first_of_type(self, doc_type: str) -> dict[str, Any]:
        return next(d for d in self.control("GET", "documents") if d["docType"] == doc_type)


@pytest.fixture
def b24(sandbox: Any) -> Iterator[Portal]:
    portal = Portal(sandbox.url, sandbox.extra["webhook"])
    yield portal
    portal.http.close()


def assert_error(answer: httpx.Response, status: int, code: str, description: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == code
    if description is not None:
        assert body["error_description"] == description


# -- seed and envelope -------------------------------------------------------------------------

def test_seed_is_twenty_conducted_documents_with_predictable_numbers(b24: Portal) -> None:
    documents = b24.control("GET", "documents")
    assert [d["id"] for d in documents] == list(range(1, 21))
    assert {d["status"] for d in documents} == {"Y"}
    assert [d["docNumber"] for d in documents[:3]] == ["DOC-0001", "DOC-0002", "DOC-0003"]
    assert {d["docType"] for d in documents} <= {"A", "S", "M", "R", "D"}
    assert len({d["docType"] for d in documents}) >= 3
    b24.control("POST", "reset")
    assert b24.control("GET", "documents") == documents


def test_cancel_success_has_the_golden_shape(b24: Portal) -> None:
    answer = b24.call("catalog.document.cancel", {"id": 3})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"result", "time"}
    assert body["result"] is True
    time_block = body["time"]
    assert set(time_block) == TIME_KEYS
    assert isinstance(time_block["start"], float) and isinstance(time_block["finish"], float)
    assert time_block["finish"] >= time_block["start"]
    assert time_block["duration"] >= 0 and time_block["processing"] >= 0
    assert isinstance(time_block["operating_reset_at"], int)
    assert time_block["operating_reset_at"] > time_block["start"]
    assert isinstance(time_block["operating"], float)
    assert time_block["date_start"].endswith("+03:00") and "T" in time_block["date_start"]
    doc = b24.document(3)
    assert doc["status"] == "C"
    assert doc["dateStatus"] == doc["dateModify"] != "2026-11-02T12:30:00+03:00"


def test_form_encoded_get_and_json_suffix_work(b24: Portal) -> None:
    answer = b24.http.get(b24.webhook + "catalog.document.list.json",
                          params=[("select[]", "id"), ("select[]", "status"),
                                  ("filter[@id][]", "2"), ("filter[@id][]", "4")])
    assert answer.status_code == 200, answer.text
    assert answer.json()["result"]["documents"] == [{"id": 2, "status": "Y"}, {"id": 4, "status": "Y"}]
    answer = b24.http.post(b24.webhook + "catalog.document.cancel", data={"id": "5"})
    assert answer.json()["result"] is True
    assert b24.document(5)["status"] == "C"


def test_form_encoded_php_keys_for_lists_and_batch(b24: Portal) -> None:
    answer = b24.http.post(b24.webhook + "catalog.document.cancelList.json",
                           data={"documentIds[]": ["1", "2"]})
    assert answer.status_code == 200 and answer.json()["result"] is True
    assert [b24.document(i)["status"] for i in (1, 2, 3)] == ["C", "C", "Y"]
    listed = b24.http.get(b24.webhook + "catalog.document.list",
                          params={"filter[id]": "5", "select[]": "status"}).json()["result"]
    assert listed["documents"] == [{"status": "Y"}]
    batch = b24.http.post(b24.webhook + "batch", data={
        "halt": "0", "cmd[find]": "catalog.document.list?filter[%3DdocNumber]=DOC-0004&select[]=id",
        "cmd[cancel]": "catalog.document.cancel?id=$result[find][documents][0][id]"}).json()["result"]
    assert batch["result"] == {"find": {"documents": [{"id": 4}]}, "cancel": True}
    assert b24.document(4)["status"] == "C"


# -- catalog.document.list ---------------------------------------------------------------------

def test_list_defaults_to_all_fields_in_id_order(b24: Portal) -> None:
    answer = b24.call("catalog.document.list").json()
    documents = answer["result"]["documents"]
    assert [d["id"] for d in documents] == list(range(1, 21))
    assert set(documents[0]) == {"id", "docType", "docNumber", "title", "status", "currency", "total",
                                 "responsibleId", "createdBy", "modifiedBy", "statusBy", "siteId",
                                 "commentary", "dateCreate", "dateModify", "dateStatus", "dateDocument"}
    assert answer["total"] == 20 and "next" not in answer


@pytest.mark.parametrize(("flt", "expected"), [
    ({"id": 3}, [3]),
    ({"=id": "3"}, [3]),
    ({"!id": 1, "<=id": 3}, [2, 3]),
    ({"!=id": [1, 2], "<id": 5}, [3, 4]),
    ({">id": 18}, [19, 20]),
    ({">=id": 19}, [19, 20]),
    ({"@id": [7, 2, 99]}, [2, 7]),
    ({"!@id": list(range(1, 19))}, [19, 20]),
    ({"%docNumber": "-001"}, [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
    ({">=dateCreate": "2026-11-03T04:00:00+03:00"}, [19, 20]),
])
def test_list_filter_prefixes(b24: Portal, flt: dict[str, Any], expected: list[int]) -> None:
    result = b24.ok("catalog.document.list", {"filter": flt, "select": ["id"]})
    assert [d["id"] for d in result["documents"]] == expected


def test_list_filters_on_type_and_status_and_orders(b24: Portal) -> None:
    documents = b24.control("GET", "documents")
    returns = [d["id"] for d in documents if d["docType"] == "R"]
    result = b24.ok("catalog.document.list", {"filter": {"docType": "R", "status": "Y"},
                                              "order": {"id": "DESC"}, "select": ["id", "docType"]})
    assert [d["id"] for d in result["documents"]] == sorted(returns, reverse=True)
    b24.ok("catalog.document.cancel", {"id": returns[0]})
    result = b24.ok("catalog.document.list", {"filter": {"docType": "R", "!status": "Y"}, "select": ["id"]})
    assert [d["id"] for d in result["documents"]] == [returns[0]]


def test_list_pages_by_fifty(b24: Portal) -> None:
    b24.control("POST", "reset", {"documents": 120})
    first = b24.call("catalog.document.list", {"select": ["id"]}).json()
    assert len(first["result"]["documents"]) == 50 and first["next"] == 50 and first["total"] == 120
    second = b24.call("catalog.document.list", {"select": ["id"], "start": 50}).json()
    assert second["result"]["documents"][0]["id"] == 51 and second["next"] == 100
    last = b24.call("catalog.document.list", {"select": ["id"], "start": 100}).json()
    assert len(last["result"]["documents"]) == 20 and "next" not in last and last["total"] == 120
    fast = b24.call("catalog.document.list", {"select": ["id"], "start": -1}).json()
    assert len(fast["result"]["documents"]) == 50
    assert "next" not in fast and "total" not in fast


def test_list_never_returns_hidden_or_non_rest_documents(b24: Portal) -> None:
    b24.control("POST", "permissions", {"hidden_document_ids": [2, 4]})
    b24.control("POST", "documents", {"documents": [{"id": 21, "docType": "W", "title": "Realization"}]})
    ids = [d["id"] for d in b24.ok("catalog.document.list", {"select": ["id"]})["documents"]]
    assert 2 not in ids and 4 not in ids and 21 not in ids and len(ids) == 18
    assert b24.ok("catalog.document.list", {"filter": {"id": 2}})["documents"] == []


def test_list_ignores_what_the_rest_view_does_not_know(b24: Portal) -> None:
    # The core's REST view drops unknown names and unconvertible filter values without an error:
    # a mistyped filter key filters nothing, so the whole (visible) list comes back.
    everything = b24.call("catalog.document.list", {"select": ["id"]}).json()
    assert everything["total"] == 20
    for flt in ({"ID": 1}, {"DOC_TYPE": "R"}, {"docNumbr": "DOC-0001"}, {">=dateCreate": "not a date"},
                {"LOGIC": "OR", "0": {"id": 1}}):
        answer = b24.call("catalog.document.list", {"filter": flt, "select": ["id"]})
        assert answer.status_code == 200, (flt, answer.text)
        assert answer.json()["total"] == 20, flt
    # Names are matched after camelCase -> UPPER_SNAKE, as the core converts them.
    assert [d["id"] for d in b24.ok("catalog.document.list", {"filter": {"Id": 3}})["documents"]] == [3]
    picked = b24.ok("catalog.document.list", {"filter": {"id": 3}, "select": ["id", "nope", "DOC_NUMBER", "docNumber"]})
    assert picked["documents"] == [{"id": 3, "docNumber": "DOC-0003"}]
    only_unknown = b24.ok("catalog.document.list", {"filter": {"id": 3}, "select": ["nope"]})["documents"][0]
    assert len(only_unknown) == 17  # nothing known selected: every field
    ordered = b24.ok("catalog.document.list", {"order": {"nope": "DESC"}, "select": ["id"]})["documents"]
    assert [d["id"] for d in ordered] == list(range(1, 21))
    # Integer filter values are cast as PHP's (int) does: "3abc" is 3, "abc" is 0.
    assert [d["id"] for d in b24.ok("catalog.document.list", {"filter": {"id": "3abc"}})["documents"]] == [3]
    assert b24.ok("catalog.document.list", {"filter": {"id": "abc"}})["documents"] == []


def test_list_prints_empty_values_as_null(b24: Portal) -> None:
    b24.control("POST", "documents", {"documents": [{"id": 3, "docType": "A", "title": "", "total": 0,
                                                     "commentary": "", "docNumber": "0"}]})
    document = b24.ok("catalog.document.list", {"filter": {"id": 3}})["documents"][0]
    assert (document["title"], document["total"], document["commentary"], document["docNumber"]) == (
        None, None, None, None)
    assert document["status"] == "Y" and document["id"] == 3


def test_list_start_snaps_to_a_page_boundary(b24: Portal) -> None:
    # RestManager turns start into a page number (start / 50 + 1): start=75 reads from record 51.
    b24.control("POST", "reset", {"documents": 120})
    answer = b24.call("catalog.document.list", {"select": ["id"], "start": 75}).json()
    assert [d["id"] for d in answer["result"]["documents"]][:2] == [51, 52]
    assert answer["next"] == 100 and answer["total"] == 120
    answer = b24.call("catalog.document.list", {"select": ["id"], "start": 49}).json()
    assert answer["result"]["documents"][0]["id"] == 1 and answer["next"] == 50
    answer = b24.http.get(b24.webhook + "catalog.document.list", params={"select[]": "id", "start": "110"}).json()
    assert [d["id"] for d in answer["result"]["documents"]] == list(range(101, 121)) and "next" not in answer


# -- cancel, conduct and their refusals --------------------------------------------------------

def test_cancel_twice_reports_not_conducted(b24: Portal) -> None:
    assert b24.ok("catalog.document.cancel", {"id": 1}) is True
    assert_error(b24.call("catalog.document.cancel", {"id": 1}), 400, "0",
                 "Error cancelling document conduct: Document has not been conducted yet")


def test_cancel_argument_errors(b24: Portal) -> None:
    assert_error(b24.call("catalog.document.cancel"), 400, "100", "Could not find value for parameter {id}")
    answer = b24.call("catalog.document.cancel", {"id": "abc"})
    assert_error(answer, 400, "100")
    assert "{id}" in answer.json()["error_description"]


def test_cancel_of_missing_or_hidden_document_is_a_permission_error(b24: Portal) -> None:
    denied = "Insufficient permissions to save the document"
    assert_error(b24.call("catalog.document.cancel", {"id": 999}), 400, "0", denied)
    b24.control("POST", "permissions", {"hidden_document_ids": [6]})
    assert_error(b24.call("catalog.document.cancel", {"id": 6}), 400, "0", denied)
    assert b24.document(6)["status"] == "Y"


@pytest.mark.parametrize(("switch", "description"), [
    ({"deny_warehouse": True},
     "Could not complete the action as you do not have sufficient permissions to view and select warehouses"),
    ({"inventory_enabled": False}, "To process the document, inventory accounting must be enabled"),
    ({"plan_has_inventory": False}, "Inventory accounting is not available on your plan"),
])
def test_refusals_leave_the_document_conducted(b24: Portal, switch: dict[str, bool],
                                               description: str) -> None:
    b24.control("POST", "permissions", switch)
    assert_error(b24.call("catalog.document.cancel", {"id": 4}), 400, "0", description)
    assert b24.document(4)["status"] == "Y"
    expected_mode = "Y" if "deny_warehouse" in switch else "N"
    assert b24.ok("catalog.document.mode.status") == expected_mode


def test_cancel_permission_per_document_type(b24: Portal) -> None:
    moving = b24.first_of_type("M")
    other = next(d for d in b24.control("GET", "documents") if d["docType"] != "M")
    b24.control("POST", "permissions", {"deny_cancel_doc_types": ["M"]})
    assert_error(b24.call("catalog.document.cancel", {"id": moving["id"]}), 400, "0",
                 "Insufficient permissions to save the document")
    assert b24.document(moving["id"])["status"] == "Y"
    assert b24.ok("catalog.document.cancel", {"id": other["id"]}) is True


def test_cancelled_status_switch_and_russian_texts(b24: Portal) -> None:
    b24.control("POST", "config", {"cancelled_status": "N", "language": "ru"})
    assert b24.ok("catalog.document.cancel", {"id": 2}) is True
    assert b24.document(2)["status"] == "N"
    assert_error(b24.call("catalog.document.cancel", {"id": 2}), 400, "0",
                 "Ошибка отмены проведения документа: Документ еще не проведен")
    assert_error(b24.call("catalog.document.cancel", {"id": 404}), 400, "0",
                 "Недостаточно прав для сохранения документа")
    b24.control("POST", "reset")
    assert b24.control("GET", "config")["language"] == "en"


def test_conduct_brings_a_cancelled_document_back(b24: Portal) -> None:
    b24.ok("catalog.document.cancel", {"id": 7})
    assert b24.ok("catalog.document.conduct", {"id": 7}) is True
    assert b24.document(7)["status"] == "Y"
    answer = b24.call("catalog.document.conduct", {"id": 7})
    assert_error(answer, 400, "0")
    assert "already been conducted" in answer.json()["error_description"]


def test_cancel_list_keeps_successes_and_reports_only_the_first_error(b24: Portal) -> None:
    b24.ok("catalog.document.cancel", {"id": 2})
    title = b24.document(2)["title"]
    answer = b24.call("catalog.document.cancelList", {"documentIds": [1, 2, 3, 999]})
    assert_error(answer, 400, "0",
                 f'An error occurred while canceling the document "{title}": '
                 "The document has not been processed yet")
    assert [b24.document(i)["status"] for i in (1, 2, 3)] == ["C", "C", "C"]
    assert b24.ok("catalog.document.cancelList", {"documentIds": [4, 5]}) is True
    assert_error(b24.call("catalog.document.cancelList", {"documentIds": [999]}), 400, "0",
                 "Error canceling the document: Document not found")
    assert_error(b24.call("catalog.document.cancelList"), 400, "100",
                 "Could not find value for parameter {documentIds}")


def test_cancel_list_quotes_titles_html_escaped(b24: Portal) -> None:
    b24.control("POST", "documents", {"documents": [{"id": 30, "docType": "A", "title": 'Tom & "Jerry"'}]})
    b24.control("POST", "permissions", {"deny_cancel_doc_types": ["A"]})
    assert_error(b24.call("catalog.document.cancelList", {"documentIds": [30]}), 400, "0",
                 'An error occurred while canceling the document "Tom &amp; &quot;Jerry&quot;": '
                 "Insufficient permissions to save the document")


def test_conduct_list(b24: Portal) -> None:
    b24.ok("catalog.document.cancelList", {"documentIds": [1, 2]})
    assert b24.ok("catalog.document.conductList", {"documentIds": [1, 2]}) is True
    answer = b24.call("catalog.document.conductList", {"documentIds": [1]})
    assert_error(answer, 400, "0")
    assert "already been conducted" in answer.json()["error_description"]


def test_add_get_fields_and_mode_status(b24: Portal) -> None:
    added = b24.ok("catalog.document.add", {"fields": {"docType": "R", "title": "Return RMA-1",
                                                       "currency": "RUB", "responsibleId": 2}})
    document = added["document"]
    assert document["id"] == 21 and document["status"] == "N" and document["docNumber"] == "DOC-0021"
    assert document["responsibleId"] == 2
    assert_error(b24.call("catalog.document.add", {"fields": {"docType": "U", "currency": "RUB",
                                                               "responsibleId": 1}}), 400, "0",
                 "DOC_TYPE isn't available")
    fields = b24.ok("catalog.document.getFields")["document"]
    assert fields["status"] == {"type": "char", "isRequired": False, "isReadOnly": True, "isImmutable": False}
    assert fields["docType"]["isRequired"] and fields["docType"]["isImmutable"]
    assert b24.ok("catalog.document.mode.status") == "Y"


def test_add_checks_required_fields_first(b24: Portal) -> None:
    # The REST view checks required fields before the action: "Required fields: ..." in field order.
    assert_error(b24.call("catalog.document.add", {"fields": {"title": "x"}}), 400, "0",
                 "Required fields: docType, responsibleId, currency")
    assert_error(b24.call("catalog.document.add", {"fields": {"docType": "U"}}), 400, "0",
                 "Required fields: responsibleId, currency")
    assert_error(b24.call("catalog.document.add", {"fields": {"DOC_TYPE": "A", "CURRENCY": "RUB",
                                                              "RESPONSIBLE_ID": 1}}), 400, "0",
                 "Required fields: docType, responsibleId, currency")  # keys are matched as camelCase
    assert_error(b24.call("catalog.document.add", {"fields": {"docType": "A", "currency": None,
                                                              "responsibleId": 1}}), 400, "0",
                 "Required fields: currency")
    assert len(b24.control("GET", "documents")) == 20
    added = b24.ok("catalog.document.add", {"fields": {"docType": "A", "currency": "RUB", "responsibleId": "2",
                                                       "status": "Y", "id": 99, "nope": 1}})["document"]
    assert (added["id"], added["status"], added["responsibleId"]) == (21, "N", 2)
    assert added["title"] is None and added["total"] is None  # empty values print as null


def test_document_controller_actions(b24: Portal) -> None:
    # No `get` in Bitrix\Catalog\Controller\Document: the engine's "unknown action" error.
    assert_error(b24.call("catalog.document.get", {"id": 1}), 400, "22002",
                 "Could not find description of get in Bitrix\\Catalog\\Controller\\Document")
    # The deprecated names still work and run the same code as cancel / conduct / getFields.
    assert b24.ok("catalog.document.unconfirm", {"id": 1}) is True
    assert b24.document(1)["status"] == "C"
    assert_error(b24.call("catalog.document.unconfirm", {"id": 1}), 400, "0",
                 "Error cancelling document conduct: Document has not been conducted yet")
    assert b24.ok("catalog.document.confirm", {"id": 1}) is True
    assert b24.document(1)["status"] == "Y"
    fields = b24.ok("catalog.document.fields")
    assert isinstance(fields, list) and fields[0] == b24.ok("catalog.document.getFields")["document"]
    assert b24.control("GET", "calls?method=catalog.document.unconfirm")[0]["method"] == "catalog.document.unconfirm"


def test_get_fields_follow_the_core_view(b24: Portal) -> None:
    fields = b24.ok("catalog.document.getFields")["document"]
    assert list(fields) == ["id", "docType", "siteId", "responsibleId", "dateModify", "dateCreate", "createdBy",
                            "modifiedBy", "currency", "status", "dateStatus", "dateDocument", "statusBy",
                            "total", "commentary", "title", "docNumber"]
    required = {name for name, info in fields.items() if info["isRequired"]}
    read_only = {name for name, info in fields.items() if info["isReadOnly"]}
    immutable = {name for name, info in fields.items() if info["isImmutable"]}
    assert required == {"docType", "responsibleId", "currency"}
    assert read_only == {"id", "status", "dateStatus"}
    assert immutable == {"docType", "dateCreate", "createdBy", "currency"}
    assert fields["total"]["type"] == "double" and fields["commentary"]["type"] == "char"


def test_cancel_list_refuses_an_invisible_document_by_title(b24: Portal) -> None:
    # cancelList reads the documents without the access filter: an invisible one is found, then
    # refused by the rights check with its title (not "Document not found").
    b24.control("POST", "permissions", {"hidden_document_ids": [4]})
    title = b24.document(4)["title"]
    assert_error(b24.call("catalog.document.cancelList", {"documentIds": [4, 5]}), 400, "0",
                 f'An error occurred while canceling the document "{title}": '
                 "Insufficient permissions to save the document")
    assert b24.document(4)["status"] == "Y" and b24.document(5)["status"] == "C"


# -- chat ------------------------------------------------------------------------------------

def test_message_add_stores_and_reads_back_newest_first(b24: Portal) -> None:
    first = b24.ok("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "[b]Cancelled[/b] DOC-0001"})
    second = b24.ok("im.message.add", {"DIALOG_ID": "chat1", "ATTACH": [{"MESSAGE": "only an attachment"}]})
    assert isinstance(first, int) and second > first
    stored = b24.control("GET", "messages")
    assert [m["id"] for m in stored] == [first, second]
    assert stored[0]["dialog_id"] == "chat1" and stored[0]["author_id"] == 1
    assert stored[0]["message"] == "[b]Cancelled[/b] DOC-0001" and stored[1]["attach"]
    history = b24.ok("im.dialog.messages.get", {"DIALOG_ID": "chat1", "LIMIT": 10})
    assert [m["id"] for m in history["messages"]] == [second, first]
    assert set(history["messages"][0]) == {"id", "chat_id", "author_id", "date", "text", "params"}
    assert history["chat_id"] == 1 and isinstance(history["users"], list)


def test_message_errors(b24: Portal) -> None:
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat1"}), 400, "MESSAGE_EMPTY")
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "  "}), 400, "MESSAGE_EMPTY")
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat99", "MESSAGE": "x"}), 400, "CHAT_ID")
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "77", "MESSAGE": "x"}), 400, "USER_NOT_FOUND")
    b24.control("POST", "chats", {"id": "chat7", "members": [2, 3]})
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat7", "MESSAGE": "x"}), 400, "ACCESS_ERROR",
                 "Action unavailable")
    b24.control("POST", "permissions", {"chat_members": {"chat7": [1, 2]}})
    assert isinstance(b24.ok("im.message.add", {"DIALOG_ID": "chat7", "MESSAGE": "x"}), int)
    b24.control("POST", "permissions", {"chat_members": {"chat1": [2]}})
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "x"}), 400, "ACCESS_ERROR")
    assert b24.control("GET", "messages")[-1]["dialog_id"] == "chat7"


def test_dialog_get_answers_members_only(b24: Portal) -> None:
    chat = b24.ok("im.dialog.get", {"DIALOG_ID": "chat1"})
    assert chat["id"] == "1" and chat["title"] == "Inventory reports" and chat["type"] == "chat"
    assert {"owner", "extranet", "avatar", "color", "entity_type", "date_create", "message_type"} <= set(chat)
    assert b24.ok("im.dialog.get", {"dialog_id": "2"})["type"] == "private"  # any case, as im.* methods
    assert_error(b24.call("im.dialog.get", {}), 400, "DIALOG_ID_EMPTY", "Dialog ID can't be empty")
    assert_error(b24.call("im.dialog.get", {"DIALOG_ID": "chat99"}), 400, "ACCESS_ERROR",
                 "You do not have access to the specified dialog")
    b24.control("POST", "permissions", {"chat_members": {"chat1": [2]}})
    assert_error(b24.call("im.dialog.get", {"DIALOG_ID": "chat1"}), 400, "ACCESS_ERROR",
                 "You do not have access to the specified dialog")
    b24.control("POST", "permissions", {"scopes": ["catalog"]})
    assert_error(b24.call("im.dialog.get", {"DIALOG_ID": "chat1"}), 403, "insufficient_scope")


def test_private_dialog_and_truncation(b24: Portal) -> None:
    assert isinstance(b24.ok("im.message.add", {"DIALOG_ID": "2", "MESSAGE": "hello"}), int)
    b24.ok("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "x" * 25_000})
    stored = b24.control("GET", "messages")
    assert stored[0]["dialog_id"] == "2"
    assert len(stored[1]["message"]) == 20_000 and stored[1]["message"].endswith(" (...)")


# -- CRM, sale, scope, unknown methods -------------------------------------------------------

def test_crm_item_and_shipment(b24: Portal) -> None:
    b24.control("POST", "crm/items", {"entityTypeId": 2, "id": 12,
                                      "fields": {"stageId": "C1:LOSE", "ufCrm_InventoryDocs": [3, 4]}})
    item = b24.ok("crm.item.get", {"entityTypeId": 2, "id": 12})["item"]
    assert item == {"id": 12, "stageId": "C1:LOSE", "ufCrm_InventoryDocs": [3, 4]}
    assert_error(b24.call("crm.item.get", {"entityTypeId": 2, "id": 13}), 400, "NOT_FOUND",
                 "Element not found")
    b24.control("POST", "sale/shipments", {"id": 7, "fields": {"deducted": "N", "orderId": 5}})
    assert b24.ok("sale.shipment.get", {"id": 7})["shipment"] == {"id": 7, "deducted": "N", "orderId": 5}
    assert_error(b24.call("sale.shipment.get", {"id": 8}), 400, "201140400001", "shipment is not exists")


def test_crm_item_and_shipment_fields_read_back_in_camel_case(b24: Portal) -> None:
    b24.control("POST", "crm/items", {"entityTypeId": 2, "id": 14, "fields": {
        "STAGE_ID": "C1:LOSE", "ASSIGNED_BY_ID": 1, "UF_CRM_1712345678": [3], "ID": 99, "ufCrm_Docs": [4]}})
    assert b24.ok("crm.item.get", {"entityTypeId": 2, "id": 14})["item"] == {
        "id": 14, "stageId": "C1:LOSE", "assignedById": 1, "ufCrm_1712345678": [3], "ufCrm_Docs": [4]}
    b24.control("POST", "crm/items", {"entityTypeId": 1032, "id": 1, "fields": {"UF_CRM_5_DOCS": "7"}})
    assert b24.ok("crm.item.get", {"entityTypeId": 1032, "id": 1})["item"] == {"id": 1, "ufCrm5_DOCS": "7"}
    b24.control("POST", "sale/shipments", {"id": 9, "fields": {"DEDUCTED": "N", "EMP_DEDUCTED_ID": 2}})
    assert b24.ok("sale.shipment.get", {"id": 9})["shipment"] == {"id": 9, "deducted": "N", "empDeductedId": 2}


def test_scope_and_insufficient_scope_and_unknown_method(b24: Portal) -> None:
    assert b24.ok("scope") == ["catalog", "im", "crm", "sale"]
    b24.control("POST", "permissions", {"scopes": ["catalog"]})
    assert_error(b24.call("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "x"}), 403,
                 "insufficient_scope")
    assert b24.ok("catalog.document.mode.status") == "Y"
    assert_error(b24.call("no.such.method", {"id": 1}), 404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
    b24.control("POST", "permissions", {"scopes": ["im"]})
    assert_error(b24.call("catalog.document.get", {"id": 1}), 403, "insufficient_scope")


def test_wrong_webhook_is_refused(b24: Portal) -> None:
    answer = b24.http.post(f"{b24.url}/rest/1/wrong-code/catalog.document.cancel", json={"id": 1})
    assert_error(answer, 401, "NO_AUTH_FOUND", "Wrong authorization data")
    answer = b24.http.post(f"{b24.url}/rest/2/sandbox/scope", json={})
    assert_error(answer, 401, "NO_AUTH_FOUND")
    assert b24.document(1)["status"] == "Y"


# -- batch -----------------------------------------------------------------------------------

def test_batch_with_object_commands(b24: Portal) -> None:
    answer = b24.call("batch", {"halt": 0, "cmd": {
        "find": "catalog.document.list?filter[id]=2&select[]=id&select[]=status",
        "cancel": "catalog.document.cancel?id=$result[find][documents][0][id]",
        "again": "catalog.document.cancel?id=2",
        "post": "im.message.add?DIALOG_ID=chat1&MESSAGE=a%20%26%20b",
    }})
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"result", "time"} and set(body["time"]) == TIME_KEYS
    batch = body["result"]
    assert set(batch) == {"result", "result_error", "result_total", "result_next", "result_time"}
    assert batch["result"]["find"] == {"documents": [{"id": 2, "status": "Y"}]}
    assert batch["result"]["cancel"] is True
    assert batch["result_error"]["again"]["error"] == "0"
    assert batch["result_total"] == {"find": 1}
    assert batch["result_next"] == []
    assert set(batch["result_time"]) == {"find", "cancel", "post"}
    assert set(batch["result_time"]["cancel"]) == TIME_KEYS
    assert b24.document(2)["status"] == "C"
    assert b24.control("GET", "messages")[0]["message"] == "a & b"


def test_batch_with_array_commands_and_form_encoding(b24: Portal) -> None:
    answer = b24.http.post(b24.webhook + "batch", data={
        "cmd[0]": "catalog.document.cancel?id=1", "cmd[1]": "catalog.document.cancel?id=1",
        "cmd[2]": "catalog.document.mode.status",
    })
    batch = answer.json()["result"]
    assert batch["result"] == {"0": True, "2": "Y"}
    assert list(batch["result_error"]) == ["1"]
    answer = b24.call("batch", {"cmd": ["catalog.document.cancel?id=3", "catalog.document.mode.status"]})
    assert answer.json()["result"]["result"] == [True, "Y"]
    assert answer.json()["result"]["result_error"] == []


def test_batch_halt_stops_at_the_first_error(b24: Portal) -> None:
    batch = b24.ok("batch", {"halt": 1, "cmd": {"a": "catalog.document.cancel?id=999",
                                                "b": "catalog.document.cancel?id=1"}})
    assert list(batch["result_error"]) == ["a"] and batch["result"] == []
    assert b24.document(1)["status"] == "Y"


def test_batch_limits_and_nesting(b24: Portal) -> None:
    commands = {f"c{i}": "catalog.document.mode.status" for i in range(55)}
    commands["c1"] = "batch?cmd[x]=scope"
    batch = b24.ok("batch", {"cmd": commands})
    assert len(batch["result"]) == 49
    assert batch["result_error"]["c1"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    over = {k: v for k, v in batch["result_error"].items() if k != "c1"}
    assert list(over) == [f"c{i}" for i in range(50, 55)]
    assert all(e == {"error": "ERROR_BATCH_LENGTH_EXCEEDED", "error_description": "Max batch length exceeded"}
               for e in over.values())
    commands["c1"] = "scope"
    halted = b24.ok("batch", {"halt": 1, "cmd": commands})
    assert len(halted["result"]) == 50 and list(halted["result_error"]) == ["c50"]


def test_batch_logs_inner_calls_with_their_parent(b24: Portal) -> None:
    b24.ok("batch", {"cmd": {"a": "catalog.document.cancel?id=1", "b": "nope.method"}})
    calls = b24.control("GET", "calls")
    parent = next(c for c in calls if c["method"] == "batch")
    inner = [c for c in calls if c["batch"] == parent["seq"]]
    assert [(c["method"], c["http_status"], c["error"]) for c in inner] == [
        ("catalog.document.cancel", 200, None), ("nope.method", 404, "ERROR_METHOD_NOT_FOUND")]
    assert inner[0]["params"] == {"id": "1"} and inner[0]["seq"] > parent["seq"]
    only = b24.control("GET", "calls?method=catalog.document.cancel")
    assert [c["batch"] for c in only] == [parent["seq"]]


# -- control and inspection API --------------------------------------------------------------

def test_calls_stats_and_secrets(b24: Portal) -> None:
    b24.ok("catalog.document.cancel", {"id": 1})
    b24.call("catalog.document.cancel", {"id": 1})
    b24.call("no.such.method")
    calls = b24.control("GET", "calls")
    assert [(c["method"], c["http_status"], c["error"], c["auth"], c["applied"]) for c in calls] == [
        ("catalog.document.cancel", 200, None, "webhook", True),
        ("catalog.document.cancel", 400, "0", "webhook", False),
        ("no.such.method", 404, "ERROR_METHOD_NOT_FOUND", "webhook", False)]
    assert calls[0]["params"] == {"id": 1} and calls[0]["batch"] is None
    assert [c["seq"] for c in calls] == sorted(c["seq"] for c in calls)
    assert "sandbox" not in str([c["params"] for c in calls])
    stats = b24.control("GET", "stats")
    assert stats["requests"] == 3
    assert stats["by_method"]["catalog.document.cancel"] == 2
    assert stats["by_error"] == {"0": 1, "ERROR_METHOD_NOT_FOUND": 1}
    assert stats["by_status"] == {"200": 1, "400": 1, "404": 1}
    assert stats["oauth_refreshes"] == 0


def test_control_documents(b24: Portal) -> None:
    made = b24.control("POST", "documents", {"documents": [
        {"docType": "R", "title": "Return RMA-7"},
        {"id": 3, "docType": "D", "status": "N", "docNumber": "WO-3"}]})["documents"]
    assert made[0]["id"] == 21 and made[0]["status"] == "Y" and made[0]["docNumber"] == "DOC-0021"
    assert b24.document(3)["docNumber"] == "WO-3" and b24.document(3)["status"] == "N"
    missing = b24.http.get(f"{b24.url}/_sandbox/documents/999")
    assert missing.status_code == 404 and "error" in missing.json()
    bad = b24.http.post(f"{b24.url}/_sandbox/documents", json={"documents": [{"status": "Q"}]})
    assert bad.status_code == 400


def test_reset_restores_everything(b24: Portal) -> None:
    b24.ok("catalog.document.cancel", {"id": 1})
    b24.ok("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": "x"})
    b24.control("POST", "permissions", {"deny_warehouse": True, "scopes": ["im"]})
    b24.control("POST", "config", {"latency": 1.5})
    b24.control("POST", "faults", {"rules": [{"kind": "error500"}]})
    b24.control("POST", "reset")
    assert b24.document(1)["status"] == "Y"
    assert b24.control("GET", "messages") == [] and b24.control("GET", "calls") == []
    assert b24.control("GET", "faults") == {"rules": []}
    assert b24.control("GET", "config")["latency"] == 0
    assert b24.ok("catalog.document.cancel", {"id": 1}) is True
    assert b24.control("GET", "stats")["requests"] == 1


def test_latency_is_added_to_every_answer(b24: Portal) -> None:
    b24.control("POST", "config", {"latency": 0.3})
    answer = b24.call("catalog.document.mode.status")
    assert answer.status_code == 200 and answer.elapsed.total_seconds() >= 0.3


def test_page_shows_documents_chat_and_failed_calls(b24: Portal) -> None:
    b24.ok("catalog.document.cancel", {"id": 1})
    message = "[b]Done[/b] [url=http://127.0.0.1/x?a=1&b=2]DOC-0001[/url] <script>"
    b24.ok("im.message.add", {"DIALOG_ID": "chat1", "MESSAGE": message})
    b24.call("catalog.document.cancel", {"id": 1})
    page = b24.http.get(b24.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert 'http-equiv="refresh" content="2"' in text
    assert "DOC-0001" in text and "cancelled" in text
    assert "<b>Done</b>" in text and 'href="http://127.0.0.1/x?a=1&amp;b=2"' in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "catalog.document.cancel" in text
