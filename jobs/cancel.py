"""The cancel job: un-conduct each document of a request and decide its outcome on facts.

Safe to run twice, and one cancel per document (the ambiguity rule, issue #10):
- a document is read, sent and decided only under the request's claim on it (jobs/claims.py), so across
  requests, workers and machines at most one `catalog.document.cancel` for it is in flight;
- its status is read before its cancel is sent, by a call of its own, and kept on the record
  (`last_status`): a document already not conducted is never sent, and an outcome decided after an
  unanswered call uses the status known before it;
- the time its cancel is sent (`sent_at`) is on the record, written durably, before the call; after a call
  that got no answer (timeout, dropped connection, 5xx, a proxy's 408/429, a 2xx without JSON) nothing
  happens for that document until the call can no longer be running on the portal
  (`policy.settled_after`): the job reschedules itself for then, re-reads it and decides;
- every decision is saved as soon as it is made, and a business error is decided by the document's
  status, never by the portal's (localized) text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from rq import Retry

from bitrix24.client import Bitrix24Client
from bitrix24.errors import OPERATING_LIMITED, RATE_LIMITED, Bitrix24Error, Throttled
from jobs import policy, records
from jobs.claims import Claims
from jobs.context import job_connection, worker_context
from jobs.details import (
    APP_GONE,
    CONFIRMED_BY_READ,
    NO_SUCH_NUMBER,
    NOT_VISIBLE,
    PORTAL_GONE,
    PORTAL_REFUSED,
    UNANSWERED,
)
from jobs.durability import durable
from jobs.enqueue import enqueue_followup
from jobs.lifecycle import Lease, defer, exclusively, final_failure, retry_later

log = logging.getLogger("b24cancel.jobs")

# `responsibleId` comes with the same reads: the report mentions that user when a document needs a person.
DOCUMENT_FIELDS = ["id", "docType", "docNumber", "title", "status", "responsibleId"]
CONDUCTED = "Y"


@dataclass
class Wait:
    """Some documents cannot be decided before `until` (a call may still run, another request holds them)."""

    until: float
    why: str


class RecordGone(Exception):
    """The request's record expired while the job ran: nothing more is sent for it."""


def cancel_documents(request_id: str) -> dict[str, Any] | Retry:
    """Cancel the documents of a request, then enqueue its report (one run at a time per request)."""
    conn = job_connection()
    return exclusively(conn, "cancel", request_id, lambda lease: run_cancel(conn, request_id, lease))


def run_cancel(conn: redis.Redis, request_id: str, lease: Lease) -> dict[str, Any] | Retry:
    """The cancel job's work, under the request's lease."""
    record = records.load(conn, request_id)
    if record is None:
        log.warning("request record is gone; nothing to do", extra={"request_id": request_id})
        return {"skipped": "record expired"}
    docs: list[dict[str, Any]] = record["documents"]
    for doc in docs:  # a record written before `sent_at`: wait a whole window from now, to be safe
        if doc.pop("sent", None) and not doc.get("sent_at"):
            doc["sent_at"] = time.time()
    if record["state"] == "failed" and any(doc["outcome"] == "failed" for doc in docs):
        docs = start_replay(conn, request_id, record)
    ctx = worker_context()
    portal = ctx.portal(record["request"]["portal"], conn)
    if portal is None:
        why = ctx.portal_gone_reason(record["request"]["portal"], conn)
        detail = APP_GONE if why != "portal not configured" else PORTAL_GONE
        for doc in docs:
            if doc["outcome"] is None:
                doc.update(outcome="failed", detail=detail)
        records.save(conn, request_id, documents=docs, state="failed", error=why, finished_at=records.now_text())
        final_failure(f"request {request_id}: portal {record['request']['portal']!r}: {why}")
    attempt = records.increment(conn, request_id, "attempts")
    records.save(conn, request_id, state="running")
    log.info("cancel started", extra={"request_id": request_id, "portal": portal.name, "attempt": attempt})
    limit = ctx.settings.b24_execution_limit
    replicas = ctx.settings.redis_min_replicas
    claims = Claims(conn, portal.name, request_id, limit, replicas)
    store = Store(conn, request_id, docs, lease, claims, replicas)
    canceller = Canceller(ctx.client(portal, conn), docs, store, limit)

    def hold(retry: Retry) -> Retry:
        """Keep the claims of undecided documents until the job is back (and through its calls then)."""
        claims.take([doc["id"] for doc in docs if doc["outcome"] is None and doc.get("claimed")],
                    extra=float(retry.intervals[0]) if retry.intervals else 0.0)
        return retry

    try:
        wait = canceller.run()
    except RecordGone:
        claims.release(doc["id"] for doc in docs if doc.get("claimed") and not doc.get("sent_at"))
        return {"skipped": "record expired"}
    except Throttled as throttled:
        return hold(defer(conn, request_id, throttled.until, throttled.reason, documents=docs))
    except Bitrix24Error as err:
        sent_at = [doc["sent_at"] for doc in docs if doc["outcome"] is None and doc.get("sent_at")]
        retry = (wait_to_settle(conn, request_id, err, max(sent_at), limit, docs) if err.ambiguous and sent_at
                 else retry_later(conn, request_id, err, "transient_failures", documents=docs))
        if retry is not None:
            return hold(retry)
        for doc in docs:
            if doc["outcome"] is None:
                unsure = f" ({UNANSWERED})" if doc.get("sent_at") else ""
                doc.update(outcome="failed", detail=f"{err.code}: {err.description}{unsure}",
                           advice=err.advice or None)
                # the claim of a document whose cancel got no answer is kept until it expires (the call may
                # still run); the others are given back
                if doc.pop("claimed", None) and not doc.get("sent_at"):
                    claims.release([doc["id"]])
                doc.pop("sent_at", None)
        finish(conn, request_id, docs, error=str(err), workflow=bool(record["request"].get("event_token")))
        for doc in docs:
            ctx.tally.observe("document_outcomes", portal.name, doc["outcome"])
        final_failure(f"request {request_id}: {err}")
    if wait is not None:
        return hold(defer(conn, request_id, wait.until, wait.why, documents=docs))
    finish(conn, request_id, docs, workflow=bool(record["request"].get("event_token")))
    for doc in docs:
        ctx.tally.observe("document_outcomes", portal.name, doc["outcome"])
    failed = [doc for doc in docs if doc["outcome"] == "failed"]
    if failed:
        final_failure(f"request {request_id}: {len(failed)} document(s) failed: {failed[0]['detail']}")
    return {"documents": {str(doc.get("id") or doc.get("number")): doc["outcome"] for doc in docs}}


def wait_to_settle(conn: redis.Redis, request_id: str, err: Bitrix24Error, sent_at: float, limit: float,
                   docs: list[dict[str, Any]]) -> Retry | None:
    """After a cancel that got no answer: come back once it can no longer be running, not sooner.

    It counts against the request's transient-failure budget like any failure (None when that is used up).
    """
    failures = records.increment(conn, request_id, "transient_failures")
    if failures > policy.TRANSIENT_RETRY_MAX:
        return None
    until = max(policy.settled_after(sent_at, limit), time.time() + policy.transient_backoff(failures))
    log.info("cancel got no answer; waiting until it can no longer be running",
             extra={"request_id": request_id, "error": str(err), "resume_at": round(until, 3)})
    return defer(conn, request_id, until, f"{err}; the call may still be running on the portal", documents=docs)


def start_replay(conn: redis.Redis, request_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """An operator requeued a failed request: try its failed documents again and report anew."""
    docs = record["documents"]
    for doc in docs:
        if doc["outcome"] == "failed":
            doc.update(outcome=None, detail=None, advice=None)
            doc.pop("last_status", None)  # read again: it may have changed since
    round_ = int(record.get("round", 1)) + 1
    records.save(conn, request_id, documents=docs, round=str(round_), transient_failures="0",
                 report_failures="0", error="", report_error="", state="queued")
    log.info("replaying failed request", extra={"request_id": request_id, "round": round_})
    return docs


def finish(conn: redis.Redis, request_id: str, docs: list[dict[str, Any]], error: str | None = None,
           workflow: bool = False) -> None:
    """Every document is decided: save, and enqueue the report (and, for the app's robot, the workflow's
    return values: a workflow waits for them even when its robot named no document)."""
    records.save(conn, request_id, documents=docs, error=error, waiting_for="", resume_at="")
    if not docs and not workflow:
        records.save(conn, request_id, state="done", finished_at=records.now_text())
        log.info("request has no documents; no report", extra={"request_id": request_id})
        return
    enqueue_followup(conn, policy.NOTIFY_QUEUE, "jobs.notify.post_report", request_id,
                     policy.notify_job_id(request_id))


def chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Store:
    """Saves the request's documents; the note that a cancel is being sent goes out durably, with the claims."""

    def __init__(self, conn: redis.Redis, request_id: str, docs: list[dict[str, Any]], lease: Lease,
                 claims: Claims, replicas: int) -> None:
        self.conn = conn
        self.request_id = request_id
        self.docs = docs
        self.lease = lease
        self.claims = claims
        self.replicas = replicas

    def progress(self) -> None:
        """Save every decision made so far, then give back the claims of decided documents."""
        self.lease.check()  # a run that lost its lease must not overwrite the one that holds it
        if not records.save(self.conn, self.request_id, documents=self.docs):
            raise RecordGone(self.request_id)
        decided = [doc for doc in self.docs if doc["outcome"] is not None and doc.pop("claimed", None)]
        self.claims.release(doc["id"] for doc in decided)

    def sending(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Note `sent_at` on the chunk, extend its claims, and WAIT for replicas: all before the call.

        Returns the documents that may be sent: those whose claim was still ours (another request may have
        taken one only if the job stalled past the claim's life; that document is read again later).
        """
        self.lease.check()
        now = time.time()
        for doc in chunk:
            doc["sent_at"] = now
        ids = [doc["id"] for doc in chunk]

        def write(pipe: Any) -> None:
            self.claims.queue_take(pipe, ids)
            records.save(pipe, self.request_id, documents=self.docs)

        answers, saved = durable(self.conn, self.replicas, write)
        if not saved:
            raise RecordGone(self.request_id)
        sendable = []
        for doc, answer in zip(chunk, answers, strict=True):
            if (answer.decode() if isinstance(answer, bytes) else answer) == "kept":
                sendable.append(doc)
            else:
                doc.pop("sent_at", None)
                doc.pop("last_status", None)
                doc.pop("claimed", None)
        if len(sendable) < len(chunk):
            records.save(self.conn, self.request_id, documents=self.docs)
        return sendable


class Canceller:
    """Decides the outcome of each document of one request, calling the portal as little as it can."""

    def __init__(self, client: Bitrix24Client, docs: list[dict[str, Any]], store: Store,
                 execution_limit: float) -> None:
        self.client = client
        self.docs = docs
        self.store = store
        self.execution_limit = execution_limit
        self.fresh: set[int] = set()  # documents whose status this run has read

    def progress(self) -> None:
        self.store.progress()

    def run(self) -> Wait | None:
        """Resolve numbers, settle unanswered cancels whose time has come, cancel the rest under claims.

        Returns when to come back for documents that cannot be decided yet, or None when all are decided.
        """
        self.resolve_numbers()
        waits: list[Wait] = []
        uncertain = [doc for doc in self.docs if doc["outcome"] is None and doc.get("sent_at")]
        settled = [doc for doc in uncertain if self.settled_at(doc) <= time.time()]
        if len(settled) < len(uncertain):
            waits.append(Wait(min(self.settled_at(doc) for doc in uncertain if doc not in settled),
                              "an unanswered cancel may still be running on the portal"))
        for chunk in chunks(settled, policy.BATCH_SIZE):
            self.settle(chunk, {}, after_send=True)
        pending = [doc for doc in self.docs if doc["outcome"] is None and doc.get("id") and not doc.get("sent_at")]
        if pending:
            taken = self.store.claims.take(doc["id"] for doc in pending)
            for doc in pending:
                if doc["id"] in taken.ours:
                    doc["claimed"] = True
                else:  # another request is on it: what we read may be stale by the time it is ours
                    doc.pop("last_status", None)
                    doc.pop("claimed", None)
                    self.fresh.discard(doc["id"])
            ours = [doc for doc in pending if doc["id"] in taken.ours]
            # a status read before a claim newly taken in a later run may be stale; within one run it is not
            stale = [doc for doc in ours if doc.get("last_status") is None
                     or (doc["id"] in taken.new and doc["id"] not in self.fresh)]
            for chunk in chunks(stale, policy.BATCH_SIZE):
                self.read(chunk)
            sendable = [doc for doc in ours if doc["outcome"] is None and doc.get("last_status") == CONDUCTED]
            for chunk in chunks(sendable, policy.CANCELS_PER_BATCH):
                self.cancel(chunk)
            if taken.others:
                others = sorted(taken.others)
                delay = min(policy.CLAIM_RECHECK, max(self.store.claims.remaining(others), 1.0))
                waits.append(Wait(time.time() + delay, f"another request is cancelling document(s) {others}"))
        if not waits and any(doc["outcome"] is None for doc in self.docs):
            waits.append(Wait(time.time() + policy.CLAIM_RECHECK, "a document's claim was lost; reading it again"))
        return min(waits, key=lambda wait: wait.until) if waits else None

    def settled_at(self, doc: dict[str, Any]) -> float:
        """When the cancel sent for this document can no longer be running on the portal."""
        return policy.settled_after(float(doc["sent_at"]), self.execution_limit)

    def resolve_numbers(self) -> None:
        """Find documents named by number; unknown numbers are not_found, unconducted ones need no call."""
        unresolved = [doc for doc in self.docs if doc.get("id") is None and doc["outcome"] is None]
        for chunk in chunks(unresolved, policy.BATCH_SIZE):
            numbers = [doc["number"] for doc in chunk]
            answer = self.client.call("catalog.document.list", {
                "select": DOCUMENT_FIELDS, "filter": {"@docNumber": numbers}, "start": -1})
            by_number = {str(found["docNumber"]): found for found in _documents(answer.result)}
            for doc in chunk:
                found = by_number.get(str(doc["number"]))
                if found is None:
                    doc.update(outcome="not_found", detail=NO_SUCH_NUMBER)
                    continue
                self.seen(doc, found)
                if found.get("status") != CONDUCTED:
                    doc.update(outcome="already_not_conducted", detail=f"status {found.get('status')}")
            self.progress()

    def seen(self, doc: dict[str, Any], found: dict[str, Any]) -> None:
        """Take what a read showed: title and type for the report, and the status as the last known one."""
        _describe(doc, found)
        doc["last_status"] = found.get("status")
        self.fresh.add(doc["id"])

    def read(self, chunk: list[dict[str, Any]]) -> None:
        """Read the documents before cancelling them (a call of its own, so its answer is never lost with the
        cancels'): not visible -> not_found, not conducted -> already_not_conducted, with no cancel at all."""
        found = self.list_by_id(chunk)
        for doc in chunk:
            item = found.get(int(doc["id"]))
            if item is None:
                _decided(doc, "not_found", NOT_VISIBLE)
                continue
            self.seen(doc, item)
            if item.get("status") != CONDUCTED:
                _decided(doc, "already_not_conducted", f"status {item.get('status')}")
        self.progress()

    def list_by_id(self, chunk: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        answer = self.client.call("catalog.document.list", {
            "select": DOCUMENT_FIELDS, "filter": {"@id": [doc["id"] for doc in chunk]}, "start": -1})
        return _by_id(answer.result)

    def cancel(self, chunk: list[dict[str, Any]]) -> None:
        """One batch: cancel each document, then read them all; decide every outcome from it.

        The batch is one request against the rate limit whatever its size; the read after the cancels
        decides a business error on facts, without another call.
        """
        chunk = self.store.sending(chunk)
        if not chunk:
            return
        ids = [doc["id"] for doc in chunk]
        read = ("catalog.document.list", {"select": DOCUMENT_FIELDS, "filter": {"@id": ids}, "start": -1})
        commands = {**{f"d{i}": ("catalog.document.cancel", {"id": i}) for i in ids}, "after": read}
        try:
            answer = self.client.batch(commands)
        except (Bitrix24Error, Throttled) as exc:
            if not getattr(exc, "ambiguous", False):
                for doc in chunk:
                    doc.pop("sent_at", None)  # the portal did not run it
            raise
        after = _by_id(answer.results.get("after")) if "after" not in answer.errors else None
        unsettled: dict[int, str] = {}
        later: Exception | None = None
        for doc in chunk:
            key = f"d{doc['id']}"
            err = answer.errors.get(key)
            seen = (after or {}).get(doc["id"])
            if seen is not None:
                _describe(doc, seen)
            if err is None and answer.results.get(key) is True:
                _decided(doc, "cancelled", None)
            elif err is None:
                later = later or Bitrix24Error("BAD_ANSWER", "batch command without result or error", None,
                                               "catalog.document.cancel", retryable=True, ambiguous=True)
            elif err.is_business and after is not None:
                self.decide_business(doc, err.description, after.get(doc["id"]))
            elif err.is_business:
                doc.pop("sent_at", None)  # answered: it is settled by a re-read, not treated as unanswered
                unsettled[doc["id"]] = err.description
            elif err.code in (RATE_LIMITED, OPERATING_LIMITED):
                doc.pop("sent_at", None)  # refused before it ran
                wait = policy.RATE_LIMIT_DEFER if err.code == RATE_LIMITED else policy.OPERATING_DEFER
                later = later or Throttled(time.time() + wait, f"{err.code} for {err.method}")
            elif err.retryable:
                if not err.ambiguous:
                    doc.pop("sent_at", None)
                later = later or err
            else:
                _decided(doc, "failed", f"{err.code}: {err.description}", advice=err.advice or None)
        self.progress()
        if unsettled:
            self.settle([doc for doc in chunk if doc["id"] in unsettled], unsettled, after_send=False)
        if later is not None:
            raise later

    @staticmethod
    def decide_business(doc: dict[str, Any], description: str, after: dict[str, Any] | None) -> None:
        """A cancel refused with a business error, decided by the document's status read right after it."""
        if after is None:
            _decided(doc, "not_found", description)
        elif after.get("status") == CONDUCTED:
            _decided(doc, "refused", description)
        else:
            _decided(doc, "already_not_conducted", f"status {after.get('status')}")

    def settle(self, chunk: list[dict[str, Any]], descriptions: dict[int, str], after_send: bool) -> None:
        """Decide documents by re-reading their status.

        After a business error: not visible -> not_found, not conducted -> already_not_conducted,
        still conducted -> refused (with the portal's description). After a call that got no answer
        (`after_send`, once it can no longer be running): not conducted -> cancelled when it was conducted
        before the call (our call worked), else already_not_conducted; still conducted -> send again.
        """
        found = self.list_by_id(chunk)
        for doc in chunk:
            item = found.get(int(doc["id"]))
            description = descriptions.get(doc["id"])
            before = doc.get("last_status", CONDUCTED)  # records from before last_status: it was sent, so Y
            if item is None:
                _decided(doc, "not_found", description or NOT_VISIBLE)
                continue
            self.seen(doc, item)
            if item.get("status") != CONDUCTED:
                if after_send and before == CONDUCTED:
                    _decided(doc, "cancelled", CONFIRMED_BY_READ)
                else:
                    _decided(doc, "already_not_conducted", f"status {before if before != CONDUCTED else item.get('status')}")
            elif after_send:
                doc.pop("sent_at", None)  # our call did not take effect: it will be sent again, still claimed
            else:
                _decided(doc, "refused", description or PORTAL_REFUSED)
        self.progress()


def _by_id(result: Any) -> dict[int, dict[str, Any]]:
    return {int(item["id"]): item for item in _documents(result)}


def _documents(result: Any) -> list[dict[str, Any]]:
    if isinstance(result, dict):
        return list(result.get("documents") or [])
    return []


def _describe(doc: dict[str, Any], found: dict[str, Any]) -> None:
    doc["id"] = int(found["id"])
    for name in ("title", "docType"):
        if found.get(name):
            doc[name] = found[name]
    responsible = _user_id(found.get("responsibleId"))
    if responsible is not None:
        doc["responsibleId"] = responsible
    if found.get("docNumber"):
        doc["number"] = found["docNumber"]


def _user_id(value: Any) -> int | None:
    """A user id as the portal gives it (an int or a string of digits), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and 0 < len(value) <= 10:
        return int(value)
    return None


def _decided(doc: dict[str, Any], outcome: str, detail: str | None, advice: str | None = None) -> None:
    doc.update(outcome=outcome, detail=detail)
    if advice:
        doc["advice"] = advice
    doc.pop("sent_at", None)
