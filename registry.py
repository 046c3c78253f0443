"""The portal registry: configured portals (environment, portals file) and portals that installed the app.

An installed portal is stored in Redis by its `member_id` (domain, client_endpoint, application token, chat)
and its OAuth tokens in the same hash the refresh uses (bitrix24/auth.py). Every process reads installed
portals from Redis when it needs one, so an install or an uninstall takes effect everywhere at once, without
a restart. Intake, workers, the limiter and the reports look portals up here, configured and installed alike.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

import redis

from settings import LANGUAGES, AppSettings, OAuthApp, Portal, Settings, pick_portal

PORTAL_KEY = "b24c:app:portal:"
PORTALS_SET = "b24c:app:portals"
GONE_KEY = "b24c:app:gone:"
# How long an uninstalled portal's name is remembered, so its requests end "app uninstalled" rather than
# "not configured": as long as a request record may still run a job (REQUEST_TTL_DAYS at most).
GONE_TTL = 30 * 86400
# An installed portal's name: the prefix and its member_id (Bitrix24: 32 hex digits).
INSTALLED_PREFIX = "app-"
MEMBER_ID = re.compile(r"[0-9A-Za-z]{8,60}", re.ASCII)
UNINSTALLED = "app uninstalled"


def portal_key(member_id: str) -> str:
    """The Redis hash of an installed portal."""
    return PORTAL_KEY + member_id


def installed_name(member_id: str) -> str:
    """The name an installed portal goes by in requests, metrics and logs."""
    return INSTALLED_PREFIX + member_id


def member_of(name: str) -> str | None:
    """The member_id behind an installed portal's name, or None for a configured portal's name."""
    if not name.startswith(INSTALLED_PREFIX):
        return None
    member_id = name[len(INSTALLED_PREFIX):]
    return member_id if MEMBER_ID.fullmatch(member_id) else None


def token_sha(token: str) -> str:
    """The SHA-256 of an application token, as stored (the token itself is compared in constant time)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def portal_from_hash(app: AppSettings, fields: dict[str, str]) -> Portal:
    """The Portal an installed portal's stored fields describe."""
    member_id = fields["member_id"]
    endpoint = fields["client_endpoint"]
    oauth = OAuthApp(client_endpoint=endpoint, client_id=app.client_id, client_secret=app.client_secret,
                     refresh_token="", server=app.token_url(endpoint), installed=True)
    language = fields.get("language") if fields.get("language") in LANGUAGES else app.language
    return Portal(name=installed_name(member_id), webhook_url=None, chat=fields.get("chat") or app.chat or "",
                  application_token=fields.get("application_token"), language=language,  # type: ignore[arg-type]
                  member_id=member_id, domain=fields.get("domain"), rules=app.rules, oauth=oauth, installed=True,
                  setup=fields.get("setup", ""))


class Registry:
    """Portals by name: the configured ones from the settings, the installed ones from Redis."""

    def __init__(self, settings: Settings, conn: redis.Redis) -> None:
        self.settings = settings
        self.conn = conn

    def portal(self, name: str | None) -> Portal | None:
        """The portal by name; with no name, the only configured portal when exactly one is configured."""
        found = pick_portal(self.settings.portals, name)
        if found is not None or name is None:
            return found
        member_id = member_of(name)
        return self.installed(member_id) if member_id else None

    def installed(self, member_id: str) -> Portal | None:
        """The installed portal with this member_id, or None (not installed, or no app configured)."""
        app = self.settings.app
        if app is None or not MEMBER_ID.fullmatch(member_id or ""):
            return None
        raw = self.conn.hgetall(portal_key(member_id))
        if not raw:
            return None
        return portal_from_hash(app, {_text(k): _text(v) for k, v in raw.items()})

    def installed_all(self) -> dict[str, Portal]:
        """Every installed portal by name (one round trip for the set, one pipeline for the hashes)."""
        app = self.settings.app
        if app is None:
            return {}
        members = sorted(_text(m) for m in self.conn.smembers(PORTALS_SET))
        pipe = self.conn.pipeline(transaction=False)
        for member_id in members:
            pipe.hgetall(portal_key(member_id))
        found: dict[str, Portal] = {}
        for raw in pipe.execute():
            if raw:
                portal = portal_from_hash(app, {_text(k): _text(v) for k, v in raw.items()})
                found[portal.name] = portal
        return found

    def all(self) -> dict[str, Portal]:
        """Configured and installed portals by name."""
        return {**self.settings.portals, **self.installed_all()}

    def for_event(self, member_id: str | None, domain: str | None) -> Portal | None:
        """The portal an event comes from: a configured one (by member_id, else domain), else an installed one."""
        portal = self.settings.portal_for_event(member_id, domain)
        if portal is None and member_id and self.settings.app is not None:
            portal = self.installed(member_id)
        return portal

    def gone(self, name: str) -> bool:
        """Whether this installed portal's app was uninstalled (its requests end `app uninstalled`)."""
        member_id = member_of(name)
        return bool(member_id and self.conn.exists(GONE_KEY + member_id))


def install(conn: redis.Redis, member_id: str, fields: dict[Any, Any], tokens: dict[Any, Any],
            token_key: str) -> None:
    """Store an installed portal and its token pair in one transaction (a reinstall replaces both)."""
    pipe = conn.pipeline(transaction=True)
    pipe.delete(portal_key(member_id), token_key)
    stored: dict[Any, Any] = {**fields, "member_id": member_id, "installed_at": f"{time.time():.3f}"}
    pipe.hset(portal_key(member_id), mapping=stored)
    pipe.hset(token_key, mapping=tokens)
    pipe.sadd(PORTALS_SET, member_id)
    pipe.delete(GONE_KEY + member_id)
    pipe.execute()


def uninstall(conn: redis.Redis, member_id: str, token_key: str, extra_keys: list[str]) -> None:
    """Forget an installed portal and its tokens in one transaction, leaving a tombstone for its requests."""
    pipe = conn.pipeline(transaction=True)
    pipe.delete(portal_key(member_id), token_key, *extra_keys)
    pipe.srem(PORTALS_SET, member_id)
    pipe.set(GONE_KEY + member_id, json.dumps({"at": time.time()}), ex=GONE_TTL)
    pipe.execute()


def same_token(given: str, stored: str | None) -> bool:
    """Whether an application token matches the stored one (constant time; never with nothing stored)."""
    return bool(stored) and hmac.compare_digest(given.encode(), (stored or "").encode())


def save_fields(conn: redis.Redis, member_id: str, **fields: str) -> bool:
    """Update fields of an installed portal while it is installed (an uninstall meanwhile wins)."""
    return bool(conn.eval("""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
""", 1, portal_key(member_id), *[part for item in fields.items() for part in item]))
