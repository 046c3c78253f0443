"""Hostile input and slow clients against the real web process (gunicorn from gunicorn.conf.py) and real Redis.

Each test sends what an attacker or a fuzzer sent (raw bytes over a socket where an HTTP client cannot
produce them) and asserts the JSON refusal, and that nothing was stored, enqueued, cancelled or posted.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import redis
from rq.registry import StartedJobRegistry

import devenv
from bench.slowloris import MEMBER_ID, TOKEN, Drippers, send_events
from jobs import records
from jobs.resolve import documents
from settings import SettingsError, load_settings
from tests.helpers import API_KEY, SandboxView, wait_for
from tests.test_sentry import EnvelopeSink

ROBOT_SECRET = "transport-robot"
METRICS_TOKEN = "metrics-token-123"
# Short in tests: dripping connections are cut off within the slow-loris test's run.
READ_DEADLINE = "3"


def portals_toml(webhook: str) -> str:
    return textwrap.dedent(f"""
        [portals.shop]
        webhook_url = "{webhook}"
        application_token = "{TOKEN}"
        member_id = "{MEMBER_ID}"
        chat = "chat1"
        robot_secret = "{ROBOT_SECRET}"

        [[portals.shop.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        params = {{ entityTypeId = 2 }}
        documents_field = "ufCrm_InventoryDocs"
    """)


class Web:
    """The web process under test: its port, its metrics listener and its log."""

    def __init__(self, proc: devenv.Process, port: int, metrics_port: int, log: Path, sentry: EnvelopeSink) -> None:
        self.proc, self.port, self.metrics_port, self.log, self.sentry = proc, port, metrics_port, log, sentry

    def raw(self, data: bytes, port: int | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Send bytes, read the answer until the server closes: (status, headers, body)."""
        with socket.create_connection(("127.0.0.1", port or self.port), timeout=timeout) as sock:
            sock.sendall(data)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def request(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
                port: int | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 request with a Content-Length body (or none), as raw bytes."""
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, port)


@pytest.fixture(scope="module")
def stack(redis_proc: devenv.Process, shared_sandbox: devenv.Process,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """gunicorn -c gunicorn.conf.py app:app and one rq worker, on our Redis and the sandbox portal."""
    tmp = tmp_path_factory.mktemp("transport")
    portals = tmp / "portals.toml"
    portals.write_text(portals_toml(shared_sandbox.extra["webhook"]))
    port, metrics_port = devenv.free_port(), devenv.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_",
                                                                    "METRICS_", "REDIS_", "GUNICORN_"))}
    env.update(HOST="127.0.0.1", PORT=str(port), REDIS_URL=redis_proc.url, B24_PORTALS_FILE=str(portals),
               TRIGGER_API_KEYS=API_KEY, METRICS_TOKEN=METRICS_TOKEN, METRICS_BIND=f"127.0.0.1:{metrics_port}",
               REQUEST_READ_DEADLINE=READ_DEADLINE, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    sentry = EnvelopeSink()
    log = tmp / "web.log"
    web = devenv.start_web({**env, "SENTRY_DSN": sentry.dsn}, log=log)
    worker = devenv.start_worker(env, log=tmp / "worker.log")
    try:
        yield Web(web, port, metrics_port, log, sentry)
    finally:
        worker.stop()
        web.stop()
        sentry.close()


@pytest.fixture
def portal(sandbox: devenv.Process) -> SandboxView:
    return SandboxView(sandbox.url)


@pytest.fixture(autouse=True)
def settled(stack: Web, redis_conn: redis.Redis) -> Iterator[None]:
    """After each test, wait until the worker has finished whatever the test enqueued, so none of it leaks."""
    yield

    def idle() -> bool:
        states = [records.load(redis_conn, key.decode().rpartition(":")[2]) for key in
                  redis_conn.scan_iter(match="b24c:req:*")]
        busy = sum(StartedJobRegistry(queue, connection=redis_conn).count + redis_conn.llen(f"rq:queue:{queue}")
                   for queue in ("cancel", "notify"))
        return busy == 0 and all(state is None or state.get("state") in ("done", "failed") for state in states)

    wait_for(idle, timeout=90, what="the worker to finish what the test enqueued")


def stored_nothing(conn: redis.Redis) -> None:
    """No request record, no job in any queue."""
    assert list(conn.scan_iter(match="b24c:req:*")) == []
    assert list(conn.scan_iter(match="rq:job:*")) == []
    for queue in ("cancel", "notify"):
        assert conn.llen(f"rq:queue:{queue}") == 0


def json_error(status: int, body: bytes, expected: int, error: str) -> dict[str, Any]:
    assert status == expected, body
    payload = json.loads(body)
    assert payload["error"] == error and payload["message"]
    return dict(payload)


def no_traceback(web: Web) -> None:
    """Nothing was logged as an unhandled error, and no Sentry event left the web process."""
    text = web.log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text
    time.sleep(0.5)  # the SDK sends from a background thread
    assert web.sentry.events() == []


def event_form(object_id: str = "12", ts: str = "1766047124", event: str = "ONCRMDEALUPDATE", **extra: str) -> bytes:
    form = {"event": event, "event_handler_id": "7", "data[FIELDS][ID]": object_id, "ts": ts,
            "auth[domain]": "shop.bitrix24.com", "auth[member_id]": MEMBER_ID, "auth[application_token]": TOKEN}
    form.update(extra)
    return urlencode(form).encode()


FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_BEARER = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


# ---- deeply nested JSON -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"[" * 1000 + b"]" * 1000,
                                  b'{"document_ids": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                                  b'{"document_ids": [1], "reason": ' + b'{"a":' * 1000 + b"1" + b"}" * 1001])
def test_deeply_nested_json_is_400_without_traceback(stack: Web, redis_conn: redis.Redis, body: bytes) -> None:
    status, _, answer = stack.request("POST", "/v1/cancel", body, JSON_BEARER)
    assert json_error(status, answer, 400, "invalid_request")
    stored_nothing(redis_conn)
    no_traceback(stack)


# ---- malformed chunked bodies ------------------------------------------------------------------------

MALFORMED_CHUNKED = {
    "bad chunk size": b"zz\r\n{}\r\n0\r\n\r\n",
    "missing CRLF after a chunk": b"2\r\n{}XX0\r\n\r\n",
    "trailer without a colon": b"2\r\n{}\r\n0\r\nnocolon\r\n\r\n",
}


@pytest.mark.parametrize("kind", list(MALFORMED_CHUNKED))
@pytest.mark.parametrize("endpoint", ["events", "signed cancel"])
def test_malformed_chunked_body_is_400_before_any_credential_check(stack: Web, redis_conn: redis.Redis,
                                                                   kind: str, endpoint: str) -> None:
    if endpoint == "events":
        head = b"POST /v1/bitrix24/events HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    else:
        head = (b"POST /v1/cancel HTTP/1.1\r\nContent-Type: application/json\r\nwebhook-id: msg_1\r\n"
                b"webhook-timestamp: %d\r\nwebhook-signature: v1,AAAA\r\n" % int(time.time()))
    status, headers, answer = stack.raw(head + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n" + MALFORMED_CHUNKED[kind])
    json_error(status, answer, 400, "invalid_request")
    assert headers["content-type"] == "application/json"
    stored_nothing(redis_conn)
    no_traceback(stack)


# ---- bodies over the limit, however they are framed ------------------------------------------------------

def chunked(body: bytes, size: int = 4096) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def test_body_over_64_kib_is_413_chunked_or_not(stack: Web, redis_conn: redis.Redis) -> None:
    # The finding: JSON padded with spaces past 64 KiB still parses when cut at 64 KiB; it was queued 9 times.
    cut_parses = b'{"document_ids": [3], "reason": "padded"}' + b" " * (70 * 1024)
    head = b"POST /v1/cancel HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\n" \
        % API_KEY.encode()
    for n in range(9):
        status, _, answer = stack.raw(head + b"Idempotency-Key: pad-%d\r\nTransfer-Encoding: chunked\r\n\r\n" % n
                                      + chunked(cut_parses))
        json_error(status, answer, 413, "too_large")
    status, _, answer = stack.request("POST", "/v1/cancel", cut_parses, JSON_BEARER)
    json_error(status, answer, 413, "too_large")
    stored_nothing(redis_conn)
    # Just under the limit, chunked, is an ordinary request.
    fits = b'{"document_ids": [3], "reason": "padded"}' + b" " * (60 * 1024)
    status, _, answer = stack.raw(head + b"Idempotency-Key: fits\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(fits))
    assert status == 202, answer
    assert len(list(redis_conn.scan_iter(match="b24c:req:*"))) == 1


# ---- forwarding headers ---------------------------------------------------------------------------------

def test_script_name_header_from_loopback_changes_nothing(stack: Web, redis_conn: redis.Redis) -> None:
    for header in (b"SCRIPT_NAME: /elsewhere", b"PATH_INFO: /v1/cancel"):
        status, headers, answer = stack.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % header)
        assert status == 200 and json.loads(answer) == {"status": "ok"}
        assert headers["content-type"] == "application/json"
    status, _, answer = stack.raw(b"POST /v1/cancel HTTP/1.1\r\nHost: x\r\nSCRIPT_NAME: /v1\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    json_error(status, answer, 401, "unauthorized")
    stored_nothing(redis_conn)
    no_traceback(stack)


# ---- the request line --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [17 * 1024, 200 * 1024])
def test_request_line_over_16_kib_is_a_json_414(stack: Web, redis_conn: redis.Redis, length: int) -> None:
    target = f"/v1/bitrix24/robot?key={ROBOT_SECRET}&document_ids=3&reason=" + "a" * length
    status, headers, answer = stack.request("POST", target, b"")
    json_error(status, answer, 414, "uri_too_long")
    assert headers["content-type"] == "application/json"
    stored_nothing(redis_conn)


def test_largest_robot_call_fits_the_request_line(stack: Web, redis_conn: redis.Redis) -> None:
    # 500 document ids, a 1,000-letter Cyrillic reason and a 200-character external id (README, "Bitrix24 robot").
    ids = ",".join(str(2_000_000_000 + n) for n in range(500))
    target = (f"/v1/bitrix24/robot?portal=shop&key={ROBOT_SECRET}&document_ids={quote(ids)}"
              f"&reason={quote('я' * 1000)}&external_id={'x' * 200}")
    assert 12 * 1024 < len(target) < 16 * 1024
    status, _, answer = stack.request("POST", target, b"", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 202, answer
    record = records.load(redis_conn, json.loads(answer)["request_id"])
    assert record is not None and len(record["request"]["document_ids"]) == 500
    assert len(record["request"]["reason"]) == 1000
    # The worker runs it (the sandbox has none of these documents); wait, so that no job outlives the test.
    wait_for(lambda: (records.load(redis_conn, record["id"]) or {}).get("state") in ("done", "failed"),
             timeout=60, what="the large robot request finished")


# ---- chat and event ids -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", ["chat1\n", "chat\u0661", "\u0661\u0662", "chat1 ", "sg1\n"])
def test_chat_must_be_ascii_on_the_whole_string(stack: Web, redis_conn: redis.Redis, chat: str) -> None:
    body = json.dumps({"document_ids": [3], "chat": chat}).encode()
    status, _, answer = stack.request("POST", "/v1/cancel", body, JSON_BEARER)
    assert json_error(status, answer, 400, "invalid_request")["field"] == "chat"
    stored_nothing(redis_conn)


def test_event_object_ids_are_normalized_before_the_idempotency_key(stack: Web, redis_conn: redis.Redis) -> None:
    answers = [stack.request("POST", "/v1/bitrix24/events", event_form(object_id, ts), FORM)
               for object_id, ts in (("5", "1766047124"), ("05", "1766047124"), ("5", "01766047124"))]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    ids = {json.loads(body)["request_id"] for _, _, body in answers}
    assert len(ids) == 1
    assert len(list(redis_conn.scan_iter(match="b24c:req:*"))) == 1
    for object_id, ts in (("\uff15", "1766047124"), ("5", "\uff11766047124"), ("+5", "1766047124"),
                          ("5\n", "1766047124x")):
        status, _, body = stack.request("POST", "/v1/bitrix24/events", event_form(object_id, ts), FORM)
        json_error(status, body, 400, "invalid_request")
    assert len(list(redis_conn.scan_iter(match="b24c:req:*"))) == 1


def test_resolved_document_ids_are_parsed_strictly() -> None:
    rule = {"event": "ONCRMDEALUPDATE", "documents_field": "docs"}
    check: dict[str, Any] = {}
    documents(None, rule, {"id": 1, "docs": [True, 12.9, "1_0", " 7", "\u0663", "-4", 0, "", None, 8, "9", 8]},
              check)
    assert check["document_ids"] == [8, 9]
    documents(None, rule, {"id": 1, "docs": True}, check)
    assert check["document_ids"] == []


# ---- the robot -----------------------------------------------------------------------------------------------

def test_robot_acts_on_post_only(stack: Web, redis_conn: redis.Redis, portal: SandboxView) -> None:
    target = f"/v1/bitrix24/robot?portal=shop&key={ROBOT_SECRET}&document_ids=4"
    for method in ("HEAD", "GET"):
        status, headers, answer = stack.request(method, target)
        assert status == 405
        assert headers["content-type"] == "application/json"
        if method == "GET":
            json_error(status, answer, 405, "method_not_allowed")
    stored_nothing(redis_conn)
    # The same URL POSTed, as the robot sends it, cancels the document (the worker is running).
    status, _, answer = stack.request("POST", target, urlencode({"document_id[]": "DEAL_1"}).encode(), FORM)
    assert status == 202, answer
    request_id = json.loads(answer)["request_id"]
    wait_for(lambda: (records.load(redis_conn, request_id) or {}).get("state") == "done", timeout=30,
             what="the robot's request done and reported")
    assert portal.document(4)["status"] != "Y"
    assert len([c for c in portal.calls("catalog.document.cancel") if str(c["params"].get("id")) == "4"]) == 1
    assert len(portal.messages()) == 1
    # What HEAD and GET were sent before changed nothing: one request, one cancel, one report.
    assert len(list(redis_conn.scan_iter(match="b24c:req:*"))) == 1


@pytest.mark.parametrize("form, query", [
    ({"document_id[]": "D" * 201}, ""),
    ({"document_id[]": ["crm", "CCrmDocumentDeal", "DEAL_1", "extra"]}, ""),
    ({"workflow_id": "w" * 201}, ""),
    ({"ts": "1" * 201}, ""),
    ({}, "&run=" + "r" * 201),
    ({}, "&reason=" + "r" * 1001),
    ({}, "&external_id=" + "e" * 201),
])
def test_robot_free_text_over_its_limit_is_refused(stack: Web, redis_conn: redis.Redis,
                                                   form: dict[str, Any], query: str) -> None:
    target = f"/v1/bitrix24/robot?portal=shop&key={ROBOT_SECRET}&document_ids=5{query}"
    status, _, answer = stack.request("POST", target, urlencode(form, doseq=True).encode(), FORM)
    json_error(status, answer, 400, "invalid_request")
    stored_nothing(redis_conn)


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_metrics_need_the_token_and_name_no_portal_without_it(stack: Web, redis_conn: redis.Redis) -> None:
    stack.request("POST", "/v1/bitrix24/events", event_form(event="ONSENDERCHOSE123"), FORM)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": METRICS_TOKEN}):
        status, _, answer = stack.request("GET", "/metrics", headers=headers)
        json_error(status, answer, 401, "unauthorized")
        assert b"shop" not in answer

    def scrape() -> bytes:
        # Counts are per web process: send and scrape until one process has done both.
        stack.request("POST", "/v1/bitrix24/events", event_form(event="ONSENDERCHOSE123"), FORM)
        status, _, page = stack.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert status == 200
        assert b"ONSENDERCHOSE123" not in page
        return page if b'event="other"' in page else b""

    page = wait_for(scrape, timeout=20, what="an event counted as other")
    assert b'portal="shop"' in page
    stored_nothing(redis_conn)


def test_metrics_listener_serves_metrics_only(stack: Web, redis_conn: redis.Redis) -> None:
    status, _, page = stack.request("GET", "/metrics", port=stack.metrics_port)
    assert status == 200 and b"b24cancel_queue_depth" in page
    for method, target in (("GET", "/healthz"), ("POST", "/v1/cancel"), ("GET", "/v1/portals")):
        status, _, answer = stack.request(method, target, port=stack.metrics_port,
                                          headers={"Authorization": f"Bearer {API_KEY}"})
        json_error(status, answer, 404, "not_found")
    stored_nothing(redis_conn)


# ---- SANDBOX_MODE --------------------------------------------------------------------------------------------

def test_sandbox_mode_refuses_to_start_with_a_real_portal() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None, sandbox_mode=True, b24_webhook_url="https://shop.bitrix24.com/rest/1/code/",
                      b24_chat_id="chat1")
    message = str(info.value)
    assert "SANDBOX_MODE" in message and "loopback" in message and "/rest/1/code/" not in message
    assert len(message.splitlines()) == 2  # "invalid configuration:" and one line saying why
    loopback = load_settings(_env_file=None, sandbox_mode=True, b24_webhook_url="http://127.0.0.1:8765/rest/1/sandbox/",
                             b24_chat_id="chat1")
    assert loopback.sandbox_mode


# ---- slow and hostile clients ----------------------------------------------------------------------------------

def test_events_are_answered_while_slow_loris_clients_drip(stack: Web, redis_conn: redis.Redis) -> None:
    drips = Drippers(stack.port, count=30, interval=1.0)
    with drips:
        time.sleep(2)
        run = send_events(stack.port, 40, spread=12.0)
    assert run.statuses == [200] * 40
    assert max(run.latencies) < 2.0, sorted(run.latencies)[-5:]
    # The server cut the dripping connections off at its deadline (3 s here) and the attacker came back.
    assert drips.cut_off >= 30
    assert len(list(redis_conn.scan_iter(match="b24c:req:*"))) == 40

