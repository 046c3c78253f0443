"""A portal reached as an OAuth app: tokens in Redis, refreshed single-flight by several real workers."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

import devenv
from app import create_app
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
