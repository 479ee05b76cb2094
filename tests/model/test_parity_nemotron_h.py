"""Parity with an independent implementation: transformers' native NemotronH (test-only, CPU).

transformers builds a tiny NemotronH with random weights and saves it in the NVIDIA on-disk
layout (``backbone.*``, one 2-D tensor per routed expert); secure-run loads those files through
its strict loader and must produce the same logits (fp32, <= 1e-4 relative error) for the prefill
and for every decode step.

Delta clamp: transformers' pure-torch Mamba fallback clamps Delta to ``(time_step_min, inf)`` up to
5.24 and to ``config.time_step_limit`` from 5.25; the model is built with both at 0.001, so every
version clamps alike. The CUDA kernels (and spec/model.md 2.3 step 4) use ``time_step_limit = (0,
inf)``; transformers cannot be built with ``time_step_min = 0`` (its dt_bias init takes
``log(time_step_min)``), so after construction every HF mixer's ``time_step_limit`` attribute is set
to ``(0, inf)``, the value our config carries. A second test keeps transformers' clamp and gives
our config ``time_step_limit = [0.001, inf]`` instead: the prefills agree, and so does our decode
with transformers' full forward; transformers' own single-step decode does not clamp at all (its
``selective_state_update`` fallback has no dt limit), so it disagrees with its own prefill there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import TINY, TINY_SL

from secure_run.model.loader import load_model
from secure_run.model.model import HybridLM

transformers = pytest.importorskip("transformers")

B, L, PREFIX = 2, 21, 15
TOL = 1e-4


def _hf_model(patch_clamp: bool) -> Any:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    keys = ("vocab_size", "hidden_size", "hybrid_override_pattern", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
            "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "routed_scaling_factor", "layer_norm_epsilon")
    # the clamp made explicit: transformers <= 5.24 clamps Delta to (time_step_min, inf) whatever the
    # config says, 5.25 on to config.time_step_limit; with both set to 0.001 every version clamps alike
    hc = NemotronHConfig(**{k: TINY[k] for k in keys}, n_shared_experts=1, max_position_embeddings=256,
                         time_step_min=0.001, time_step_limit=(0.001, math.inf))
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    model = NemotronHForCausalLM(hc).eval()
    if patch_clamp:
        for mod in model.modules():
            if hasattr(mod, "time_step_limit"):
                mod.time_step_limit = (0.0, math.inf)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values everywhere (HF's init leaves norms at 1, biases at 0, ...)
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):  # softplus straddles time_step_min, so the clamp matters
                p.copy_(2.0 * torch.randn(p.shape, generator=g) - 6.0)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "conv1d" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model


def _save_nvidia_layout(model: Any, path: Path, config: dict[str, Any]) -> Path:
    model.save_pretrained(str(path))
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("backbone.", "lm_head.")) for n in names)  # on-disk NVIDIA naming
    assert "backbone.layers.3.mixer.experts.7.down_proj.weight" in names  # one tensor per expert
    (path / "config.json").write_text(json.dumps(config))  # our schema (transformers' own keys differ)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, L), generator=torch.Generator().manual_seed(2))


def _compare(hf: Any, ours: HybridLM) -> None:
    ids = _ids()
    with torch.no_grad():
        ref_full = hf(ids).logits
    assert _rel(ours(ids), ref_full) <= TOL  # one-shot prefill

    with torch.no_grad():
        out = hf(ids[:, :PREFIX], use_cache=True)
    hf_cache = getattr(out, "cache", None) or out.past_key_values
    cache = ours.new_cache(B, L)
    assert _rel(ours(ids[:, :PREFIX], cache), out.logits) <= TOL  # prefill with caches
    for t in range(PREFIX, L):  # every decode step
        with torch.no_grad():
            step = hf(ids[:, t:t + 1], cache=hf_cache, use_cache=True)
        hf_cache = getattr(step, "cache", None) or step.past_key_values
        mine = ours(ids[:, t:t + 1], cache)
        assert _rel(mine, step.logits) <= TOL, t
        assert _rel(mine[:, 0], ref_full[:, t]) <= TOL, t


@pytest.fixture(scope="module")
def hf_parity(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = _hf_model(patch_clamp=True)
    return hf, _save_nvidia_layout(hf, tmp_path_factory.mktemp("hf"), TINY)


def test_nemotron_h_parity_prefill_and_decode(hf_parity: tuple[Any, Path]) -> None:
    hf, path = hf_parity
    ours = load_model(path)
    assert not ours.config.superlinear
    _compare(hf, ours)


def test_superlinear_layer_with_covering_window_matches_nemotron_h(hf_parity: tuple[Any, Path]) -> None:
    # The Superlinear layer (one call to secure_run.kernels.superlinear_attention per forward) with
    # Q1 = a copy of q_proj and a window covering the sequence equals HF's dense causal attention.
    hf, path = hf_parity
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    for i in range(TINY["num_hidden_layers"]):
        if TINY["hybrid_override_pattern"][i] == "*":
            state[f"backbone.layers.{i}.mixer.q_search_proj.weight"] = state[f"backbone.layers.{i}.mixer.q_proj.weight"].clone()
    sl_dir = path.parent / "superlinear"
    sl_dir.mkdir()
    save_file(state, str(sl_dir / "model.safetensors"))
    cfg = TINY_SL | {"span_attention_sw_index": 15}  # p = 0.55: window 153 >= L
    (sl_dir / "config.json").write_text(json.dumps(cfg))
    ours = load_model(sl_dir)
    assert ours.config.superlinear and ours.config.span_params().window_len >= L
    _compare(hf, ours)


def test_parity_with_transformers_delta_clamp(tmp_path: Path) -> None:
    hf = _hf_model(patch_clamp=False)  # HF's fallback: Delta clamped to (time_step_min, inf)
    path = _save_nvidia_layout(hf, tmp_path / "clamped", TINY | {"time_step_limit": [0.001, math.inf]})
    clamped = load_model(path)
    ids = _ids()
    with torch.no_grad():
        ref_full = hf(ids).logits
        out = hf(ids[:, :PREFIX], use_cache=True)
        hf_step = hf(ids[:, PREFIX:PREFIX + 1], cache=getattr(out, "cache", None) or out.past_key_values,
                     use_cache=True).logits
    assert _rel(clamped(ids), ref_full) <= TOL  # prefill: same clamp, same logits
    cache = clamped.new_cache(B, L)
    assert _rel(clamped(ids[:, :PREFIX], cache), out.logits) <= TOL
    mine = clamped(ids[:, PREFIX:PREFIX + 1], cache)
    assert _rel(mine[:, 0], ref_full[:, PREFIX]) <= TOL  # our decode clamps like the prefill
    assert _rel(hf_step[:, 0], ref_full[:, PREFIX]) > 10 * TOL  # HF's unclamped step does not
    # and the clamp is not a no-op on these weights: without it the logits differ well beyond TOL
    (path / "config.json").write_text(json.dumps(TINY))
    assert _rel(load_model(path)(ids), clamped(ids)) > 100 * TOL
