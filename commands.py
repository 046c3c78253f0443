"""Operator commands, run as `flask --app app <command>` (registered by create_app)."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import policy, records


@click.command("replay")
@click.argument("request_id")
@with_appcontext
def replay(request_id: str) -> None:
    """Requeue a request's failed jobs: its failed documents are tried again and a new report is posted."""
    svc = current_app.extensions["b24cancel"]
    if records.load(svc.redis, request_id) is None:
        raise click.ClickException(f"no request {request_id} (unknown, or older than the retention period)")
    requeued = []
    for queue_name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE):
        registry = Queue(queue_name, connection=svc.redis, serializer=JSONSerializer).failed_job_registry
        for kind in ("cancel", "resolve", "notify"):
            job_id = f"{kind}-{request_id}"
            if job_id in registry:
                registry.requeue(job_id)
                requeued.append(job_id)
    if not requeued:
        raise click.ClickException(f"request {request_id} has no failed job to replay")
    click.echo(f"requeued {', '.join(requeued)}")


@click.command("check-config")
@with_appcontext
def check_config() -> None:
    """Print the configured portals (secrets masked); the settings were validated when the app started."""
    for portal in current_app.extensions["b24cancel"].portals.values():
        info = portal.public()
        click.echo(f"{info['name']}: {info['url']} ({info['auth']}), chat {info['chat']}, plan {info['plan']}, "
                   f"{len(portal.rules)} event rules")


def init_app(app: Flask) -> None:
    """Register the commands on the app."""
    app.cli.add_command(replay)
    app.cli.add_command(check_config)
