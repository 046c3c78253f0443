"""OAuth app mode: issued token pairs, their check on /rest calls, and the refresh endpoint."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, request
from werkzeug.wrappers import Response

from sandbox.config import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, WEBHOOK_USER_ID
from sandbox.jsonutil import json_response

if TYPE_CHECKING:
    from sandbox.state import Portal

# The name fault rules give the token endpoint (`{"kind": "drop", "method": "oauth.token"}`).
OAUTH_METHOD = "oauth.token"
# Refresh tokens live 180 days in Bitrix24 OAuth.
REFRESH_TOKEN_LIFETIME = 180 * 24 * 3600
# Application status in token answers: "L" = local application.
APP_STATUS = "L"
# A refresh answer comes from the OAuth server, and its `domain` is that server's, not the portal's
# (the docs: `domain` = oauth.bitrix.info); the portal's address is `client_endpoint`.
OAUTH_SERVER_DOMAIN = "oauth.bitrix.info"

bp = Blueprint("oauth", __name__)


@dataclass
class _Refresh:
    expires_at: float
    used: bool = False


class TokenStore:
    """Access tokens with their expiry, and refresh tokens that can be used once."""

    def __init__(self) -> None:
        self.access: dict[str, float] = {}
        self.refresh: dict[str, _Refresh] = {}

    def issue(self, lifetime: int, now: float) -> tuple[str, str]:
        """A new (access, refresh) pair; the access token lives `lifetime` seconds."""
        access = secrets.token_hex(32)
        refresh = secrets.token_hex(32)
        self.access[access] = now + lifetime
        self.refresh[refresh] = _Refresh(now + REFRESH_TOKEN_LIFETIME)
        return access, refresh

    def check(self, token: str, now: float) -> str | None:
        """None if the access token is valid, else the Bitrix24 error code for it."""
        expires_at = self.access.get(token)
        if expires_at is None:
            return "invalid_token"
        if now >= expires_at:
            return "expired_token"
        return None

    def use_refresh(self, token: str, now: float) -> bool:
        """Spend a refresh token; False if unknown, used or expired."""
        entry = self.refresh.get(token)
        if entry is None or entry.used or now >= entry.expires_at:
            return False
        entry.used = True
        return True


def token_answer(portal: Portal, access: str, refresh: str, lifetime: int, now: float) -> dict[str, Any]:
    """The documented fields of a token answer from the OAuth server."""
    config = portal.config
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires": int(now + lifetime),
        "expires_in": lifetime,
        "client_endpoint": config.client_endpoint,
        "server_endpoint": config.server_endpoint,
        "domain": config.domain,
        "member_id": config.member_id,
        "scope": ",".join(portal.permissions.scopes),
        "status": APP_STATUS,
        "user_id": WEBHOOK_USER_ID,
    }


def _oauth_error(code: str, description: str, status: int) -> Response:
    return json_response({"error": code, "error_description": description}, status)


@bp.route("/oauth/token/", methods=["GET", "POST"])
@bp.route("/oauth/token", methods=["GET", "POST"])
def refresh_token() -> Response:
    """`GET /oauth/token/?grant_type=refresh_token&...`: rotate both tokens (not rate limited)."""
    portal: Portal = current_app.config["PORTAL"]
    args = request.values
    grant_type = args.get("grant_type", "")
    with portal.lock:
        rule = portal.faults.pick({OAUTH_METHOD}, named_only=True)
    kind = rule.kind if rule else None
    if kind == "drop":
        return _drop(request)
    if kind == "error500":
        return _oauth_error("server_error", "Internal server error", 500)
    if kind == "slow" and rule and rule.seconds:
        time.sleep(rule.seconds)
    with portal.lock:
        portal.stats["oauth_refreshes"] += 1
        if grant_type != "refresh_token":
            portal.stats["oauth_refresh_errors"] += 1
            return _oauth_error("invalid_request", "Only grant_type=refresh_token is supported here", 400)
        if args.get("client_id") != OAUTH_CLIENT_ID or args.get("client_secret") != OAUTH_CLIENT_SECRET:
            portal.stats["oauth_refresh_errors"] += 1
            return _oauth_error("invalid_client", "Invalid client", 401)
        now = time.time()
        if not portal.tokens.use_refresh(args.get("refresh_token", ""), now):
            portal.stats["oauth_refresh_errors"] += 1
            return _oauth_error("invalid_grant", "Invalid grant", 400)
        lifetime = portal.config.token_lifetime
        access, refresh = portal.tokens.issue(lifetime, now)
        answer = token_answer(portal, access, refresh, lifetime, now)
        answer["domain"] = OAUTH_SERVER_DOMAIN
    if kind == "applied_then_timeout":
        # The old refresh token is spent and the new pair issued, but the client never gets it.
        time.sleep(rule.seconds if rule and rule.seconds else 0)
        return _drop(request)
    if kind == "late" and rule and rule.seconds:
        time.sleep(rule.seconds)  # the pair is issued and the old token spent; the answer is only late
    return json_response(answer)


def _drop(req: Any) -> Response:
    # Imported here: sandbox.rest imports the portal state, which imports this module.
    from sandbox.rest import _drop_connection

    return _drop_connection(req)
