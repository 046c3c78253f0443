"""Operator commands, run as `flask --app app <command>` (registered by create_app)."""

from __future__ import annotations

import secrets

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import policy, records
from settings import BITRIX24_CALLER, DEFAULT_CALLER, PORTAL_NAME, SANDBOX_CALLER, key_sha256

# Random bytes in a new API key (URL-safe base64, 43 characters): far past guessing.
NEW_KEY_BYTES = 32


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
    """Print the configured portals and callers (secrets masked); the settings were validated at start-up."""
    svc = current_app.extensions["b24cancel"]
    for portal in svc.portals.values():
        info = portal.public()
        click.echo(f"{info['name']}: {info['url']} ({info['auth']}), chat {info['chat']}, plan {info['plan']}, "
                   f"reports in {info['language']} (mention {info['mention']}), {len(portal.rules)} event rules")
    for caller in svc.settings.callers.values():
        portals = "every portal" if caller.portals is None else ", ".join(sorted(caller.portals)) or "no portal"
        click.echo(f"caller {caller.name}: {len(caller.key_hashes)} key(s), {len(caller.secrets)} secret(s); "
                   f"{portals}; chats {', '.join(sorted(caller.chats)) or 'none of its own'}"
                   f"{'; admin' if caller.admin else ''}")


@click.command("new-key")
@click.argument("name")
@with_appcontext
def new_key(name: str) -> None:
    """Print a fresh API key for caller NAME and the [callers.NAME] lines to paste into the portals file."""
    if not PORTAL_NAME.match(name) or name in (SANDBOX_CALLER, BITRIX24_CALLER):
        raise click.ClickException("NAME must be letters, digits, - or _ (and not sandbox or bitrix24)")
    key = secrets.token_urlsafe(NEW_KEY_BYTES)
    digest = key_sha256(key)
    click.echo(f"API key for {name} (give it to the sender; only its hash is kept, so it cannot be shown again):")
    click.echo(f"  {key}")
    settings = current_app.extensions["b24cancel"].settings
    existing = settings.callers.get(name)
    if name == DEFAULT_CALLER and (settings.api_keys or settings.webhook_secrets):
        click.echo("\nCaller default is TRIGGER_API_KEYS. To rotate, add this key to it (comma-separated), deploy, "
                   "switch the sender to the new key, then remove the old one.")
        return
    if existing is not None:
        hashes = ", ".join(f'"{h}"' for h in (*existing.key_hashes, digest))
        click.echo(f"\nCaller {name} exists. To rotate, set in [callers.{name}] (old and new hash), deploy, switch "
                   "the sender to the new key, then remove the old hash:")
        click.echo(f"key_sha256 = [{hashes}]")
        return
    click.echo("\nPaste into the portals file (B24_PORTALS_FILE) and name its portals and chats:")
    click.echo(f"[callers.{name}]")
    click.echo(f'key_sha256 = "{digest}"')
    click.echo('portals = []        # the portals it may use, e.g. ["shop"]')
    click.echo('chats = []          # chats it may name in `chat` besides each portal\'s own, e.g. ["chat7"]')
    click.echo("admin = false       # true: may read every request, /v1/portals and /v1/health")


def init_app(app: Flask) -> None:
    """Register the commands on the app."""
    app.cli.add_command(replay)
    app.cli.add_command(check_config)
    app.cli.add_command(new_key)
