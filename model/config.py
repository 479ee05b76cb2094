"""Config schema of the vendored model: parses ``config.json`` strictly, without importing torch.

``config.json`` is untrusted input. It is parsed once, here, into a frozen :class:`ModelConfig`
whose every field (spec/model.md section 1) is typed and range-checked; a value secure-run does not
implement (an attention bias, tied embeddings, group-limited routing, ...) is refused rather than
silently ignored. Unknown keys are refused unless they are on :data:`INERT_KEYS` (metadata that
cannot change the computation) or :data:`REMOTE_CODE_KEYS` (pointers to upstream code or kernels,
which are reported by :func:`remote_code_pointers` and never acted on).

Two model types are supported:

* ``superlinear-exp`` (the target): the ``*`` layers are Superlinear attention layers and the
  ``span_attention_*`` keys are required;
* ``nemotron_h`` (the base architecture, used for the parity test against transformers): the
  ``*`` layers are plain causal GQA attention and ``span_attention_*`` keys are refused.

Configs written by transformers 5.x (``save_pretrained``) spell the layer layout as
``layers_block_type`` (and leave out ``hybrid_override_pattern`` and ``num_hidden_layers``) and add
``mtp_layers_block_type``, ``num_nextn_predict_layers`` and ``moe_shared_expert_overlap``. These
are accepted when consistent: ``layers_block_type`` must spell exactly the pattern (it is derived
from it when the pattern is absent), multi-token-prediction layers must be absent
(``num_nextn_predict_layers`` 0, so ``mtp_layers_block_type`` is unused), and
``moe_shared_expert_overlap`` is a scheduling switch that transformers' model never reads.

``secure_run_position_mode`` (secure-run's own key, ``superlinear-exp`` only) selects the position
arithmetic of the Superlinear kernels: ``upstream-fp32`` (the default, what the released weights
were trained with) or ``exact`` (spec/model.md section 3.5).

    >>> cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
    ...   "num_hidden_layers": 3, "hybrid_override_pattern": "M*E", "num_attention_heads": 4,
    ...   "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
    ...   "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "chunk_size": 8,
    ...   "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    ...   "moe_shared_expert_intermediate_size": 16, "time_step_limit": [0.0, Infinity],
    ...   "torch_dtype": "float32"}''')
    >>> cfg.layer_types, cfg.attention_layers
    (('mamba', 'attention', 'moe'), (1,))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secure_run.errors import ModelError
from secure_run.manifests._jsoncheck import CODE_POINTER_KEYS, JsonProblem, loads_strict

if TYPE_CHECKING:  # the kernels package may import torch; only needed lazily
    from secure_run.kernels.params import SpanParams

__all__ = [
    "INERT_KEYS",
    "REMOTE_CODE_KEYS",
    "SUPPORTED_MODEL_TYPES",
    "ModelConfig",
    "RemoteCodePointer",
    "load_config",
    "parse_config_json",
    "remote_code_pointers",
]

SUPPORTED_MODEL_TYPES = ("superlinear-exp", "nemotron_h")

#: Keys that point at upstream code or upstream kernel implementations. They are accepted so that
#: an upstream folder can be inspected, reported by :func:`remote_code_pointers`, and never used.
#: One definition with the verifier's scan (``manifests._jsoncheck.CODE_POINTER_KEYS``).
REMOTE_CODE_KEYS = CODE_POINTER_KEYS

#: Metadata and runtime switches that cannot change what the vendored model computes.
INERT_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "_name_or_path",
        "use_cache",
        "use_mamba_kernels",
        "num_logits_to_keep",
        "initializer_range",
        "rescale_prenorm_residual",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "expand",
        "hidden_dropout",
        "attention_dropout",
        "rope_theta",
        "partial_rotary_factor",
        "max_position_embeddings",
        "enable_cuda_graph",
        "enable_shared_fused_moe",
        "output_router_logits",
    }
)

_LAYER_KINDS: dict[str, str] = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
#: layer names of transformers' ``layers_block_type`` (5.x names and the legacy 4.x ones) -> pattern character
_BLOCK_TYPE_CHARS: dict[str, str] = {
    "linear_attention": "M",
    "mamba": "M",
    "moe": "E",
    "full_attention": "*",
    "attention": "*",
    "mlp": "-",
}
_SPAN_KEYS = (
    "span_attention_sw_index",
    "span_attention_num_spans",
    "span_attention_backward_factor",
    "span_attention_forward_factor",
    "span_attention_search_power",
    "span_attention_span_power",
    "span_attention_inv_search_power_int",
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _refuse(message: str, *, rule: str, details: tuple[str, ...] = (), hint: str | None = None,
            path: str = "config.json") -> ModelError:
    return ModelError(message, details=details, hint=hint, path=path, rule=rule)


class ModelConfig(BaseModel):
    """The validated ``config.json`` of a Superlinear-Exp (or plain NemotronH) checkpoint.

    Field names are exactly the ``config.json`` keys. Derived values (layer types, attention layer
    indices, Mamba widths, :class:`~secure_run.kernels.params.SpanParams`) are properties.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, protected_namespaces=())

    # --- identity -------------------------------------------------------------------------------
    model_type: Literal["superlinear-exp", "nemotron_h"]
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    dtype: Literal["bfloat16", "float16", "float32"] | None = None

    # --- trunk ----------------------------------------------------------------------------------
    vocab_size: int = Field(ge=1, le=1 << 24)
    hidden_size: int = Field(ge=1, le=1 << 16)
    num_hidden_layers: int = Field(ge=1, le=1024)
    hybrid_override_pattern: str = Field(min_length=1, max_length=1024)
    tie_word_embeddings: Literal[False] = False
    layer_norm_epsilon: float = Field(default=1e-5, gt=0.0, le=1e-1)
    norm_eps: float | None = Field(default=None, gt=0.0, le=1e-1)
    residual_in_fp32: Literal[False] = False

    # --- attention ------------------------------------------------------------------------------
    num_attention_heads: int = Field(ge=1, le=1024)
    num_key_value_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=1024)
    attention_bias: Literal[False] = False
    sliding_window: None = None

    # --- Mamba-2 --------------------------------------------------------------------------------
    mamba_num_heads: int = Field(ge=1, le=4096)
    mamba_head_dim: int = Field(ge=1, le=1024)
    ssm_state_size: int = Field(ge=1, le=1024)
    n_groups: int = Field(ge=1, le=4096)
    conv_kernel: int = Field(ge=1, le=64)
    chunk_size: int = Field(default=128, ge=1, le=4096)
    use_conv_bias: bool = True
    use_bias: Literal[False] = False
    mamba_proj_bias: Literal[False] = False
    mamba_hidden_act: Literal["silu"] = "silu"
    mamba_ssm_cache_dtype: Literal["float32"] = "float32"
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    # --- MoE / MLP ------------------------------------------------------------------------------
    n_routed_experts: int = Field(ge=1, le=4096)
    num_experts_per_tok: int = Field(ge=1, le=4096)
    n_shared_experts: Literal[1] = 1
    moe_intermediate_size: int = Field(ge=1, le=1 << 18)
    moe_shared_expert_intermediate_size: int = Field(ge=1, le=1 << 18)
    intermediate_size: int = Field(default=1, ge=1, le=1 << 18)
    mlp_hidden_act: Literal["relu2"] = "relu2"
    mlp_bias: Literal[False] = False
    n_group: Literal[1] = 1
    topk_group: Literal[1] = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = Field(default=1.0, gt=0.0, le=1e4)
    moe_latent_size: None = None

    # --- transformers 5.x spellings (must agree with the fields above) --------------------------
    layers_block_type: tuple[str, ...] | None = None
    mtp_layers_block_type: tuple[str, ...] | None = None
    num_nextn_predict_layers: int = Field(default=0, ge=0, le=1024)
    moe_shared_expert_overlap: bool | None = None

    # --- token ids (generation_config.json is authoritative for stopping) ----------------------
    bos_token_id: int | None = Field(default=None, ge=0)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = Field(default=None, ge=0)

    # --- Superlinear attention (model_type superlinear-exp only) -------------------------------
    span_attention_sw_index: int | None = Field(default=None, ge=0, le=1 << 20)
    span_attention_num_spans: int | None = Field(default=None, ge=1, le=64)
    span_attention_backward_factor: float | None = Field(default=None, ge=0.0, le=1e4)
    span_attention_forward_factor: float | None = Field(default=None, ge=0.0, le=1e4)
    span_attention_search_power: float | None = Field(default=None, gt=0.0, lt=1.0)
    span_attention_span_power: float | None = Field(default=None, gt=0.0, le=1.0)
    span_attention_inv_search_power_int: int | None = Field(default=None, ge=2, le=6)

    #: secure-run's own key: the checkpoint name of the search-query (Q1) projection in each
    #: attention layer (spec/model.md 2.6: not verified for the real checkpoint).
    secure_run_search_proj: str | None = None
    #: secure-run's own key: position arithmetic of the Superlinear kernels (default upstream-fp32)
    secure_run_position_mode: Literal["upstream-fp32", "exact"] | None = None

    # --- accepted, never used (INERT_KEYS / REMOTE_CODE_KEYS; kept for reporting) ---------------
    inert: dict[str, Any] = Field(default_factory=dict, exclude=True)
    remote_code: dict[str, Any] = Field(default_factory=dict, exclude=True)

    # ---------------------------------------------------------------------------------------------
    @field_validator("time_step_limit", mode="before")
    @classmethod
    def _decode_float_markers(cls, v: Any) -> Any:
        # transformers writes Infinity as {"__float__": "Infinity"}; accept that spelling too.
        if isinstance(v, list | tuple):
            return tuple(_float_marker(x) for x in v)
        return v

    @field_validator("time_step_limit")
    @classmethod
    def _check_time_step_limit(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and lo >= 0.0 and hi > lo) or math.isnan(hi):
            raise ValueError(f"must be [low, high] with 0 <= low < high (high may be Infinity), got {list(v)}")
        return v

    @field_validator("layers_block_type", "mtp_layers_block_type", mode="before")
    @classmethod
    def _block_type_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("layers_block_type", "mtp_layers_block_type")
    @classmethod
    def _check_block_types(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        bad = sorted({t for t in v or () if t not in _BLOCK_TYPE_CHARS})
        if bad:
            raise ValueError(f"has layer types {bad}; allowed: {sorted(_BLOCK_TYPE_CHARS)}")
        return v

    @field_validator("hybrid_override_pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        bad = sorted({c for c in v if c not in _LAYER_KINDS})
        if bad:
            raise ValueError(f"has characters {bad}; allowed: M (mamba), E (moe), * (attention), - (mlp)")
        return v

    @field_validator("secure_run_search_proj")
    @classmethod
    def _check_proj_name(cls, v: str | None) -> str | None:
        if v is not None and not _IDENTIFIER.match(v):
            raise ValueError(f"must be a Python identifier such as 'q_search_proj', got {v!r}")
        return v

    @field_validator("eos_token_id")
    @classmethod
    def _check_eos(cls, v: int | list[int] | None) -> int | list[int] | None:
        ids = [v] if isinstance(v, int) else (v or [])
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelConfig:
        problems = list(_cross_field_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived ----------------------------------------------------------------------------------
    @property
    def superlinear(self) -> bool:
        """True for ``superlinear-exp`` (Superlinear attention layers), False for ``nemotron_h``."""
        return self.model_type == "superlinear-exp"

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Block kind of every layer: ``mamba``, ``moe``, ``attention`` or ``mlp``."""
        return tuple(_LAYER_KINDS[c] for c in self.hybrid_override_pattern)

    def layers_of(self, kind: str) -> tuple[int, ...]:
        """Indices of the layers of one kind (``mamba``, ``moe``, ``attention``, ``mlp``)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == kind)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the attention (``*``) layers."""
        return self.layers_of("attention")

    @property
    def eps(self) -> float:
        """RMSNorm epsilon of every norm (block, final, gated)."""
        return self.layer_norm_epsilon

    @property
    def checkpoint_dtype(self) -> str:
        """The declared tensor dtype of the checkpoint (``torch_dtype``, or transformers' ``dtype``)."""
        value = self.torch_dtype or self.dtype
        assert value is not None  # enforced by the cross checks
        return value

    @property
    def mamba_d_inner(self) -> int:
        """d_inner = mamba_num_heads * mamba_head_dim (``expand`` is not used)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv: x (d_inner) + B and C (n_groups * ssm_state_size each)."""
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        """Output width of in_proj: z (d_inner) + xBC (conv_dim) + dt (mamba_num_heads)."""
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    def span_params(self) -> SpanParams:
        """The Superlinear hyper-parameters (``superlinear-exp`` only)."""
        from secure_run.kernels.params import SpanParams

        if not self.superlinear:
            raise _refuse("span_params() needs model_type 'superlinear-exp'", rule="config.model-type")
        assert self.span_attention_sw_index is not None and self.span_attention_num_spans is not None
        assert self.span_attention_backward_factor is not None and self.span_attention_span_power is not None
        return SpanParams(
            sw_index=self.span_attention_sw_index,
            num_spans=self.span_attention_num_spans,
            backward_factor=float(self.span_attention_backward_factor),
            forward_factor=float(self.span_attention_forward_factor or 0.0),
            span_power=float(self.span_attention_span_power),
            search_power=self.span_attention_search_power,
            inv_search_power_int=self.span_attention_inv_search_power_int,
            position_mode=self.position_mode,
        )

    @property
    def position_mode(self) -> Literal["upstream-fp32", "exact"]:
        """Position arithmetic of the Superlinear kernels: ``secure_run_position_mode`` or upstream-fp32."""
        return self.secure_run_position_mode or "upstream-fp32"

    def summary(self) -> dict[str, object]:
        """A small JSON-able summary for ``secure-run inspect``."""
        return {
            "model_type": self.model_type,
            "checkpoint_dtype": self.checkpoint_dtype,
            "num_hidden_layers": self.num_hidden_layers,
            "layer_counts": {k: len(self.layers_of(k)) for k in ("mamba", "moe", "attention", "mlp")},
            "attention_layers": list(self.attention_layers),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "remote_code_pointers": sorted(self.remote_code),
        }


def _float_marker(x: Any) -> Any:
    if isinstance(x, dict) and set(x) == {"__float__"} and x["__float__"] in ("Infinity", "inf"):
        return math.inf
    return x


def _cross_field_problems(c: ModelConfig) -> list[str]:
    out: list[str] = []
    if len(c.hybrid_override_pattern) != c.num_hidden_layers:
        out.append(
            f"[config.pattern-length] hybrid_override_pattern has {len(c.hybrid_override_pattern)} layers "
            f"but num_hidden_layers is {c.num_hidden_layers}"
        )
    out.extend(_transformers_spelling_problems(c))
    if c.torch_dtype is None and c.dtype is None:
        out.append("[config.dtype] torch_dtype (or dtype) must declare the checkpoint dtype")
    elif c.torch_dtype is not None and c.dtype is not None and c.torch_dtype != c.dtype:
        out.append(f"[config.dtype] torch_dtype {c.torch_dtype!r} and dtype {c.dtype!r} disagree")
    if c.norm_eps is not None and c.norm_eps != c.layer_norm_epsilon:
        out.append(f"[config.eps] norm_eps {c.norm_eps} != layer_norm_epsilon {c.layer_norm_epsilon}")
    if c.num_attention_heads % c.num_key_value_heads:
        out.append(
            f"[config.gqa] num_attention_heads {c.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {c.num_key_value_heads}"
        )
    if c.mamba_num_heads % c.n_groups:
        out.append(f"[config.mamba-groups] mamba_num_heads {c.mamba_num_heads} is not a multiple of n_groups {c.n_groups}")
    if c.num_experts_per_tok > c.n_routed_experts:
        out.append(
            f"[config.moe-topk] num_experts_per_tok {c.num_experts_per_tok} > n_routed_experts {c.n_routed_experts}"
        )
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(c, name)
        if v is not None and v >= c.vocab_size:
            out.append(f"[config.token-id] {name} {v} is outside the vocabulary (vocab_size {c.vocab_size})")
    eos = [c.eos_token_id] if isinstance(c.eos_token_id, int) else (c.eos_token_id or [])
    if any(i >= c.vocab_size for i in eos):
        out.append(f"[config.token-id] eos_token_id {c.eos_token_id} is outside the vocabulary")
    present = [k for k in _SPAN_KEYS if getattr(c, k) is not None]
    if c.superlinear:
        required = _SPAN_KEYS[:4] + (_SPAN_KEYS[5],)
        missing = [k for k in required if getattr(c, k) is None]
        if missing:
            out.append(f"[config.span-missing] model_type 'superlinear-exp' needs {missing}")
        if (c.span_attention_search_power is None) == (c.span_attention_inv_search_power_int is None):
            out.append(
                "[config.span-power] exactly one of span_attention_search_power and "
                "span_attention_inv_search_power_int must be set"
            )
        if c.head_dim > 256:
            out.append(f"[config.head-dim] Superlinear kernels need head_dim <= 256, got {c.head_dim}")
    else:
        if present:
            out.append(f"[config.span-unexpected] model_type 'nemotron_h' has no Superlinear layers; remove {present}")
        for key in ("secure_run_search_proj", "secure_run_position_mode"):
            if getattr(c, key) is not None:
                out.append(f"[config.span-unexpected] {key} is only meaningful for 'superlinear-exp'")
    return out


def _pattern_of(block_types: tuple[str, ...]) -> str:
    return "".join(_BLOCK_TYPE_CHARS.get(t, "?") for t in block_types)


def _transformers_spelling_problems(c: ModelConfig) -> list[str]:
    """The keys transformers 5.x writes must agree with the pattern and describe no MTP layers."""
    out: list[str] = []
    if c.layers_block_type is not None and _pattern_of(c.layers_block_type) != c.hybrid_override_pattern:
        out.append(
            f"[config.layers-block-type] layers_block_type spells the pattern {_pattern_of(c.layers_block_type)!r} "
            f"but hybrid_override_pattern is {c.hybrid_override_pattern!r}"
        )
    if c.num_nextn_predict_layers:
        out.append(
            f"[config.mtp] num_nextn_predict_layers is {c.num_nextn_predict_layers}: secure-run does not implement "
            "multi-token-prediction layers (set it to 0, and leave the mtp.* tensors out of the checkpoint)"
        )
    return out


# --- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteCodePointer:
    """One key of ``config.json`` that points at upstream code (reported, never acted on)."""

    key: str
    value: str

    def describe(self) -> str:
        """One human-readable line."""
        return f"{self.key} = {self.value} (ignored: secure-run never runs model-supplied code)"


def remote_code_pointers(raw: Mapping[str, Any] | ModelConfig) -> list[RemoteCodePointer]:
    """List every remote-code pointer of a raw ``config.json`` mapping (or a parsed config).

    Args:
        raw: the decoded JSON object, or a :class:`ModelConfig` (which keeps them aside).

    Returns:
        One entry per key of :data:`REMOTE_CODE_KEYS` present, sorted by key; values are rendered
        as compact JSON. Nothing here is ever imported or executed.
    """
    items = raw.remote_code if isinstance(raw, ModelConfig) else raw
    return [
        RemoteCodePointer(key=k, value=json.dumps(items[k], sort_keys=True, separators=(",", ":")))
        for k in sorted(items)
        if k in REMOTE_CODE_KEYS
    ]


def parse_config_json(text: str | bytes, *, path: str = "config.json") -> ModelConfig:
    """Parse and validate the text of a ``config.json``.

    Python-style ``Infinity`` literals are accepted (upstream writes ``time_step_limit`` with one);
    ``NaN`` and duplicate keys are refused.

    Raises:
        ModelError: with ``rule`` ``config.*`` naming the field, what was found and how to fix it.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:  # the one strict JSON loader (manifests._jsoncheck): Infinity accepted, NaN and duplicates not
        raw = loads_strict(data, allow_infinity=True)
    except JsonProblem as err:
        rule = {"JSON-NAN": "config.nan", "JSON-DUPKEY": "config.duplicate-key"}.get(err.rule, "config.json")
        hint = {"config.nan": "replace NaN by a number",
                "config.duplicate-key": "a JSON object with repeated keys is ambiguous (parsers keep different "
                                        "copies); remove one"}.get(rule)
        raise _refuse(f"{path} is not valid JSON: {err.message}", rule=rule, path=path, hint=hint) from None
    if not isinstance(raw, dict):
        raise _refuse(f"{path} must be a JSON object, got {type(raw).__name__}", rule="config.json", path=path)
    return config_from_dict(raw, path=path)


def config_from_dict(raw: Mapping[str, Any], *, path: str = "config.json") -> ModelConfig:
    """Validate an already-decoded ``config.json`` object (see :func:`parse_config_json`)."""
    fields = set(ModelConfig.model_fields) - {"inert", "remote_code"}
    unknown = sorted(k for k in raw if k not in fields and k not in INERT_KEYS and k not in REMOTE_CODE_KEYS)
    if unknown:
        raise _refuse(
            f"{path} has keys secure-run does not know: {', '.join(unknown)}",
            rule="config.unknown-field",
            details=tuple(f"unknown key {k!r}" for k in unknown),
            hint="an unknown key may change the computation; review it and extend the vendored schema "
            "(model/config.py) or remove it from the config",
            path=path,
        )
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _refuse(
            f"{path}: model_type {mt!r} is not supported",
            rule="config.model-type",
            hint=f"secure-run vendors {list(SUPPORTED_MODEL_TYPES)} only",
            path=path,
        )
    data = {k: v for k, v in raw.items() if k in fields}
    data.update(_derived_layout(raw))
    data["inert"] = {k: v for k, v in raw.items() if k in INERT_KEYS}
    data["remote_code"] = {k: v for k, v in raw.items() if k in REMOTE_CODE_KEYS}
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        details = tuple(_describe(e) for e in err.errors())
        rules = sorted({_rule_of(e) for e in err.errors()})
        raise _refuse(
            f"{path} does not match the vendored architecture ({len(details)} problem(s))",
            rule=rules[0] if len(rules) == 1 else "config.invalid",
            details=details,
            hint="fix the listed fields of config.json (each line names the field and what it got); this "
            "model is not the vendored architecture if they differ",
            path=path,
        ) from None


def _derived_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """hybrid_override_pattern / num_hidden_layers derived from layers_block_type when left out.

    transformers 5.x writes only ``layers_block_type``; a list of known layer names gives the
    pattern and the layer count. Anything else is left for the validation to report.
    """
    types = raw.get("layers_block_type")
    if "hybrid_override_pattern" in raw or not isinstance(types, list) or not types:
        return {}
    if not all(isinstance(t, str) and t in _BLOCK_TYPE_CHARS for t in types):
        return {}
    out: dict[str, Any] = {"hybrid_override_pattern": _pattern_of(tuple(types))}
    if "num_hidden_layers" not in raw:
        out["num_hidden_layers"] = len(types)
    return out


def _describe(e: Any) -> str:
    loc = ".".join(str(x) for x in e.get("loc", ())) or "(config)"
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    if "input" in e and e.get("type") != "model_type" and loc != "(config)":
        return f"{loc}: {msg} (got {e['input']!r})"
    return f"{loc}: {msg}"


def _rule_of(e: Any) -> str:
    msg = str(e.get("msg", ""))
    m = re.search(r"\[(config\.[a-z-]+)\]", msg)
    if m:
        return m.group(1)
    return "config.range" if e.get("loc") else "config.invalid"


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``model_dir/config.json``."""
    p = Path(model_dir) / "config.json"
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise _refuse("config.json is missing", rule="config.missing", path=str(p),
                      hint="a model folder must contain config.json") from None
    return parse_config_json(text, path="config.json")
