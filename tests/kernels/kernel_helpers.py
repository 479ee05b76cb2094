"""Shared inputs, parameter sets and error metrics for the kernel tests (CPU and GPU)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from secure_run.kernels.params import SpanParams
from secure_run.kernels.reference import SpanSearch, span_search_reference

P_INT2 = SpanParams(sw_index=2, num_spans=3, backward_factor=2.0, forward_factor=1.0, span_power=0.5,
                    inv_search_power_int=2)
P_INT3_NOFWD = SpanParams(sw_index=1, num_spans=2, backward_factor=3.0, forward_factor=0.0, span_power=0.5,
                          inv_search_power_int=3)
P_F55 = SpanParams(sw_index=3, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.55,
                   search_power=0.55)
P_F6_NOWIN = SpanParams(sw_index=0, num_spans=2, backward_factor=2.0, forward_factor=0.5, span_power=0.6,
                        search_power=0.6)
#: the released model's hyper-parameters
P_RELEASED = SpanParams(sw_index=65, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.55,
                        search_power=0.55)
#: released-like, integer power mode (upstream parity): W = 46**2 - 1 = 2115
P_RELEASED_INT = SpanParams(sw_index=45, num_spans=3, backward_factor=3.0, forward_factor=1.0, span_power=0.5,
                            inv_search_power_int=2)

SMALL = {"int2": P_INT2, "int3-nofwd": P_INT3_NOFWD, "f0.55": P_F55, "f0.6-nowindow": P_F6_NOWIN}

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_inputs(
    B: int, Hq: int, Hkv: int, Lq: int, Lkv: int, D: int, dtype: torch.dtype, device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q1, q2 [B,Hq,Lq,D] and k, v [B,Hkv,Lkv,D] (fresh per seed; never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return r(B, Hq, Lq, D), r(B, Hq, Lq, D), r(B, Hkv, Lkv, D), r(B, Hkv, Lkv, D)


def left_pad_mask(B: int, Lkv: int, pad: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Batch row 1 (if any) starts ``pad`` tokens late; row 0 also has one hole at key 3."""
    m = torch.ones(B, Lkv, dtype=torch.int64, device=device)
    if B > 1:
        m[1, :pad] = 0
    m[0, 3] = 0
    return m


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error [B, Hq, Lq] (rows with a tiny reference norm use a floor)."""
    o = out.double()
    r = ref.double()
    num = (o - r).norm(dim=-1)
    rn = r.norm(dim=-1)
    floor = 0.1 * rn.median().clamp(min=1e-30)
    return num / torch.maximum(rn, floor)


def near_tie_rows(
    q1: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, params: SpanParams, mask: torch.Tensor | None,
    rel: float,
) -> torch.Tensor:
    """Rows [B, Hq, Lq] whose k-th and (k+1)-th best anchor scores are within ``rel`` (relative).

    There rounding may legitimately pick a different anchor set (performance.md section 5).
    """
    more = dataclasses.replace(params, num_spans=params.num_spans + 1)
    s: SpanSearch = span_search_reference(q1, k, pos, more, mask)
    kth = s.values[..., params.num_spans - 1]
    nxt = s.values[..., params.num_spans]
    scale = s.values[..., 0].abs().clamp(min=1.0)
    both = torch.isfinite(kth) & torch.isfinite(nxt)
    return both & ((kth - nxt).abs() <= rel * scale)


_TINY_MAMBA_CONFIG = '''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
  "num_hidden_layers": 1, "hybrid_override_pattern": "M", "num_attention_heads": 4,
  "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 16,
  "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4, "chunk_size": 16, "n_routed_experts": 4,
  "num_experts_per_tok": 2, "moe_intermediate_size": 16,
  "moe_shared_expert_intermediate_size": 16, "torch_dtype": "float32"}'''


def tiny_mamba_mixer(seed: int):  # type: ignore[no-untyped-def]
    """A one-layer Mamba-2 mixer (4 heads of 16, state 16, 2 groups, chunk 16) with random weights and
    random dt_bias / A_log / D / norm weight, and a factory of empty states for it."""
    from secure_run.model.cache import MambaState
    from secure_run.model.config import parse_config_json
    from secure_run.model.mamba2 import Mamba2Mixer

    cfg = parse_config_json(_TINY_MAMBA_CONFIG)
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(cfg)
    with torch.no_grad():
        mixer.dt_bias.copy_(torch.randn(4) - 1.0)
        mixer.A_log.copy_(0.5 * torch.randn(4))
        mixer.D.copy_(torch.randn(4))
        mixer.norm.weight.copy_(1.0 + 0.2 * torch.randn(64))

    def new_state() -> MambaState:
        return MambaState(conv=torch.zeros(1, cfg.mamba_conv_dim, 4), ssm=torch.zeros(1, 4, 16, 16))

    return mixer, new_state


def spy_tma_descriptors(monkeypatch: Any, module: Any) -> list[bool]:
    """Replace ``module.tma_descriptor`` by a wrapper that records, for each descriptor asked
    for, whether one was made; returns that (growing) record."""
    made: list[bool] = []
    real = module.tma_descriptor

    def spy(x: torch.Tensor, block_n: int, block_d: int) -> object | None:
        got = real(x, block_n, block_d)
        made.append(got is not None)
        return got

    monkeypatch.setattr(module, "tma_descriptor", spy)
    return made
