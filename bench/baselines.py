"""Reference apps the intake benchmark compares our `POST /v1/cancel` with, served by the same gunicorn config.

- `bare_app`: a Flask route that answers a small JSON and does nothing else (the ceiling: Flask + gunicorn).
- `naive_app`: what a Flask+RQ intake usually looks like: parse the JSON, check a bearer key, and
  `Queue(...).enqueue(...)` with RQ's JSON serializer. No idempotency, no request record.

Both answer `POST /v1/cancel` with 202, so one wrk script drives all three apps the same way.
`naive_app` is built on first access (gunicorn's `bench.baselines:naive_app`) from `REDIS_URL`, which it
requires: it never falls back to a default Redis.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from flask import Flask, request

API_KEY = os.environ.get("TRIGGER_API_KEYS", "bench-key").split(",")[0].strip().encode()

bare_app = Flask("bench.bare")


@bare_app.post("/v1/cancel")
def bare_cancel() -> tuple[dict[str, Any], int]:
    """A small JSON answer, no parsing, no Redis."""
    return {"request_id": "0" * 32, "status_url": "/v1/requests/" + "0" * 32}, 202


def cancel_documents(document_ids: list[int], reason: str | None = None) -> None:
    """The job the naive app enqueues (never run by the benchmark)."""


def create_naive_app() -> Flask:
    """A textbook Flask+RQ intake: JSON, bearer key, `Queue.enqueue` with the JSON serializer."""
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    url = os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError("REDIS_URL is required (the benchmark starts its own Redis)")
    conn = redis.Redis.from_url(url)
    queue = Queue("cancel", connection=conn, serializer=JSONSerializer)
    app = Flask("bench.naive")

    @app.post("/v1/cancel")
    def naive_cancel() -> tuple[dict[str, Any], int]:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), API_KEY):
            return {"error": "unauthorized"}, 401
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("document_ids"), list):
            return {"error": "invalid_request"}, 400
        job = queue.enqueue(cancel_documents, body["document_ids"], body.get("reason"))
        return {"request_id": job.id, "status_url": f"/v1/requests/{job.id}"}, 202

    return app


def __getattr__(name: str) -> Flask:
    if name == "naive_app":
        built = create_naive_app()
        globals()["naive_app"] = built
        return built
    raise AttributeError(name)
