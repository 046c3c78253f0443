"""The request record: one Redis hash per request, written at intake and updated by the jobs.

It lives `REQUEST_TTL` (a setting, 14 days by default), independent of RQ's result TTLs. Request ids are
random and unguessable; a sender's idempotency key maps to one through its own key (`b24c:idem:<hash>`,
scoped by portal, source and caller), written in the same round trip as the record and living as long.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any, Literal

import redis

KEY_PREFIX = "b24c:req:"
IDEMPOTENCY_PREFIX = "b24c:idem:"
# Request fields that describe one delivery rather than the request: a repeat may differ in them
# (Bitrix24 sends the same event through each handler registered for it, with the handler's id).
DELIVERY_FIELDS = frozenset({"event_handler_id"})

State = Literal["queued", "running", "retrying", "done", "failed"]


def request_key(request_id: str) -> str:
    """The Redis key of a request's record."""
    return KEY_PREFIX + request_id


def new_request_id() -> str:
    """A fresh request id: 128 random bits as 32 hex digits, so nobody can guess another's request."""
    return secrets.token_hex(16)


def idempotency_key(portal: str, source: str, caller: str, key: str) -> str:
    """The Redis key that maps a sender's idempotency key to its request id, scoped by caller."""
    digest = hashlib.sha256(f"{portal}\x00{source}\x00{caller}\x00{key}".encode()).hexdigest()
    return IDEMPOTENCY_PREFIX + digest[:32]


def canonical_json(request: dict[str, Any]) -> str:
    """The request as stored on its record: compact JSON with sorted keys."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"))


def fingerprint(request: dict[str, Any], encoded: str | None = None) -> str:
    """A hash of the validated request (canonical JSON): a repeat under the same key must match it.

    `encoded` is `canonical_json(request)` when the caller has it already (the record's own field).
    """
    if encoded is None or not DELIVERY_FIELDS.isdisjoint(request):
        encoded = canonical_json({k: v for k, v in request.items() if k not in DELIVERY_FIELDS})
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


def new_record(request: dict[str, Any], state: State = "queued") -> dict[str, str]:
    """The hash fields written at intake."""
    now = now_text()
    documents = [{"id": doc_id, "outcome": None, "detail": None} for doc_id in request.get("document_ids") or []]
    documents += [{"id": None, "number": number, "outcome": None, "detail": None}
                  for number in request.get("document_numbers") or []]
    return {
        "request": canonical_json(request),
        "state": state,
        "documents": json.dumps(documents, separators=(",", ":")),
        "attempts": "0",
        "created_at": now,
        "updated_at": now,
    }


def load(conn: redis.Redis, request_id: str) -> dict[str, Any] | None:
    """The record as Python values, or None when it does not exist (expired or never written)."""
    raw = conn.hgetall(request_key(request_id))
    if not raw:
        return None
    record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for name in ("request", "documents", "resolution", "pauses"):
        if name in record:
            record[name] = json.loads(record[name])
    for name in ("attempts", "transient_failures", "deferrals"):
        record[name] = int(record.get(name, 0))
    record["id"] = request_id
    return record


# Update a record only while it exists: a job that outlives the record's TTL must not recreate it as an
# orphan (with no TTL, no request, and acting as an idempotency marker for ever).
SAVE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
INCREMENT_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
"""


def now_text() -> str:
    """The current unix time as stored on records."""
    return f"{time.time():.3f}"


def save(conn: redis.Redis, request_id: str, **fields: Any) -> bool:
    """Update fields of an existing record (JSON for structures; None skipped); refreshes updated_at.

    Returns False, writing nothing, when the record no longer exists.
    """
    args: list[Any] = []
    for name, value in fields.items():
        if value is not None:
            args += [name, value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))]
    args += ["updated_at", now_text()]
    return bool(conn.eval(SAVE_IF_EXISTS, 1, request_key(request_id), *args))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def increment(conn: redis.Redis, request_id: str, name: str) -> int:
    """Atomically add one to a counter field of an existing record and return the new value (0: no record)."""
    return int(conn.eval(INCREMENT_IF_EXISTS, 1, request_key(request_id), name))


def iso(ts: str | float | None) -> str | None:
    """A unix time as ISO 8601 UTC, for answers a person reads."""
    if ts in (None, ""):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))  # type: ignore[arg-type]


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """The record as the status API shows it: no secrets (the caller is a name), times in ISO 8601."""
    request = record.get("request") or {}
    view: dict[str, Any] = {
        "request_id": record["id"],
        "state": record.get("state"),
        "portal": request.get("portal"),
        "source": request.get("source"),
        "caller": request.get("caller"),
        "source_ref": request.get("source_ref"),
        "reason": request.get("reason"),
        "external_id": request.get("external_id"),
        "documents": [{k: v for k, v in doc.items() if k in ("id", "number", "outcome", "detail", "title",
                                                             "docType")}
                      for doc in record.get("documents") or []],
        "message_id": int(record["message_id"]) if record.get("message_id") else None,
        "attempts": record["attempts"],
        "created_at": iso(record.get("created_at")),
        "updated_at": iso(record.get("updated_at")),
        "finished_at": iso(record.get("finished_at")),
    }
    if record.get("resume_at"):
        view["resume_at"] = iso(record["resume_at"])
    if record.get("waiting_for"):
        view["waiting_for"] = record["waiting_for"]
    if record.get("error"):
        view["error"] = record["error"]
    if record.get("report_error"):
        view["report_error"] = record["report_error"]
    if "resolution" in record:
        view["resolution"] = record["resolution"]
    return view
