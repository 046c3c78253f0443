"""The OpenAPI 3.1 document, built once at start-up from the models in handlers/schemas.py, and the pages
that serve it: GET /openapi.json and GET /docs (Redoc, vendored in handlers/static: no CDN).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, send_file
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handlers import schemas
from handlers.intake import ERROR_NAMES
from jobs.policy import MAX_DOCUMENTS
from transport import MAX_BODY_BYTES, MAX_REQUEST_LINE

bp = Blueprint("openapi", __name__)

STATIC = Path(__file__).resolve().parent / "static"
REDOC = STATIC / "redoc.standalone.js"
REF = "#/components/schemas/{model}"
MODELS: list[type[BaseModel]] = [schemas.CancelBody, schemas.ErrorBody, schemas.Accepted, schemas.EventAnswer,
                                  schemas.RequestView, schemas.PortalList, schemas.Status, schemas.HealthDetails,
                                  schemas.RobotQuery]
# When each refusal happens, for the document (the body is always ErrorBody).
WHY = {
    400: "Invalid request: the body, a header or a parameter; `field` names it when it is one field",
    401: "Missing or wrong credentials",
    403: "The caller is not allowed this (an admin-only endpoint)",
    404: "Unknown, expired or another caller's request; or a portal the caller may not use",
    405: "Method not allowed",
    413: f"The body is larger than {MAX_BODY_BYTES // 1024} KiB, however it is framed",
    414: f"The request line is longer than {MAX_REQUEST_LINE // 1024} KiB",
    415: "Wrong Content-Type",
    422: "This Idempotency-Key was already used with a different body",
    503: "Redis cannot take or confirm the request now; retry (with the same Idempotency-Key)",
}


def error(status: int) -> dict[str, Any]:
    return {"description": WHY[status], "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ErrorBody")},
        "example": {"error": ERROR_NAMES[status], "message": WHY[status]}}}}


def answer(model: str, description: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": {"$ref": REF.format(model=model)}}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


def responses(ok: dict[int, dict[str, Any]], *refusals: int) -> dict[str, Any]:
    found = {str(status): value for status, value in ok.items()}
    found.update({str(status): error(status) for status in refusals})
    return found


def header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


def build(public_url: str | None = None) -> dict[str, Any]:
    """The whole document (plain JSON values)."""
    _, top = models_json_schema([(model, "validation") for model in MODELS], ref_template=REF)
    components: dict[str, Any] = dict(top.get("$defs", {}))
    robot_query = components.pop("RobotQuery")
    accepted_example = {"request_id": "4f1c2b7a9d0e4c3b8a6f5e2d1c0b9a87",
                        "status_url": "/v1/requests/4f1c2b7a9d0e4c3b8a6f5e2d1c0b9a87"}
    idempotency = header("Idempotency-Key", "Makes retries safe: a repeat with the same key and body answers 200 "
                         "with the first request; with another body, 422. Scoped by caller and portal.",
                         {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"})
    paths: dict[str, Any] = {
        "/v1/cancel": {"post": {
            "operationId": "cancelDocuments",
            "summary": "Cancel inventory documents",
            "description": "Accepts a request to un-conduct documents on a portal (`catalog.document.cancel`) and "
                           "report the outcome in its chat. Nothing calls Bitrix24 before the answer: the work "
                           "is queued. Authenticate with an API key, or sign the request (Standard Webhooks).",
            "security": [{"bearerAuth": []}, {"standardWebhooks": []}],
            "parameters": [idempotency],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model="CancelBody")},
                "examples": {"by_ids": {"value": {"document_ids": [142, 143], "reason": "Shipment RMA-1 returned",
                                                  "external_id": "RMA-1"}},
                             "by_numbers": {"value": {"document_numbers": ["W-0001"], "reason": "returned"}}}}}},
            "responses": responses({
                202: answer("Accepted", "Accepted: queued; follow status_url", accepted_example),
                200: answer("Accepted", "A repeat of an accepted request (`duplicate`: nothing new was done)",
                            {**accepted_example, "duplicate": True}),
            }, 400, 401, 404, 413, 414, 415, 422, 503),
        }},
        "/v1/requests/{request_id}": {"get": {
            "operationId": "getRequest",
            "summary": "A request's state and each document's outcome",
            "description": "A caller sees its own requests; an admin sees every one, Bitrix24's included.",
            "security": [{"bearerAuth": []}],
            "parameters": [{"name": "request_id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}],
            "responses": responses({200: answer("RequestView", "The request's record")}, 401, 404, 414, 503),
        }},
        "/v1/portals": {"get": {
            "operationId": "listPortals",
            "summary": "The portals, with any limit holding them back (admin)",
            "security": [{"bearerAuth": []}],
            "responses": responses({200: answer("PortalList", "The configured portals (URLs masked)")}, 401, 403),
        }},
        "/v1/health": {"get": {
            "operationId": "healthDetails",
            "summary": "Workers, queue depth and portals held back (admin)",
            "security": [{"bearerAuth": []}],
            "responses": responses({200: answer("HealthDetails", "Ready, with details")}, 401, 403, 503),
        }},
        "/healthz": {"get": {
            "operationId": "liveness", "summary": "The process is up", "security": [],
            "responses": responses({200: answer("Status", "Up", {"status": "ok"})}),
        }},
        "/readyz": {"get": {
            "operationId": "readiness", "summary": "Ready to take requests (Redis answers)", "security": [],
            "responses": responses({200: answer("Status", "Ready", {"status": "ready"})}, 503),
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics",
            "description": "Needs `Authorization: Bearer <METRICS_TOKEN>`, or METRICS_BIND's own address.",
            "security": [{"metricsToken": []}],
            "responses": responses({200: {"description": "Prometheus text format",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}}, 401),
        }},
        "/v1/bitrix24/robot": {"post": {
            "operationId": "webhookRobot",
            "summary": "The business-process Webhook robot's call",
            "description": "The robot's URL carries the portal, its secret (`key`) and the documents. Only POST "
                           "acts. The longest accepted URL is 16 KiB (about 500 ids and a 1,000-letter reason).",
            "security": [{"robotKey": []}],
            "parameters": [{"name": name, "in": "query", "required": name in robot_query.get("required", []),
                            "description": spec.get("description", ""),
                            "schema": {k: v for k, v in spec.items() if k not in ("description", "title")}}
                           for name, spec in robot_query["properties"].items() if name != "key"],
            "requestBody": {"required": False, "content": {"application/x-www-form-urlencoded": {
                "schema": schemas.RobotForm}}},
            "responses": responses({
                202: answer("Accepted", "Accepted", accepted_example),
                200: answer("Accepted", "A repeat of the same robot run", {**accepted_example, "duplicate": True}),
            }, 400, 401, 413, 414, 422, 503),
        }},
        "/v1/bitrix24/events": {"post": {
            "operationId": "bitrix24Event",
            "summary": "A Bitrix24 outgoing event",
            "description": "Form-encoded, PHP-style keys, as Bitrix24 sends it. Verified by the portal's "
                           "application token in `auth[application_token]` (a form field, so it is described in "
                           "the body, not as a security scheme). A rule of the portal decides what to cancel.",
            "security": [],
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                "schema": schemas.EventForm}}},
            "responses": responses({200: answer("EventAnswer", "Taken (or ignored: no rule names the event)")},
                                   400, 401, 413, 415, 503),
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {
                "schema": {"type": "object"}}}}},
        }},
        "/docs": {"get": {
            "operationId": "docs", "summary": "This document for a person (Redoc)", "security": [],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "b24-cancel",
            "version": "1",
            "summary": "Cancel (un-conduct) Bitrix24 inventory documents from webhooks, and report in a chat",
            "description": "Every refusal is JSON: `{\"error\", \"message\", \"field\"}`. Callers are named and "
                           "scoped (portals, chats, admin); see the README's Security section. At most "
                           f"{MAX_DOCUMENTS} documents per request; bodies up to {MAX_BODY_BYTES // 1024} KiB.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "A caller's API key (`flask --app app new-key NAME`)."},
                "standardWebhooks": {"type": "apiKey", "in": "header", "name": "webhook-signature",
                                     "description": "Standard Webhooks: `webhook-signature` over "
                                                    "`webhook-id.webhook-timestamp.body` with the caller's whsec_ "
                                                    "secret, sent with the `webhook-id` and `webhook-timestamp` "
                                                    "headers (within 5 minutes). `webhook-id` is then the "
                                                    "idempotency key (Idempotency-Key is ignored). Valid only on "
                                                    "the POST /v1/cancel it was made for."},
                "robotKey": {"type": "apiKey", "in": "query", "name": "key",
                             "description": "The portal's robot secret, in the robot's URL."},
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN."},
            },
        },
    }
    if public_url:
        document["servers"] = [{"url": public_url.rstrip("/")}]
    return document


def init_app(app: Any, public_url: str | None = None) -> None:
    """Build the document once and keep its bytes for GET /openapi.json."""
    app.extensions["b24cancel.openapi"] = json.dumps(build(public_url), ensure_ascii=False).encode()
    app.register_blueprint(bp)


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>b24-cancel API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/openapi.json"></redoc><script src="/docs/redoc.standalone.js"></script></body></html>
"""


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return Response(current_app.extensions["b24cancel.openapi"], mimetype="application/json")


@bp.get("/docs")
def docs() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/redoc.standalone.js")
def redoc() -> Response:
    return send_file(REDOC, mimetype="text/javascript", max_age=86400)
