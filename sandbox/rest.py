"""The /rest surface: routing, auth, faults, the two limits, the answer envelope and `batch`."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from werkzeug.wrappers import Request, Response

from sandbox.config import OAUTH_CLIENT_ID, WEBHOOK_CODE, WEBHOOK_USER_ID
from sandbox.faults import FaultRule
from sandbox.jsonutil import json_response
from sandbox.limits import MIN_RECORDED_SECONDS
from sandbox.methods import CallContext, Page, RestError, find_method, unknown_controller_action
from sandbox.phpquery import parse_pairs, parse_query
from sandbox.state import Portal, portal_date

# A batch runs at most 50 commands; the ones beyond fail with ERROR_BATCH_LENGTH_EXCEEDED.
BATCH_LIMIT = 50
BATCH_METHOD = "batch"

# Error answers the sandbox gives outside the methods, with their documented HTTP status.
NO_AUTH = ("NO_AUTH_FOUND", "Wrong authorization data", 401)
EXPIRED_TOKEN = ("expired_token", "The access token provided has expired.", 401)
INVALID_TOKEN = ("invalid_token", "Unable to get application by token", 401)
METHOD_NOT_FOUND = ("ERROR_METHOD_NOT_FOUND", "Method not found!", 404)
INSUFFICIENT_SCOPE = ("insufficient_scope",
                      "The request requires higher privileges than provided by the webhook token", 403)
OPERATION_TIME_LIMIT = ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.", 429)
QUERY_LIMIT = ("QUERY_LIMIT_EXCEEDED", "Too many requests", 503)
OVERLOAD = ("OVERLOAD_LIMIT", "REST API is blocked due to overload", 503)
INTERNAL = ("INTERNAL_SERVER_ERROR", "Internal server error", 500)
BATCH_NOT_ALLOWED = ("ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage", 405)
BATCH_TOO_LONG = ("ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded", 400)

FAULT_ANSWERS = {"error500": INTERNAL, "query_limit": QUERY_LIMIT, "overload": OVERLOAD}
# Faults that answer as a proxy in front of the portal would: HTTP status, whether the call ran behind it.
PROXY_FAULTS = {"not_json": (200, True), "proxy_timeout": (408, True), "proxy_limit": (429, False)}
PROXY_PAGE = "<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center><hr>" \
             "<center>nginx</center></body></html>\n"

RESULT_REFERENCE = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")


@dataclass
class Identity:
    """Who is calling: the auth kind, the key of its operating budget and the acting user."""

    auth: str
    key: str
    user_id: int


@dataclass
class Outcome:
    """One method's answer: HTTP status, JSON body and the error code if it failed."""

    status: int
    body: dict[str, Any]
    error: str | None = None


class Clock:
    """Real time plus the simulated durations spent so far, so `time` fields stay consistent."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.simulated = 0.0

    def now(self) -> float:
        """Wall time shifted by the simulated seconds accounted so far."""
        return time.time() + self.simulated


def failure(error: tuple[str, str, int]) -> Outcome:
    """An outcome for one of the fixed error answers above."""
    code, description, status = error
    return Outcome(status, {"error": code, "error_description": description}, code)


def php_array(entries: dict[Any, Any]) -> Any:
    """How PHP's json_encode shows an array: `[]` when empty, a list when keyed 0..n-1, else an object."""
    if not entries:
        return []
    keys = list(entries)
    if keys == list(range(len(keys))):
        return list(entries.values())
    return {str(k): v for k, v in entries.items()}


def _method_name(raw: str) -> str:
    name = raw.strip()
    return name[:-5] if name.lower().endswith(".json") else name


def _logged_name(raw: str) -> str:
    spec = find_method(raw)
    return spec.name if spec else raw


def read_params(request: Request) -> dict[str, Any]:
    """Query and body merged (body wins): JSON, or form/query pairs with PHP-style keys."""
    query_pairs = parse_qsl(request.query_string.decode("utf-8", "replace"), keep_blank_values=True)
    if request.mimetype == "application/json":
        params = parse_pairs(query_pairs)
        try:
            body = json.loads(request.get_data())
        except ValueError:
            body = None
        if isinstance(body, dict):
            params.update(body)
        return params
    if request.mimetype == "multipart/form-data":
        body_pairs = list(request.form.items(multi=True))
    elif request.method == "POST":
        body_pairs = parse_qsl(request.get_data(as_text=True), keep_blank_values=True)
    else:
        body_pairs = []
    return parse_pairs(query_pairs + body_pairs)


def _batch_commands(params: dict[str, Any]) -> list[tuple[Any, str]]:
    cmd = params.get("cmd")
    if isinstance(cmd, dict):
        return [(key, str(value)) for key, value in cmd.items()]
    if isinstance(cmd, list):
        return [(index, str(value)) for index, value in enumerate(cmd)]
    return []


def _split_command(command: str) -> tuple[str, str]:
    method, _, query = command.partition("?")
    return _method_name(method), query


def _drop_connection(request: Request) -> Response:
    """Close the client's connection without a byte of answer (the server then fails to write)."""
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return Response(status=500)


def _proxy_page(status: int) -> Response:
    """An HTML page as a proxy (nginx) sends it, in place of the portal's JSON answer."""
    return Response(PROXY_PAGE.format(status=status), status=status, content_type="text/html")


class RestCall:
    """One HTTP request to /rest, from routing to answer."""

    def __init__(self, portal: Portal, request: Request, path: str) -> None:
        self.portal = portal
        self.request = request
        self.clock = Clock(time.time())
        self.generation = portal.generation
        parts = path.strip("/").split("/")
        self.route_ok = len(parts) in (1, 3)
        self.auth_kind = "webhook" if len(parts) == 3 else "oauth"
        self.hook_user: str | None = parts[0] if len(parts) == 3 else None
        self.hook_code: str | None = parts[1] if len(parts) == 3 else None
        self.method = _method_name(parts[-1])
        self.params = read_params(request)
        self.token = self.params.pop("auth", None)

    def run(self) -> Response:
        """Answer the request (or drop it), recording it in the call log."""
        portal = self.portal
        record = portal.begin_call(_logged_name(self.method), self.auth_kind, self.params, None)
        touched = {self.method.lower()}
        if self.method.lower() == BATCH_METHOD:
            touched |= {_split_command(c)[0].lower() for _, c in _batch_commands(self.params)}
        with portal.lock:
            rule: FaultRule | None = portal.faults.pick(touched)
            latency = portal.config.latency
        if latency > 0:
            time.sleep(latency)
        kind = rule.kind if rule else None
        if kind == "drop":
            portal.finish_call(record, self.generation, None, None, kind)
            return _drop_connection(self.request)
        if kind in FAULT_ANSWERS:
            outcome = failure(FAULT_ANSWERS[kind])
            portal.finish_call(record, self.generation, outcome.status, outcome.error, kind)
            return json_response(outcome.body, outcome.status)
        if kind == "slow" and rule and rule.seconds:
            time.sleep(rule.seconds)
        if kind in PROXY_FAULTS and not PROXY_FAULTS[kind][1]:
            portal.finish_call(record, self.generation, PROXY_FAULTS[kind][0], None, kind)
            return _proxy_page(PROXY_FAULTS[kind][0])
        outcome = self.process(record["seq"])
        applied = outcome.error is None
        if kind in PROXY_FAULTS:
            portal.finish_call(record, self.generation, PROXY_FAULTS[kind][0], outcome.error, kind, applied)
            return _proxy_page(PROXY_FAULTS[kind][0])
        if kind == "applied_then_timeout":
            portal.finish_call(record, self.generation, None, outcome.error, kind, applied)
            time.sleep(rule.seconds if rule and rule.seconds else 0)
            return _drop_connection(self.request)
        if kind == "late" and rule and rule.seconds:
            time.sleep(rule.seconds)
        portal.finish_call(record, self.generation, outcome.status, outcome.error, kind, applied)
        return json_response(outcome.body, outcome.status)

    def authenticate(self) -> Identity | Outcome:
        """The caller's identity, or the auth error to answer with."""
        if self.auth_kind == "webhook":
            if self.hook_user != str(WEBHOOK_USER_ID) or self.hook_code != WEBHOOK_CODE:
                return failure(NO_AUTH)
            return Identity("webhook", f"webhook:{WEBHOOK_USER_ID}", WEBHOOK_USER_ID)
        if not isinstance(self.token, str) or not self.token:
            return failure(NO_AUTH)
        with self.portal.lock:
            problem = self.portal.tokens.check(self.token, time.time())
        if problem == "expired_token":
            return failure(EXPIRED_TOKEN)
        if problem:
            return failure(INVALID_TOKEN)
        return Identity("oauth", f"app:{OAUTH_CLIENT_ID}", WEBHOOK_USER_ID)

    def process(self, seq: int) -> Outcome:
        """Rate limit, auth, then the method or the batch."""
        with self.portal.lock:
            admitted = self.portal.limiter.try_add(time.monotonic())
        if not admitted:
            return failure(QUERY_LIMIT)
        if not self.route_ok:
            return failure(METHOD_NOT_FOUND)
        identity = self.authenticate()
        if isinstance(identity, Outcome):
            return identity
        if self.method.lower() == BATCH_METHOD:
            return self.run_batch(identity, seq)
        return self.run_method(identity, self.method, self.params, self.clock.arrived)

    def run_method(self, identity: Identity, name: str, params: dict[str, Any], started: float,
                   batch_times: dict[str, list[float]] | None = None) -> Outcome:
        """One method call with scope, operating-limit checks and the `time` envelope.

        Inside a batch, `batch_times` collects per method [unrecorded short calls, all calls] so the
        batch can record the short ones at its end, as the core does per HTTP request.
        """
        portal = self.portal
        spec = find_method(name)
        if spec is None:
            unknown = unknown_controller_action(name)
            if unknown is None:
                return failure(METHOD_NOT_FOUND)
            with portal.lock:
                if "catalog" not in portal.permissions.scopes:
                    return failure(INSUFFICIENT_SCOPE)
            return Outcome(unknown.status, {"error": unknown.code, "error_description": unknown.description},
                           unknown.code)
        with portal.lock:
            # The app was installed with the webhook's scopes plus bizproc (its robot needs it).
            scopes = portal.permissions.scopes + (["bizproc"] if identity.auth == "oauth" else [])
            if spec.scope and spec.scope not in scopes:
                return failure(INSUFFICIENT_SCOPE)
            now = time.time()
            if portal.operating.blocked(identity.key, spec.name, now):
                return failure(OPERATION_TIME_LIMIT)
            began = time.perf_counter()
            try:
                result: Any = spec.handler(CallContext(portal, identity.user_id, now, identity.auth), params)
                error: RestError | None = None
            except RestError as exc:
                result, error = None, exc
            simulated = portal.config.duration(spec.name)
            processing = time.perf_counter() - began + simulated
            portal.operating.record(identity.key, spec.name, processing, now)
            if batch_times is not None:
                times = batch_times.setdefault(spec.name, [0.0, 0.0])
                times[1] += processing
                if processing <= MIN_RECORDED_SECONDS:
                    times[0] += processing
            operating = portal.operating.total(identity.key, spec.name, now)
            reset_at = portal.operating.reset_at(identity.key, spec.name, now)
        self.clock.simulated += simulated
        if error is not None:
            return Outcome(error.status, {"error": error.code, "error_description": error.description},
                           error.code)
        body: dict[str, Any] = {"result": result.result if isinstance(result, Page) else result}
        if isinstance(result, Page):
            if result.next is not None:
                body["next"] = result.next
            if result.total is not None:
                body["total"] = result.total
        body["time"] = self.time_block(started, processing, operating, reset_at)
        return Outcome(200, body)

    def time_block(self, started: float, processing: float, operating: float,
                   reset_at: int) -> dict[str, Any]:
        """The `time` object of a successful answer."""
        finished = self.clock.now()
        return {
            "start": round(started, 6),
            "finish": round(finished, 6),
            "duration": round(finished - started, 6),
            "processing": round(processing, 6),
            "date_start": portal_date(started),
            "date_finish": portal_date(finished),
            "operating_reset_at": reset_at,
            "operating": round(operating, 6),
        }

    def run_batch(self, identity: Identity, parent_seq: int) -> Outcome:
        """Run up to 50 commands in order, collecting results and errors per key."""
        halt = str(self.params.get("halt", "0")).lower() not in ("0", "", "false", "n")
        results: dict[Any, Any] = {}
        errors: dict[Any, Any] = {}
        totals: dict[Any, Any] = {}
        nexts: dict[Any, Any] = {}
        times: dict[Any, Any] = {}
        method_times: dict[str, list[float]] = {}
        for position, (key, command) in enumerate(_batch_commands(self.params)):
            if position < BATCH_LIMIT:
                command = self._substitute(command, results)
            name, query = _split_command(command)
            params = parse_query(query)
            params.pop("auth", None)
            record = self.portal.begin_call(_logged_name(name), identity.auth, params, parent_seq)
            if position >= BATCH_LIMIT:
                outcome = failure(BATCH_TOO_LONG)
            elif name.lower() == BATCH_METHOD:
                outcome = failure(BATCH_NOT_ALLOWED)
            else:
                outcome = self.run_method(identity, name, params, self.clock.now(), method_times)
            self.portal.finish_call(record, self.generation, outcome.status, outcome.error,
                                    applied=outcome.error is None)
            if outcome.error:
                errors[key] = outcome.body
                if halt:
                    break
                continue
            results[key] = outcome.body["result"]
            times[key] = outcome.body["time"]
            if "total" in outcome.body:
                totals[key] = outcome.body["total"]
            if "next" in outcome.body:
                nexts[key] = outcome.body["next"]
        with self.portal.lock:
            now = time.time()
            for method, (short, total) in method_times.items():
                if short > 0 and total > MIN_RECORDED_SECONDS:
                    self.portal.operating.record(identity.key, method, short, now, force=True)
            reset_at = self.portal.operating.reset_at(identity.key, BATCH_METHOD, now)
        body = {
            "result": {"result": php_array(results), "result_error": php_array(errors),
                       "result_total": php_array(totals), "result_next": php_array(nexts),
                       "result_time": php_array(times)},
            "time": self.time_block(self.clock.arrived, self.clock.now() - self.clock.arrived, 0.0, reset_at),
        }
        return Outcome(200, body)

    @staticmethod
    def _substitute(command: str, results: dict[Any, Any]) -> str:
        """Replace `$result[key][field]...` with an earlier command's (scalar) result."""
        def replace(match: re.Match[str]) -> str:
            key = match.group(1)
            value: Any = results.get(key, results.get(int(key)) if key.isdigit() else None)
            for part in re.findall(r"\[([^\]]*)\]", match.group(2)):
                if isinstance(value, dict):
                    value = value.get(part)
                elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                    value = value[int(part)]
                else:
                    value = None
            if value is None or isinstance(value, (dict, list)):
                return match.group(0)
            if isinstance(value, bool):
                value = int(value)
            return quote(str(value), safe="")
        return RESULT_REFERENCE.sub(replace, command)


class RestEndpoint:
    """WSGI middleware that answers every /rest call itself and hands anything else to Flask.

    `/rest/<user>/<code>/<method>[.json]` is a webhook call, `/rest/<method>[.json]` an OAuth call.
    Skipping Flask's routing and request context here roughly halves the per-call overhead,
    which is what lets the sandbox answer well over 1,000 cheap calls per second.
    """

    PREFIX = "/rest/"

    def __init__(self, portal: Portal, fallback: Callable[..., Iterable[bytes]]) -> None:
        self.portal = portal
        self.fallback = fallback

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.PREFIX):
            return self.fallback(environ, start_response)
        request = Request(environ)
        if request.method not in ("GET", "POST"):
            response = json_response({"error": "METHOD_NOT_ALLOWED",
                                      "error_description": "HTTP method not allowed"}, 405)
        else:
            response = RestCall(self.portal, request, path[len(self.PREFIX):]).run()
        return response(environ, start_response)
