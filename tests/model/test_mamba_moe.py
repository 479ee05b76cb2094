"""Mamba-2 mixer, MoE and norms against naive references written from spec/model.md 2.2-2.4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import TINY, tiny_config

from secure_run.model.cache import HybridCache
from secure_run.model.mamba2 import Mamba2Mixer, ssd_chunked_scan, ssd_step
from secure_run.model.moe import MoE
from secure_run.model.norms import GatedRMSNorm, RMSNorm


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 2.0)
            elif name.endswith("A_log"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "conv1d" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "bias" in name else 1.0) + ("norm" in name))


def _naive_scan(x, dt, A, Bm, Cm, state):  # type: ignore[no-untyped-def]
    """Token-by-token recurrence, straight from spec/model.md 2.3 step 5 (float64)."""
    b, length, h, p = x.shape
    g = Bm.shape[2]
    s = state.double().clone()
    ys = []
    for t in range(length):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head].double() * A[head].double())  # [B]
            inp = dt[:, t, head].double()[:, None, None] * x[:, t, head].double()[:, :, None] * Bm[:, t, grp].double()[:, None, :]
            s[:, head] = decay[:, None, None] * s[:, head] + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Cm[:, t].double().repeat_interleave(h // g, dim=1)))
    return torch.stack(ys, 1), s


@pytest.mark.parametrize("length", [1, 5, 8, 13, 24])
@pytest.mark.parametrize("chunk", [1, 4, 8, 32])
def test_chunked_scan_equals_recurrence(length: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(length * 100 + chunk)
    b, h, p, grp, n = 2, 4, 3, 2, 5
    x = torch.randn(b, length, h, p, generator=g)
    dt = F.softplus(torch.randn(b, length, h, generator=g))
    A = -torch.exp(torch.randn(h, generator=g))
    Bm, Cm = torch.randn(2, b, length, grp, n, generator=g).unbind(0)
    s0 = torch.randn(b, h, p, n, generator=g)
    y, s = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk_size=chunk, initial_state=s0)
    y_ref, s_ref = _naive_scan(x, dt, A, Bm, Cm, s0)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)


def test_scan_is_stable_with_strong_decay() -> None:
    # large dt*A inside long chunks: the segment sums must not lose precision or produce NaN
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 2, 2, generator=g)
    dt = torch.full((1, 64, 2), 3.0)
    A = torch.tensor([-20.0, -0.01])
    Bm, Cm = torch.randn(2, 1, 64, 1, 3, generator=g).unbind(0)
    y, s = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk_size=64)
    y_ref, s_ref = _naive_scan(x, dt, A, Bm, Cm, torch.zeros(1, 2, 2, 3))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_step_equals_one_token_scan() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=g)
    dt = F.softplus(torch.randn(2, 4, generator=g))
    A = -torch.rand(4, generator=g)
    Bm, Cm = torch.randn(2, 2, 2, 5, generator=g).unbind(0)
    s0 = torch.randn(2, 4, 3, 5, generator=g)
    y1, s1 = ssd_step(s0, x, dt, A, Bm, Cm)
    y2, s2 = ssd_chunked_scan(x[:, None], dt[:, None], A, Bm[:, None], Cm[:, None], chunk_size=4, initial_state=s0)
    torch.testing.assert_close(y1, y2[:, 0])
    torch.testing.assert_close(s1, s2)


def _naive_mixer(m: Mamba2Mixer, u: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """The whole mixer from spec/model.md 2.3 steps 1-7, with explicit loops (float64)."""
    u = u.double()
    b, length, _ = u.shape
    di, cd, h, p, g, n, k = m.d_inner, m.conv_dim, m.n_heads, m.head_dim, m.n_groups, m.state_size, m.kernel
    proj = u @ m.in_proj.weight.double().T
    z, xbc, dt_raw = proj[..., :di], proj[..., di:di + cd], proj[..., di + cd:]
    w, bias = m.conv1d.weight.double()[:, 0], m.conv1d.bias.double()
    conv = torch.zeros_like(xbc)
    for t in range(length):
        acc = bias.expand(b, cd).clone()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xbc[:, src]
        conv[:, t] = acc
    xbc = F.silu(conv)
    x = xbc[..., :di].reshape(b, length, h, p)
    Bm = xbc[..., di:di + g * n].reshape(b, length, g, n)
    Cm = xbc[..., di + g * n:].reshape(b, length, g, n)
    dt = F.softplus(dt_raw + m.dt_bias.double()).clamp(*dt_limit)
    A = -torch.exp(m.A_log.double())
    y, _ = _naive_scan(x, dt, A, Bm, Cm, torch.zeros(b, h, p, n, dtype=torch.float64))
    y = y + m.D.double()[:, None] * x
    v = (y.reshape(b, length, di) * F.silu(z)).reshape(b, length, g, di // g)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
    v = v.reshape(b, length, di) * m.norm.weight.double()
    return v @ m.out_proj.weight.double().T


@pytest.mark.parametrize("limit", [(0.0, math.inf), (0.2, 0.5)])
def test_mixer_equals_naive_reference(limit: tuple[float, float]) -> None:
    cfg = tiny_config(TINY, time_step_limit=list(limit))
    m = Mamba2Mixer(cfg)
    _randomize(m, 1)
    u = torch.randn(2, 11, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m(u).double(), _naive_mixer(m, u, limit), rtol=1e-5, atol=1e-5)


def test_delta_clamp_is_applied() -> None:
    u = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(5))
    outs = []
    for limit in ([0.0, math.inf], [0.5, math.inf]):
        m = Mamba2Mixer(tiny_config(TINY, time_step_limit=limit))
        _randomize(m, 1)
        outs.append(m(u))
    assert not torch.allclose(outs[0], outs[1])


def test_mixer_cache_prefill_then_steps_equals_full() -> None:
    cfg = tiny_config(TINY)
    m = Mamba2Mixer(cfg)
    _randomize(m, 4)
    u = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    full = m(u)
    cache = HybridCache(cfg, batch_size=2, max_len=13)
    st = cache.mamba(0)
    parts = [m(u[:, :2], st)]  # shorter than the conv width
    parts += [m(u[:, 2:9], st)]  # a chunk crossing Mamba chunk boundaries
    parts += [m(u[:, t:t + 1], st) for t in range(9, 13)]  # decode steps
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert st.ssm.dtype == torch.float32 and tuple(st.conv.shape) == (2, cfg.mamba_conv_dim, cfg.conv_kernel)


@torch.no_grad()
def _naive_moe(moe: MoE, x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """Per token, in float64: sigmoid scores, biased choice, unbiased renormalised weights."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xf = x.reshape(-1, x.shape[-1]).double()
    for t in range(xf.shape[0]):
        s = torch.sigmoid(moe.gate.weight.double() @ xf[t])
        choice = s + moe.gate.e_score_correction_bias.double()
        idx = sorted(range(len(s)), key=lambda e: -float(choice[e]))[:k]
        w = s[idx] / s[idx].sum() * scale
        acc = torch.zeros(xf.shape[1], dtype=torch.float64)
        for wj, e in zip(w, idx):
            ex = moe.experts[e]
            acc += wj * (ex.down_proj.weight.double() @ torch.relu(ex.up_proj.weight.double() @ xf[t]) ** 2)
        sh = moe.shared_experts
        acc += sh.down_proj.weight.double() @ torch.relu(sh.up_proj.weight.double() @ xf[t]) ** 2
        out.view(-1, x.shape[-1])[t] = acc
    return out


def test_moe_equals_naive_per_token_reference() -> None:
    cfg = tiny_config(TINY)
    moe = MoE(cfg)
    _randomize(moe, 7)
    x = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(moe(x).double(), _naive_moe(moe, x, 3, 2.5), rtol=1e-5, atol=1e-5)


def test_correction_bias_selects_but_never_weighs() -> None:
    cfg = tiny_config(TINY)
    moe = MoE(cfg)
    _randomize(moe, 9)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[6] = 100.0  # expert 6 always chosen
    idx, w = moe.gate(x)
    assert (idx == 6).any(dim=1).all()
    scores = torch.sigmoid(x @ moe.gate.weight.T)
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(1, keepdim=True) * 2.5)
    torch.testing.assert_close(w.sum(1), torch.full((5,), 2.5))


def test_routed_compute_runs_each_used_expert_once() -> None:
    cfg = tiny_config(TINY)
    moe = MoE(cfg)
    _randomize(moe, 10)
    calls: list[int] = []
    for e, ex in enumerate(moe.experts):
        ex.register_forward_hook(lambda mod, inp, out, e=e: calls.append(e))
    x = torch.randn(3, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    moe(x)
    used = set(moe.gate(x.reshape(-1, cfg.hidden_size))[0].flatten().tolist())
    assert sorted(calls) == sorted(used)  # one call per used expert, never one per token


def test_rmsnorm_and_gated_norm() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    n = RMSNorm(8, 1e-5)
    with torch.no_grad():
        n.weight.copy_(torch.arange(8.0))
    torch.testing.assert_close(n(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(8.0))
    assert n(x.bfloat16()).dtype == torch.bfloat16
    gn = GatedRMSNorm(8, 4, 1e-5)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    v = (x * F.silu(z)).reshape(3, 2, 4)
    expect = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 8)
    torch.testing.assert_close(gn(x, z), expect)
    with pytest.raises(ValueError):
        GatedRMSNorm(8, 3, 1e-5)
