"""What happens to the bytes before Flask sees them: the gunicorn worker class and the body/URL middleware.

- `IntakeWorker` (gunicorn `worker_class = "transport.IntakeWorker"`) is gunicorn's threaded worker with
  three changes: a connection may spend at most `REQUEST_READ_DEADLINE` seconds in a thread (a client that
  drips its headers or body, or never reads the answer, loses its connection instead of a thread for
  good); the request line is bounded by our own `MAX_REQUEST_LINE` (gunicorn's setting is 0 so that its
  own HTML 414 never answers); and gunicorn's own error pages (bad request line, bad header, 414, 431,
  501) are answered in our JSON error shape.
- `BodyLimit` (wraps the Flask app in app.py) reads every request body itself, whatever its framing
  (Content-Length or chunked), up to `MAX_BODY_BYTES`: a body over it gets 413, a malformed chunked body
  400, a request line (URL) over `MAX_REQUEST_LINE` 414, all before any handler or credential check runs.
  It also keeps the metrics listener (METRICS_BIND) to `/metrics`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidHeaderName,
    LimitRequestHeaders,
    NoMoreData,
)
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.workers import gthread

# Where BodyLimit leaves the body it read, as bytes, in the WSGI environ.
BODY_KEY = "b24cancel.body"
# Largest request body we read (the intake refuses larger ones with 413, however they are framed).
MAX_BODY_BYTES = 64 * 1024
# Longest request line (method, URL, version). The largest robot call (README, "Bitrix24 robot": 500
# document ids, a 1,000-letter Cyrillic reason at 6 bytes a letter once percent-encoded, a 200-character
# external id) is about 12.8 KB.
MAX_REQUEST_LINE = 16 * 1024
# Longest time a connection may hold one of a worker's threads: reading the request, running the
# handler (milliseconds; a stuck Redis gives up after 5+2 s, app.REDIS_TIMEOUT) and writing the answer.
# A client that drips bytes (slow loris) or never reads the answer is cut off after it, so a thread
# is never held for good. The environment variable REQUEST_READ_DEADLINE overrides it (tests lower it).
REQUEST_READ_DEADLINE = 10.0
# How often the worker's main loop looks for connections past their deadline (it wakes at least this often).
DEADLINE_CHECK_INTERVAL = 1.0

ERROR_NAMES = {400: "invalid_request", 404: "not_found", 413: "too_large", 414: "uri_too_long",
               431: "headers_too_large", 501: "not_implemented", 500: "internal_error", 403: "forbidden",
               417: "expectation_failed"}
# What gunicorn raises while reading a chunked body that the client framed wrongly.
FRAMING_ERRORS = (InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension, InvalidHeader,
                  InvalidHeaderName, LimitRequestHeaders, NoMoreData)


def json_error(status: int, message: str) -> bytes:
    """Our error body: {"error", "message"} as every endpoint answers it."""
    return json.dumps({"error": ERROR_NAMES.get(status, "error"), "message": message}).encode()


# -- the WSGI middleware ----------------------------------------------------------------------------

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class BodyLimit:
    """Read the body with a limit before the app runs: 413 over it, 400 for bad framing, 414 for long URLs."""

    def __init__(self, app: WSGIApp, limit: int = MAX_BODY_BYTES, metrics_bind: str | None = None) -> None:
        self.app = app
        self.limit = limit
        self.metrics_port = parse_bind(metrics_bind)[1] if metrics_bind else None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # gunicorn's RAW_URI is the target as sent (path and query); other servers give the parts.
        target = environ.get("RAW_URI") or f"{environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}"
        if len(target) > MAX_REQUEST_LINE:
            return refuse(start_response, 414, f"the URL is longer than {MAX_REQUEST_LINE // 1024} KiB")
        if self.metrics_port and on_port(environ, self.metrics_port) and environ.get("PATH_INFO") != "/metrics":
            return refuse(start_response, 404, "this address serves /metrics only")
        if has_body(environ):
            refused = self.read_body(environ)
            if refused:
                return refuse(start_response, *refused)
        return self.app(environ, start_response)

    def read_body(self, environ: dict[str, Any]) -> tuple[int, str] | None:
        """Replace wsgi.input with the body read in full (at most `limit` bytes); a refusal when it is not."""
        too_large = (413, f"the body is larger than {self.limit // 1024} KiB")
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            if not length.isdigit():
                return 400, "Content-Length must be a number"
            if int(length) > self.limit:
                return too_large
        try:
            data = environ["wsgi.input"].read(self.limit + 1)
        except FRAMING_ERRORS:
            return 400, "the body is not framed correctly (malformed chunked encoding, or cut short)"
        if len(data) > self.limit:
            return too_large
        environ["wsgi.input"] = io.BytesIO(data)
        environ[BODY_KEY] = data  # the handlers parse these bytes, not werkzeug's stream wrappers over them
        environ["CONTENT_LENGTH"] = str(len(data))
        # The body is now a plain stream of known length: the app must not read past it.
        environ["wsgi.input_terminated"] = False
        return None


def has_body(environ: dict[str, Any]) -> bool:
    """Whether the request says a body follows (a length above zero, or chunked)."""
    length = environ.get("CONTENT_LENGTH") or ""
    return length not in ("", "0") or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def refuse(start_response: StartResponse, status: int, message: str) -> list[bytes]:
    """Answer a JSON error and close the connection (the rest of the request is not read)."""
    body = json_error(status, message)
    reasons = {400: "Bad Request", 404: "Not Found", 413: "Content Too Large", 414: "URI Too Long"}
    start_response(f"{status} {reasons.get(status, 'Error')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Connection", "close")])
    return [body]


def parse_bind(bind: str) -> tuple[str, int]:
    """'host:port' as (host, port); raise ValueError for anything else."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, like 127.0.0.1:9100")
    return host.strip("[]"), int(port)


def on_port(environ: dict[str, Any], port: int) -> bool:
    """Whether the request came in on this local port (read from the socket: a Host header cannot fake it)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return int(sock.getsockname()[1]) == port
    except (OSError, IndexError, TypeError):
        return False


# -- the gunicorn worker -----------------------------------------------------------------------------

class BoundedRequest(Request):
    """gunicorn's request with the request line bounded by MAX_REQUEST_LINE (its own limit is set to 0)."""

    def read_line(self, unreader: Any, buf: Any, limit: int = 0) -> Any:
        return super().read_line(unreader, buf, limit or MAX_REQUEST_LINE)


class BoundedRequestParser(RequestParser):
    mesg_class = BoundedRequest


class Connection(gthread.TConn):
    """A connection whose HTTP/1 parser bounds the request line."""

    def init(self) -> None:
        fresh = not self.initialized
        super().init()
        if fresh and type(self.parser) is RequestParser and not self.parser.unreader.buf.getvalue():  # type: ignore[has-type]
            self.parser = BoundedRequestParser(self.cfg, self.sock, self.client)


class IntakeWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker where no connection holds a thread past its deadline, and errors are JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = float(os.environ.get("REQUEST_READ_DEADLINE") or REQUEST_READ_DEADLINE)
        self.in_threads: dict[Connection, float] = {}
        self.in_threads_lock = threading.Lock()

    def accept(self, listener: socket.socket) -> None:
        """As gthread's accept, with our Connection."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (gthread.errno.EAGAIN, gthread.errno.ECONNABORTED, gthread.errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        client_sock.setblocking(True)
        self.enqueue_req(Connection(self.cfg, client_sock, client_addr, listener.getsockname()))

    def handle(self, conn: Connection) -> Any:
        """Serve the connection in this thread, for at most the deadline."""
        with self.in_threads_lock:
            self.in_threads[conn] = time.monotonic() + self.deadline
        try:
            return super().handle(conn)
        finally:
            with self.in_threads_lock:
                self.in_threads.pop(conn, None)

    def murder_pending(self) -> None:
        """gthread's sweep of idle connections, plus: cut off connections past their deadline in a thread.

        Shutting the socket down makes the thread's blocked read or write return at once; the thread
        then ends the connection as if the client had gone away.
        """
        super().murder_pending()
        now = time.monotonic()
        with self.in_threads_lock:
            late = [conn for conn, deadline in self.in_threads.items() if deadline <= now]
            for conn in late:
                self.in_threads.pop(conn, None)
        for conn in late:
            self.log.info("connection from %s cut off after %.0f s in a thread", conn.client, self.deadline)
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def init_process(self) -> None:
        """gunicorn's own refusals (bad request line or header, 414, 431, 501) go out in our JSON shape.

        gunicorn writes them with `util.write_error`, called only from `Worker.handle_error`; this worker
        process replaces it once, before it serves anything (the master and other worker classes keep theirs).
        """
        gthread.util.write_error = write_json_error  # type: ignore[assignment]
        super().init_process()


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn's `util.write_error` sends, as our JSON error (the connection is closed after it)."""
    message = mesg or reason
    if status_int == 414:
        message = f"the request line is longer than {MAX_REQUEST_LINE // 1024} KiB"
    body = json_error(status_int, message)
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gthread.util.write_nonblock(sock, head.encode("latin-1") + body)
