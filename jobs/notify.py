"""The report job: post one chat message per request, never twice.

`im.message.add` is not idempotent, and a post that got no answer may still be running on Bitrix24's
side for up to its execution limit. So before a post the record durably notes the round being posted,
when, and a fresh secret nonce that the message carries on its last line. If that post got no answer
(timeout, dropped connection, 5xx) or the job died during it, the next try is scheduled for when the
post can no longer be running (`policy.settled_after`); only then is the chat searched for a message
written by the service's own user that ends with that line. Found: the request is done with that
message. Not found: it is posted again, once.

A request's reports form one thread: the first report posted for it starts it (`first_message_id` on the
record), and every later one (a replay's report, the follow-up of a failed request) is posted as a reply
to it (`REPLY_ID`), under the same rules.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
from rq import Retry

from bitrix24.client import Bitrix24Client
from bitrix24.errors import Bitrix24Error, Throttled
from jobs import app as app_jobs
from jobs import policy, records, report
from jobs.context import job_connection, worker_context
from jobs.durability import durable
from jobs.lifecycle import defer, exclusively, final_failure, retry_later
from settings import WEBHOOK_PATH, Portal

log = logging.getLogger("b24cancel.jobs")

# Looking for an unanswered post: messages per page (Bitrix24's maximum), how many pages at most, and how
# far the portal's clock may differ from ours.
HISTORY_LIMIT = 50
HISTORY_PAGES = 10
CLOCK_SKEW = 300.0
# im.message.add refuses a REPLY_ID it cannot use (the message was deleted, or the report chat changed) before
# posting anything: the report is then posted on its own.
REPLY_REFUSALS = frozenset({"REPLY_ACCESS_ERROR", "REPLY_FROM_OTHER_CHAT_ERROR"})
# The report nonce: 64 random bits, far beyond guessing within a report's life, short enough to read past.
NONCE_BYTES = 8
# An OAuth app's own user id (from `profile`) is kept this long: it changes only if the app is reinstalled
# by someone else, and a day-old answer costs at worst one more lookup that finds nothing and posts.
SERVICE_USER_TTL = 86400
SERVICE_USER_KEY = "b24c:service-user:"


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
    workflow_pending = bool(record["request"].get("event_token")) and \
        (record.get("workflow_state") or "") not in app_jobs.WORKFLOW_DONE
    if int(record.get("reported_round", 0)) >= round_ and not workflow_pending:
        if record["state"] not in ("done", "failed"):  # a cancel job that ran again after the report
            records.save(conn, request_id, state=final_state(record))
        return {"message_id": record.get("message_id"), "already": True}
    ctx = worker_context()
    portal = ctx.portal(record["request"]["portal"], conn)
    if portal is None:
        why = ctx.portal_gone_reason(record["request"]["portal"], conn)
        records.save(conn, request_id, state="failed", report_error=why, finished_at=records.now_text())
        final_failure(f"request {request_id}: {why}; report not posted")
    chat = record["request"].get("chat") or portal.chat
    client = ctx.client(portal, conn)
    limit = ctx.settings.b24_execution_limit
    if workflow_pending:
        # The robot's workflow hears first (it waits on it); the chat report follows, in this same job.
        try:
            waiting = app_jobs.return_to_workflow(conn, client, record, limit, ctx.settings.redis_min_replicas)
        except Throttled as wait:
            return defer(conn, request_id, wait.until, wait.reason)
        if waiting is not None:
            return waiting
        if int(record.get("reported_round", 0)) >= round_:
            return {"message_id": record.get("message_id"), "already": True}
        if not record.get("documents"):  # the robot named no document: the workflow heard it failed; no chat
            records.save(conn, request_id, reported_round=str(round_), state="failed", error=app_jobs.NO_DOCUMENTS,
                         finished_at=records.now_text(), waiting_for="", resume_at="")
            return {"workflow": "told", "documents": 0}
    if chat == app_jobs.NO_CHAT:
        records.save(conn, request_id, reported_round=str(round_), state=final_state(record),
                     finished_at=records.now_text(), waiting_for="", resume_at="")
        return {"chat": "none"}
    nonce = round_nonce(record, round_)
    sent_at = float(record.get("report_sent_at") or 0)
    unanswered = record.get("report_sent") == str(round_) and nonce is not None
    posting = False
    try:
        message_id = None
        if unanswered:
            settled = policy.settled_after(sent_at, limit)
            if time.time() < settled:  # the earlier post may still be running: decide nothing yet
                return defer(conn, request_id, settled, "an unanswered report post may still be running")
            line = report.request_line(request_id, round_, nonce, portal.language)  # type: ignore[arg-type]
            message_id = find_posted(client, chat, line, service_user(conn, client, portal), since=sent_at)
            if message_id is None and int(record.get("report_failures") or 0) > policy.TRANSIENT_RETRY_MAX:
                fail_report(conn, request_id, str(record.get("report_error") or "the report post got no answer"))
        if message_id is None:
            posting = True
            nonce = nonce or secrets.token_hex(NONCE_BYTES)
            sent_at = time.time()
            if not note_post(conn, ctx.settings.redis_min_replicas, request_id, round_, nonce, sent_at):
                return {"skipped": "record expired"}
            message_id = send(client, conn, request_id, chat, report.render(record, portal, round_, nonce),
                              reply_to=thread_of(record))
    except Throttled as wait:
        return defer(conn, request_id, wait.until, wait.reason)
    except Bitrix24Error as err:
        # An unanswered post (or search) may still be running: the next try waits until it cannot be.
        not_before = policy.settled_after(sent_at, limit) if err.ambiguous and sent_at else None
        retry = retry_later(conn, request_id, err, "report_failures", not_before=not_before)
        if retry is not None:
            return retry
        advice = f" {err.advice}" if err.advice else ""
        why = f"{err.code}: {err.description}.{advice}"
        if posting and err.ambiguous:  # out of retries, but this last post may have landed: look once more
            return defer(conn, request_id, policy.settled_after(sent_at, limit), "a last look for the report",
                         report_error=why)
        fail_report(conn, request_id, why)
    records.save(conn, request_id, message_id=str(message_id), reported_round=str(round_),
                 first_message_id=thread_of(record) or str(message_id),
                 state=final_state(record), finished_at=records.now_text(),
                 waiting_for="", resume_at="", report_error="")
    log.info("report posted", extra={"request_id": request_id, "portal": portal.name, "message_id": message_id})
    return {"message_id": message_id}


def fail_report(conn: redis.Redis, request_id: str, why: str) -> NoReturn:
    """The report could not be posted: the request ends failed, saying why, with its job kept for a replay."""
    records.save(conn, request_id, state="failed", report_error=why, finished_at=records.now_text(),
                 waiting_for="", resume_at="")
    final_failure(f"request {request_id}: report not posted: {why}")


def round_nonce(record: dict[str, Any], round_: int) -> str | None:
    """The nonce of this round's report, if one was noted before a post (stored as `<round>:<hex>`)."""
    kept_round, _, nonce = str(record.get("report_nonce") or "").partition(":")
    return nonce if nonce and kept_round == str(round_) else None


def note_post(conn: redis.Redis, replicas: int, request_id: str, round_: int, nonce: str, sent_at: float) -> bool:
    """Durably note, before posting, that this round's report is being posted, when, and with which nonce.

    With REDIS_MIN_REPLICAS, a failover must not lose the note: a lost note would make the next try post
    again without first waiting and searching. Returns False when the record no longer exists.
    """
    [saved] = durable(conn, replicas, lambda pipe: records.save(
        pipe, request_id, report_sent=str(round_), report_sent_at=f"{sent_at:.3f}", report_nonce=f"{round_}:{nonce}"))
    return bool(saved)


def final_state(record: dict[str, Any]) -> str:
    """A reported request is done, or failed when a document (or the event's object) could not be handled."""
    documents = record.get("documents") or []
    if not documents and record.get("error"):
        return "failed"
    return "failed" if any(doc.get("outcome") == "failed" for doc in documents) else "done"


def thread_of(record: dict[str, Any]) -> str | None:
    """The id of the request's first report, which every later report replies to (None before it is posted).

    A record written before threads has only the last report's id (`message_id`, of an earlier round while
    a new round is reported): its reports go on under that one.
    """
    first = str(record.get("first_message_id") or record.get("message_id") or "")
    return first if first.isdigit() else None


def send(client: Bitrix24Client, conn: redis.Redis, request_id: str, chat: str, text: str,
         reply_to: str | None = None) -> int:
    """Post the message (as a reply to `reply_to`); a refusal that provably did not run clears the in-flight note.

    A refused REPLY_ID posted nothing: the report goes out once more, on its own, under the same note.
    """
    params: dict[str, Any] = {"DIALOG_ID": chat, "MESSAGE": text, "URL_PREVIEW": "N"}
    if reply_to:
        params["REPLY_ID"] = int(reply_to)
    try:
        try:
            answer = client.call("im.message.add", params)
        except Bitrix24Error as err:
            if "REPLY_ID" not in params or err.code not in REPLY_REFUSALS:
                raise
            log.warning("the report's thread cannot be replied to; posting it on its own",
                        extra={"request_id": request_id, "error": str(err)})
            del params["REPLY_ID"]
            answer = client.call("im.message.add", params)
    except Bitrix24Error as err:
        if not err.ambiguous:
            records.save(conn, request_id, report_sent="")
        raise
    except Throttled:
        records.save(conn, request_id, report_sent="")
        raise
    return int(answer.result)


def service_user(conn: redis.Redis, client: Bitrix24Client, portal: Portal) -> int:
    """The id of the Bitrix24 user the service posts as: only its messages can be our reports.

    An incoming webhook names its user in its URL (`/rest/<user>/<code>/`). An OAuth app posts as the
    user whose tokens it holds; `profile` (no scope needed) says who that is, cached in Redis.
    """
    if portal.webhook_url:
        match = WEBHOOK_PATH.match(urlsplit(portal.webhook_url).path)
        if match:
            return int(match["user"])
    key = SERVICE_USER_KEY + portal.name
    cached = conn.get(key)
    if cached:
        return int(cached)
    user = int(client.call("profile").result["ID"])
    conn.set(key, user, ex=SERVICE_USER_TTL)
    return user


def find_posted(client: Bitrix24Client, chat: str, line: str, author: int, since: float) -> int | None:
    """The id of the report an earlier post did land, if any: written by `author`, ending with `line`.

    Pages back from the newest message until it passes the time of the unanswered post (a busy chat may
    have moved on since), at most HISTORY_PAGES pages. Messages by anyone else, or that merely contain
    the line (a quoted report, a crafted reason), are not ours.
    """
    last_id: int | None = None
    for _ in range(HISTORY_PAGES):
        params: dict[str, Any] = {"DIALOG_ID": chat, "LIMIT": HISTORY_LIMIT}
        if last_id is not None:
            params["LAST_ID"] = last_id
        answer = client.call("im.dialog.messages.get", params)
        messages = answer.result.get("messages", []) if isinstance(answer.result, dict) else []
        for message in messages:
            if _author(message) == author and str(message.get("text", "")).rstrip().endswith(line):
                return int(message["id"])
        if len(messages) < HISTORY_LIMIT or _posted_at(messages[-1]) < since - CLOCK_SKEW:
            return None
        last_id = int(messages[-1]["id"])
    return None


def _author(message: dict[str, Any]) -> int | None:
    try:
        return int(message.get("author_id"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _posted_at(message: dict[str, Any]) -> float:
    """A message's time as unix seconds (0 when it cannot be read, which ends the search)."""
    try:
        return datetime.fromisoformat(str(message.get("date"))).timestamp()
    except ValueError:
        return 0.0
