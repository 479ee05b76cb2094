"""Strict safetensors header checks H1-H14, the polyglot check, the index cross-check, and
property tests (hypothesis) against the reference safetensors library."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mf_helpers import st_bytes, st_raw
from safetensors.numpy import load as st_load

from secure_run.manifests import (
    FindingsError,
    check_shard_index,
    parse_safetensors_header,
    parse_shard_index,
    read_safetensors_header,
)
from secure_run.manifests.tensors import DTYPE_BITS


def parse(data: bytes):  # type: ignore[no-untyped-def]
    return parse_safetensors_header(io.BytesIO(data), len(data), "t.safetensors")


def rule_of(data: bytes) -> str:
    with pytest.raises(FindingsError) as err:
        parse(data)
    assert err.value.findings[0].path == "t.safetensors"
    return err.value.findings[0].rule


def entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}


def test_valid_table(tmp_path: Path) -> None:
    data = st_bytes({"a": ("F32", [2, 3]), "b": ("F16", [4]), "empty": ("I64", [0])}, {"format": "pt"})
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    h = read_safetensors_header(path)
    n = struct.unpack("<Q", data[:8])[0]
    assert h.header_len == n and h.data_start == 8 + n and h.file_size == len(data)
    assert h.metadata == {"format": "pt"}
    a, b = h.tensors["a"], h.tensors["b"]
    assert (a.dtype, a.shape, a.begin, a.end, a.start, a.nbytes, a.numel) == ("F32", (2, 3), 0, 24, 8 + n, 24, 6)
    assert (b.begin, b.end) == (24, 32)
    assert h.tensors["empty"].nbytes == 0
    # the table's offsets read exactly what the reference library returns
    ref = st_load(data)
    raw = data[a.start : a.start + a.nbytes]
    assert np.frombuffer(raw, dtype="<f4").reshape(2, 3).tobytes() == ref["a"].tobytes()


def test_zero_rank_and_sub_byte(tmp_path: Path) -> None:
    hdr = json.dumps({"s": entry("F32", [], [0, 4]), "f4": entry("F4", [4], [4, 6])})
    assert set(parse(st_raw(hdr, bytes(6))).tensors) == {"s", "f4"}
    odd = json.dumps({"f4": entry("F4", [3], [0, 2])})  # 12 bits: not a whole number of bytes
    assert rule_of(st_raw(odd, bytes(2))) == "ST-H11"


CASES: list[tuple[str, bytes, str]] = [
    ("H1 short file", b"\x01\x00\x00", "ST-H1"),
    ("H2 length > file", st_raw("{}", n=1000), "ST-H2"),
    ("H2 length > 100 MB", struct.pack("<Q", 100_000_001) + b"{}", "ST-H2"),
    ("H2 length 0", struct.pack("<Q", 0), "ST-H2"),
    ("H3 invalid utf-8", st_raw(b'{"\xff": 1}'), "ST-H3"),
    ("H4 leading space", st_raw(' {"a": ' + json.dumps(entry()) + "}", bytes(8)), "ST-H4"),
    ("H4 NUL padding", st_raw('{"a": ' + json.dumps(entry()) + "}\x00\x00", bytes(8)), "ST-H4"),
    ("H4 text after object", st_raw('{"a": ' + json.dumps(entry()) + "} x", bytes(8)), "ST-H4"),
    ("H4 array header", st_raw("[1, 2]"), "ST-H4"),
    ("H5 duplicate key", st_raw('{"a": ' + json.dumps(entry()) + ', "a": ' + json.dumps(entry()) + "}", bytes(8)), "ST-H5"),
    ("H5 NaN", st_raw('{"__metadata__": {"x": NaN}}'), "ST-H5"),
    ("H5 broken json", st_raw('{"a": '), "ST-H5"),
    ("H6 extra key", st_raw(json.dumps({"a": {**entry(), "x": 1}}), bytes(8)), "ST-H6"),
    ("H6 missing key", st_raw(json.dumps({"a": {"dtype": "F32", "shape": [2]}}), bytes(8)), "ST-H6"),
    ("H6 entry not object", st_raw(json.dumps({"a": [1]})), "ST-H6"),
    ("H7 unknown dtype", st_raw(json.dumps({"a": entry("F128")}), bytes(8)), "ST-H7"),
    ("H7 lowercase dtype", st_raw(json.dumps({"a": entry("f32")}), bytes(8)), "ST-H7"),
    ("H8 negative dim", st_raw(json.dumps({"a": entry(shape=[-2])}), bytes(8)), "ST-H8"),
    ("H8 bool dim", st_raw(json.dumps({"a": entry(shape=[True, 2])}), bytes(8)), "ST-H8"),
    ("H8 float dim", st_raw(json.dumps({"a": entry(shape=[2.0])}), bytes(8)), "ST-H8"),
    ("H8 rank 17", st_raw(json.dumps({"a": entry(shape=[1] * 17, offsets=[0, 4])}), bytes(4)), "ST-H8"),
    ("H9 begin > end", st_raw(json.dumps({"a": entry(offsets=[8, 0])}), bytes(8)), "ST-H9"),
    ("H9 negative", st_raw(json.dumps({"a": entry(offsets=[-8, 0])}), bytes(8)), "ST-H9"),
    ("H9 three offsets", st_raw(json.dumps({"a": entry(offsets=[0, 4, 8])}), bytes(8)), "ST-H9"),
    ("H10 hole", st_raw(json.dumps({"a": entry(offsets=[4, 12])}), bytes(12)), "ST-H10"),
    (
        "H10 overlap",
        st_raw(json.dumps({"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])}), bytes(12)),
        "ST-H10",
    ),
    ("H11 size mismatch", st_raw(json.dumps({"a": entry(shape=[3], offsets=[0, 8])}), bytes(8)), "ST-H11"),
    ("H12 metadata int", st_raw(json.dumps({"__metadata__": {"a": 1}})), "ST-H12"),
    ("H12 metadata list", st_raw(json.dumps({"__metadata__": ["a"]})), "ST-H12"),
    ("H12 metadata key too long", st_raw(json.dumps({"__metadata__": {"k" * 2000: "v"}})), "ST-H12"),
    ("H13 trailing bytes", st_raw(json.dumps({"a": entry()}), bytes(9)), "ST-H13"),
    ("H13 truncated", st_raw(json.dumps({"a": entry()}), bytes(7)), "ST-H13"),
    ("H14 space in name", st_raw(json.dumps({"a b": entry()}), bytes(8)), "ST-H14"),
    ("H14 non-ascii name", st_raw(json.dumps({"wé": entry()}), bytes(8)), "ST-H14"),
    ("H14 long name", st_raw(json.dumps({"a" * 600: entry()}), bytes(8)), "ST-H14"),
    ("H14 empty name", st_raw(json.dumps({"": entry()}), bytes(8)), "ST-H14"),
]


@pytest.mark.parametrize(("label", "data", "rule"), CASES, ids=[c[0] for c in CASES])
def test_each_header_rule(label: str, data: bytes, rule: str) -> None:
    assert rule_of(data) == rule


def test_polyglot_zip_in_last_tensor() -> None:
    eocd = b"PK\x05\x06" + bytes(16) + b"\x00\x00"  # 22-byte end-of-central-directory, no comment
    payload = bytes(42) + eocd
    data = st_raw(json.dumps({"a": entry("U8", [len(payload)], [0, len(payload)])}), payload)
    assert rule_of(data) == "ST-POLYGLOT"
    # the same bytes not at the very end are fine
    payload2 = eocd + bytes(42)
    assert parse(st_raw(json.dumps({"a": entry("U8", [len(payload2)], [0, len(payload2)])}), payload2))


def test_read_refuses_symlink_and_fifo(tmp_path: Path) -> None:
    (tmp_path / "real.safetensors").write_bytes(st_bytes({"w": ("F32", [1])}))
    os.symlink("real.safetensors", tmp_path / "link.safetensors")
    with pytest.raises(FindingsError) as err:
        read_safetensors_header(tmp_path / "link.safetensors")
    assert err.value.rule == "INV-SYMLINK"
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(FindingsError) as err:
        read_safetensors_header(tmp_path / "pipe.safetensors")
    assert err.value.rule == "INV-SPECIAL"


# -- index cross-check -----------------------------------------------------------------------


def _headers() -> dict[str, object]:
    a = parse_safetensors_header(io.BytesIO(d := st_bytes({"x": ("F32", [2]), "y": ("F32", [1])})), len(d), "a.safetensors")
    b = parse_safetensors_header(io.BytesIO(e := st_bytes({"z": ("I64", [1])})), len(e), "b.safetensors")
    return {"a.safetensors": a, "b.safetensors": b}


def index(weight_map: dict[str, str], total: int | None = 20) -> bytes:
    meta = {} if total is None else {"total_size": total}
    return json.dumps({"metadata": meta, "weight_map": weight_map}).encode()


GOOD = {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}


@pytest.mark.parametrize(
    ("weight_map", "total", "expected"),
    [
        (GOOD, 20, []),
        (GOOD, None, []),
        (GOOD, 21, [("model.safetensors.index.json", "IDX-TOTAL-SIZE")]),
        ({**GOOD, "w": "c.safetensors"}, 20, [("model.safetensors.index.json", "IDX-SHARD-MISSING")]),
        ({"x": "a.safetensors", "y": "a.safetensors"}, 12, [("b.safetensors", "IDX-SHARD-UNREFERENCED")]),
        ({**GOOD, "q": "a.safetensors"}, 20, [("model.safetensors.index.json", "IDX-TENSOR-MISSING")]),
        ({"x": "a.safetensors", "z": "b.safetensors"}, 20, [("a.safetensors", "IDX-TENSOR-UNMAPPED")]),
        (
            {**GOOD, "z": "a.safetensors"},
            20,
            [
                ("b.safetensors", "IDX-SHARD-UNREFERENCED"),
                ("model.safetensors.index.json", "IDX-TENSOR-MISSING"),
                ("model.safetensors.index.json", "IDX-TOTAL-SIZE"),
            ],
        ),
    ],
)
def test_index_cross_check(weight_map: dict[str, str], total: int | None, expected: list[tuple[str, str]]) -> None:
    idx = parse_shard_index("model.safetensors.index.json", index(weight_map, total))
    found = check_shard_index(idx, _headers())  # type: ignore[arg-type]
    assert sorted((f.path, f.rule) for f in found) == sorted(expected)


def test_duplicate_tensor_across_shards() -> None:
    c = parse_safetensors_header(io.BytesIO(d := st_bytes({"x": ("F32", [2])})), len(d), "c.safetensors")
    headers = {**_headers(), "c.safetensors": c}
    idx = parse_shard_index("model.safetensors.index.json", index({**GOOD, "x": "a.safetensors"}, None))
    found = check_shard_index(idx, headers, present=set(headers))  # type: ignore[arg-type]
    assert ("c.safetensors", "IDX-SHARD-UNREFERENCED") in [(f.path, f.rule) for f in found]


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b'{"weight_map": {"x": "../a.safetensors"}}', "IDX-SCHEMA"),
        (b'{"weight_map": {"x": "a.bin"}}', "IDX-SCHEMA"),
        (b'{"weight_map": {"x": 1}}', "IDX-SCHEMA"),
        (b'{"weight_map": {}, "extra": 1}', "IDX-SCHEMA"),
        (b'{"metadata": {"total_size": -1}, "weight_map": {}}', "IDX-SCHEMA"),
        (b'{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}', "JSON-DUPKEY"),
        (b"[]", "IDX-SCHEMA"),
    ],
)
def test_index_schema(data: bytes, rule: str) -> None:
    with pytest.raises(FindingsError) as err:
        parse_shard_index("model.safetensors.index.json", data)
    assert err.value.rule == rule


# -- properties (hypothesis) ------------------------------------------------------------------

dtypes = st.sampled_from(sorted(k for k, v in DTYPE_BITS.items() if v % 8 == 0))
names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12).filter(lambda s: s[0] not in "._")
tensor_specs = st.dictionaries(names, st.tuples(dtypes, st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=5)


def build(specs: dict[str, tuple[str, list[int]]]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        n = DTYPE_BITS[dtype] // 8
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return st_raw(json.dumps(header), bytes(range(256)) * (offset // 256) + bytes(offset % 256))


def reference_table(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """What the reference library (safetensors 0.8, in memory) accepts, or None if it refuses."""
    from safetensors import deserialize

    try:
        return {name: (info["dtype"], tuple(info["shape"])) for name, info in deserialize(data)}
    except Exception:
        return None


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_specs)
def test_property_valid_files_match_reference(specs: dict[str, tuple[str, list[int]]]) -> None:
    data = build(specs)
    table = parse(data)
    ref = reference_table(data)
    assert ref is not None
    mine = {k: (v.dtype, v.shape) for k, v in table.tensors.items()}
    assert mine == ref


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_specs, st.data())
def test_property_mutated_headers_refused_with_a_rule_or_accepted_by_reference(specs: dict[str, tuple[str, list[int]]], data: st.DataObject) -> None:
    good = bytearray(build(specs))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "append", "length"]))
    if mutation == "flip":  # anywhere: header flips are mostly refused, data flips must stay accepted
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] ^= data.draw(st.integers(1, 255))
    elif mutation == "truncate":
        good = good[: data.draw(st.integers(0, len(good) - 1))]
    elif mutation == "append":
        good += data.draw(st.binary(min_size=1, max_size=16))
    else:
        good[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    blob = bytes(good)
    try:
        table = parse(blob)
    except FindingsError as err:
        # refused: always with a safetensors rule naming the file, never another exception
        assert err.findings[0].rule.startswith("ST-") and err.findings[0].path == "t.safetensors"
        return
    # accepted: the reference must accept it too, with the same table (we are never looser)
    ref = reference_table(blob)
    assert ref is not None
    assert {k: (v.dtype, v.shape) for k, v in table.tensors.items()} == ref


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.binary(max_size=200))
def test_property_random_bytes_never_crash(blob: bytes) -> None:
    try:
        parse(blob)
    except FindingsError as err:
        assert err.findings[0].rule.startswith("ST-")
