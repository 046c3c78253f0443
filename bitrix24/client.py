"""A thin Bitrix24 REST client: JSON over httpx, the answer envelope, errors by code, batch, limits.

It knows nothing of Flask or RQ. Waiting for a limit longer than `max_sleep` raises `Throttled`,
so the caller can reschedule instead of holding a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

from bitrix24.auth import OAuthTokens
from bitrix24.errors import (
    AMBIGUOUS_STATUSES,
    BAD_ANSWER,
    CALL_DEADLINE,
    EXPIRED_TOKEN,
    OPERATING_LIMITED,
    RATE_LIMITED,
    TRANSPORT_CONNECT,
    TRANSPORT_DROPPED,
    TRANSPORT_TIMEOUT,
    Bitrix24Error,
    Throttled,
    ambiguous_status,
    classify,
)
from settings import is_loopback

log = logging.getLogger("b24cancel.bitrix24")

USER_AGENT = "b24-cancel/0.1"
# Bitrix24 refuses more than 50 commands in one batch (ERROR_BATCH_LENGTH_EXCEEDED).
BATCH_MAX = 50
# A QUERY_LIMIT_EXCEEDED means the portal did not run the call, so it is sent again after the
# limiter's wait; this many times in one call before the error goes up to the job.
RATE_LIMIT_RESENDS = 4
# One call's whole time (limiter sleeps, resends after QUERY_LIMIT_EXCEEDED, a token refresh, each send's
# connect and read time) stays within this many seconds: below a job's 75 s lease, so a job checks its
# lease at least this often, and an abandoned copy never waits on one call longer. A resend that could
# not finish in what is left is not made. (At least one full send always fits, whatever the timeouts.)
CALL_DEADLINE_SECONDS = 60.0


class Observer(Protocol):
    """Counts what the client did (a metrics sink): `observe(name, *labels)`."""

    def __call__(self, name: str, *labels: str, amount: float = 1.0) -> None: ...


class Gate(Protocol):
    """The shared limits a call passes through (implemented over Redis in bitrix24.limits)."""

    max_sleep: float  # the longest wait `before` sleeps rather than raising Throttled

    def before(self, methods: Sequence[str]) -> None:
        """Wait for a slot, or raise Throttled when the wait is too long or a method is paused."""

    def after(self, method: str, timing: Mapping[str, Any] | None) -> None:
        """Record an answer's operating figures."""

    def rate_limited(self) -> None:
        """The portal answered QUERY_LIMIT_EXCEEDED despite us: slow down."""

    def operating_limited(self, method: str, reset_at: float | None) -> float:
        """The portal answered OPERATION_TIME_LIMIT for this method: pause it; return when it may resume."""


@dataclass
class Answer:
    """A successful answer: `result` and the `time` block, plus paging for list methods."""

    result: Any
    time: dict[str, Any] = field(default_factory=dict)
    next: int | None = None
    total: int | None = None


@dataclass
class BatchAnswer:
    """Per-command results of a batch: each key has either a result or an error."""

    results: dict[str, Any]
    errors: dict[str, Bitrix24Error]
    time: dict[str, Any] = field(default_factory=dict)


def php_query(params: Mapping[str, Any]) -> str:
    """Encode params as PHP's http_build_query does (filter[id]=5, select[0]=id), values URL-encoded."""
    pairs: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}[{key}]", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}[{index}]", item)
        elif value is None:
            pairs.append(f"{quote(prefix, safe='[]')}=")
        else:
            text = ("Y" if value else "N") if isinstance(value, bool) else str(value)
            pairs.append(f"{quote(prefix, safe='[]')}={quote(text, safe='')}")

    for key, value in params.items():
        walk(str(key), value)
    return "&".join(pairs)


class Bitrix24Client:
    """Calls one portal through its incoming-webhook URL."""

    def __init__(self, base_url: str, portal: str, http: httpx.Client, gate: Gate | None = None,
                 observe: Observer | None = None, tokens: OAuthTokens | None = None,
                 deadline: float = CALL_DEADLINE_SECONDS, before_send: Callable[[], None] | None = None) -> None:
        """`base_url`: the incoming-webhook URL, or with `tokens` (an app's OAuth) the portal's client_endpoint.

        `before_send` runs right before each HTTP send and may raise to stop it (a job that lost its lease).
        """
        parts = urlsplit(base_url)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
            raise ValueError("Bitrix24 is called over https; plain http only for a loopback sandbox")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.portal = portal
        self.http = http
        self.gate = gate
        self.observe = observe
        self.tokens = tokens
        self.before_send = before_send
        timeout = http.timeout
        self.connect_timeout = float(timeout.connect or 0.0)
        self.read_timeout = float(timeout.read or 0.0)
        # the longest one send may take with full timeouts, after the longest limiter sleep
        self.send_bound = (gate.max_sleep if gate else 0.0) + self.connect_timeout + self.read_timeout
        self.deadline = max(deadline, self.send_bound)

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Answer:
        """Call one method; raise Bitrix24Error (or Throttled) when it does not succeed."""
        return self._send(method, dict(params or {}), [method])

    def batch(self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], halt: bool = False) -> BatchAnswer:
        """Run up to 50 commands in one request (one rate-limit token); results and errors per key."""
        if len(commands) > BATCH_MAX:
            raise ValueError(f"a batch takes at most {BATCH_MAX} commands, got {len(commands)}")
        cmd = {key: f"{method}?{php_query(params)}" for key, (method, params) in commands.items()}
        inner = sorted({method for method, _ in commands.values()})
        answer = self._send("batch", {"halt": 1 if halt else 0, "cmd": cmd}, inner)
        body = answer.result if isinstance(answer.result, dict) else {}
        results = body.get("result") or {}
        raw_errors = body.get("result_error") or {}
        timings = body.get("result_time") or {}
        if isinstance(results, list):
            results = {str(i): r for i, r in enumerate(results)}
        if isinstance(raw_errors, list):
            raw_errors = {str(i): e for i, e in enumerate(raw_errors)}
        if isinstance(timings, list):
            timings = {str(i): t for i, t in enumerate(timings)}
        errors: dict[str, Bitrix24Error] = {}
        if self.observe:
            for key in results:
                if key in commands:
                    self.observe("bitrix24_calls", self.portal, commands[key][0], "ok")
        for key, err in raw_errors.items():
            method = commands[key][0] if key in commands else "batch"
            errors[key] = classify(str(err.get("error", "")), str(err.get("error_description", "")), None, method)
            if self.observe:
                self.observe("bitrix24_calls", self.portal, method, errors[key].code)
            if errors[key].code == OPERATING_LIMITED and self.gate:
                self.gate.operating_limited(method, None)
        if self.gate:
            for key, timing in timings.items():
                if key in commands:
                    self.gate.after(commands[key][0], timing)
        return BatchAnswer(results=dict(results), errors=errors, time=answer.time)

    def _send(self, method: str, params: dict[str, Any], methods: Sequence[str]) -> Answer:
        refreshed = False
        deadline = time.monotonic() + self.deadline
        for resend in range(RATE_LIMIT_RESENDS + 1):
            if time.monotonic() + self.send_bound > deadline:
                # refused before a token is taken or a byte sent: the portal did not run it
                code = RATE_LIMITED if resend else CALL_DEADLINE
                raise Bitrix24Error(code, f"the call's {self.deadline:.0f} s budget ran out before it could be "
                                    "sent again", None, method, retryable=True)
            if self.gate:
                self.gate.before(methods)
            token = self.tokens.access_token() if self.tokens else None
            if self.before_send:
                self.before_send()
            try:
                return self._post(method, {**params, "auth": token} if token else params, deadline)
            except Bitrix24Error as err:
                if err.code == EXPIRED_TOKEN and self.tokens and not refreshed:
                    self.tokens.refresh(stale=token)  # once, single-flight across every worker
                    refreshed = True
                    continue
                if err.code == RATE_LIMITED and self.gate and resend < RATE_LIMIT_RESENDS:
                    self.gate.rate_limited()
                    continue
                if err.code == OPERATING_LIMITED and self.gate:
                    until = max(self.gate.operating_limited(name, err.reset_at) for name in methods)
                    raise Throttled(until, f"OPERATION_TIME_LIMIT for {method}") from None
                raise
        raise Bitrix24Error(RATE_LIMITED, "still limited after resending", None, method, retryable=True)

    def _post(self, method: str, params: dict[str, Any], deadline: float) -> Answer:
        started = time.monotonic()
        url = f"{self.base}{method}.json"
        # no phase may outlast the call's deadline (only the first send can be short of full timeouts,
        # when they are configured longer than the deadline)
        left = max(deadline - started, 0.1)
        connect = min(self.connect_timeout, left)
        timeout = httpx.Timeout(min(self.read_timeout, max(left - connect, 0.1)), connect=connect)
        try:
            response = self.http.post(url, json=params, headers={"User-Agent": USER_AGENT}, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise self._transport(method, TRANSPORT_CONNECT, exc, ambiguous=False) from None
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            raise self._transport(method, TRANSPORT_TIMEOUT, exc, ambiguous=True) from None
        except httpx.TransportError as exc:
            raise self._transport(method, TRANSPORT_DROPPED, exc, ambiguous=True) from None
        elapsed = time.monotonic() - started
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            err = self._not_json(method, response.status_code)
            self._log(method, response.status_code, elapsed, err.code)
            raise err
        if "error" in body or response.status_code >= 400:
            err = classify(str(body.get("error", BAD_ANSWER)), str(body.get("error_description", "")),
                           response.status_code, method)
            if err.code == OPERATING_LIMITED:
                reset = (body.get("time") or {}).get("operating_reset_at")
                err.reset_at = float(reset) if reset else None
            self._log(method, response.status_code, elapsed, err.code)
            raise err
        timing = body.get("time") or {}
        if self.gate and method != "batch":
            self.gate.after(method, timing)
        self._log(method, response.status_code, elapsed, None, timing.get("operating"))
        return Answer(result=body.get("result"), time=timing, next=body.get("next"), total=body.get("total"))

    @staticmethod
    def _not_json(method: str, status: int) -> Bitrix24Error:
        """An answer without a JSON object: a proxy's or the web server's page, not the portal's REST answer.

        A 2xx, a 408, a 429 (Bitrix24's own limit answers are JSON) or a 5xx may come after the portal ran
        the call, or while it still runs: ambiguous. Any other status (a proxy's 404 or 403) means it
        did not reach the portal's REST, and sending it again will not help.
        """
        description = f"HTTP {status} with a body that is not JSON"
        if status in AMBIGUOUS_STATUSES:
            return ambiguous_status(status, method, description)
        maybe_ran = status < 300 or status >= 500
        return Bitrix24Error(BAD_ANSWER, description, status, method, retryable=maybe_ran, ambiguous=maybe_ran)

    def _transport(self, method: str, code: str, exc: Exception, ambiguous: bool) -> Bitrix24Error:
        self._log(method, None, None, code)
        return Bitrix24Error(code, type(exc).__name__, None, method, retryable=True, ambiguous=ambiguous)

    def _log(self, method: str, status: int | None, elapsed: float | None, error: str | None,
             operating: Any = None) -> None:
        if self.observe:
            self.observe("bitrix24_calls", self.portal, method, error or "ok")
        log.info("bitrix24 call", extra={
            "portal": self.portal, "method": method, "http_status": status, "error": error,
            "ms": round(elapsed * 1000, 1) if elapsed is not None else None, "operating": operating,
        })
