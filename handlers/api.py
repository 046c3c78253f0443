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
    parse_json_object,
    services,
    submit,
)
from jobs import records

bp = Blueprint("api", __name__)

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


@bp.post("/v1/cancel")
def cancel() -> Reply:
    """Accept a request to cancel documents: authenticate -> validate -> submit -> 202."""
    svc = services()
    authenticate_trigger(request, svc)
    body = parse_json_object(request)
    portal = choose_portal(svc, body.get("portal"))
    request_ = cancel_request(body, portal, source="api")
    return submit(svc, request_, idempotency_key(request))


@bp.get("/v1/requests/<request_id>")
def request_status(request_id: str) -> Reply:
    """The request record: state, per-document outcome, report message id, attempts and times."""
    svc = services()
    authenticate_trigger(request, svc)
    if not REQUEST_ID.match(request_id):
        raise IntakeError(404, "no such request")
    try:
        record = records.load(svc.redis, request_id)
    except redis.RedisError:
        raise IntakeError(503, "the service cannot read requests right now; retry later") from None
    if record is None:
        raise IntakeError(404, "no such request (unknown, or older than the retention period)")
    return records.public_view(record), 200


@bp.get("/v1/portals")
def portals() -> Reply:
    """The configured portals with their health: names, masked URLs, chats and any limit holding them back."""
    svc = services()
    authenticate_trigger(request, svc)
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

