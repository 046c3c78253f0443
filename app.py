"""The web process: `create_app()` wires settings, Redis, the submit path, blueprints and Sentry.

Importing this module starts nothing; gunicorn's `app:app` builds the app on first access.
"""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

import commands
import observability
import redisconn
from handlers.intake import ERROR_NAMES, IntakeError, Services
from settings import SettingsError, load_settings
from transport import MAX_BODY_BYTES, BodyLimit

log = logging.getLogger("b24cancel.web")

# Redis from the web process: a stuck Redis must turn into a 503 well inside a sender's own timeout
# (Standard Webhooks senders wait 15-30 s), and an idle pooled connection is checked before reuse.
REDIS_TIMEOUT = 5
REDIS_CONNECT_TIMEOUT = 2
REDIS_HEALTH_CHECK = 30


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the web app from the environment, with `test_config` overriding settings."""
    settings = load_settings(**(test_config or {}))
    if not settings.redis_url:
        raise SettingsError("invalid configuration:\n  REDIS_URL: required (make run starts an embedded Redis "
                            "and sets it)")
    observability.init(settings, component="web")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    conn = redisconn.connect(settings.redis_url, socket_timeout=REDIS_TIMEOUT,
                             socket_connect_timeout=REDIS_CONNECT_TIMEOUT, health_check_interval=REDIS_HEALTH_CHECK)
    app.extensions["b24cancel"] = Services.build(settings, conn)

    from handlers import api, events, health, openapi, robot

    app.register_blueprint(api.bp)
    app.register_blueprint(robot.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(health.bp)
    openapi.init_app(app)
    register_errors(app)
    commands.init_app(app)
    # Bodies are read (and limited, however they are framed) before Flask sees the request.
    app.wsgi_app = BodyLimit(app.wsgi_app, MAX_BODY_BYTES, settings.metrics_bind)  # type: ignore[method-assign]
    return app


def register_errors(app: Flask) -> None:
    """Every error is JSON; nothing a client sends produces a 500."""
    from handlers.metrics import count

    @app.errorhandler(IntakeError)
    def intake_error(exc: IntakeError) -> tuple[dict[str, Any], int]:
        return exc.reply()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[dict[str, Any], int, dict[str, str]]:
        status = exc.code or 500
        message = f"the body is larger than {MAX_BODY_BYTES // 1024} KiB" if status == 413 else (
            exc.description or exc.name)
        # Keep what the exception says in headers (405's Allow), not its HTML content type.
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        return {"error": ERROR_NAMES.get(status, "error"), "message": message}, status, headers

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        log.exception("unhandled error", extra={"path": request.path})
        sentry_sdk.capture_exception(exc)  # a handled exception never reaches the Flask integration
        return {"error": "internal_error", "message": "internal error; it has been reported"}, 500

    @app.after_request
    def counted(response: Response) -> Response:
        count(request.endpoint, response.status_code)
        return response


def __getattr__(name: str) -> Flask:
    """`app:app` for gunicorn, built on first access so that importing this module starts nothing."""
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)
