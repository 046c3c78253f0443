"""The business-process *Webhook* robot: POST /v1/bitrix24/robot?portal=..&key=..&document_ids=..

The robot sends no credentials of its own, so the URL carries a per-portal secret (`key`). Its form
field `document_id[]` (e.g. crm, CCrmDocumentDeal, DEAL_12) is kept as the source reference.
Only POST acts (what the robot sends): GET and HEAD get 405, so a link preview or URL scanner that
fetches a robot URL cancels nothing.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, request

from handlers.intake import (
    IntakeError,
    Reply,
    cancel_request,
    constant_time_in,
    keep_app_tokens,
    services,
    submit,
)
from handlers.schemas import RobotQuery

bp = Blueprint("robot", __name__)

# Compared against when the portal has no robot secret (or is unknown), so every refusal takes as long.
NO_SECRET = "\x00no-robot-secret\x00"


DIGITS = re.compile(r"[0-9]{1,10}", re.ASCII)
# Longest value of each robot field we store or key on (document_id[] parts, workflow_id, ts, run);
# the robot sends short ids (crm / CCrmDocumentDeal / DEAL_12). Longer ones are refused, not cut.
MAX_ROBOT_FIELD = 200
# The robot URL's parameters (handlers/schemas.py RobotQuery); any other is refused.
ROBOT_PARAMETERS = frozenset(RobotQuery.model_fields)
# document_id[] has three parts (module, entity, document).
MAX_DOCUMENT_PARTS = 3


def _ids(raw: str) -> list[Any]:
    """Comma-separated document ids (ASCII digits only)."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not all(DIGITS.fullmatch(item) for item in items):
        raise IntakeError(400, "document_ids must be integers separated by commas", "document_ids")
    return [int(item) for item in items]


def _robot_document(form: Any) -> str | None:
    """The robot's document_id[] (three parts) as one reference string."""
    parts = form.getlist("document_id[]") or [form[k] for k in sorted(form) if k.startswith("document_id[")]
    if len(parts) > MAX_DOCUMENT_PARTS or any(len(part) > MAX_ROBOT_FIELD for part in parts):
        raise IntakeError(400, f"document_id[] must be at most {MAX_DOCUMENT_PARTS} parts of at most "
                               f"{MAX_ROBOT_FIELD} characters", "document_id[]")
    return ", ".join(parts) if parts else None


def _short(value: str, name: str) -> str:
    """A robot field we key on, refused (400) when longer than MAX_ROBOT_FIELD."""
    if len(value) > MAX_ROBOT_FIELD:
        raise IntakeError(400, f"{name} is longer than {MAX_ROBOT_FIELD} characters", name)
    return value


@bp.post("/v1/bitrix24/robot")
def robot() -> Reply:
    """Accept a robot call: portal secret -> validate -> submit -> 202."""
    svc = services()
    args = request.args
    portal = svc.portal(args.get("portal"))
    secret = portal.robot_secret if portal is not None else None
    # An unknown portal is refused like a wrong key, so the robot URL cannot be used to probe names.
    if not constant_time_in(args.get("key", ""), [secret or NO_SECRET]) or not secret:
        raise IntakeError(401, "missing or wrong key for this robot URL")
    assert portal is not None
    unknown = sorted(set(args) - ROBOT_PARAMETERS)
    if unknown:  # a typo (document_id=) would otherwise be ignored silently
        raise IntakeError(400, f"unknown parameter {unknown[0][:50]!r} in the robot's URL", unknown[0][:50])
    body: dict[str, Any] = {}
    if args.get("document_ids"):
        body["document_ids"] = _ids(args["document_ids"])
    if args.get("document_numbers"):
        body["document_numbers"] = [item.strip() for item in args["document_numbers"].split(",") if item.strip()]
    for name in ("reason", "external_id", "chat"):
        if args.get(name):
            body[name] = args[name]
    form = request.form
    # An app robot's call carries the app's fresh tokens; kept only if its application token is the portal's.
    if portal.oauth is not None and form and "auth[access_token]" in form and portal.application_token and \
            constant_time_in(form.get("auth[application_token]", ""), [portal.application_token]):
        keep_app_tokens(svc.redis, portal, form)
    source_ref = _robot_document(form) if form else None
    request_ = cancel_request(body, portal, source="robot", source_ref=source_ref)
    documents = ",".join(map(str, request_.get("document_ids") or request_.get("document_numbers") or []))
    key = "|".join([source_ref or "", _short(form.get("workflow_id", ""), "workflow_id"), documents,
                    _short(form.get("ts", ""), "ts"), _short(args.get("run", ""), "run")])
    return submit(svc, request_, key)
