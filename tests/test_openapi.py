"""The contract: the OpenAPI document validates, covers every route, matches the README's curl examples, and
schemathesis finds no mismatch between it and the real web process (a short seeded run; `make bench` runs
a long one)."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

import devenv
from bench.contract import run_schemathesis, web_stack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def web(redis_proc: devenv.Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("contract")
    with web_stack(tmp, redis_proc.url) as url:
        yield url, tmp


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()


@pytest.fixture(scope="module")
def document(web: tuple[str, Path]) -> dict[str, Any]:
    status, kind, body = get(f"{web[0]}/openapi.json")
    assert status == 200 and kind.startswith("application/json")
    return dict(json.loads(body))


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation


def test_every_route_of_the_app_is_in_the_document(document: dict[str, Any], redis_url: str) -> None:
    import app as app_module

    app = app_module.create_app({"redis_url": redis_url, "trigger_api_keys": "k",
                                 "b24_webhook_url": "http://127.0.0.1:9/rest/1/x/", "b24_chat_id": "chat1"})
    documented = {(re.sub(r"\{(\w+)\}", r"<\1>", path), method.upper()) for path, item in document["paths"].items()
                  for method in item}
    served = {(rule.rule, method) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    served -= {("/docs/redoc.standalone.js", "GET")}  # the page's own script
    assert served <= documented, served - documented
    assert documented <= served, documented - served


def test_every_documented_refusal_uses_the_error_body(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)


def test_docs_page_is_served_without_any_outside_address(web: tuple[str, Path]) -> None:
    status, kind, page = get(f"{web[0]}/docs")
    assert status == 200 and kind.startswith("text/html")
    sources = re.findall(rb'(?:src|href|spec-url)="([^"]+)"', page)
    assert sources and all(source.startswith(b"/") for source in sources), sources
    status, kind, script = get(f"{web[0]}/docs/redoc.standalone.js")
    assert status == 200 and len(script) > 500_000 and b"Redoc" in script[:5000] + script[-5000:]


def shell_commands(text: str) -> Iterator[list[str]]:
    """The commands of the ```sh blocks in a Markdown text, as argument lists (continuations and multi-line
    quotes joined, comments skipped)."""
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        pending = ""
        for line in block.splitlines():
            pending += ("\n" if pending else "") + line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            pending = ""
            if words:
                yield words


def readme_curls() -> list[tuple[str, str, dict[str, str], str | None]]:
    """(method, path, headers, body) of each curl command in README.md that calls the service."""
    found = []
    for words in shell_commands((ROOT / "README.md").read_text()):
        if words[0] != "curl":
            continue
        url = next((w for w in words[1:] if "://" in w or w.startswith("$")), "")
        path = re.sub(r"^(?:https?://[^/]+|\$\w+|\$\{\w+\})", "", url)
        if not path.startswith("/") or path.startswith("/_sandbox"):
            continue
        method, headers, body = "GET", {}, None
        for flag, value in itertools.pairwise(words):
            if flag == "-X":
                method = value
            elif flag == "-H":
                name, _, header_value = value.partition(":")
                headers[name.strip().lower()] = header_value.strip()
            elif flag in ("-d", "--data", "--data-binary", "--data-raw"):
                body = value
                method = "POST" if method == "GET" else method
        found.append((method, path.split("?")[0], headers, body))
    return found


def test_every_readme_curl_example_matches_the_document(document: dict[str, Any]) -> None:
    examples = readme_curls()
    assert len(examples) >= 4, examples  # the README shows the API with curl
    components = document["components"]
    for method, path, headers, body in examples:
        operation = None
        for template, item in document["paths"].items():
            if re.fullmatch(re.sub(r"\{\w+\}", r"[^/]+", template), path):
                operation = item.get(method.lower())
        assert operation is not None, f"README: {method} {path} is not in the document"
        if body is not None and headers.get("content-type") == "application/json":
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            validator = Draft202012Validator({**schema, "components": components})
            errors = [error.message for error in validator.iter_errors(json.loads(body))]
            assert not errors, f"README: the body of {method} {path} does not match the document: {errors}"


def test_schemathesis_finds_no_mismatch(web: tuple[str, Path]) -> None:
    url, tmp = web
    result = run_schemathesis(url, tmp, examples=10, seed=20261202, max_time=45)
    summary = "\n".join(result.stdout.splitlines()[-60:])
    assert result.returncode == 0, summary
    assert "API Operations" in result.stdout and "Tested: 10" in result.stdout, summary
