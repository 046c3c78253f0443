"""The REST methods the sandbox implements, each a function of (context, params) registered by name.

A method returns its `result` (or a `Page` for list methods) and raises `RestError` for an error
answer. Methods run with the portal lock held, so they may read and change the state freely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sandbox.config import PORTAL_TZ
from sandbox.state import REST_DOC_TYPES, document_number, new_document, portal_date
from sandbox.texts import document_title, text

if TYPE_CHECKING:
    from sandbox.state import Chat, Portal

# A list page holds 50 records in Bitrix24 REST.
PAGE_SIZE = 50
# Chat text limit (documented for imbot.v2; assumed for im.message.add): longer text is cut to this
# many characters including the mark that shows it was cut.
MESSAGE_MAX_CHARS = 20_000
TRUNCATION_MARK = " (...)"
# Serialized ATTACH may not exceed this many characters (chats/index.md).
ATTACH_MAX_CHARS = 60_000
# im.dialog.messages.get returns 20 messages by default and at most 50.
DIALOG_DEFAULT_LIMIT = 20
DIALOG_MAX_LIMIT = 50


class RestError(Exception):
    """An error answer: `{"error": code, "error_description": description}` with an HTTP status."""

    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status


@dataclass
class Page:
    """A list result with the top-level `total` and `next` Bitrix24 adds to list answers."""

    result: Any
    total: int | None
    next: int | None


@dataclass
class CallContext:
    """Who calls and when; handed to every method."""

    portal: Portal
    user_id: int
    now: float

    @property
    def language(self) -> str:
        """The portal language for localized texts."""
        return self.portal.config.language


MethodHandler = Callable[[CallContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """A REST method: its canonical name, the scope it needs and its implementation."""

    name: str
    scope: str | None
    handler: MethodHandler


REGISTRY: dict[str, MethodSpec] = {}


def method(name: str, scope: str | None) -> Callable[[MethodHandler], MethodHandler]:
    """Register a handler under `name` (looked up case-insensitively, as Bitrix24 does)."""
    def register(handler: MethodHandler) -> MethodHandler:
        REGISTRY[name.lower()] = MethodSpec(name, scope, handler)
        return handler
    return register


def find_method(name: str) -> MethodSpec | None:
    """The method registered under `name`, ignoring case."""
    return REGISTRY.get(name.lower())


# -- parameters ------------------------------------------------------------------------------

def _missing(name: str) -> RestError:
    return RestError("100", f"Could not find value for parameter {{{name}}}")


def _invalid(name: str, value: Any, kind: str) -> RestError:
    return RestError("100", f"Invalid value {value} to match with parameter {{{name}}}. "
                            f"Should be value of type {kind}.")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def int_param(params: dict[str, Any], name: str) -> int:
    """A required integer parameter, with the engine's argument errors (code "100")."""
    if name not in params or params[name] in (None, ""):
        raise _missing(name)
    number = _as_int(params[name])
    if number is None:
        raise _invalid(name, params[name], "int")
    return number


def array_param(params: dict[str, Any], name: str) -> list[Any]:
    """A required array parameter (a list, or an object whose values are taken in order)."""
    if name not in params or params[name] in (None, ""):
        raise _missing(name)
    value = params[name]
    if isinstance(value, dict):
        return list(value.values())
    if not isinstance(value, list):
        raise _invalid(name, value, "array")
    return value


def _business(message_id: str, ctx: CallContext, **values: str) -> RestError:
    """A catalog business error: HTTP 400 with the error code "0" and a localized text."""
    return RestError("0", text(message_id, ctx.language, **values))


# -- inventory documents ---------------------------------------------------------------------

# Field: (type, isRequired, isReadOnly, isImmutable), as catalog.document.getFields describes them.
DOCUMENT_FIELDS: dict[str, tuple[str, bool, bool, bool]] = {
    "id": ("integer", False, True, False),
    "docType": ("char", True, False, True),
    "docNumber": ("string", False, False, False),
    "title": ("string", False, False, False),
    "siteId": ("char", False, False, False),
    "responsibleId": ("integer", True, False, False),
    "createdBy": ("integer", False, False, False),
    "modifiedBy": ("integer", False, False, False),
    "statusBy": ("integer", False, True, False),
    "status": ("char", False, True, False),
    "dateStatus": ("datetime", False, True, False),
    "dateCreate": ("datetime", False, False, False),
    "dateModify": ("datetime", False, False, False),
    "dateDocument": ("datetime", False, False, False),
    "currency": ("char", True, False, True),
    "total": ("double", False, False, False),
    "commentary": ("string", False, False, False),
}
# Fields `catalog.document.add` accepts from the caller; the rest are set by the portal.
WRITABLE_FIELDS = ("docNumber", "title", "siteId", "responsibleId", "createdBy", "modifiedBy",
                   "currency", "total", "commentary", "dateDocument")

# Filter prefixes, longest first so that "!=%" is not read as "!" + "=%".
FILTER_OPERATORS = ("!=%", "=%", "!%", "!@", "!=", ">=", "<=", "=", "!", ">", "<", "@", "%")


def _check_inventory(ctx: CallContext, plan_message: str, disabled_message: str) -> None:
    permissions = ctx.portal.permissions
    if not permissions.plan_has_inventory:
        raise _business(plan_message, ctx)
    if not permissions.inventory_enabled:
        raise _business(disabled_message, ctx)


def _check_warehouse(ctx: CallContext) -> None:
    if ctx.portal.permissions.deny_warehouse:
        raise _business("NO_STORE_RIGHTS", ctx)


def _may_conduct(ctx: CallContext, document: dict[str, Any]) -> bool:
    """Whether the user holds the "Conduct / Cancel conduct" right for the document's type."""
    return document.get("docType") not in ctx.portal.permissions.deny_cancel_doc_types


def _set_status(ctx: CallContext, document: dict[str, Any], status: str) -> None:
    stamp = portal_date(ctx.now)
    document["status"] = status
    document["dateStatus"] = stamp
    document["dateModify"] = stamp
    document["statusBy"] = ctx.user_id
    document["modifiedBy"] = ctx.user_id


def _unknown_field(name: str) -> RestError:
    # What the ORM says about a field it does not know (the sandbox's wording of it).
    return RestError("0", f"Unknown field definition `{name}` for Catalog StoreDocument Entity.")


def _parse_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    raw = value.strip()
    for parse in (datetime.fromisoformat,
                  lambda s: datetime.strptime(s, "%d.%m.%Y %H:%M:%S"),
                  lambda s: datetime.strptime(s, "%d.%m.%Y")):
        try:
            moment = parse(raw)
        except ValueError:
            continue
        return moment if moment.tzinfo else moment.replace(tzinfo=PORTAL_TZ)
    return None


def _coerce(field: str, value: Any) -> Any:
    """A filter value converted to the field's type, or None if it cannot be."""
    kind = DOCUMENT_FIELDS[field][0]
    if kind == "integer":
        return _as_int(value)
    if kind == "double":
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if kind == "datetime":
        return _parse_datetime(value)
    return None if value is None else str(value)


def _like(pattern: str) -> re.Pattern[str]:
    """A case-insensitive regex for an SQL LIKE pattern (% and _ as wildcards)."""
    body = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL)


def _condition(key: str, raw: Any) -> Callable[[dict[str, Any]], bool]:
    operator = next((op for op in FILTER_OPERATORS if key.startswith(op)), "")
    field = key[len(operator):]
    if field not in DOCUMENT_FIELDS:
        raise _unknown_field(field)
    values = raw if isinstance(raw, list) else list(raw.values()) if isinstance(raw, dict) else [raw]
    wanted = [_coerce(field, v) for v in values]

    def current(doc: dict[str, Any]) -> Any:
        return _coerce(field, doc.get(field))

    if operator in ("", "=", "@"):
        return lambda doc: current(doc) is not None and current(doc) in wanted
    if operator in ("!", "!=", "!@"):
        return lambda doc: current(doc) not in wanted
    if operator in ("%", "!%"):
        needles = [str(v).lower() for v in values]
        hit = lambda doc: any(n in str(doc.get(field) or "").lower() for n in needles)  # noqa: E731
        return hit if operator == "%" else (lambda doc: not hit(doc))
    if operator in ("=%", "!=%"):
        patterns = [_like(str(v)) for v in values]
        hit = lambda doc: any(p.match(str(doc.get(field) or "")) for p in patterns)  # noqa: E731
        return hit if operator == "=%" else (lambda doc: not hit(doc))
    bound = wanted[0]
    compare = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
               "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}[operator]

    def ordered(doc: dict[str, Any]) -> bool:
        value = current(doc)
        if value is None or bound is None:
            return False
        try:
            return bool(compare(value, bound))
        except TypeError:
            return False
    return ordered


def _sort_key(field: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    def key(doc: dict[str, Any]) -> tuple[int, Any]:
        value = _coerce(field, doc.get(field))
        return (0, "") if value is None else (1, value)
    return key


def _names(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value:
        return [value]
    return []


@method("catalog.document.list", "catalog")
def document_list(ctx: CallContext, params: dict[str, Any]) -> Page:
    """Visible documents of REST types, filtered, ordered and paged by 50."""
    select = _names(params.get("select"))
    if not select or "*" in select:
        select = list(DOCUMENT_FIELDS)
    for name in select:
        if name not in DOCUMENT_FIELDS:
            raise _unknown_field(name)
    raw_filter = params.get("filter") or {}
    if not isinstance(raw_filter, dict):
        raw_filter = {}
    conditions = [_condition(str(k), v) for k, v in raw_filter.items()]
    raw_order = params.get("order") or {"id": "ASC"}
    if not isinstance(raw_order, dict):
        raw_order = {"id": "ASC"}
    for name in raw_order:
        if name not in DOCUMENT_FIELDS:
            raise _unknown_field(name)
    hidden = ctx.portal.permissions.hidden_document_ids
    rows = [doc for doc_id, doc in ctx.portal.documents.items()
            if doc_id not in hidden and doc.get("docType") in REST_DOC_TYPES
            and all(check(doc) for check in conditions)]
    for name, direction in reversed(list(raw_order.items())):
        rows.sort(key=_sort_key(name), reverse=str(direction).upper() == "DESC")
    start = _as_int(params.get("start")) or 0
    count_total = start != -1
    start = max(start, 0)
    page = rows[start:start + PAGE_SIZE]
    documents = [{name: doc.get(name) for name in select} for doc in page]
    if not count_total:
        return Page({"documents": documents}, None, None)
    following = start + PAGE_SIZE if start + PAGE_SIZE < len(rows) else None
    return Page({"documents": documents}, len(rows), following)


@method("catalog.document.cancel", "catalog")
def document_cancel(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Cancel the conduct of one document: only from status Y."""
    doc_id = int_param(params, "id")
    _check_inventory(ctx, "PLAN_RESTRICTED", "MANAGEMENT_NOT_ENABLED")
    _check_warehouse(ctx)
    document = ctx.portal.visible_document(doc_id)
    if document is None or not _may_conduct(ctx, document):
        raise _business("NO_RIGHTS", ctx)
    if document["status"] != "Y":
        raise _business("CANCEL_NOT_CONDUCTED", ctx)
    _set_status(ctx, document, ctx.portal.config.cancelled_status)
    return True


@method("catalog.document.conduct", "catalog")
def document_conduct(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Conduct one document (status becomes Y)."""
    doc_id = int_param(params, "id")
    _check_inventory(ctx, "CONDUCT_PLAN_RESTRICTED", "CONDUCT_MANAGEMENT_NOT_ENABLED")
    _check_warehouse(ctx)
    document = ctx.portal.visible_document(doc_id)
    if document is None or not _may_conduct(ctx, document):
        raise _business("NO_RIGHTS_CONDUCT", ctx)
    if document["status"] == "Y":
        raise _business("CONDUCT_ALREADY_CONDUCTED", ctx)
    _set_status(ctx, document, "Y")
    return True


def _run_list(ctx: CallContext, params: dict[str, Any], cancel: bool) -> bool:
    """cancelList / conductList: act on every id, keep what worked, report only the first error."""
    doc_ids = array_param(params, "documentIds")
    _check_inventory(ctx, "PLAN_RESTRICTED", "MANAGEMENT_NOT_ENABLED")
    _check_warehouse(ctx)
    prefix = "LIST_CANCEL" if cancel else "LIST_CONDUCT"
    errors: list[RestError] = []
    for raw_id in doc_ids:
        doc_id = _as_int(raw_id)
        document = ctx.portal.visible_document(doc_id) if doc_id is not None else None
        if document is None:
            errors.append(_business(f"{prefix}_NOT_FOUND", ctx))
            continue
        title = document_title(document, ctx.language)
        if not _may_conduct(ctx, document):
            errors.append(_business(f"{prefix}_NO_RIGHTS", ctx, title=title))
        elif cancel and document["status"] != "Y":
            errors.append(_business("LIST_CANCEL_NOT_CONDUCTED", ctx, title=title))
        elif not cancel and document["status"] == "Y":
            errors.append(_business("LIST_CONDUCT_ALREADY_CONDUCTED", ctx, title=title))
        else:
            _set_status(ctx, document, ctx.portal.config.cancelled_status if cancel else "Y")
    if errors:
        raise errors[0]
    return True


@method("catalog.document.cancelList", "catalog")
def document_cancel_list(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Cancel several documents; no rollback, only the first error is reported."""
    return _run_list(ctx, params, cancel=True)


@method("catalog.document.conductList", "catalog")
def document_conduct_list(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Conduct several documents; no rollback, only the first error is reported."""
    return _run_list(ctx, params, cancel=False)


@method("catalog.document.add", "catalog")
def document_add(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """Create a draft document (status N); an empty docNumber is generated."""
    fields = params.get("fields")
    if fields is None or fields == "":
        raise _missing("fields")
    if not isinstance(fields, dict):
        raise _invalid("fields", fields, "array")
    if fields.get("docType") not in REST_DOC_TYPES:
        raise RestError("0", "DOC_TYPE isn't available")
    if not ctx.portal.permissions.plan_has_inventory:
        raise _business("PLAN_RESTRICTED", ctx)
    doc_id = ctx.portal.next_document_id()
    now = datetime.fromtimestamp(ctx.now, PORTAL_TZ)
    document = new_document(doc_id, fields["docType"], "N", "", now)
    for name in WRITABLE_FIELDS:
        if name in fields:
            value = fields[name]
            kind = DOCUMENT_FIELDS[name][0]
            document[name] = (_as_int(value) if kind == "integer" else
                              float(value) if kind == "double" and value not in (None, "") else value)
    document["docNumber"] = document["docNumber"] or document_number(doc_id)
    document["createdBy"] = document["modifiedBy"] = ctx.user_id
    ctx.portal.documents[doc_id] = document
    return {"document": dict(document)}


@method("catalog.document.getFields", "catalog")
def document_get_fields(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """The field descriptions of an inventory document."""
    return {"document": {name: {"type": kind, "isRequired": required, "isReadOnly": read_only,
                                "isImmutable": immutable}
                         for name, (kind, required, read_only, immutable) in DOCUMENT_FIELDS.items()}}


@method("catalog.document.mode.status", "catalog")
def document_mode_status(ctx: CallContext, params: dict[str, Any]) -> str:
    """"Y" when inventory management is on (and the plan has it), else "N"."""
    permissions = ctx.portal.permissions
    return "Y" if permissions.inventory_enabled and permissions.plan_has_inventory else "N"


# -- chat ------------------------------------------------------------------------------------

def _upper(params: dict[str, Any]) -> dict[str, Any]:
    """im.* methods take their parameters in any case (the module upper-cases them)."""
    return {str(k).upper(): v for k, v in params.items()}


def _resolve_dialog(ctx: CallContext, dialog_id: str, for_reading: bool) -> Chat:
    portal = ctx.portal
    if dialog_id.startswith("chat") or dialog_id.startswith("sg"):
        chat = portal.chats.get(dialog_id)
        if chat is None:
            if for_reading:
                raise RestError("ACCESS_ERROR", "You do not have access to the specified dialog")
            raise RestError("CHAT_ID", "Error creating message")
        if ctx.user_id not in chat.members:
            if for_reading:
                raise RestError("ACCESS_ERROR", "You do not have access to the specified dialog")
            raise RestError("ACCESS_ERROR", "Action unavailable")
        return chat
    user_id = _as_int(dialog_id)
    if user_id is None or user_id <= 0:
        raise RestError("DIALOG_ID_EMPTY" if for_reading else "USER_ID_EMPTY",
                        "Dialog ID can't be empty" if for_reading else "User ID can't be empty")
    if user_id not in portal.users:
        if for_reading:
            raise RestError("ACCESS_ERROR", "You do not have access to the specified dialog")
        raise RestError("USER_NOT_FOUND", "User not found")
    return portal.private_dialog(user_id)


@method("im.message.add", "im")
def message_add(ctx: CallContext, params: dict[str, Any]) -> int:
    """Post a message as the webhook user; returns the new message id."""
    p = _upper(params)
    dialog_id = str(p.get("DIALOG_ID") or "").strip()
    if not dialog_id:
        raise RestError("USER_ID_EMPTY", "User ID can't be empty")
    attach = p.get("ATTACH")
    if isinstance(attach, str) and attach.strip():
        try:
            attach = json.loads(attach)
        except ValueError:
            raise RestError("ATTACH_ERROR", "Incorrect attach params") from None
    if attach in ("", None, [], {}):
        attach = None
    if attach is not None and len(json.dumps(attach, ensure_ascii=False)) > ATTACH_MAX_CHARS:
        raise RestError("ATTACH_OVERSIZE", "You have exceeded the maximum allowable size of attach")
    message = p.get("MESSAGE")
    body = "" if message is None else str(message)
    if not body.strip() and attach is None:
        raise RestError("MESSAGE_EMPTY", "Message can't be empty")
    chat = _resolve_dialog(ctx, dialog_id, for_reading=False)
    if len(body) > MESSAGE_MAX_CHARS:
        body = body[:MESSAGE_MAX_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return ctx.portal.add_message(chat, ctx.user_id, body, attach).id


@method("im.dialog.messages.get", "im")
def dialog_messages_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """The latest messages of a dialog, newest first (`LIMIT`, default 20, at most 50; `LAST_ID`)."""
    p = _upper(params)
    dialog_id = str(p.get("DIALOG_ID") or "").strip()
    if not dialog_id:
        raise RestError("DIALOG_ID_EMPTY", "Dialog ID can't be empty")
    chat = _resolve_dialog(ctx, dialog_id, for_reading=True)
    limit = _as_int(p.get("LIMIT")) or DIALOG_DEFAULT_LIMIT
    limit = max(1, min(limit, DIALOG_MAX_LIMIT))
    last_id = _as_int(p.get("LAST_ID"))
    found = [m for m in ctx.portal.messages
             if m.chat_id == chat.chat_id and (last_id is None or m.id < last_id)]
    newest = sorted(found, key=lambda m: m.id, reverse=True)[:limit]
    authors = sorted({m.author_id for m in newest})
    return {
        "messages": [{"id": m.id, "chat_id": m.chat_id, "author_id": m.author_id, "date": portal_date(m.date),
                      "text": m.text, "params": {"ATTACH": m.attach} if m.attach is not None else []}
                     for m in newest],
        "chat_id": chat.chat_id,
        "users": [dict(ctx.portal.users[a]) for a in authors if a in ctx.portal.users],
    }


# -- CRM and sale ----------------------------------------------------------------------------

@method("crm.item.get", "crm")
def crm_item_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """One CRM item by entityTypeId and id."""
    entity_type_id = int_param(params, "entityTypeId")
    item_id = int_param(params, "id")
    item = ctx.portal.crm_items.get((entity_type_id, item_id))
    if item is None:
        raise RestError("NOT_FOUND", "Element not found")
    return {"item": {"id": item_id, **item}}


@method("sale.shipment.get", "sale")
def shipment_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """One shipment by id; a missing one gives the sale module's own error code."""
    shipment_id = int_param(params, "id")
    shipment = ctx.portal.shipments.get(shipment_id)
    if shipment is None:
        # Bitrix\Sale\Controller\Shipment: new Error('shipment is not exists', 201140400001).
        raise RestError("201140400001", "shipment is not exists")
    return {"shipment": {"id": shipment_id, **shipment}}


# -- general ---------------------------------------------------------------------------------

@method("scope", None)
def scope(ctx: CallContext, params: dict[str, Any]) -> list[str]:
    """The scopes granted to the webhook (or app)."""
    return list(ctx.portal.permissions.scopes)


@method("profile", None)
def profile(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """The calling user, as `profile` returns it."""
    user = ctx.portal.users.get(ctx.user_id, {})
    return {"ID": str(ctx.user_id), "ADMIN": True, "NAME": user.get("first_name", ""),
            "LAST_NAME": user.get("last_name", ""), "PERSONAL_GENDER": "", "TIME_ZONE": "",
            "TIME_ZONE_OFFSET": int(PORTAL_TZ.utcoffset(None).total_seconds())}


@method("server.time", None)
def server_time(ctx: CallContext, params: dict[str, Any]) -> str:
    """The portal's current time."""
    return portal_date(ctx.now)
