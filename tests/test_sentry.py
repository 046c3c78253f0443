"""Sentry over real parts: a real worker sends envelopes to a local endpoint; no secret leaves the process."""

from __future__ import annotations

import gzip
import json
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sentry_sdk.envelope import Envelope

import devenv
from app import create_app
from tests.helpers import API_KEY, SandboxView, bearer, wait_for
from tests.test_pipeline import finished, service_env


class EnvelopeSink:
    """A local HTTP endpoint that keeps every Sentry envelope posted to it."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # type: ignore[import-not-found]

                    body = brotli.decompress(body)
                sink.raw.append(body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.raw:
            for item in Envelope.deserialize(raw).items:
                if item.headers.get("type") == "event" and item.payload.json:
                    found.append(item.payload.json)
        return found

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sink() -> Iterator[EnvelopeSink]:
    sink = EnvelopeSink()
    yield sink
    sink.close()


def test_permanently_failed_job_sends_exactly_one_event_without_secrets(
        redis_proc: devenv.Process, sandbox: devenv.Process, sink: EnvelopeSink, tmp_path: Path) -> None:
    portal = SandboxView(sandbox.url)
    portal.permissions(scopes=["im"])  # every cancel fails with insufficient_scope: permanent
    env = service_env(redis_proc.url, sandbox.extra["webhook"], SENTRY_DSN=sink.dsn)
    log = tmp_path / "worker.log"
    worker = devenv.start_worker(env, log=log)
    try:
        app = create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_webhook_url": sandbox.extra["webhook"],
                          "b24_chat_id": "chat1", "trigger_api_keys": API_KEY})
        client = app.test_client()
        response = client.post("/v1/cancel", json={"document_ids": [2], "reason": "sentry"},
                               headers={**bearer(), "Idempotency-Key": "sentry-1"})
        request_id = response.get_json()["request_id"]
        state = finished(client, request_id)
        assert state["state"] == "failed"
        wait_for(sink.events, timeout=15, what="a Sentry event")
        time.sleep(2)  # room for a second event, which must not come
    finally:
        worker.stop()
    events = sink.events()
    assert len(events) == 1
    event = events[0]
    assert event["exception"]["values"][-1]["type"] == "RequestFailed"
    assert "insufficient_scope" in event["exception"]["values"][-1]["value"]
    everything = b"".join(sink.raw) + log.read_bytes()
    assert b"/rest/1/sandbox/" not in everything
    assert API_KEY.encode() not in everything
    assert b"/rest/1/****/" in log.read_bytes()  # the worker names its portal by the masked URL


def test_unhandled_web_error_sends_one_event(redis_proc: devenv.Process, sink: EnvelopeSink,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sentry_sdk

    app = create_app({"_env_file": None, "redis_url": redis_proc.url,
                      "b24_webhook_url": "http://127.0.0.1:9/rest/1/webcode123/", "b24_chat_id": "chat1",
                      "trigger_api_keys": API_KEY, "sentry_dsn": sink.dsn})

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("storage exploded near http://127.0.0.1:9/rest/1/webcode123/")

    monkeypatch.setattr(app.extensions["b24cancel"].submitter, "submit", boom)
    try:
        response = app.test_client().post("/v1/cancel", json={"document_ids": [1]}, headers=bearer())
        assert response.status_code == 500
        assert response.get_json()["error"] == "internal_error"
        sentry_sdk.flush(5)
        events = wait_for(sink.events, timeout=10, what="a Sentry event")
        assert len(events) == 1
        raw = b"".join(sink.raw)
        assert b"webcode123" not in raw
        assert API_KEY.encode() not in raw
    finally:
        sentry_sdk.init(dsn=None)


def horse_of(worker: devenv.Process) -> int | None:
    """The worker's work-horse: its child that runs in a process group of its own (RQ calls setpgrp)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid, pgid = int(stat.parent.name), int(fields[1]), int(fields[2])
        if ppid == worker.pid and pgid == pid:
            return pid
    return None


def test_killed_work_horse_is_reported_and_its_request_still_completes_once(
        redis_proc: devenv.Process, sandbox: devenv.Process, sink: EnvelopeSink, tmp_path: Path) -> None:
    portal = SandboxView(sandbox.url)
    portal.faults({"kind": "slow", "method": "batch", "times": 1, "seconds": 8})
    env = service_env(redis_proc.url, sandbox.extra["webhook"], SENTRY_DSN=sink.dsn, B24_READ_TIMEOUT="30")
    worker = devenv.start_worker(env, log=tmp_path / "worker.log")
    try:
        app = create_app({"_env_file": None, "redis_url": redis_proc.url, "b24_webhook_url": sandbox.extra["webhook"],
                          "b24_chat_id": "chat1", "trigger_api_keys": API_KEY})
        client = app.test_client()
        response = client.post("/v1/cancel", json={"document_ids": [4], "reason": "kill"},
                               headers={**bearer(), "Idempotency-Key": "kill-horse"})
        request_id = response.get_json()["request_id"]
        wait_for(lambda: portal.calls("batch"), timeout=20, what="the slow cancel batch to start")
        horse = wait_for(lambda: horse_of(worker), timeout=10, what="the work-horse")
        os.kill(horse, signal.SIGKILL)
        state = finished(client, request_id, timeout=60)
        assert state["state"] == "done"
        assert [d["outcome"] for d in state["documents"]] == ["cancelled"]
        assert len([c for c in portal.calls("catalog.document.cancel") if c.get("applied")]) == 1
        assert len([m for m in portal.messages() if request_id in m["message"]]) == 1
        events = wait_for(sink.events, timeout=15, what="the Sentry event for the killed horse")
    finally:
        worker.stop()
    assert len(events) == 1
    assert "work-horse killed" in json.dumps(events[0])
