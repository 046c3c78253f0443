"""Bitrix24 outgoing events: POST /v1/bitrix24/events (form-encoded, PHP-style keys).

The portal is found by auth[member_id] or auth[domain]; auth[application_token] is compared in constant
time with that portal's token. Unknown portal and wrong token get the same 401, so portals cannot be
probed. Nothing here calls Bitrix24: a matching event becomes a resolve job that reads the object and
applies the portal's rules.
"""

from __future__ import annotations

import re
from typing import Any

import werkzeug.formparser  # noqa: F401 - loaded with the app (preloaded in gunicorn's master), not on the first event
from flask import Blueprint, request

from handlers.intake import IntakeError, Reply, constant_time_in, keep_app_tokens, services, submit
from handlers.metrics import count_event

bp = Blueprint("events", __name__)

# Plain ASCII digits only (used with fullmatch); the value is normalized (int) before the idempotency key.
OBJECT_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
EVENT_NAME = re.compile(r"[A-Za-z0-9_.]{1,100}", re.ASCII)
# Longest event_handler_id stored on the record (Bitrix24 sends a small integer); longer is refused.
MAX_HANDLER_ID = 32
# Compared against when the portal is unknown, so both refusals take the same time.
NO_TOKEN = "\x00no-portal\x00"
UNAUTHORIZED = "unknown portal or wrong application token"


@bp.post("/v1/bitrix24/events")
def event() -> Reply:
    """Accept an outgoing event: token -> rules for the event -> resolve job -> 200."""
    svc = services()
    if request.mimetype != "application/x-www-form-urlencoded":
        raise IntakeError(415, "Bitrix24 events are form-encoded (application/x-www-form-urlencoded)")
    form = request.form
    member_id, domain = form.get("auth[member_id]"), form.get("auth[domain]")
    portal = svc.settings.portal_for_event(member_id, domain)
    expected = portal.application_token if portal is not None else None
    token_ok = constant_time_in(form.get("auth[application_token]", ""), [expected or NO_TOKEN])
    if portal is None or not expected or not token_ok:
        raise IntakeError(401, UNAUTHORIZED)
    if (portal.member_id and member_id != portal.member_id) or (
            portal.domain and (domain or "").lower() != portal.domain.lower()):
        raise IntakeError(401, UNAUTHORIZED)
    if portal.oauth is not None and "auth[access_token]" in form:
        keep_app_tokens(svc.redis, portal, form)
    name = form.get("event", "")
    raw_id = form.get("data[FIELDS][ID]", "")
    raw_ts = form.get("ts", "")
    if not EVENT_NAME.fullmatch(name):
        raise IntakeError(400, "event is missing or malformed", "event")
    name = name.upper()
    if not OBJECT_ID.fullmatch(raw_id):
        raise IntakeError(400, "data[FIELDS][ID] must be an object id (ASCII digits)", "data[FIELDS][ID]")
    if not TIMESTAMP.fullmatch(raw_ts):
        raise IntakeError(400, "ts must be the event's unix time (ASCII digits)", "ts")
    if len(form.get("event_handler_id") or "") > MAX_HANDLER_ID:
        raise IntakeError(400, f"event_handler_id is longer than {MAX_HANDLER_ID} characters", "event_handler_id")
    object_id = str(int(raw_id))  # "05" and "5" are one object, so one idempotency key
    if not any(rule["event"] == name for rule in portal.rules):
        # A name no rule names is counted as "other": senders never create metric labels.
        count_event(portal.name, "other", "no_rule")
        return {"status": "ignored", "message": f"no rule for {name} on portal {portal.name}"}, 200
    ts = str(int(raw_ts))
    request_: dict[str, Any] = {"portal": portal.name, "source": "event", "event": name,
                                "object_id": int(object_id), "ts": ts,
                                "event_handler_id": form.get("event_handler_id")}
    body, status = submit(svc, request_, f"{name}|{object_id}|{ts}", first_job="resolve")
    count_event(portal.name, name, "accepted" if status == 202 else "repeat")
    return body, 200  # Bitrix24's queue expects 200
