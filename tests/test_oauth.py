"""A portal reached as an OAuth app: tokens in Redis, refreshed single-flight by several real workers."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import devenv
from app import create_app
from bitrix24 import auth
from bitrix24.auth import OAuthTokens, offer_tokens, token_key
from bitrix24.errors import Bitrix24Error
from jobs import records
from settings import OAuthApp
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

TOKEN_LIFETIME = 2  # seconds: short, so the test sees tokens expire under load
WORKERS = 3


def test_expired_tokens_are_refreshed_once_per_expiry_across_workers(
        sandbox_factory: Callable[..., devenv.Process], redis_proc: devenv.Process, tmp_path: Path) -> None:
    sandbox = sandbox_factory("--documents", "40", "--durations-zero", "--rate", "1000", "--burst", "1000",
                              "--token-lifetime", str(TOKEN_LIFETIME))
    portal = SandboxView(sandbox.url)
    app_tokens = portal.http.post("/_sandbox/oauth/tokens", json={"lifetime": TOKEN_LIFETIME}).json()
    redis.Redis.from_url(redis_proc.url).flushdb()
    portals = tmp_path / "portals.toml"
    portals.write_text(textwrap.dedent(f"""
        [portals.app]
        client_endpoint = "{app_tokens['client_endpoint']}"
        oauth_server = "{sandbox.url}/oauth/token/"
        client_id = "{app_tokens['client_id']}"
        client_secret = "{app_tokens['client_secret']}"
        refresh_token = "{app_tokens['refresh_token']}"
        chat = "chat1"
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
    env.update({"REDIS_URL": redis_proc.url, "B24_PORTALS_FILE": str(portals), "B24_RATE_LIMIT": "1000",
                "B24_RATE_BURST": "1000"})
    logs = [tmp_path / f"worker-{n}.log" for n in range(WORKERS)]
    client = create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_portals_file": str(portals),
                         "trigger_api_keys": API_KEY}).test_client()

    def submit_round(first: int, count: int) -> list[str]:
        ids = []
        for n in range(first, first + count):
            response = client.post("/v1/cancel", json={"document_ids": [n]},
                                   headers={**bearer(), "Idempotency-Key": f"oauth-{n}"})
            assert response.status_code == 202
            ids.append(response.get_json()["request_id"])
        return ids

    def all_done(ids: list[str]) -> bool:
        states = [client.get(f"/v1/requests/{rid}", headers=bearer()).get_json()["state"] for rid in ids]
        assert "failed" not in states, states
        return all(state == "done" for state in states)

    def stats() -> dict[str, Any]:
        return httpx.get(f"{sandbox.url}/_sandbox/stats", timeout=5).json()  # type: ignore[no-any-return]

    first = submit_round(1, 12)  # queued before any worker runs: they all start with no token at once
    workers = [devenv.start_worker(env, log=log) for log in logs]
    try:
        wait_for(lambda: all_done(first), timeout=60, what="the first round")
        assert stats()["oauth_refreshes"] == 1  # the first token: fetched by one worker for all
        time.sleep(TOKEN_LIFETIME + 0.5)  # every worker's token is now expired
        second = submit_round(20, 12)
        wait_for(lambda: all_done(second), timeout=60, what="the second round")
    finally:
        for worker in workers:
            worker.stop()
    after = stats()
    assert after["oauth_refresh_errors"] == 0  # no refresh token was ever used twice
    assert 2 <= after["oauth_refreshes"] <= 3  # once per expiry, not once per worker or per call
    assert after["by_error"].get("invalid_token", 0) == 0
    for n in [*range(1, 13), *range(20, 32)]:
        assert portal.document(n)["status"] != "Y"
    assert len(portal.messages()) == 24
    everything = "".join(log.read_text() for log in logs)
    assert app_tokens["refresh_token"] not in everything and app_tokens["client_secret"] not in everything


# ---- fencing, the deadline and lost answers ---------------------------------------------------------------

def app_of(sandbox: devenv.Process, lifetime: int = 3600) -> tuple[OAuthApp, dict[str, Any]]:
    """The sandbox app's credentials with a first refresh token, as the portals file would give them."""
    issued = httpx.post(f"{sandbox.url}/_sandbox/oauth/tokens", json={"lifetime": lifetime}, timeout=5).json()
    return OAuthApp(client_endpoint=issued["client_endpoint"], client_id=issued["client_id"],
                    client_secret=issued["client_secret"], refresh_token=issued["refresh_token"],
                    server=f"{sandbox.url}/oauth/token/"), issued


def event_form(pair: dict[str, Any], with_refresh: bool = True) -> dict[str, str]:
    """The auth[...] fields an app event carries for a freshly issued pair."""
    form = {"auth[access_token]": pair["access_token"], "auth[expires]": str(pair["expires"]),
            "auth[expires_in]": str(pair["expires_in"]), "auth[user_id]": str(pair["user_id"])}
    if with_refresh:
        form["auth[refresh_token]"] = pair["refresh_token"]
    return form


def works(sandbox: devenv.Process, access_token: str) -> bool:
    return httpx.post(f"{sandbox.url}/rest/scope", json={"auth": access_token}, timeout=5).status_code == 200


def test_a_refresh_answer_older_than_the_stored_pair_is_not_stored(sandbox: devenv.Process,
                                                                    redis_conn: redis.Redis) -> None:
    app, _ = app_of(sandbox)
    portal = SandboxView(sandbox.url)
    tokens = OAuthTokens(redis_conn, "app", app, httpx.Client())
    first = tokens.access_token()
    # The next refresh is applied by the OAuth server at once but its answer arrives 2.5 s later; meanwhile an
    # event brings a pair issued after it (expiring a second later at least), which the intake stores.
    portal.faults({"kind": "late", "method": "oauth.token", "seconds": 2.5, "times": 1})
    outcome: dict[str, Any] = {}
    refresher = threading.Thread(target=lambda: outcome.update(token=tokens.refresh(stale=first)))
    refresher.start()
    time.sleep(1.2)
    newer = httpx.post(f"{sandbox.url}/_sandbox/oauth/tokens", json={}, timeout=5).json()
    assert offer_tokens(redis_conn, "app", app, event_form(newer))
    refresher.join(10)

    assert portal.http.get("/_sandbox/stats").json()["oauth_refreshes"] == 2  # the late pair was issued
    stored = {k.decode(): v.decode() for k, v in redis_conn.hgetall(token_key("app")).items()}
    assert stored["refresh_token"] == newer["refresh_token"]  # the late, older pair did not overwrite it
    assert stored["access_token"] == newer["access_token"] == outcome["token"]
    assert works(sandbox, outcome["token"])
    # An offer older than what is stored changes nothing either.
    assert not offer_tokens(redis_conn, "app", app, {**event_form(newer), "auth[access_token]": "older",
                                                     "auth[expires]": str(newer["expires"] - 10)})
    assert redis_conn.hget(token_key("app"), "access_token").decode() == newer["access_token"]


def test_a_refresh_ends_within_its_deadline(sandbox: devenv.Process, redis_conn: redis.Redis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth.REFRESH_DEADLINE < auth.LOCK_SECONDS  # the lock outlives any refresh
    monkeypatch.setattr(auth, "REFRESH_DEADLINE", 1.0)
    app, _ = app_of(sandbox)
    SandboxView(sandbox.url).faults({"kind": "slow", "method": "oauth.token", "seconds": 6, "times": 1})
    tokens = OAuthTokens(redis_conn, "app", app, httpx.Client())
    started = time.monotonic()
    with pytest.raises(Bitrix24Error) as caught:
        tokens.access_token()
    assert time.monotonic() - started < 1.0 + 0.5
    assert caught.value.code == "OAUTH_UNREACHABLE" and caught.value.retryable and caught.value.ambiguous
    assert not redis_conn.exists(tokens.lock_key)  # released: the next process may refresh at once
    assert app.refresh_token not in str(caught.value) and app.client_secret not in str(caught.value)


def test_a_lost_refresh_answer_is_recovered_from_event_tokens_else_fails_clearly(
        sandbox_factory: Callable[..., devenv.Process], redis_proc: devenv.Process, tmp_path: Path) -> None:
    lifetime = 4
    sandbox = sandbox_factory("--documents", "20", "--durations-zero", "--token-lifetime", str(lifetime))
    portal = SandboxView(sandbox.url)
    app, _ = app_of(sandbox, lifetime)
    config = portal.http.get("/_sandbox/config").json()
    conn = redis.Redis.from_url(redis_proc.url)
    conn.flushdb()
    portals = tmp_path / "portals.toml"
    portals.write_text(textwrap.dedent(f"""
        [portals.app]
        client_endpoint = "{app.client_endpoint}"
        oauth_server = "{app.server}"
        client_id = "{app.client_id}"
        client_secret = "{app.client_secret}"
        refresh_token = "{app.refresh_token}"
        application_token = "{config['application_token']}"
        member_id = "{config['member_id']}"
        chat = "chat1"
    """))
    port = devenv.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "REDIS_"))}
    env.update({"REDIS_URL": redis_proc.url, "B24_PORTALS_FILE": str(portals), "TRIGGER_API_KEYS": API_KEY,
                "HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "1"})
    web = devenv.start_web(env, log=tmp_path / "web.log")
    worker = devenv.start_worker(env, log=tmp_path / "worker.log")
    http = httpx.Client(base_url=web.url, headers=bearer(), timeout=10)
    conducted = [n for n in range(1, 21) if portal.document(n)["status"] == "Y"][:4]

    def request(doc: int) -> str:
        answer = http.post("/v1/cancel", json={"document_ids": [doc]}, headers={"Idempotency-Key": f"lost-{doc}"})
        assert answer.status_code == 202
        return str(answer.json()["request_id"])

    def finished(request_id: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            state: dict[str, Any] = http.get(f"/v1/requests/{request_id}").json()
            return state if state["state"] in ("done", "failed") else None

        return wait_for(ended, timeout=60, what=f"request {request_id} to end")

    def event(**tokens: bool) -> None:
        sent = portal.http.post("/_sandbox/events/send", json={"url": f"{web.url}/v1/bitrix24/events",
                                                               "event": "ONCRMDEALUPDATE", "id": 7, **tokens})
        assert sent.json()["status"] == 200, sent.text

    def stats() -> dict[str, Any]:
        return portal.http.get("/_sandbox/stats").json()  # type: ignore[no-any-return]

    try:
        assert finished(request(conducted[0]))["state"] == "done"  # the first token, fetched by the worker
        # A refresh whose answer is lost: the OAuth server spent the stored refresh token, we never saw the pair.
        portal.faults({"kind": "applied_then_timeout", "method": "oauth.token", "seconds": 0.2, "times": 1})
        stale = conn.hget(token_key("app"), "access_token").decode()
        with pytest.raises(Bitrix24Error, match="OAUTH_UNREACHABLE"):
            OAuthTokens(conn, "app", app, httpx.Client()).refresh(stale=stale)
        assert stats()["oauth_refreshes"] == 2

        time.sleep(1.1)  # expiry times have whole seconds: the event's token is the later one
        event(with_tokens=True)  # an app event with the user's fresh access token (no refresh token)
        assert conn.hget(token_key("app"), "source") == b"event"
        assert finished(request(conducted[1]))["state"] == "done"  # on the event's token, no refresh needed
        assert stats()["oauth_refreshes"] == 2

        time.sleep(lifetime + 0.5)  # the event's token expires; the stored refresh token is void
        failed_id = request(conducted[2])
        failed = finished(failed_id)
        assert failed["state"] == "failed"
        assert "OAUTH_TOKEN_LOST" in failed["documents"][0]["detail"]
        # What a person must do, for the report (which cannot reach the chat without a token either).
        assert "Reinstall the app" in records.load(conn, failed_id)["documents"][0]["advice"]
        assert portal.document(conducted[2])["status"] == "Y"
        time.sleep(1)  # the report job tried too: it found the token void without asking the OAuth server
        assert stats()["oauth_refresh_errors"] == 1

        event(with_tokens=True, with_refresh_token=True)  # e.g. ONAPPINSTALL after a reinstall
        time.sleep(lifetime + 0.5)  # its access token expires too: the next call refreshes with its refresh token
        assert finished(request(conducted[3]))["state"] == "done"
        # Calls to the token endpoint: the first, the lost one, the refused one, and the one with the event's token.
        assert stats()["oauth_refreshes"] == 4 and stats()["oauth_refresh_errors"] == 1
    finally:
        worker.stop()
        web.stop()
    for doc in (conducted[0], conducted[1], conducted[3]):
        assert portal.document(doc)["status"] != "Y"
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "web.log").read_text()
    assert app.refresh_token not in logs and app.client_secret not in logs


def test_app_tokens_are_kept_only_from_calls_whose_application_token_matches(
        redis_conn: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    portals = tmp_path / "portals.toml"
    portals.write_text(textwrap.dedent("""
        [portals.app]
        client_endpoint = "https://shop.bitrix24.com/rest/"
        client_id = "local.1"
        client_secret = "secret-1"
        refresh_token = "configured-refresh"
        application_token = "app-token-1"
        member_id = "member-1"
        robot_secret = "robot-1"
        chat = "chat1"
    """))
    client = create_app({"_env_file": None, "redis_url": redis_url, "b24_portals_file": str(portals),
                         "trigger_api_keys": API_KEY}).test_client()
    expires = str(int(time.time()) + 3600)

    def event(application_token: str, access: str) -> int:
        form = {"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "7", "ts": str(int(time.time())),
                "auth[member_id]": "member-1", "auth[application_token]": application_token,
                "auth[access_token]": access, "auth[expires]": expires, "auth[refresh_token]": f"r-{access}"}
        return client.post("/v1/bitrix24/events", data=form).status_code

    def robot(application_token: str, access: str, expires_at: str, run: int) -> int:
        form = {"document_id[]": ["crm", "CCrmDocumentDeal", "DEAL_1"], "auth[application_token]": application_token,
                "auth[access_token]": access, "auth[expires]": expires_at}
        return client.post(f"/v1/bitrix24/robot?portal=app&key=robot-1&document_ids=5&run={run}",
                           data=form).status_code

    assert event("forged", "planted") == 401
    assert robot("forged", "planted", expires, 1) == 202  # the robot call itself is authenticated by its key
    assert not redis_conn.exists(token_key("app"))  # neither forged token was kept
    assert event("app-token-1", "fresh") == 200
    stored = redis_conn.hgetall(token_key("app"))
    assert stored[b"access_token"] == b"fresh" and stored[b"refresh_token"] == b"r-fresh"
    assert stored[b"fence"].decode() == auth.fingerprint("r-fresh")
    assert robot("app-token-1", "from-robot", str(int(expires) + 60), 2) == 202
    stored = redis_conn.hgetall(token_key("app"))
    assert stored[b"access_token"] == b"from-robot" and stored[b"refresh_token"] == b"r-fresh"
