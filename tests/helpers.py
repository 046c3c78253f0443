"""Small helpers shared by the tests: waiting for real processes, signing requests, reading the sandbox."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from standardwebhooks.webhooks import Webhook

T = TypeVar("T")

API_KEY = "test-api-key"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
ROBOT_SECRET = "robot-secret-123"
APPLICATION_TOKEN = "app-token-abc"


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Poll until predicate() is truthy and return its value; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value {last!r}")


def signed_headers(body: bytes, msg_id: str, secret: str = WEBHOOK_SECRET,
                   when: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks headers for a body, signed with the library's own signer."""
    when = when or datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature, "Content-Type": "application/json"}


def bearer(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class SandboxView:
    """Read and steer the sandbox portal over its control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def document(self, doc_id: int) -> dict[str, Any]:
        return self.http.get(f"/_sandbox/documents/{doc_id}").raise_for_status().json()

    def messages(self) -> list[dict[str, Any]]:
        return self.http.get("/_sandbox/messages").raise_for_status().json()

    def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        params = {"method": method} if method else None
        return self.http.get("/_sandbox/calls", params=params).raise_for_status().json()

    def effective_cancels(self, doc_id: int) -> int:
        """How many cancel calls for this document the portal answered with success or applied."""
        count = 0
        for call in self.calls("catalog.document.cancel"):
            params = call.get("params") or {}
            if str(params.get("id")) == str(doc_id) and call.get("applied", call.get("http_status") == 200):
                count += 1
        return count

    def faults(self, *rules: dict[str, Any]) -> None:
        self.http.post("/_sandbox/faults", json={"rules": list(rules)}).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/_sandbox/faults").raise_for_status()

    def permissions(self, **changes: Any) -> None:
        self.http.post("/_sandbox/permissions", json=changes).raise_for_status()

    def config(self, **changes: Any) -> None:
        self.http.post("/_sandbox/config", json=changes).raise_for_status()

    def seed(self, *documents: dict[str, Any]) -> list[dict[str, Any]]:
        return self.http.post("/_sandbox/documents", json={"documents": list(documents)}).raise_for_status().json()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()
