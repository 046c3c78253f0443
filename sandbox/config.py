"""Start-up configuration of the sandbox portal, and the defaults that make it look like Bitrix24 cloud."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from datetime import timedelta, timezone
from typing import Any

# Request-rate limits from the Bitrix24 limits page (leak rate per second, bucket size).
PLAN_LIMITS: dict[str, tuple[float, int]] = {
    "standard": (2.0, 50),
    "enterprise": (5.0, 250),
}

# Operating-time budget per method: 480 s per 10-minute window in the older cloud docs
# (the current docs leave the value to configuration; on-prem defaults to 420 s).
DEFAULT_OPERATING_LIMIT = 480.0
DEFAULT_OPERATING_WINDOW = 600.0

# Access tokens live one hour in Bitrix24 OAuth.
DEFAULT_TOKEN_LIFETIME = 3600

DEFAULT_APPLICATION_TOKEN = "sandbox-app-token"
# A fixed 32-hex-digit member_id, the shape Bitrix24 uses for a portal's identity.
DEFAULT_MEMBER_ID = "5a4d1b0c9e8f7a6b5c4d3e2f1a0b9c8d"

# The scopes the sandbox's incoming webhook was "created" with.
DEFAULT_SCOPES = ["catalog", "im", "crm", "sale"]

OAUTH_CLIENT_ID = "sandbox-client"
OAUTH_CLIENT_SECRET = "sandbox-secret"

# The one valid incoming webhook: /rest/1/sandbox/<method>.
WEBHOOK_USER_ID = 1
WEBHOOK_CODE = "sandbox"

# Portal time zone used in every date string: Moscow time, the usual zone of Russian-language
# cloud portals, so that clients meet a non-UTC offset as they would on a real portal.
PORTAL_TZ = timezone(timedelta(hours=3))

# Simulated execution time per method, in seconds. It is accounted in `time` and in the
# operating budget but never slept. Values follow what real portals report (a cancel is ~0.3 s).
DEFAULT_DURATIONS: dict[str, float] = {
    "catalog.document.cancel": 0.3,
    "catalog.document.conduct": 0.3,
    "catalog.document.unconfirm": 0.3,
    "catalog.document.confirm": 0.3,
    "catalog.document.cancelList": 0.6,
    "catalog.document.conductList": 0.6,
    "catalog.document.add": 0.15,
    "catalog.document.list": 0.05,
    "catalog.document.getFields": 0.02,
    "catalog.document.fields": 0.02,
    "catalog.document.mode.status": 0.01,
    "im.message.add": 0.05,
    "im.dialog.messages.get": 0.03,
    "im.dialog.get": 0.01,
    "crm.item.get": 0.05,
    "sale.shipment.get": 0.05,
    "scope": 0.0,
    "profile": 0.0,
    "server.time": 0.0,
    "batch": 0.0,
}

LANGUAGES = ("en", "ru")
CANCELLED_STATUSES = ("C", "N")


@dataclass
class Config:
    """Everything `python -m sandbox` was started with; `/_sandbox/config` changes a copy at run time."""

    host: str = "127.0.0.1"
    port: int = 8765
    documents: int = 20
    plan: str = "standard"
    language: str = "en"
    rate: float = PLAN_LIMITS["standard"][0]
    burst: int = PLAN_LIMITS["standard"][1]
    operating_limit: float = DEFAULT_OPERATING_LIMIT
    operating_window: float = DEFAULT_OPERATING_WINDOW
    seed: int = 1
    durations: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DURATIONS))
    cancelled_status: str = "C"
    latency: float = 0.0
    error_rate: float = 0.0
    drop_rate: float = 0.0
    # Fault rules (as POST /_sandbox/faults takes them) added at start and at every reset.
    faults: list[dict[str, Any]] = field(default_factory=list)
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME
    application_token: str = DEFAULT_APPLICATION_TOKEN
    member_id: str = DEFAULT_MEMBER_ID
    scopes: list[str] = field(default_factory=lambda: list(DEFAULT_SCOPES))
    # The plan has rest_offline_extended: event.offline.get with clear=0 reserves (else it is refused).
    offline_reserve: bool = True

    @property
    def domain(self) -> str:
        """The portal's domain as Bitrix24 reports it (host:port here)."""
        return f"{self.host}:{self.port}"

    @property
    def root_url(self) -> str:
        """The sandbox's own root URL."""
        return f"http://{self.domain}"

    @property
    def webhook_url(self) -> str:
        """The incoming-webhook base URL a client appends method names to."""
        return f"{self.root_url}/rest/{WEBHOOK_USER_ID}/{WEBHOOK_CODE}/"

    @property
    def client_endpoint(self) -> str:
        """The REST base URL for OAuth calls (`client_endpoint` in Bitrix24 payloads)."""
        return f"{self.root_url}/rest/"

    @property
    def server_endpoint(self) -> str:
        """The OAuth server base URL; its `token/` path refreshes tokens."""
        return f"{self.root_url}/oauth/"

    def duration(self, method: str) -> float:
        """The simulated duration of one call to `method`."""
        return self.durations.get(method, 0.0)

    def copy(self) -> Config:
        """A deep copy, so run-time changes never touch the start-up configuration."""
        return copy.deepcopy(self)

    def public(self) -> dict[str, Any]:
        """The configuration as JSON for `/_sandbox/config`."""
        data = asdict(self)
        data["webhook_url"] = self.webhook_url
        return data
