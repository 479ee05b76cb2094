"""Hardened YAML reading: ``yaml.safe_load`` semantics plus refusals for the known YAML attacks.

Refused on top of what :class:`yaml.SafeLoader` already refuses (arbitrary Python tags):

* input larger than ``max_bytes`` or not valid UTF-8;
* **aliases and anchors** (``&a`` / ``*a``): the "billion laughs" YAML bomb is built from them,
  and no policy needs them;
* **duplicate mapping keys** (PyYAML silently keeps the last one, which lets a second
  ``mode: audit`` hide behind a reviewed ``mode: enforce``);
* non-string mapping keys, nesting deeper than ``max_depth``, and any value type other than
  str / int / float / bool / None / date / list / mapping (``!!binary``, ``!!set``, timestamps
  with a time part ...);
* dates that do not exist (``2024-02-30``) and integer literals longer than
  :data:`MAX_INT_CHARS` characters (a 5,000-digit number): refused with rule ``yaml.safe`` and
  the line, instead of the ``ValueError`` PyYAML / Python raise.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from .errors import PolicyFileError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
#: Longest integer literal accepted (policies and model cards need small numbers only; Python
#: refuses to convert more than 4300 digits and would raise instead of refusing).
MAX_INT_CHARS = 64


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases/anchors and duplicate keys while composing."""

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _Refused(f"YAML aliases are refused (alias at line {event.start_mark.line + 1})")
        event = self.peek_event()  # type: ignore[no-untyped-call]
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(f"YAML anchors are refused (anchor &{anchor} at line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _Refused(f"mapping key {key!r} at line {key_node.start_mark.line + 1} is not a string")
            if key in seen:
                raise _Refused(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


    def construct_checked_int(self, node: ScalarNode) -> Any:
        text = str(node.value)
        if len(text) > MAX_INT_CHARS:
            raise _Refused(
                f"integer of {len(text)} characters at line {node.start_mark.line + 1} (limit {MAX_INT_CHARS}); quote it if it is text"
            )
        return self.construct_yaml_int(node)

    def construct_checked_timestamp(self, node: ScalarNode) -> Any:
        try:
            return self.construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as err:
            raise _Refused(
                f"{str(node.value)[:40]!r} at line {node.start_mark.line + 1} is not a valid date ({err}); quote it if it is text"
            ) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_checked_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _StrictLoader.construct_checked_timestamp)


class _Refused(Exception):
    """Internal signal: a refusal found while composing (turned into PolicyFileError)."""


def _check_tree(value: object, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(f"nesting deeper than {MAX_DEPTH} levels at {where}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_tree(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_tree(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, _dt.datetime) or not isinstance(value, str | int | float | bool | _dt.date | None):
        raise _Refused(f"value of type {type(value).__name__} at {where} is not allowed (plain data only)")


def load_yaml(data: bytes, *, source: str, max_bytes: int = MAX_BYTES) -> Any:
    """Parse one YAML document from ``data`` with the refusals listed in the module docstring.

    Args:
        data: the raw file bytes.
        source: name used in error messages (the file path).
        max_bytes: refuse larger inputs.

    Returns:
        Plain data (dict / list / scalars).

    Raises:
        PolicyFileError: with rule ``yaml.safe`` naming the offending construct.
    """
    if len(data) > max_bytes:
        raise PolicyFileError(
            f"{source}: {len(data)} bytes is larger than the {max_bytes}-byte limit for YAML files",
            path=source,
            rule="yaml.safe",
            hint="policy files are small; check that the right file was given",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicyFileError(f"{source}: not valid UTF-8 ({err.reason} at byte {err.start})", path=source, rule="yaml.safe") from None
    text = text.removeprefix("\ufeff")
    try:
        # _StrictLoader derives from SafeLoader: no Python object tags can be constructed.
        loader = _StrictLoader(text)
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
        _check_tree(value, "$", 0)
    except _Refused as err:
        raise PolicyFileError(
            f"{source}: {err}", path=source, rule="yaml.safe", hint="write plain YAML: no anchors/aliases, unique keys"
        ) from None
    except RecursionError:
        raise PolicyFileError(f"{source}: YAML nesting is too deep", path=source, rule="yaml.safe") from None
    except yaml.YAMLError as err:
        raise PolicyFileError(f"{source}: invalid YAML: {err}", path=source, rule="yaml.syntax") from None
    except (ValueError, OverflowError) as err:  # a scalar a constructor cannot convert
        raise PolicyFileError(f"{source}: invalid YAML value: {err}", path=source, rule="yaml.syntax") from None
    return value
