"""OAuth app mode and outgoing events of the sandbox portal."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import httpx
import pytest


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def issue(http: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    answer = http.post(f"{url}/_sandbox/oauth/tokens", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_issued_tokens_work_in_query_form_and_json(sandbox: Any, http: httpx.Client) -> None:
    pair = issue(http, sandbox.url)
    assert set(pair) >= {"access_token", "refresh_token", "expires_in", "client_id", "client_secret",
                         "client_endpoint", "server_endpoint", "member_id", "domain"}
    assert (pair["client_id"], pair["client_secret"]) == ("sandbox-client", "sandbox-secret")
    assert pair["client_endpoint"] == f"{sandbox.url}/rest/"
    assert pair["server_endpoint"] == f"{sandbox.url}/oauth/" and pair["expires_in"] == 3600
    token = pair["access_token"]
    assert http.get(f"{sandbox.url}/rest/scope", params={"auth": token}).json()["result"]
    by_form = http.post(f"{sandbox.url}/rest/catalog.document.cancel.json", data={"id": "1", "auth": token})
    assert by_form.json()["result"] is True
    by_json = http.post(f"{sandbox.url}/rest/catalog.document.cancel", json={"id": 2, "auth": token})
    assert by_json.json()["result"] is True
    calls = http.get(f"{sandbox.url}/_sandbox/calls").json()
    assert {c["auth"] for c in calls} == {"oauth"}
    assert token not in str(calls) and "auth" not in str([c["params"] for c in calls])


def test_token_errors(sandbox: Any, http: httpx.Client) -> None:
    missing = http.post(f"{sandbox.url}/rest/scope", json={})
    assert missing.status_code == 401 and missing.json()["error"] == "NO_AUTH_FOUND"
    unknown = http.post(f"{sandbox.url}/rest/scope", json={"auth": "nope"})
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_token"
    short = issue(http, sandbox.url, lifetime=1)
    assert http.post(f"{sandbox.url}/rest/scope", json={"auth": short["access_token"]}).status_code == 200
    time.sleep(1.1)
    expired = http.post(f"{sandbox.url}/rest/catalog.document.cancel",
                        json={"id": 3, "auth": short["access_token"]})
    assert expired.status_code == 401
    assert expired.json() == {"error": "expired_token",
                              "error_description": "The access token provided has expired."}
    assert http.get(f"{sandbox.url}/_sandbox/documents/3").json()["status"] == "Y"


def test_refresh_rotates_both_tokens_once(sandbox: Any, http: httpx.Client) -> None:
    pair = issue(http, sandbox.url, lifetime=1)
    query = {"grant_type": "refresh_token", "client_id": "sandbox-client", "client_secret": "sandbox-secret",
             "refresh_token": pair["refresh_token"]}
    answer = http.get(f"{sandbox.url}/oauth/token/", params=query)
    assert answer.status_code == 200, answer.text
    fresh = answer.json()
    assert set(fresh) == {"access_token", "refresh_token", "expires", "expires_in", "client_endpoint",
                          "server_endpoint", "domain", "member_id", "scope", "status", "user_id"}
    assert fresh["access_token"] != pair["access_token"] and fresh["refresh_token"] != pair["refresh_token"]
    assert fresh["expires_in"] == 3600 and fresh["expires"] >= int(time.time()) + 3590
    # The answer comes from the OAuth server: `domain` is that server's; the portal is client_endpoint.
    assert fresh["domain"] == "oauth.bitrix.info" and fresh["client_endpoint"] == f"{sandbox.url}/rest/"
    assert http.post(f"{sandbox.url}/rest/scope", json={"auth": fresh["access_token"]}).status_code == 200

    reused = http.get(f"{sandbox.url}/oauth/token/", params=query)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    wrong = http.get(f"{sandbox.url}/oauth/token/", params={**query, "client_secret": "guess",
                                                            "refresh_token": fresh["refresh_token"]})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    stats = http.get(f"{sandbox.url}/_sandbox/stats").json()
    assert stats["oauth_refreshes"] == 3 and stats["oauth_refresh_errors"] == 2
    assert stats["requests"] == 1  # the refresh endpoint is not a /rest call


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, list[tuple[str, str]]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.received.append((self.path, self.headers.get("Content-Type", ""), parse_qsl(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"queued")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[Any]]]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()
    server.server_close()


def test_event_is_posted_form_encoded_like_bitrix24(sandbox: Any, http: httpx.Client,
                                                   receiver: tuple[str, list[Any]]) -> None:
    base, received = receiver
    answer = http.post(f"{sandbox.url}/_sandbox/events/send",
                       json={"url": f"{base}/b24/events?x=1", "event": "onCrmDealUpdate", "id": 12,
                             "ts": 1766047124})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == 200 and result["body"] == "queued" and result["elapsed_ms"] >= 0
    path, content_type, fields = received[0]
    assert path == "/b24/events?x=1" and content_type == "application/x-www-form-urlencoded"
    port = sandbox.url.rsplit(":", 1)[1]
    assert fields == [
        ("event", "ONCRMDEALUPDATE"), ("event_handler_id", "1"), ("data[FIELDS][ID]", "12"),
        ("ts", "1766047124"), ("auth[domain]", f"127.0.0.1:{port}"),
        ("auth[client_endpoint]", f"{sandbox.url}/rest/"), ("auth[server_endpoint]", f"{sandbox.url}/oauth/"),
        ("auth[member_id]", "5a4d1b0c9e8f7a6b5c4d3e2f1a0b9c8d"),
        ("auth[application_token]", "sandbox-app-token"),
    ]
    http.post(f"{sandbox.url}/_sandbox/events/send",
              json={"url": f"{base}/b24", "event": "ONCRMDEALUPDATE", "id": 13,
                    "application_token": "forged"})
    assert dict(received[1][2])["auth[application_token]"] == "forged"


@pytest.mark.parametrize("url", ["http://example.com/hook", "http://10.0.0.1/hook", "http://8.8.8.8:80/",
                                 "ftp://127.0.0.1/", "http://127.0.0.1.example.com/"])
def test_events_go_only_to_this_machine(sandbox: Any, http: httpx.Client, url: str) -> None:
    answer = http.post(f"{sandbox.url}/_sandbox/events/send",
                       json={"url": url, "event": "ONCRMDEALUPDATE", "id": 1})
    assert answer.status_code == 400
    assert answer.elapsed.total_seconds() < 1


def test_event_to_a_closed_port_reports_the_failure(sandbox: Any, http: httpx.Client) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    answer = http.post(f"{sandbox.url}/_sandbox/events/send",
                       json={"url": f"http://127.0.0.1:{port}/", "event": "ONCRMDEALUPDATE", "id": 1})
    assert answer.status_code == 502 and answer.json()["status"] is None
