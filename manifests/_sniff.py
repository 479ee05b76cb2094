"""Magic-byte sniffing: recognise executable, archive and pickle content whatever the file is called.

:func:`sniff` looks at the first bytes of a file (:data:`HEAD_BYTES`) and names the refused
content kind it recognises, or returns None. It is applied to every file of a model folder except
``.safetensors`` files, whose first 8 bytes are a binary length (any 2 bytes can occur there, e.g.
a header of 23,117 bytes starts with ``MZ``); those are checked by the strict header parser instead,
which refuses anything that is not an 8-byte length followed by ``{``.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
from collections.abc import Callable

#: How many leading bytes the sniffers look at (tar's ``ustar`` magic sits at offset 257).
HEAD_BYTES = 512

# (prefix, kind) pairs; checked in order.
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "ZIP archive (e.g. PyTorch .bin/.pt, .npz, .keras, .nemo)"),
    (b"PK\x05\x06", "ZIP archive (empty)"),
    (b"PK\x07\x08", "ZIP archive (spanned)"),
    (b"\x7fELF", "ELF executable / shared library"),
    (b"MZ", "PE (Windows) executable"),
    (b"\xfe\xed\xfa\xce", "Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O universal binary / Java class"),
    (b"#!", "script with a shebang line"),
    (b"\x89HDF\r\n\x1a\n", "HDF5 file (Keras .h5)"),
    (b"\x93NUMPY", "NumPy .npy array (object arrays are pickles)"),
    (b"GGUF", "GGUF model file"),
    (b"\x00asm", "WebAssembly module"),
    (b"\x1f\x8b", "gzip stream"),
    (b"BZh", "bzip2 stream"),
    (b"\xfd7zXZ\x00", "xz stream"),
    (b"\x28\xb5\x2f\xfd", "zstd stream"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
)

# Protocol-0/1 pickles have no magic; a GLOBAL opcode ("c<module>\n<name>\n") at the start is the
# usual first instruction of a malicious one.
_PICKLE_GLOBAL = re.compile(rb"\A\(?c[A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n")


def _pyc_magic(head: bytes) -> bool:
    """CPython .pyc: 2-byte version number + ``\\r\\n`` (3.x magics lie in 3000..3999; 2.7 is 62211)."""
    if len(head) < 4 or head[2:4] != b"\r\n":
        return False
    number = int.from_bytes(head[:2], "little")
    return 2900 <= number <= 3999 or number in (62211, 20121)


def sniff(head: bytes) -> str | None:
    """Name the refused content kind recognised in ``head``, or None.

    Args:
        head: the first bytes of the file (up to :data:`HEAD_BYTES`).

    Returns:
        A human-readable kind such as ``"pickle (protocol 4)"`` or None when nothing is recognised.
    """
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle (protocol {head[1]})"
    if _pyc_magic(head):
        return "compiled Python (.pyc)"
    for prefix, kind in _PREFIXES:
        if head.startswith(prefix):
            return kind
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar archive"
    if _PICKLE_GLOBAL.match(head):
        return "pickle (protocol 0/1, GLOBAL opcode)"
    return None


#: Git LFS pointer files are at most 1024 bytes (git-lfs spec, "Pointer file format").
LFS_POINTER_MAX = 1024
_LFS_POINTER = re.compile(
    rb"\Aversion https://(?:git-lfs\.github\.com/spec/v1|hawser\.github\.com/spec/v1)\n"
    rb"(?:[a-z0-9.-]+ [^\n]*\n)*?oid sha256:[0-9a-f]{64}\n(?:[a-z0-9.-]+ [^\n]*\n)*?size [0-9]+\n"
)


def lfs_pointer(head: bytes, size: int) -> bool:
    """True when a file of ``size`` bytes starting with ``head`` is a Git LFS pointer.

    A pointer is a small text file (``version https://git-lfs.github.com/spec/v1``, ``oid
    sha256:<hex>``, ``size <n>``) left in place of the real content when ``git lfs pull`` was not
    run (or LFS was not installed when the repository was cloned).
    """
    return size <= LFS_POINTER_MAX and _LFS_POINTER.match(head) is not None


_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_CENTRAL_HEADER = b"PK\x01\x02"


def zip_directory_in_tail(tail: bytes, tail_start: int, read_at: Callable[[int, int], bytes]) -> int | None:
    """Find a ZIP end-of-central-directory record a ZIP reader would use; return its file offset.

    Python's :mod:`zipfile` (like most readers) takes the *last* ``PK\\x05\\x06`` in the final
    64 KiB + 22 bytes, wherever it sits, and reads the central directory just before it. So any
    such record is refused when either

    * it ends exactly at the end of the file (the old rule: an appended archive, even empty), or
    * a ZIP64 locator precedes it, or
    * the bytes where the reader looks for the central directory (record offset - directory
      size, a directory of at least one 46-byte header) start with a central-directory header
      ``PK\\x01\\x02`` (whatever the record's entry counts say: zipfile ignores them).

    A bare 4-byte signature inside random tensor data (probability about 2**-32 per position)
    does not meet the last two conditions by chance (another 2**-32), so weights are not refused
    for noise.

    Args:
        tail: the last bytes of the file.
        tail_start: file offset of ``tail[0]``.
        read_at: reads ``length`` bytes at a file offset (for a directory before the tail).
    """
    end = len(tail)
    at = tail.rfind(_EOCD, 0, end)
    while at >= 0:
        if at + 22 <= end and _zip_record_usable(tail, at, tail_start, read_at):
            return tail_start + at
        at = tail.rfind(_EOCD, 0, at + 3) if at > 0 else -1
    return None


def _zip_record_usable(tail: bytes, at: int, tail_start: int, read_at: Callable[[int, int], bytes]) -> bool:
    comment_len = int.from_bytes(tail[at + 20 : at + 22], "little")
    if at + 22 + comment_len == len(tail):
        return True
    if at >= 20 and tail[at - 20 : at - 16] == _EOCD64_LOCATOR:
        return True
    # the entry counts are not checked: zipfile reads members until the directory size is used up
    cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
    cd_pos = at - cd_size
    if cd_size < 46 or tail_start + cd_pos < 0:
        return False
    if cd_pos >= 0:
        return tail[cd_pos : cd_pos + 4] == _CENTRAL_HEADER
    return read_at(tail_start + cd_pos, 4) == _CENTRAL_HEADER


def zip_directory_at_end(tail: bytes) -> bool:
    """True when ``tail`` (the last bytes of a file) holds a ZIP end-of-directory a reader would use."""
    return zip_directory_in_tail(tail, 0, lambda offset, length: tail[offset : offset + length]) is not None


#: How much of a file is scanned for a pickle opcode stream (the text-file size limit).
PICKLE_SCAN_BYTES = 16 << 20
#: No text parses as this many consecutive pickle opcodes (measured: real files stop within a few).
MAX_PICKLE_OPCODES = 10_000
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def _imports(name: str, arg: object) -> bool:
    """Whether an opcode makes ``pickle`` import something (the first step of every exploit)."""
    if name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
        return True
    if name in ("GLOBAL", "INST") and isinstance(arg, str):
        module, _, attr = arg.partition(" ")
        return _DOTTED.match(module) is not None and _DOTTED.match(attr) is not None
    return False


#: Opcodes that call what was imported (``INST`` and ``OBJ`` call only with a ``MARK`` before them).
_CALLS = frozenset({"REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX"})
_MARK_CALLS = frozenset({"INST", "OBJ"})


def pickle_program(data: bytes) -> str | None:
    """Name a code-running pickle opcode stream at the start of ``data``, or None.

    Applied to every file that is not ``.safetensors`` (text, templates, JSON, tokenizer models),
    because ``pickle.load`` does not care about a file's name and executes opcodes as it reads
    them, before it ever reaches ``STOP``. :func:`pickletools.genops` only parses (it never
    imports or calls anything). Refused:

    * leading bytes that parse as pickle opcodes and both import something (``GLOBAL`` / ``INST``
      whose module and name are dotted Python identifiers, ``STACK_GLOBAL``, ``EXT1/2/4``) and
      call (``REDUCE``, ``BUILD``, ``NEWOBJ[_EX]``, or ``INST`` / ``OBJ`` after a ``MARK``), complete
      or not: e.g. ``I0\\n0cbuiltins\\nprint\\n(S'x'\\ntR.``;
    * more than :data:`MAX_PICKLE_OPCODES` valid opcodes in a row (padding meant to push the
      code past the scan; no text parses that far).

    Not refused: text that stops parsing as opcodes early (all real prose, JSON, templates: a
    space or newline outside an opcode argument is not an opcode); pure-data pickles such as
    ``N.``; and an import that nothing calls. The last is deliberate: two identifier lines after
    a leading ``i`` are ordinary text (``isympy`` / ``sympy`` in a ``top_level.txt``), and pickle
    would import such a module and stop there. (A ``GLOBAL`` as the very first opcode is refused
    anyway by :func:`sniff`'s older rule.)
    A length-prefixed argument that runs past the end of ``data`` ends the scan without a
    refusal (pickle would fail there too, after running only the opcodes already checked).
    """
    imported: str | None = None
    marked = False
    stream = io.BytesIO(data[:PICKLE_SCAN_BYTES])
    try:
        for count, (opcode, arg, pos) in enumerate(pickletools.genops(stream)):
            if count >= MAX_PICKLE_OPCODES:
                return f"pickle opcode stream ({MAX_PICKLE_OPCODES} opcodes parsed, no text does that)"
            name = opcode.name
            if imported is None and _imports(name, arg):
                imported = f"{name} {str(arg)[:60]!r} at byte {pos}"
            if imported is not None and (name in _CALLS or (name in _MARK_CALLS and marked)):
                return f"pickle opcode stream that imports and calls code ({imported}, {name} at byte {pos})"
            marked = marked or name == "MARK"
            if name == "STOP":
                return None
    except (ValueError, OverflowError, EOFError, struct.error, IndexError):
        return None
    return None
