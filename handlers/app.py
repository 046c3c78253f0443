"""The service as a Bitrix24 app: the install and uninstall callbacks and the native robot's endpoint.

- `POST /v1/bitrix24/app/install` receives `ONAPPINSTALL` (form-encoded, reference §2.7). It is trusted only
  after the portal accepted the received access token and the OAuth server, asked with the app's own
  credentials, confirmed the refresh token, the member_id and the portal's endpoint (jobs/app.py). Then the
  portal is stored in Redis by member_id, and a job binds the rules' events and adds the robot.
  `ONAPPUNINSTALL` (here, or at the events URL) carries no tokens: its application token is the only check.
- `POST /v1/bitrix24/app/robot` receives the robot *Cancel inventory documents* from a workflow (§3.2),
  verified by the installed portal's application token in constant time; one request per `event_token`.
Unknown portals and wrong tokens get the same 401, so nothing here reveals which portals are installed.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

import redis
from flask import Blueprint, request

from bitrix24.auth import fingerprint
from handlers.intake import (
    IntakeError,
    Reply,
    Services,
    cancel_request,
    keep_app_tokens,
    services,
    submit,
)
from jobs import app as app_jobs
from registry import MEMBER_ID, installed_name, portal_key, same_token
from settings import GROUP_CHAT, AppSettings, OAuthApp, Portal

log = logging.getLogger("b24cancel.web")
bp = Blueprint("app", __name__)

UNAUTHORIZED = "unknown portal or wrong application token"
# Compared against when nothing is stored, so every refusal takes as long.
NO_TOKEN = "\x00no-installed-portal\x00"
# The robot's chat property that turns the chat report off.
NO_CHAT = "none"
# Longest event_token / workflow_id / property value we store; Bitrix24 sends ids well under this.
MAX_ROBOT_FIELD = 500
DIGITS = re.compile(r"[0-9]{1,10}", re.ASCII)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _form() -> Any:
    if request.mimetype != "application/x-www-form-urlencoded":
        raise IntakeError(415, "Bitrix24 calls are form-encoded (application/x-www-form-urlencoded)")
    return request.form


def _app(svc: Services) -> AppSettings:
    app = svc.settings.app
    if app is None:
        raise IntakeError(401, "this service is not configured as a Bitrix24 app (B24_APP_CLIENT_ID)")
    return app


def installed_stub(app: AppSettings, member_id: str, domain: str) -> Portal:
    """An installed portal as far as an event needs it before Redis confirms it: its name and the app's rules."""
    return Portal(name=installed_name(member_id), webhook_url=None, chat=app.chat or "", member_id=member_id,
                  domain=domain, rules=app.rules, language=app.language,
                  oauth=OAuthApp(client_endpoint="https://unknown.invalid/rest/", client_id=app.client_id,
                                 client_secret=app.client_secret, refresh_token="", installed=True),
                  installed=True)


def verify_installed(svc: Services, member_id: str, form: Any) -> Portal:
    """The installed portal whose stored application token and domain the call carries; 401 otherwise."""
    portal = svc.registry.installed(member_id) if (svc.registry and MEMBER_ID.fullmatch(member_id or "")) else None
    given = form.get("auth[application_token]", "")
    token_ok = hmac.compare_digest(given.encode(), ((portal.application_token if portal else None) or NO_TOKEN).encode())
    if portal is None or not token_ok or (form.get("auth[domain]") or "").lower() != (portal.domain or "").lower():
        raise IntakeError(401, UNAUTHORIZED)
    return portal


@bp.post("/v1/bitrix24/app/install")
def install() -> Reply:
    """ONAPPINSTALL: verify with the portal and the OAuth server, store the portal, bind handlers (a job)."""
    svc = services()
    form = _form()
    event = form.get("event", "").strip().upper()
    if event == "ONAPPUNINSTALL":
        return uninstall(svc, form)
    if event != "ONAPPINSTALL":
        raise IntakeError(400, "expected event ONAPPINSTALL or ONAPPUNINSTALL", "event")
    app = _app(svc)
    member_id = form.get("auth[member_id]", "")
    if not MEMBER_ID.fullmatch(member_id):
        raise IntakeError(401, UNAUTHORIZED)
    try:
        stored = {_text(k): _text(v) for k, v in svc.redis.hgetall(portal_key(member_id)).items()}
    except redis.RedisError:
        raise IntakeError(503, "the service cannot store installs right now; retry later") from None
    # A repeated delivery of the same callback: its refresh token was spent verifying the first one.
    refresh = form.get("auth[refresh_token]", "")
    if stored and same_token(form.get("auth[application_token]", ""), stored.get("application_token")) and \
            hmac.compare_digest(fingerprint(refresh).encode(), (stored.get("install_fence") or "").encode()):
        return {"status": "installed", "portal": installed_name(member_id), "duplicate": True}, 200
    try:
        facts = app_jobs.verify_install(svc.settings, svc.redis, app, form)
    except app_jobs.InstallRefused as refused:
        log.warning("install callback refused", extra={"why": refused.why})
        raise IntakeError(401, "install not verified: " + refused.public) from None
    except app_jobs.InstallUnavailable as exc:
        raise IntakeError(503, f"could not verify the install now ({exc}); Bitrix24 may retry") from None
    try:
        app_jobs.store_install(svc.redis, facts)
    except redis.RedisError:
        raise IntakeError(503, "the service cannot store installs right now; retry later") from None
    log.info("app installed", extra={"portal": installed_name(member_id)})
    return {"status": "installed", "portal": installed_name(member_id)}, 200


def uninstall(svc: Services, form: Any) -> Reply:
    """ONAPPUNINSTALL: verified by its application token alone; the portal's tokens are deleted."""
    member_id = form.get("auth[member_id]", "")
    stored = None
    if svc.settings.app is not None and MEMBER_ID.fullmatch(member_id):
        try:
            stored = svc.redis.hget(portal_key(member_id), "application_token")
        except redis.RedisError:
            raise IntakeError(503, "the service cannot read installs right now; retry later") from None
    expected = stored.decode() if isinstance(stored, bytes) else None
    given = form.get("auth[application_token]", "")
    if not hmac.compare_digest(given.encode(), (expected or NO_TOKEN).encode()) or not expected:
        raise IntakeError(401, UNAUTHORIZED)
    try:
        app_jobs.forget_install(svc.redis, member_id)
    except redis.RedisError:
        raise IntakeError(503, "the service cannot store uninstalls right now; retry later") from None
    log.info("app uninstalled", extra={"portal": installed_name(member_id)})
    return {"status": "uninstalled"}, 200


def _values(form: Any, name: str) -> list[str]:
    """A robot property's values: `properties[n]`, `properties[n][0]`, `properties[n][1]`... (§3.2 quirk)."""
    values = [form[name]] if name in form else []
    index = 0
    while f"{name}[{index}]" in form:
        values.append(form[f"{name}[{index}]"])
        index += 1
    values += form.getlist(f"{name}[]")
    parts: list[str] = []
    for value in values:  # a multiple property may also arrive as one comma-separated string
        parts += [part.strip() for part in str(value).split(",") if part.strip()]
    if any(len(part) > MAX_ROBOT_FIELD for part in parts):
        raise IntakeError(400, f"{name} has a value longer than {MAX_ROBOT_FIELD} characters", name)
    return parts


def _field(form: Any, name: str, required: bool = False) -> str | None:
    value = (form.get(name) or "").strip()
    if len(value) > MAX_ROBOT_FIELD:
        raise IntakeError(400, f"{name} is longer than {MAX_ROBOT_FIELD} characters", name)
    if required and not value:
        raise IntakeError(400, f"{name} is required", name)
    return value or None


@bp.post("/v1/bitrix24/app/robot")
def robot() -> Reply:
    """The robot's call: installed portal's token -> properties -> one request per event_token -> 200."""
    svc = services()
    form = _form()
    _app(svc)
    portal = verify_installed(svc, form.get("auth[member_id]", ""), form)
    if "auth[access_token]" in form and portal.oauth is not None:
        keep_app_tokens(svc.redis, portal, form)
    event_token = _field(form, "event_token", required=True)
    body: dict[str, Any] = {}
    ids = _values(form, "properties[document_ids]")
    numbers = _values(form, "properties[document_numbers]")
    if ids:
        if not all(DIGITS.fullmatch(item) for item in ids):
            raise IntakeError(400, "properties[document_ids] must be integers", "properties[document_ids]")
        body["document_ids"] = [int(item) for item in ids]
    elif numbers:
        body["document_numbers"] = numbers
    reason = _field(form, "properties[reason]")
    if reason:
        body["reason"] = reason
    chat = _field(form, "properties[chat]")
    if chat and chat.lower() != NO_CHAT and not GROUP_CHAT.match(chat):
        raise IntakeError(400, "properties[chat] must be a group chat like chat42, or none", "properties[chat]")
    parts = [part for part in (form.getlist("document_id[]") or
                               [form[k] for k in sorted(form) if k.startswith("document_id[")]) if part][:3]
    source_ref = ", ".join(parts) if parts else None
    if body.get("document_ids") or body.get("document_numbers"):
        request_ = cancel_request(body, portal, source="robot", source_ref=source_ref)
    else:
        # The workflow waits for an answer whatever the robot was given: a request without documents ends
        # failed and tells the workflow so (outcome `failed`), rather than leaving it waiting.
        request_ = {"portal": portal.name, "source": "robot", "document_ids": [], "reason": body.get("reason"),
                    "external_id": None, "source_ref": source_ref}
    request_["chat"] = NO_CHAT if chat and chat.lower() == NO_CHAT else chat
    request_["event_token"] = event_token
    request_["workflow_id"] = _field(form, "workflow_id")
    answer, _ = submit(svc, request_, f"event_token|{event_token}")
    return answer, 200  # Bitrix24's queue expects 200
