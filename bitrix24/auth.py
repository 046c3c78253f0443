"""OAuth tokens of a Bitrix24 app, kept in Redis and refreshed single-flight across every worker.

Bitrix24 rotates refresh tokens: each refresh voids the one it used. Workers that refresh on their own
void each other's tokens (one b24pysdk client sent 7 refreshes from 8 threads). Here one process per
portal refreshes, under a Redis lock; the others wait and read the new pair from Redis. Tokens are
refreshed on demand, on `expired_token`, as Bitrix24's docs ask, never on a schedule.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

import httpx
import redis

from bitrix24.errors import Bitrix24Error, classify
from settings import OAuthApp

log = logging.getLogger("b24cancel.bitrix24")

KEY_PREFIX = "b24c:oauth:"
# Longest a refresh may hold the lock: an OAuth call with the client's timeouts, with room to spare.
LOCK_SECONDS = 15.0
# The refresh call's own timeouts: well inside the lock, so no second process refreshes meanwhile.
REFRESH_TIMEOUT = httpx.Timeout(8.0, connect=3.0)
# How often a process waiting for another's refresh looks for the new pair.
WAIT_POLL = 0.05
# Release the lock only if it is still ours (it may have expired and been taken by another process).
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class OAuthTokens:
    """The current access token of one portal's app, shared by every process through Redis."""

    def __init__(self, conn: redis.Redis, portal: str, app: OAuthApp, http: httpx.Client) -> None:
        self.conn = conn
        self.portal = portal
        self.app = app
        self.http = http
        self.key = f"{KEY_PREFIX}{{{portal}}}"
        self.lock_key = f"{self.key}:lock"
        self._release = conn.register_script(RELEASE_LUA)

    def access_token(self) -> str:
        """The stored access token; the first call ever for a portal refreshes to get one."""
        token = self._stored("access_token")
        return token if token else self.refresh(stale=None)

    def refresh(self, stale: str | None) -> str:
        """A fresh access token, after `stale` was refused: refresh once per portal, whoever asks."""
        deadline = time.monotonic() + LOCK_SECONDS * 2
        while time.monotonic() < deadline:
            current = self._stored("access_token")
            if current and current != stale:
                return current  # another process refreshed already
            owner = uuid.uuid4().hex
            if self.conn.set(self.lock_key, owner, nx=True, px=int(LOCK_SECONDS * 1000)):
                try:
                    current = self._stored("access_token")
                    if current and current != stale:
                        return current
                    return self._refresh_now()
                finally:
                    self._release(keys=[self.lock_key], args=[owner])
            time.sleep(WAIT_POLL)
        raise Bitrix24Error("OAUTH_REFRESH_TIMEOUT", "another process held the refresh lock too long", None,
                            "oauth.refresh", retryable=True)

    def _stored(self, name: str) -> str | None:
        value = self.conn.hget(self.key, name)
        return value.decode() if isinstance(value, bytes) else value

    def _refresh_now(self) -> str:
        """Call the OAuth server with the stored refresh token and store the new pair atomically."""
        # The configured token seeds Redis; a new one in the configuration (the app was re-installed) wins.
        seed = hashlib.sha256(self.app.refresh_token.encode()).hexdigest()[:16]
        stored = self._stored("refresh_token") if self._stored("seed") == seed else None
        refresh_token = stored or self.app.refresh_token
        params = {"grant_type": "refresh_token", "client_id": self.app.client_id,
                  "client_secret": self.app.client_secret, "refresh_token": refresh_token}
        try:
            response = self.http.get(self.app.server, params=params, timeout=REFRESH_TIMEOUT)
            body = response.json()
        except (httpx.TransportError, ValueError) as exc:
            raise Bitrix24Error("OAUTH_UNREACHABLE", type(exc).__name__, None, "oauth.refresh",
                                retryable=True, ambiguous=True) from None
        if not isinstance(body, dict) or "access_token" not in body or "refresh_token" not in body:
            body = body if isinstance(body, dict) else {}
            raise classify(str(body.get("error", "BAD_ANSWER")), str(body.get("error_description", "")),
                           response.status_code, "oauth.refresh")
        self.conn.hset(self.key, mapping={"access_token": body["access_token"],
                                          "refresh_token": body["refresh_token"],
                                          "expires": str(body.get("expires", "")), "seed": seed,
                                          "refreshed_at": f"{time.time():.3f}"})
        log.info("oauth tokens refreshed", extra={"portal": self.portal})
        return str(body["access_token"])
