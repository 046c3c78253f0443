"""Injected faults: rules that make the next matching /rest requests fail in a chosen way.

The book does not lock; the portal calls it while holding its own lock.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

# Kinds of fault and what each does to a matching /rest HTTP request. The OAuth token endpoint is matched
# only by rules that name it (`"method": "oauth.token"`); there `applied_then_timeout` rotates the refresh
# token and then loses the answer.
KINDS = {
    "error500": "HTTP 500 INTERNAL_SERVER_ERROR; nothing is applied",
    "drop": "the connection is closed without any answer; nothing is applied",
    "slow": "wait `seconds` (default 1), then process and answer normally",
    "applied_then_timeout": "the call takes effect, then the answer stalls `seconds` (default 30) "
                            "and the connection is closed without an answer",
    "late": "process and apply the call at once, then hold the answer `seconds` (default 1) before sending it",
    "query_limit": "HTTP 503 QUERY_LIMIT_EXCEEDED; nothing is applied",
    "overload": "HTTP 503 OVERLOAD_LIMIT; nothing is applied",
    "not_json": "the call takes effect, then a proxy answers HTTP 200 with an HTML page instead of the JSON",
    "proxy_timeout": "the call takes effect, then a proxy answers HTTP 408 with an HTML page (it stopped waiting)",
    "proxy_limit": "a proxy answers HTTP 429 with an HTML page; nothing is applied",
}

DEFAULT_SECONDS = {"slow": 1.0, "late": 1.0, "applied_then_timeout": 30.0}


class FaultError(ValueError):
    """A fault rule that cannot be accepted."""


@dataclass
class FaultRule:
    """One rule: which requests it matches, how often, and what it does."""

    id: int
    kind: str
    method: str | None = None
    times: int | None = None
    rate: float = 1.0
    seconds: float | None = None
    remaining: int | None = None
    fired: int = 0

    def public(self) -> dict[str, Any]:
        """The rule as JSON for `GET /_sandbox/faults`."""
        return asdict(self)


def _number(raw: dict[str, Any], name: str, low: float, high: float | None) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultError(f"`{name}` must be a number")
    if value < low or (high is not None and value > high):
        raise FaultError(f"`{name}` must be between {low} and {high if high is not None else 'any'}")
    return float(value)


class FaultBook:
    """The ordered list of rules; the first rule that fires decides the request's fate."""

    def __init__(self, rng: random.Random) -> None:
        self.rules: list[FaultRule] = []
        self._rng = rng
        self._next_id = 1

    def add(self, raw: dict[str, Any]) -> FaultRule:
        """Validate and append one rule given as JSON."""
        if not isinstance(raw, dict):
            raise FaultError("each rule must be an object")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise FaultError(f"`kind` must be one of {', '.join(KINDS)}")
        method = raw.get("method")
        if method is not None and (not isinstance(method, str) or not method):
            raise FaultError("`method` must be a non-empty string")
        times = _number(raw, "times", 1, None)
        if times is not None and times != int(times):
            raise FaultError("`times` must be an integer")
        rate = _number(raw, "rate", 0.0, 1.0)
        seconds = _number(raw, "seconds", 0.0, 3600.0)
        if seconds is None:
            seconds = DEFAULT_SECONDS.get(kind)
        rule = FaultRule(
            id=self._next_id, kind=kind, method=method,
            times=int(times) if times is not None else None,
            rate=1.0 if rate is None else rate, seconds=seconds,
            remaining=int(times) if times is not None else None,
        )
        self._next_id += 1
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule."""
        self.rules.clear()

    def pick(self, methods: set[str], named_only: bool = False) -> FaultRule | None:
        """The rule that fires for a request touching `methods` (lower-case names), if any.

        A rule with `times` is consulted by that many matching requests, each time firing
        with probability `rate`. With `named_only`, rules without a method do not match.
        """
        for rule in self.rules:
            if rule.remaining is not None and rule.remaining <= 0:
                continue
            if rule.method is None and named_only:
                continue
            if rule.method is not None and rule.method.lower() not in methods:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            if rule.rate >= 1.0 or self._rng.random() < rule.rate:
                rule.fired += 1
                return rule
        return None
