"""The Triton decode GEMV (kernels/_triton_gemv.py) against F.linear / an fp64 product, and its dispatch.

CPU: the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) in fp32 / fp16 at odd
shapes, one and several weights per launch, M = 1 (reduction path) and M = 3, 16 (tl.dot path).
GPU (marker ``gpu``): bf16 / fp32 at the released shapes, several weights per launch, under a CUDA graph.
Outputs are poisoned (NaN) before each launch: every element must be written.
"""

from __future__ import annotations

import os

import pytest
import torch

from secure_run.kernels import decode_linear, decode_linears

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU interpreter suite (TRITON_INTERPRET=1)")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.empty of the GEMV module comes back full of NaN (unwritten elements show up)."""
    import secure_run.kernels._triton_gemv as tg

    real = torch.empty

    def nan_empty(*shape: int, **kw: object) -> torch.Tensor:
        t = real(*shape, **kw)  # type: ignore[call-overload]
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(tg.torch, "empty", nan_empty)


def _inputs(m: int, k: int, ns: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    ws = [(torch.randn(n, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype) for n in ns]
    return x, ws


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("ns", [(37,), (130, 5, 1, 67)])
def test_gemv_interpreter(m: int, ns: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.kernels._triton_gemv import gemv_triton

    _poisoned_empty(monkeypatch)
    x, ws = _inputs(m, 75, ns, dtype, "cpu", seed=m * 10 + len(ns))  # K = 75: a masked tail in every config
    outs = gemv_triton(x, ws)
    assert len(outs) == len(ws)
    for w, o in zip(ws, outs):
        assert o.shape == (m, w.shape[0]) and o.dtype == dtype
        assert rel(o, x.double() @ w.double().T) < TOL[dtype]


@cpu_interp
@pytest.mark.parametrize("cfg", [{"block_n": 1, "block_k": 32}, {"block_n": 8, "block_k": 16}])
def test_gemv_interpreter_other_blocks(cfg: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Other launch shapes of the table compute the same function (the sweep varies them on the GPU)."""
    import secure_run.kernels._triton_gemv as tg

    monkeypatch.setattr(tg, "_config", lambda m, n: {"warps": 4, "stages": 1} | cfg | (
        {"block_n": 16} if m > 1 else {}))
    x, ws = _inputs(1, 100, (19, 3), torch.float32, "cpu", seed=5)
    for w, o in zip(ws, tg.gemv_triton(x, ws)):
        assert rel(o, x.double() @ w.double().T) < 1e-5


def test_gemv_refuses_bad_calls() -> None:
    from secure_run.kernels._triton_gemv import gemv_triton

    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="1..4 weights"):
        gemv_triton(x, [torch.randn(3, 8)] * 5)
    with pytest.raises(ValueError, match="rows"):
        gemv_triton(torch.randn(17, 8), [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="K"):
        gemv_triton(x, [torch.randn(3, 9)])


def test_decode_linear_off_cuda_is_f_linear() -> None:
    """On CPU (and for prefill) the dispatch is exactly F.linear, bit for bit."""
    x = torch.randn(1, 3, 24)
    ws = (torch.randn(10, 24), torch.randn(4, 24))
    for got, w in zip(decode_linears(x, ws), ws):
        assert torch.equal(got, torch.nn.functional.linear(x, w))
    assert torch.equal(decode_linear(x, ws[0]), torch.nn.functional.linear(x, ws[0]))


# --- GPU ------------------------------------------------------------------------------------------

#: the released model's decode projections: Mamba in_proj / out_proj, attention q_search+q+k+v, lm_head
RELEASED = [("in_proj", 2688, (10304,)), ("out_proj", 4096, (2688,)), ("qkv", 2688, (4096, 4096, 256, 256)),
            ("lm_head", 2688, (131072,))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("shape", RELEASED, ids=[r[0] for r in RELEASED])
def test_gemv_gpu_released_shapes(shape: tuple[str, int, tuple[int, ...]], m: int, dtype: torch.dtype,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.kernels._triton_gemv import gemv_triton

    _, k, ns = shape
    _poisoned_empty(monkeypatch)
    x, ws = _inputs(m, k, ns, dtype, "cuda", seed=m + k)
    outs = gemv_triton(x, ws)
    for w, o in zip(ws, outs):
        ref = torch.nn.functional.linear(x.double(), w.double())
        assert o.shape == (m, w.shape[0])
        assert rel(o, ref) < TOL[dtype]
        assert rel(o, torch.nn.functional.linear(x, w)) < TOL[dtype]


@pytest.mark.gpu
def test_decode_linears_dispatch_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row in the model's [B, L, d] layout goes to the Triton GEMV (one launch for all weights);
    more rows than DISPATCH_MAX_ROWS, or SECURE_RUN_GEMV=torch, are F.linear bit for bit."""
    import secure_run.kernels._triton_gemv as tg

    calls: list[int] = []
    real = tg.gemv_triton
    monkeypatch.setattr(tg, "gemv_triton", lambda x, ws: calls.append(len(ws)) or real(x, ws))
    x, ws = _inputs(1, 2688, (4096, 256), torch.bfloat16, "cuda", seed=9)
    outs = decode_linears(x[None], tuple(ws))
    assert calls == [2]
    for w, o in zip(ws, outs):
        assert o.shape == (1, 1, w.shape[0])
        assert rel(o[0], x.double() @ w.double().T) < 1e-2
    xb = torch.randn(1, tg.DISPATCH_MAX_ROWS + 1, 2688, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(decode_linear(xb, ws[0]), torch.nn.functional.linear(xb, ws[0]))
    monkeypatch.setenv("SECURE_RUN_GEMV", "torch")
    assert torch.equal(decode_linear(x, ws[0]), torch.nn.functional.linear(x, ws[0]))
    assert calls == [2]


@pytest.mark.gpu
def test_gemv_gpu_graph_replay_and_deterministic() -> None:
    x, ws = _inputs(1, 4096, (2688, 77), torch.bfloat16, "cuda", seed=3)
    first = decode_linears(x, tuple(ws))
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = decode_linears(static_x, tuple(ws))
    for _ in range(3):
        graph.replay()
        for a, b in zip(outs, first):
            assert torch.equal(a, b)  # fixed reduction order: bit-identical every time
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    for o, w in zip(outs, ws):
        assert rel(o, static_x.double() @ w.double().T) < 1e-2
