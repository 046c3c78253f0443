"""Offline events: the app's queue on the portal, `event.offline.*`, `feature.get` and ONOFFLINEEVENT.

An event the app bound with `event_type=offline` is not sent anywhere: it becomes a record in the app's
queue, one record per object holding only its latest state (a later change of the same object replaces the
unreserved record's data and time; a record already reserved stays as it is, and the change makes a new
one). `event.offline.get` hands records out, deleting them (`clear=1`, the default) or reserving them under
a `process_id` until `event.offline.clear` confirms them (`clear=0`, only on plans with
`rest_offline_extended`, the `offline_reserve` switch here). Parallel calls get disjoint batches (every call
runs under the portal lock). When the app bound ONOFFLINEEVENT, a change that queues a record sends it a
notice, at most one per `minTimeout` seconds (a later change inside that gap sends one when it ends).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from sandbox.events import EventError, post_form
from sandbox.methods import CallContext, Page, RestError, method

if TYPE_CHECKING:
    from sandbox.state import Portal

# Records a call hands out by default, and a list page.
DEFAULT_LIMIT = 50
PAGE_SIZE = 50
NOTICE_EVENT = "ONOFFLINEEVENT"
# The documented default gap between two notices.
DEFAULT_MIN_TIMEOUT = 1
FIELDS = ("ID", "TIMESTAMP_X", "EVENT_NAME", "EVENT_DATA", "EVENT_ADDITIONAL", "MESSAGE_ID")
FILTER_FIELDS = {"ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID"}
LIST_FILTER_FIELDS = FILTER_FIELDS | {"PROCESS_ID", "ERROR"}
OFFLINE_ADMIN = ("ACCESS_DENIED", "Access denied! Offline events require administrator access rights")
NO_RESERVE = ("ACCESS_DENIED",
              "Access denied! Processing offline events with clear=0 (rest_offline_extended) is not on your plan")
NOTICES_KEPT = 200


def message_id(event: str, data: Any) -> str:
    """The record's MESSAGE_ID: a hash of the event name and its data, so one object's records share it."""
    return hashlib.md5(f"{event}|{json.dumps(data, sort_keys=True)}".encode()).hexdigest()


def _app(ctx: CallContext) -> Any:
    """The installed app, called in its context by an admin; the documented refusals otherwise."""
    from sandbox.appmode import _require_app

    app = _require_app(ctx)
    if not ctx.portal.permissions.app_admin:
        raise RestError(*OFFLINE_ADMIN, status=403)
    return app


def _upper(params: dict[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in params.items()}


def _flag(value: Any, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return 1 if int(str(value)) else 0
    except ValueError:
        return 1 if str(value).upper() in ("Y", "TRUE") else 0


def _int(value: Any, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def _compare(value: Any, op: str, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_compare(value, op if op not in ("!", "!=") else "=", item) for item in wanted) != (op in ("!", "!="))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            left: Any = float(value)
            right: Any = float(wanted)
        except (TypeError, ValueError):
            return False
    else:
        left, right = str(value), str(wanted)
    if op in ("", "="):
        return bool(left == right)
    if op in ("!", "!="):
        return bool(left != right)
    return bool({">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}.get(op, False))


def _matches(record: dict[str, Any], filter_: Any, allowed: set[str]) -> bool:
    """Whether a record passes a filter like `{">=ID": 3, "=EVENT_NAME": "ONCRMDEALUPDATE"}`."""
    if not isinstance(filter_, dict):
        return True
    for key, wanted in filter_.items():
        key = str(key)
        op = ""
        for prefix in (">=", "<=", "!=", "=", ">", "<", "!"):
            if key.startswith(prefix):
                op, key = prefix, key[len(prefix):]
                break
        name = key.upper()
        if name not in allowed:
            continue  # unknown fields are ignored, as the core's ORM filter does for these methods
        value = record[name] if name != "TIMESTAMP_X" else record["TIMESTAMP_X"]
        if name == "TIMESTAMP_X" and not isinstance(wanted, (int, float)):
            value = _date(record["TIMESTAMP_X"])
        if not _compare(value, op, wanted):
            return False
    return True


def _sorted(records: list[dict[str, Any]], order: Any, default: tuple[str, str]) -> list[dict[str, Any]]:
    pairs = list(order.items()) if isinstance(order, dict) and order else [default]
    result = list(records)
    for name, direction in reversed(pairs):
        field = str(name).upper()
        if field not in LIST_FILTER_FIELDS:
            continue
        result.sort(key=_sort_key(field), reverse=str(direction).upper() == "DESC")
    return result


def _sort_key(field: str) -> Any:
    def key(record: dict[str, Any]) -> Any:
        return int(record["ID"]) if field == "ID" else record[field]
    return key


def _date(ts: float) -> str:
    from sandbox.state import portal_date

    return portal_date(ts)


def _public(record: dict[str, Any], with_state: bool = False) -> dict[str, Any]:
    shown = {"ID": str(record["ID"]), "TIMESTAMP_X": _date(record["TIMESTAMP_X"]),
             "EVENT_NAME": record["EVENT_NAME"], "EVENT_DATA": record["EVENT_DATA"],
             "EVENT_ADDITIONAL": record["EVENT_ADDITIONAL"], "MESSAGE_ID": record["MESSAGE_ID"]}
    if with_state:
        shown["PROCESS_ID"] = record["PROCESS_ID"]
        shown["ERROR"] = str(record["ERROR"])
    return shown


@method("feature.get", None)
def feature_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, str]:
    """`{"value": "Y"|"N"}` for `rest_offline_extended` (the `offline_reserve` switch) and `rest_auth_connector`."""
    code = str(_upper(params).get("CODE") or "").strip()
    if not code:
        raise RestError("CODE_EMPTY", "CODE can't be empty")
    if code == "rest_offline_extended":
        return {"value": "Y" if ctx.portal.config.offline_reserve else "N"}
    return {"value": "Y" if code == "rest_auth_connector" else "N"}


@method("event.offline.get", None)
def offline_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """Hand out the first records: deleted (`clear=1`) or reserved under `process_id` (`clear=0`)."""
    app = _app(ctx)
    p = _upper(params)
    clear = _flag(p.get("CLEAR"), 1)
    limit = max(1, _int(p.get("LIMIT"), DEFAULT_LIMIT))
    with_errors = _flag(p.get("ERROR"), 0)
    if not clear and not ctx.portal.config.offline_reserve:
        raise RestError(*NO_RESERVE, status=403)
    process_id = str(p.get("PROCESS_ID") or "").strip()
    filter_, order = p.get("FILTER"), p.get("ORDER")
    queue: list[dict[str, Any]] = app.offline

    def visible(record: dict[str, Any]) -> bool:
        return bool(with_errors or not record["ERROR"]) and _matches(record, filter_, FILTER_FIELDS)

    batch = [r for r in queue if process_id and r["PROCESS_ID"] == process_id and visible(r)]
    batch = _sorted(batch, order, ("TIMESTAMP_X", "ASC"))[:limit]
    taken = {r["MESSAGE_ID"] for r in batch}
    for record in _sorted([r for r in queue if not r["PROCESS_ID"] and visible(r)], order, ("TIMESTAMP_X", "ASC")):
        if len(batch) >= limit:
            break
        if record["MESSAGE_ID"] in taken:
            continue  # a reserved copy of this object is in the batch: the newer one waits for the next
        batch.append(record)
        taken.add(record["MESSAGE_ID"])
    batch = _sorted(batch, order, ("TIMESTAMP_X", "ASC"))
    if clear:
        gone = {id(r) for r in batch}
        app.offline = [r for r in queue if id(r) not in gone]
        return {"process_id": None, "events": [_public(r) for r in batch]}
    process_id = process_id or secrets.token_hex(16)
    for record in batch:
        record["PROCESS_ID"] = process_id
        record["RESERVED_AT"] = ctx.now
    return {"process_id": process_id, "events": [_public(r) for r in batch]}


def _ids(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [str(item) for item in items]


@method("event.offline.clear", None)
def offline_clear(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Delete the records reserved under `process_id` (only those named by `id`, else by `message_id`)."""
    app = _app(ctx)
    p = _upper(params)
    process_id = str(p.get("PROCESS_ID") or "").strip()
    if not process_id:
        raise RestError("ERROR_ARGUMENT", "Argument 'process_id' is null or empty")
    ids, messages = _ids(p.get("ID")), _ids(p.get("MESSAGE_ID"))

    def confirmed(record: dict[str, Any]) -> bool:
        if record["PROCESS_ID"] != process_id:
            return False
        if ids:
            return str(record["ID"]) in ids
        return not messages or record["MESSAGE_ID"] in messages

    app.offline = [r for r in app.offline if not confirmed(r)]
    return True


@method("event.offline.error", None)
def offline_error(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Mark reserved records as failed: they leave the batch and `get` skips them unless asked with `error=1`."""
    app = _app(ctx)
    p = _upper(params)
    process_id = str(p.get("PROCESS_ID") or "").strip()
    if not process_id:
        raise RestError("ERROR_ARGUMENT", "Argument 'process_id' is null or empty")
    messages = _ids(p.get("MESSAGE_ID"))
    for record in app.offline:
        if record["PROCESS_ID"] == process_id and record["MESSAGE_ID"] in messages:
            record["ERROR"] = 1
            record["PROCESS_ID"] = ""
    return True


@method("event.offline.list", None)
def offline_list(ctx: CallContext, params: dict[str, Any]) -> Page:
    """The queue as it is (with PROCESS_ID and ERROR), pages of 50, nothing changed."""
    app = _app(ctx)
    p = _upper(params)
    start = max(0, _int(p.get("START"), 0))
    records = [r for r in app.offline if _matches(r, p.get("FILTER"), LIST_FILTER_FIELDS)]
    records = _sorted(records, p.get("ORDER"), ("ID", "ASC"))
    page = records[start:start + PAGE_SIZE]
    more = start + PAGE_SIZE < len(records)
    return Page([_public(r, with_state=True) for r in page], len(records), start + PAGE_SIZE if more else None)


# -- queueing and notices (called with the portal lock held) --------------------------------------------------

def queue(portal: Portal, event: str, object_id: int, now: float) -> bool:
    """Queue a change for an offline binding of `event`; False when the app bound none."""
    if not any(b["event"] == event and b["offline"] for b in portal.app.bindings):
        return False
    queue_raw(portal, event, {"FIELDS": {"ID": object_id}}, now)
    return True


def queue_raw(portal: Portal, event: str, data: Any, now: float) -> dict[str, Any]:
    """Queue `data` for `event`: the unreserved record of the same object takes the latest state, else a new one."""
    app = portal.app
    mid = message_id(event, data)
    waiting = next((r for r in app.offline if r["MESSAGE_ID"] == mid and not r["PROCESS_ID"] and not r["ERROR"]),
                   None)
    if waiting is not None:  # the latest state replaces the earlier one
        waiting["TIMESTAMP_X"] = now
        waiting["EVENT_DATA"] = data
    else:
        app.offline_next_id += 1
        waiting = {"ID": app.offline_next_id, "TIMESTAMP_X": now, "EVENT_NAME": event, "EVENT_DATA": data,
                   "EVENT_ADDITIONAL": {"user_id": 1}, "MESSAGE_ID": mid, "PROCESS_ID": "", "ERROR": 0,
                   "RESERVED_AT": None}
        app.offline.append(waiting)
    notify(portal, event, "update" if waiting["ID"] != app.offline_next_id else "add", now)
    return _public(waiting, with_state=True)


def notify(portal: Portal, event: str, kind: str, now: float) -> None:
    """Send ONOFFLINEEVENT to its handlers now, or once the binding's minTimeout has passed since the last."""
    from sandbox.appmode import _auth_fields

    app = portal.app
    targets = [b for b in app.bindings if b["event"] == NOTICE_EVENT and b["handler"]]
    if not targets or app.notice_pending:
        return
    gap = max(int(b.get("min_timeout", DEFAULT_MIN_TIMEOUT)) for b in targets)
    delay = max(0.0, app.last_notice + gap - now)
    app.notice_pending = True
    generation = portal.generation

    def send() -> None:
        with portal.lock:
            if portal.generation != generation or not app.installed:
                return
            app.notice_pending = False
            app.last_notice = time.time()
            forms = []
            for binding in [b for b in app.bindings if b["event"] == NOTICE_EVENT and b["handler"]]:
                form = [("event", NOTICE_EVENT), ("data[type]", kind), ("data[event]", event),
                        ("data[handler]", binding["handler"])]
                if delay:
                    form.append(("data[minTimeout]", str(gap)))
                form += [("ts", str(int(time.time())))]
                form += _auth_fields(portal, with_tokens=True, refresh=True)
                forms.append((binding["handler"], urlencode(form)))
        for handler, body in forms:
            try:
                delivery: dict[str, Any] = {"handler": handler, **post_form(handler, body)}
            except (EventError, OSError) as exc:
                delivery = {"handler": handler, "status": None, "error": f"{type(exc).__name__}: {exc}"}
            with portal.lock:
                if portal.generation == generation:
                    app.notices.append({"time": time.time(), "event": event, "type": kind, **delivery})
                    del app.notices[:-NOTICES_KEPT]

    timer = threading.Timer(delay, send)
    timer.daemon = True
    timer.start()


def view(portal: Portal) -> dict[str, Any]:
    """What `GET /_sandbox/offline` shows: the records, the reserved batches, the notices sent."""
    app = portal.app
    reserved: dict[str, list[str]] = {}
    for record in app.offline:
        if record["PROCESS_ID"]:
            reserved.setdefault(record["PROCESS_ID"], []).append(str(record["ID"]))
    return {"reserve": portal.config.offline_reserve,
            "bindings": [dict(b) for b in app.bindings if b["offline"] or b["event"] == NOTICE_EVENT],
            "records": [_public(r, with_state=True) for r in app.offline],
            "reserved": reserved, "notices": list(app.notices)}
