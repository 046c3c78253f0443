"""The cancel job: un-conduct each document of a request and decide its outcome on facts.

Safe to run twice: every decision is saved on the request record as soon as it is made, a document
sent in a call that got no answer is re-read before it is sent again, and a business error is decided
by re-reading the document's status, never by the portal's (localized) text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from rq import Retry

from bitrix24.client import Bitrix24Client
from bitrix24.errors import OPERATING_LIMITED, RATE_LIMITED, Bitrix24Error, Throttled
from jobs import policy, records
from jobs.context import job_connection, worker_context
from jobs.enqueue import enqueue_followup
from jobs.lifecycle import Lease, defer, exclusively, final_failure, retry_later

log = logging.getLogger("b24cancel.jobs")

DOCUMENT_FIELDS = ["id", "docType", "docNumber", "title", "status"]
CONDUCTED = "Y"


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
    if record["state"] == "failed" and any(doc["outcome"] == "failed" for doc in docs):
        docs = start_replay(conn, request_id, record)
    ctx = worker_context()
    portal = ctx.settings.portal(record["request"]["portal"])
    if portal is None:
        for doc in docs:
            doc.update(outcome="failed", detail="the portal is no longer configured in the service")
        records.save(conn, request_id, documents=docs, state="failed", error="portal not configured",
                     finished_at=records.now_text())
        final_failure(f"request {request_id}: portal {record['request']['portal']!r} is not configured")
    attempt = records.increment(conn, request_id, "attempts")
    records.save(conn, request_id, state="running")
    log.info("cancel started", extra={"request_id": request_id, "portal": portal.name, "attempt": attempt})

    def progress() -> None:
        records.save(conn, request_id, documents=docs)
        lease.renew()

    canceller = Canceller(ctx.client(portal, conn), docs, progress)
    try:
        canceller.run()
    except Throttled as wait:
        return defer(conn, request_id, wait.until, wait.reason, documents=docs)
    except Bitrix24Error as err:
        retry = retry_later(conn, request_id, err, "transient_failures", documents=docs)
        if retry is not None:
            return retry
        for doc in docs:
            if doc["outcome"] is None:
                unsure = " (the last cancel got no answer: check the document in the portal)" if doc.get("sent") else ""
                doc.update(outcome="failed", detail=f"{err.code}: {err.description}{unsure}",
                           advice=err.advice or None)
                doc.pop("sent", None)
        finish(conn, request_id, docs, error=str(err))
        for doc in docs:
            ctx.tally.observe("document_outcomes", portal.name, doc["outcome"])
        final_failure(f"request {request_id}: {err}")
    finish(conn, request_id, docs)
    for doc in docs:
        ctx.tally.observe("document_outcomes", portal.name, doc["outcome"])
    failed = [doc for doc in docs if doc["outcome"] == "failed"]
    if failed:
        final_failure(f"request {request_id}: {len(failed)} document(s) failed: {failed[0]['detail']}")
    return {"documents": {str(doc.get("id") or doc.get("number")): doc["outcome"] for doc in docs}}


def start_replay(conn: redis.Redis, request_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """An operator requeued a failed request: try its failed documents again and report anew."""
    docs = record["documents"]
    for doc in docs:
        if doc["outcome"] == "failed":
            doc.update(outcome=None, detail=None, advice=None)
    round_ = int(record.get("round", 1)) + 1
    records.save(conn, request_id, documents=docs, round=str(round_), transient_failures="0",
                 report_failures="0", error="", report_error="", state="queued")
    log.info("replaying failed request", extra={"request_id": request_id, "round": round_})
    return docs


def finish(conn: redis.Redis, request_id: str, docs: list[dict[str, Any]], error: str | None = None) -> None:
    """Every document is decided: save, and enqueue the report."""
    records.save(conn, request_id, documents=docs, error=error, waiting_for="", resume_at="")
    if not docs:
        records.save(conn, request_id, state="done", finished_at=records.now_text())
        log.info("request has no documents; no report", extra={"request_id": request_id})
        return
    enqueue_followup(conn, policy.NOTIFY_QUEUE, "jobs.notify.post_report", request_id,
                     policy.notify_job_id(request_id))


def chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Canceller:
    """Decides the outcome of each document of one request, calling the portal as little as it can."""

    def __init__(self, client: Bitrix24Client, docs: list[dict[str, Any]], progress: Callable[[], None]) -> None:
        self.client = client
        self.docs = docs
        self.progress = progress

    def run(self) -> None:
        """Resolve numbers, settle documents left uncertain by an earlier attempt, cancel the rest."""
        self.resolve_numbers()
        uncertain = [doc for doc in self.docs if doc["outcome"] is None and doc.get("sent")]
        for chunk in chunks(uncertain, policy.BATCH_SIZE):
            self.settle(chunk, {}, after_send=True)
        pending = [doc for doc in self.docs if doc["outcome"] is None and doc.get("id")]
        for chunk in chunks(pending, policy.CANCELS_PER_BATCH):
            self.cancel(chunk)

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
                    doc.update(outcome="not_found", detail="no document with this number is visible to the "
                                                           "webhook user")
                    continue
                _describe(doc, found)
                if found.get("status") != CONDUCTED:
                    doc.update(outcome="already_not_conducted", detail=f"status {found.get('status')}")
            self.progress()

    def cancel(self, chunk: list[dict[str, Any]]) -> None:
        """One batch: read the documents, cancel each, read them again; decide every outcome from it.

        The batch is one request against the rate limit whatever its size, so even a single document
        goes this way: the reads give the title and type for the report, and the status after the
        cancel decides a business error on facts, without another call.
        """
        for doc in chunk:
            doc["sent"] = True
        self.progress()
        ids = [doc["id"] for doc in chunk]
        read = ("catalog.document.list", {"select": DOCUMENT_FIELDS, "filter": {"@id": ids}, "start": -1})
        commands = {"before": read, **{f"d{i}": ("catalog.document.cancel", {"id": i}) for i in ids}, "after": read}
        try:
            answer = self.client.batch(commands)
        except (Bitrix24Error, Throttled) as exc:
            if not getattr(exc, "ambiguous", False):
                for doc in chunk:
                    doc.pop("sent", None)  # the portal did not run it
            raise
        before = _by_id(answer.results.get("before"))
        after = _by_id(answer.results.get("after")) if "after" not in answer.errors else None
        unsettled: dict[int, str] = {}
        later: Exception | None = None
        for doc in chunk:
            key = f"d{doc['id']}"
            err = answer.errors.get(key)
            seen = (after or {}).get(doc["id"]) or before.get(doc["id"])
            if seen is not None:
                _describe(doc, seen)
            if err is None and answer.results.get(key) is True:
                _decided(doc, "cancelled", None)
            elif err is None:
                later = later or Bitrix24Error("BAD_ANSWER", "batch command without result or error", None,
                                               "catalog.document.cancel", retryable=True, ambiguous=True)
            elif err.is_business and after is not None:
                self.decide_business(doc, err.description, before.get(doc["id"]), after.get(doc["id"]))
            elif err.is_business:
                doc.pop("sent", None)  # answered: it is settled by a re-read, not treated as unanswered
                unsettled[doc["id"]] = err.description
            elif err.code in (RATE_LIMITED, OPERATING_LIMITED):
                doc.pop("sent", None)  # refused before it ran
                wait = policy.RATE_LIMIT_DEFER if err.code == RATE_LIMITED else policy.OPERATING_DEFER
                later = later or Throttled(time.time() + wait, f"{err.code} for {err.method}")
            elif err.retryable:
                later = later or err
            else:
                _decided(doc, "failed", f"{err.code}: {err.description}", advice=err.advice or None)
        self.progress()
        if unsettled:
            self.settle([doc for doc in chunk if doc["id"] in unsettled], unsettled, after_send=False)
        if later is not None:
            raise later

    @staticmethod
    def decide_business(doc: dict[str, Any], description: str, before: dict[str, Any] | None,
                        after: dict[str, Any] | None) -> None:
        """A cancel refused with a business error, decided by the document's status read right after it."""
        if after is None:
            _decided(doc, "not_found", description)
        elif after.get("status") == CONDUCTED:
            _decided(doc, "refused", description)
        else:
            _decided(doc, "already_not_conducted", f"status {(before or after).get('status')}")

    def settle(self, chunk: list[dict[str, Any]], descriptions: dict[int, str], after_send: bool) -> None:
        """Decide documents by re-reading their status.

        After a business error: not visible -> not_found, not conducted -> already_not_conducted,
        still conducted -> refused (with the portal's description). After a call that got no answer
        (`after_send`): not conducted -> cancelled (our call worked), still conducted -> send again.
        """
        ids = [doc["id"] for doc in chunk]
        answer = self.client.call("catalog.document.list", {
            "select": DOCUMENT_FIELDS, "filter": {"@id": ids}, "start": -1})
        found = _by_id(answer.result)
        for doc in chunk:
            item = found.get(int(doc["id"]))
            description = descriptions.get(doc["id"])
            if item is not None:
                _describe(doc, item)
            if item is None:
                _decided(doc, "not_found", description or "the document is not visible to the webhook user")
            elif item.get("status") != CONDUCTED:
                if after_send:
                    _decided(doc, "cancelled", "confirmed by re-reading after an unanswered call")
                else:
                    _decided(doc, "already_not_conducted", f"status {item.get('status')}")
            elif after_send:
                doc.pop("sent", None)  # our call did not take effect: it will be sent again
            else:
                _decided(doc, "refused", description or "the portal refused")
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
    if found.get("docNumber"):
        doc["number"] = found["docNumber"]


def _decided(doc: dict[str, Any], outcome: str, detail: str | None, advice: str | None = None) -> None:
    doc.update(outcome=outcome, detail=detail)
    if advice:
        doc["advice"] = advice
    doc.pop("sent", None)
