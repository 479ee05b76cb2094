"""Magic-byte sniffing: recognise executable, archive and pickle content whatever the file is called.

:func:`sniff` looks at the first bytes of a file (:data:`HEAD_BYTES`) and names the refused
content kind it recognises, or returns None. It is applied to every file of a model folder except
``.safetensors`` files, whose first 8 bytes are a binary length (any 2 bytes can occur there, e.g.
a header of 23,117 bytes starts with ``MZ``); those are checked by the strict header parser instead,
which refuses anything that is not an 8-byte length followed by ``{``.
"""

from __future__ import annotations

import re

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


def zip_directory_at_end(tail: bytes) -> bool:
    """True when ``tail`` (the last bytes of a file) ends with a well-formed ZIP end-of-directory.

    A ZIP reader finds an archive by its end-of-central-directory record (``PK\\x05\\x06``, 22
    bytes + comment) at the end of the file, so bytes appended after a valid payload make a
    polyglot. The record must end exactly at the end of the file (comment length field matches),
    which random tensor data does with negligible probability (about 2**-32 per file).
    """
    start = len(tail) - 22
    while start >= 0:
        at = tail.rfind(b"PK\x05\x06", 0, start + 4)
        if at < 0:
            return False
        comment_len = int.from_bytes(tail[at + 20 : at + 22], "little")
        if at + 22 + comment_len == len(tail):
            return True
        start = at - 1
    return False
