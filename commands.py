"""Operator commands, run as `flask --app app <command>` (registered by create_app)."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import click
import redis
from flask import Flask, current_app
from flask.cli import with_appcontext
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from bitrix24.client import Bitrix24Client
from bitrix24.errors import Bitrix24Error, Throttled
from handlers.intake import IntakeError, Services, cancel_request, submit
from jobs import policy, records
from jobs.context import WorkerContext
from settings import (
    DEFAULT_CALLER,
    OPERATOR_CALLER,
    PORTAL_NAME,
    RESERVED_CALLERS,
    WEBHOOK_PATH,
    Caller,
    Portal,
    key_sha256,
)

# Random bytes in a new API key (URL-safe base64, 43 characters): far past guessing.
NEW_KEY_BYTES = 32


@click.command("replay")
@click.argument("request_id")
@with_appcontext
def replay(request_id: str) -> None:
    """Requeue a request's failed jobs: its failed documents are tried again and a new report is posted.

    The record's retry budgets start again (attempts stay, as history), and so do each job's RQ retries:
    the crash budget (`retries_left`) and RQ's count of returned Retries (`number_of_retries`, which RQ
    never resets itself). The jobs see the failed state and start a new round (a failed event reads its
    object again).
    """
    svc = current_app.extensions["b24cancel"]
    conn = svc.redis
    if records.load(conn, request_id) is None:
        raise click.ClickException(f"no request {request_id} (unknown, or older than the retention period)")
    failed = []
    for queue_name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE):
        registry = Queue(queue_name, connection=conn, serializer=JSONSerializer).failed_job_registry
        for kind in ("cancel", "resolve", "notify"):
            job_id = f"{kind}-{request_id}"
            if job_id in registry:
                failed.append((registry, job_id))
    if not failed:
        raise click.ClickException(f"request {request_id} has no failed job to replay")
    records.save(conn, request_id, deferrals="0", transient_failures="0", report_failures="0")
    for registry, job_id in failed:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        job.retries_left = policy.CRASH_RETRY_MAX
        job.number_of_retries = 0
        registry.requeue(job)  # saves the job with its fresh budgets, then enqueues it
    click.echo(f"requeued {', '.join(job_id for _, job_id in failed)}")


def _every_portal(svc: Any) -> dict[str, Any]:
    """Configured and installed portals by name (installed ones read from Redis)."""
    try:
        return svc.all_portals()  # type: ignore[no-any-return]
    except redis.RedisError as exc:
        raise _redis_error(exc) from None


@click.command("check-config")
@with_appcontext
def check_config() -> None:
    """Print the configured portals and callers (secrets masked); the settings were validated at start-up."""
    svc = current_app.extensions["b24cancel"]
    app = svc.settings.app
    if app is not None:
        click.echo(f"app: client_id {app.client_id}, install URL {app.url('/v1/bitrix24/app/install')}, "
                   f"chat {app.chat or 'created at install'}, {len(app.rules)} event rules")
    try:
        every = svc.all_portals()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot read installed portals from Redis: {type(exc).__name__}") from None
    for portal in every.values():
        info = portal.public()
        click.echo(f"{info['name']}: {info['url']} ({info['auth']}), chat {info['chat'] or 'none yet'}, "
                   f"plan {info['plan']}, reports in {info['language']} (mention {info['mention']}), "
                   f"{len(portal.rules)} event rules")
    for caller in svc.settings.callers.values():
        portals = "every portal" if caller.portals is None else ", ".join(sorted(caller.portals)) or "no portal"
        click.echo(f"caller {caller.name}: {len(caller.key_hashes)} key(s), {len(caller.secrets)} secret(s); "
                   f"{portals}; chats {', '.join(sorted(caller.chats)) or 'none of its own'}"
                   f"{'; admin' if caller.admin else ''}")


@click.command("new-key")
@click.argument("name")
@with_appcontext
def new_key(name: str) -> None:
    """Print a fresh API key for caller NAME and the [callers.NAME] lines to paste into the portals file."""
    if not PORTAL_NAME.match(name) or name in RESERVED_CALLERS:
        raise click.ClickException(f"NAME must be letters, digits, - or _ (and not {', '.join(RESERVED_CALLERS)})")
    key = secrets.token_urlsafe(NEW_KEY_BYTES)
    digest = key_sha256(key)
    click.echo(f"API key for {name} (give it to the sender; only its hash is kept, so it cannot be shown again):")
    click.echo(f"  {key}")
    settings = current_app.extensions["b24cancel"].settings
    existing = settings.callers.get(name)
    if name == DEFAULT_CALLER and (settings.api_keys or settings.webhook_secrets):
        click.echo("\nCaller default is TRIGGER_API_KEYS. To rotate, add this key to it (comma-separated), deploy, "
                   "switch the sender to the new key, then remove the old one.")
        return
    if existing is not None:
        hashes = ", ".join(f'"{h}"' for h in (*existing.key_hashes, digest))
        click.echo(f"\nCaller {name} exists. To rotate, set in [callers.{name}] (old and new hash), deploy, switch "
                   "the sender to the new key, then remove the old hash:")
        click.echo(f"key_sha256 = [{hashes}]")
        return
    click.echo("\nPaste into the portals file (B24_PORTALS_FILE) and name its portals and chats:")
    click.echo(f"[callers.{name}]")
    click.echo(f'key_sha256 = "{digest}"')
    click.echo('portals = []        # the portals it may use, e.g. ["shop"]')
    click.echo('chats = []          # chats it may name in `chat` besides each portal\'s own, e.g. ["chat7"]')
    click.echo("admin = false       # true: may read every request, /v1/portals and /v1/health")


# -- requests, show, cancel ------------------------------------------------------------------------

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STATES = ("queued", "running", "retrying", "done", "failed")
# The caller `cancel` submits as: every portal, the portals' own chats only.
OPERATOR = Caller(name=OPERATOR_CALLER, portals=None)
DOCUMENT_ID = re.compile(r"^[0-9]{1,30}$")


def _svc() -> Services:
    return current_app.extensions["b24cancel"]  # type: ignore[no-any-return]


def parse_duration(text: str) -> int:
    """Seconds in `90s`, `30m`, `2h` or `7d`."""
    match = DURATION.match(text.strip())
    if not match:
        raise click.BadParameter("give a number and a unit: 90s, 30m, 2h or 7d")
    return int(match[1]) * DURATION_UNITS[match[2]]


def age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h, 2d."""
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def caller_of(record: dict[str, Any]) -> str:
    """Who made the request: the caller's name, or `bitrix24` for its robot and events."""
    request = record.get("request") or {}
    return str(request.get("caller") or "bitrix24")


def outcome_counts(record: dict[str, Any]) -> dict[str, int]:
    """How many documents have each outcome (`pending`: none yet)."""
    return dict(Counter(doc.get("outcome") or "pending" for doc in record.get("documents") or []))


def _redis_error(exc: redis.RedisError) -> click.ClickException:
    return click.ClickException(f"Redis is unreachable ({type(exc).__name__}); check REDIS_URL and that Redis runs")


@click.command("requests")
@click.option("--state", type=click.Choice(STATES), help="Only requests in this state.")
@click.option("--portal", "portal_name", help="Only this portal's requests (default: every portal).")
@click.option("--since", default="24h", show_default=True, help="Created within this long: 90s, 30m, 2h, 7d.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_appcontext
def list_requests(state: str | None, portal_name: str | None, since: str, limit: int, as_json: bool) -> None:
    """List recent requests, newest first: id, caller, portal, state, documents, outcomes and age."""
    svc = _svc()
    window = parse_duration(since)
    every = _every_portal(svc)
    if portal_name is not None and portal_name not in every:
        raise click.ClickException(f"unknown portal {portal_name!r} (known: {', '.join(sorted(every))})")
    portals = [portal_name] if portal_name else sorted(every)
    now = time.time()
    found: list[dict[str, Any]] = []
    try:
        for name in portals:
            # With a state filter, read past the limit: the ones of other states are dropped below.
            ids = records.recent(svc.redis, name, since=now - window, limit=None if state else limit)
            found += records.load_many(svc.redis, ids)
    except redis.RedisError as exc:
        raise _redis_error(exc) from None
    if state:
        found = [record for record in found if record.get("state") == state]
    found.sort(key=lambda record: float(record.get("created_at") or 0), reverse=True)
    found = found[:limit]
    if as_json:
        listed = []
        for record in found:
            view = records.public_view(record)
            view["caller"] = caller_of(record)
            view["outcomes"] = outcome_counts(record)
            view["age_seconds"] = round(now - float(record.get("created_at") or now), 1)
            listed.append(view)
        click.echo(json.dumps({"requests": listed}, ensure_ascii=False, indent=2))
        return
    if not found:
        click.echo(f"no requests in the last {since}" + (f" in state {state}" if state else "")
                   + (f" for portal {portal_name}" if portal_name else ""))
        return
    rows = [("ID", "CALLER", "PORTAL", "STATE", "DOCS", "OUTCOMES", "AGE")]
    for record in found:
        counts = outcome_counts(record)
        rows.append((record["id"], caller_of(record), str((record.get("request") or {}).get("portal")),
                     str(record.get("state")), str(len(record.get("documents") or [])),
                     ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "-",
                     age(now - float(record.get("created_at") or now))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON (the status API's view).")
@with_appcontext
def show(request_id: str, as_json: bool) -> None:
    """Show one request: each document with its outcome and detail, the report, attempts and waits."""
    svc = _svc()
    if not REQUEST_ID.match(request_id):
        raise click.ClickException("a request id is 32 hexadecimal digits")
    try:
        record = records.load(svc.redis, request_id)
    except redis.RedisError as exc:
        raise _redis_error(exc) from None
    if record is None:
        raise click.ClickException(f"no request {request_id} (unknown, or older than the retention period)")
    view = records.public_view(record)
    if as_json:
        view["caller"] = caller_of(record)
        view["transient_failures"] = record["transient_failures"]
        view["deferrals"] = record["deferrals"]
        view["report_failures"] = int(record.get("report_failures") or 0)
        click.echo(json.dumps(view, ensure_ascii=False, indent=2))
        return
    portal = svc.portal(str(view.get("portal")))
    for line in describe(record, view, portal.chat if portal else None):
        click.echo(line)


def describe(record: dict[str, Any], view: dict[str, Any], portal_chat: str | None) -> list[str]:
    """The record as lines a person reads (`portal_chat`: the portal's report chat, if it is configured)."""
    request = record.get("request") or {}
    lines = [f"request {record['id']}: {view['state']}",
             f"  portal {view['portal']}, caller {caller_of(record)}, from {view['source']}"
             + (f" ({view['source_ref']})" if view.get("source_ref") else "")
             + (f", event {request['event']} for object {request.get('object_id')}" if request.get("event") else "")]
    lines.append(f"  created {view['created_at']}, updated {view['updated_at']}"
                 + (f", finished {view['finished_at']}" if view.get("finished_at") else ""))
    if view.get("reason"):
        lines.append(f"  reason: {view['reason']}")
    if view.get("external_id"):
        lines.append(f"  external id: {view['external_id']}")
    documents = record.get("documents") or []
    lines.append(f"documents ({len(documents)}):")
    for doc in documents:
        name = f"#{doc['id']}" if doc.get("id") else f"number {doc.get('number')}"
        if doc.get("id") and doc.get("number"):
            name += f" (number {doc['number']})"
        title = f" {doc['title']}" if doc.get("title") else ""
        lines.append(f"  {name}{title}: {doc.get('outcome') or 'pending'}")
        if doc.get("detail"):
            lines.append(f"      {doc['detail']}")
        if doc.get("advice"):
            lines.append(f"      what to do: {doc['advice']}")
    if not documents and isinstance(view.get("resolution"), dict):
        lines.append(f"  resolution: {json.dumps(view['resolution'], ensure_ascii=False)}")
    chat = request.get("chat") or portal_chat
    if view.get("message_id"):
        lines.append(f"report: message {view['message_id']}" + (f" in {chat}" if chat else ""))
    elif view.get("report_error"):
        lines.append(f"report: not posted: {view['report_error']}")
    else:
        lines.append("report: not posted yet")
    lines.append(f"attempts {record['attempts']}, transient failures {record['transient_failures']}, "
                 f"waits for limits {record['deferrals']}, report failures {int(record.get('report_failures') or 0)}")
    if view.get("waiting_for"):
        lines.append(f"waiting for: {view['waiting_for']}"
                     + (f", until {view['resume_at']}" if view.get("resume_at") else ""))
    if view.get("error"):
        lines.append(f"error: {view['error']}")
    return lines


@click.command("cancel")
@click.argument("document_ids", nargs=-1, required=True)
@click.option("--portal", "portal_name", help="The portal (required when several are configured).")
@click.option("--reason", help="Why, shown in the chat report.")
@click.option("--chat", help="Report to this chat instead of the portal's (one the portal's chats list allows).")
@click.option("--numbers", is_flag=True, help="The arguments are document numbers (docNumber), not ids.")
@click.option("--key", "key", help="An idempotency key: repeating the command with it changes nothing.")
@with_appcontext
def cancel(document_ids: tuple[str, ...], portal_name: str | None, reason: str | None, chat: str | None,
           numbers: bool, key: str | None) -> None:
    """Cancel documents (by id, or by number with --numbers) as the caller `operator`; prints the request id.

    The request goes the API's way: validated the same, recorded and queued in one Redis round trip, then
    cancelled and reported in the chat by the workers.
    """
    svc = _svc()
    body: dict[str, Any] = {"portal": portal_name, "reason": reason, "chat": chat}
    if numbers:
        body["document_numbers"] = list(document_ids)
    else:
        bad = [text for text in document_ids if not DOCUMENT_ID.match(text)]
        if bad:
            raise click.ClickException(f"bad document id {bad[0]!r}: ids are positive integers (give --numbers "
                                       "for document numbers)")
        body["document_ids"] = [int(text) for text in document_ids]
    try:
        portal = svc.portal(portal_name)
        if portal is None:
            known = ", ".join(sorted(svc.portals))
            raise click.ClickException(f"unknown portal {portal_name!r} (configured: {known})" if portal_name
                                       else f"--portal is required: several portals are configured ({known})")
        request_ = cancel_request(body, portal, source="api", caller=OPERATOR)
        reply, status = submit(svc, request_, key, caller=OPERATOR)
    except IntakeError as exc:
        raise click.ClickException(exc.message) from None
    request_id = reply["request_id"]
    if status == 200:
        click.echo(f"{request_id} (already submitted with this --key: nothing new was queued)")
    else:
        click.echo(request_id)


# -- doctor -----------------------------------------------------------------------------------------

# The scope each rule's read method needs, by the method's first part (most are the same word).
SCOPE_OF = {"tasks": "task", "sale": "sale", "crm": "crm", "catalog": "catalog", "user": "user"}
# What the service itself calls: catalog.document.*, im.message.add.
BASE_SCOPES = ("catalog", "im")
# Codes after which a portal cannot be reached at all: the other checks are skipped.
UNREACHABLE = frozenset({"TRANSPORT_CONNECT", "TRANSPORT_TIMEOUT", "TRANSPORT_DROPPED", "BAD_ANSWER",
                         "NO_AUTH_FOUND", "INVALID_CREDENTIALS", "ACCESS_DENIED", "PORTAL_DELETED",
                         "OVERLOAD_LIMIT", "invalid_token", "invalid_grant", "OAUTH_TOKEN_LOST", "WRONG_AUTH_TYPE",
                         "authorization_error", "PAYMENT_REQUIRED", "APPLICATION_NOT_FOUND"})


def needed_scopes(portal: Portal) -> dict[str, list[str]]:
    """The scopes the portal's work needs, each with why."""
    needed: dict[str, list[str]] = {"catalog": ["cancelling documents"], "im": ["posting reports"]}
    for rule in portal.rules:
        method = str(rule.get("read") or "")
        prefix = method.split(".", 1)[0].lower()
        if prefix:
            needed.setdefault(SCOPE_OF.get(prefix, prefix), []).append(f"rule {rule.get('event')} reads {method}")
    return needed


def webhook_user(portal: Portal) -> str | None:
    """The webhook's user id (the number in /rest/<user>/<code>/, not secret); None for an app."""
    if not portal.webhook_url:
        return None
    match = WEBHOOK_PATH.match(urlsplit(portal.webhook_url).path)
    return match["user"] if match else None


def _failure(err: Exception) -> str:
    """An error as one line: the code and what to do (the portal's own text, never a URL)."""
    if isinstance(err, Throttled):
        return f"held back by the shared limits ({err.reason}): try again in a minute"
    assert isinstance(err, Bitrix24Error)
    text = f"{err.code}" + (f" (HTTP {err.http_status})" if err.http_status else "")
    if err.description:
        text += f": {err.description}"
    return text + (f"; fix: {err.advice}" if err.advice else "")


class Doctor:
    """Runs the checks of one portal and prints a line per check."""

    def __init__(self, portal: Portal, client: Bitrix24Client) -> None:
        self.portal = portal
        self.client = client
        self.failures = 0

    def line(self, ok: bool, check: str, text: str) -> None:
        if not ok:
            self.failures += 1
        click.echo(f"{self.portal.name}: {'ok  ' if ok else 'FAIL'} {check}: {text}")

    def run(self) -> int:
        portal = self.portal
        started = time.monotonic()
        try:
            granted = self.client.call("scope").result
        except (Bitrix24Error, Throttled) as err:
            if isinstance(err, Throttled) or err.code in UNREACHABLE:
                self.line(False, "reachable", f"{portal.masked_url}: {_failure(err)}"
                          + ("" if isinstance(err, Throttled) or err.advice
                             else "; fix: check the portal's address and this machine's network"))
                self.line(False, "other checks", "skipped: the portal could not be reached")
                return self.failures
            granted = None
            self.line(True, "reachable", f"{portal.masked_url} answered")
            self.line(False, "scopes", f"the scope method failed: {_failure(err)}")
        else:
            self.line(True, "reachable", f"{portal.masked_url} answered in "
                                         f"{(time.monotonic() - started) * 1000:.0f} ms")
        if granted is not None:
            self.scopes(granted)
        self.inventory()
        for chat in (portal.chat, *sorted(portal.chats - {portal.chat})):
            self.chat(chat)
        return self.failures

    def scopes(self, granted: Any) -> None:
        have = {str(s) for s in granted} if isinstance(granted, list) else set()
        needed = needed_scopes(self.portal)
        missing = [scope for scope in needed if scope not in have]
        if not missing:
            self.line(True, "scopes", f"{', '.join(sorted(needed))} granted")
            return
        why = "; ".join(f"{scope} for {', '.join(needed[scope])}" for scope in missing)
        where = ("the app's scopes in its settings, then reinstall it" if self.portal.oauth
                 else "the incoming webhook's permissions (Developer resources), keeping its URL")
        self.line(False, "scopes", f"missing {', '.join(missing)} ({why}); fix: add them to {where}")

    def inventory(self) -> None:
        try:
            mode = self.client.call("catalog.document.mode.status").result
        except (Bitrix24Error, Throttled) as err:
            self.line(False, "inventory", f"catalog.document.mode.status failed: {_failure(err)}")
            return
        if mode == "Y":
            self.line(True, "inventory", "inventory management is on")
        else:
            self.line(False, "inventory", "inventory management is off, so documents cannot be cancelled; fix: "
                                          "turn it on in Inventory management settings (on a plan that includes it)")

    def chat(self, chat: str) -> None:
        user = webhook_user(self.portal)
        who = f"the webhook user ({user})" if user else "the app's user"
        try:
            self.client.call("im.dialog.get", {"DIALOG_ID": chat})
        except (Bitrix24Error, Throttled) as err:
            if isinstance(err, Bitrix24Error) and err.code == "ACCESS_ERROR":
                self.line(False, f"chat {chat}", f"{who} is not a member of {chat}, or {chat} does not exist, so "
                                                 "reports cannot be posted; fix: add the user to the chat, or set "
                                                 "the right chat id")
            else:
                self.line(False, f"chat {chat}", f"im.dialog.get failed: {_failure(err)}")
            return
        self.line(True, f"chat {chat}", f"{who} is a member and may post reports")


@click.command("doctor")
@click.option("--portal", "portal_name", help="Check this portal only (default: every portal).")
@with_appcontext
def doctor(portal_name: str | None) -> None:
    """Check each portal with real calls: reachable, webhook scopes, inventory on, report chat membership.

    Prints one line per check with what to fix; exits 1 when any check fails. The calls go through the
    shared rate limits, like the workers' calls.
    """
    svc = _svc()
    every = _every_portal(svc)
    if portal_name is not None and portal_name not in every:
        raise click.ClickException(f"unknown portal {portal_name!r} (known: {', '.join(sorted(every))})")
    context = WorkerContext(settings=svc.settings)
    failures = 0
    try:
        for name in [portal_name] if portal_name else sorted(every):
            portal = every[name]
            failures += Doctor(portal, context.client(portal, svc.redis)).run()
    except redis.RedisError as exc:
        raise _redis_error(exc) from None
    finally:
        context.http.close()
    if failures:
        click.echo(f"{failures} check(s) failed")
        raise SystemExit(1)
    click.echo("all checks passed")


def init_app(app: Flask) -> None:
    """Register the commands on the app."""
    for command in (replay, check_config, new_key, list_requests, show, cancel, doctor):
        app.cli.add_command(command)
