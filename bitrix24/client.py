"""A thin Bitrix24 REST client: JSON over httpx, the answer envelope, errors by code, batch, limits.

It knows nothing of Flask or RQ. Waiting for a limit longer than `max_sleep` raises `Throttled`,
so the caller can reschedule instead of holding a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

from bitrix24.auth import OAuthTokens
from bitrix24.errors import (
    BAD_ANSWER,
    EXPIRED_TOKEN,
    OPERATING_LIMITED,
    RATE_LIMITED,
    TRANSPORT_CONNECT,
    TRANSPORT_DROPPED,
    TRANSPORT_TIMEOUT,
    Bitrix24Error,
    Throttled,
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


class Observer(Protocol):
    """Counts what the client did (a metrics sink): `observe(name, *labels)`."""

    def __call__(self, name: str, *labels: str, amount: float = 1.0) -> None: ...


class Gate(Protocol):
    """The shared limits a call passes through (implemented over Redis in bitrix24.limits)."""

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
                 observe: Observer | None = None, tokens: OAuthTokens | None = None) -> None:
        """`base_url`: the incoming-webhook URL, or with `tokens` (an app's OAuth) the portal's client_endpoint."""
        parts = urlsplit(base_url)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
            raise ValueError("Bitrix24 is called over https; plain http only for a loopback sandbox")
        self.base = base_url if base_url.endswith("/") else base_url + "/"
        self.portal = portal
        self.http = http
        self.gate = gate
        self.observe = observe
        self.tokens = tokens

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
        for resend in range(RATE_LIMIT_RESENDS + 1):
            if self.gate:
                self.gate.before(methods)
            token = self.tokens.access_token() if self.tokens else None
            try:
                return self._post(method, {**params, "auth": token} if token else params)
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

    def _post(self, method: str, params: dict[str, Any]) -> Answer:
        started = time.monotonic()
        url = f"{self.base}{method}.json"
        try:
            response = self.http.post(url, json=params, headers={"User-Agent": USER_AGENT})
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
            server_side = response.status_code >= 500
            err = Bitrix24Error(BAD_ANSWER, f"HTTP {response.status_code} with a body that is not JSON",
                                response.status_code, method, retryable=server_side, ambiguous=server_side)
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
