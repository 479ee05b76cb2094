"""The hardened YAML loader: YAML bombs, duplicate keys, Python tags, odd types are refused."""

from __future__ import annotations

import datetime as dt

import pytest

from secure_run.policies._yaml import MAX_BYTES, load_yaml
from secure_run.policies.errors import PolicyFileError


def refused(data: bytes) -> PolicyFileError:
    with pytest.raises(PolicyFileError) as info:
        load_yaml(data, source="p.yaml")
    assert info.value.path == "p.yaml"
    assert info.value.exit_code == 2
    return info.value


def test_plain_data_loads() -> None:
    assert load_yaml(b"a: 1\nb: [x, 2.5, true, null]\nc: 2026-12-31\n", source="p.yaml") == {
        "a": 1,
        "b": ["x", 2.5, True, None],
        "c": dt.date(2026, 12, 31),
    }


def test_billion_laughs_is_refused_at_the_first_anchor() -> None:
    bomb = b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(ord("b"), ord("j")):
        prev = chr(i - 1)
        bomb += f"{chr(i)}: &{chr(i)} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n".encode()
    err = refused(bomb)
    assert err.rule == "yaml.safe"
    assert "anchors are refused" in err.message


def test_alias_without_anchor_syntax_is_refused() -> None:
    err = refused(b"base: &b {mode: enforce}\nspec: *b\n")
    assert "anchor" in err.message


def test_merge_key_is_refused() -> None:
    assert "refused" in refused(b"x: &x {a: 1}\ny:\n  <<: *x\n").message


def test_duplicate_key_is_refused_with_line() -> None:
    err = refused(b"spec:\n  mode: enforce\n  mode: audit\n")
    assert err.message == "p.yaml: duplicate key 'mode' at line 3"


def test_python_tags_are_refused() -> None:
    err = refused(b"!!python/object/apply:os.system ['echo pwned']\n")
    assert err.rule == "yaml.syntax"
    assert "could not determine a constructor" in err.message


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"a: !!binary aGVsbG8=\n", "bytes"),
        (b"a: !!set {x, y}\n", "set"),
        (b"a: 2026-01-01 10:00:00\n", "datetime"),
    ],
)
def test_non_plain_values_are_refused(data: bytes, what: str) -> None:
    assert f"value of type {what} at $.a is not allowed" in refused(data).message


def test_non_string_key_is_refused() -> None:
    assert "mapping key 1 at line 1 is not a string" in refused(b"1: x\n").message


def test_oversized_and_deeply_nested_inputs_are_refused() -> None:
    assert "larger than" in refused(b"a: " + b"x" * MAX_BYTES).message
    assert "nesting deeper" in refused(b"a: " + b"[" * 40 + b"]" * 40).message


def test_invalid_utf8_is_refused() -> None:
    assert "not valid UTF-8" in refused(b"a: \xff\n").message
