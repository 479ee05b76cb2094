"""The checkpoint tensor table: every name, shape and dtype a config implies (no torch import).

The table is computed from the config alone (spec/model.md section 2) in the checkpoint's own
naming (``backbone.*``, ``lm_head.weight``, one 2-D tensor per routed expert). The set of tensors in
a checkpoint must equal it exactly; :mod:`secure_run.model.loader` refuses anything else.

The attention layers' parameter names are the one unverified part of the real checkpoint
(spec/model.md 2.6 / 2.9): the search-query projection (Q1) has an unknown name, and so the
attention names go through an explicit :class:`AttentionNameMap`. secure-run's own checkpoints (the
demo, tests) call it ``q_search_proj`` and record that in ``config.json`` under
``secure_run_search_proj``; for the real checkpoint, pass the map once its names are confirmed.

    >>> from secure_run.model.config import parse_config_json
    >>> cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
    ...   "num_hidden_layers": 2, "hybrid_override_pattern": "M*", "num_attention_heads": 4,
    ...   "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
    ...   "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "n_routed_experts": 4,
    ...   "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    ...   "moe_shared_expert_intermediate_size": 16, "torch_dtype": "bfloat16"}''')
    >>> table = expected_tensors(cfg)
    >>> table["backbone.layers.1.mixer.k_proj.weight"].shape, len(table)
    ((16, 32), 17)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from secure_run.errors import ModelError
from secure_run.manifests.tensors import TensorInfo
from secure_run.model.config import ModelConfig

__all__ = [
    "AttentionNameMap",
    "TensorSpec",
    "checkpoint_to_internal",
    "expected_tensors",
    "name_map_for",
    "parameter_count",
]

#: safetensors dtype strings by config dtype name.
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and allowed safetensors dtypes of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtypes: frozenset[str]

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class AttentionNameMap:
    """Checkpoint names (module names under ``mixer.``) of the attention-layer projections.

    ``search_query`` is the Q1 projection (the Superlinear search/routing query, used only by
    ``superlinear-exp``); ``query`` is Q2 (the ordinary attention query). Internally the model
    always calls them ``q_search_proj`` and ``q_proj``.
    """

    search_query: str | None = "q_search_proj"
    query: str = "q_proj"
    key: str = "k_proj"
    value: str = "v_proj"
    output: str = "o_proj"

    def __post_init__(self) -> None:
        names = [n for n in (self.search_query, self.query, self.key, self.value, self.output) if n is not None]
        bad = [n for n in names if not _IDENT.match(n)]
        if bad or len(set(names)) != len(names):
            raise ModelError(
                f"attention name map is invalid: {names}",
                rule="loader.name-map",
                hint="use distinct Python identifiers, one per projection",
            )

    def internal_of(self) -> dict[str, str]:
        """checkpoint module name -> internal module name."""
        out = {self.query: "q_proj", self.key: "k_proj", self.value: "v_proj", self.output: "o_proj"}
        if self.search_query is not None:
            out[self.search_query] = "q_search_proj"
        return out


def name_map_for(config: ModelConfig, override: AttentionNameMap | None = None) -> AttentionNameMap:
    """The name map to use: ``override`` if given, else what ``config.json`` records.

    A ``superlinear-exp`` config without ``secure_run_search_proj`` and no override gets a map
    whose ``search_query`` is None, so that loading refuses with the list of unmapped tensors
    (the real checkpoint's Q1 name is not verified, spec/model.md 10.1).
    """
    if override is not None:
        if not config.superlinear and override.search_query is not None:
            return AttentionNameMap(None, override.query, override.key, override.value, override.output)
        return override
    if config.superlinear:
        return AttentionNameMap(search_query=config.secure_run_search_proj)
    return AttentionNameMap(search_query=None)


def _iter_expected(cfg: ModelConfig, names: AttentionNameMap) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, may_be_fp32) in checkpoint naming."""
    d = cfg.hidden_size
    yield "backbone.embeddings.weight", (cfg.vocab_size, d), False
    for i, kind in enumerate(cfg.layer_types):
        p = f"backbone.layers.{i}."
        yield p + "norm.weight", (d,), False
        m = p + "mixer."
        if kind == "mamba":
            h = cfg.mamba_num_heads
            yield m + "in_proj.weight", (cfg.mamba_in_proj_dim, d), False
            yield m + "conv1d.weight", (cfg.mamba_conv_dim, 1, cfg.conv_kernel), False
            if cfg.use_conv_bias:
                yield m + "conv1d.bias", (cfg.mamba_conv_dim,), False
            yield m + "dt_bias", (h,), True
            yield m + "A_log", (h,), True
            yield m + "D", (h,), True
            yield m + "norm.weight", (cfg.mamba_d_inner,), False
            yield m + "out_proj.weight", (d, cfg.mamba_d_inner), False
        elif kind == "moe":
            e, f, fs = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
            yield m + "gate.weight", (e, d), True
            yield m + "gate.e_score_correction_bias", (e,), True
            for j in range(e):
                yield m + f"experts.{j}.up_proj.weight", (f, d), False
                yield m + f"experts.{j}.down_proj.weight", (d, f), False
            yield m + "shared_experts.up_proj.weight", (fs, d), False
            yield m + "shared_experts.down_proj.weight", (d, fs), False
        elif kind == "mlp":
            yield m + "up_proj.weight", (cfg.intermediate_size, d), False
            yield m + "down_proj.weight", (d, cfg.intermediate_size), False
        else:  # attention
            hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            yield m + f"{names.query}.weight", (hq * hd, d), False
            if cfg.superlinear:
                if names.search_query is not None:
                    yield m + f"{names.search_query}.weight", (hq * hd, d), False
            yield m + f"{names.key}.weight", (hkv * hd, d), False
            yield m + f"{names.value}.weight", (hkv * hd, d), False
            yield m + f"{names.output}.weight", (d, hq * hd), False
    yield "backbone.norm_f.weight", (d,), False
    yield "lm_head.weight", (cfg.vocab_size, d), False


def expected_tensors(config: ModelConfig, name_map: AttentionNameMap | None = None) -> dict[str, TensorSpec]:
    """The exact checkpoint tensor table implied by ``config``.

    Dtypes: every tensor has the checkpoint dtype (``torch_dtype``); the router's
    ``e_score_correction_bias`` is always F32; the router weight and the Mamba per-head vectors
    (``dt_bias``, ``A_log``, ``D``) may be either the checkpoint dtype or F32 (upstream releases
    differ; both are lossless for our fp32 use of them).

    For a ``superlinear-exp`` config whose map has no ``search_query`` the Q1 tensors are absent
    from the table, so a real checkpoint's extra tensor shows up as "unmapped" when loading.
    """
    names = name_map_for(config, name_map)
    ck = ST_DTYPE[config.checkpoint_dtype]
    table: dict[str, TensorSpec] = {}
    for name, shape, may_f32 in _iter_expected(config, names):
        if name.endswith("e_score_correction_bias"):
            dtypes = frozenset({"F32"})
        elif may_f32:
            dtypes = frozenset({ck, "F32"})
        else:
            dtypes = frozenset({ck})
        table[name] = TensorSpec(shape=shape, dtypes=dtypes)
    return table


def parameter_count(table: dict[str, TensorSpec]) -> int:
    """Total number of elements of a tensor table."""
    return sum(s.numel for s in table.values())


_ATTN_KEY = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.([A-Za-z_][A-Za-z0-9_]*)\.weight$")


def checkpoint_to_internal(config: ModelConfig, name_map: AttentionNameMap, name: str) -> str:
    """Translate one checkpoint name to the model's ``state_dict`` name (identity except attention)."""
    m = _ATTN_KEY.match(name)
    if m and int(m.group(1)) in config.attention_layers:
        internal = name_map.internal_of().get(m.group(2))
        if internal is None:
            raise ModelError(f"tensor {name} is not in the attention name map", rule="loader.unmapped")
        return f"backbone.layers.{m.group(1)}.mixer.{internal}.weight"
    return name


# --- comparing a checkpoint's tensor table with the architecture (no torch) -------------------

MAX_LISTED = 20


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a validated shard header: its shard file, dtype string, shape and byte range."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    info: TensorInfo


def refusal(message: str, *, rule: str, names: list[str] | None = None, path: str | None = None,
            hint: str | None = None, details: tuple[str, ...] = ()) -> ModelError:
    listed = list(details)
    if names:
        shown = sorted(names)[:MAX_LISTED]
        listed.extend(shown)
        if len(names) > MAX_LISTED:
            listed.append(f"... and {len(names) - MAX_LISTED} more")
    return ModelError(message, details=tuple(listed), hint=hint, path=path, rule=rule)


def check_table(config: ModelConfig, names: AttentionNameMap, found: Mapping[str, HeaderEntry]) -> None:
    """Refuse unless ``found`` equals the expected table exactly (names, shapes, dtypes)."""
    expected: dict[str, TensorSpec] = expected_tensors(config, names)
    attn_prefixes = tuple(f"backbone.layers.{i}.mixer." for i in config.attention_layers)
    extra = sorted(set(found) - set(expected))
    unmapped = [n for n in extra if n.startswith(attn_prefixes)]
    others = [n for n in extra if not n.startswith(attn_prefixes)]
    missing = sorted(set(expected) - set(found))
    if unmapped:
        raise refusal(
            f"{len(unmapped)} attention tensor(s) are not in the attention name map",
            rule="loader.unmapped", names=unmapped,
            details=(f"name map: {names}",),
            hint="the real checkpoint's search-projection name is unverified (README, 'Running the real model'); "
            "set secure_run_search_proj in config.json once confirmed, then sign again",
        )
    if missing:
        raise refusal(f"{len(missing)} tensor(s) the config requires are missing from the checkpoint",
                      rule="loader.missing", names=missing,
                      hint="the checkpoint does not match config.json; use the matching files")
    if others:
        raise refusal(f"{len(others)} tensor(s) in the checkpoint are not part of the architecture",
                      rule="loader.extra", names=others,
                      hint="unknown tensors are refused; remove them or use the matching config.json")
    bad_shape = [f"{n}: got {list(found[n].shape)}, expected {list(s.shape)}"
                 for n, s in expected.items() if found[n].shape != s.shape]
    if bad_shape:
        raise refusal(f"{len(bad_shape)} tensor(s) have a shape that config.json does not imply",
                      rule="loader.shape", names=bad_shape,
                      hint="config.json and the weights disagree; use the config that belongs to these weights")
    bad_dtype = [f"{n}: got {found[n].dtype}, expected {' or '.join(sorted(s.dtypes))}"
                 for n, s in expected.items() if found[n].dtype not in s.dtypes]
    if bad_dtype:
        raise refusal(f"{len(bad_dtype)} tensor(s) have a dtype other than the declared {config.checkpoint_dtype}",
                      rule="loader.dtype", names=bad_dtype,
                      hint="torch_dtype in config.json must match the stored tensors")
