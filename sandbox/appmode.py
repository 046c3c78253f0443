"""The sandbox app: install and uninstall callbacks, event bindings, robots, workflows and app-only methods.

One app (client_id `sandbox-client`) can be installed. Its install sends ONAPPINSTALL with a fresh token pair
and application token to a loopback URL; from then on `event.bind`, `bizproc.robot.*` and
`bizproc.event.send` work in its context (OAuth calls), never through the webhook. A robot is "run in a
workflow" from the control API, which POSTs the robot's form call; the workflow keeps what
`bizproc.event.send` returned. Changing a CRM item or a shipment through the control API fires the bound
online events, as a portal does.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from sandbox.config import WEBHOOK_USER_ID
from sandbox.events import EventError, loopback_target, post_form
from sandbox.methods import CallContext, RestError, method
from sandbox.oauth import token_answer

if TYPE_CHECKING:
    from sandbox.state import Portal

# Events an app may bind here: the ones the service's rules use, and the app's own lifecycle.
BINDABLE_EVENTS = frozenset({
    "ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMDEALDELETE", "ONCRMDEALMOVETOCATEGORY", "ONCRMDYNAMICITEMADD",
    "ONCRMDYNAMICITEMUPDATE", "ONCRMDYNAMICITEMDELETE", "ONCRMLEADUPDATE", "ONCRMCONTACTUPDATE",
    "ONCRMCOMPANYUPDATE", "ONSHIPMENTENTITYSAVED", "ONSHIPMENTDELETED", "ONSALEORDERSAVED",
    "ONAPPUNINSTALL", "ONAPPUPDATE", "ONAPPTEST", "ONOFFLINEEVENT",
})
ROBOT_CODE = re.compile(r"^[a-zA-Z0-9._-]+$")
PROPERTY_TYPES = frozenset({"bool", "date", "datetime", "double", "file", "int", "select", "string", "text", "user"})
APP_CONTEXT_REQUIRED = ("ACCESS_DENIED", "Access denied! Application context required")
# Where the sandbox's app may put handlers: Bitrix24 wants them on the app's own domain; here, loopback.
WORKFLOW_LOG_LIMIT = 100


@dataclass
class Workflow:
    """A workflow that ran a robot and waits for `bizproc.event.send` (USE_SUBSCRIPTION=Y)."""

    workflow_id: str
    code: str
    event_token: str
    document_id: list[str]
    properties: dict[str, Any]
    started: float
    returned: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    delivery: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """The workflow as `/_sandbox/workflows` shows it."""
        return {"workflow_id": self.workflow_id, "code": self.code, "event_token": self.event_token,
                "document_id": self.document_id, "properties": self.properties, "returned": self.returned,
                "log": list(self.log), "delivery": self.delivery}


@dataclass
class AppState:
    """The one sandbox app on this portal."""

    installed: bool = False
    application_token: str = ""
    install_url: str = ""
    installs: int = 0
    bindings: list[dict[str, Any]] = field(default_factory=list)
    robots: dict[str, dict[str, Any]] = field(default_factory=dict)
    workflows: list[Workflow] = field(default_factory=list)
    # event token -> used (a token works once: its workflow then goes on)
    tokens: dict[str, bool] = field(default_factory=dict)
    # (ENTITY_TYPE, ENTITY_ID) -> dialog id of chats created with them
    chat_entities: dict[tuple[str, str], str] = field(default_factory=dict)
    # The offline queue (sandbox/offline.py): records, the last record id, ONOFFLINEEVENT notices sent.
    offline: list[dict[str, Any]] = field(default_factory=list)
    offline_next_id: int = 0
    notices: list[dict[str, Any]] = field(default_factory=list)
    last_notice: float = 0.0
    notice_pending: bool = False

    def public(self) -> dict[str, Any]:
        """What `GET /_sandbox/app` shows (no token but the application token, which the control API gives)."""
        return {"installed": self.installed, "installs": self.installs, "install_url": self.install_url or None,
                "application_token": self.application_token or None, "bindings": [dict(b) for b in self.bindings],
                "robots": [{"code": code, **{k: v for k, v in robot.items() if k != "CODE"}}
                           for code, robot in self.robots.items()]}


def _require_app(ctx: CallContext) -> AppState:
    if ctx.auth != "oauth":
        raise RestError(*APP_CONTEXT_REQUIRED, status=400)
    app: AppState = ctx.portal.app
    if not app.installed:
        raise RestError("ACCESS_DENIED", "Access denied! Application not installed", status=400)
    return app


def _upper(params: dict[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in params.items()}


# -- REST methods ---------------------------------------------------------------------------

@method("app.info", None)
def app_info(ctx: CallContext, params: dict[str, Any]) -> dict[str, Any]:
    """The app's record (documented fields); app context only."""
    if ctx.auth != "oauth":
        raise RestError(*APP_CONTEXT_REQUIRED, status=400)
    app: AppState = ctx.portal.app
    return {"ID": 1, "CODE": "local.sandbox", "VERSION": 1, "STATUS": "L", "INSTALLED": app.installed,
            "PAYMENT_EXPIRED": "N", "DAYS": None, "LANGUAGE_ID": ctx.portal.config.language,
            "LICENSE": "en_project", "LICENSE_TYPE": "project", "LICENSE_FAMILY": "project"}


@method("event.bind", None)
def event_bind(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Bind an online handler, or an offline one (no handler: changes go to the app's offline queue)."""
    app = _require_app(ctx)
    p = _upper(params)
    event = str(p.get("EVENT") or "").strip().upper()
    handler = str(p.get("HANDLER") or "").strip()
    offline = str(p.get("EVENT_TYPE") or "online").lower() == "offline"
    if event not in BINDABLE_EVENTS:
        raise RestError("ERROR_EVENT_NOT_FOUND", "Event not found", status=400)
    if offline:
        if not ctx.portal.permissions.app_admin:
            raise RestError("ACCESS_DENIED", "Access denied! Offline events binding requires administrator "
                            "access rights", status=403)
        if any(b["event"] == event and b["offline"] for b in app.bindings):
            raise RestError("ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!", status=400)
        app.bindings.append({"event": event, "handler": "", "auth_type": int(p.get("AUTH_TYPE") or 0),
                             "offline": 1})
        return True
    parts = urlsplit(handler)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RestError("ERROR_HANDLER_URL_MISMATCH", "Wrong handler URL", status=400)
    if any(b["event"] == event and b["handler"] == handler for b in app.bindings):
        raise RestError("ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!", status=400)
    binding: dict[str, Any] = {"event": event, "handler": handler, "auth_type": int(p.get("AUTH_TYPE") or 0),
                               "offline": 0}
    options = p.get("OPTIONS")
    if event == "ONOFFLINEEVENT":
        wanted = _upper(options).get("MINTIMEOUT") if isinstance(options, dict) else None
        try:
            binding["min_timeout"] = max(0, int(str(wanted))) if wanted not in (None, "") else 1
        except ValueError:
            binding["min_timeout"] = 1
    app.bindings.append(binding)
    return True


@method("event.get", None)
def event_get(ctx: CallContext, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The app's bound handlers."""
    app = _require_app(ctx)
    return [dict(b) for b in app.bindings]


@method("event.unbind", None)
def event_unbind(ctx: CallContext, params: dict[str, Any]) -> dict[str, int]:
    """Remove handlers of an event (all of its handlers when no handler is given)."""
    app = _require_app(ctx)
    p = _upper(params)
    event = str(p.get("EVENT") or "").strip().upper()
    handler = str(p.get("HANDLER") or "").strip()
    keep = [b for b in app.bindings if not (b["event"] == event and (not handler or b["handler"] == handler))]
    count = len(app.bindings) - len(keep)
    app.bindings = keep
    return {"count": count}


def _check_properties(value: Any, name: str) -> None:
    if value in (None, ""):
        return
    if not isinstance(value, dict) or not value:
        # An empty PHP array: what an integrator who sends `{}` gets on a real portal.
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Wrong property key (0)!")
    for key, prop in value.items():
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9_]*$", str(key)):
            raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", f"Wrong property key ({key})!")
        if not isinstance(prop, dict) or not prop.get("Name"):
            raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", f"Empty property NAME ({key})!")
        kind = str(prop.get("Type") or "string")
        if kind not in PROPERTY_TYPES:
            raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", f"Wrong property key ({key})!")


@method("bizproc.robot.add", "bizproc")
def robot_add(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Register a robot, with the documented validation errors."""
    app = _require_app(ctx)
    if not params:
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty data!")
    p = _upper(params)
    code = str(p.get("CODE") or "")
    if not code:
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty activity code!")
    if not ROBOT_CODE.match(code):
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Wrong activity code!")
    handler = str(p.get("HANDLER") or "")
    parts = urlsplit(handler)
    if parts.scheme not in ("http", "https"):
        raise RestError("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported event handler protocol")
    if not parts.hostname:
        raise RestError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if not p.get("NAME"):
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty activity NAME!")
    _check_properties(p.get("PROPERTIES"), "PROPERTIES")
    _check_properties(p.get("RETURN_PROPERTIES"), "RETURN_PROPERTIES")
    if code in app.robots:
        raise RestError("ERROR_ACTIVITY_ALREADY_INSTALLED", "Activity or Robot already installed!")
    app.robots[code] = {"CODE": code, "HANDLER": handler, "NAME": p.get("NAME"),
                        "USE_SUBSCRIPTION": str(p.get("USE_SUBSCRIPTION") or ""),
                        "PROPERTIES": p.get("PROPERTIES") or {}, "RETURN_PROPERTIES": p.get("RETURN_PROPERTIES") or {}}
    return True


@method("bizproc.robot.list", "bizproc")
def robot_list(ctx: CallContext, params: dict[str, Any]) -> list[str]:
    """The codes of the app's robots."""
    return list(_require_app(ctx).robots)


@method("bizproc.robot.delete", "bizproc")
def robot_delete(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Remove one of the app's robots."""
    app = _require_app(ctx)
    code = str(_upper(params).get("CODE") or "")
    if not code:
        raise RestError("ERROR_ACTIVITY_VALIDATION_FAILURE", "Empty activity code!")
    if code not in app.robots:
        raise RestError("ERROR_ACTIVITY_NOT_FOUND", "Activity or Robot not found!")
    del app.robots[code]
    return True


@method("bizproc.event.send", "bizproc")
def event_send(ctx: CallContext, params: dict[str, Any]) -> bool:
    """Hand the robot's return values to its workflow; a token works once (then, or unknown: ACCESS_DENIED)."""
    app = _require_app(ctx)
    p = _upper(params)
    token = str(p.get("EVENT_TOKEN") or "")
    workflow = next((w for w in app.workflows if w.event_token == token), None)
    if not token or workflow is None or app.tokens.get(token, True):
        raise RestError("ACCESS_DENIED", "Access denied!", status=400)
    returned = p.get("RETURN_VALUES") or {}
    if not isinstance(returned, dict):
        returned = {}
    app.tokens[token] = True
    workflow.returned = returned
    if p.get("LOG_MESSAGE"):
        workflow.log.append(str(p["LOG_MESSAGE"]))
    return True


@method("im.chat.add", "im")
def chat_add(ctx: CallContext, params: dict[str, Any]) -> int:
    """Create a group chat (the caller is a member); ENTITY_TYPE/ENTITY_ID make it findable by im.chat.get."""
    from sandbox.state import Chat

    p = _upper(params)
    portal = ctx.portal
    users = p.get("USERS") or []
    if isinstance(users, dict):
        users = list(users.values())
    members = {ctx.user_id}
    for user in users if isinstance(users, list) else [users]:
        try:
            members.add(int(user))
        except (TypeError, ValueError):
            raise RestError("USER_ID_EMPTY", "User ID can't be empty") from None
    chat_id = max((c.chat_id for c in portal.chats.values() if c.dialog_id.startswith("chat")), default=0) + 1
    dialog_id = f"chat{chat_id}"
    title = str(p.get("TITLE") or f"Chat {chat_id}")
    portal.chats[dialog_id] = Chat(dialog_id, chat_id, title, members)
    entity = (str(p.get("ENTITY_TYPE") or ""), str(p.get("ENTITY_ID") or ""))
    if entity[0]:
        portal.app.chat_entities[entity] = dialog_id
    return chat_id


@method("im.chat.get", "im")
def chat_get(ctx: CallContext, params: dict[str, Any]) -> dict[str, int] | None:
    """The chat made with this ENTITY_TYPE/ENTITY_ID, or null."""
    p = _upper(params)
    dialog_id = ctx.portal.app.chat_entities.get((str(p.get("ENTITY_TYPE") or ""), str(p.get("ENTITY_ID") or "")))
    chat = ctx.portal.chats.get(dialog_id or "")
    return {"ID": chat.chat_id} if chat else None


# -- control ----------------------------------------------------------------------------------

def _auth_fields(portal: Portal, with_tokens: bool, refresh: bool) -> list[tuple[str, str]]:
    """The `auth[...]` part of a call from the portal to the app (call with the lock held)."""
    config = portal.config
    fields = [("auth[domain]", config.domain), ("auth[client_endpoint]", config.client_endpoint),
              ("auth[server_endpoint]", config.server_endpoint), ("auth[member_id]", config.member_id),
              ("auth[application_token]", portal.app.application_token)]
    if with_tokens:
        now = time.time()
        access, refresh_token = portal.tokens.issue(config.token_lifetime, now)
        answer = token_answer(portal, access, refresh_token, config.token_lifetime, now)
        names = ["access_token", "expires", "expires_in", "scope", "status", "user_id"]
        if refresh:
            names.insert(1, "refresh_token")
        fields[1:1] = [(f"auth[{name}]", str(answer[name])) for name in names]
    return fields


def install(portal: Portal, url: str) -> dict[str, Any]:
    """Install the app: a fresh application token and token pair, sent as ONAPPINSTALL to `url`."""
    loopback_target(url)
    with portal.lock:
        app = portal.app
        # A reinstall removes the handlers and robots, as Bitrix24 does; the app binds them again.
        app.bindings.clear()
        app.robots.clear()
        app.application_token = secrets.token_hex(16)
        app.install_url = url
        app.installed = True
        app.installs += 1
        form = [("event", "ONAPPINSTALL"), ("data[VERSION]", "1"), ("data[ACTIVE]", "Y"),
                ("data[INSTALLED]", "Y"), ("data[LANGUAGE_ID]", portal.config.language), ("ts", str(int(time.time())))]
        form += _auth_fields(portal, with_tokens=True, refresh=True)
    # The form is returned too, so a test can deliver it again (the queue may) or alter it (a forgery).
    return {**post_form(url, urlencode(form)), "form": dict(form)}


def uninstall(portal: Portal) -> dict[str, Any]:
    """Uninstall the app: ONAPPUNINSTALL (no tokens) to the bound handler, then forget its state and tokens."""
    with portal.lock:
        app = portal.app
        if not app.installed:
            raise EventError("the app is not installed")
        targets = [b["handler"] for b in app.bindings if b["event"] == "ONAPPUNINSTALL"] or [app.install_url]
        form = [("event", "ONAPPUNINSTALL"), ("data[CLEAN]", "0"), ("ts", str(int(time.time())))]
        form += _auth_fields(portal, with_tokens=False, refresh=False)
        app.installed = False
        app.bindings.clear()
        app.robots.clear()
        app.offline.clear()
        portal.tokens.access.clear()
        portal.tokens.refresh.clear()
    deliveries = []
    for target in targets:
        try:
            deliveries.append({"handler": target, **post_form(target, urlencode(form))})
        except (EventError, OSError) as exc:
            deliveries.append({"handler": target, "status": None, "error": f"{type(exc).__name__}: {exc}"})
    return {"uninstalled": True, "deliveries": deliveries}


def run_robot(portal: Portal, code: str, document_id: list[str], properties: dict[str, Any],
              deliveries: int = 1) -> dict[str, Any]:
    """Start a workflow that runs the robot: its form call goes to the robot's handler (`deliveries` times,
    the same call, as a queue that redelivers)."""
    with portal.lock:
        app = portal.app
        robot = app.robots.get(code)
        if not app.installed or robot is None:
            raise EventError(f"no robot {code!r} is registered by an installed app")
        workflow = Workflow(workflow_id=secrets.token_hex(12), code=code,
                            event_token=f"{secrets.token_hex(10)}|A{len(app.workflows) + 1}|{secrets.token_hex(8)}",
                            document_id=document_id, properties=properties, started=time.time())
        subscribed = str(robot.get("USE_SUBSCRIPTION") or "").upper() == "Y"
        app.tokens[workflow.event_token] = not subscribed  # without a subscription nothing waits for it
        app.workflows.append(workflow)
        form: list[tuple[str, str]] = [("workflow_id", workflow.workflow_id), ("code", code)]
        form += [(f"document_id[{i}]", str(part)) for i, part in enumerate(document_id)]
        form += [(f"document_type[{i}]", str(part)) for i, part in enumerate(_document_type(document_id))]
        form += [("event_token", workflow.event_token)]
        for name, value in properties.items():
            if isinstance(value, list):
                form += [(f"properties[{name}][{i}]", str(item)) for i, item in enumerate(value)]
            else:
                form.append((f"properties[{name}]", str(value)))
        form += [("use_subscription", "Y" if subscribed else "N"), ("timeout_duration", "0"),
                 ("ts", str(int(time.time())))]
        form += _auth_fields(portal, with_tokens=True, refresh=True)
        handler = str(robot["HANDLER"])
    sent = []
    for _ in range(max(1, deliveries)):
        try:
            delivery = post_form(handler, urlencode(form))
        except (EventError, OSError) as exc:
            delivery = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
        sent.append(delivery)
        with portal.lock:
            workflow.delivery = delivery
            workflow.log.append(f"robot {code} called its handler: HTTP {delivery.get('status')}")
            del workflow.log[:-WORKFLOW_LOG_LIMIT]
    return {"workflow_id": workflow.workflow_id, "event_token": workflow.event_token, "delivery": sent[-1],
            "deliveries": sent}


def _document_type(document_id: list[str]) -> list[str]:
    """`document_type[]` from a `document_id[]` (DEAL_5 -> DEAL)."""
    if len(document_id) != 3:
        return list(document_id)
    return [document_id[0], document_id[1], str(document_id[2]).rsplit("_", 1)[0]]


def fire(portal: Portal, event: str, object_id: int) -> list[dict[str, Any]]:
    """Deliver an event to each online handler the app bound for it, and queue it for an offline binding (as a
    portal does after a change)."""
    from sandbox.offline import queue

    with portal.lock:
        app = portal.app
        if not app.installed:
            return []
        queue(portal, event, object_id, time.time())
        targets = [b["handler"] for b in app.bindings if b["event"] == event and not b["offline"]]
        if not targets:
            return []
        form = [("event", event), ("event_handler_id", "1"), ("data[FIELDS][ID]", str(object_id)),
                ("ts", str(int(time.time())))]
        form += _auth_fields(portal, with_tokens=True, refresh=False)
    deliveries = []
    for index, target in enumerate(targets):
        body = urlencode([(k, str(index + 1) if k == "event_handler_id" else v) for k, v in form])
        try:
            deliveries.append({"event": event, "handler": target, **post_form(target, body)})
        except (EventError, OSError) as exc:
            deliveries.append({"event": event, "handler": target, "status": None,
                               "error": f"{type(exc).__name__}: {exc}"})
    return deliveries


def user_id() -> int:
    """The user the app's tokens belong to (the installing admin)."""
    return WEBHOOK_USER_ID
