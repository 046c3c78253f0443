"""PHP-style key parsing used for query strings, form bodies and batch commands of the sandbox."""

from __future__ import annotations

from sandbox.phpquery import parse_query, split_key


def test_split_key() -> None:
    assert split_key("filter[@id][]") == ["filter", "@id", ""]
    assert split_key("id") == ["id"]
    assert split_key("[x]") == ["[x]"]
    assert split_key("a[b") == ["a"]


def test_nested_keys_lists_and_later_values_win() -> None:
    parsed = parse_query("select[]=id&select[]=status&filter[@id][]=1&filter[@id][]=2&filter[%25title]=a+b"
                         "&order[id]=DESC&id=1&id=2&cmd[0]=x&cmd[1]=y&cmd[a]=z")
    assert parsed == {
        "select": ["id", "status"],
        "filter": {"@id": ["1", "2"], "%title": "a b"},
        "order": {"id": "DESC"},
        "id": "2",
        "cmd": {"0": "x", "1": "y", "a": "z"},
    }


def test_explicit_indexes_make_a_list_and_append_follows_the_largest() -> None:
    assert parse_query("documentIds[0]=3&documentIds[1]=4") == {"documentIds": ["3", "4"]}
    assert parse_query("a[5]=x&a[]=y") == {"a": {"5": "x", "6": "y"}}
    assert parse_query("fields[docType]=A&fields[title]=") == {"fields": {"docType": "A", "title": ""}}
