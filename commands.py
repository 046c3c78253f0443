"""Operator commands, run as `flask --app app <command>` (registered by create_app)."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import policy, records


@click.command("replay")
@click.argument("request_id")
@with_appcontext
def replay(request_id: str) -> None:
    """Requeue a request's failed jobs: its failed documents are tried again and a new report is posted.

    The record's retry budgets start again (attempts stay, as history), and so do each job's RQ retries:
    the crash budget (`retries_left`) and RQ's count of returned Retries (`number_of_retries`, which RQ
    never resets itself). The jobs see the failed state and start a new round (a failed event reads its
    object again).
    """
    svc = current_app.extensions["b24cancel"]
    conn = svc.redis
    if records.load(conn, request_id) is None:
        raise click.ClickException(f"no request {request_id} (unknown, or older than the retention period)")
    failed = []
    for queue_name in (policy.CANCEL_QUEUE, policy.NOTIFY_QUEUE):
        registry = Queue(queue_name, connection=conn, serializer=JSONSerializer).failed_job_registry
        for kind in ("cancel", "resolve", "notify"):
            job_id = f"{kind}-{request_id}"
            if job_id in registry:
                failed.append((registry, job_id))
    if not failed:
        raise click.ClickException(f"request {request_id} has no failed job to replay")
    records.save(conn, request_id, deferrals="0", transient_failures="0", report_failures="0")
    for registry, job_id in failed:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        job.retries_left = policy.CRASH_RETRY_MAX
        job.number_of_retries = 0
        registry.requeue(job)  # saves the job with its fresh budgets, then enqueues it
    click.echo(f"requeued {', '.join(job_id for _, job_id in failed)}")


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
