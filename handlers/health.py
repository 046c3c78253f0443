"""Liveness and readiness (no credentials, nothing named), the health details (admin) and metrics."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, request
from rq import Worker

from handlers.intake import (
    IntakeError,
    Reply,
    authenticate_trigger,
    constant_time_in,
    held_back,
    require_admin,
    services,
)
from jobs import offline, policy

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Reply:
    """The process is up."""
    return {"status": "ok"}, 200


@bp.get("/readyz")
def readyz() -> Reply:
    """Whether this process can take requests (Redis answers): 200 or 503, naming no portal and no count."""
    try:
        services().redis.ping()
    except redis.RedisError:
        raise IntakeError(503, "not ready: Redis is unreachable") from None
    return {"status": "ready"}, 200


@bp.get("/v1/health")
def health() -> Reply:
    """The details behind readiness, for admin callers: workers, queue depth, portals held back, and each
    installed portal's offline event queue (last pull, records pulled and confirmed)."""
    svc = services()
    require_admin(authenticate_trigger(request, svc))
    try:
        workers = Worker.count(connection=svc.redis)
        depth = {name: svc.redis.llen(f"rq:queue:{name}") for name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE)}
        every = svc.all_portals()
        holds = {name: hold for name in every
                 if (hold := held_back(svc, name))["paused_methods"] or hold["slowed_until"]}
        queues = {name: offline.view(svc.redis, portal.member_id) for name, portal in every.items()
                  if portal.installed and portal.member_id and offline.offline_events(portal.rules)}
    except redis.RedisError:
        raise IntakeError(503, "Redis is unreachable") from None
    return {"status": "ready", "redis": "ok", "workers": workers, "queue_depth": depth,
            "portals_held_back": holds, "offline_queues": queues}, 200


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format: intake counts of this process and queue depth (token or metrics listener)."""
    from handlers.metrics import render
    from transport import on_port, parse_bind

    svc = services()
    bind = svc.settings.metrics_bind
    if not (bind and on_port(request.environ, parse_bind(bind)[1])):
        # Anywhere else it needs the token; with none configured it is refused, whoever asks (behind a
        # reverse proxy every client looks like loopback, so the peer address proves nothing).
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token_ok = constant_time_in(token.strip(), [svc.settings.metrics_token or "\x00no-metrics-token\x00"])
        if not svc.settings.metrics_token or scheme.lower() != "bearer" or not token_ok:
            raise IntakeError(401, "metrics need 'Authorization: Bearer <METRICS_TOKEN>', or METRICS_BIND's address")
    return render(svc)
