"""The /_sandbox control and inspection API (JSON), used by tests, benchmarks and people."""

from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, current_app, request
from werkzeug.wrappers import Response

from sandbox import appmode
from sandbox.config import CANCELLED_STATUSES, LANGUAGES, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, PLAN_LIMITS
from sandbox.events import EventError, send_event
from sandbox.faults import FaultError
from sandbox.jsonutil import control_error, json_response
from sandbox.limits import OperatingBudget
from sandbox.oauth import token_answer
from sandbox.state import DOC_STATUSES, Chat, Portal, new_document

bp = Blueprint("control", __name__, url_prefix="/_sandbox")


class BadRequest(ValueError):
    """Input the control API refuses with 400."""


@bp.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> Response:
    return control_error(str(exc))


def _portal() -> Portal:
    return current_app.config["PORTAL"]


def _body() -> dict[str, Any]:
    data = request.get_json(force=True, silent=True) if request.get_data() else {}
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _number(data: dict[str, Any], name: str, low: float = 0.0) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise BadRequest(f"`{name}` must be a number >= {low}")
    return float(value)


def _ints(value: Any, name: str) -> set[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadRequest(f"`{name}` must be a list of integers")
    return set(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be true or false")
    return value


# -- documents ---------------------------------------------------------------------------------

def _public_document(portal: Portal, doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "hidden": doc["id"] in portal.permissions.hidden_document_ids}


@bp.get("/documents")
def list_documents() -> Response:
    """Every document, hidden ones included (flagged), by id."""
    portal = _portal()
    with portal.lock:
        return json_response([_public_document(portal, d) for _, d in sorted(portal.documents.items())])


@bp.get("/documents/<int:doc_id>")
def get_document(doc_id: int) -> Response:
    """One document, or 404."""
    portal = _portal()
    with portal.lock:
        doc = portal.documents.get(doc_id)
        if doc is None:
            return control_error(f"document {doc_id} does not exist", 404)
        return json_response(_public_document(portal, doc))


@bp.post("/documents")
def put_documents() -> Response:
    """Create or overwrite documents: `{"documents": [{"id"?, "docType", "status"?, "title"?, ...}]}`."""
    items = _body().get("documents")
    if not isinstance(items, list):
        raise BadRequest("`documents` must be a list")
    portal = _portal()
    with portal.lock:
        created = []
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest("each document must be an object")
            doc_id = item.get("id", portal.next_document_id())
            if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id <= 0:
                raise BadRequest("`id` must be a positive integer")
            status = item.get("status", "Y")
            if status not in DOC_STATUSES:
                raise BadRequest(f"`status` must be one of {', '.join(DOC_STATUSES)}")
            doc_type = item.get("docType", "A")
            if not isinstance(doc_type, str) or len(doc_type) != 1:
                raise BadRequest("`docType` must be a one-letter code")
            doc = new_document(doc_id, doc_type, status, str(item.get("title", "")))
            doc.update({k: v for k, v in item.items() if k not in ("id", "docType", "status", "title")})
            portal.documents[doc_id] = doc
            created.append(_public_document(portal, doc))
        return json_response({"documents": created})


# -- chat, CRM, sale -------------------------------------------------------------------------

_UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9_]*")
_CRM_USER_FIELD = re.compile(r"UF_CRM_(?:(\d+)_)?(.+)")


def _camel(name: str) -> str:
    """An UPPER_SNAKE field name as crm.item.* / sale.* print it; other names are kept as given.

    STAGE_ID -> stageId; user fields keep crm's shape: UF_CRM_123 -> ufCrm_123, UF_CRM_5_123 -> ufCrm5_123.
    """
    if not _UPPER_SNAKE.fullmatch(name):
        return name
    user_field = _CRM_USER_FIELD.fullmatch(name)
    if user_field:
        return f"ufCrm{user_field.group(1) or ''}_{user_field.group(2)}"
    first, *rest = name.lower().split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {_camel(str(k)): v for k, v in fields.items()}

@bp.get("/messages")
def list_messages() -> Response:
    """Every message posted, oldest first."""
    portal = _portal()
    with portal.lock:
        return json_response([m.public() for m in portal.messages])


@bp.post("/messages")
def post_message() -> Response:
    """Post a message as any chat member, as a person would in the portal's UI:
    `{"dialog_id": "chat1", "author_id": 2, "message": "..."}`."""
    data = _body()
    dialog_id, author_id, text = data.get("dialog_id"), data.get("author_id"), data.get("message")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("`message` must be a non-empty string")
    if isinstance(author_id, bool) or not isinstance(author_id, int):
        raise BadRequest("`author_id` must be an integer")
    portal = _portal()
    with portal.lock:
        chat = portal.chats.get(dialog_id) if isinstance(dialog_id, str) else None
        if chat is None:
            raise BadRequest("`dialog_id` must name an existing group chat")
        if author_id not in chat.members:
            raise BadRequest("the author is not a member of that chat")
        return json_response(portal.add_message(chat, author_id, text, None).public())


@bp.get("/chats")
def list_chats() -> Response:
    """Every chat and private dialog with its members."""
    portal = _portal()
    with portal.lock:
        return json_response([c.public() for c in portal.chats.values()])


@bp.post("/chats")
def put_chat() -> Response:
    """Create or replace a group chat: `{"id": "chat7", "members": [1], "title"?}`."""
    data = _body()
    dialog_id = data.get("id")
    if not isinstance(dialog_id, str) or not dialog_id.startswith("chat") or not dialog_id[4:].isdigit():
        raise BadRequest("`id` must look like chat<N>")
    members = _ints(data.get("members", []), "members")
    portal = _portal()
    with portal.lock:
        chat = Chat(dialog_id, int(dialog_id[4:]), str(data.get("title") or dialog_id), members)
        portal.chats[dialog_id] = chat
        return json_response(chat.public())


def _object_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A seeded object's `fields`, in camelCase, without the id (it comes from the request)."""
    fields = data.get("fields", {})
    if not isinstance(fields, dict):
        raise BadRequest("`fields` must be an object")
    fields = _camel_fields(fields)
    fields.pop("id", None)
    return fields


@bp.post("/crm/items")
def put_crm_item() -> Response:
    """Create or replace a CRM item: `{"entityTypeId": 2, "id": 12, "fields": {...}}` (UPPER_SNAKE keys become camelCase)."""
    data = _body()
    try:
        key = (int(data["entityTypeId"]), int(data["id"]))
    except (KeyError, TypeError, ValueError):
        raise BadRequest("`entityTypeId` and `id` must be integers") from None
    fields = _object_fields(data)
    portal = _portal()
    with portal.lock:
        existed = key in portal.crm_items
        portal.crm_items[key] = fields
    # A change fires the app's bound online events, as on a portal (deals have their own event names).
    kind = "ONCRMDEAL" if key[0] == 2 else "ONCRMDYNAMICITEM"
    fired = appmode.fire(portal, kind + ("UPDATE" if existed else "ADD"), key[1])
    return json_response({"entityTypeId": key[0], "item": {"id": key[1], **fields}, "fired": fired})


@bp.post("/sale/shipments")
def put_shipment() -> Response:
    """Create or replace a shipment: `{"id": 7, "fields": {...}}` (UPPER_SNAKE keys become camelCase)."""
    data = _body()
    try:
        shipment_id = int(data["id"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest("`id` must be an integer") from None
    fields = _object_fields(data)
    portal = _portal()
    with portal.lock:
        portal.shipments[shipment_id] = fields
    fired = appmode.fire(portal, "ONSHIPMENTENTITYSAVED", shipment_id)
    return json_response({"shipment": {"id": shipment_id, **fields}, "fired": fired})


# -- inspection ------------------------------------------------------------------------------

@bp.get("/calls")
def list_calls() -> Response:
    """Every call received, oldest first; `?method=` keeps one method's calls (batch entries included)."""
    wanted = request.args.get("method")
    portal = _portal()
    with portal.lock:
        calls = [dict(c) for c in portal.calls if wanted is None or c["method"].lower() == wanted.lower()]
        return json_response(calls)


@bp.get("/stats")
def stats() -> Response:
    """Counters: requests, calls by method, errors by code, HTTP statuses, OAuth refreshes."""
    return json_response(_portal().public_stats())


@bp.post("/reset")
def reset() -> Response:
    """Back to the start state; optional `{"documents": N}` seeds another number of documents."""
    data = _body()
    count = data.get("documents")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise BadRequest("`documents` must be a non-negative integer")
    portal = _portal()
    portal.reset(count)
    with portal.lock:
        return json_response({"status": "reset", "documents": len(portal.documents)})


# -- permissions and configuration -------------------------------------------------------------

@bp.get("/permissions")
def get_permissions() -> Response:
    """The current permission switches and chat memberships."""
    portal = _portal()
    with portal.lock:
        return json_response(_permissions_view(portal))


def _permissions_view(portal: Portal) -> dict[str, Any]:
    view = portal.permissions.public()
    view["chat_members"] = {c.dialog_id: sorted(c.members) for c in portal.chats.values()}
    return view


@bp.post("/permissions")
def update_permissions() -> Response:
    """Partial update of the permission switches (see README for the keys)."""
    data = _body()
    portal = _portal()
    with portal.lock:
        perms = portal.permissions
        if "deny_cancel_doc_types" in data:
            types = data["deny_cancel_doc_types"]
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise BadRequest("`deny_cancel_doc_types` must be a list of docType codes")
            perms.deny_cancel_doc_types = set(types)
        for name in ("deny_warehouse", "inventory_enabled", "plan_has_inventory", "app_admin"):
            if name in data:
                setattr(perms, name, _flag(data[name], name))
        if "hidden_document_ids" in data:
            perms.hidden_document_ids = _ints(data["hidden_document_ids"], "hidden_document_ids")
        if "scopes" in data:
            scopes = data["scopes"]
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise BadRequest("`scopes` must be a list of strings")
            perms.scopes = list(scopes)
        members = data.get("chat_members", {})
        if not isinstance(members, dict):
            raise BadRequest("`chat_members` must be an object")
        for dialog_id, users in members.items():
            chat = portal.chats.get(dialog_id)
            if chat is None:
                raise BadRequest(f"chat {dialog_id} does not exist (create it with POST /_sandbox/chats)")
            chat.members = _ints(users, f"chat_members.{dialog_id}")
        return json_response(_permissions_view(portal))


@bp.get("/config")
def get_config() -> Response:
    """The configuration in force."""
    portal = _portal()
    with portal.lock:
        return json_response(portal.config.public())


@bp.post("/config")
def update_config() -> Response:
    """Partial update of the run-time configuration; `reset` restores the start-up one."""
    data = _body()
    portal = _portal()
    with portal.lock:
        config = portal.config
        if "plan" in data:
            if data["plan"] not in PLAN_LIMITS:
                raise BadRequest(f"`plan` must be one of {', '.join(PLAN_LIMITS)}")
            config.plan = data["plan"]
            config.rate, config.burst = PLAN_LIMITS[config.plan]
        if "cancelled_status" in data:
            if data["cancelled_status"] not in CANCELLED_STATUSES:
                raise BadRequest("`cancelled_status` must be C or N")
            config.cancelled_status = data["cancelled_status"]
        if "language" in data:
            if data["language"] not in LANGUAGES:
                raise BadRequest("`language` must be en or ru")
            config.language = data["language"]
        if "rate" in data:
            config.rate = _number(data, "rate")
        if "burst" in data:
            config.burst = int(_number(data, "burst", 1))
        if "latency" in data:
            config.latency = _number(data, "latency")
        if "offline_reserve" in data:
            config.offline_reserve = _flag(data["offline_reserve"], "offline_reserve")
        if "token_lifetime" in data:
            config.token_lifetime = int(_number(data, "token_lifetime"))
        if "durations" in data:
            durations = data["durations"]
            if not isinstance(durations, dict):
                raise BadRequest("`durations` must be an object of method: seconds")
            for method, seconds in durations.items():
                config.durations[str(method)] = _number({"duration": seconds}, "duration")
        window_changed = "operating_window" in data
        if window_changed:
            config.operating_window = _number(data, "operating_window", 0.001)
        if "operating_limit" in data:
            config.operating_limit = _number(data, "operating_limit")
        portal.limiter.rate, portal.limiter.burst = config.rate, config.burst
        if window_changed:
            # Bucket sizes change with the window, so the recorded operating time starts afresh.
            portal.operating = OperatingBudget(config.operating_limit, config.operating_window)
        portal.operating.limit = config.operating_limit
        return json_response(config.public())


# -- faults ----------------------------------------------------------------------------------

@bp.get("/faults")
def list_faults() -> Response:
    """The fault rules, in the order they are tried."""
    portal = _portal()
    with portal.lock:
        return json_response({"rules": [r.public() for r in portal.faults.rules]})


@bp.post("/faults")
def add_faults() -> Response:
    """Append rules: `{"rules": [{"kind", "method"?, "times"?, "rate"?, "seconds"?}]}`."""
    rules = _body().get("rules")
    if not isinstance(rules, list) or not rules:
        raise BadRequest("`rules` must be a non-empty list")
    portal = _portal()
    with portal.lock:
        added = []
        try:
            for raw in rules:
                added.append(portal.faults.add(raw))
        except FaultError as exc:
            for rule in added:
                portal.faults.rules.remove(rule)
            raise BadRequest(str(exc)) from None
        return json_response({"rules": [r.public() for r in portal.faults.rules]})


@bp.delete("/faults")
def clear_faults() -> Response:
    """Remove every rule (the CLI's --error-rate/--drop-rate rules too, until the next reset)."""
    portal = _portal()
    with portal.lock:
        portal.faults.clear()
        return json_response({"rules": []})


# -- OAuth and events ------------------------------------------------------------------------

@bp.post("/oauth/tokens")
def issue_tokens() -> Response:
    """Issue an OAuth pair for the sandbox app: `{"lifetime": seconds?}`."""
    data = _body()
    portal = _portal()
    with portal.lock:
        lifetime = int(_number(data, "lifetime")) if "lifetime" in data else portal.config.token_lifetime
        now = time.time()
        access, refresh = portal.tokens.issue(lifetime, now)
        answer = token_answer(portal, access, refresh, lifetime, now)
        answer.update({"client_id": OAUTH_CLIENT_ID, "client_secret": OAUTH_CLIENT_SECRET})
        return json_response(answer)


@bp.post("/events/send")
def send() -> Response:
    """POST a Bitrix24-style outgoing event to a loopback URL and report the handler's answer."""
    data = _body()
    portal = _portal()
    tokens: dict[str, str] | None = None
    with portal.lock:
        config = portal.config.copy()
        if data.get("with_tokens") or data.get("with_refresh_token"):
            # An app's handler gets a fresh pair of the app's user; refresh_token only with some events.
            now = time.time()
            access, refresh = portal.tokens.issue(config.token_lifetime, now)
            answer = token_answer(portal, access, refresh, config.token_lifetime, now)
            names = ["access_token", "expires", "expires_in", "scope", "status", "user_id"]
            names += ["refresh_token"] if data.get("with_refresh_token") else []
            tokens = {name: str(answer[name]) for name in names}
    try:
        return json_response(send_event(config, data, tokens))
    except EventError as exc:
        raise BadRequest(str(exc)) from None
    except OSError as exc:
        return json_response({"status": None, "body": None, "error": f"{type(exc).__name__}: {exc}"}, 502)


# -- the app ---------------------------------------------------------------------------------

@bp.post("/app/install")
def app_install() -> Response:
    """Install the sandbox app: `{"url": "<install handler>"}` gets ONAPPINSTALL with fresh tokens."""
    url = _body().get("url")
    if not isinstance(url, str):
        raise BadRequest("`url` is required (the app's install handler, on a loopback host)")
    try:
        delivery = appmode.install(_portal(), url)
    except EventError as exc:
        raise BadRequest(str(exc)) from None
    except OSError as exc:
        return json_response({"installed": True, "status": None, "error": f"{type(exc).__name__}: {exc}"}, 502)
    return json_response({"installed": True, **delivery})


@bp.post("/app/uninstall")
def app_uninstall() -> Response:
    """Uninstall the app: ONAPPUNINSTALL to its bound handler (or the install URL); tokens are revoked."""
    try:
        return json_response(appmode.uninstall(_portal()))
    except EventError as exc:
        raise BadRequest(str(exc)) from None


@bp.get("/app")
def app_state() -> Response:
    """Whether the app is installed, its application token, bindings and robots."""
    portal = _portal()
    with portal.lock:
        return json_response(portal.app.public())


@bp.get("/offline")
def offline_queue() -> Response:
    """The app's offline queue: records (with PROCESS_ID and ERROR), reserved batches, notices sent."""
    from sandbox.offline import view

    portal = _portal()
    with portal.lock:
        return json_response(view(portal))


@bp.post("/offline")
def offline_add() -> Response:
    """Queue a record as the portal would for an offline binding: `{"event", "data"}` (any JSON, so a test can
    queue a record whose data is not what the event normally carries); the app must be installed."""
    from sandbox.offline import queue_raw

    data = _body()
    event = data.get("event")
    if not isinstance(event, str) or not event:
        raise BadRequest("`event` is required")
    portal = _portal()
    with portal.lock:
        if not portal.app.installed:
            raise BadRequest("the app is not installed")
        record = queue_raw(portal, event.upper(), data.get("data"), time.time())
        return json_response(record)


@bp.post("/robots/run")
def robots_run() -> Response:
    """Run a robot in a new workflow: `{"code", "document_id": [..3], "properties": {...}, "deliveries"?}`."""
    data = _body()
    code = data.get("code")
    document_id = data.get("document_id", ["crm", "CCrmDocumentDeal", "DEAL_1"])
    properties = data.get("properties", {})
    if not isinstance(code, str) or not code:
        raise BadRequest("`code` is required")
    if not isinstance(document_id, list) or len(document_id) != 3:
        raise BadRequest("`document_id` must be a list of three strings, like [\"crm\", \"CCrmDocumentDeal\", \"DEAL_5\"]")
    if not isinstance(properties, dict):
        raise BadRequest("`properties` must be an object")
    deliveries = data.get("deliveries", 1)
    if isinstance(deliveries, bool) or not isinstance(deliveries, int) or not 1 <= deliveries <= 10:
        raise BadRequest("`deliveries` must be an integer from 1 to 10")
    try:
        return json_response(appmode.run_robot(_portal(), code, [str(p) for p in document_id], properties,
                                               deliveries))
    except EventError as exc:
        raise BadRequest(str(exc)) from None


@bp.get("/workflows")
def workflows() -> Response:
    """Every workflow a robot ran in, with what `bizproc.event.send` returned (null while it waits)."""
    portal = _portal()
    with portal.lock:
        return json_response([workflow.public() for workflow in portal.app.workflows])
