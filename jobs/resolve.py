"""The resolve job: turn a Bitrix24 event into documents to cancel, by the portal's rules.

No Bitrix24 event names an inventory document; events carry an object id (a deal, a shipment). A
rule says which method reads the object, which field values make it match, and where the documents
are: a field holding ids, or a lookup by document number. What was read and why it matched (or not)
is recorded on the request, so its status explains every document.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from rq import Retry

from bitrix24.errors import Bitrix24Error, Throttled
from jobs import policy, records
from jobs.context import job_connection, worker_context
from jobs.details import READ_FAILED
from jobs.enqueue import enqueue_followup
from jobs.lifecycle import defer, exclusively, final_failure, retry_later

log = logging.getLogger("b24cancel.jobs")

# Objects' fields worth keeping on the record when they are not named by a rule (ids and stages).
KEEP_FIELDS = ("id", "title", "stageId", "categoryId", "deducted", "accountNumber", "orderId")


def resolve_event(request_id: str) -> dict[str, Any] | Retry:
    """Read the event's object, apply the rules, and hand the documents to the cancel job."""
    conn = job_connection()
    return exclusively(conn, "resolve", request_id, lambda lease: run_resolve(conn, request_id))


def run_resolve(conn: Any, request_id: str) -> dict[str, Any] | Retry:
    """The resolve job's work, under the request's lease."""
    record = records.load(conn, request_id)
    if record is None:
        return {"skipped": "record expired"}
    if record["state"] == "failed":  # only a failed resolve job ends a request here: this run is a replay
        record = start_replay(conn, request_id, record)
    elif (record.get("resolution") or {}).get("error"):  # an earlier run failed the read; its report is on its way
        final_failure(f"request {request_id}: {record['resolution']['error']}")
    if record.get("resolution"):
        return continue_with(conn, request_id, record)
    request = record["request"]
    ctx = worker_context()
    portal = ctx.portal(request["portal"], conn)
    if portal is None:
        why = ctx.portal_gone_reason(request["portal"], conn)
        records.save(conn, request_id, state="failed", error=why, finished_at=records.now_text())
        final_failure(f"request {request_id}: portal {request['portal']!r}: {why}")
    client = ctx.client(portal, conn)
    records.save(conn, request_id, state="running")
    records.increment(conn, request_id, "attempts")
    checks: list[dict[str, Any]] = []
    try:
        for index, rule in enumerate(portal.rules):
            if rule["event"] != request["event"]:
                continue
            obj = read_object(client, rule, request["object_id"])
            check = evaluate(rule, obj, index)
            checks.append(check)
            if check["matched"]:
                documents(client, rule, obj, check)
                break
    except Throttled as wait:
        return defer(conn, request_id, wait.until, wait.reason)
    except Bitrix24Error as err:
        retry = retry_later(conn, request_id, err, "transient_failures")
        if retry is not None:
            return retry
        records.save(conn, request_id, error=READ_FAILED.format(error=err),
                     resolution={"event": request["event"], "object_id": request["object_id"],
                                 "rules": checks, "error": str(err)})
        # the chat hears of it too: the report job marks the request failed once it has posted
        enqueue_followup(conn, policy.NOTIFY_QUEUE, "jobs.notify.post_report", request_id,
                         policy.notify_job_id(request_id))
        final_failure(f"request {request_id}: {err}")
    matched = next((check for check in checks if check["matched"]), None)
    resolution = {"event": request["event"], "object_id": request["object_id"], "rules": checks,
                  "matched_rule": matched["rule"] if matched else None,
                  "link_key": matched["link_key"] if matched else None}
    record["resolution"] = resolution
    docs: list[dict[str, Any]] = []
    if matched:
        docs = [{"id": doc_id, "outcome": None, "detail": None} for doc_id in matched.get("document_ids", [])]
        docs += [{"id": None, "number": number, "outcome": None, "detail": None}
                 for number in matched.get("document_numbers", [])]
        request["reason"] = matched["reason"]
    records.save(conn, request_id, resolution=resolution, documents=docs, request=request)
    return continue_with(conn, request_id, records.load(conn, request_id) or record)


def start_replay(conn: Any, request_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """An operator requeued an event that failed: forget what was read, so the object is read again.

    When that failure was reported, the replay is a new round, with a report of its own.
    """
    round_ = int(record.get("round", 1))
    if int(record.get("reported_round", 0)) >= round_:
        round_ += 1
    conn.hdel(records.request_key(request_id), "resolution")
    records.save(conn, request_id, round=str(round_), transient_failures="0", report_failures="0",
                 error="", report_error="", state="queued")
    log.info("replaying a failed event", extra={"request_id": request_id, "round": round_})
    return records.load(conn, request_id) or record


def continue_with(conn: Any, request_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """After resolution: enqueue the cancel job, or end the request when there is nothing to cancel."""
    if not record["documents"]:
        records.save(conn, request_id, state="done", finished_at=records.now_text())
        why = "no rule matched" if record["resolution"].get("matched_rule") is None else "the rule found no document"
        log.info("event needs no cancel", extra={"request_id": request_id, "why": why})
        return {"documents": 0, "why": why}
    records.save(conn, request_id, state="queued")
    enqueue_followup(conn, policy.CANCEL_QUEUE, "jobs.cancel.cancel_documents", request_id,
                     policy.cancel_job_id(request_id))
    return {"documents": len(record["documents"])}


def read_object(client: Any, rule: dict[str, Any], object_id: int) -> dict[str, Any]:
    """Call the rule's read method with its params and the object id; unwrap {"item": {...}} shapes."""
    answer = client.call(rule["read"], {**rule.get("params", {}), "id": object_id})
    result = answer.result
    if isinstance(result, dict) and len(result) == 1:
        (inner,) = result.values()
        if isinstance(inner, dict):
            result = inner
    return result if isinstance(result, dict) else {}


def evaluate(rule: dict[str, Any], obj: dict[str, Any], index: int) -> dict[str, Any]:
    """Whether every `when` field matches one of its values; each check recorded."""
    fields: dict[str, Any] = {}
    matched = True
    for name, expected in (rule.get("when") or {}).items():
        allowed = expected if isinstance(expected, list) else [expected]
        value = obj.get(name)
        ok = str(value) in {str(item) for item in allowed}
        fields[name] = {"value": value, "expected": allowed, "ok": ok}
        matched = matched and ok
    link_key = rule["read"] + (f":{rule['params']['entityTypeId']}" if "entityTypeId" in rule.get("params", {})
                               else "")
    kept = {name: obj.get(name) for name in KEEP_FIELDS if name in obj}
    return {"rule": index, "read": rule["read"], "object": kept, "when": fields, "matched": matched,
            "link_key": link_key}


def documents(client: Any, rule: dict[str, Any], obj: dict[str, Any], check: dict[str, Any]) -> None:
    """Fill the check with the documents the rule points at, and the reason text."""
    values = {**{k: v for k, v in obj.items() if isinstance(v, (str, int, float))}, "event": rule["event"]}
    check["reason"] = safe_format(rule.get("reason") or "{event} {id}", values)
    if rule.get("documents_field"):
        raw = obj.get(rule["documents_field"])
        items = raw if isinstance(raw, list) else [raw] if raw not in (None, "", 0, "0") else []
        ids = []
        for item in items:
            doc_id = strict_document_id(item)
            if doc_id is not None and doc_id not in ids:
                ids.append(doc_id)
        check["document_ids"] = ids[:policy.MAX_DOCUMENTS]
        check["documents_from"] = {"field": rule["documents_field"], "value": raw}
        return
    numbers = [safe_format(template, values) for template in (rule.get("documents_by") or {}).values()]
    check["document_numbers"] = [number for number in numbers if number]
    check["documents_from"] = {"by": rule.get("documents_by")}


# A document id as a CRM field holds it: an int, or a string of ASCII digits (nothing int() would also take:
# True, 12.9, "1_0", " 7", "٣"). Bitrix24 ids are 32-bit signed integers.
DOCUMENT_ID_TEXT = re.compile(r"[0-9]{1,10}", re.ASCII)
MAX_DOCUMENT_ID = 2**31 - 1


def strict_document_id(value: Any) -> int | None:
    """A positive document id from a CRM value, or None when the value is not plainly one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        doc_id = value
    elif isinstance(value, str) and DOCUMENT_ID_TEXT.fullmatch(value):
        doc_id = int(value)
    else:
        return None
    return doc_id if 0 < doc_id <= MAX_DOCUMENT_ID else None


def safe_format(template: str, values: dict[str, Any]) -> str:
    """str.format with missing names left empty, never an exception."""

    class Missing(dict[str, Any]):
        def __missing__(self, key: str) -> str:
            return ""

    try:
        return template.format_map(Missing(values))
    except (ValueError, IndexError, AttributeError, TypeError, KeyError):
        return template
