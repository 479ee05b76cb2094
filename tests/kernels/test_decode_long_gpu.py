"""Span-attention decode at 4M and 10M keys (E1b's context) on the GPU, both designs.

The decode table picks its design by cache length (``span_triton.config_for``); these tests pin each
design in turn and compare one decode query at several positions with the reference, and check that
a CUDA graph of the default design replays equal to eager at 10M. fp16 / bf16, released shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_helpers import TOL, make_inputs
from test_triton_gpu import DEV, HKV, HQ, P_REL32, P_RELEASED, D, _check_rows

from secure_run.kernels import span_triton, superlinear_attention
from secure_run.kernels.span_triton import superlinear_attention_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["split", "union", "piece", "shared", "shared-tma", "shared-mergeall", "piece-mergeall"])
@pytest.mark.parametrize("Lkv", [4 << 20, 10 << 20], ids=["4M", "10M"])
def test_long_decode_designs_equal_reference(Lkv: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(
        base(*a, **kw), decode_mode=mode.split("-")[0], decode_union_tma=mode.endswith("-tma"),
        **({"decode_merge_all": True, "decode_merge_warps": 4} if mode.endswith("-mergeall") else {})))
    dtype = torch.bfloat16
    q1, q2, k, v = make_inputs(1, HQ, HKV, 1, Lkv, D, dtype, DEV, seed=Lkv % 89)
    for params in (P_RELEASED, P_REL32):
        for p in (Lkv // 2 + 17, Lkv - 1):
            pos = torch.tensor([p], device=DEV)
            out = torch.full((1, HQ, 1, D), float("nan"), dtype=dtype, device=DEV)
            superlinear_attention_triton(q1, q2, k, v, pos, params, out=out)
            _check_rows(out, q1, q2, k, v, pos, params, None, torch.tensor([0], device=DEV), TOL[dtype], 0.1)


def test_decode_graph_replay_matches_eager_10m() -> None:
    Lkv = 10 << 20
    q1, q2, k, v = make_inputs(1, HQ, HKV, 1, Lkv, D, torch.bfloat16, DEV, seed=12)
    pos = torch.tensor([Lkv - 7000], device=DEV)
    sq1, sq2 = q1.clone(), q2.clone()
    out = superlinear_attention(sq1, sq2, k, v, pos, P_REL32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = superlinear_attention(sq1, sq2, k, v, pos, P_REL32)
    for p, seed in ((Lkv - 1, 1), (Lkv // 3, 2)):
        n1, n2, _, _ = make_inputs(1, HQ, HKV, 1, 1, D, torch.bfloat16, DEV, seed=seed)
        sq1.copy_(n1)
        sq2.copy_(n2)
        pos.fill_(p)
        graph.replay()
        eager = superlinear_attention(n1, n2, k, v, torch.tensor([p], device=DEV), P_REL32)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("change", [{}, {"decode_union_stages": 2, "decode_union_maxnreg": 128},
                                    {"decode_union_tma": True, "decode_union_maxnreg": 168}],
                         ids=["table", "regs-128", "tma"])
def test_stream_trace_records_every_program_and_changes_nothing(change: dict[str, int],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/kernels.py's trace of the shared stream (with the table's tunables, a register cap,
    and whole key blocks through TMA): every program writes its SM and a start no later than its end, the
    rows past the grid stay untouched, the result is bit-equal to the untraced call and matches
    the reference."""
    import functools

    from secure_run.kernels._triton_decode import launch_decode

    base = span_triton.config_for
    monkeypatch.setattr(span_triton, "config_for", lambda *a, **kw: dataclasses.replace(base(*a, **kw), **change))
    dtype = torch.bfloat16
    q1, q2, k, v = make_inputs(1, HQ, HKV, 1, 1 << 20, D, dtype, DEV, seed=5)
    pos = torch.tensor([(1 << 20) - 1], device=DEV)
    plain = superlinear_attention_triton(q1, q2, k, v, pos, P_REL32)
    _check_rows(plain, q1, q2, k, v, pos, P_REL32, None, torch.tensor([0], device=DEV), TOL[dtype], 0.1)
    buf = torch.full((1 << 16, 3), -1, dtype=torch.int64, device=DEV)
    monkeypatch.setattr(span_triton, "launch_decode", functools.partial(launch_decode, trace=buf))
    traced = superlinear_attention_triton(q1, q2, k, v, pos, P_REL32)
    assert torch.equal(traced, plain)
    rec = buf.cpu()
    n = int((rec[:, 1] > 0).sum())
    assert n > 100 and (rec[:n, 1] > 0).all() and (rec[n:] == -1).all(), "programs 0..n-1 recorded, nothing after"
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert ((rec[:n, 0] >= 0) & (rec[:n, 0] < sms)).all()
    assert (rec[:n, 2] >= rec[:n, 1]).all()
    assert int(rec[:n, 2].max() - rec[:n, 1].min()) < 10**8, "one call spans well under 0.1 s"
