"""Prometheus metrics: intake by endpoint and status (per process), queue depth (from Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from flask import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from handlers.intake import Services
from jobs import metrics as worker_metrics
from jobs import policy

REGISTRY = CollectorRegistry()
INTAKE = Counter("b24cancel_intake_requests", "Intake requests by endpoint and HTTP status",
                 ["endpoint", "status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("b24cancel_queue_depth", "Jobs waiting in each RQ queue", ["queue"], registry=REGISTRY)


_intake_children: dict[tuple[str, int], Any] = {}


def count(endpoint: str | None, status: int) -> None:
    """Count one answered request (label lookups cached: this runs on every request)."""
    key = (endpoint or "unknown", status)
    child = _intake_children.get(key)
    if child is None:
        child = _intake_children[key] = INTAKE.labels(key[0], str(status))
    child.inc()


def render(svc: Services) -> Response:
    """The metrics page: this process's intake counts, queue depth and the workers' counts from Redis."""
    page = [generate_latest(REGISTRY)]
    try:
        for name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE):
            QUEUE_DEPTH.labels(name).set(svc.redis.llen(f"rq:queue:{name}"))
        page[0] = generate_latest(REGISTRY)
        workers = CollectorRegistry()
        workers.register(WorkerCounts(worker_metrics.read(svc.redis)))
        page.append(generate_latest(workers))
    except redis.RedisError:
        pass
    return Response(b"".join(page), mimetype=CONTENT_TYPE_LATEST)


class WorkerCounts(Collector):
    """The workers' counters, as read from Redis at this scrape."""

    def __init__(self, values: dict[str, dict[tuple[str, ...], float]]) -> None:
        self.values = values

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (help_text, labels) in worker_metrics.COUNTERS.items():
            family = CounterMetricFamily(f"b24cancel_{name}", help_text, labels=list(labels))
            for label_values, amount in sorted(self.values.get(name, {}).items()):
                if len(label_values) == len(labels):
                    family.add_metric(list(label_values), amount)
            yield family


EVENTS = Counter("b24cancel_events", "Bitrix24 events by portal, event and what became of them",
                 ["portal", "event", "result"], registry=REGISTRY)


def count_event(portal: str, event: str, result: str) -> None:
    """Count one received Bitrix24 event."""
    EVENTS.labels(portal, event, result).inc()
