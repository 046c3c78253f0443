"""The REST methods the sandbox implements, each a function of (context, params) registered by name.

A method returns its `result` (or a `Page` for list methods) and raises `RestError` for an error
answer. Methods run with the portal lock held, so they may read and change the state freely.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sandbox.config import PORTAL_TZ
from sandbox.state import REST_DOC_TYPES, SEED_BASE_DATE, document_number, new_document, portal_date
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
    # "webhook" or "oauth" (the app's context: event.bind, bizproc.*, app.info need it)
    auth: str = "webhook"

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


# `catalog.document.<action>` is routed to the core's Document controller: an action it does not
# have (there is no `get`) is the engine's SystemException, code 22002 (Controller::EXCEPTION_UNKNOWN_ACTION).
DOCUMENT_CONTROLLER_PREFIX = "catalog.document."
DOCUMENT_CONTROLLER_CLASS = "Bitrix\\Catalog\\Controller\\Document"
UNKNOWN_ACTION_CODE = "22002"
# Actions the real controller has but the sandbox does not emulate: these stay "method not found".
NOT_EMULATED_DOCUMENT_ACTIONS = frozenset({"update", "delete", "deletelist"})


def unknown_controller_action(name: str) -> RestError | None:
    """The error a real portal gives for `catalog.document.<unknown action>`, else None."""
    lower = name.lower()
    if not lower.startswith(DOCUMENT_CONTROLLER_PREFIX):
        return None
    action = lower[len(DOCUMENT_CONTROLLER_PREFIX):]
    if not action or "." in action or action in NOT_EMULATED_DOCUMENT_ACTIONS:
        return None
    return RestError(UNKNOWN_ACTION_CODE,
                     f"Could not find description of {action} in {DOCUMENT_CONTROLLER_CLASS}")


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

# Field: (type, isRequired, isReadOnly, isImmutable), in the order and with the attributes of the
# core's REST view of a document (`Bitrix\Catalog\RestView\Document::getFields`).
DOCUMENT_FIELDS: dict[str, tuple[str, bool, bool, bool]] = {
    "id": ("integer", False, True, False),
    "docType": ("char", True, False, True),
    "siteId": ("char", False, False, False),
    "responsibleId": ("integer", True, False, False),
    "dateModify": ("datetime", False, False, False),
    "dateCreate": ("datetime", False, False, True),
    "createdBy": ("integer", False, False, True),
    "modifiedBy": ("integer", False, False, False),
    "currency": ("char", True, False, True),
    "status": ("char", False, True, False),
    "dateStatus": ("datetime", False, True, False),
    "dateDocument": ("datetime", False, False, False),
    "statusBy": ("integer", False, False, False),
    "total": ("double", False, False, False),
    "commentary": ("char", False, False, False),
    "title": ("string", False, False, False),
    "docNumber": ("string", False, False, False),
}
# Fields `catalog.document.add` accepts from the caller; the rest are set by the portal.
WRITABLE_FIELDS = ("docNumber", "title", "siteId", "responsibleId", "createdBy", "modifiedBy",
                   "currency", "total", "commentary", "dateDocument")

# Filter prefixes, longest first so that "!=%" is not read as "!" + "=%".
FILTER_OPERATORS = ("!=%", "=%", "!%", "!@", "!=", ">=", "<=", "=", "!", ">", "<", "@", "%")

# The REST view matches a name only after turning it into UPPER_SNAKE the way the core does
# (`camel2snake`, then upper case): `docType` -> DOC_TYPE, but `ID` -> I_D and `DOC_TYPE` -> D_O_C__T_Y_P_E.
_CAMEL_BOUNDARY = re.compile(r"(.)([A-Z])")


def _upper_snake(name: str) -> str:
    return _CAMEL_BOUNDARY.sub(r"\1_\2", name).upper()


_FIELD_BY_SNAKE = {_upper_snake(name): name for name in DOCUMENT_FIELDS}


def rest_field(name: str) -> str | None:
    """The document field a REST name refers to, or None: the core silently drops unknown names."""
    return _FIELD_BY_SNAKE.get(_upper_snake(name))


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


# The REST view leaves a filter condition out when its value cannot be converted to the field's type.
_DROPPED = object()


def php_int(value: Any) -> int:
    """PHP's `(int)` of a scalar: a string's leading integer (0 when it has none), null as 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str):
        match = _LEADING_INT.match(value)
        return int(match.group(1)) if match else 0
    return 0


def _php_float(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        match = _LEADING_FLOAT.match(value)
        return float(match.group(1)) if match else 0.0
    return 0.0


_LEADING_INT = re.compile(r"\s*([+-]?\d+)")
_LEADING_FLOAT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")


def php_empty(value: Any) -> bool:
    """PHP's empty(): null, false, 0, 0.0, "", "0" and empty arrays."""
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, str):
        return value in ("", "0")
    if isinstance(value, (list, dict)):
        return not value
    return False


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


def _stored(field: str, value: Any) -> Any:
    """A stored document value in the field's type, for comparing and sorting (None if absent)."""
    if value is None:
        return None
    kind = DOCUMENT_FIELDS[field][0]
    if kind == "integer":
        return php_int(value)
    if kind == "double":
        return _php_float(value)
    if kind == "datetime":
        return _parse_datetime(value)
    return str(value)


def _internalize_scalar(kind: str, value: Any) -> Any:
    if kind == "integer":
        return php_int(value)
    if kind == "double":
        return _php_float(value)
    if kind == "datetime":
        moment = _parse_datetime(value)
        return _DROPPED if moment is None else moment
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def _internalize(field: str, value: Any) -> Any:
    """A filter value converted as the REST view converts it, or _DROPPED if the view drops it.

    Arrays keep their IN meaning (the reference documents `"@id": [..]`; see the README on this).
    """
    kind = DOCUMENT_FIELDS[field][0]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        if kind == "datetime":
            return _DROPPED  # strtotime() of an array fails
        converted = [_internalize_scalar(kind, v) for v in value]
        return converted
    return _internalize_scalar(kind, value)


def _like(pattern: str) -> re.Pattern[str]:
    """A case-insensitive regex for an SQL LIKE pattern (% and _ as wildcards)."""
    body = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL)


def _condition(key: str, raw: Any) -> Callable[[dict[str, Any]], bool] | None:
    """One filter condition, or None when the REST view drops it (unknown field, unconvertible value)."""
    snake = _upper_snake(key)
    operator = next((op for op in FILTER_OPERATORS if snake.startswith(op)), "")
    field = _FIELD_BY_SNAKE.get(snake[len(operator):])
    if field is None:
        return None
    converted = _internalize(field, raw)
    if converted is _DROPPED:
        return None
    wanted = converted if isinstance(converted, list) else [converted]

    def current(doc: dict[str, Any]) -> Any:
        return _stored(field, doc.get(field))

    if operator in ("", "=", "@"):
        return lambda doc: current(doc) is not None and current(doc) in wanted
    if operator in ("!", "!=", "!@"):
        return lambda doc: current(doc) not in wanted
    texts = ["" if v is None else v.isoformat() if isinstance(v, datetime) else str(v) for v in wanted]
    if operator in ("%", "!%"):
        needles = [t.lower() for t in texts]
        hit = lambda doc: any(n in str(doc.get(field) or "").lower() for n in needles)
        return hit if operator == "%" else (lambda doc: not hit(doc))
    if operator in ("=%", "!=%"):
        patterns = [_like(t) for t in texts]
        hit = lambda doc: any(p.match(str(doc.get(field) or "")) for p in patterns)
        return hit if operator == "=%" else (lambda doc: not hit(doc))
    bound = wanted[0] if wanted else None
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
        value = _stored(field, doc.get(field))
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


def _printed(name: str, value: Any) -> Any:
    if php_empty(value):
        return None  # the REST view prints every PHP-empty value (0, 0.0, "", "0") as null
    kind = DOCUMENT_FIELDS[name][0]
    if kind == "integer":
        return php_int(value)
    if kind == "double":
        return _php_float(value)
    return value


def externalize(document: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A document as REST prints it: the named fields in their types, empty values as null."""
    return {name: _printed(name, document.get(name)) for name in names}


@method("catalog.document.list", "catalog")
def document_list(ctx: CallContext, params: dict[str, Any]) -> Page:
    """Visible documents of REST types, filtered, ordered and paged by 50.

    As the core's REST view does, names it does not know in select, filter and order are left out
    without an error (a mistyped filter key filters nothing), and so are filter values it cannot
    convert (an unparsable date).
    """
    names = _names(params.get("select"))
    if "*" in names:
        names = []
    select = [field for field in dict.fromkeys(rest_field(n) for n in names) if field is not None]
    if not select:
        select = list(DOCUMENT_FIELDS)
    raw_filter = params.get("filter") or {}
    if not isinstance(raw_filter, dict):
        raw_filter = {}
    conditions = [check for check in (_condition(str(k), v) for k, v in raw_filter.items()) if check]
    raw_order = params.get("order") or {}
    if not isinstance(raw_order, dict):
        raw_order = {}
    order = [(field, str(direction).upper() == "DESC") for field, direction in
             ((rest_field(str(k)), v) for k, v in raw_order.items()) if field is not None]
    hidden = ctx.portal.permissions.hidden_document_ids
    rows = [doc for doc_id, doc in sorted(ctx.portal.documents.items())
            if doc_id not in hidden and doc.get("docType") in REST_DOC_TYPES
            and all(check(doc) for check in conditions)]
    for field, descending in reversed(order):
        rows.sort(key=_sort_key(field), reverse=descending)
    # RestManager turns `start` into a page number (start / 50 + 1), so the offset is always a
    # multiple of 50: start=75 reads from the 51st record. -1 leaves out the count (no total/next).
    start = php_int(params.get("start"))
    count_total = start != -1
    offset = (start // PAGE_SIZE) * PAGE_SIZE if start > 0 else 0
    page = rows[offset:offset + PAGE_SIZE]
    documents = [externalize(doc, select) for doc in page]
    if not count_total:
        return Page({"documents": documents}, None, None)
    following = offset + len(page) if offset + len(page) < len(rows) else None
    return Page({"documents": documents}, len(rows), following)


@method("catalog.document.cancel", "catalog")
@method("catalog.document.unconfirm", "catalog")  # deprecated name; the core's cancel runs this one
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
@method("catalog.document.confirm", "catalog")  # deprecated name; the core's conduct runs this one
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
    hidden = ctx.portal.permissions.hidden_document_ids
    for raw_id in doc_ids:
        doc_id = _as_int(raw_id)
        # The core reads the documents without the access filter, so a document the user may not
        # see is found, and then refused by the rights check, with its title.
        document = ctx.portal.documents.get(doc_id) if doc_id is not None else None
        if document is None:
            errors.append(_business(f"{prefix}_NOT_FOUND", ctx))
            continue
        title = document_title(document, ctx.language)
        if doc_id in hidden or not _may_conduct(ctx, document):
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


def _internalize_add(fields: dict[str, Any]) -> dict[str, Any]:
    """The caller's fields as the REST view keeps them: known, writable, converted to their types."""
    kept: dict[str, Any] = {}
    for key, value in fields.items():
        name = rest_field(str(key))
        if name is None or name not in WRITABLE_FIELDS:
            continue
        kind = DOCUMENT_FIELDS[name][0]
        if kind == "datetime":
            moment = _parse_datetime(value)
            if moment is None:
                continue
            value = moment.isoformat()
        elif kind in ("integer", "double"):
            value = _internalize_scalar(kind, value)
        kept[name] = value
    return kept


@method("catalog.document.add", "catalog")
def document_add(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """Create a draft document (status N); an empty docNumber is generated.

    docType, responsibleId and currency are required, as the REST view checks them before the
    action runs ("Required fields: ..."); only then is the type checked ("DOC_TYPE isn't available").
    """
    fields = params.get("fields")
    if fields is None or fields == "":
        raise _missing("fields")
    if not isinstance(fields, dict):
        raise _invalid("fields", fields, "array")
    if not ctx.portal.permissions.plan_has_inventory:
        raise _business("PLAN_RESTRICTED", ctx)
    given = {rest_field(str(k)) for k, v in fields.items() if v is not None}
    missing = [name for name, (_, required, read_only, _) in DOCUMENT_FIELDS.items()
               if required and not read_only and name not in given]
    if missing:
        raise RestError("0", "Required fields: " + ", ".join(missing))
    doc_type = next(v for k, v in fields.items() if rest_field(str(k)) == "docType")
    if doc_type not in REST_DOC_TYPES:
        raise RestError("0", "DOC_TYPE isn't available")
    doc_id = ctx.portal.next_document_id()
    now = datetime.fromtimestamp(ctx.now, PORTAL_TZ)
    document = new_document(doc_id, doc_type, "N", "", now)
    document["total"] = 0.0
    document.update({"createdBy": ctx.user_id, "modifiedBy": ctx.user_id})
    document.update(_internalize_add(fields))  # the webhook user is an admin: createdBy/modifiedBy may be set
    document["docNumber"] = document["docNumber"] or document_number(doc_id)
    ctx.portal.documents[doc_id] = document
    return {"document": externalize(document, list(DOCUMENT_FIELDS))}


def _field_descriptions() -> dict[str, Any]:
    return {name: {"type": kind, "isRequired": required, "isReadOnly": read_only, "isImmutable": immutable}
            for name, (kind, required, read_only, immutable) in DOCUMENT_FIELDS.items()}


@method("catalog.document.getFields", "catalog")
def document_get_fields(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """The field descriptions of an inventory document."""
    return {"document": _field_descriptions()}


@method("catalog.document.fields", "catalog")
def document_fields_deprecated(ctx: CallContext, params: dict[str, Any]) -> list[Any]:
    """Deprecated `fields`: the same descriptions, as a one-element list (the core's fieldsAction)."""
    return [_field_descriptions()]


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
    if dialog_id.startswith(("chat", "sg")):
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
    reply_id = _reply_to(ctx, chat, p.get("REPLY_ID"))
    if len(body) > MESSAGE_MAX_CHARS:
        body = body[:MESSAGE_MAX_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return ctx.portal.add_message(chat, ctx.user_id, body, attach, reply_id).id


def _reply_to(ctx: CallContext, chat: Chat, raw: Any) -> int | None:
    """The message a new one replies to (`REPLY_ID`): it must exist, be readable and be in the same chat.

    Errors as im-message-add.md lists them: REPLY_ACCESS_ERROR ("Action unavailable") when there is no
    such message or the user cannot read it, REPLY_FROM_OTHER_CHAT_ERROR when it is in another chat.
    """
    if raw in (None, "", 0, "0"):
        return None
    reply_id = _as_int(raw)
    if reply_id is None or reply_id <= 0:
        raise RestError("PARAMS_ERROR", "Incorrect params")
    target = ctx.portal.message(reply_id)
    readable = target is not None and any(
        c.chat_id == target.chat_id and ctx.user_id in c.members for c in ctx.portal.chats.values())
    if target is None or not readable:
        raise RestError("REPLY_ACCESS_ERROR", "Action unavailable")
    if target.chat_id != chat.chat_id:
        raise RestError("REPLY_FROM_OTHER_CHAT_ERROR", "You can only reply to a message within the same chat")
    return reply_id


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
                      "text": m.text, "params": _message_params(m)}
                     for m in newest],
        "chat_id": chat.chat_id,
        "users": [dict(ctx.portal.users[a]) for a in authors if a in ctx.portal.users],
    }


@method("im.dialog.get", "im")
def dialog_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """A dialog's data, for a member only (`ACCESS_ERROR` otherwise, as for reading its messages)."""
    p = _upper(params)
    dialog_id = str(p.get("DIALOG_ID") or "").strip()
    if not dialog_id:
        raise RestError("DIALOG_ID_EMPTY", "Dialog ID can't be empty")
    chat = _resolve_dialog(ctx, dialog_id, for_reading=True)
    group = chat.dialog_id.startswith(("chat", "sg"))
    owner = min(chat.members) if chat.members else 0
    return {"id": str(chat.chat_id), "title": chat.title, "owner": str(owner), "extranet": False, "avatar": "",
            "color": "#4ba984", "type": "chat" if group else "private", "entity_type": "", "entity_data_1": "",
            "entity_data_2": "", "entity_data_3": "", "date_create": portal_date(SEED_BASE_DATE.timestamp()),
            "message_type": "C" if group else "P"}


def _message_params(message: Any) -> dict[str, Any] | list[Any]:
    """A message's `params` as im.dialog.messages.get gives them (PHP's empty array when there are none)."""
    params: dict[str, Any] = {}
    if message.attach is not None:
        params["ATTACH"] = message.attach
    if message.reply_id is not None:
        params["REPLY_ID"] = message.reply_id
    return params or []


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
