"""Strict safetensors header checks (H1-H14) and the shard-index cross-check.

The model loader calls :func:`read_safetensors_header` (or :func:`parse_safetensors_header` on an
already opened file) *before* reading any tensor, and uses the returned table (name -> dtype,
shape, absolute byte offsets) to read exactly those bytes:

    >>> import struct, json, tempfile, pathlib
    >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
    >>> _ = path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    >>> table = read_safetensors_header(path)
    >>> table.tensors["w"].dtype, table.tensors["w"].shape, table.tensors["w"].start
    ('F32', (2,), 69)

Every refusal is a :class:`~secure_run.manifests.findings.FindingsError` whose rule is ``ST-H1`` ..
``ST-H14`` (numbering of spec/signing.md section 6.1), ``ST-LIMIT`` (more than
:data:`MAX_TENSORS` tensors), ``ST-POLYGLOT``, ``LFS-POINTER``, or ``IDX-*`` for the index.

Header acceptance never exceeds the Rust ``safetensors`` library's (a differential hypothesis
test pins this): shapes and offsets are ``usize`` there, so ``-0`` (a float to serde_json),
values >= 2**64 and a partial product that overflows 64 bits (checked multiplication, in order,
even when a later dimension is 0) are refused; lone surrogate escapes in ``__metadata__`` are
refused too. Parsing is linear in the header size (C JSON decoder, one pass over the entries,
one sort) and bounded by ``MAX_HEADER_BYTES`` and :data:`MAX_TENSORS`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._jsoncheck import JsonProblem, loads_strict
from ._names import name_problem
from ._sniff import LFS_POINTER_MAX, lfs_pointer, sniff, zip_directory_in_tail
from .findings import Finding, FindingsError

#: H2: the largest header accepted (the Rust reference's MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
#: H14: tensor-name limits.
MAX_TENSOR_NAME = 512
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]*\Z")
#: H8: the highest tensor rank accepted.
MAX_RANK = 16
#: Most tensors accepted in one file (each costs a dict, a TensorInfo and a sort slot). Real
#: checkpoints hold at most a few tens of thousands per file (a 671B MoE has ~92,000 in all
#: its shards together); 1.3 M tensors fit in the 100 MB header cap and took 27 s and 2.7 GB.
MAX_TENSORS = 262_144
#: The Rust reference reads shapes and offsets as ``usize``: values must fit in 64 bits.
USIZE_MAX = (1 << 64) - 1
#: H12: metadata limits (entries, key length, value length in characters).
MAX_METADATA_ENTRIES = 4096
MAX_METADATA_KEY = 1024
MAX_METADATA_VALUE = 1 << 20

#: H7: safetensors dtypes (huggingface/safetensors main) -> size in bits.
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_TAIL_BYTES = 65_536 + 22  # a ZIP end-of-directory record with the largest comment
HEAD_PEEK = 56  # bytes read after a bad length, to name what the file really is


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype string (``BF16``, ``F32``, ...).
        shape: dimensions.
        begin: start offset relative to the data buffer (as in the header).
        end: end offset (exclusive) relative to the data buffer.
        start: absolute file offset of the first byte (``8 + header_len + begin``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    start: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file.

    Attributes:
        name: file name used in messages (relative path inside the model folder).
        file_size: size of the file in bytes (the header was checked against it).
        header_len: N, the JSON header length.
        data_start: absolute offset of the data buffer (``8 + N``).
        tensors: tensor name -> :class:`TensorInfo`, in data-offset order.
        metadata: the ``__metadata__`` map (str -> str).
    """

    name: str
    file_size: int
    header_len: int
    data_start: int
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        """Sum of all tensor byte sizes."""
        return self.file_size - self.data_start


def _fail(name: str, rule: str, message: str) -> FindingsError:
    return FindingsError([Finding(name, rule, message)], what=f"{name}: safetensors header refused")


def _content_hint(head: bytes) -> str:
    kind = sniff(head)
    return f"; the content looks like a {kind}" if kind else ""


def _is_usize(value: Any) -> bool:
    """An exact JSON integer in 0..2**64-1 (``-0``, floats, bools and larger ints are not)."""
    return type(value) is int and 0 <= value <= USIZE_MAX


def _show_list(value: Any) -> str:
    """Short text of a shape / offsets value for messages (huge ints are never printed in full)."""
    if isinstance(value, list) and len(value) <= MAX_RANK + 1:
        return "[" + ", ".join(_show_int(v) for v in value) + "]"
    return f"a {type(value).__name__}" if not isinstance(value, list) else f"a list of {len(value)} items"


def _show_int(value: Any) -> str:
    if isinstance(value, _BadInt):
        return value.literal
    if type(value) is int:
        text = str(value) if value.bit_length() < 200 else f"<{value.bit_length()}-bit integer>"
        return text
    return repr(value)[:40]


def _check_entry(name: str, tname: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(entry)[:8] if isinstance(entry, dict) else type(entry).__name__
        raise _fail(name, "ST-H6", f"tensor {tname!r} has {keys}, expected exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown = repr(dtype)[:40] if isinstance(dtype, str) else type(dtype).__name__
        raise _fail(name, "ST-H7", f"tensor {tname!r} has dtype {shown}, not one of {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_usize(d) for d in shape):
        raise _fail(
            name,
            "ST-H8",
            f"tensor {tname!r} has shape {_show_list(shape)}, expected a list of <= {MAX_RANK} integers in 0..2**64-1 (no -0)",
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_usize(o) for o in offsets)
        or not offsets[0] <= offsets[1]
    ):
        raise _fail(
            name,
            "ST-H9",
            f"tensor {tname!r} has data_offsets {_show_list(offsets)}, expected [BEGIN, END] with 0 <= BEGIN <= END < 2**64 (no -0)",
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _checked_nbytes(shape: tuple[int, ...], bits: int) -> tuple[int, bool] | None:
    """The reference's H11 arithmetic: ``usize`` products with checked multiplication, in order.

    Returns (bytes, whole) where ``whole`` is False for a sub-byte remainder, or None when a
    partial product exceeds 2**64-1 (even if a later dimension is 0, as in Rust's ``try_fold``).
    """
    count = 1
    for dim in shape:
        count *= dim
        if count > USIZE_MAX:
            return None
    nbits = count * bits
    if nbits > USIZE_MAX:
        return None
    return nbits // 8, nbits % 8 == 0


def _check_metadata(name: str, meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise _fail(name, "ST-H12", f"__metadata__ is a {type(meta).__name__}, expected an object of strings")
    if len(meta) > MAX_METADATA_ENTRIES:
        raise _fail(name, "ST-H12", f"__metadata__ has {len(meta)} entries (limit {MAX_METADATA_ENTRIES})")
    for key, value in meta.items():
        if not isinstance(value, str):
            kind = "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
            raise _fail(name, "ST-H12", f"__metadata__[{key[:40]!r}] is a {kind}, expected a string")
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise _fail(name, "ST-H12", f"__metadata__[{key[:40]!r}] exceeds the key/value length limits")
        if not (_encodable(key) and _encodable(value)):
            # json reads "\ud800" as a lone surrogate; the Rust reference refuses it
            raise _fail(name, "ST-H12", f"__metadata__[{key[:40]!r}] holds a lone UTF-16 surrogate escape")
    return dict(meta)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(name: str, tname: str) -> None:
    if len(tname) > MAX_TENSOR_NAME or not _TENSOR_NAME.match(tname):
        raise _fail(name, "ST-H14", f"tensor name {tname[:80]!r} is not a short printable ASCII name ([A-Za-z0-9_.-:/], <= {MAX_TENSOR_NAME})")


def _decode_header(name: str, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")  # H3
    except UnicodeDecodeError as exc:
        raise _fail(name, "ST-H3", f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):  # H4
        raise _fail(name, "ST-H4", f"header starts with {text[:1]!r}, expected '{{'{_content_hint(raw)}")
    decoder = json.JSONDecoder(
        object_pairs_hook=_header_pairs, parse_constant=_no_constant, parse_int=_header_int  # H5
    )
    try:
        doc, end = decoder.raw_decode(text)
    except _HeaderProblem as exc:
        raise _fail(name, "ST-H5", str(exc)) from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise _fail(name, "ST-H5", f"header is not valid JSON ({exc})") from None
    if text[end:].strip(" "):  # H4: only space padding after the closing brace
        raise _fail(name, "ST-H4", "header has bytes other than spaces after the JSON object")
    if not isinstance(doc, dict):
        raise _fail(name, "ST-H4", "header is not a JSON object")
    return doc


class _HeaderProblem(ValueError):
    pass


class _BadInt(int):
    """A JSON integer the reference cannot read as ``usize`` (``-0`` or outside 0..2**64-1).

    It keeps a short form of the literal for messages; H8/H9 refuse it (``type(x) is int`` is
    false), so no arithmetic is ever done on it.
    """

    literal: str


def _header_int(literal: str) -> int:
    """``parse_int`` hook: exact ints for 0..2**64-1 and negatives, :class:`_BadInt` otherwise.

    serde_json reads ``-0`` as a float (so ``usize`` fields refuse it) and a ``usize`` refuses
    anything above 2**64-1; never converting long literals also avoids Python's 4300-digit limit.
    """
    if len(literal) < 20 and literal != "-0":
        return int(literal)
    digits = literal.lstrip("-")
    if literal == "-0" or len(digits) > 20 or (not literal.startswith("-") and int(literal) > USIZE_MAX):
        bad = _BadInt(0)
        bad.literal = literal if len(literal) <= 24 else f"{literal[:12]}...({len(digits)} digits)"
        return bad
    return int(literal)


def _header_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _HeaderProblem(f"duplicate key {key[:80]!r} in header")
            seen.add(key)
    return out


def _no_constant(literal: str) -> Any:
    raise _HeaderProblem(f"non-JSON literal {literal} in header")


def parse_safetensors_header(f: BinaryIO, file_size: int, name: str) -> SafetensorsHeader:
    """Validate the header of an open safetensors file (H1-H14 + polyglot check).

    Reads the 8-byte length, the header, and the last 64 KiB of the file; never the tensor data.
    The loader may call this on the same file object it then reads tensors from, so the table it
    uses is the one that was validated.

    Args:
        f: binary file object positioned anywhere (it is seeked).
        file_size: the file's size from ``fstat`` (H2/H13 are checked against it).
        name: relative name used in messages.

    Returns:
        The validated :class:`SafetensorsHeader`.

    Raises:
        FindingsError: with rule ``ST-H1``..``ST-H14`` or ``ST-POLYGLOT``.
    """
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) != 8:  # H1
        _refuse_lfs_pointer(name, prefix, file_size)
        raise _fail(name, "ST-H1", f"file is {file_size} bytes, too short for the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES or n > file_size - 8 or n < 2:  # H2
        peek = prefix + f.read(max(HEAD_PEEK, LFS_POINTER_MAX - 8))
        _refuse_lfs_pointer(name, peek, file_size)
        raise _fail(
            name,
            "ST-H2",
            f"header length {n} is outside 2..min({MAX_HEADER_BYTES}, file size - 8 = {file_size - 8}){_content_hint(peek[: 8 + HEAD_PEEK])}",
        )
    raw = f.read(n)
    if len(raw) != n:
        raise _fail(name, "ST-H2", f"file ended after {len(raw)} of {n} header bytes")
    count = raw.count(b'"data_offsets"')
    if count > MAX_TENSORS:  # cheap pre-check before the JSON parse; re-checked after it
        raise _fail(name, "ST-LIMIT", f"the header describes {count} tensors (limit {MAX_TENSORS} per file)")
    with _no_gc():  # the parse allocates only acyclic objects; cyclic GC passes made it quadratic
        return _parse_body(f, file_size, name, n, raw)


def _parse_body(f: BinaryIO, file_size: int, name: str, n: int, raw: bytes) -> SafetensorsHeader:
    doc = _decode_header(name, raw)
    count = len(doc) - ("__metadata__" in doc)
    if count > MAX_TENSORS:
        raise _fail(name, "ST-LIMIT", f"the header describes {count} tensors (limit {MAX_TENSORS} per file)")

    metadata: dict[str, str] = {}
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for tname, entry in doc.items():
        if tname == "__metadata__":
            metadata = _check_metadata(name, entry)  # H12
            continue
        _check_name(name, tname)  # H14
        dtype, shape, begin, end = _check_entry(name, tname, entry)  # H6-H9
        entries.append((tname, dtype, shape, begin, end))

    entries.sort(key=lambda e: (e[3], e[4]))
    cursor = 0
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for tname, dtype, shape, begin, end in entries:
        if begin != cursor:  # H10
            what = "hole" if begin > cursor else "overlap"
            raise _fail(name, "ST-H10", f"tensor {tname!r} starts at {begin}, expected {cursor} ({what} in the data buffer)")
        size = _checked_nbytes(shape, DTYPE_BITS[dtype])  # H11
        if size is None:
            raise _fail(
                name,
                "ST-H11",
                f"tensor {tname!r}: {dtype}{_show_list(list(shape))} overflows 64-bit size arithmetic (checked multiplication, in order)",
            )
        nbytes, whole = size
        if not whole or end - begin != nbytes:
            need = f"{nbytes} bytes" if whole else f"{nbytes} bytes and {DTYPE_BITS[dtype]} bits (not a whole number of bytes)"
            raise _fail(name, "ST-H11", f"tensor {tname!r}: {dtype}{_show_list(list(shape))} needs {need}, data_offsets give {end - begin}")
        cursor = end
        tensors[tname] = TensorInfo(tname, dtype, shape, begin, end, data_start + begin)
    if data_start + cursor != file_size:  # H13
        raise _fail(
            name,
            "ST-H13",
            f"tensors end at byte {data_start + cursor} but the file has {file_size} bytes"
            + (" (trailing bytes)" if file_size > data_start + cursor else " (truncated)"),
        )
    if cursor:
        tail_len = min(_TAIL_BYTES, cursor)
        tail_start = file_size - tail_len
        f.seek(tail_start)
        where = zip_directory_in_tail(f.read(tail_len), tail_start, _reader(f))
        if where is not None:
            raise _fail(name, "ST-POLYGLOT", f"the last tensor's bytes hold a ZIP end-of-central-directory record at byte {where}")
    return SafetensorsHeader(name, file_size, n, data_start, tensors, metadata)



@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    return read_at


def _refuse_lfs_pointer(name: str, head: bytes, file_size: int) -> None:
    if lfs_pointer(head, file_size):
        raise _fail(name, "LFS-POINTER", "is a Git LFS pointer file, not the weights (the LFS object was never downloaded)")


def read_safetensors_header(path: str | os.PathLike[str], name: str | None = None) -> SafetensorsHeader:
    """Open ``path`` without following links and validate its header (see :func:`parse_safetensors_header`).

    Args:
        path: the ``.safetensors`` file.
        name: name used in messages (default: the file name).

    Raises:
        FindingsError: ``INV-SYMLINK`` / ``INV-SPECIAL`` if the path is not a regular file, else
            the header rule that failed.
    """
    label = name or Path(path).name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise _fail(label, "INV-SYMLINK", "is a symbolic link") from None
        raise _fail(label, "INV-IO", f"cannot open: {exc.strerror}") from None
    with io.FileIO(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(label, "INV-SPECIAL", "is not a regular file")
        return parse_safetensors_header(f, st.st_size, label)


@dataclass(frozen=True)
class ShardIndex:
    """A validated ``*.safetensors.index.json``.

    Attributes:
        name: relative path of the index file.
        weight_map: tensor name -> shard (relative path inside the model folder).
        total_size: ``metadata.total_size`` if present.
    """

    name: str
    weight_map: Mapping[str, str]
    total_size: int | None


def parse_shard_index(name: str, data: bytes) -> ShardIndex:
    """Parse an index file strictly (shape only; :func:`check_shard_index` cross-checks it).

    Raises:
        FindingsError: ``JSON-*`` for syntax, ``IDX-SCHEMA`` for structure.
    """

    def bad(message: str, rule: str = "IDX-SCHEMA") -> FindingsError:
        return FindingsError([Finding(name, rule, message)], what=f"{name}: shard index refused")

    try:
        doc = loads_strict(data, allow_infinity=False)
    except JsonProblem as exc:
        raise bad(exc.message, exc.rule) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise bad("expected an object with a 'weight_map' object")
    unknown = set(doc) - {"metadata", "weight_map"}
    if unknown:
        raise bad(f"unexpected top-level keys {sorted(unknown)}")
    meta = doc.get("metadata", {})
    if not isinstance(meta, dict):
        raise bad("'metadata' must be an object")
    total = meta.get("total_size")
    if total is not None and (type(total) is not int or total < 0):
        if isinstance(total, float) and total.is_integer() and total >= 0:
            total = int(total)
        else:
            raise bad(f"metadata.total_size is {total!r}, expected a non-negative integer")
    base = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    weight_map: dict[str, str] = {}
    for tensor, shard in doc["weight_map"].items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or name_problem(shard):
            raise bad(f"weight_map[{tensor!r}] = {shard!r} is not a relative .safetensors file name")
        weight_map[tensor] = base + shard
    return ShardIndex(name, weight_map, total)


def check_shard_index(
    index: ShardIndex,
    headers: Mapping[str, SafetensorsHeader],
    *,
    present: set[str] | None = None,
) -> list[Finding]:
    """Cross-check an index with the validated shard headers of the same folder.

    Rules: every referenced shard exists (``IDX-SHARD-MISSING``); every ``.safetensors`` file
    next to the index is referenced (``IDX-SHARD-UNREFERENCED``); every mapped tensor is in its
    shard (``IDX-TENSOR-MISSING``); every tensor of a referenced shard is mapped to that shard
    (``IDX-TENSOR-UNMAPPED``), exactly once across shards (``IDX-TENSOR-DUP``);
    ``metadata.total_size`` equals the sum of tensor bytes (``IDX-TOTAL-SIZE``).

    Args:
        index: the parsed index.
        headers: relative shard name -> validated header, for every valid shard in the folder.
        present: every file name in the folder (default: the keys of ``headers``). A shard that
            is present but failed its own header check is not reported again here.

    Returns:
        All findings (empty when consistent).
    """
    findings: list[Finding] = []
    exists = set(headers) if present is None else set(present) | set(headers)
    folder = index.name.rsplit("/", 1)[0] + "/" if "/" in index.name else ""
    referenced = set(index.weight_map.values())
    for shard in sorted(referenced - exists):
        findings.append(Finding(index.name, "IDX-SHARD-MISSING", f"weight_map references {shard!r}, which is not in the folder"))
    local = {
        s for s in exists if s.endswith(".safetensors") and s.startswith(folder) and "/" not in s[len(folder):]
    }
    for shard in sorted(local - referenced):
        findings.append(Finding(shard, "IDX-SHARD-UNREFERENCED", f"not referenced by {index.name}"))
    seen: dict[str, str] = {}
    total = 0
    for shard in sorted(referenced & set(headers)):
        for tname, info in headers[shard].tensors.items():
            total += info.nbytes
            if tname in seen:
                findings.append(Finding(shard, "IDX-TENSOR-DUP", f"tensor {tname!r} is also in {seen[tname]!r}"))
                continue
            seen[tname] = shard
            mapped = index.weight_map.get(tname)
            if mapped is None:
                findings.append(Finding(shard, "IDX-TENSOR-UNMAPPED", f"tensor {tname!r} is not in {index.name}"))
            elif mapped != shard:
                findings.append(Finding(shard, "IDX-TENSOR-DUP", f"tensor {tname!r} is mapped to {mapped!r} but stored here"))
    for tname, shard in index.weight_map.items():
        if shard in headers and tname not in headers[shard].tensors:
            findings.append(Finding(index.name, "IDX-TENSOR-MISSING", f"weight_map puts {tname!r} in {shard!r}, which has no such tensor"))
    complete = referenced <= set(headers)
    if index.total_size is not None and complete and index.total_size != total:
        findings.append(Finding(index.name, "IDX-TOTAL-SIZE", f"metadata.total_size is {index.total_size}, tensors sum to {total} bytes"))
    return findings
