"""PHP-style parsing of query and form keys: `filter[@id][]=1&select[]=id` becomes nested data.

Bitrix24 is PHP, so `a[b][c]=v`, `a[]=v` (append) and plain `a=v` must mean what `$_REQUEST` makes
of them. Containers whose keys are exactly 0..n-1 become lists, as PHP's json_encode would show them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl


def split_key(key: str) -> list[str]:
    """Split `a[b][]` into `["a", "b", ""]`; a key without a valid bracket part stays whole."""
    start = key.find("[")
    if start <= 0:
        return [key]
    parts = [key[:start]]
    rest = key[start:]
    while rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            break
        parts.append(rest[1:end])
        rest = rest[end + 1:]
    return parts


def _next_index(node: dict[str, Any]) -> str:
    """The key PHP gives to `[]`: one past the largest integer key so far."""
    numbers = [int(k) for k in node if k.lstrip("-").isdigit()]
    return str(max(numbers) + 1) if numbers else "0"


def _insert(root: dict[str, Any], parts: list[str], value: Any) -> None:
    node = root
    for part in parts[:-1]:
        key = part if part != "" else _next_index(node)
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    last = parts[-1]
    node[last if last != "" else _next_index(node)] = value


def _listify(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v) for k, v in value.items()}
    if converted and list(converted) == [str(i) for i in range(len(converted))]:
        return list(converted.values())
    return converted


def parse_pairs(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Nest (key, value) pairs the way PHP fills `$_REQUEST`; later pairs win."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        if key == "":
            continue
        _insert(root, split_key(key), value)
    return {k: _listify(v) for k, v in root.items()}


def parse_query(query: str) -> dict[str, Any]:
    """Parse a URL-encoded query string with PHP key semantics."""
    return parse_pairs(parse_qsl(query, keep_blank_values=True))
