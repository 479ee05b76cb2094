"""Mamba-2 mixer (spec/model.md 2.3): in_proj -> causal depthwise conv -> SSD scan -> gated norm -> out_proj.

Prefill (and chunked prefill) runs the chunked SSD scan (:func:`ssd_chunked_scan`, pure torch,
fp32) starting from the cached SSM state and the cached conv tail; decode (one token) runs the
one-step recurrence (:func:`ssd_step`). Both are the same math:
``S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t``, ``y_t = S_t . C_t + D * x_t``.

Axis legend: ``B`` batch, ``L`` tokens, ``d`` hidden, ``H`` SSM heads, ``P`` head dim, ``G`` B/C
groups, ``R = H/G`` heads per group, ``N`` state size, ``K`` conv width, ``C`` conv channels,
``c`` chunk index, ``q``/``l``/``s`` positions inside a chunk.

    >>> import torch
    >>> y, s = ssd_chunked_scan(torch.ones(1, 5, 2, 3), torch.full((1, 5, 2), 0.1), -torch.ones(2),
    ...                         torch.ones(1, 5, 1, 4), torch.ones(1, 5, 1, 4), chunk_size=2)
    >>> tuple(y.shape), tuple(s.shape)
    ((1, 5, 2, 3), (1, 2, 3, 4))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secure_run.model.cache import MambaState
from secure_run.model.config import ModelConfig
from secure_run.model.norms import GatedRMSNorm

__all__ = ["Mamba2Mixer", "ssd_chunked_scan", "ssd_step"]


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``out[..., l, s] = sum_{s < j <= l} a[..., j]`` for s <= l, ``-inf`` above the diagonal.

    Built by a cumulative sum of a masked copy (not a difference of cumulative sums), which keeps
    full precision for long chunks with strong decay. a: [..., q] -> [..., q(l), q(s)].
    """
    q = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, q)  # [..., q(j), q(s)] = a_j
    below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)  # j > s
    out = rows.masked_fill(~below, 0.0).cumsum(dim=-2)  # [..., l, s] = sum_{s<j<=l} a_j
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan in fp32 (no D skip term; the mixer adds it).

    Args:
        x: [B, L, H, P] inputs.
        dt: [B, L, H] step sizes (already softplus'ed and clamped).
        A: [H] negative decay rates.
        Bm, Cm: [B, L, G, N] input / output projections, head h uses group h // (H/G).
        chunk_size: chunk length (any value gives the same result up to rounding).
        initial_state: [B, H, P, N] state before the first token (zeros if None).

    Returns:
        y [B, L, H, P] (fp32) and the final state [B, H, P, N] (fp32).
    """
    b, length, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    r = h // g
    pad = (-length) % chunk_size
    x, dt, Bm, Cm = x.float(), dt.float(), Bm.float(), Cm.float()
    if pad:  # padded steps have dt = 0: no decay and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bm = F.pad(Bm, (0, 0, 0, 0, 0, pad))
        Cm = F.pad(Cm, (0, 0, 0, 0, 0, pad))
    nc, q = (length + pad) // chunk_size, chunk_size
    xc = x.reshape(b, nc, q, g, r, p)  # [B, c, q, G, R, P]
    dtc = dt.reshape(b, nc, q, g, r)  # [B, c, q, G, R]
    Bc = Bm.reshape(b, nc, q, g, n)  # [B, c, q, G, N]
    Cc = Cm.reshape(b, nc, q, g, n)
    a = dtc * A.float().reshape(g, r)  # [B, c, q, G, R] log-decay per step
    xdt = xc * dtc[..., None]  # [B, c, q, G, R, P]

    seg = _segment_sums(a.permute(0, 1, 3, 4, 2))  # [B, c, G, R, l, s]
    decay = torch.exp(seg)  # within-chunk decay from s to l (0 above the diagonal)

    # 1. within-chunk outputs: y_l += sum_{s<=l} (C_l . B_s) * decay[l, s] * dt_s x_s
    cb = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # [B, c, G, l, s]
    y_diag = torch.einsum("bcgls,bcgrls,bcsgrp->bclgrp", cb, decay, xdt)

    # 2. state contributed by each chunk at its end: sum_s decay[last, s] * dt_s x_s (outer) B_s
    to_end = decay[..., -1, :]  # [B, c, G, R, s]
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, to_end, xdt)  # [B, c, G, R, P, N]
    chunk_decay = torch.exp(a.sum(dim=2))  # [B, c, G, R] total decay over a chunk

    # 3. pass states between chunks (a loop over chunks, not tokens)
    state = (initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n)).reshape(b, g, r, p, n)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    start = torch.stack(starts, dim=1)  # [B, c, G, R, P, N] state entering each chunk

    # 4. contribution of the entering state: y_l += exp(sum_{j<=l} a_j) * C_l . S_start
    decay_in = torch.exp(torch.cumsum(a, dim=2))  # [B, c, q, G, R]
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, start) * decay_in[..., None]

    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :length]
    return y, state.reshape(b, h, p, n)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step in fp32 (no D term).

    Args:
        state: [B, H, P, N] state before the token.
        x: [B, H, P]; dt: [B, H]; A: [H]; Bm, Cm: [B, G, N].

    Returns:
        y [B, H, P] and the new state [B, H, P, N] (both fp32).
    """
    b, h, p = x.shape
    g, n = Bm.shape[1], Bm.shape[2]
    r = h // g
    s = state.float().reshape(b, g, r, p, n)
    dtg = dt.float().reshape(b, g, r)
    da = torch.exp(dtg * A.float().reshape(g, r))  # [B, G, R]
    xdt = x.float().reshape(b, g, r, p) * dtg[..., None]  # [B, G, R, P]
    s = s * da[..., None, None] + xdt[..., None] * Bm.float()[:, :, None, None, :]
    y = torch.einsum("bgrpn,bgn->bgrp", s, Cm.float())
    return y.reshape(b, h, p), s.reshape(b, h, p, n)


SSD_ENV = "SECURE_RUN_SSD"


def _ssd_mode() -> str:
    """Prefill path on CUDA from ``SECURE_RUN_SSD``: "triton" (default: Triton conv, then one fused
    scan + D + gated norm call), "v1" (the Triton conv and scan as first committed, D skip and gated
    norm in PyTorch: the benchmark's baseline) or "torch" (PyTorch's conv and scan)."""
    from secure_run.kernels import env_choice

    return env_choice(SSD_ENV, ("triton", "v1", "torch"), "triton")


def _triton_ssd_enabled() -> bool:
    """The Triton prefill conv + scan are used on CUDA unless ``SECURE_RUN_SSD=torch`` (PyTorch's)."""
    return _ssd_mode() != "torch"


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A bias-free projection: the Triton decode GEMV on CUDA for at most 16 rows, else ``F.linear``."""
    from secure_run.kernels import decode_linear

    return decode_linear(x, layer.weight)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer of one ``M`` layer; parameter names match the checkpoint (``mixer.*``)."""

    def __init__(self, cfg: ModelConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.n_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.n_groups, self.state_size = cfg.n_groups, cfg.ssm_state_size
        self.d_inner, self.conv_dim = cfg.mamba_d_inner, cfg.mamba_conv_dim
        self.kernel, self.chunk_size = cfg.conv_kernel, cfg.chunk_size
        self.dt_min, self.dt_max = cfg.time_step_limit
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.mamba_in_proj_dim, bias=False, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                bias=cfg.use_conv_bias, **kw)
        # per-head vectors are kept in fp32 (they are tiny; upcasting a bf16 checkpoint is lossless)
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads, device=device, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(self.n_heads, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, cfg.eps, **kw)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=False, **kw)

    def _decode_fused(self, proj: torch.Tensor, state: MambaState) -> torch.Tensor:
        """proj [B, d_inner + C + H] of one token -> out_proj output [B, d]; updates ``state``."""
        from secure_run.kernels import mamba_decode_step

        v = mamba_decode_step(
            proj, state.conv, state.ssm, self.conv1d.weight.reshape(self.conv_dim, self.kernel), self.conv1d.bias,
            self.dt_bias, self.A_log, self.D, self.norm.weight, n_heads=self.n_heads, head_dim=self.head_dim,
            n_groups=self.n_groups, state_size=self.state_size, dt_min=self.dt_min, dt_max=self.dt_max,
            eps=self.norm.eps)
        return _linear(v, self.out_proj)

    def _conv(self, xbc: torch.Tensor, state: MambaState | None) -> torch.Tensor:
        """Causal depthwise conv over [cached K inputs | new L inputs]; updates the conv cache."""
        b, length, c = xbc.shape
        xt = xbc.transpose(1, 2)  # [B, C, L]
        if state is not None:
            full = torch.cat([state.conv.to(xt.dtype), xt], dim=-1)  # [B, C, K + L]
            state.conv.copy_(full[..., -self.kernel:])
        else:
            full = F.pad(xt, (self.kernel, 0))
        w = self.conv1d.weight  # [C, 1, K]
        out = F.conv1d(full[..., 1:], w, self.conv1d.bias, groups=c)  # [B, C, L]
        return F.silu(out).transpose(1, 2)  # [B, L, C]

    def forward(self, u: torch.Tensor, state: MambaState | None = None, *, fused: bool | None = None) -> torch.Tensor:
        """u: [B, L, d] (normed) -> [B, L, d]. With ``state``, starts from and updates the caches.

        ``fused``: run a one-token step with state through :func:`secure_run.kernels.mamba_decode_step`
        and longer inputs through :func:`secure_run.kernels.mamba_prefill_ssd` (scan, D skip and gated
        norm; ``SECURE_RUN_SSD`` picks the path, see :func:`_ssd_mode`) (default: on CUDA; Triton
        there, the PyTorch references elsewhere).
        """
        b, length, _ = u.shape
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.state_size
        proj = _linear(u, self.in_proj)  # [B, L, d_inner + C + H]
        if fused is None:
            fused = u.is_cuda
        if fused and length == 1 and state is not None:
            return self._decode_fused(proj[:, 0], state)[:, None]
        z, xbc, dt_raw = torch.split(proj, [self.d_inner, self.conv_dim, h], dim=-1)
        if fused and _triton_ssd_enabled():  # one kernel reading the in_proj rows in place, [B, L, C] rows out
            from secure_run.kernels import causal_conv1d

            w = self.conv1d.weight.reshape(self.conv_dim, self.kernel)
            raw = xbc
            xbc = causal_conv1d(raw, state.conv if state is not None else None, w, self.conv1d.bias)
            if state is not None:  # the last K pre-conv inputs (after the kernel read the old ones)
                tail = torch.cat([state.conv, raw[:, -self.kernel:].transpose(1, 2).to(state.conv.dtype)], dim=-1)
                state.conv.copy_(tail[..., -self.kernel:])
        else:
            xbc = self._conv(xbc, state)
        x, bm, cm = torch.split(xbc, [self.d_inner, g * n, g * n], dim=-1)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)  # [B, L, H]
        A = -torch.exp(self.A_log.float())  # [H]
        x = x.reshape(b, length, h, p)
        if length == 1 and state is not None:  # decode: one recurrence step
            y1, new = ssd_step(state.ssm, x[:, 0], dt[:, 0], A, bm.reshape(b, g, n), cm.reshape(b, g, n))
            y = y1[:, None]
        else:
            init = state.ssm if state is not None else None
            bm4, cm4 = bm.reshape(b, length, g, n), cm.reshape(b, length, g, n)
            mode = _ssd_mode() if fused else "torch"
            if mode != "torch" and x.stride(-1) != 1:
                x = x.contiguous()
            if mode == "triton":  # CUDA: scan + D skip + gated norm in Triton, out_proj input out
                from secure_run.kernels import mamba_prefill_ssd

                v, new = mamba_prefill_ssd(x, dt, A, bm4, cm4, self.D, z, self.norm.weight,
                                           chunk_size=self.chunk_size, initial_state=init, eps=self.norm.eps,
                                           group_size=self.norm.group_size, out_dtype=u.dtype)
                if state is not None:
                    state.ssm.copy_(new)
                return _linear(v, self.out_proj)
            if mode == "v1":  # the first Triton scan (no [q, q] tensors in memory), PyTorch D + norm
                from secure_run.kernels import ssd_scan

                y, new = ssd_scan(x, dt, A, bm4, cm4, chunk_size=self.chunk_size, initial_state=init, legacy=True)
            else:
                y, new = ssd_chunked_scan(x, dt, A, bm4, cm4, chunk_size=self.chunk_size, initial_state=init)
        if state is not None:
            state.ssm.copy_(new)
        y = y + self.D.float()[:, None] * x.float()  # [B, L, H, P] fp32
        v = self.norm(y.reshape(b, length, self.d_inner), z)
        return _linear(v.to(u.dtype), self.out_proj)
