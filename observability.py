"""Sentry and logging for web and worker: one init, secrets scrubbed from events and masked in logs."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.rq import RqIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

from settings import Settings

# Webhook URLs carry their secret in the path: /rest/<user>/<code>/.
WEBHOOK_CODE = re.compile(r"(/rest/\d+/)[A-Za-z0-9_]+(/)")
# Standard Webhooks secrets and bearer tokens, wherever they appear in text.
SECRET_PATTERNS = [re.compile(r"whsec_[A-Za-z0-9+/=]+"), re.compile(r"(?i)(bearer\s+)\S+"),
                   re.compile(r"(?i)((?:refresh_token|access_token|client_secret|application_token|auth|key)"
                              r"(?:%5B[a-z_]*%5D|\[[a-z_]*\])?=)[^&\s\"']+")]
# Keys whose values are secrets, in Sentry events (matched anywhere in nested data).
SECRET_KEYS = ["application_token", "access_token", "refresh_token", "client_secret", "webhook_url",
               "robot_secret", "key", "auth[application_token]", "auth[access_token]", "auth[refresh_token]",
               "webhook-signature", "idempotency-key", "b24_webhook_url", "trigger_secrets", "trigger_api_keys"]
MASK = "****"

_secrets: list[str] = []


def remember_secrets(settings: Settings) -> None:
    """Every configured secret value, so that masking finds it in any text."""
    values: list[str | None] = [*settings.api_keys, *settings.webhook_secrets]
    values += [secret for caller in settings.callers.values() for secret in caller.secrets]
    if settings.app is not None:
        values.append(settings.app.client_secret)
    for portal in settings.portals.values():
        values += [portal.application_token, portal.robot_secret]
        if portal.oauth:
            values += [portal.oauth.client_secret, portal.oauth.refresh_token]
        match = re.search(r"/rest/\d+/([A-Za-z0-9_]+)/", portal.webhook_url or "")
        values.append(match.group(1) if match else None)
    _secrets[:] = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def mask(text: str) -> str:
    """The text with webhook codes, tokens and configured secrets replaced by ****."""
    text = WEBHOOK_CODE.sub(rf"\1{MASK}\2", text)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _mask_tree(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _mask_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_tree(v) for v in value]
    return value


def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Last pass over every Sentry event: mask secrets in every string."""
    masked: dict[str, Any] = _mask_tree(event)
    return masked


class LineFormatter(logging.Formatter):
    """One line per event: time, level, logger, message, then key=value fields; secrets masked."""

    STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {k: v for k, v in vars(record).items() if k not in self.STANDARD and v is not None}
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname.lower(), record.name, record.getMessage()]
        parts += [f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return mask(line)


def setup_logging(level: int = logging.INFO) -> None:
    """Our loggers (and RQ's) write masked one-line records to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    for name in ("b24cancel", "rq.worker", "rq.scheduler"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def init(settings: Settings, component: str) -> None:
    """Shared start-up of web and worker: logging, and Sentry when SENTRY_DSN is set."""
    remember_secrets(settings)
    setup_logging()
    if not settings.sentry_dsn:
        return
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.release,
        max_request_body_size="never",  # webhook bodies carry tokens
        include_local_variables=False,  # locals hold webhook URLs and payloads
        event_scrubber=EventScrubber(denylist=DEFAULT_DENYLIST + SECRET_KEYS, recursive=True),
        before_send=before_send,  # type: ignore[arg-type]
        integrations=[FlaskIntegration(), RqIntegration()],
        traces_sample_rate=0.0,
    )
    sentry_sdk.set_tag("component", component)
