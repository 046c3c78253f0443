"""The Flask application of the sandbox portal."""

from __future__ import annotations

from flask import Flask
from werkzeug.wrappers import Response

from sandbox import appmode, control, oauth, offline, page, rest  # noqa: F401 - appmode, offline register REST methods
from sandbox.config import Config
from sandbox.jsonutil import json_response
from sandbox.state import Portal


def create_app(config: Config) -> Flask:
    """A Flask app serving one sandbox portal seeded from `config` (the portal is `app.config["PORTAL"]`)."""
    app = Flask("sandbox")
    portal = Portal(config)
    app.config["PORTAL"] = portal
    app.wsgi_app = rest.RestEndpoint(portal, app.wsgi_app)  # type: ignore[method-assign]
    app.register_blueprint(oauth.bp)
    app.register_blueprint(control.bp)
    app.register_blueprint(page.bp)

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        """JSON instead of Flask's HTML 404."""
        return json_response({"error": "NOT_FOUND", "error_description": "No such page in the sandbox"}, 404)

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> Response:
        """JSON instead of Flask's HTML 405."""
        return json_response({"error": "METHOD_NOT_ALLOWED",
                              "error_description": "HTTP method not allowed"}, 405)

    return app
