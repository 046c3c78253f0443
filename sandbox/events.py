"""Outgoing events: the sandbox POSTs a Bitrix24-style event, form-encoded, to a loopback URL only."""

from __future__ import annotations

import http.client
import ipaddress
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from sandbox.config import Config

# Handler id Bitrix24 would have given the registered outgoing webhook.
EVENT_HANDLER_ID = "1"
# How long the sandbox waits for the receiving handler before giving up.
SEND_TIMEOUT_SECONDS = 10.0
# Keep at most this much of the handler's answer in the reply.
MAX_BODY_CHARS = 65_536


class EventError(ValueError):
    """An event that may not be sent (bad input or a non-loopback URL)."""


def loopback_target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of `url`, refusing any host that is not this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise EventError("url must be http:// or https://")
    host = parts.hostname or ""
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise EventError("url host must be loopback (127.0.0.0/8, localhost or ::1)") from None
        if not address.is_loopback:
            raise EventError("url host must be loopback (127.0.0.0/8, localhost or ::1)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, path


def event_form(config: Config, spec: dict[str, Any], tokens: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The form fields of an outgoing event exactly as Bitrix24 names them (all values strings).

    With `tokens` (an app's event handler) the `auth` part also carries them: access_token, expires,
    expires_in, scope, status, user_id, and refresh_token when the event sends one.
    """
    event = spec.get("event")
    if not isinstance(event, str) or not event:
        raise EventError("`event` is required")
    if "id" not in spec:
        raise EventError("`id` is required")
    fields: list[tuple[str, str]] = [
        ("event", event.upper()),
        ("event_handler_id", EVENT_HANDLER_ID),
        ("data[FIELDS][ID]", str(spec["id"])),
    ]
    extra = spec.get("fields") or {}
    if not isinstance(extra, dict):
        raise EventError("`fields` must be an object")
    fields += [(f"data[FIELDS][{k}]", str(v)) for k, v in extra.items() if k != "ID"]
    fields += [
        ("ts", str(int(spec.get("ts") or time.time()))),
        ("auth[domain]", str(spec.get("domain") or config.domain)),
        ("auth[client_endpoint]", config.client_endpoint),
        ("auth[server_endpoint]", config.server_endpoint),
        ("auth[member_id]", str(spec.get("member_id") or config.member_id)),
        ("auth[application_token]", str(spec.get("application_token") or config.application_token)),
    ]
    fields += [(f"auth[{name}]", value) for name, value in (tokens or {}).items()]
    return fields


def send_event(config: Config, spec: dict[str, Any], tokens: dict[str, str] | None = None) -> dict[str, Any]:
    """POST the event (with an app's `tokens` in `auth`, if given) and report the handler's answer and time."""
    url = spec.get("url")
    if not isinstance(url, str):
        raise EventError("`url` is required")
    return post_form(url, urlencode(event_form(config, spec, tokens)))


def post_form(url: str, body: str) -> dict[str, Any]:
    """POST a form-encoded body to a loopback URL as Bitrix24's queue does; the handler's answer and time."""
    scheme, host, port, path = loopback_target(url)
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    started = time.perf_counter()
    connection = connection_class(host, port, timeout=SEND_TIMEOUT_SECONDS)
    try:
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Bitrix24 Webhook Engine",
        })
        answer = connection.getresponse()
        text = answer.read().decode("utf-8", "replace")[:MAX_BODY_CHARS]
        return {"status": answer.status, "body": text,
                "elapsed_ms": round((time.perf_counter() - started) * 1000, 1)}
    finally:
        connection.close()
