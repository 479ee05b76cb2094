"""Whole-model invariants: chunked prefill, decode, window = dense, cache tail, batch, dtypes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_helpers import TINY, TINY_SL

from secure_run.errors import UsageError
from secure_run.model.loader import load_model
from secure_run.model.model import HybridLM

L = 29  # odd, several Mamba chunks (8) and several span-search stripes (window 6)


def _ids(n: int = L, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["nemotron_h", "superlinear-exp"])
def model(request: pytest.FixtureRequest, folder_factory: Callable[..., Path]) -> HybridLM:
    cfg = TINY if request.param == "nemotron_h" else TINY_SL
    return load_model(folder_factory(cfg))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunks", [[L], [1] * 3 + [L - 3], [7, 7, 7, 8], [16, 13], [2, 27]])
def test_chunked_prefill_equals_one_shot(model: HybridLM, chunks: list[int]) -> None:
    ids = _ids()
    full = model(ids)
    cache = model.new_cache(1, L + 5)
    parts, start = [], 0
    for c in chunks:
        parts.append(model(ids[:, start:start + c], cache))
        start += c
    assert cache.filled == L
    assert _rel(torch.cat(parts, 1), full) < 1e-5


def test_prefill_last_row_equals_decode_step(model: HybridLM) -> None:
    ids = _ids()
    full = model(ids)  # one-shot prefill of L tokens
    cache = model.new_cache(1, L)
    model(ids[:, :-1], cache)
    step = model(ids[:, -1:], cache)  # decode path (Lq = 1)
    assert _rel(step[:, 0], full[:, -1]) < 1e-5
    # and every position of a token-by-token decode
    cache = model.new_cache(1, L)
    rows = torch.cat([model(ids[:, t:t + 1], cache) for t in range(L)], 1)
    assert _rel(rows, full) < 1e-5


def test_logits_to_keep(model: HybridLM) -> None:
    ids = _ids()
    full = model(ids)
    last = model(ids, logits_to_keep=1)
    assert last.shape == (1, 1, TINY["vocab_size"]) and last.dtype == torch.float32
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_cache_tail_contents_are_never_read(model: HybridLM) -> None:
    ids = _ids()
    ref = model(ids[:, :20])
    cache = model.new_cache(1, 64)
    for i in model.config.attention_layers:
        cache.kv(i).k.normal_(generator=torch.Generator().manual_seed(i)).mul_(100)
        cache.kv(i).v.normal_(generator=torch.Generator().manual_seed(i + 1)).mul_(100)
    torch.testing.assert_close(model(ids[:, :20], cache), ref, rtol=1e-5, atol=1e-5)


def test_batch_rows_are_independent(model: HybridLM) -> None:
    ids = _ids(batch=3, seed=4)
    both = model(ids)
    for b in range(3):
        assert _rel(model(ids[b:b + 1]), both[b:b + 1]) < 1e-5


def test_superlinear_with_covering_window_equals_dense_causal(folder_factory: Callable[..., Path]) -> None:
    # spec/model.md 3.7: with no anchor (every q < W) Superlinear attention is dense causal attention.
    # sw_index 15 at p = 0.55 gives W = 153 > L. Same weights; the search projection is unused.
    from model_helpers import random_state, tiny_config

    sl_cfg = TINY_SL | {"span_attention_sw_index": 15}
    state = random_state(tiny_config(sl_cfg), seed=3)
    dense_state = {k: v for k, v in state.items() if "q_search_proj" not in k}
    sl = load_model(folder_factory(sl_cfg, state))
    dense = load_model(folder_factory(TINY, dense_state))
    assert sl.config.span_params().window_len == 153
    ids = _ids(60)
    assert _rel(sl(ids), dense(ids)) < 1e-5


def test_superlinear_small_window_really_searches(folder_factory: Callable[..., Path]) -> None:
    # the same weights with a small window must differ from dense attention past the window
    from model_helpers import random_state, tiny_config

    state = random_state(tiny_config(TINY_SL), seed=3)
    sl = load_model(folder_factory(TINY_SL, state))
    dense = load_model(folder_factory(TINY, {k: v for k, v in state.items() if "q_search_proj" not in k}))
    ids = _ids()
    a, b = sl(ids), dense(ids)
    W = sl.config.span_params().window_len
    # the first layer with attention is layer 1; before it only Mamba runs, so rows < W agree
    assert _rel(a[:, :W], b[:, :W]) < 1e-5
    assert _rel(a[:, W + 2:], b[:, W + 2:]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(folder_factory: Callable[..., Path], dtype: torch.dtype) -> None:
    path = folder_factory(TINY_SL)
    ref = load_model(path)(_ids())
    half = load_model(path, dtype=dtype)
    assert half.dtype == dtype
    assert half.backbone.layers[3].mixer.gate.e_score_correction_bias.dtype == torch.float32
    out = half(_ids())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    row_err = (out - ref).abs().amax(-1) / ref.abs().amax(-1)  # [1, L]
    # bf16 keeps 8 mantissa bits; a rare row may flip an expert or a span choice, so use the median
    assert float(row_err.median()) < (0.06 if dtype == torch.bfloat16 else 0.01)
    cache = half.new_cache(1, L)
    assert cache.kv(1).k.dtype == dtype and cache.mamba(0).ssm.dtype == torch.float32


def test_cache_refuses_overflow_and_bad_input(model: HybridLM) -> None:
    cache = model.new_cache(1, 4)
    with pytest.raises(UsageError) as info:
        model(_ids(5), cache)
    assert info.value.rule == "cache.full"
    with pytest.raises(UsageError) as info:
        model(torch.tensor([[0, TINY["vocab_size"]]]))
    assert info.value.rule == "model.input"
    with pytest.raises(UsageError):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(UsageError):
        model(_ids(3, batch=2), model.new_cache(1, 8))


def test_prefill_skips_the_per_layer_position_check(folder_factory: Callable[..., Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's positions come from the cache's bounds-checked counters, so no attention layer
    re-checks them (on CUDA that check is a host sync per layer and chunk: ~7 ms of a 128K one-shot
    layer on the H200); a chunk past the buffer is still refused, by the cache, before any layer."""
    import secure_run.kernels as kernels

    model = load_model(folder_factory(TINY_SL))
    ids = _ids()
    want = model(ids)

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("per-layer position check called")

    monkeypatch.setattr(kernels, "check_positions", refuse)
    cache = model.new_cache(1, L)
    got = torch.cat([model(ids[:, :20], cache), model(ids[:, 20:], cache)], 1)  # prefill, chunked
    assert _rel(got, want) < 1e-5
    with pytest.raises(UsageError) as info:
        model(ids[:, :1], cache)  # the cache is full
    assert info.value.rule == "cache.full"
