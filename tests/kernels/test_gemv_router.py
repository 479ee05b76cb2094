"""The decode router's launch variants (kernels/_triton_moe.py ``_ROUTER``): the one-launch fused
logits + top-k and the two-launch form give the reference's expert choices and weights.

CPU: the Triton interpreter (fp32 / fp16); GPU (marker ``gpu``): bf16 at the released shapes
(128 experts, top-6, hidden 2688), 1 and 4 tokens, repeated launches (the ticket counter is reset
by each launch) and under a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

from secure_run.kernels import moe_route
from secure_run.kernels.model_reference import moe_route_reference

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interp = pytest.mark.skipif(not INTERP, reason="CPU interpreter suite (TRITON_INTERPRET=1)")
VARIANTS = [{"fused": 0}, {"fused": 1}, {"fused": 1, "logit_block_e": 1, "logit_block_d": 4096},
            {"fused": 1, "logit_block_e": 4, "logit_warps": 2}]


def _inputs(t: int, d: int, e: int, dtype: torch.dtype, device: str, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(device=device, dtype=dtype)
    gate = (torch.randn(e, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype)
    bias = (torch.randn(e, generator=g) * 0.1).to(device)
    return x, gate, bias


def _check(t: int, d: int, e: int, k: int, dtype: torch.dtype, device: str, seed: int) -> None:
    x, gate, bias = _inputs(t, d, e, dtype, device, seed)
    for normalise, scale in ((True, 2.5), (False, 1.0)):
        ids, w = moe_route(x, gate, bias, k, normalise, scale, backend="triton")
        rids, rw = moe_route_reference(x, gate, bias, k, normalise, scale)
        assert torch.equal(ids.cpu(), rids.cpu())
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@cpu_interp
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [1, 3])
def test_router_variants_interpreter(variant: dict[str, int], dtype: torch.dtype, t: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.kernels._triton_moe as tm

    monkeypatch.setitem(tm.__dict__, "_ROUTER", tm._ROUTER | variant)
    for seed in range(2):  # two launches: the second finds the counter back at 0
        _check(t, 70, 13, 3, dtype, "cpu", seed)
    counter = tm._ticket_counter(torch.device("cpu"))
    assert counter is not None and int(counter) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("t", [1, 4])
def test_router_variants_gpu(variant: dict[str, int], t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.kernels._triton_moe as tm

    monkeypatch.setitem(tm.__dict__, "_ROUTER", tm._ROUTER | variant)
    for seed in range(3):
        _check(t, 2688, 128, 6, torch.bfloat16, "cuda", seed)


@pytest.mark.gpu
def test_router_fused_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_run.kernels._triton_moe as tm

    monkeypatch.setitem(tm.__dict__, "_ROUTER", tm._ROUTER | {"fused": 1})
    x, gate, bias = _inputs(1, 2688, 128, torch.bfloat16, "cuda", 7)
    moe_route(x, gate, bias, 6, True, 2.5)  # warm-up: compiles, creates the counter
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [moe_route(x, gate, bias, 6, True, 2.5) for _ in range(4)]  # four launches share the counter
    for seed in range(3):
        x.copy_(_inputs(1, 2688, 128, torch.bfloat16, "cuda", 100 + seed)[0])
        graph.replay()
        rids, rw = moe_route_reference(x, gate, bias, 6, True, 2.5)
        for ids, w in outs:
            assert torch.equal(ids, rids)
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
