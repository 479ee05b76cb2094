"""Differential test: header acceptance never exceeds the Rust ``safetensors`` library's.

Headers are generated as JSON *text* (so that literals Python's json reads leniently -- ``-0``,
integers >= 2**64, lone surrogate escapes -- can occur), around shapes and offsets at the edges of
64-bit arithmetic. Whatever :func:`parse_safetensors_header` accepts, ``safetensors.deserialize``
must accept with the same table; whatever it refuses is refused with a rule naming the file.
Derandomized and bounded so it runs in a few seconds in CI.
"""

from __future__ import annotations

import io
import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_run.manifests import FindingsError, parse_safetensors_header
from secure_run.manifests.tensors import DTYPE_BITS

EDGE_INTS = ["0", "1", "2", "3", "7", "-0", "-1", "4294967296", "9223372036854775808", "18446744073709551615",
             "18446744073709551616", "1" + "0" * 30, "1.0", "1e2", "true", "null", '"2"']
DTYPES = sorted(DTYPE_BITS)
METADATA_STRINGS = ["pt", "", "\\ud800", "\\udfff", "\\ud83d\\ude00", "é", "\\u0000", "a\\nb"]


@st.composite
def header_and_data(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(0, 4))
    parts: list[str] = []
    offset = 0
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        rank = draw(st.integers(0, 4))
        dims = [draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, 6).map(str))) for _ in range(rank)]
        size = 1
        exact = True
        for d in dims:
            try:
                value = int(d)
            except ValueError:
                exact = False
                break
            size *= max(value, 0)
        nbytes = size * DTYPE_BITS[dtype] // 8 if exact else 0
        nbytes = nbytes if nbytes <= 4096 else 0
        begin, end = str(offset), str(offset + nbytes)
        if draw(st.integers(0, 5)) == 0:
            begin = draw(st.sampled_from(EDGE_INTS))
        if draw(st.integers(0, 5)) == 0:
            end = draw(st.sampled_from(EDGE_INTS))
        offset += nbytes
        parts.append(f'"t{i}": {{"dtype": "{dtype}", "shape": [{", ".join(dims)}], "data_offsets": [{begin}, {end}]}}')
    if draw(st.booleans()):
        key, value = draw(st.sampled_from(METADATA_STRINGS)), draw(st.sampled_from(METADATA_STRINGS))
        parts.insert(draw(st.integers(0, len(parts))), f'"__metadata__": {{"{key}": "{value}"}}')
    header = ("{" + ", ".join(parts) + "}").encode()
    header += b" " * draw(st.integers(0, 7))
    data_len = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return struct.pack("<Q", len(header)) + header + bytes(range(256)) * (max(data_len, 0) // 256) + bytes(max(data_len, 0) % 256)


def reference(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    from safetensors import deserialize

    try:
        return {name: (info["dtype"], tuple(info["shape"])) for name, info in deserialize(data)}
    except Exception:  # the reference raises SafetensorError (and, for some inputs, others)
        return None


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_and_data())
def test_acceptance_never_exceeds_the_reference(data: bytes) -> None:
    try:
        table = parse_safetensors_header(io.BytesIO(data), len(data), "d.safetensors")
    except FindingsError as err:
        assert err.findings[0].path == "d.safetensors"
        assert err.findings[0].rule.startswith("ST-")
        return
    ref = reference(data)
    assert ref is not None, f"accepted but the reference refuses: {data[:300]!r}"
    assert {k: (v.dtype, v.shape) for k, v in table.tensors.items()} == ref


def test_generator_reaches_both_outcomes() -> None:
    """The strategy is useful only if it produces accepted and refused headers (checked, seeded)."""
    outcomes: set[bool] = set()

    @settings(max_examples=150, derandomize=True, deadline=None, database=None)
    @given(header_and_data())
    def probe(data: bytes) -> None:
        try:
            parse_safetensors_header(io.BytesIO(data), len(data), "d.safetensors")
            outcomes.add(True)
        except FindingsError:
            outcomes.add(False)

    probe()
    assert outcomes == {True, False}


def test_known_divergences_are_refusals() -> None:
    """Inputs Python's json reads leniently but the reference refuses: we refuse them too."""
    cases = [
        '{"a": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "U8", "shape": [0], "data_offsets": [-0, 0]}}',
        '{"a": {"dtype": "U8", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "U8", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}}',
        '{"__metadata__": {"k": "\\ud800"}}',
    ]
    for header in cases:
        data = struct.pack("<Q", len(header)) + header.encode()
        assert reference(data) is None, header
        try:
            parse_safetensors_header(io.BytesIO(data), len(data), "d.safetensors")
        except FindingsError:
            continue
        raise AssertionError(f"accepted: {header}")
    ok = json.dumps({"a": {"dtype": "U8", "shape": [0, 4294967296, 4294967296], "data_offsets": [0, 0]}})
    data = struct.pack("<Q", len(ok)) + ok.encode()
    assert reference(data) is not None
    assert parse_safetensors_header(io.BytesIO(data), len(data), "d.safetensors").tensors["a"].nbytes == 0
