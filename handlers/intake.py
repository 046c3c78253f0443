"""The steps every intake shares: errors as JSON, authentication, validation and the one-round-trip submit."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Request, current_app
from pydantic import ValidationError
from redis import Redis
from standardwebhooks.webhooks import Webhook

from bitrix24.auth import offer_tokens
from bitrix24.limits import LeakyBucket, OperatingBudget
from handlers.schemas import CancelBody, first_error
from jobs import policy, records
from jobs.durability import NotReplicated
from jobs.enqueue import Submitter
from settings import (
    BITRIX24_CALLER,
    CHAT_ID,
    GROUP_CHAT,
    SANDBOX_CALLER,
    Caller,
    Portal,
    Settings,
    is_loopback,
    key_sha256,
    pick_portal,
)
from transport import BODY_KEY

log = logging.getLogger("b24cancel.web")

# The API key `make run` prints; accepted only in sandbox mode and only from loopback.
SANDBOX_API_KEY = "sandbox"

Reply = tuple[dict[str, Any], int]


class IntakeError(Exception):
    """A request we refuse, with the status and a message that names the problem."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def reply(self) -> Reply:
        body: dict[str, Any] = {"error": ERROR_NAMES.get(self.status, "error"), "message": self.message}
        if self.field:
            body["field"] = self.field
        return body, self.status


ERROR_NAMES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 414: "uri_too_long", 415: "unsupported_media_type",
               422: "idempotency_key_reused", 503: "unavailable", 500: "internal_error"}


@dataclass
class Services:
    """What the handlers use, built once per process in create_app (nothing is rebuilt per request)."""

    settings: Settings
    redis: redis.Redis
    submitter: Submitter
    # Every caller's key hashes (as bytes) and Standard Webhooks verifiers, with the caller they belong to.
    keys: list[tuple[bytes, Caller]] = field(default_factory=list)
    verifiers: list[tuple[Webhook, Caller]] = field(default_factory=list)
    portals: dict[str, Portal] = field(default_factory=dict)
    # The portals each caller may submit to, by caller name.
    portals_of: dict[str, dict[str, Portal]] = field(default_factory=dict)
    # SANDBOX_MODE's caller (its key is accepted from loopback only), or None.
    sandbox: tuple[bytes, Caller] | None = None

    @classmethod
    def build(cls, settings: Settings, conn: Redis) -> Services:
        """Everything the intake needs, from the settings."""
        callers = list(settings.callers.values())
        sandbox = None
        if settings.sandbox_mode:
            sandbox_caller = Caller(name=SANDBOX_CALLER, key_hashes=(key_sha256(SANDBOX_API_KEY),), portals=None,
                                    admin=True)
            sandbox = (bytes.fromhex(sandbox_caller.key_hashes[0]), sandbox_caller)
            callers.append(sandbox_caller)
        portals = dict(settings.portals)
        return cls(settings=settings, redis=conn, submitter=Submitter(conn, settings.request_ttl, settings.redis_min_replicas),
                   keys=[(bytes.fromhex(digest), caller) for caller in settings.callers.values()
                         for digest in caller.key_hashes],
                   verifiers=[(Webhook(secret), caller) for caller in settings.callers.values()
                              for secret in caller.secrets],
                   portals=portals,
                   portals_of={caller.name: {name: portal for name, portal in portals.items()
                                             if caller.may_use(name)} for caller in callers},
                   sandbox=sandbox)

    def portal(self, name: str | None) -> Portal | None:
        """The portal by name, from the dict built at start-up (no settings lookup per request)."""
        return pick_portal(self.portals, name)


def services() -> Services:
    return current_app.extensions["b24cancel"]  # type: ignore[no-any-return]


def constant_time_in(given: str, allowed: list[str]) -> bool:
    """Whether `given` equals one of `allowed`, comparing every candidate in constant time."""
    found = False
    given_bytes = given.encode()
    for candidate in allowed:
        found |= hmac.compare_digest(given_bytes, candidate.encode())
    return found


def authenticate_trigger(req: Request, svc: Services, signed: bool = False) -> Caller:
    """The caller a request comes from: a Bearer API key, or (with `signed`, for POST /v1/cancel only) a
    Standard Webhooks signature; raise 401 otherwise.

    A request that carries `webhook-signature` is judged as signed whatever else it carries, so an added
    `Authorization` header cannot turn a captured signed request into an unsigned one with a new key.
    """
    environ = req.environ  # headers read from the WSGI environ: werkzeug's Headers wrapper costs more per lookup
    if "HTTP_WEBHOOK_SIGNATURE" in environ:
        if not signed:
            raise IntakeError(401, "a signature authorizes only the POST /v1/cancel it was made for; send "
                                   "'Authorization: Bearer <api key>'")
        if not svc.verifiers:
            raise IntakeError(401, "signed requests are not configured (TRIGGER_SECRETS or a caller's secret)")
        raw = body_bytes(req)
        headers = {k.lower(): v for k, v in req.headers.items()}
        for verifier, caller in svc.verifiers:
            if _signature_ok(verifier, raw, headers):
                return caller
        raise IntakeError(401, "invalid or stale webhook signature (timestamps must be within 5 minutes)")
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header:
        raise IntakeError(401, "missing credentials: send 'Authorization: Bearer <api key>' or a signed request")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise IntakeError(401, "Authorization must be 'Bearer <api key>'")
    found = caller_for_key(svc, key, sandbox=svc.sandbox is not None and is_loopback(req.remote_addr or ""))
    if found is None:
        raise IntakeError(401, "unknown API key")
    return found


def caller_for_key(svc: Services, key: str, sandbox: bool = False) -> Caller | None:
    """The caller whose key this is: its SHA-256 compared with every caller's in constant time."""
    digest = hashlib.sha256(key.encode()).digest()
    found: Caller | None = None
    candidates = svc.keys if not sandbox or svc.sandbox is None else [*svc.keys, svc.sandbox]
    for candidate, caller in candidates:
        if hmac.compare_digest(digest, candidate):
            found = caller  # no early exit: every candidate is compared
    return found


def require_admin(caller: Caller) -> None:
    """Refuse (403) a caller that is not an admin."""
    if not caller.admin:
        raise IntakeError(403, f"caller {caller.name!r} is not an admin (admin = true in its [callers] section)")


def _signature_ok(verifier: Webhook, raw: bytes, headers: dict[str, str]) -> bool:
    """Whether one secret verifies the request (the library raises several types for malformed input)."""
    try:
        verifier.verify(raw, headers, json_parse=False)
    except Exception:  # noqa: BLE001 - any failure to verify is a refusal
        return False
    return True


def body_bytes(req: Request) -> bytes:
    """The request body: the bytes BodyLimit read (and limited) before the app ran, else Flask's."""
    raw = req.environ.get(BODY_KEY)
    return raw if raw is not None else req.get_data(cache=True)


def parse_cancel_body(req: Request) -> CancelBody:
    """The `POST /v1/cancel` body, parsed and validated by its model straight from the bytes; 415 for another
    content type, 400 (naming the first failing field) for anything the model refuses."""
    if not req.is_json:
        raise IntakeError(415, "Content-Type must be application/json")
    try:
        return CancelBody.model_validate_json(body_bytes(req))
    except ValidationError as exc:
        message, field = first_error(exc)
        raise IntakeError(400, message, field) from None


def choose_portal(svc: Services, name: str | None, caller: Caller | None = None) -> Portal:
    """The named portal, or the only one (of the caller's); 404 when unknown or not the caller's, alike."""
    portal = svc.portal(name) if caller is None else pick_portal(svc.portals_of.get(caller.name, {}), name)
    if portal is None:
        if name is None:
            raise IntakeError(400, "portal is required when several portals are configured", "portal")
        raise IntakeError(404, f"unknown portal {name!r}", "portal")
    return portal


def optional_chat(value: Any, portal: Portal, caller: Caller | None = None) -> str | None:
    """The chat a request names instead of the portal's: the portal's own, or one its or the caller's
    `chats` list allows; never a bare user id (a direct dialog)."""
    if value is None:
        return None
    if not isinstance(value, str) or not CHAT_ID.fullmatch(value):
        raise IntakeError(400, "chat must look like chat42", "chat")
    if not GROUP_CHAT.match(value):
        raise IntakeError(400, "chat must be a group chat (chat42); a request may not name a person's dialog",
                          "chat")
    allowed = value == portal.chat or value in portal.chats or (caller is not None and value in caller.chats)
    if not allowed:
        raise IntakeError(400, f"chat {value} is not allowed: only the portal's chat, or one the portal's or the "
                               "caller's chats list names", "chat")
    return value


def cancel_request(body: CancelBody | dict[str, Any], portal: Portal, source: str, source_ref: str | None = None,
                   caller: Caller | None = None) -> dict[str, Any]:
    """The request stored on the record (JSON values only, never a secret), from a validated body; a dict
    (the robot's URL, the operator's command) is validated by the same model first.

    `caller` is who sent it (its name is stored: it owns the request); None for Bitrix24's own senders.
    """
    if not isinstance(body, CancelBody):
        try:
            body = CancelBody.model_validate(body)
        except ValidationError as exc:
            message, field = first_error(exc)
            raise IntakeError(400, message, field) from None
    request_: dict[str, Any] = {"portal": portal.name, "source": source}
    if body.document_numbers is not None:
        request_["document_numbers"] = body.document_numbers
    else:
        request_["document_ids"] = body.document_ids
    request_["reason"] = (body.reason or "").strip() or None
    request_["external_id"] = (body.external_id or "").strip() or None
    request_["chat"] = optional_chat(body.chat, portal, caller)
    if source_ref:
        request_["source_ref"] = source_ref
    if caller is not None:
        request_["caller"] = caller.name
    return request_


# A 503 after a write that too few replicas confirmed (REDIS_MIN_REPLICAS): the request may exist.
NOT_REPLICATED = ("the request was written but no Redis replica confirmed it in time, so it may or may not have "
                  "been accepted; retry with the same idempotency key: the retry returns that same request (200) "
                  "if it exists, so nothing is done twice")
NOT_REPLICATED_NO_KEY = ("the request was written but no Redis replica confirmed it in time, so it may or may not "
                         "have been accepted; it had no Idempotency-Key, so a retry may create a second request: "
                         "send one so that retries are safe")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def idempotency_key(req: Request) -> str | None:
    """The `Idempotency-Key` header, else the Standard Webhooks `webhook-id`.

    A signed request uses its `webhook-id` only: it is covered by the signature, while another header is
    not, and a replayed signed request must not become a new request by changing it.
    """
    environ = req.environ
    signed = "HTTP_WEBHOOK_SIGNATURE" in environ  # judged as authenticate_trigger judges it
    key = environ.get("HTTP_WEBHOOK_ID") if signed else environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise IntakeError(400, "Idempotency-Key must be 1-200 printable ASCII characters", "Idempotency-Key")
    return key


def submit(svc: Services, request_: dict[str, Any], key: str | None, first_job: str = "cancel",
           caller: Caller | None = None) -> Reply:
    """Record the request and enqueue its first job (`cancel` or `resolve`) in one round trip: 202 when
    new, 200 for a repeat, 422 when the key was used with another body.

    The key is scoped by portal, source and caller (`caller` None: Bitrix24 made the request).
    """
    request_id = records.new_request_id()
    idem = None
    if key:
        idem = records.idempotency_key(request_["portal"], request_["source"],
                                       caller.name if caller is not None else BITRIX24_CALLER, key)
    try:
        result = svc.submitter.submit(request_id, request_, policy.FIRST_JOBS[first_job],
                                      policy.first_job_id(first_job, request_id), idempotency_key=idem)
    except NotReplicated:
        # The write reached the primary but too few replicas confirmed it: a failover now could lose it, so no
        # 2xx. It may still exist: the same key's retry finds it and answers 200, so nothing is doubled.
        log.warning("request not confirmed by replicas at intake", extra={"request_id": request_id})
        raise IntakeError(503, NOT_REPLICATED if key else NOT_REPLICATED_NO_KEY) from None
    except redis.RedisError:
        log.warning("redis unavailable at intake")
        raise IntakeError(503, "the service cannot store requests right now; retry later") from None
    if result.outcome == "key_reused":
        raise IntakeError(422, "this idempotency key was already used with a different request; send a new "
                               "key for a new request")
    if result.outcome == "conflict":
        log.error("submit refused: the new request's record or job hash already exists",
                  extra={"request_id": request_id})
        raise IntakeError(503, "the service could not store the request; retry later")
    body: dict[str, Any] = {"request_id": result.request_id, "status_url": f"/v1/requests/{result.request_id}"}
    if not result.created:
        body["duplicate"] = True
    return body, 202 if result.created else 200


def keep_app_tokens(conn: Redis, portal: Portal, form: Any) -> None:
    """Store the fresh OAuth tokens an authenticated app call carried, if newer than the service's own."""
    assert portal.oauth is not None
    try:
        offer_tokens(conn, portal.name, portal.oauth, form)
    except redis.RedisError:
        log.warning("redis unavailable: event tokens not stored", extra={"portal": portal.name})


def held_back(svc: Services, portal: str) -> dict[str, Any]:
    """Whether the shared limits hold a portal back now, and until when (ISO 8601)."""
    budget = OperatingBudget(svc.redis, portal)
    bucket = LeakyBucket(svc.redis, portal, rate=1.0, capacity=1.0)
    paused = {method: records.iso(until) for method, until in budget.pauses().items()}
    state = bucket.state()
    slowed = records.iso(state["slowed_until"]) if state["slowed"] else None
    return {"paused_methods": paused, "slowed_until": slowed}
