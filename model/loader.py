"""Strict weight loader: safetensors only, exact tensor table, meta-device build, shard by shard.

Loading is a checklist; each step refuses with a :class:`~secure_run.errors.ModelError` that
names the file, the rule (``loader.*``) and the tensors concerned:

1. read and validate ``config.json`` (:mod:`secure_run.model.config`);
2. find the shards: ``model.safetensors.index.json`` (its ``weight_map`` names plain
   ``*.safetensors`` files in the folder) or a single ``model.safetensors``;
3. open every shard once, below the folder's directory descriptor without following any link, and
   ``fstat`` it; reading a :class:`~secure_run.manifests.folder.VerifiedFolder` requires the pinned
   identity (dev, ino, size, mtime_ns, ctime_ns) of every file, and ``config.json`` and the index
   are read whole and re-hashed against the verified digests;
4. read and validate every shard header from that same descriptor with the strict header check of
   :func:`secure_run.manifests.parse_safetensors_header` (rules ``ST-H1``..``ST-H14``); the index's
   ``weight_map`` must list exactly the tensors each shard holds; when the caller passes the
   verified headers (``VerificationResult.headers``), the headers read now must equal them;
5. compare the checkpoint's tensors with :func:`~secure_run.model.checkpoint.expected_tensors`:
   missing, extra, unmapped attention tensors, wrong shape, wrong dtype are all refused, listing
   the names;
6. build the model on the ``meta`` device (no memory), then per shard read each tensor's bytes
   with ``pread`` on the open descriptor at the offsets of the validated header (never pickle,
   never ``torch.load``, no second parser), cast it to the dtype of its parameter, move it to
   ``device``, and ``load_state_dict(assign=True)`` so no second copy of the weights is ever held
   (on CUDA the bytes go through two reusable page-locked buffers, read and copy overlapped);
7. ``fstat`` each descriptor again after reading: any change of identity (ctime included) refuses.

    >>> from secure_run.model.demo import demo_model_dir
    >>> model = load_model(demo_model_dir(), device="cpu")
    >>> model.config.model_type, str(model.dtype)
    ('superlinear-exp', 'torch.float32')
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeAlias

import torch

from secure_run.errors import ModelError
from secure_run.manifests._jsoncheck import JsonProblem, loads_strict
from secure_run.manifests.findings import FindingsError
from secure_run.manifests.folder import FolderError, FolderReader, UnverifiedFolder, VerifiedFolder
from secure_run.manifests.hashing import FileIdentity
from secure_run.manifests.tensors import SafetensorsHeader, TensorInfo, parse_safetensors_header
from secure_run.model.checkpoint import (
    AttentionNameMap,
    HeaderEntry,
    check_table,
    checkpoint_to_internal,
    name_map_for,
)
from secure_run.model.checkpoint import refusal as _refuse
from secure_run.model.config import ModelConfig, parse_config_json
from secure_run.model.model import HybridLM

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "FileIdentity",
    "HeaderEntry",
    "load_model",
    "read_checkpoint_table",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _coerce_identity(name: str, value: object) -> FileIdentity:
    """A legacy ``file_identities`` value: the one identity type or an ``os.stat_result``."""
    if isinstance(value, FileIdentity):
        return value
    if isinstance(value, os.stat_result):
        return FileIdentity.from_stat(value)
    raise ModelError(f"not a file identity for {name}: {type(value).__name__}", rule="loader.identity", path=name,
                     hint="pass secure_run.manifests.FileIdentity values (dev, ino, size, mtime_ns, ctime_ns)")


def _source(model_dir: str | Path | FolderReader) -> FolderReader:
    if isinstance(model_dir, (str, os.PathLike)):
        try:
            return UnverifiedFolder(model_dir)
        except FolderError as err:
            raise _refuse(f"cannot open the model folder {model_dir}: {err.message}", rule="loader.folder",
                          path=str(model_dir), hint="pass the real folder, not a symbolic link") from None
    return model_dir


# --- step 2: shards ----------------------------------------------------------------------------


def _plain_shard_name(name: object) -> str:
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or name.startswith(".") or "\x00" in name):
        raise _refuse(f"{INDEX_FILE} names an unacceptable shard file {name!r}", rule="loader.index",
                      path=INDEX_FILE, hint="shards must be plain *.safetensors files in the model folder")
    return name


def _read_index(source: FolderReader) -> dict[str, str] | None:
    """tensor name -> shard file from the index, or None when the folder has a single file.

    The index is read through ``source`` (below the folder's descriptor, no link followed; for a
    verified folder: identity and sha256 checked).
    """
    if not source.exists(INDEX_FILE):
        return None

    try:  # the one strict JSON loader: no duplicate keys, no NaN/Infinity, no BOM
        raw = loads_strict(_read_small(source, INDEX_FILE, "loader.index"), allow_infinity=False)
    except JsonProblem as err:
        raise _refuse(f"{INDEX_FILE} is not valid strict JSON: {err.message} [{err.rule}]", rule="loader.index",
                      path=INDEX_FILE) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_map"), dict) or set(raw) - {"metadata", "weight_map"}:
        raise _refuse(f"{INDEX_FILE} must be an object with 'weight_map' (and optional 'metadata') only",
                      rule="loader.index", path=INDEX_FILE)
    return {str(k): _plain_shard_name(v) for k, v in raw["weight_map"].items()}


# --- steps 3-4: open, fstat, headers ---------------------------------------------------------


class _OpenShard:
    """A shard opened once; every later read goes through this descriptor."""

    def __init__(self, source: FolderReader, name: str, expected: FileIdentity | None) -> None:
        self.name = name
        self.validated: SafetensorsHeader | None = None
        self.fd = -1
        if not isinstance(source, VerifiedFolder) and not source.exists(name):
            raise _refuse(f"shard {name} is missing", rule="loader.shard-missing", path=name,
                          hint=f"every file named in {INDEX_FILE} must be present")
        try:
            # verified folder: opened below the verified root, identity (with ctime) equal to the pin
            self.fd, self.identity = source.open_fd(name)
        except FolderError as err:
            if err.rule != "folder.open":
                raise
            raise _refuse(f"cannot open shard {name}: {err.message}", rule="loader.shard-open", path=name,
                          hint="shards must be regular files, not symbolic links") from None
        if expected is not None and expected != self.identity:
            self.close()
            raise _refuse(
                f"shard {name} is not the file that was verified",
                rule="loader.identity", path=name,
                details=(f"verified: {expected}", f"opened:   {self.identity}"),
                hint="the folder changed after verification; verify it again",
            )

    def header(self) -> SafetensorsHeader:
        """The strictly validated header, read through this descriptor."""
        try:
            with io.FileIO(self.fd, "rb", closefd=False) as f:
                self.validated = parse_safetensors_header(f, self.identity.size, self.name)
                return self.validated
        except FindingsError as err:
            raise _refuse(f"shard {self.name} has an invalid safetensors header", rule="loader.header",
                          path=self.name, details=tuple(f.render() for f in err.findings),
                          hint="re-download the shard; it is corrupt or not safetensors") from None

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The bytes of one validated tensor entry, as a CPU tensor (one copy, straight from the file)."""
        buf = bytearray(info.nbytes)
        self.read_into(info, 0, memoryview(buf))
        dtype = _ST_TORCH[info.dtype]
        flat = torch.frombuffer(buf, dtype=dtype) if info.nbytes else torch.empty(0, dtype=dtype)
        return flat.reshape(info.shape)

    def read_into(self, info: TensorInfo, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the tensor's bytes from ``offset`` on (within the validated entry)."""
        if offset < 0 or offset + len(view) > info.nbytes:  # a caller bug, never the file's
            raise _refuse(f"read outside tensor {info.name}", rule="loader.internal", path=self.name)
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], info.start + offset + got)
            if n <= 0:
                raise _refuse(f"shard {self.name} ended inside tensor {info.name}", rule="loader.changed",
                              path=self.name, hint="the file was truncated while loading; verify it again")
            got += n

    def check_unchanged(self) -> None:
        """Refuse if the open file changed (identity, size, mtime) since it was opened."""
        now = FileIdentity.from_stat(os.fstat(self.fd))
        if now != self.identity:
            raise _refuse(f"shard {self.name} changed while it was being read", rule="loader.changed",
                          path=self.name, details=(f"before: {self.identity}", f"after:  {now}"),
                          hint="something is writing to the model folder; stop it and verify again")

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_checkpoint_table(shards: list[_OpenShard], index: dict[str, str] | None) -> dict[str, HeaderEntry]:
    """Union of the shard headers; cross-checked against the index's weight_map."""
    table: dict[str, HeaderEntry] = {}
    dup: list[str] = []
    for sh in shards:
        for name, info in sh.header().tensors.items():
            if name in table:
                dup.append(f"{name} (in {table[name].shard} and {sh.name})")
            table[name] = HeaderEntry(sh.name, info.dtype, tuple(info.shape), info)
    if dup:
        raise _refuse("tensors appear in more than one shard", rule="loader.duplicate", names=dup)
    if index is not None:
        wrong = [f"{n}: index says {s}, found in {table[n].shard if n in table else 'no shard'}"
                 for n, s in index.items() if n not in table or table[n].shard != s]
        unlisted = [f"{n} (in {e.shard})" for n, e in table.items() if n not in index]
        if wrong or unlisted:
            raise _refuse(f"{INDEX_FILE} does not match the shard headers", rule="loader.index", path=INDEX_FILE,
                          names=wrong + unlisted, hint="the index must list every tensor of every shard exactly")
    return table


# --- step 5: compare with the architecture ------------------------------------------------------


VerifiedTable: TypeAlias = "SafetensorsHeader | Mapping[str, tuple[str, tuple[int, ...]]]"


def _as_table(table: VerifiedTable) -> dict[str, tuple[object, ...]]:
    if isinstance(table, SafetensorsHeader):
        out: dict[str, tuple[object, ...]] = {
            n: (i.dtype, tuple(i.shape), i.begin, i.end, i.start) for n, i in table.tensors.items()
        }
        out["__metadata__"] = tuple(sorted(table.metadata.items()))
        return out
    return {n: (d, tuple(sh)) for n, (d, sh) in table.items()}


def _check_verified_tables(shards: list[_OpenShard], verified: Mapping[str, VerifiedTable]) -> None:
    """The headers read now must equal the verified ones (shard -> header, or -> {name: (dtype, shape)})."""
    now: dict[str, dict[str, tuple[object, ...]]] = {}
    for sh in shards:
        assert sh.validated is not None
        full = _as_table(sh.validated)
        if not isinstance(verified.get(sh.name), SafetensorsHeader):  # the simple form: names, dtypes, shapes
            full = {n: v[:2] for n, v in full.items() if n != "__metadata__"}
        now[sh.name] = full
    want = {s: _as_table(t) for s, t in verified.items()}
    if now != want:
        diff = sorted(set(now) ^ set(want)) + sorted(s for s in set(now) & set(want) if now[s] != want[s])
        raise _refuse("shard headers differ from the verified tensor tables", rule="loader.verified-table",
                      names=diff, hint="the folder changed after verification; verify it again")


# --- steps 6-7: build and fill -------------------------------------------------------------------


_INIT_FUNCS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
               "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _skip_param_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op while the model is built on ``meta``.

    Every parameter is overwritten from the checkpoint (step 6 refuses any left on ``meta``), so
    random initialisation is wasted work; on ``meta`` it also drags in torch's Python meta kernels
    (about 2 s of imports on a cold start).
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCS}
    try:
        for name in _INIT_FUNCS:
            setattr(torch.nn.init, name, _no_init)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _no_init(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


#: Bytes per staging buffer for an accelerator load (two buffers: one is read into while the other's
#: copy to the device runs).
STAGE_BYTES = 64 << 20


def _host_buffer(nbytes: int, *, pinned: bool) -> torch.Tensor:
    """A host byte buffer, page-locked when asked and the driver grants it (else pageable: slower, same bytes)."""
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # e.g. a sandbox whose limits refuse page-locked memory
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class _Staging:
    """Reusable host buffers that carry tensor bytes from a shard to the device, two in flight.

    On CUDA the buffers are page-locked, so each copy to the GPU is one asynchronous DMA from them
    (a pageable tensor is first copied again by the driver), and the read of the next piece overlaps
    the copy of the previous one. A buffer is reused only after its copy's event has completed.
    """

    def __init__(self, device: torch.device, stage_bytes: int = STAGE_BYTES) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.bufs = [_host_buffer(stage_bytes, pinned=self.cuda) for _ in range(2)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def read(self, shard: _OpenShard, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes on ``device`` in the checkpoint dtype, ``info.shape``."""
        dtype = _ST_TORCH[info.dtype]
        out = torch.empty(info.nbytes, dtype=torch.uint8, device=self.device)
        step = self.bufs[0].numel()
        for offset in range(0, info.nbytes, step):
            n = min(step, info.nbytes - offset)
            buf, event = self.bufs[self.turn], self.events[self.turn]
            if event is not None:
                event.synchronize()  # the last copy out of this buffer has finished
            shard.read_into(info, offset, memoryview(buf.numpy())[:n])
            out[offset:offset + n].copy_(buf[:n], non_blocking=self.cuda)
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
                self.events[self.turn] = event
            self.turn ^= 1
        return out.view(dtype).reshape(info.shape)

    def finish(self) -> None:
        """Wait for every copy out of the buffers (before they are freed)."""
        for event in self.events:
            if event is not None:
                event.synchronize()


def _staging_for(device: torch.device) -> _Staging | None:
    """Staging buffers where the weights go to an accelerator; a CPU load reads straight into place."""
    return _Staging(device) if device.type == "cuda" else None


def _fill(model: HybridLM, shard: _OpenShard, entries: list[HeaderEntry], config: ModelConfig,
          names: AttentionNameMap, device: torch.device, staging: _Staging | None = None) -> None:
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    state: dict[str, torch.Tensor] = {}
    for e in entries:
        internal = checkpoint_to_internal(config, names, e.info.name)
        raw = staging.read(shard, e.info) if staging is not None else shard.read(e.info)
        state[internal] = raw.to(device=device, dtype=targets[internal].dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:  # cannot happen after check_table; kept as a guard
        raise _refuse("internal name mismatch while loading", rule="loader.internal", names=result.unexpected_keys)


def load_model(
    model_dir: str | Path | FolderReader,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: ModelConfig | None = None,
    name_map: AttentionNameMap | None = None,
    file_identities: Mapping[str, object] | None = None,
    verified_tables: Mapping[str, VerifiedTable] | None = None,
) -> HybridLM:
    """Load a model folder into a :class:`~secure_run.model.model.HybridLM` (eval mode, no grads).

    Args:
        model_dir: the verified folder (:class:`~secure_run.manifests.folder.VerifiedFolder`: every
            file opened below its descriptor with its pinned identity, small files re-hashed), or a
            plain path for tools and tests (opened without following links, nothing proved).
        device: where the weights go.
        dtype: activation / weight dtype (default: the checkpoint dtype). The router's
            correction bias and the Mamba per-head vectors stay fp32.
        config: an already-validated config (default: read ``config.json``).
        name_map: checkpoint names of the attention projections (default: from the config).
        file_identities: shard file name -> expected identity (:class:`FileIdentity` or an
            ``os.stat_result``) for a plain path; each shard must still match (ctime included).
        verified_tables: shard file name -> the header verified by manifests
            (``VerificationResult.headers``), or -> {tensor: (dtype, shape)}.

    Raises:
        ModelError: any step of the checklist in the module docstring fails.
    """
    device = torch.device(device)
    if sys.byteorder != "little":  # safetensors data is little-endian; we read raw bytes
        raise ModelError("loading needs a little-endian host", rule="loader.byteorder")
    source = _source(model_dir)
    try:
        return _load(source, device, dtype, config, name_map, file_identities, verified_tables)
    finally:
        if source is not model_dir and isinstance(source, UnverifiedFolder):
            source.close()


def read_config(source: FolderReader) -> ModelConfig:
    """``config.json`` read through ``source`` and validated."""
    if not source.exists("config.json"):
        raise _refuse("config.json is missing", rule="config.missing", path="config.json",
                      hint="a model folder must contain config.json")
    return parse_config_json(_read_small(source, "config.json", "config.missing"), path="config.json")


def _read_small(source: FolderReader, name: str, rule: str) -> bytes:
    try:
        return source.read_bytes(name)
    except FolderError as err:
        if err.rule != "folder.open":  # unpinned, changed, digest: the verification refusal as is
            raise
        raise _refuse(f"cannot read {name}: {err.message}", rule=rule, path=name,
                      hint="model files must be regular files in the folder, not symbolic links") from None


def _load(source: FolderReader, device: torch.device, dtype: torch.dtype | None, config: ModelConfig | None,
          name_map: AttentionNameMap | None, file_identities: Mapping[str, object] | None,
          verified_tables: Mapping[str, VerifiedTable] | None) -> HybridLM:
    # 1. config
    cfg = config if config is not None else read_config(source)
    names = name_map_for(cfg, name_map)
    # 2. shards
    index = _read_index(source)
    if index is not None:
        shard_names = sorted(set(index.values()))
    elif source.exists(SINGLE_FILE):
        shard_names = [SINGLE_FILE]
    else:
        raise _refuse("no weights: neither model.safetensors nor model.safetensors.index.json", rule="loader.no-weights",
                      path=str(source.root), hint="a model folder needs safetensors weights")
    idents = {k: _coerce_identity(k, v) for k, v in (file_identities or {}).items()}
    if file_identities is not None:
        unverified = [s for s in shard_names if s not in idents]
        if unverified:
            raise _refuse("shards without a verified identity", rule="loader.identity", names=unverified,
                          hint="pass the identity of every shard that was verified")
    shards: list[_OpenShard] = []
    try:
        # 3. open + fstat
        for s in shard_names:
            shards.append(_OpenShard(source, s, idents.get(s)))
        # 4. headers
        found = read_checkpoint_table(shards, index)
        if verified_tables is not None:
            _check_verified_tables(shards, verified_tables)
        # 5. exact table
        check_table(cfg, names, found)
        # 6. meta build, then shard by shard
        target = dtype if dtype is not None else _TORCH_DTYPES[cfg.checkpoint_dtype]
        with torch.device("meta"), _skip_param_init():
            model = HybridLM(cfg, dtype=target)
        staging = _staging_for(device)
        try:
            for sh in shards:
                _fill(model, sh, [e for _, e in sorted(found.items()) if e.shard == sh.name], cfg, names, device, staging)
                # 7. unchanged while read
                sh.check_unchanged()
        finally:
            if staging is not None:
                staging.finish()
    finally:
        for sh in shards:
            sh.close()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise _refuse("tensors were not loaded", rule="loader.internal", names=left)
    model.eval()
    model.requires_grad_(False)
    return model
