"""The report job: post one chat message per request, never twice.

`im.message.add` is not idempotent. Before a post the record notes that a post of this round is under
way; if that post got no answer (timeout, dropped connection, 5xx), the next attempt looks for the
report's marker in the chat's recent messages before it posts again.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import redis
from rq import Retry

from bitrix24.client import Bitrix24Client
from bitrix24.errors import Bitrix24Error, Throttled
from jobs import records, report
from jobs.context import job_connection, worker_context
from jobs.lifecycle import defer, exclusively, final_failure, retry_later

log = logging.getLogger("b24cancel.jobs")

# Looking for an unanswered post: messages per page (Bitrix24's maximum), how many pages at most, and how
# far the portal's clock may differ from ours.
HISTORY_LIMIT = 50
HISTORY_PAGES = 10
CLOCK_SKEW = 300.0


def post_report(request_id: str) -> dict[str, Any] | Retry:
    """Post the request's report to its chat and mark the request done (or failed); one run at a time."""
    conn = job_connection()
    return exclusively(conn, "notify", request_id, lambda lease: run_report(conn, request_id))


def run_report(conn: redis.Redis, request_id: str) -> dict[str, Any] | Retry:
    """The report job's work, under the request's lease."""
    record = records.load(conn, request_id)
    if record is None:
        return {"skipped": "record expired"}
    round_ = int(record.get("round", 1))
    if int(record.get("reported_round", 0)) >= round_:
        if record["state"] not in ("done", "failed"):  # a cancel job that ran again after the report
            records.save(conn, request_id, state=final_state(record))
        return {"message_id": record.get("message_id"), "already": True}
    ctx = worker_context()
    portal = ctx.settings.portal(record["request"]["portal"])
    if portal is None:
        records.save(conn, request_id, state="failed", report_error="portal not configured")
        final_failure(f"request {request_id}: portal not configured; report not posted")
    chat = record["request"].get("chat") or portal.chat
    tag = report.marker(request_id, round_)
    client = ctx.client(portal, conn)
    try:
        message_id = None
        if record.get("report_sent") == str(round_):
            message_id = find_posted(client, chat, tag, since=float(record.get("report_sent_at") or 0))
        if message_id is None:
            records.save(conn, request_id, report_sent=str(round_), report_sent_at=records.now_text())
            message_id = send(client, conn, request_id, chat, report.render(record, portal, round_))
    except Throttled as wait:
        return defer(conn, request_id, wait.until, wait.reason)
    except Bitrix24Error as err:
        retry = retry_later(conn, request_id, err, "report_failures")
        if retry is not None:
            return retry
        advice = f" {err.advice}" if err.advice else ""
        records.save(conn, request_id, state="failed", report_error=f"{err.code}: {err.description}.{advice}",
                     finished_at=records.now_text(), waiting_for="", resume_at="")
        final_failure(f"request {request_id}: report not posted: {err}")
    records.save(conn, request_id, message_id=str(message_id), reported_round=str(round_),
                 state=final_state(record), finished_at=records.now_text(),
                 waiting_for="", resume_at="")
    log.info("report posted", extra={"request_id": request_id, "portal": portal.name, "message_id": message_id})
    return {"message_id": message_id}


def final_state(record: dict[str, Any]) -> str:
    """A reported request is done, or failed when a document (or the event's object) could not be handled."""
    documents = record.get("documents") or []
    if not documents and record.get("error"):
        return "failed"
    return "failed" if any(doc.get("outcome") == "failed" for doc in documents) else "done"


def send(client: Bitrix24Client, conn: redis.Redis, request_id: str, chat: str, text: str) -> int:
    """Post the message; a refusal that provably did not run clears the in-flight note."""
    try:
        answer = client.call("im.message.add", {"DIALOG_ID": chat, "MESSAGE": text, "URL_PREVIEW": "N"})
    except Bitrix24Error as err:
        if not err.ambiguous:
            records.save(conn, request_id, report_sent="")
        raise
    except Throttled:
        records.save(conn, request_id, report_sent="")
        raise
    return int(answer.result)


def find_posted(client: Bitrix24Client, chat: str, tag: str, since: float) -> int | None:
    """The id of a message in the chat that carries the report's tag, if an earlier post did land.

    Pages back from the newest message until it passes the time of the unanswered post (a busy chat may
    have moved on since), at most HISTORY_PAGES pages.
    """
    last_id: int | None = None
    for _ in range(HISTORY_PAGES):
        params: dict[str, Any] = {"DIALOG_ID": chat, "LIMIT": HISTORY_LIMIT}
        if last_id is not None:
            params["LAST_ID"] = last_id
        answer = client.call("im.dialog.messages.get", params)
        messages = answer.result.get("messages", []) if isinstance(answer.result, dict) else []
        for message in messages:
            text = str(message.get("text", ""))
            if text.endswith(tag) or f"{tag} " in text or f"{tag}\n" in text:
                return int(message["id"])
        if len(messages) < HISTORY_LIMIT or _posted_at(messages[-1]) < since - CLOCK_SKEW:
            return None
        last_id = int(messages[-1]["id"])
    return None


def _posted_at(message: dict[str, Any]) -> float:
    """A message's time as unix seconds (0 when it cannot be read, which ends the search)."""
    try:
        return datetime.fromisoformat(str(message.get("date"))).timestamp()
    except ValueError:
        return 0.0
