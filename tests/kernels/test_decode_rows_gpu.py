"""GPU (marker ``gpu``): batched decode with one position per row (``cache_position`` [B, 1]) at the
released shapes (32 query heads, 2 KV heads, head_dim 128), bf16, every decode design: every row
equals the reference run for that row alone (near-tie rows excluded, as in test_triton_gpu.py) and
the batch-1 call of that row; one CUDA graph replays new per-row positions like eager calls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_helpers import P_RELEASED, TOL, make_inputs, near_tie_rows, row_rel_err

from secure_run.kernels import superlinear_attention
from secure_run.kernels.reference import superlinear_attention_reference
from secure_run.kernels.span_triton import superlinear_attention_triton

pytestmark = pytest.mark.gpu
DEV = "cuda"
HQ, HKV, D = 32, 2, 128
P_REL32 = P_RELEASED.with_mode("upstream-fp32")


def _use_decode_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from secure_run.kernels import span_triton

    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(
        base(*a, **kw), decode_mode=mode.split("-")[0], decode_lane_max=mode.endswith("-lanes")))


@pytest.mark.parametrize("mode", ["split-lanes", "union", "piece-lanes", "shared"])
def test_rows_at_own_positions_equal_reference_bf16(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_decode_mode(monkeypatch, mode)
    lkv = 1 << 17
    positions = (7, 2500, 40_000, lkv - 1)
    q1, q2, k, v = make_inputs(len(positions), HQ, HKV, 1, lkv, D, torch.bfloat16, DEV, seed=51)
    pos = torch.tensor(positions, device=DEV)[:, None]
    out = torch.full(q2.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    superlinear_attention_triton(q1, q2, k, v, pos, P_REL32, out=out)
    assert not out.isnan().any()
    for r in range(len(positions)):
        sl = slice(r, r + 1)
        alone = superlinear_attention_triton(q1[sl], q2[sl], k[sl], v[sl], pos[r], P_REL32)
        assert torch.equal(out[sl], alone), f"row {r} (position {positions[r]}) differs from its batch-1 call"
        ref = superlinear_attention_reference(q1[sl], q2[sl], k[sl], v[sl], pos[r], P_REL32)
        ties = near_tie_rows(q1[sl], k[sl], pos[r], P_REL32, None, rel=1e-4)
        err = row_rel_err(out[sl], ref)
        assert not ((err > TOL[torch.bfloat16]) & ~ties).any(), f"row {r}: max err {err[~ties].max():.3e}"


def test_rows_cuda_graph_replay_matches_eager() -> None:
    lkv = 1 << 16
    q1, q2, k, v = make_inputs(4, HQ, HKV, 1, lkv, D, torch.bfloat16, DEV, seed=52)
    pos = torch.tensor([[100], [5000], [30_000], [lkv - 1]], device=DEV)
    sq1, sq2 = q1.clone(), q2.clone()
    out = superlinear_attention(sq1, sq2, k, v, pos, P_REL32)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = superlinear_attention(sq1, sq2, k, v, pos, P_REL32)
    for new, seed in (([[lkv - 1], [3], [20_000], [700]], 1), ([[60_000], [60_001], [9], [12_345]], 2)):
        n1, n2, _, _ = make_inputs(4, HQ, HKV, 1, 1, D, torch.bfloat16, DEV, seed=seed)
        sq1.copy_(n1)
        sq2.copy_(n2)
        pos.copy_(torch.tensor(new, device=DEV))
        graph.replay()
        eager = superlinear_attention(n1, n2, k, v, torch.tensor(new, device=DEV), P_REL32)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
