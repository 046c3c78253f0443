"""Typed settings from the environment (and `.env`), validated at start-up, and the portal registry.

Every layer may read settings; nothing else here does I/O beyond reading the environment and files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

import redisconn

# The portal name that the single-portal variables (B24_*) define.
DEFAULT_PORTAL = "default"
# Bitrix24 incoming-webhook URL: https://<portal>/rest/<user id>/<code>/
WEBHOOK_PATH = re.compile(r"^/rest/(?P<user>\d+)/(?P<code>[A-Za-z0-9_]+)/?$")
# ASCII digits only, on the whole string (used with fullmatch): "chat1\n" and "chat١" are not chats.
CHAT_ID = re.compile(r"(?:chat|sg)[0-9]{1,18}|[0-9]{1,18}", re.ASCII)
LOOPBACK_HOSTS = {"localhost"}
# The languages the chat reports are written in (gettext catalogs under locale/), and the codes Bitrix24 itself
# gives some of them in LANGUAGE_ID (`ua` Ukrainian, `la` Spanish, `br` Brazilian Portuguese), taken as aliases.
Language = Literal["en", "ru", "de", "es", "pt", "pl", "uk"]
LANGUAGES: tuple[str, ...] = ("en", "ru", "de", "es", "pt", "pl", "uk")
LANGUAGE_ALIASES = {"ua": "uk", "la": "es", "br": "pt"}
# Who a report mentions ([user=ID]) for a refused or failed document: its responsible user, or nobody.
Mention = Literal["responsible", "none"]


def check_language(value: Any) -> Any:
    """A report language: one of LANGUAGES, any case, or a Bitrix24 alias of one; raise ValueError otherwise."""
    if not isinstance(value, str):
        return value
    code = value.strip().lower()
    code = LANGUAGE_ALIASES.get(code, code)
    if code not in LANGUAGES:
        raise ValueError(f"must be one of {', '.join(LANGUAGES)} (Bitrix24's ua, la and br are taken too)")
    return code


# The variables that define the single portal `default` (the portals file replaces them all).
SINGLE_PORTAL_FIELDS = ("b24_webhook_url", "b24_chat_id", "b24_application_token", "b24_robot_secret",
                        "b24_member_id", "b24_domain")


# Caller names that the service itself gives: `default` (TRIGGER_API_KEYS / TRIGGER_SECRETS), `sandbox`
# (SANDBOX_MODE's key), `bitrix24` (the idempotency namespace of requests Bitrix24 makes) and `operator`
# (requests made with `flask --app app cancel`).
DEFAULT_CALLER = "default"
SANDBOX_CALLER = "sandbox"
BITRIX24_CALLER = "bitrix24"
OPERATOR_CALLER = "operator"
RESERVED_CALLERS = (SANDBOX_CALLER, BITRIX24_CALLER, OPERATOR_CALLER)
KEY_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A chat a request may name in `chat`: a group chat, never a bare user id (a direct dialog).
GROUP_CHAT = re.compile(r"^(chat|sg)[0-9]{1,18}\Z")


def key_sha256(key: str) -> str:
    """The lowercase hex SHA-256 of an API key, as `key_sha256` stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


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


def check_endpoint_url(url: str) -> str:
    """Validate and normalise an app's client_endpoint (https://<portal>/rest/); raise ValueError."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname or not parts.path.rstrip("/").endswith("/rest"):
        raise ValueError("must be the portal's REST endpoint, like https://<portal>.bitrix24.com/rest/")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is accepted only for a loopback sandbox)")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"


@dataclass(frozen=True)
class OAuthApp:
    """A local or marketplace app's credentials for one portal (the refresh token seeds Redis once)."""

    client_endpoint: str
    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    server: str = "https://oauth.bitrix.info/oauth/token/"
    # Tokens of an installed portal live only in Redis: no stored pair means the app was uninstalled.
    installed: bool = False


# `oauth_server = "portal"`: each installed portal is its own OAuth server (the sandbox is both); loopback only.
PORTAL_OAUTH_SERVER = "portal"
DEFAULT_OAUTH_SERVER = "https://oauth.bitrix.info/oauth/token/"


@dataclass(frozen=True)
class AppSettings:
    """The service as a Bitrix24 app (local or marketplace): its credentials, where Bitrix24 reaches it, and
    what every installed portal gets (chat, language, event rules)."""

    client_id: str
    client_secret: str = field(repr=False)
    public_url: str
    oauth_server: str = DEFAULT_OAUTH_SERVER
    chat: str | None = None
    language: Language = "en"
    rules: tuple[dict[str, Any], ...] = ()

    def url(self, path: str) -> str:
        """An absolute URL of this service that Bitrix24 calls (install, robot and event handlers)."""
        return self.public_url.rstrip("/") + path

    def token_url(self, client_endpoint: str) -> str:
        """The OAuth server's token endpoint for a portal reached at `client_endpoint`."""
        if self.oauth_server == PORTAL_OAUTH_SERVER:
            parts = urlsplit(client_endpoint)
            return f"{parts.scheme}://{parts.netloc}/oauth/token/"
        return self.oauth_server


def check_public_url(url: str) -> str:
    """Validate PUBLIC_URL: https (plain http only on loopback), no query; normalised without a trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("must be the https base URL that Bitrix24 reaches, like https://cancel.example.com")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError("must use https (plain http is accepted only for a loopback sandbox)")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def check_oauth_server(value: str) -> str:
    """Validate the OAuth server's token URL (or `portal`, the sandbox's own)."""
    if value == PORTAL_OAUTH_SERVER:
        return value
    parts = urlsplit(value)
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        raise ValueError("must be an https URL (plain http only for a loopback sandbox)")
    return value


@dataclass(frozen=True)
class Portal:
    """One Bitrix24 portal the service acts on, with its credentials and where it reports.

    It is reached through an incoming webhook (`webhook_url`) or as an OAuth app (`oauth`).
    """

    name: str
    webhook_url: str | None = field(repr=False)
    chat: str
    application_token: str | None = field(default=None, repr=False)
    robot_secret: str | None = field(default=None, repr=False)
    language: Language = "en"
    plan: Literal["standard", "enterprise"] = "standard"
    member_id: str | None = None
    domain: str | None = None
    rules: tuple[dict[str, Any], ...] = ()
    oauth: OAuthApp | None = field(default=None, repr=False)
    # Chats (besides `chat`) that a request for this portal may name in `chat`.
    chats: frozenset[str] = frozenset()
    # Whom a report mentions for a refused or failed document.
    mention: Mention = "responsible"
    # Installed through the app (stored in Redis by member_id), not configured; how its setup went.
    installed: bool = False
    setup: str = ""

    @property
    def base_url(self) -> str:
        """Where REST calls go: the webhook URL, or the app's client_endpoint."""
        if self.webhook_url:
            return self.webhook_url
        assert self.oauth is not None, "a portal has a webhook URL or an OAuth app"
        return self.oauth.client_endpoint

    @property
    def masked_url(self) -> str:
        return mask_webhook_url(self.webhook_url) if self.webhook_url else self.base_url

    @property
    def domain_name(self) -> str:
        """The portal's host (with port), as Bitrix24 sends it in auth[domain]."""
        return urlsplit(self.base_url).netloc

    @property
    def origin(self) -> str:
        """scheme://host[:port] of the portal, for links a person clicks."""
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    def public(self) -> dict[str, Any]:
        """What may be shown about the portal: never a secret."""
        auth = "installed app" if self.installed else "oauth app" if self.oauth else "incoming webhook"
        shown = {"name": self.name, "url": self.masked_url, "chat": self.chat, "plan": self.plan,
                 "language": self.language, "mention": self.mention, "auth": auth}
        if self.installed:
            shown["setup"] = self.setup or "pending"
        return shown


@dataclass(frozen=True)
class Caller:
    """Who sends requests: its name, its keys (as SHA-256) or Standard Webhooks secrets, and its scopes."""

    name: str
    key_hashes: tuple[str, ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # The portals it may submit to; None: every portal.
    portals: frozenset[str] | None = frozenset()
    # Chats it may name in `chat` (each portal's own chat is always allowed).
    chats: frozenset[str] = frozenset()
    # May read every request, /v1/portals and the health details.
    admin: bool = False

    def may_use(self, portal: str) -> bool:
        """Whether the caller may submit requests for this portal."""
        return self.portals is None or portal in self.portals


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    b24_webhook_url: str | None = None
    b24_chat_id: str | None = None
    b24_application_token: str | None = None
    b24_robot_secret: str | None = None
    b24_language: Language = "en"
    b24_mention: Mention = "responsible"
    b24_plan: Literal["standard", "enterprise"] = "standard"
    b24_member_id: str | None = None
    b24_domain: str | None = None
    # Many portals: a TOML file with one [portals.<name>] section each (instead of the B24_* variables).
    b24_portals_file: str | None = None
    # The service as a Bitrix24 app (or the portals file's [app] table): portals then come from installs.
    b24_app_client_id: str | None = None
    b24_app_client_secret: str | None = None
    b24_app_oauth_server: str | None = None
    b24_app_chat: str | None = None
    b24_app_language: Language | None = None
    public_url: str | None = None

    # Limits: overrides of the plan's rate and burst, and the share of the burst we use.
    b24_rate_limit: float | None = Field(default=None, gt=0)
    b24_rate_burst: int | None = Field(default=None, ge=1)
    b24_rate_headroom: float = 0.8
    b24_operating_limit: float = Field(default=420.0, gt=0)
    b24_operating_window: float = Field(default=600.0, gt=0)
    # Pause a method this many seconds of operating time before the limit (calls in flight still add).
    b24_operating_margin: float = Field(default=10.0, ge=0)

    # HTTP to Bitrix24. The cloud cuts any REST call at 60 s, so a longer read timeout only waits longer.
    b24_connect_timeout: float = Field(default=5.0, gt=0)
    b24_read_timeout: float = Field(default=30.0, gt=0)
    # How long Bitrix24 may go on running one REST call on its side (the cloud cuts calls at 60 s). A call
    # that got no answer may still take effect until then: the ambiguity rule waits this long (plus a
    # margin) from when it was sent before anything that depends on its effect happens.
    b24_execution_limit: float = Field(default=60.0, gt=0)
    # Seconds between two scheduled pulls of an installed portal's offline event queue.
    b24_offline_poll: int = Field(default=60, ge=1)

    trigger_api_keys: str = ""
    trigger_secrets: str = ""

    redis_url: str | None = None
    # Replicas that must confirm a write (Redis WAIT) before it counts: the intake's 202 and every write
    # that guards an effect outside Redis (document claim, "sent" note, report nonce). 0: the primary only.
    redis_min_replicas: int = Field(default=0, ge=0)
    sentry_dsn: str | None = None
    sentry_environment: str = "production"
    release: str | None = None
    port: int = 8000

    # How long request records and idempotency keys live (a repeat within it is one request).
    request_ttl_days: int = Field(default=14, ge=1)
    # `make run` with the sandbox: API key "sandbox" is accepted from loopback only. Refused at start-up
    # when any configured portal is not on a loopback host.
    sandbox_mode: bool = False
    # /metrics: a bearer token Prometheus sends (constant-time compared), and/or a second listener
    # (host:port) that serves /metrics only, without a token. With neither, /metrics answers 401.
    metrics_token: str | None = None
    metrics_bind: str | None = None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return check_public_url(value) if value else None

    @field_validator("b24_app_oauth_server")
    @classmethod
    def _app_oauth_server(cls, value: str | None) -> str | None:
        return check_oauth_server(value) if value else None

    @field_validator("b24_app_chat")
    @classmethod
    def _app_chat(cls, value: str | None) -> str | None:
        if value and not GROUP_CHAT.match(value):
            raise ValueError("must be a group chat like chat42")
        return value or None

    @field_validator("b24_chat_id")
    @classmethod
    def _chat(cls, value: str | None) -> str | None:
        if value is not None and not CHAT_ID.fullmatch(value):
            raise ValueError("must be a chat like chat42 (or sg42, or a user id)")
        return value

    @field_validator("b24_language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        return check_language(value)

    @field_validator("metrics_bind")
    @classmethod
    def _metrics_bind(cls, value: str | None) -> str | None:
        host, sep, port = (value or "").rpartition(":")
        if value and (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError("must be host:port, like 127.0.0.1:9100")
        return value or None

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

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return redisconn.check_url(value) if value else None

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

    _portals: dict[str, Portal] = PrivateAttr(default_factory=dict)
    _callers: dict[str, Caller] = PrivateAttr(default_factory=dict)
    _app: AppSettings | None = PrivateAttr(default=None)

    @property
    def app(self) -> AppSettings | None:
        """The service as a Bitrix24 app, when configured (B24_APP_* / PUBLIC_URL, or the [app] table)."""
        return self._app

    @property
    def callers(self) -> dict[str, Caller]:
        """The callers by name: `default` from TRIGGER_API_KEYS / TRIGGER_SECRETS, and the portals file's."""
        return self._callers

    @property
    def portals(self) -> dict[str, Portal]:
        """The configured portals by name."""
        return self._portals

    def _build_portals(self) -> None:
        if self.b24_portals_file:
            self._portals, self._callers, self._app = portals_from_file(Path(self.b24_portals_file))
        elif self.b24_webhook_url:
            self._portals = {DEFAULT_PORTAL: Portal(
                name=DEFAULT_PORTAL, webhook_url=self.b24_webhook_url, chat=self.b24_chat_id or "",
                application_token=self.b24_application_token, robot_secret=self.b24_robot_secret,
                language=self.b24_language, mention=self.b24_mention, plan=self.b24_plan,
                member_id=self.b24_member_id, domain=self.b24_domain,
            )}
        self._app = self._app_from_env(self._app)
        if self.api_keys or self.webhook_secrets:
            if DEFAULT_CALLER in self._callers:
                raise SettingsError(f"invalid configuration:\n  TRIGGER_API_KEYS / TRIGGER_SECRETS and "
                                    f"[callers.{DEFAULT_CALLER}]: both define the caller {DEFAULT_CALLER!r}; "
                                    "rename the section")
            default_hashes = {key_sha256(key) for key in self.api_keys} | set(self.webhook_secrets)
            for caller in self._callers.values():
                if default_hashes & {*caller.key_hashes, *caller.secrets}:
                    raise SettingsError(f"invalid configuration:\n  TRIGGER_API_KEYS / TRIGGER_SECRETS and "
                                        f"[callers.{caller.name}]: the same credential names two callers")
            # Today's behaviour for the simple case: one caller with every portal that sees everything.
            self._callers = {DEFAULT_CALLER: Caller(
                name=DEFAULT_CALLER, key_hashes=tuple(key_sha256(key) for key in self.api_keys),
                secrets=tuple(self.webhook_secrets), portals=None, admin=True), **self._callers}

    def _app_from_env(self, from_file: AppSettings | None) -> AppSettings | None:
        """The app: the [app] table, with any B24_APP_* / PUBLIC_URL variable overriding its value."""
        given = {"client_id": self.b24_app_client_id, "client_secret": self.b24_app_client_secret,
                 "public_url": self.public_url, "oauth_server": self.b24_app_oauth_server,
                 "chat": self.b24_app_chat, "language": self.b24_app_language}
        given = {name: value for name, value in given.items() if value}
        if from_file is None and not given:
            return None
        base: dict[str, Any] = {"client_id": "", "client_secret": "", "public_url": ""}
        if from_file is not None:
            base = {name: getattr(from_file, name) for name in
                    ("client_id", "client_secret", "public_url", "oauth_server", "chat", "language", "rules")}
        base.update(given)
        missing = [f"B24_APP_{name.upper()}" if name != "public_url" else "PUBLIC_URL"
                   for name in ("client_id", "client_secret", "public_url") if not base.get(name)]
        if missing:
            raise SettingsError(f"invalid configuration:\n  {', '.join(missing)}: required for the app (or "
                                "client_id, client_secret and public_url in the [app] table)")
        return AppSettings(**base)

    def portal_for_event(self, member_id: str | None, domain: str | None) -> Portal | None:
        """The portal an outgoing event comes from, by member_id, else by domain."""
        for portal in self._portals.values():
            if member_id and portal.member_id and member_id == portal.member_id:
                return portal
        for portal in self._portals.values():
            if domain and domain.lower() in {portal.domain_name.lower(), (portal.domain or "").lower()}:
                return portal
        return None

    def portal(self, name: str | None) -> Portal | None:
        """The portal by name; with no name, the only portal when exactly one is configured."""
        return pick_portal(self._portals, name)


def pick_portal(portals: dict[str, Portal], name: str | None) -> Portal | None:
    """The portal by name; with no name, the only portal when exactly one is configured."""
    if name is None:
        return next(iter(portals.values())) if len(portals) == 1 else None
    return portals.get(name)


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
    if settings.b24_portals_file:
        single = [name.upper() for name in SINGLE_PORTAL_FIELDS if getattr(settings, name)]
        if single:
            problems.append(f"B24_PORTALS_FILE and {', '.join(single)}: the portals file replaces the single-portal "
                            "variables; set one or the other, not both")
    if settings.b24_operating_margin >= settings.b24_operating_limit:
        problems.append("B24_OPERATING_MARGIN: must be less than B24_OPERATING_LIMIT")
    if settings.metrics_bind and settings.metrics_bind.rpartition(":")[2] == str(settings.port):
        problems.append("METRICS_BIND: must use another port than PORT (that listener serves /metrics only)")
    if settings.b24_webhook_url and not settings.b24_chat_id:
        problems.append("B24_CHAT_ID: required with B24_WEBHOOK_URL (the chat that receives the reports)")
    from jobs.policy import FAILURE_TTL, RECORD_OUTLIVES_FAILURE  # constants only (a leaf module)

    least_days = -(-(FAILURE_TTL + RECORD_OUTLIVES_FAILURE) // 86400)
    if settings.request_ttl_days < least_days:
        problems.append(f"REQUEST_TTL_DAYS: must be at least {least_days}: a failed job is kept "
                        f"{FAILURE_TTL // 86400} days for replay, and its request record must outlive it")
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    settings._build_portals()
    real = sorted(name for name, portal in settings.portals.items()
                  if not is_loopback(urlsplit(portal.base_url).hostname or ""))
    if settings.sandbox_mode and real:
        raise SettingsError(f"invalid configuration:\n  SANDBOX_MODE: only for a sandbox portal on this machine, "
                            f"but portal {real[0]!r} is not on a loopback host; unset SANDBOX_MODE")
    return settings


class RuleConfig(BaseModel):
    """One event rule: which event, what to read, when it matches, where the documents are."""

    model_config = ConfigDict(extra="forbid")

    event: str
    read: str
    params: dict[str, Any] = {}
    when: dict[str, str | int | list[str | int]] = {}
    documents_field: str | None = None
    documents_by: dict[str, str] | None = None
    reason: str = "{event} {id}"
    # How an installed portal delivers the event: "online" (a call per change) or "offline" (the portal
    # queues it; jobs.offline pulls, reserves and confirms the queue). Configured portals deliver online.
    delivery: Literal["online", "offline"] = "online"

    @field_validator("event")
    @classmethod
    def _event(cls, value: str) -> str:
        return value.strip().upper()

    @model_validator(mode="after")
    def _documents(self) -> RuleConfig:
        if (self.documents_field is None) == (self.documents_by is None):
            raise ValueError("give exactly one of documents_field or documents_by")
        if self.documents_by is not None and set(self.documents_by) != {"docNumber"}:
            raise ValueError("documents_by looks documents up by docNumber only: {docNumber = \"{field}\"}")
        return self


class PortalConfig(BaseModel):
    """One [portals.<name>] section of the portals file."""

    model_config = ConfigDict(extra="forbid")

    webhook_url: str | None = None
    # Or an OAuth app: its client_endpoint, credentials, the OAuth server and a first refresh token
    # (the service keeps the rotated tokens in Redis from then on).
    client_endpoint: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    refresh_token: str | None = None
    oauth_server: str = "https://oauth.bitrix.info/oauth/token/"
    chat: str
    application_token: str | None = None
    member_id: str | None = None
    domain: str | None = None
    plan: Literal["standard", "enterprise"] = "standard"
    language: Language = "en"
    mention: Mention = "responsible"
    robot_secret: str | None = None
    rules: list[RuleConfig] = []
    # Other chats a request for this portal may name in `chat` (the portal's own chat always may).
    chats: list[str] = []

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        return check_webhook_url(value) if value is not None else None

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        return check_language(value)

    @field_validator("client_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_endpoint_url(value) if value is not None else None

    @field_validator("oauth_server")
    @classmethod
    def _oauth_server(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
            raise ValueError("must be an https URL (plain http only for a loopback sandbox)")
        return value

    @field_validator("chat")
    @classmethod
    def _chat(cls, value: str) -> str:
        if not CHAT_ID.fullmatch(value):
            raise ValueError("must be a chat like chat42 (or sg42, or a user id)")
        return value

    @field_validator("chats")
    @classmethod
    def _chats(cls, value: list[str]) -> list[str]:
        return group_chats(value)

    @model_validator(mode="after")
    def _credentials(self) -> PortalConfig:
        if (self.webhook_url is None) == (self.client_endpoint is None):
            raise ValueError("give webhook_url, or client_endpoint with client_id, client_secret and "
                             "refresh_token (an OAuth app), not both")
        if self.client_endpoint and not (self.client_id and self.client_secret and self.refresh_token):
            raise ValueError("an OAuth app needs client_id, client_secret and refresh_token")
        return self

    def app(self) -> OAuthApp | None:
        """The OAuth app, when the portal is reached as one."""
        if not self.client_endpoint:
            return None
        return OAuthApp(client_endpoint=self.client_endpoint, client_id=self.client_id or "",
                        client_secret=self.client_secret or "", refresh_token=self.refresh_token or "",
                        server=self.oauth_server)


def group_chats(value: list[str]) -> list[str]:
    """Chats a request may name: group chats only (a bare user id would be a direct dialog)."""
    for chat in value:
        if not GROUP_CHAT.match(chat):
            raise ValueError(f"{chat!r} is not a group chat like chat42 or sg42 (a request may never name a "
                             "user's direct dialog)")
    return value


class CallerConfig(BaseModel):
    """One [callers.<name>] section of the portals file."""

    model_config = ConfigDict(extra="forbid")

    # The SHA-256 of the caller's API key (lowercase hex), or several while a key is rotated.
    key_sha256: str | list[str] = []
    # Standard Webhooks secrets (whsec_...), several while one is rotated; kept as given (verifying needs them).
    secret: str | list[str] = Field(default=[], repr=False)
    portals: list[str] = []
    chats: list[str] = []
    admin: bool = False

    @field_validator("key_sha256")
    @classmethod
    def _hashes(cls, value: str | list[str]) -> list[str]:
        hashes = [value] if isinstance(value, str) else value
        for item in hashes:
            if not KEY_SHA256.match(item):
                raise ValueError("must be the key's SHA-256 as 64 lowercase hex digits (flask --app app new-key "
                                 "NAME prints it)")
        return hashes

    @field_validator("secret")
    @classmethod
    def _secrets(cls, value: str | list[str]) -> list[str]:
        secrets = [value] if isinstance(value, str) else value
        for item in secrets:
            if not re.match(r"^whsec_[A-Za-z0-9+/]+={0,2}$", item):
                raise ValueError("each secret must be whsec_ followed by base64 (Standard Webhooks format)")
        return secrets

    @field_validator("chats")
    @classmethod
    def _chats(cls, value: list[str]) -> list[str]:
        return group_chats(value)

    @field_validator("portals")
    @classmethod
    def _portals(cls, value: list[str], info: ValidationInfo) -> list[str]:
        known = (info.context or {}).get("portals", ())
        unknown = [name for name in value if name not in known and name != "*"]
        if unknown:
            raise ValueError(f"no portal {unknown[0]!r} in this file (\"*\" means every portal)")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> CallerConfig:
        if not self.key_sha256 and not self.secret:
            raise ValueError("give key_sha256 (an API key's hash) or secret (whsec_..., Standard Webhooks)")
        return self


PORTAL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def portals_from_file(path: Path) -> tuple[dict[str, Portal], dict[str, Caller], AppSettings | None]:
    """Read the portals file (portals, callers and the app); raise SettingsError with one line per problem (never a
    secret value)."""
    where = f"B24_PORTALS_FILE ({path})"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"invalid configuration:\n  {where}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"invalid configuration:\n  {where}: not valid TOML (a name defined twice?): "
                            f"{exc}") from None
    problems: list[str] = []
    unknown = sorted(set(data) - {"portals", "callers", "app"})
    if unknown:
        problems.append(f"{where}: unknown top-level key {unknown[0]!r} (expected [portals.<name>], "
                        "[callers.<name>] and [app] sections)")
    app = app_from_file(data.get("app"), where, problems)
    sections = data.get("portals") or {}
    if not isinstance(sections, dict) or (not sections and "app" not in data):
        problems.append(f"{where}: no [portals.<name>] section (and no [app] table)")
        sections = {}
    portals: dict[str, Portal] = {}
    seen: dict[str, str] = {}
    for name, section in sections.items():
        if not PORTAL_NAME.match(name):
            problems.append(f"{where}: portal name {name!r} must be letters, digits, - or _")
            continue
        if name.lower() in seen:
            problems.append(f"{where}: portal {name!r} duplicates {seen[name.lower()]!r}")
            continue
        seen[name.lower()] = name
        try:
            config = PortalConfig.model_validate(section)
        except ValidationError as exc:
            for error in exc.errors():
                loc = ".".join(str(part) for part in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = "unknown key"
                problems.append(f"{where}: portals.{name}.{loc}: {message}")
            continue
        offline = [index for index, rule in enumerate(config.rules) if rule.delivery == "offline"]
        if offline:
            problems.append(f"{where}: portals.{name}.rules.{offline[0]}.delivery: \"offline\" needs the app "
                            "(an [[app.rules]] entry): a configured portal's events arrive online")
            continue
        portals[name] = Portal(
            name=name, webhook_url=config.webhook_url, chat=config.chat,
            application_token=config.application_token, robot_secret=config.robot_secret,
            language=config.language, plan=config.plan, member_id=config.member_id, domain=config.domain,
            rules=tuple(rule.model_dump() for rule in config.rules), oauth=config.app(),
            chats=frozenset(config.chats), mention=config.mention,
        )
    callers = callers_from_file(data.get("callers"), portals, where, problems)
    if problems:
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems))
    return portals, callers, app


class AppConfig(BaseModel):
    """The [app] table of the portals file: the service as a Bitrix24 app (any value may come from B24_APP_*)."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = ""
    client_secret: str = Field(default="", repr=False)
    public_url: str = ""
    oauth_server: str = DEFAULT_OAUTH_SERVER
    chat: str | None = None
    language: Language = "en"
    rules: list[RuleConfig] = []

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return check_public_url(value) if value else value

    @field_validator("oauth_server")
    @classmethod
    def _oauth_server(cls, value: str) -> str:
        return check_oauth_server(value)

    @field_validator("chat")
    @classmethod
    def _chat(cls, value: str | None) -> str | None:
        if value is not None and not GROUP_CHAT.match(value):
            raise ValueError("must be a group chat like chat42")
        return value


def app_from_file(section: Any, where: str, problems: list[str]) -> AppSettings | None:
    """The [app] table as the app's settings (credentials may still come from B24_APP_*)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        problems.append(f"{where}: app must be an [app] table")
        return None
    try:
        config = AppConfig.model_validate(section)
    except ValidationError as exc:
        for error in exc.errors():
            loc = ".".join(str(part) for part in error["loc"])
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: app.{loc}: {message}")
        return None
    return AppSettings(client_id=config.client_id, client_secret=config.client_secret, public_url=config.public_url,
                       oauth_server=config.oauth_server, chat=config.chat, language=config.language,
                       rules=tuple(rule.model_dump() for rule in config.rules))


def callers_from_file(sections: Any, portals: dict[str, Portal], where: str,
                      problems: list[str]) -> dict[str, Caller]:
    """The [callers.<name>] sections as callers; each problem appended as one line (never a secret)."""
    if sections is None:
        return {}
    if not isinstance(sections, dict):
        problems.append(f"{where}: callers must be [callers.<name>] sections")
        return {}
    callers: dict[str, Caller] = {}
    owners: dict[str, str] = {}  # key hash or secret -> caller name, so no credential names two callers
    for name, section in sections.items():
        if not PORTAL_NAME.match(name):
            problems.append(f"{where}: caller name {name!r} must be letters, digits, - or _")
            continue
        if name in RESERVED_CALLERS:
            problems.append(f"{where}: caller name {name!r} is reserved (the service gives it itself)")
            continue
        try:
            config = CallerConfig.model_validate(section, context={"portals": portals})
        except ValidationError as exc:
            for error in exc.errors():
                loc = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = "unknown key"
                problems.append(f"{where}: callers.{name}.{loc}: {message}")
            continue
        hashes, secrets = list(config.key_sha256), list(config.secret)
        for index, credential in enumerate([*hashes, *secrets]):
            kind = "key_sha256" if index < len(hashes) else "secret"
            if credential in owners:
                problems.append(f"{where}: callers.{name}.{kind}: the same credential is given to caller "
                                f"{owners[credential]!r}")
            owners[credential] = name
        callers[name] = Caller(
            name=name, key_hashes=tuple(hashes), secrets=tuple(secrets),
            portals=None if "*" in config.portals else frozenset(config.portals), chats=frozenset(config.chats),
            admin=config.admin)
    return callers
