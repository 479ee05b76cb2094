"""``secure-run inspect DIR``: what is in a model folder, without trusting or verifying it.

Reports every file (size, kind or refusal), tensors by dtype (count, elements, bytes) and per
shard, a config summary (``model_type``, ``architectures``, dtype, sizes, and every remote-code
pointer), licence files, the signature's claims (parsed, **not** verified), and all inventory
findings. It reads ``config.json`` with a plain JSON parse (the model's config schema belongs to
the model package) and never imports torch.

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "config.json").write_text('{"model_type": "demo", "auto_map": {"AutoModel": "m.M"}}')
    >>> report = inspect_model(root)
    >>> report.config["model_type"], [p["pointer"] for p in report.config["remote_code"]]
    ('demo', ['/auto_map'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._bundle import parse_bundle, parse_statement
from ._io import InputFileProblem, read_input
from ._jsoncheck import JsonProblem, loads_strict, remote_code_pointers
from .findings import Finding, VerificationFailed
from .inventory import DEFAULT_RULES, Inventory, take_inventory
from .provenance import read_provenance
from .verify import read_signature

_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "torch_dtype",
    "dtype",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "_attn_implementation",
    "transformers_version",
)


@dataclass(frozen=True)
class InspectReport:
    """The result of :func:`inspect_model` (see :meth:`to_json` for the schema)."""

    root: Path
    inventory: Inventory
    dtypes: Mapping[str, Mapping[str, int]]
    shards: Mapping[str, Mapping[str, int]]
    config: Mapping[str, Any] | None
    tokenizer: Mapping[str, Any] | None
    licence_files: tuple[str, ...]
    signature: Mapping[str, Any] | None
    provenance: Mapping[str, Any] | None = None

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Inventory findings (the folder would be refused when non-empty)."""
        return self.inventory.findings

    def to_json(self) -> dict[str, Any]:
        """Stable JSON form (``report`` of ``secure-run inspect --json``)."""
        refused = {f.path.split("#", 1)[0] for f in self.findings}
        return {
            "path": str(self.root),
            "files": [
                {"name": f.name, "size": f.size, "kind": f.kind.value if f.kind else None, "refused": f.name in refused}
                for f in self.inventory.files
            ],
            "total_bytes": self.inventory.total_bytes,
            "tensors": {
                "count": sum(v["count"] for v in self.dtypes.values()),
                "bytes": sum(v["bytes"] for v in self.dtypes.values()),
                "by_dtype": {k: dict(v) for k, v in sorted(self.dtypes.items())},
                "by_shard": {k: dict(v) for k, v in sorted(self.shards.items())},
            },
            "config": None if self.config is None else dict(self.config),
            "tokenizer": None if self.tokenizer is None else dict(self.tokenizer),
            "licence_files": list(self.licence_files),
            "signature": None if self.signature is None else dict(self.signature),
            "provenance": None if self.provenance is None else dict(self.provenance),
            "findings": [f.to_json() for f in self.findings],
        }


def _json_doc(root: Path, name: str) -> Any:
    try:
        return loads_strict(read_input(root / name, limit=DEFAULT_RULES.max_json_bytes))
    except (InputFileProblem, JsonProblem):
        return None  # the inventory reports why (INV-SPECIAL, INV-SYMLINK, INV-LIMIT, JSON-*)


def _config_summary(root: Path) -> dict[str, Any] | None:
    doc = _json_doc(root, "config.json")
    if not isinstance(doc, dict):
        return None
    summary: dict[str, Any] = {k: doc[k] for k in _CONFIG_KEYS if k in doc}
    summary["remote_code"] = [
        {"file": "config.json", "pointer": h.pointer, "reason": h.reason, "value": h.value}
        for h in remote_code_pointers(doc, "config.json")
    ]
    return summary


def _tokenizer_summary(root: Path) -> dict[str, Any] | None:
    doc = _json_doc(root, "tokenizer_config.json")
    if not isinstance(doc, dict):
        return None
    out: dict[str, Any] = {k: doc[k] for k in ("tokenizer_class", "model_max_length") if k in doc}
    out["has_chat_template"] = "chat_template" in doc or (root / "chat_template.jinja").is_file()
    out["remote_code"] = [
        {"file": "tokenizer_config.json", "pointer": h.pointer, "reason": h.reason, "value": h.value}
        for h in remote_code_pointers(doc, "tokenizer_config.json")
    ]
    return out


def _signature_summary(root: Path) -> dict[str, Any] | None:
    path = root / "model.sig"
    if not os.path.lexists(path):
        return None
    out: dict[str, Any] = {"file": "model.sig", "verified": False}
    try:
        bundle = parse_bundle(read_signature(path, "model.sig"), "model.sig")
        statement = parse_statement(bundle.payload, "model.sig")
    except VerificationFailed as exc:
        out["error"] = exc.message
        return out
    out.update(
        method=bundle.method,
        subject_name=statement.subject_name,
        root_digest="sha256:" + statement.root_digest,
        resources=len(statement.resources),
    )
    return out


def inspect_model(root: str | os.PathLike[str]) -> InspectReport:
    """Inventory ``root`` and summarize it (never raises for findings; see :attr:`InspectReport.findings`).

    Raises:
        UsageError: ``root`` is missing or not a directory.
        FindingsError: ``root`` is a symbolic link.
    """
    inv = take_inventory(root)
    dtypes: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, int]] = {}
    for name, header in inv.headers.items():
        shard = shards.setdefault(name, {"tensors": 0, "bytes": 0})
        for t in header.tensors.values():
            d = dtypes.setdefault(t.dtype, {"count": 0, "elements": 0, "bytes": 0})
            d["count"] += 1
            d["elements"] += t.numel
            d["bytes"] += t.nbytes
            shard["tensors"] += 1
            shard["bytes"] += t.nbytes
    licences = tuple(
        f.name for f in inv.files if "/" not in f.name and f.name.upper().startswith(("LICENSE", "LICENCE", "NOTICE", "COPYING"))
    )
    return InspectReport(
        inv.root,
        inv,
        dtypes,
        shards,
        _config_summary(inv.root),
        _tokenizer_summary(inv.root),
        licences,
        _signature_summary(inv.root),
        read_provenance(inv.root),
    )
