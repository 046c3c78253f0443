"""Pure logic: settings validation, masking, query encoding, error classes, the report text."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import observability
from bitrix24.client import Bitrix24Client, php_query
from bitrix24.errors import Bitrix24Error
from jobs import report
from settings import Portal, SettingsError, key_sha256, load_settings, mask_webhook_url

WEBHOOK = "https://example.bitrix24.com/rest/1/abc123secret/"


def test_settings_name_every_bad_value_on_its_own_line() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None, b24_webhook_url="ftp://x/rest/1/a/", b24_language="fr",
                      trigger_secrets="notwhsec", b24_chat_id="general")
    text = str(info.value)
    for name in ("B24_WEBHOOK_URL", "B24_LANGUAGE", "TRIGGER_SECRETS", "B24_CHAT_ID"):
        assert name in text
    assert "abc" not in text


def test_plain_http_is_only_for_loopback() -> None:
    assert load_settings(_env_file=None, b24_webhook_url="http://127.0.0.1:8765/rest/1/sandbox",
                         b24_chat_id="chat1").portal(None) is not None
    with pytest.raises(SettingsError, match="https"):
        load_settings(_env_file=None, b24_webhook_url="http://example.com/rest/1/code/", b24_chat_id="chat1")


def test_chat_is_required_with_a_webhook() -> None:
    with pytest.raises(SettingsError, match="B24_CHAT_ID"):
        load_settings(_env_file=None, b24_webhook_url=WEBHOOK)


def test_webhook_urls_are_masked() -> None:
    assert mask_webhook_url(WEBHOOK) == "https://example.bitrix24.com/rest/1/****/"
    assert observability.mask(f"calling {WEBHOOK}catalog.document.cancel") == \
        "calling https://example.bitrix24.com/rest/1/****/catalog.document.cancel"
    assert "whsec_" not in observability.mask("secret whsec_QUJDREVG is here")
    assert observability.mask("Authorization: Bearer abc.def") == "Authorization: Bearer ****"


def test_php_query_matches_http_build_query() -> None:
    assert php_query({"id": 5}) == "id=5"
    assert php_query({"filter": {"@id": [1, 2]}, "select": ["id"]}) == \
        "filter[%40id][0]=1&filter[%40id][1]=2&select[0]=id"
    assert php_query({"MESSAGE": "a&b=c #1"}) == "MESSAGE=a%26b%3Dc%20%231"


def fake_client(status: int, body: Any) -> Bitrix24Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body) if not isinstance(body, str) else httpx.Response(status, text=body)

    return Bitrix24Client(WEBHOOK, "p", httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("status, body, code, retryable, ambiguous", [
    (400, {"error": "0", "error_description": "Документ еще не проведен"}, "0", False, False),
    (503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}, "QUERY_LIMIT_EXCEEDED", True,
     False),
    (429, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}, "QUERY_LIMIT_EXCEEDED", True,
     False),
    (429, {"error": "OPERATION_TIME_LIMIT", "error_description": "blocked"}, "OPERATION_TIME_LIMIT", True, False),
    (500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "x"}, "INTERNAL_SERVER_ERROR", True, True),
    (502, "<html>Bad gateway</html>", "BAD_ANSWER", True, True),
    # a proxy's page, or a 2xx the portal may have sent after running the call: it may have run
    (200, "<html>ok</html>", "BAD_ANSWER", True, True),
    (200, [1, 2], "BAD_ANSWER", True, True),
    (408, "<html>Request Timeout</html>", "HTTP_408", True, True),
    (429, "<html>Too Many Requests</html>", "HTTP_429", True, True),
    (429, {"error": "SOMETHING_ELSE", "error_description": "x"}, "HTTP_429", True, True),
    (404, "<html>Not Found</html>", "BAD_ANSWER", False, False),
    (401, {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}, "NO_AUTH_FOUND", False, False),
    (403, {"error": "insufficient_scope", "error_description": "x"}, "insufficient_scope", False, False),
    (503, {"error": "OVERLOAD_LIMIT", "error_description": "x"}, "OVERLOAD_LIMIT", False, False),
    (403, {"error": "PORTAL_DELETED", "error_description": "x"}, "PORTAL_DELETED", False, False),
    (0, httpx.ReadTimeout("t"), "TRANSPORT_TIMEOUT", True, True),
    (0, httpx.RemoteProtocolError("closed"), "TRANSPORT_DROPPED", True, True),
    (0, httpx.ConnectError("refused"), "TRANSPORT_CONNECT", True, False),
])
def test_answers_are_classified_by_code_then_status(status: int, body: Any, code: str, retryable: bool,
                                                   ambiguous: bool) -> None:
    with pytest.raises(Bitrix24Error) as info:
        fake_client(status, body).call("catalog.document.cancel", {"id": 1})
    err = info.value
    assert (err.code, err.retryable, err.ambiguous) == (code, retryable, ambiguous)
    assert "abc123secret" not in str(err)


def test_client_refuses_plain_http_except_to_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        Bitrix24Client("http://example.bitrix24.com/rest/1/x/", "p", httpx.Client())
    Bitrix24Client("http://127.0.0.1:8765/rest/1/x/", "p", httpx.Client())


def test_success_envelope_is_read() -> None:
    answer = fake_client(200, {"result": {"documents": []}, "time": {"operating": 1.5}, "total": 0}).call("x")
    assert answer.result == {"documents": []}
    assert answer.time["operating"] == 1.5
    assert answer.total == 0


def record(outcomes: list[tuple[int, str]], **request: Any) -> dict[str, Any]:
    return {"id": "r" * 32, "request": {"portal": "default", "source": "api", **request},
            "documents": [{"id": i, "outcome": o, "detail": "why" if o != "cancelled" else None, "title": f"T{i}",
                           "docType": "R"} for i, o in outcomes]}


def test_report_names_every_document_with_a_link_and_carries_the_request_id() -> None:
    portal = Portal(name="default", webhook_url=WEBHOOK, chat="chat1")
    text = report.render(record([(1, "cancelled"), (2, "refused")], reason="RMA [b]x[/b]"), portal, 1, "n0nce")
    assert "[url=https://example.bitrix24.com/shop/documents/details/1/]#1 T1[/url]" in text
    assert "refused" in text and "What to do" in text
    assert "RMA (b)x(/b)" in text  # outside text cannot inject BB codes
    assert text.rstrip().endswith("#" + "r" * 32 + " · n0nce")
    assert "abc123secret" not in text


def test_report_speaks_russian_and_stays_under_the_message_limit() -> None:
    portal = Portal(name="default", webhook_url=WEBHOOK, chat="chat1", language="ru")
    text = report.render(record([(i, "failed") for i in range(1, 501)], reason="x" * 900), portal, 1, "n0nce")
    assert "Не удалось" in text
    assert len(text) < 20_000
    assert "ещё" in text


@pytest.mark.parametrize("name, value", [
    ("request_ttl_days", 0), ("request_ttl_days", 8), ("b24_rate_limit", 0), ("b24_rate_burst", 0), ("b24_read_timeout", 0),
    ("b24_operating_margin", 500),
])
def test_settings_that_would_break_jobs_are_refused_at_start(name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=name.upper()):
        load_settings(_env_file=None, **{name: value})


CALLERS_PORTAL = """
[portals.shop]
webhook_url = "https://shop.bitrix24.com/rest/1/shopcode/"
chat = "chat1"
"""


def test_callers_are_validated_one_line_per_problem_without_secrets(tmp_path: Any) -> None:
    path = tmp_path / "portals.toml"
    k1, k2, k3, k5 = (key_sha256(k) for k in ("k1", "k2", "k3", "k5"))
    path.write_text(CALLERS_PORTAL + f"""
[callers.a]
key_sha256 = "ABCDEF"
portals = ["elsewhere"]
[callers.b]
secret = "notwhsec-topsecret"
[callers.c]
key_sha256 = "{k1}"
chats = ["12"]
[callers.d]
portals = ["shop"]
[callers.bitrix24]
key_sha256 = "{k2}"
[callers.g]
key_sha256 = "{k5}"
[callers.e]
key_sha256 = "{k5}"
[callers.f]
key_sha256 = "{k3}"
colour = "red"
""")
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None, b24_portals_file=str(path))
    lines = str(info.value).splitlines()[1:]
    expected = ["callers.a.key_sha256", "callers.a.portals", "callers.b.secret", "callers.c.chats", "callers.d",
                "'bitrix24' is reserved", "callers.f.colour", "callers.e.key_sha256: the same credential"]
    for part in expected:
        assert sum(part in line for line in lines) == 1, (part, lines)
    assert "topsecret" not in str(info.value)


def test_trigger_keys_make_the_admin_caller_default_beside_the_files_callers(tmp_path: Any) -> None:
    path = tmp_path / "portals.toml"
    path.write_text(CALLERS_PORTAL + f"""
[portals.shop2]
webhook_url = "https://shop2.bitrix24.com/rest/1/shopcode/"
chat = "chat2"
chats = ["chat5"]
[callers.warehouse]
key_sha256 = ["{key_sha256("old")}", "{key_sha256("new")}"]
portals = ["shop"]
chats = ["chat7"]
""")
    settings = load_settings(_env_file=None, b24_portals_file=str(path), trigger_api_keys="k1,k2")
    default, warehouse = settings.callers["default"], settings.callers["warehouse"]
    assert default.admin and default.may_use("shop2") and default.key_hashes == (key_sha256("k1"), key_sha256("k2"))
    assert not warehouse.admin and warehouse.may_use("shop") and not warehouse.may_use("shop2")
    assert warehouse.chats == {"chat7"} and settings.portals["shop2"].chats == {"chat5"}
    assert "old" not in repr(warehouse) or key_sha256("old") in repr(warehouse)  # hashes only, never keys
    with pytest.raises(SettingsError, match="both define the caller 'default'"):
        path.write_text(CALLERS_PORTAL + f'[callers.default]\nkey_sha256 = "{key_sha256("x")}"\n')
        load_settings(_env_file=None, b24_portals_file=str(path), trigger_api_keys="k1")


def test_new_key_prints_a_key_whose_hash_makes_a_working_caller(tmp_path: Any) -> None:
    import re

    from app import create_app

    app = create_app({"_env_file": None, "redis_url": "redis://127.0.0.1:9/0",
                      "b24_webhook_url": WEBHOOK, "b24_chat_id": "chat1", "trigger_api_keys": "k1"})
    out = app.test_cli_runner().invoke(args=["new-key", "warehouse"]).output
    key = out.splitlines()[1].strip()
    assert len(key) >= 40
    section = out[out.index("[callers.warehouse]"):]
    assert f'key_sha256 = "{key_sha256(key)}"' in section and key not in section
    path = tmp_path / "portals.toml"
    path.write_text(CALLERS_PORTAL + section.replace("portals = []", 'portals = ["shop"]'))
    caller = load_settings(_env_file=None, b24_portals_file=str(path)).callers["warehouse"]
    assert caller.key_hashes == (key_sha256(key),) and caller.may_use("shop") and not caller.admin
    again = app.test_cli_runner().invoke(args=["new-key", "warehouse"]).output
    assert again.splitlines()[1].strip() != key
    assert "add this key to it" in app.test_cli_runner().invoke(args=["new-key", "default"]).output
    path.write_text(CALLERS_PORTAL + f'[callers.warehouse]\nkey_sha256 = "{key_sha256("k1")}"\n')
    filed = create_app({"_env_file": None, "redis_url": "redis://127.0.0.1:9/0", "b24_portals_file": str(path)})
    rotate = filed.test_cli_runner().invoke(args=["new-key", "warehouse"]).output
    assert re.search(rf'key_sha256 = \["{key_sha256("k1")}", "[0-9a-f]{{64}}"\]', rotate)


class NoWaitGate:
    """A gate that never waits: the client's own deadline is what stops its resends."""

    max_sleep = 0.0

    def before(self, methods: Any) -> None:
        pass

    def after(self, method: str, timing: Any) -> None:
        pass

    def rate_limited(self) -> None:
        pass

    def operating_limited(self, method: str, reset_at: float | None) -> float:
        return 0.0


def test_resends_stop_when_the_call_deadline_would_be_passed() -> None:
    sends: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sends.append(time.monotonic())
        time.sleep(0.3)
        return httpx.Response(503, json={"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})

    http = httpx.Client(transport=httpx.MockTransport(handler), timeout=httpx.Timeout(0.2))
    client = Bitrix24Client(WEBHOOK, "p", http, NoWaitGate(), deadline=1.2)
    started = time.monotonic()
    with pytest.raises(Bitrix24Error) as info:
        client.call("im.message.add", {"MESSAGE": "x"})
    assert time.monotonic() - started < 1.2  # within the deadline, resends included
    assert len(sends) == 3  # not the 5 that RATE_LIMIT_RESENDS alone would allow
    assert (info.value.code, info.value.retryable, info.value.ambiguous) == ("QUERY_LIMIT_EXCEEDED", True, False)


def test_a_guard_that_refuses_stops_the_send() -> None:
    sends: list[httpx.Request] = []

    def refuse() -> None:
        raise RuntimeError("lease lost")

    http = httpx.Client(transport=httpx.MockTransport(lambda request: sends.append(request) or httpx.Response(200)))
    with pytest.raises(RuntimeError, match="lease lost"):
        Bitrix24Client(WEBHOOK, "p", http, before_send=refuse).call("catalog.document.cancel", {"id": 1})
    assert sends == []
