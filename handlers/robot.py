"""The business-process *Webhook* robot: GET|POST /v1/bitrix24/robot?portal=..&key=..&document_ids=..

The robot sends no credentials of its own, so the URL carries a per-portal secret (`key`). Its form
field `document_id[]` (e.g. crm, CCrmDocumentDeal, DEAL_12) is kept as the source reference.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from handlers.intake import (
    IntakeError,
    Reply,
    cancel_request,
    choose_portal,
    constant_time_in,
    services,
    submit,
)
from settings import split_list

bp = Blueprint("robot", __name__)


def _ids(raw: str) -> list[Any]:
    values: list[Any] = []
    for item in split_list(raw):
        try:
            values.append(int(item))
        except ValueError:
            raise IntakeError(400, "document_ids must be integers separated by commas", "document_ids") from None
    return values


def _robot_document(form: Any) -> str | None:
    """The robot's document_id[] (three parts) as one reference string."""
    parts = form.getlist("document_id[]") or [form[k] for k in sorted(form) if k.startswith("document_id[")]
    return ", ".join(parts) if parts else None


@bp.route("/v1/bitrix24/robot", methods=["GET", "POST"])
def robot() -> Reply:
    """Accept a robot call: portal secret -> validate -> submit -> 202."""
    svc = services()
    args = request.args
    portal = choose_portal(svc, args.get("portal"))
    if not portal.robot_secret or not constant_time_in(args.get("key", ""), [portal.robot_secret]):
        raise IntakeError(401, "missing or wrong key for this portal's robot URL")
    body: dict[str, Any] = {}
    if args.get("document_ids"):
        body["document_ids"] = _ids(args["document_ids"])
    if args.get("document_numbers"):
        body["document_numbers"] = split_list(args["document_numbers"])
    for name in ("reason", "external_id", "chat"):
        if args.get(name):
            body[name] = args[name]
    form = request.form if request.method == "POST" else {}
    source_ref = _robot_document(form) if form else None
    request_ = cancel_request(body, portal, source="robot", source_ref=source_ref)
    documents = ",".join(map(str, request_.get("document_ids") or request_.get("document_numbers") or []))
    key = "|".join([source_ref or "", form.get("workflow_id", "") if form else "", documents,
                    form.get("ts", "") if form else "", args.get("run", "")])
    return submit(svc, request_, key)
