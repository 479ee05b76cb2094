"""Mamba-2 prefill kernels (issue 11): the chunked SSD scan, its flattened chunk-to-chunk state pass,
and the fused scan + D skip + gated group RMSNorm (``mamba_prefill_ssd``), against the PyTorch
references in float64, on fresh random inputs.

CPU: the Triton interpreter (TRITON_INTERPRET=1) in fp32 / fp16 with odd lengths, lengths that are
not a multiple of the chunk, with and without an initial state, and several launch choices
(``SsdConfig``). GPU (marker ``gpu``): bf16 / fp32 at the released shapes (64 heads x 64, 8 groups,
state 128, chunk 128), with the output memory poisoned with NaN before the call.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_helpers import tiny_mamba_mixer

from secure_run.kernels.model_reference import mamba_prefill_ssd_reference

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU interpreter suite (TRITON_INTERPRET=1)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten poison?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(b: int, length: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device: str, seed: int):
    """Strided views of one conv-output row block and one in_proj row block, as in the mixer."""
    gen = torch.Generator().manual_seed(seed)
    d_inner = h * p
    xbc = torch.randn(b, length, d_inner + 2 * g * n, generator=gen).to(device=device, dtype=dtype)
    x = xbc[..., :d_inner].reshape(b, length, h, p)
    bm = xbc[..., d_inner:d_inner + g * n].reshape(b, length, g, n)
    cm = xbc[..., d_inner + g * n:].reshape(b, length, g, n)
    z = torch.randn(b, length, d_inner + 7, generator=gen).to(device=device, dtype=dtype)[..., 3:3 + d_inner]
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, generator=gen) - 1.0).to(device)
    A = -torch.exp(0.5 * torch.randn(h, generator=gen)).to(device)
    D = torch.randn(h, generator=gen).to(device)
    w = (1.0 + 0.2 * torch.randn(d_inner, generator=gen)).to(device=device, dtype=dtype)
    s0 = torch.randn(b, h, p, n, generator=gen).to(device)
    return x, dt, A, bm, cm, D, z, w, s0


def _poison(device: str) -> None:
    """Leave NaN in memory the caching allocator hands out next (CUDA only)."""
    if device == "cuda":
        junk = torch.full((64 << 20,), float("nan"), device=device)
        del junk


def _check_prefill(dtype: torch.dtype, device: str, seed: int, *, b: int, length: int, h: int, p: int, g: int,
                   n: int, chunk: int, with_init: bool, tol: float, cfg: object = None) -> None:
    from secure_run.kernels._triton_mamba import SsdConfig, ssd_prefill_triton

    x, dt, A, bm, cm, D, z, w, s0 = _inputs(b, length, h, p, g, n, dtype, device, seed)
    init = s0 if with_init else None
    group = (h // g) * p
    _poison(device)
    got, fin = ssd_prefill_triton(x, dt, A, bm, cm, D, z, w, chunk_size=chunk, initial_state=init, eps=1e-5,
                                  group_size=group, out_dtype=dtype,
                                  cfg=cfg if isinstance(cfg, SsdConfig) else None)
    ref, rfin = mamba_prefill_ssd_reference(
        x.double(), dt.double(), A.double(), bm.double(), cm.double(), D.double(), z.double(), w.double(),
        chunk_size=chunk, initial_state=None if init is None else init.double(), eps=1e-5, group_size=group,
        out_dtype=torch.float64)
    assert got.dtype == dtype and tuple(got.shape) == (b, length, h * p)
    assert rel(got, ref) < tol
    assert rel(fin, rfin) < tol


def _cfgs() -> list[object]:
    from secure_run.kernels._triton_mamba import SsdConfig

    return [SsdConfig(), SsdConfig(fuse_norm=True), SsdConfig(scan_heads=1, scan_block_l=16, state_block=64),
            SsdConfig(lowp=False, fuse_norm=True, scan_heads=2, scan_block_l=32)]


@cpu_interp
@pytest.mark.parametrize("cfg", range(4))
@pytest.mark.parametrize(("length", "chunk", "with_init"), [(37, 16, True), (45, 16, False), (32, 32, True)])
def test_prefill_ssd_interpreter_fp32(length: int, chunk: int, with_init: bool, cfg: int) -> None:
    _check_prefill(torch.float32, "cpu", 40 + length + cfg, b=2, length=length, h=4, p=8, g=2, n=16, chunk=chunk,
                   with_init=with_init, tol=1e-5, cfg=_cfgs()[cfg])


@cpu_interp
@pytest.mark.parametrize("cfg", range(4))
def test_prefill_ssd_interpreter_fp16(cfg: int) -> None:
    """fp16 inputs: the default (lowp) dots take fp16 operands, the fp16 output is rounded once."""
    _check_prefill(torch.float16, "cpu", 7 + cfg, b=1, length=51, h=6, p=16, g=3, n=24, chunk=16, with_init=True,
                   tol=2e-3, cfg=_cfgs()[cfg])


@cpu_interp
def test_prefill_ssd_norm_group_differs_from_ssm_group() -> None:
    """A norm group that is not the SSM group: the separate norm kernel (fuse_norm asked but not applicable)."""
    from secure_run.kernels._triton_mamba import SsdConfig, ssd_prefill_triton

    x, dt, A, bm, cm, D, z, w, s0 = _inputs(1, 21, 4, 8, 2, 16, torch.float32, "cpu", 5)
    got, _ = ssd_prefill_triton(x, dt, A, bm, cm, D, z, w, chunk_size=16, initial_state=s0, eps=1e-5,
                                group_size=8, out_dtype=torch.float32, cfg=SsdConfig(fuse_norm=True))
    ref, _ = mamba_prefill_ssd_reference(x.double(), dt.double(), A.double(), bm.double(), cm.double(), D.double(),
                                         z.double(), w.double(), chunk_size=16, initial_state=s0.double(), eps=1e-5,
                                         group_size=8, out_dtype=torch.float64)
    assert rel(got, ref) < 1e-5


@cpu_interp
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(("length", "chunk", "with_init"), [(37, 16, True), (150, 32, False)])
def test_ssd_scan_state_pass_variants_interpreter(length: int, chunk: int, with_init: bool, legacy: bool) -> None:
    """ssd_scan: the flattened state pass (several chunks, odd L) and the kept first version agree with fp64."""
    from secure_run.kernels import ssd_scan
    from secure_run.model.mamba2 import ssd_chunked_scan

    x, dt, A, bm, cm, _, _, _, s0 = _inputs(2, length, 4, 8, 2, 16, torch.float32, "cpu", length)
    init = s0 if with_init else None
    y, s = ssd_scan(x, dt, A, bm, cm, chunk_size=chunk, initial_state=init, backend="triton", legacy=legacy)
    ry, rs = ssd_chunked_scan(x.double(), dt.double(), A.double(), bm.double(), cm.double(), chunk_size=chunk,
                              initial_state=None if init is None else init.double())
    assert rel(y, ry) < 1e-5
    assert rel(s, rs) < 1e-5


def test_prefill_reference_equals_eager_mixer_math() -> None:
    """The fused reference is the mixer's eager tail: scan, ``y + D x``, GatedRMSNorm, cast."""
    from secure_run.model.mamba2 import ssd_chunked_scan
    from secure_run.model.norms import GatedRMSNorm

    x, dt, A, bm, cm, D, z, w, s0 = _inputs(2, 19, 4, 8, 2, 16, torch.float32, "cpu", 3)
    norm = GatedRMSNorm(32, 16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        y, fin = ssd_chunked_scan(x, dt, A, bm, cm, chunk_size=8, initial_state=s0)
        eager = norm((y + D[:, None] * x).reshape(2, 19, 32), z).to(torch.float16)
    got, gfin = mamba_prefill_ssd_reference(x, dt, A, bm, cm, D, z, w, chunk_size=8, initial_state=s0, eps=1e-5,
                                            group_size=16, out_dtype=torch.float16)
    assert torch.equal(got, eager)
    assert torch.equal(gfin, fin)


@cpu_interp
@pytest.mark.parametrize("mode", ["triton", "v1"])
def test_mixer_prefill_modes_equal_eager(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both CUDA prefill paths of the mixer (SECURE_RUN_SSD=triton / v1), under the interpreter, equal
    its eager path over two chunked-prefill calls (state carried), then a decode step."""
    monkeypatch.setenv("SECURE_RUN_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("SECURE_RUN_SSD", mode)
    mixer, new_state = tiny_mamba_mixer(2)

    se, sf = new_state(), new_state()
    u = torch.randn(1, 40, 32)
    with torch.no_grad():
        outs_e = [mixer(u[:, :23], se, fused=False), mixer(u[:, 23:39], se, fused=False),
                  mixer(u[:, 39:], se, fused=False)]
        outs_f = [mixer(u[:, :23], sf, fused=True), mixer(u[:, 23:39], sf, fused=True),
                  mixer(u[:, 39:], sf, fused=True)]
    for a, b in zip(outs_f, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sf.ssm, se.ssm, rtol=1e-4, atol=1e-5)
    assert torch.equal(sf.conv, se.conv)


@cpu_interp
@pytest.mark.parametrize("blocks", [(16, 64, 2), (64, 256, 8)])
def test_causal_conv_launch_blocks_interpreter(blocks: tuple[int, int, int]) -> None:
    """The conv's launch blocks (swept by bench/mamba.py) change nothing: odd L, channels not a block multiple."""
    from secure_run.kernels._triton_mamba import causal_conv1d_triton
    from secure_run.kernels.model_reference import causal_conv1d_reference

    gen = torch.Generator().manual_seed(9)
    c = 200
    proj = torch.randn(1, 71, c + 30, generator=gen)
    xbc = proj[..., 10:10 + c]
    state = torch.randn(1, c, 4, generator=gen)
    w = 0.5 * torch.randn(c, 4, generator=gen)
    b = 0.1 * torch.randn(c, generator=gen)
    got = causal_conv1d_triton(xbc, state, w, b, blocks)
    ref = causal_conv1d_reference(xbc.double(), state.double(), w.double(), b.double())
    assert rel(got, ref) < 1e-5


# --- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_ssd_gpu_released_shapes(dtype: torch.dtype, fuse: bool) -> None:
    from secure_run.kernels._triton_mamba import SsdConfig

    _check_prefill(dtype, "cuda", 11, b=1, length=1000, h=64, p=64, g=8, n=128, chunk=128, with_init=True,
                   tol=1e-4 if dtype == torch.float32 else 1e-2, cfg=SsdConfig(fuse_norm=fuse))


@pytest.mark.gpu
def test_prefill_ssd_gpu_two_rows_no_init() -> None:
    _check_prefill(torch.bfloat16, "cuda", 12, b=2, length=777, h=64, p=64, g=8, n=128, chunk=128, with_init=False,
                   tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("legacy", [False, True])
def test_ssd_scan_gpu_both_versions(legacy: bool) -> None:
    from secure_run.kernels import ssd_scan
    from secure_run.model.mamba2 import ssd_chunked_scan

    x, dt, A, bm, cm, _, _, _, s0 = _inputs(1, 1000, 64, 64, 8, 128, torch.bfloat16, "cuda", 13)
    _poison("cuda")
    y, s = ssd_scan(x, dt, A, bm, cm, chunk_size=128, initial_state=s0, backend="triton", legacy=legacy)
    ry, rs = ssd_chunked_scan(x.double(), dt.double(), A.double(), bm.double(), cm.double(), chunk_size=128,
                              initial_state=s0.double())
    assert rel(y, ry) < 2e-3
    assert rel(s, rs) < 2e-3
