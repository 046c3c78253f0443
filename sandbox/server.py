"""Serving the app with gunicorn's threaded worker: one process (one state), many threads.

The Werkzeug development server managed about 1,100 trivial Flask calls/s on the 2-core target
machine, too close to the 1,000/s goal once the real work is added; gunicorn's gthread worker
(already a pinned dependency of the project) parses HTTP faster, and a stalled request only holds
one of its threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

# Requests served at once. Stalling faults (slow, applied_then_timeout) each hold one thread.
SERVER_THREADS = 64
# Idle keep-alive connections are kept this long, longer than common client pools (httpx: 5 s),
# so a client never reuses a connection the server is closing.
KEEPALIVE_SECONDS = 75
# The worker's heartbeat timeout; gthread beats from its main loop, so long stalls are fine.
WORKER_TIMEOUT_SECONDS = 120
# On SIGTERM, in-flight requests (possibly stalled on purpose) get this long before the worker dies.
GRACEFUL_TIMEOUT_SECONDS = 2


class _Gunicorn(BaseApplication):
    """A gunicorn application around an already-built WSGI app."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        """Apply our options instead of reading gunicorn's command line."""
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        """The app to serve."""
        return self.application


def serve(app: Flask, host: str, port: int, on_ready: Callable[[], None]) -> None:
    """Listen on host:port until SIGTERM/SIGINT; `on_ready` runs once the socket is bound."""
    options = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": SERVER_THREADS,
        "keepalive": KEEPALIVE_SECONDS,
        "timeout": WORKER_TIMEOUT_SECONDS,
        "graceful_timeout": GRACEFUL_TIMEOUT_SECONDS,
        "preload_app": True,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        # Several sandboxes may run at once; gunicorn's control socket is one fixed path per user.
        "control_socket_disable": True,
        "when_ready": lambda _server: on_ready(),
        "proc_name": "sandbox-portal",
    }
    _Gunicorn(app, options).run()
