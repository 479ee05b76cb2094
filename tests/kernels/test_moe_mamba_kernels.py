"""Fused model kernels (MoE router + grouped experts, Mamba-2 decode step, add+RMSNorm) against their
PyTorch references, on fresh random inputs with poisoned outputs/states.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) in fp32 / fp16; the
references against the model's own eager code. GPU (marker ``gpu``): the same checks in bf16 / fp32
at the released shapes (hidden 2688, 128 experts top-6, Mamba 64 heads x 64 x 128).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_helpers import tiny_mamba_mixer

from secure_run.kernels import add_rmsnorm, mamba_decode_step, moe_experts, moe_route
from secure_run.kernels.model_reference import (
    add_rmsnorm_reference,
    mamba_decode_step_reference,
    moe_experts_reference,
    moe_route_reference,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU interpreter suite (TRITON_INTERPRET=1)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten poison?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _moe_inputs(t: int, d: int, e: int, f: int, fs: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = r(t, d)
    gate = r(e, d, scale=d ** -0.5)
    bias = (torch.randn(e, generator=g) * 0.1).to(device)
    up, down = r(e, f, d, scale=d ** -0.5), r(e, d, f, scale=f ** -0.5)
    sup, sdown = r(fs, d, scale=d ** -0.5), r(d, fs, scale=fs ** -0.5)
    return x, gate, bias, up, down, sup, sdown


def _check_moe(t: int, dtype: torch.dtype, device: str, seed: int, *, d: int = 96, e: int = 16, k: int = 4,
               f: int = 40, fs: int = 72) -> None:
    x, gate, bias, up, down, sup, sdown = _moe_inputs(t, d, e, f, fs, dtype, device, seed)
    ids, w = moe_route(x, gate, bias, k, True, 2.5, backend="triton")
    rids, rw = moe_route_reference(x, gate, bias, k, True, 2.5)
    assert torch.equal(ids.cpu(), rids.cpu())
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    out = moe_experts(x, rids, rw, up, down, sup, sdown, backend="triton")
    ref = _experts_loop_fp64(x, rids, rw, up, down, sup, sdown)
    assert rel(out, ref) < TOL[dtype]
    if t <= 4:  # the gather reference (the model's device path off CUDA) agrees too
        ref2 = moe_experts_reference(x.double(), rids, rw.double(), up.double(), down.double(), sup.double(),
                                     sdown.double())
        assert rel(ref2, ref) < 1e-6  # the reference accumulates the routed sum in fp32


def _experts_loop_fp64(x, ids, w, up, down, sup, sdown) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """fp64 oracle grouped by expert (host loop; fine in a test)."""
    xd = x.double()
    out = torch.zeros_like(xd)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        hid = torch.relu(xd[tok] @ up[e].double().T).square()
        out.index_add_(0, tok, (hid @ down[e].double().T) * w[tok, slot, None].double())
    return out + torch.relu(xd @ sup.double().T).square() @ sdown.double().T


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [1, 3, 40])  # 1, 3: GEMV (decode); 40 x 4 assignments: grouped GEMM
def test_moe_kernels_interpreter(t: int, dtype: torch.dtype) -> None:
    _check_moe(t, dtype, "cpu", seed=100 + t)


_GEMV_VARIANTS = [
    {"down_mode": "rows", "up_acc2d": True, "down_acc2d": True, "up_unroll": 2, "down_unroll": 2},
    {"down_mode": "slots", "down_acc2d": False, "up_block_f": 4, "up_block_d": 64, "down_block_f": 16},
    {"down_mode": "slots", "down_acc2d": True, "up_acc2d": True, "down_block_d": 8, "down_block_f": 32,
     "down_unroll": 2, "fin_block": 32},
]


@cpu_interp
@pytest.mark.parametrize("variant", range(len(_GEMV_VARIANTS)))
@pytest.mark.parametrize("shared", [True, False])
def test_moe_decode_gemv_variants_interpreter(variant: int, shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode GEMV design the launch table can select (one-pass rows or per-slot partials with
    the shared expert cut into pieces, per-lane or per-step reduction, unrolled loops) equals the
    fp64 oracle, with and without the shared expert, at 1 and 3 tokens; odd widths (fs not a multiple
    of f) exercise the last, shorter shared piece and the masked tails."""
    from secure_run.kernels import _triton_moe as tm

    monkeypatch.setattr(tm, "_GEMV", tm._GEMV | _GEMV_VARIANTS[variant])
    for t in (1, 3):
        x, _gate, _bias, up, down, sup, sdown = _moe_inputs(t, 80, 10, 36, 91, torch.float16, "cpu", 40 + t)
        g = torch.Generator().manual_seed(t)
        ids = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(t)])
        w = torch.rand(t, 3, generator=g)
        if not shared:
            sup = sdown = None
        out = moe_experts(x, ids, w, up, down, sup, sdown, backend="triton")
        ref = moe_experts_reference(x.double(), ids, w.double(), up.double(), down.double(),
                                    None if sup is None else sup.double(), None if sdown is None else sdown.double())
        assert rel(out, ref) < TOL[torch.float16]


@cpu_interp
@pytest.mark.parametrize("variant", [{"n_fast": False, "scatter": False}, {"n_fast": True, "scatter": False},
                                     {"n_fast": False, "scatter": True}])
def test_moe_prefill_gemm_variants_interpreter(variant: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped GEMM with row or column blocks fastest in the grid, per-assignment outputs summed
    by a second kernel or fp32 atomics (the default table is covered by the test above) equals the
    fp64 oracle."""
    from secure_run.kernels import _triton_moe as tm

    monkeypatch.setattr(tm, "_GEMM", tm._GEMM | variant)
    _check_moe(40, torch.float16, "cpu", seed=77)


@cpu_interp
@pytest.mark.parametrize("block_e", [1, 4])
def test_moe_route_logit_blocks_interpreter(block_e: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other experts-per-program settings of the decode router's logits kernel (14 experts: a
    partial last block for 4) give the reference's choice and weights."""
    from secure_run.kernels import _triton_moe as tm

    monkeypatch.setattr(tm, "_ROUTER", tm._ROUTER | {"logit_block_e": block_e})
    x, gate, bias, *_ = _moe_inputs(3, 64, 14, 8, 8, torch.float32, "cpu", 8)
    bias[-2:] += 10.0  # the experts of the partial last block are always chosen
    ids, w = moe_route(x, gate, bias, 4, True, 2.5, backend="triton")
    rids, rw = moe_route_reference(x, gate, bias, 4, True, 2.5)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@cpu_interp
def test_moe_route_no_normalise_and_unscaled() -> None:
    x, gate, bias, *_ = _moe_inputs(5, 64, 12, 8, 8, torch.float32, "cpu", 7)
    ids, w = moe_route(x, gate, bias, 3, False, 1.0, backend="triton")
    rids, rw = moe_route_reference(x, gate, bias, 3, False, 1.0)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def _mamba_inputs(b: int, h: int, p: int, g: int, n: int, kw: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d_inner, c = h * p, h * p + 2 * g * n

    def r(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    proj = r(b, d_inner + c + h)
    conv_state = r(b, c, kw)
    ssm = r(b, h, p, n, dt=torch.float32)
    conv_w, conv_b = r(c, kw, scale=0.5), r(c, scale=0.1)
    dt_bias = r(h, dt=torch.float32)
    dt_bias[0] = -30.0  # softplus far in the exp-underflow range
    dt_bias[-1] = 25.0  # above the softplus threshold
    A_log = r(h, scale=0.5, dt=torch.float32)
    D = r(h, dt=torch.float32)
    norm_w = (1 + r(d_inner, scale=0.1, dt=torch.float32)).to(dtype)
    return proj, conv_state, ssm, conv_w, conv_b, dt_bias, A_log, D, norm_w


def _check_mamba(dtype: torch.dtype, device: str, seed: int, *, b: int = 2, h: int = 8, p: int = 16, g: int = 2,
                 n: int = 32, kw: int = 4, bias: bool = True, dt_max: float = float("inf")) -> None:
    args = list(_mamba_inputs(b, h, p, g, n, kw, dtype, device, seed))
    if not bias:
        args[4] = None
    kws = {"n_heads": h, "head_dim": p, "n_groups": g, "state_size": n, "dt_min": 0.0, "dt_max": dt_max,
           "eps": 1e-5}
    ref_conv, ref_ssm = args[1].clone(), args[2].clone()
    ref = mamba_decode_step_reference(args[0], ref_conv, ref_ssm, *args[3:], **kws)
    got = mamba_decode_step(*args, backend="triton", **kws)
    assert rel(got, ref) < TOL[dtype]
    assert torch.equal(args[1], ref_conv)  # conv state: exact shift
    assert rel(args[2], ref_ssm) < (1e-5 if dtype == torch.float32 else TOL[dtype])


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mamba_decode_interpreter(dtype: torch.dtype) -> None:
    _check_mamba(dtype, "cpu", seed=5)


@cpu_interp
def test_mamba_decode_interpreter_odd_shapes() -> None:
    _check_mamba(torch.float32, "cpu", seed=6, b=1, h=6, p=12, g=3, n=20, kw=3, bias=False, dt_max=0.5)


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rmsnorm_interpreter(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 200, generator=gen).to(dtype)
    o = torch.randn(2, 3, 200, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(200, generator=gen)).to(dtype)
    h2, x = add_rmsnorm(h, o, w, 1e-5, backend="triton")
    rh2, rx = add_rmsnorm_reference(h, o, w, 1e-5)
    assert torch.equal(h2, rh2)
    assert rel(x, rx) < TOL[dtype]


def _ssd_inputs(b: int, length: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d_inner = h * p
    xbc = torch.randn(b, length, d_inner + 2 * g * n, generator=gen).to(device=device, dtype=dtype)
    x = xbc[..., :d_inner].reshape(b, length, h, p)  # strided views, as in the mixer
    bm = xbc[..., d_inner:d_inner + g * n].reshape(b, length, g, n)
    cm = xbc[..., d_inner + g * n:].reshape(b, length, g, n)
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, generator=gen) - 1.0).to(device)
    A = -torch.exp(0.5 * torch.randn(h, generator=gen)).to(device)
    s0 = torch.randn(b, h, p, n, generator=gen).to(device)
    return x, dt, A, bm, cm, s0


def _check_ssd(dtype: torch.dtype, device: str, seed: int, *, b: int, length: int, h: int, p: int, g: int, n: int,
               chunk: int, with_init: bool, tol: float) -> None:
    from secure_run.kernels import ssd_scan
    from secure_run.model.mamba2 import ssd_chunked_scan

    x, dt, A, bm, cm, s0 = _ssd_inputs(b, length, h, p, g, n, dtype, device, seed)
    init = s0 if with_init else None
    y, s = ssd_scan(x, dt, A, bm, cm, chunk_size=chunk, initial_state=init, backend="triton")
    ry, rs = ssd_chunked_scan(x.double(), dt.double(), A.double(), bm.double(), cm.double(), chunk_size=chunk,
                              initial_state=None if init is None else init.double())
    assert rel(y, ry) < tol
    assert rel(s, rs) < tol


@cpu_interp
@pytest.mark.parametrize(("length", "chunk", "with_init"), [(37, 16, True), (20, 8, False), (64, 32, True), (150, 128, True)])
def test_ssd_scan_interpreter(length: int, chunk: int, with_init: bool) -> None:
    _check_ssd(torch.float32, "cpu", 20 + length, b=2, length=length, h=4, p=8, g=2, n=16, chunk=chunk,
               with_init=with_init, tol=1e-5)


@cpu_interp
def test_ssd_scan_interpreter_fp16_inputs() -> None:
    _check_ssd(torch.float16, "cpu", 3, b=1, length=45, h=6, p=16, g=3, n=24, chunk=16, with_init=True, tol=1e-4)


@cpu_interp
@pytest.mark.parametrize(("length", "with_state", "bias"), [(37, True, True), (2, True, False), (50, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_conv_interpreter(length: int, with_state: bool, bias: bool, dtype: torch.dtype) -> None:
    from secure_run.kernels import causal_conv1d
    from secure_run.kernels.model_reference import causal_conv1d_reference

    gen = torch.Generator().manual_seed(length)
    c, kw = 200, 4
    proj = torch.randn(2, length, c + 30, generator=gen).to(dtype)
    xbc = proj[..., 10:10 + c]  # a strided view of the in_proj rows, as in the mixer
    state = torch.randn(2, c, kw, generator=gen).to(dtype) if with_state else None
    w = (0.5 * torch.randn(c, kw, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(c, generator=gen)).to(dtype) if bias else None
    got = causal_conv1d(xbc, state, w, b, backend="triton")
    ref = causal_conv1d_reference(xbc.double(), None if state is None else state.double(), w.double(),
                                  None if b is None else b.double())
    assert rel(got, ref) < (1e-5 if dtype == torch.float32 else TOL[dtype])


# --- the references against the model's eager code -----------------------------------------------


def test_mamba_reference_equals_eager_mixer() -> None:
    """The decode-step reference (device path on CPU) equals the mixer's eager decode, fp32."""
    from secure_run.model.cache import MambaState
    from secure_run.model.config import parse_config_json
    from secure_run.model.mamba2 import Mamba2Mixer

    cfg = parse_config_json('''{"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32,
      "num_hidden_layers": 1, "hybrid_override_pattern": "M", "num_attention_heads": 4,
      "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 6, "mamba_head_dim": 8,
      "ssm_state_size": 12, "n_groups": 3, "conv_kernel": 4, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 16,
      "moe_shared_expert_intermediate_size": 16, "torch_dtype": "float32"}''')

    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg)
    with torch.no_grad():
        for prm in (mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight):
            prm.copy_(torch.randn_like(prm) * 0.5 + (1.0 if prm is mixer.norm.weight else 0.0))
    b = 2
    states = [MambaState(conv=torch.randn(b, cfg.mamba_conv_dim, cfg.conv_kernel),
                         ssm=torch.randn(b, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size))]
    states.append(MambaState(conv=states[0].conv.clone(), ssm=states[0].ssm.clone()))
    u = torch.randn(b, 1, cfg.hidden_size)
    with torch.no_grad():
        eager = mixer(u, states[0], fused=False)
        fused = mixer(u, states[1], fused=True)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1].ssm, states[0].ssm, rtol=1e-5, atol=1e-5)
    assert torch.equal(states[1].conv, states[0].conv)


@cpu_interp
def test_mixer_fused_prefill_and_decode_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixer's CUDA path (Triton scan for prefill, fused step for decode), run under the
    interpreter, equals its eager path over a chunked prefill and two decode steps."""
    monkeypatch.setenv("SECURE_RUN_KERNEL_BACKEND", "triton")
    mixer, new_state = tiny_mamba_mixer(1)

    se, sf = new_state(), new_state()
    u = torch.randn(1, 45, 32)
    with torch.no_grad():
        outs_e = [mixer(u[:, :30], se, fused=False), mixer(u[:, 30:43], se, fused=False)]
        outs_f = [mixer(u[:, :30], sf, fused=True), mixer(u[:, 30:43], sf, fused=True)]
        for i in (43, 44):
            outs_e.append(mixer(u[:, i:i + 1], se, fused=False))
            outs_f.append(mixer(u[:, i:i + 1], sf, fused=True))
    for a, b in zip(outs_f, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sf.ssm, se.ssm, rtol=1e-4, atol=1e-5)


def test_add_rmsnorm_reference_equals_block_math() -> None:
    from secure_run.model.norms import RMSNorm

    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    h, o = torch.randn(3, 48), torch.randn(3, 48)
    h2, x = add_rmsnorm_reference(h, o, norm.weight, 1e-5)
    assert torch.equal(h2, h + o)
    torch.testing.assert_close(x, norm(h + o), rtol=0, atol=0)


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 4, 2048])
def test_moe_kernels_gpu_released_shapes(t: int, dtype: torch.dtype) -> None:
    _check_moe(t, dtype, "cuda", seed=t, d=2688, e=128, k=6, f=1856, fs=3712)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mamba_decode_gpu_released_shapes(dtype: torch.dtype) -> None:
    _check_mamba(dtype, "cuda", seed=9, b=2, h=64, p=64, g=8, n=128, kw=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ssd_scan_gpu_released_shapes(dtype: torch.dtype) -> None:
    _check_ssd(dtype, "cuda", 4, b=1, length=1000, h=64, p=64, g=8, n=128, chunk=128, with_init=True,
               tol=1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
def test_causal_conv_gpu_released_shapes() -> None:
    from secure_run.kernels import causal_conv1d
    from secure_run.kernels.model_reference import causal_conv1d_reference

    proj = torch.randn(1, 1000, 10304, device="cuda", dtype=torch.bfloat16)
    xbc = proj[..., 4096:4096 + 6144]
    state = torch.randn(1, 6144, 4, device="cuda", dtype=torch.bfloat16)
    w = 0.5 * torch.randn(6144, 4, device="cuda", dtype=torch.bfloat16)
    b = 0.1 * torch.randn(6144, device="cuda", dtype=torch.bfloat16)
    got = causal_conv1d(xbc, state, w, b, backend="triton")
    ref = causal_conv1d_reference(xbc.double(), state.double(), w.double(), b.double())
    assert rel(got, ref) < 1e-2


@pytest.mark.gpu
def test_add_rmsnorm_gpu() -> None:
    h = torch.randn(5, 2688, device="cuda", dtype=torch.bfloat16)
    o = torch.randn(5, 2688, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(2688, device="cuda", dtype=torch.bfloat16) + 0.5
    h2, x = add_rmsnorm(h, o, w, 1e-5, backend="triton")
    rh2, rx = add_rmsnorm_reference(h, o, w, 1e-5)
    assert torch.equal(h2, rh2)
    assert rel(x, rx) < 1e-2



@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2048])  # per-slot GEMV + fixed-order finalize / grouped GEMM + _sum_slots
def test_moe_experts_deterministic_gpu(t: int) -> None:
    """No fp32 atomics on either path: two runs on the same inputs are bit-identical."""
    x, gate, bias, up, down, sup, sdown = _moe_inputs(t, 2688, 128, 1856, 3712, torch.bfloat16, "cuda", 50 + t)
    ids, w = moe_route(x, gate, bias, 6, True, 2.5, backend="triton")
    first = moe_experts(x, ids, w, up, down, sup, sdown, backend="triton")
    for _ in range(3):
        assert torch.equal(moe_experts(x, ids, w, up, down, sup, sdown, backend="triton"), first)
