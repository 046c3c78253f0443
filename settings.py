"""Typed settings from the environment (and `.env`), validated at start-up, and the portal registry.

Every layer may read settings; nothing else here does I/O beyond reading the environment and files.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The portal name that the single-portal variables (B24_*) define.
DEFAULT_PORTAL = "default"
# Bitrix24 incoming-webhook URL: https://<portal>/rest/<user id>/<code>/
WEBHOOK_PATH = re.compile(r"^/rest/(?P<user>\d+)/(?P<code>[A-Za-z0-9_]+)/?$")
CHAT_ID = re.compile(r"^(chat|sg)\d+$|^\d+$")
LOOPBACK_HOSTS = {"localhost"}


class SettingsError(Exception):
    """The configuration is wrong; the message names every bad value, one per line."""


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine (plain http is allowed only there)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def mask_webhook_url(url: str) -> str:
    """The webhook URL with its secret code replaced: https://x.bitrix24.com/rest/1/****/."""
    parts = urlsplit(url)
    match = WEBHOOK_PATH.match(parts.path)
    if not match:
        return f"{parts.scheme}://{parts.netloc}/****"
    return f"{parts.scheme}://{parts.netloc}/rest/{match['user']}/****/"


def check_webhook_url(url: str) -> str:
    """Validate and normalise an incoming-webhook URL (trailing slash); raise ValueError naming the fault."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be a URL like https://<portal>.bitrix24.com/rest/<user>/<code>/")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is accepted only for a loopback sandbox)")
    if not WEBHOOK_PATH.match(parts.path):
        raise ValueError("must have the path /rest/<user id>/<webhook code>/")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True)
class Portal:
    """One Bitrix24 portal the service acts on, with its credentials and where it reports."""

    name: str
    webhook_url: str = field(repr=False)
    chat: str
    application_token: str | None = field(default=None, repr=False)
    robot_secret: str | None = field(default=None, repr=False)
    language: Literal["en", "ru"] = "en"
    plan: Literal["standard", "enterprise"] = "standard"
    member_id: str | None = None
    domain: str | None = None
    rules: tuple[dict[str, Any], ...] = ()

    @property
    def masked_url(self) -> str:
        return mask_webhook_url(self.webhook_url)

    @property
    def origin(self) -> str:
        """scheme://host[:port] of the portal, for links a person clicks."""
        parts = urlsplit(self.webhook_url)
        return f"{parts.scheme}://{parts.netloc}"

    def public(self) -> dict[str, Any]:
        """What may be shown about the portal: never a secret."""
        return {"name": self.name, "url": self.masked_url, "chat": self.chat,
                "plan": self.plan, "language": self.language}


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    b24_webhook_url: str | None = None
    b24_chat_id: str | None = None
    b24_application_token: str | None = None
    b24_robot_secret: str | None = None
    b24_language: Literal["en", "ru"] = "en"
    b24_plan: Literal["standard", "enterprise"] = "standard"
    b24_member_id: str | None = None
    b24_domain: str | None = None

    # Limits: overrides of the plan's rate and burst, and the share of the burst we use.
    b24_rate_limit: float | None = None
    b24_rate_burst: int | None = None
    b24_rate_headroom: float = 0.8
    b24_operating_limit: float = 420.0
    b24_operating_window: float = 600.0

    # HTTP to Bitrix24. The cloud cuts any REST call at 60 s, so a longer read timeout only waits longer.
    b24_connect_timeout: float = 5.0
    b24_read_timeout: float = 30.0

    trigger_api_keys: str = ""
    trigger_secrets: str = ""

    redis_url: str | None = None
    sentry_dsn: str | None = None
    sentry_environment: str = "production"
    release: str | None = None
    port: int = 8000

    # How long request records and idempotency keys live (a repeat within it is one request).
    request_ttl_days: int = 14
    # `make run` with the sandbox: API key "sandbox" is accepted from loopback only.
    sandbox_mode: bool = False

    @field_validator("b24_chat_id")
    @classmethod
    def _chat(cls, value: str | None) -> str | None:
        if value is not None and not CHAT_ID.match(value):
            raise ValueError("must be a chat like chat42 (or sg42, or a user id)")
        return value

    @field_validator("b24_webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        return check_webhook_url(value) if value else None

    @field_validator("trigger_secrets")
    @classmethod
    def _secrets(cls, value: str) -> str:
        for secret in split_list(value):
            if not secret.startswith("whsec_"):
                raise ValueError("each secret must start with whsec_ (Standard Webhooks format)")
        return value

    @field_validator("b24_rate_headroom")
    @classmethod
    def _headroom(cls, value: float) -> float:
        if not 0.1 <= value <= 1.0:
            raise ValueError("must be between 0.1 and 1.0")
        return value

    @property
    def api_keys(self) -> list[str]:
        return split_list(self.trigger_api_keys)

    @property
    def webhook_secrets(self) -> list[str]:
        return split_list(self.trigger_secrets)

    @property
    def request_ttl(self) -> int:
        return self.request_ttl_days * 86400

    @cached_property
    def portals(self) -> dict[str, Portal]:
        """The configured portals by name."""
        if not self.b24_webhook_url:
            return {}
        return {DEFAULT_PORTAL: Portal(
            name=DEFAULT_PORTAL, webhook_url=self.b24_webhook_url, chat=self.b24_chat_id or "",
            application_token=self.b24_application_token, robot_secret=self.b24_robot_secret,
            language=self.b24_language, plan=self.b24_plan,
            member_id=self.b24_member_id, domain=self.b24_domain,
        )}

    def portal(self, name: str | None) -> Portal | None:
        """The portal by name; with no name, the only portal when exactly one is configured."""
        if name is None:
            return next(iter(self.portals.values())) if len(self.portals) == 1 else None
        return self.portals.get(name)


def split_list(value: str) -> list[str]:
    """Comma- or space-separated values, blanks dropped."""
    return [item for item in re.split(r"[,\s]+", value or "") if item]


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise SettingsError with one line per bad value."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    problems = []
    if settings.b24_webhook_url and not settings.b24_chat_id:
        problems.append("B24_CHAT_ID: required with B24_WEBHOOK_URL (the chat that receives the reports)")
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings
