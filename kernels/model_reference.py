"""PyTorch references of the fused model kernels (MoE routing + experts, Mamba-2 decode step, add+RMSNorm).

These are the oracles of the Triton kernels in ``_triton_moe``, ``_triton_mamba`` and
``_triton_norm``, and the device-side (no host synchronisation) PyTorch path of the model where
Triton cannot run. Every function here is free of ``.item()``/``.tolist()``/``int(tensor)`` so it
can be captured in a CUDA graph; the math equals ``secure_run.model`` (spec/model.md 2.3-2.4).

Axis legend: ``T`` tokens, ``d`` hidden, ``E`` routed experts, ``k`` experts per token, ``F``
expert width, ``B`` batch, ``H`` SSM heads, ``P`` head dim, ``G`` groups, ``N`` state size,
``C`` conv channels, ``K`` conv width.

    >>> import torch
    >>> ids, w = moe_route_reference(torch.ones(2, 4), torch.eye(3, 4), torch.zeros(3), 2, True, 1.0)
    >>> tuple(ids.shape), tuple(w.shape), round(float(w.sum()), 4)
    ((2, 2), (2, 2), 2.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "add_rmsnorm_reference",
    "causal_conv1d_reference",
    "mamba_decode_step_reference",
    "mamba_prefill_ssd_reference",
    "moe_experts_reference",
    "moe_route_reference",
]


def moe_route_reference(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, top_k: int,
                        normalise: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid router: x [T, d], gate_w [E, d], bias [E] (selection only) -> (ids [T, k] int64, w [T, k] fp32).

    Ids are ordered by decreasing biased score (as ``torch.topk``); weights are the unbiased
    scores of the chosen experts, renormalised when ``normalise``, times ``scale``.
    """
    scores = torch.sigmoid(F.linear(x.float(), gate_w.float()))  # [T, E]
    idx = torch.topk(scores + bias.float(), top_k, dim=-1).indices  # [T, k]
    w = scores.gather(1, idx)
    if normalise:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scale


def moe_experts_reference(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, up: torch.Tensor,
                          down: torch.Tensor, shared_up: torch.Tensor | None = None,
                          shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """Routed relu^2 experts (+ the shared expert): x [T, d] -> [T, d] in x's dtype.

    ``up`` [E, F, d] and ``down`` [E, d, F] are the stacked expert weights; expert ``ids[t, s]``
    runs on token t with weight ``w[t, s]``. Each expert's output is rounded to x's dtype (as an
    ``nn.Linear`` in that dtype would), accumulated in fp32, rounded, then the shared expert's
    output is added in x's dtype. No host synchronisation (gathers the chosen experts' weights).
    """
    t, k = ids.shape
    flat = ids.reshape(-1)  # [T*k]
    xs = x.repeat_interleave(k, dim=0)  # [T*k, d]
    hid = torch.relu(torch.bmm(up[flat], xs[:, :, None])[..., 0]).square()  # [T*k, F] in x dtype
    out = torch.bmm(down[flat], hid[:, :, None])[..., 0]  # [T*k, d]
    routed = (out.float() * w.reshape(-1, 1).float()).reshape(t, k, -1).sum(dim=1)  # [T, d] fp32
    result = routed.to(x.dtype)
    if shared_up is not None and shared_down is not None:
        result = result + F.linear(torch.relu(F.linear(x, shared_up)).square(), shared_down)
    return result


def mamba_decode_step_reference(
    proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_w: torch.Tensor,
    conv_b: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
    norm_w: torch.Tensor, *, n_heads: int, head_dim: int, n_groups: int, state_size: int,
    dt_min: float, dt_max: float, eps: float,
) -> torch.Tensor:
    """One Mamba-2 decode step after ``in_proj``, up to (not including) ``out_proj``.

    Args:
        proj: [B, d_inner + C + H] = (z, xBC, dt_raw) of the new token (model dtype).
        conv_state: [B, C, K] last K pre-conv inputs (model dtype), updated in place.
        ssm_state: [B, H, P, N] fp32, updated in place.
        conv_w: [C, K] depthwise conv weights; conv_b: [C] or None.
        dt_bias, A_log, D: [H] fp32; norm_w: [d_inner] gated-norm weight (group size d_inner / G).

    Returns:
        The gated, normed mixer output [B, d_inner] in the model dtype (input of ``out_proj``).
    """
    b = proj.shape[0]
    h, p, g, n = n_heads, head_dim, n_groups, state_size
    d_inner = h * p
    cdim = conv_state.shape[1]
    z, xbc, dt_raw = torch.split(proj, [d_inner, cdim, h], dim=-1)
    full = torch.cat([conv_state, xbc[:, :, None].to(conv_state.dtype)], dim=-1)  # [B, C, K + 1]
    conv_state.copy_(full[..., 1:])
    conv = (full[..., 1:] * conv_w[None]).sum(-1, dtype=torch.float32)
    if conv_b is not None:
        conv = conv + conv_b.float()
    act = F.silu(conv.to(proj.dtype))  # [B, C] model dtype (as F.conv1d then silu)
    x, bm, cm = torch.split(act, [d_inner, g * n, g * n], dim=-1)
    dt = F.softplus(dt_raw.float() + dt_bias.float()).clamp(dt_min, dt_max)  # [B, H]
    A = -torch.exp(A_log.float())
    r = h // g
    s = ssm_state.reshape(b, g, r, p, n)
    da = torch.exp(dt.reshape(b, g, r) * A.reshape(g, r))
    xf = x.float().reshape(b, g, r, p)
    s_new = s * da[..., None, None] + (xf * dt.reshape(b, g, r)[..., None])[..., None] * bm.float().reshape(b, g, 1, 1, n)
    ssm_state.copy_(s_new.reshape(b, h, p, n))
    y = torch.einsum("bgrpn,bgn->bgrp", s_new, cm.float().reshape(b, g, n)) + D.float().reshape(g, r, 1) * xf
    v = y.reshape(b, d_inner) * F.silu(z.float())
    vg = v.reshape(b, g, d_inner // g)
    vg = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return (norm_w.float() * vg.reshape(b, d_inner)).to(proj.dtype)


def add_rmsnorm_reference(h: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h2 = h + out`` (in h's dtype) and ``RMSNorm(h2) * weight`` (fp32 math, cast to weight's dtype).

    Returns (h2, normed h2), both [..., D].
    """
    h2 = h + out.to(h.dtype)
    xf = h2.to(weight.dtype).float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return h2, (weight.float() * xf).to(weight.dtype)


def causal_conv1d_reference(xbc: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv + SiLU of a chunk: xbc [B, L, C] after the last K inputs ``conv_state``
    [B, C, K] (zeros if None); weight [C, K]. Returns [B, L, C] in xbc's dtype (the state is not updated).
    """
    c, k = weight.shape
    xt = xbc.transpose(1, 2)  # [B, C, L]
    head = conv_state.to(xt.dtype) if conv_state is not None else xt.new_zeros(xt.shape[0], c, k)
    full = torch.cat([head, xt], dim=-1)  # [B, C, K + L]
    out = F.conv1d(full[..., 1:], weight[:, None, :], bias, groups=c)  # [B, C, L]
    return F.silu(out).transpose(1, 2)


def mamba_prefill_ssd_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                                Cm: torch.Tensor, D: torch.Tensor, z: torch.Tensor, norm_w: torch.Tensor, *,
                                chunk_size: int, initial_state: torch.Tensor | None, eps: float, group_size: int,
                                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill mixer between the conv and ``out_proj``: chunked SSD scan (fp32) + ``D x``, gate
    ``y * silu(z)``, RMSNorm over groups of ``group_size``, times ``norm_w``, cast to ``out_dtype``
    (the math of ``Mamba2Mixer.forward`` with ``GatedRMSNorm``).

    Args:
        x: [B, L, H, P]; dt: [B, L, H] (softplus'ed, clamped); A, D: [H]; Bm, Cm: [B, L, G, N];
        z: [B, L, H * P] gate; norm_w: [H * P]; initial_state: [B, H, P, N] or None.

    Returns:
        (out [B, L, H * P] in ``out_dtype``, final state [B, H, P, N] fp32).
    """
    from secure_run.model.mamba2 import ssd_chunked_scan

    b, length, h, p = x.shape
    y, final = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk_size=chunk_size, initial_state=initial_state)
    y = y + D.float()[:, None] * x.float()
    v = y.reshape(b, length, h * p) * F.silu(z.float())
    vg = v.reshape(b, length, -1, group_size)
    vg = vg * torch.rsqrt(vg.pow(2).mean(-1, keepdim=True) + eps)
    return (norm_w * vg.reshape(b, length, h * p)).to(out_dtype), final
