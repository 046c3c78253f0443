"""External triggers: POST /v1/cancel, and the request status GET /v1/requests/<id>."""

from __future__ import annotations

import re

import redis
from flask import Blueprint, request

from handlers.intake import (
    IntakeError,
    Reply,
    authenticate_trigger,
    cancel_request,
    choose_portal,
    held_back,
    idempotency_key,
    parse_cancel_body,
    require_admin,
    services,
    submit,
)
from jobs import records

bp = Blueprint("api", __name__)

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
# One answer for an id that is malformed, unknown, expired or another caller's.
NO_SUCH_REQUEST = "no such request (unknown, or older than the retention period)"


@bp.post("/v1/cancel")
def cancel() -> Reply:
    """Accept a request to cancel documents: authenticate -> validate -> submit -> 202."""
    svc = services()
    caller = authenticate_trigger(request, svc, signed=True)
    body = parse_cancel_body(request)
    portal = choose_portal(svc, body.portal, caller)
    request_ = cancel_request(body, portal, source="api", caller=caller)
    return submit(svc, request_, idempotency_key(request), caller=caller)


@bp.get("/v1/requests/<request_id>")
def request_status(request_id: str) -> Reply:
    """The request record: state, per-document outcome, report message id, attempts and times.

    A caller sees its own requests only (an admin sees every one, Bitrix24's included); any other id is
    answered as unknown, so ids cannot be probed.
    """
    svc = services()
    caller = authenticate_trigger(request, svc)
    if not REQUEST_ID.match(request_id):
        raise IntakeError(404, NO_SUCH_REQUEST)
    try:
        record = records.load(svc.redis, request_id)
    except redis.RedisError:
        raise IntakeError(503, "the service cannot read requests right now; retry later") from None
    if record is None or not (caller.admin or (record.get("request") or {}).get("caller") == caller.name):
        raise IntakeError(404, NO_SUCH_REQUEST)
    return records.public_view(record), 200


@bp.get("/v1/portals")
def portals() -> Reply:
    """The configured portals with their health: names, masked URLs, chats and any limit holding them back
    (admin callers only)."""
    svc = services()
    require_admin(authenticate_trigger(request, svc))
    listed = []
    for portal in svc.settings.portals.values():
        entry = portal.public()
        entry["rules"] = len(portal.rules)
        try:
            entry["held_back"] = held_back(svc, portal.name)
        except redis.RedisError:
            entry["held_back"] = None
        listed.append(entry)
    return {"portals": listed}, 200

