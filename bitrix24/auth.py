"""OAuth tokens of a Bitrix24 app, kept in Redis and refreshed single-flight across every worker.

Bitrix24 rotates refresh tokens: each refresh voids the one it used. Workers that refresh on their own
void each other's tokens (one b24pysdk client sent 7 refreshes from 8 threads). Here one process per
portal refreshes, under a Redis lock; the others wait and read the new pair from Redis. Tokens are
refreshed on demand, on `expired_token`, as Bitrix24's docs ask, never on a schedule.

Three guards on top of the lock:
- **Fencing.** The stored pair carries `fence`, a hash of its refresh token. A refresher stores its new pair
  only if the fence is still the one of the token it used (compare-and-set in Lua), so a refresher whose lock
  expired, or a pair older than one an event brought meanwhile, never overwrites a newer pair.
- **One deadline.** A refresh, its HTTP call included, ends within REFRESH_DEADLINE, well inside the lock.
- **Lost answers.** If the OAuth server rotated the token but its answer never arrived, the stored refresh token
  is void. App events and robot calls carry fresh tokens (`auth[access_token]`, sometimes
  `auth[refresh_token]`); the intake offers them here (`offer_tokens`) and they are kept when they expire
  later than the stored ones. Without such tokens the refresh ends in one permanent error saying what a
  person must do, and the void token is remembered so that no job keeps asking the OAuth server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping

import httpx
import redis

from bitrix24.errors import Bitrix24Error, classify
from settings import OAuthApp

log = logging.getLogger("b24cancel.bitrix24")

KEY_PREFIX = "b24c:oauth:"
# Longest a refresh may hold the lock; a holder that dies releases it by expiry.
LOCK_SECONDS = 15.0
# One refresh, from taking the lock to storing the pair, HTTP included: well inside the lock, so no second
# process refreshes meanwhile (and if one did, the fence keeps the older pair out).
REFRESH_DEADLINE = 10.0
# The OAuth call's connect timeout (within the deadline): the OAuth server answers in milliseconds.
CONNECT_TIMEOUT = 3.0
# Largest OAuth answer we read (a token answer is under 1 KiB).
MAX_ANSWER_BYTES = 64 * 1024
# How often a process waiting for another's refresh looks for the new pair.
WAIT_POLL = 0.05
# The code of the permanent error when the stored refresh token is void and nothing newer came in.
TOKEN_LOST = "OAUTH_TOKEN_LOST"
# The code of the permanent error when an installed portal's tokens are gone: the app was uninstalled there.
APP_UNINSTALLED = "APP_UNINSTALLED"
# What the permanent error says (errors.ADVICE[TOKEN_LOST] says what a person must do).
LOST_DESCRIPTION = ("the app's refresh token was refused (a refresh answer was lost, or the app was reinstalled) "
                    "and no newer token has arrived with an app event or robot call")

# Release the lock only if it is still ours (it may have expired and been taken by another process).
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Store a refreshed pair only if the stored pair is still the one the refresh used: its fence matches, or the
# stored pair came from an older configuration (its seed differs) and the configured token was used.
# KEYS[1] tokens; ARGV[1] fence used, ARGV[2] seed, ARGV[3] 1 if the configured token was used, ARGV[4] fields (JSON)
STORE_REFRESHED_LUA = """
local fence = redis.call('HGET', KEYS[1], 'fence')
local seed = redis.call('HGET', KEYS[1], 'seed')
if fence ~= ARGV[1] and not (ARGV[3] == '1' and seed ~= ARGV[2]) then
  return 0
end
local fields = cjson.decode(ARGV[4])
for name, value in pairs(fields) do
  redis.call('HSET', KEYS[1], name, value)
end
redis.call('HDEL', KEYS[1], 'void')
return 1
"""
# Keep tokens from an event or robot call if they expire later than the stored ones (and, when both name a
# user, belong to the same user). KEYS[1] tokens; ARGV[1] access, ARGV[2] expires, ARGV[3] refresh or '',
# ARGV[4] its fence, ARGV[5] seed, ARGV[6] user id or '', ARGV[7] now, ARGV[8] '1' for an installed portal
# (its pair exists only while the app is installed: an offer never brings an uninstalled portal back)
OFFER_LUA = """
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'expires') or '') or 0
if tonumber(ARGV[2]) <= stored then
  return 0
end
local user = redis.call('HGET', KEYS[1], 'user_id')
if user and user ~= '' and ARGV[6] ~= '' and user ~= ARGV[6] then
  return -1
end
redis.call('HSET', KEYS[1], 'access_token', ARGV[1], 'expires', ARGV[2], 'refreshed_at', ARGV[7], 'source', 'event')
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'refresh_token', ARGV[3], 'fence', ARGV[4], 'seed', ARGV[5])
  redis.call('HDEL', KEYS[1], 'void')
end
return 1
"""


def token_key(portal: str) -> str:
    """The Redis hash that holds a portal's app tokens."""
    return f"{KEY_PREFIX}{{{portal}}}"


def fingerprint(token: str) -> str:
    """A short hash of a token: the fence and the seed are compared, never the tokens themselves."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class OAuthTokens:
    """The current access token of one portal's app, shared by every process through Redis."""

    def __init__(self, conn: redis.Redis, portal: str, app: OAuthApp, http: httpx.Client) -> None:
        self.conn = conn
        self.portal = portal
        self.app = app
        self.http = http
        self.key = token_key(portal)
        self.lock_key = f"{self.key}:lock"
        self.seed = fingerprint(app.refresh_token)
        self._release = conn.register_script(RELEASE_LUA)
        self._store = conn.register_script(STORE_REFRESHED_LUA)

    def access_token(self) -> str:
        """The stored access token; the first call ever for a portal refreshes to get one.

        An installed portal's tokens exist only while the app is installed: none means uninstalled, and no
        call goes out (read before every send, so a job running through an uninstall stops at its next call).
        """
        token = _text(self.conn.hget(self.key, "access_token"))
        if not token and self.app.installed:
            raise self._uninstalled()
        return token if token else self.refresh(stale=None)

    def refresh(self, stale: str | None) -> str:
        """A fresh access token, after `stale` was refused: refresh once per portal, whoever asks."""
        give_up = time.monotonic() + LOCK_SECONDS + REFRESH_DEADLINE
        while time.monotonic() < give_up:
            current = _text(self.conn.hget(self.key, "access_token"))
            if current and current != stale:
                return current  # another process refreshed already, or an event brought a newer token
            owner = uuid.uuid4().hex
            if self.conn.set(self.lock_key, owner, nx=True, px=int(LOCK_SECONDS * 1000)):
                deadline = time.monotonic() + REFRESH_DEADLINE
                try:
                    current = _text(self.conn.hget(self.key, "access_token"))
                    if current and current != stale:
                        return current
                    return self._refresh_now(deadline)
                finally:
                    self._release(keys=[self.lock_key], args=[owner])
            time.sleep(WAIT_POLL)
        raise Bitrix24Error("OAUTH_REFRESH_TIMEOUT", "another process held the refresh lock too long", None,
                            "oauth.refresh", retryable=True)

    def _refresh_now(self, deadline: float) -> str:
        """Call the OAuth server with the stored refresh token; store the new pair if no newer one came meanwhile."""
        stored = {_text(k): _text(v) for k, v in self.conn.hgetall(self.key).items()}
        if self.app.installed and not stored.get("refresh_token"):
            raise self._uninstalled()
        # The configured token seeds Redis; a new one in the configuration (the app was re-installed) wins.
        # An installed portal has no configured token: its pair comes from the install and lives in Redis only.
        from_config = not self.app.installed and (stored.get("seed") != self.seed or not stored.get("refresh_token"))
        refresh_token = self.app.refresh_token if from_config else str(stored["refresh_token"])
        fence = fingerprint(refresh_token)
        if stored.get("void") == fence:
            raise self._lost()  # this token was refused before: asking again only hammers the OAuth server
        body, status = self._call(refresh_token, deadline)
        if "access_token" not in body or "refresh_token" not in body:
            code = str(body.get("error", "BAD_ANSWER"))
            if code == "invalid_grant":
                return self._after_refusal(fence)
            raise classify(code, str(body.get("error_description", "")), status, "oauth.refresh")
        fields = {"access_token": str(body["access_token"]), "refresh_token": str(body["refresh_token"]),
                  "fence": fingerprint(str(body["refresh_token"])), "expires": str(body.get("expires", "")),
                  "user_id": str(body.get("user_id", "")), "seed": self.seed,
                  "refreshed_at": f"{time.time():.3f}", "source": "refresh"}
        stored_now = self._store(keys=[self.key], args=[fence, self.seed, "1" if from_config else "0",
                                                        json.dumps(fields)])
        if not stored_now:
            # A newer pair arrived while we refreshed (an event, or a refresher whose lock had expired): keep it.
            log.warning("oauth refresh answer older than the stored pair; not stored", extra={"portal": self.portal})
            current = _text(self.conn.hget(self.key, "access_token"))
            return current or fields["access_token"]
        log.info("oauth tokens refreshed", extra={"portal": self.portal})
        return fields["access_token"]

    def _call(self, refresh_token: str, deadline: float) -> tuple[dict[str, object], int]:
        """GET the OAuth server's token endpoint, all of it within `deadline` (monotonic time)."""
        params = {"grant_type": "refresh_token", "client_id": self.app.client_id,
                  "client_secret": self.app.client_secret, "refresh_token": refresh_token}
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._unreachable("deadline passed before the call")
        timeout = httpx.Timeout(left, connect=min(CONNECT_TIMEOUT, left))
        try:
            with self.http.stream("GET", self.app.server, params=params, timeout=timeout) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    # A trickling or endless answer must not hold the lock past the deadline.
                    if time.monotonic() > deadline or size > MAX_ANSWER_BYTES:
                        raise self._unreachable("the answer took longer than the refresh deadline")
                body = json.loads(b"".join(chunks))
        except (httpx.TransportError, ValueError) as exc:
            raise self._unreachable(type(exc).__name__) from None
        return (body if isinstance(body, dict) else {}), response.status_code

    def _after_refusal(self, fence: str) -> str:
        """The OAuth server refused the stored refresh token: use a newer pair if one came in, else give up."""
        stored = {_text(k): _text(v) for k, v in self.conn.hgetall(self.key).items()}
        if stored.get("fence") not in (None, fence) and stored.get("access_token"):
            return str(stored["access_token"])  # an event brought tokens while we asked
        self.conn.hset(self.key, "void", fence)
        log.error("oauth refresh token refused and nothing newer stored", extra={"portal": self.portal})
        raise self._lost()

    @staticmethod
    def _unreachable(description: str) -> Bitrix24Error:
        # The server may have rotated the token before the answer was lost: the next try may find it void.
        return Bitrix24Error("OAUTH_UNREACHABLE", description, None, "oauth.refresh", retryable=True, ambiguous=True)

    @staticmethod
    def _uninstalled() -> Bitrix24Error:
        return Bitrix24Error(APP_UNINSTALLED, "app uninstalled: the portal removed the app and its tokens are "
                             "deleted", None, "oauth.token")

    @staticmethod
    def _lost() -> Bitrix24Error:
        return Bitrix24Error(TOKEN_LOST, LOST_DESCRIPTION, None, "oauth.refresh")


def offer_tokens(conn: redis.Redis, portal: str, app: OAuthApp, form: Mapping[str, str]) -> bool:
    """Keep the tokens an authenticated app event or robot call carried, if they expire later than ours.

    `form` is the call's form: `auth[access_token]`, `auth[expires]` (or `auth[expires_in]`), and where sent
    `auth[refresh_token]` and `auth[user_id]`. One Redis round trip; returns whether they were stored.
    """
    access = form.get("auth[access_token]") or ""
    expires = form.get("auth[expires]") or ""
    lifetime = form.get("auth[expires_in]") or ""
    if not expires and lifetime.isdigit():
        expires = str(int(time.time()) + int(lifetime))
    if not access or not expires.isdigit():
        return False
    refresh = form.get("auth[refresh_token]") or ""
    result = conn.register_script(OFFER_LUA)(
        keys=[token_key(portal)],
        args=[access, expires, refresh, fingerprint(refresh) if refresh else "", fingerprint(app.refresh_token),
              form.get("auth[user_id]") or "", f"{time.time():.3f}", "1" if app.installed else "0"])
    if result == -1:
        log.warning("event tokens of another user not stored", extra={"portal": portal})
    elif result == 1:
        log.info("oauth tokens taken from an event", extra={"portal": portal})
    return bool(result == 1)
