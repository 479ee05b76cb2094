"""Helpers of the model tests: tiny configs, the released config (spec values), model folders."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from secure_run.model.checkpoint import expected_tensors
from secure_run.model.config import ModelConfig, config_from_dict

#: A tiny hybrid with every block kind (M, E, *, -), GQA, and several Mamba chunks.
TINY: dict[str, Any] = {
    "model_type": "nemotron_h",
    "torch_dtype": "float32",
    "vocab_size": 96,
    "hidden_size": 64,
    "num_hidden_layers": 8,
    "hybrid_override_pattern": "M*ME-M*E",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 48,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 40,
    "routed_scaling_factor": 2.5,
    "layer_norm_epsilon": 1e-5,
    "time_step_limit": [0.0, math.inf],
}

#: Superlinear variant of TINY: small window (sw_index 2, p = 0.55 -> W = 6) so spans are searched.
TINY_SL: dict[str, Any] = TINY | {
    "model_type": "superlinear-exp",
    "span_attention_sw_index": 2,
    "span_attention_num_spans": 2,
    "span_attention_backward_factor": 3.0,
    "span_attention_forward_factor": 1.0,
    "span_attention_search_power": 0.55,
    "span_attention_span_power": 0.55,
    "secure_run_search_proj": "q_search_proj",
}


def tiny_config(base: Mapping[str, Any] = TINY, **changes: Any) -> ModelConfig:
    return config_from_dict(dict(base) | changes)


def random_state(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors for every checkpoint name, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in sorted(expected_tensors(cfg).items()):
        shape = spec.shape
        if name.endswith(("norm.weight", "norm_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("A_log"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("dt_bias"):
            t = torch.randn(shape, generator=g) - 2.0
        elif name.endswith("e_score_correction_bias"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and not name.endswith("conv1d.weight"):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        else:
            t = torch.randn(shape, generator=g)
        out[name] = t.to(torch.float32 if name.endswith("e_score_correction_bias") else dtype)
    return out


def write_folder(path: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                 shards: int = 1) -> Path:
    """Write config.json and the tensors (one file, or ``shards`` files plus an index)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config)))
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, str(path / "model.safetensors"))
        return path
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: state[n].contiguous() for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path



#: Upstream NemotronH fields (spec/model.md 1.1) plus the Superlinear keys (1.2).
REAL_CONFIG: dict[str, object] = {
    "architectures": ["SuperlinearExpForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_superlinear_exp.SuperlinearExpConfig",
        "AutoModelForCausalLM": "modeling_superlinear_exp.SuperlinearExpForCausalLM",
    },
    "model_type": "superlinear-exp",
    "_attn_implementation": "block-span-gqa",
    "decode_kernel": "staged-gqa",
    "enable_cuda_graph": True,
    "enable_shared_fused_moe": True,
    "vocab_size": 131072,
    "hidden_size": 2688,
    "num_hidden_layers": 52,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": 262144,
    "rope_theta": 10000,
    "partial_rotary_factor": 1.0,
    "sliding_window": None,
    "mamba_num_heads": 64,
    "mamba_head_dim": 64,
    "ssm_state_size": 128,
    "n_groups": 8,
    "conv_kernel": 4,
    "chunk_size": 128,
    "expand": 2,
    "use_conv_bias": True,
    "use_bias": False,
    "mamba_proj_bias": False,
    "mamba_hidden_act": "silu",
    "mamba_ssm_cache_dtype": "float32",
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_limit": [0.0, float("inf")],
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "n_shared_experts": 1,
    "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712,
    "intermediate_size": 1856,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "layer_norm_epsilon": 1e-5,
    "norm_eps": 1e-5,
    "residual_in_fp32": False,
    "rescale_prenorm_residual": True,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "hidden_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "num_logits_to_keep": 1,
    "use_cache": True,
    "use_mamba_kernels": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.55.4",
    "span_attention_sw_index": 65,
    "span_attention_num_spans": 3,
    "span_attention_backward_factor": 3,
    "span_attention_forward_factor": 1,
    "span_attention_search_power": 0.55,
    "span_attention_span_power": 0.55,
}


def real_config_text(**changes: object) -> str:
    """config.json text (with the upstream ``Infinity`` literal), after applying ``changes``."""
    cfg = dict(REAL_CONFIG)
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return json.dumps(cfg, indent=2)


_DELETE = object()
DELETE = _DELETE
