"""The app's side of Bitrix24: verifying an install, setting a portal up, and giving the robot's outcome back.

- `verify_install` (called by the install callback, the one intake that must call out before answering):
  the portal must accept the received access token (`app.info`), and the OAuth server, asked with the app's
  own client_id and client_secret, must accept the received refresh token and name the same member_id and
  client_endpoint. The OAuth server is the configured one, never a URL from the callback, so a forged callback
  can neither plant a portal nor learn the client secret.
- `setup_portal` (a job): `event.bind` for the rules' events (offline ones with `event_type=offline`, plus
  ONOFFLINEEVENT as the wake-up notice) and ONAPPUNINSTALL, `bizproc.robot.add`, and the
  report chat when none is configured (`im.chat.get` by the app's entity first, so a retry never makes two).
- `return_to_workflow` (in the report job): `bizproc.event.send` with the robot's return values, exactly once:
  a durable note before the call; after a call that got no answer, nothing until it can no longer be running,
  then one more send, which the portal refuses with ACCESS_DENIED if the first one landed (an event token is
  spent by its first use). ACCESS_DENIED is recorded, never retried.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from rq import Retry

from bitrix24.auth import fingerprint, token_key
from bitrix24.client import Bitrix24Client
from bitrix24.errors import Bitrix24Error, Throttled
from bitrix24.gate import PortalGate
from jobs import policy, records
from jobs.context import job_connection, worker_context
from jobs.durability import durable
from jobs.lifecycle import defer, retry_later
from jobs.offline import NOTICE_EVENT, NOTICE_MIN_TIMEOUT, offline_events, request_pull, state_key
from jobs.offline import keys_of as offline_keys
from registry import MEMBER_ID, installed_name, portal_key, save_fields
from settings import (
    LANGUAGE_ALIASES,
    LANGUAGES,
    AppSettings,
    Portal,
    Settings,
    check_endpoint_url,
    is_loopback,
)

log = logging.getLogger("b24cancel.jobs")

ROBOT_CODE = "b24_cancel_documents"
# The chat the installer creates when none is configured: found again by this entity on a retry or reinstall.
CHAT_ENTITY_TYPE = "B24_CANCEL"
CHAT_ENTITY_ID = "reports"
CHAT_TITLE = {"en": "Inventory document cancellations", "ru": "Отмена проведения складских документов"}
# The robot's chat property that turns the chat report off.
NO_CHAT = "none"
# What a robot call that named no document gets back (and its request's error).
NO_DOCUMENTS = "the robot named no documents: fill in its document ids or document numbers"
# Bitrix24 codes that mean "already there": binding and adding again is fine.
ALREADY = frozenset({"ERROR_HANDLER_ALREADY_EXIST", "ERROR_ACTIVITY_ALREADY_INSTALLED"})
# The answer of a spent or unknown event token (the workflow no longer waits, or got our values already).
ACCESS_DENIED = "ACCESS_DENIED"
# Largest OAuth answer read while verifying an install.
MAX_ANSWER_BYTES = 64 * 1024
INSTALL_TIMEOUT = 10.0
SERVICE_USER_KEY = "b24c:service-user:"

ROBOT_NAME = {"en": "Cancel inventory documents", "ru": "Отменить проведение складских документов"}
ROBOT_DESCRIPTION = {
    "en": "Cancels the conduct of inventory documents and returns the outcome to the workflow",
    "ru": "Отменяет проведение складских документов и возвращает результат в бизнес-процесс",
}
ROBOT_PROPERTIES = {
    "document_ids": {"Name": {"en": "Document ids", "ru": "ID документов"}, "Type": "int", "Multiple": "Y",
                     "Required": "N"},
    "document_numbers": {"Name": {"en": "Document numbers", "ru": "Номера документов"}, "Type": "string",
                         "Multiple": "Y", "Required": "N"},
    "reason": {"Name": {"en": "Reason", "ru": "Причина"}, "Type": "string", "Required": "N"},
    "chat": {"Name": {"en": "Report chat (chat42, or none)", "ru": "Чат для отчёта (chat42 или none)"},
             "Type": "string", "Required": "N"},
}
ROBOT_RETURN_PROPERTIES = {
    "outcome": {"Name": {"en": "Outcome", "ru": "Результат"}, "Type": "select",
                "Options": {"cancelled": "cancelled", "partly": "partly", "nothing_to_do": "nothing_to_do",
                            "failed": "failed"}},
    "cancelled_count": {"Name": {"en": "Cancelled", "ru": "Отменено"}, "Type": "int"},
    "failed_count": {"Name": {"en": "Failed", "ru": "Не удалось"}, "Type": "int"},
    "details": {"Name": {"en": "Details", "ru": "Подробности"}, "Type": "text"},
    "request_id": {"Name": {"en": "Request id", "ru": "ID запроса"}, "Type": "string"},
}
GOOD = ("cancelled", "already_not_conducted")
BAD = ("not_found", "refused", "failed")


class InstallRefused(Exception):
    """The install callback is not trusted; `public` may be answered, `why` is only logged."""

    def __init__(self, public: str, why: str = "") -> None:
        super().__init__(public)
        self.public = public
        self.why = why or public


class InstallUnavailable(Exception):
    """The install could not be verified now (the portal or the OAuth server did not answer)."""


@dataclass
class InstallFacts:
    """What a verified install stores."""

    member_id: str
    domain: str
    client_endpoint: str
    application_token: str = field(repr=False)
    language: str
    install_fence: str
    tokens: dict[str, str] = field(repr=False)


def verify_install(settings: Settings, conn: redis.Redis, app: AppSettings, form: Any) -> InstallFacts:
    """Check an ONAPPINSTALL callback with the portal and the OAuth server; raise InstallRefused or
    InstallUnavailable."""
    member_id = form.get("auth[member_id]", "")
    domain = (form.get("auth[domain]") or "").strip()
    access = form.get("auth[access_token]", "")
    refresh = form.get("auth[refresh_token]", "")
    application_token = form.get("auth[application_token]", "")
    if not (MEMBER_ID.fullmatch(member_id) and domain and access and refresh and application_token):
        raise InstallRefused("the callback lacks member_id, domain, access_token, refresh_token or "
                             "application_token")
    try:
        endpoint = check_endpoint_url(form.get("auth[client_endpoint]", ""))
    except ValueError as exc:
        raise InstallRefused(f"client_endpoint {exc}") from None
    host = urlsplit(endpoint).netloc.lower()
    if host != domain.lower():
        raise InstallRefused("client_endpoint is not on the callback's domain")
    token_url = app.token_url(endpoint)
    if not is_loopback(urlsplit(token_url).hostname or "") and urlsplit(token_url).scheme != "https":
        raise InstallRefused("the OAuth server must use https")
    if app.oauth_server != app.token_url(endpoint) and not is_loopback(urlsplit(endpoint).hostname or ""):
        raise InstallRefused("oauth_server = \"portal\" is only for a sandbox on this machine")
    timeout = httpx.Timeout(INSTALL_TIMEOUT, connect=settings.b24_connect_timeout)
    with httpx.Client(timeout=timeout, follow_redirects=False) as http:
        stub = Portal(name=installed_name(member_id), webhook_url=None, chat="", member_id=member_id)
        gate = PortalGate.for_portal(conn, stub, settings, max_sleep=policy.MAX_SLEEP)
        client = Bitrix24Client(endpoint, stub.name, http, gate)
        try:
            client.call("app.info", {"auth": access})
        except Throttled as exc:
            raise InstallUnavailable("the portal's limits hold the call back") from exc
        except Bitrix24Error as err:
            if err.retryable:
                raise InstallUnavailable(f"the portal did not answer ({err.code})") from None
            raise InstallRefused("the portal refused the access token", str(err)) from None
        body = _refresh(http, token_url, app, refresh)
    if body.get("error"):
        code = str(body["error"])
        if code == "invalid_client":
            raise InstallRefused("the OAuth server does not know this client_id for the portal")
        raise InstallRefused("the OAuth server refused the refresh token", code)
    if not body.get("access_token") or not body.get("refresh_token"):
        raise InstallRefused("the OAuth server's answer has no tokens")
    if str(body.get("member_id", "")) != member_id:
        raise InstallRefused("the OAuth server names another member_id")
    try:
        named = check_endpoint_url(str(body.get("client_endpoint", "")))
    except ValueError:
        named = ""
    if named.lower() != endpoint.lower():
        raise InstallRefused("the OAuth server names another portal endpoint")
    language = str(form.get("data[LANGUAGE_ID]") or "")
    language = LANGUAGE_ALIASES.get(language, language)
    tokens = {"access_token": str(body["access_token"]), "refresh_token": str(body["refresh_token"]),
              "fence": fingerprint(str(body["refresh_token"])), "expires": str(body.get("expires", "")),
              "user_id": str(body.get("user_id", "")), "seed": fingerprint(""), "refreshed_at": f"{time.time():.3f}",
              "source": "install"}
    return InstallFacts(member_id=member_id, domain=domain, client_endpoint=endpoint,
                        application_token=application_token, language=language if language in LANGUAGES else "",
                        install_fence=fingerprint(refresh), tokens=tokens)


def _refresh(http: httpx.Client, url: str, app: AppSettings, refresh_token: str) -> dict[str, Any]:
    """One refresh at the OAuth server with the app's credentials (the install's proof); the answer as a dict."""
    params = {"grant_type": "refresh_token", "client_id": app.client_id, "client_secret": app.client_secret,
              "refresh_token": refresh_token}
    try:
        with http.stream("GET", url, params=params) as response:
            raw = b""
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise InstallUnavailable("the OAuth server's answer is too large")
        body = json.loads(raw)
    except (httpx.TransportError, ValueError):
        raise InstallUnavailable("the OAuth server did not answer") from None
    if not isinstance(body, dict):
        raise InstallUnavailable("the OAuth server's answer is not a JSON object")
    if response.status_code >= 500:
        raise InstallUnavailable(f"the OAuth server answered HTTP {response.status_code}")
    return body


def store_install(conn: redis.Redis, facts: InstallFacts) -> None:
    """Store the verified portal and its tokens, then enqueue its setup (bindings, robot, chat)."""
    from jobs.enqueue import enqueue_followup
    from registry import install

    fields = {"domain": facts.domain, "client_endpoint": facts.client_endpoint,
              "application_token": facts.application_token, "install_fence": facts.install_fence,
              "setup": "pending"}
    if facts.language:
        fields["language"] = facts.language
    install(conn, facts.member_id, fields, facts.tokens, token_key(installed_name(facts.member_id)))
    conn.delete(SERVICE_USER_KEY + installed_name(facts.member_id))
    enqueue_followup(conn, policy.CANCEL_QUEUE, "jobs.app.setup_portal", facts.member_id,
                     f"app-setup-{facts.member_id}")


def forget_install(conn: redis.Redis, member_id: str) -> None:
    """Delete an uninstalled portal and its tokens; its requests then end `app uninstalled`."""
    from registry import uninstall

    name = installed_name(member_id)
    uninstall(conn, member_id, token_key(name), [f"{token_key(name)}:lock", SERVICE_USER_KEY + name,
                                                 *offline_keys(member_id)])


def robot_fields(app: AppSettings) -> dict[str, Any]:
    """The `bizproc.robot.add` parameters of the robot *Cancel inventory documents*."""
    return {"CODE": ROBOT_CODE, "HANDLER": app.url("/v1/bitrix24/app/robot"), "USE_SUBSCRIPTION": "Y",
            "NAME": ROBOT_NAME, "DESCRIPTION": ROBOT_DESCRIPTION, "PROPERTIES": ROBOT_PROPERTIES,
            "RETURN_PROPERTIES": ROBOT_RETURN_PROPERTIES}


def setup_portal(member_id: str) -> dict[str, Any]:
    """Bind the rules' events and ONAPPUNINSTALL, add the robot, and make the report chat if none is set."""
    conn = job_connection()
    ctx = worker_context()
    app = ctx.settings.app
    portal = ctx.portal(installed_name(member_id), conn) if app is not None else None
    if portal is None or app is None:
        return {"skipped": "not installed"}
    client = ctx.client(portal, conn)
    bound = []
    offline = offline_events(app.rules)
    handlers = {rule["event"]: app.url("/v1/bitrix24/events") for rule in app.rules if rule["event"] not in offline}
    handlers["ONAPPUNINSTALL"] = app.url("/v1/bitrix24/app/install")
    try:
        for event, handler in handlers.items():
            _already_fine(client, "event.bind", {"event": event, "handler": handler})
            bound.append(event)
        if offline:
            bind_offline(conn, client, app, member_id, offline)
            bound += sorted(offline) + [NOTICE_EVENT]
        _already_fine(client, "bizproc.robot.add", robot_fields(app))
        chat = portal.chat
        if not chat:
            chat = report_chat(client, portal)
            save_fields(conn, member_id, chat=chat)
    except Bitrix24Error as err:
        # Shown in /v1/portals; RQ retries the job (a transient error), then keeps it for `rq requeue`.
        save_fields(conn, member_id, setup=f"failed: {err.code}: {err.description} {err.advice}".strip())
        log.warning("app portal setup failed", extra={"portal": portal.name, "error": err.code})
        raise
    save_fields(conn, member_id, setup="done")
    log.info("app portal set up", extra={"portal": portal.name, "events": bound, "chat": chat})
    return {"events": bound, "robot": ROBOT_CODE, "chat": chat}


def bind_offline(conn: redis.Redis, client: Bitrix24Client, app: AppSettings, member_id: str,
                 events: set[str]) -> None:
    """Bind the offline rules' events offline and ONOFFLINEEVENT (the wake-up notice) to the events URL, note
    whether the plan reserves and confirms (`feature.get rest_offline_extended`), and start the pulls."""
    for event in sorted(events):
        _already_fine(client, "event.bind", {"event": event, "event_type": "offline"})
    _already_fine(client, "event.bind", {"event": NOTICE_EVENT, "handler": app.url("/v1/bitrix24/events"),
                                         "options": {"minTimeout": NOTICE_MIN_TIMEOUT}})
    feature = client.call("feature.get", {"CODE": "rest_offline_extended"}).result
    extended = isinstance(feature, dict) and str(feature.get("value", "")).upper() == "Y"
    conn.hset(state_key(member_id), "mode", "reserve" if extended else "clear")
    request_pull(conn, member_id)


def _already_fine(client: Bitrix24Client, method: str, params: dict[str, Any]) -> None:
    try:
        client.call(method, params)
    except Bitrix24Error as err:
        if err.code not in ALREADY:
            raise


def report_chat(client: Bitrix24Client, portal: Portal) -> str:
    """The app's report chat on this portal: found by its entity, else created (`im.chat.add`)."""
    found = client.call("im.chat.get", {"ENTITY_TYPE": CHAT_ENTITY_TYPE, "ENTITY_ID": CHAT_ENTITY_ID}).result
    if isinstance(found, dict) and found.get("ID"):
        return f"chat{int(found['ID'])}"
    user = client.call("profile").result
    chat_id = client.call("im.chat.add", {
        "TYPE": "CHAT", "TITLE": CHAT_TITLE.get(portal.language, CHAT_TITLE["en"]),
        "USERS": [int(user["ID"])], "ENTITY_TYPE": CHAT_ENTITY_TYPE, "ENTITY_ID": CHAT_ENTITY_ID}).result
    return f"chat{int(chat_id)}"


# -- the robot's outcome -----------------------------------------------------------------------------------


def return_values(record: dict[str, Any]) -> dict[str, Any]:
    """The robot's RETURN_VALUES for a finished request."""
    docs = record.get("documents") or []
    counts = Counter(doc.get("outcome") or "failed" for doc in docs)
    good = sum(counts[name] for name in GOOD)
    bad = len(docs) - good
    if not docs or (bad == len(docs)):
        outcome = "failed"
    elif bad == 0:
        outcome = "cancelled" if counts["cancelled"] else "nothing_to_do"
    else:
        outcome = "partly" if good else "failed"
    lines = []
    for doc in docs:
        name = f"#{doc['id']}" if doc.get("id") else f"{doc.get('number')}"
        if doc.get("title"):
            name += f" {doc['title']}"
        line = f"{name}: {doc.get('outcome') or 'failed'}"
        if doc.get("outcome") in BAD and doc.get("detail"):
            line += f" ({doc['detail']})"
        lines.append(line)
    return {"outcome": outcome, "cancelled_count": counts["cancelled"], "failed_count": bad,
            "details": "\n".join(lines) or NO_DOCUMENTS, "request_id": record["id"]}


def log_message(values: dict[str, Any]) -> str:
    """The LOG_MESSAGE written to the workflow's log."""
    return (f"b24-cancel request {values['request_id']}: {values['outcome']} "
            f"(cancelled {values['cancelled_count']}, failed {values['failed_count']})")


WORKFLOW_DONE = ("sent", "refused", "unsure", "failed")


def return_to_workflow(conn: redis.Redis, client: Bitrix24Client, record: dict[str, Any], limit: float,
                       replicas: int) -> Retry | None:
    """Send the robot's return values once (see the module's docstring); a Retry when it must wait, else None
    once the workflow's part is settled (sent, refused or failed for good, recorded on the request)."""
    request_id = record["id"]
    token = record["request"].get("event_token")
    state = record.get("workflow_state") or ""
    if not token or state in WORKFLOW_DONE:
        return None
    sent_at = float(record.get("workflow_sent_at") or 0)
    again = state == "sending"
    if again and time.time() < policy.settled_after(sent_at, limit):
        return defer(conn, request_id, policy.settled_after(sent_at, limit),
                     "an unanswered bizproc.event.send may still be running")
    values = return_values(record)
    sent_at = time.time()
    [saved] = durable(conn, replicas, lambda pipe: records.save(
        pipe, request_id, workflow_state="sending", workflow_sent_at=f"{sent_at:.3f}"))
    if not saved:
        return None
    try:
        client.call("bizproc.event.send", {"EVENT_TOKEN": token, "RETURN_VALUES": values,
                                           "LOG_MESSAGE": log_message(values)})
    except Throttled:
        records.save(conn, request_id, workflow_state="")  # refused before it was sent
        raise
    except Bitrix24Error as err:
        if err.code == ACCESS_DENIED:
            state = "unsure" if again else "refused"
            why = ("ACCESS_DENIED after an unanswered send: the first send delivered the values, or the workflow "
                   "stopped waiting" if again else f"ACCESS_DENIED: {err.description} (the workflow no longer "
                   "waits for this robot)")
            records.save(conn, request_id, workflow_state=state, workflow_error=why)
            log.warning("workflow refused the return values", extra={"request_id": request_id, "error": err.code})
            return None
        if not err.ambiguous:
            records.save(conn, request_id, workflow_state="" if err.retryable else "failed",
                         workflow_error=f"{err.code}: {err.description}")
        not_before = policy.settled_after(sent_at, limit) if err.ambiguous else None
        retry = retry_later(conn, request_id, err, "workflow_failures", not_before=not_before)
        if retry is not None:
            return retry
        records.save(conn, request_id, workflow_state="unsure" if err.ambiguous else "failed",
                     workflow_error=f"{err.code}: {err.description}")
        return None
    records.save(conn, request_id, workflow_state="sent", workflow_returned=values, workflow_error="")
    log.info("return values sent to the workflow", extra={"request_id": request_id, "outcome": values["outcome"]})
    return None


def portal_hash_fields(conn: redis.Redis, member_id: str) -> dict[str, str]:
    """The stored fields of an installed portal (for the API's view), tokens left out."""
    raw = conn.hgetall(portal_key(member_id))
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return {k: v for k, v in fields.items() if k != "application_token"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
