"""Liveness, readiness and metrics."""

from __future__ import annotations

import redis
from flask import Blueprint, Response
from rq import Worker

from handlers.intake import Reply, held_back, services
from jobs import policy

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Reply:
    """The process is up."""
    return {"status": "ok"}, 200


@bp.get("/readyz")
def readyz() -> Reply:
    """Redis answers (and how many workers it has seen); 503 when it does not."""
    svc = services()
    try:
        svc.redis.ping()
        workers = Worker.count(connection=svc.redis)
        depth = {name: svc.redis.llen(f"rq:queue:{name}") for name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE)}
        holds = {name: hold for name in svc.settings.portals
                 if (hold := held_back(svc, name))["paused_methods"] or hold["slowed_until"]}
    except redis.RedisError:
        return {"status": "unavailable", "redis": "unreachable"}, 503
    return {"status": "ready", "redis": "ok", "workers": workers, "queue_depth": depth,
            "portals_held_back": holds}, 200


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format: intake counts of this process and queue depth."""
    from handlers.metrics import render

    return render(services())
