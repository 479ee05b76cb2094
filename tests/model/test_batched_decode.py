"""Continuous batching: a slot pool where each sequence owns a row, decoded at per-row positions.

CPU (fp32): a batched decode of sequences at different lengths, with rows joining and leaving (and
the pool growing underneath), gives each sequence the logits and greedy tokens it gets alone, for
both attention kinds (Superlinear through the kernel reference, dense causal GQA). GPU (marker
``gpu``): the CUDA-graph step equals the eager step, graphs are captured once per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from model_helpers import TINY, TINY_SL, tiny_config
from test_graph_decode import randomize

from secure_run.errors import UsageError
from secure_run.model.cache import HybridCache, KVState, SlotPool
from secure_run.model.generate import GenerationConfig, sample_next, sample_rows
from secure_run.model.model import BatchDecoder, HybridLM, decode_buckets


def _model(base: dict[str, object], seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HybridLM:
    model = HybridLM(tiny_config(base))
    randomize(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def solo(model: HybridLM, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits each was picked from, decoding ``prompt`` alone (batch 1)."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt], device=model.device), cache, logits_to_keep=1)[0, -1]
    toks, seen = [], []
    for i in range(n):
        seen.append(logits.cpu())
        toks.append(int(torch.argmax(logits)))
        if i < n - 1:
            logits = model(torch.tensor([[toks[-1]]], device=model.device), cache)[0, -1]
    return toks, seen


@dataclass
class _Seq:
    prompt: list[int]
    n: int
    join_at: int
    via_load: bool = False  # prefill in a separate cache, then copy it into the row
    row: int = -1
    toks: list[int] = field(default_factory=list)
    seen: list[torch.Tensor] = field(default_factory=list)


def _join(model: HybridLM, pool: SlotPool, s: _Seq) -> torch.Tensor:
    s.row = pool.acquire()
    ids = torch.tensor([s.prompt], device=model.device)
    if s.via_load:
        own = model.new_cache(1, len(s.prompt))
        logits = model(ids, own, logits_to_keep=1)
        pool.load(s.row, own)
    else:
        pool.ensure_len(len(s.prompt))
        view = pool.row(s.row)
        logits = model(ids, view, logits_to_keep=1)
        pool.sync(s.row, view)
    return logits[0, -1]


def run_batched(model: HybridLM, seqs: list[_Seq], rows: int, max_len: int) -> BatchDecoder:
    """Drive a pool step by step: sequences join at their step, leave after ``n`` tokens."""
    pool = SlotPool(model.config, rows, max_len, device=model.device, dtype=model.dtype)
    dec = BatchDecoder(model, pool)
    live: list[_Seq] = []
    step = 0
    while any(len(s.toks) < s.n for s in seqs):
        for s in seqs:
            if s.join_at == step:
                logits = _join(model, pool, s)
                s.seen.append(logits.cpu())
                s.toks.append(int(torch.argmax(logits)))
                live.append(s)
        for s in [s for s in live if len(s.toks) == s.n]:
            pool.release(s.row)
            live.remove(s)
        if live:
            out = dec.step({s.row: s.toks[-1] for s in live})
            for s in live:
                s.seen.append(out[s.row].cpu())
                s.toks.append(int(torch.argmax(out[s.row])))
        step += 1
    return dec


def _schedule(vocab: int) -> list[_Seq]:
    return [
        _Seq(_prompt(5, 1, vocab), n=4, join_at=0),
        _Seq(_prompt(11, 2, vocab), n=12, join_at=0),
        _Seq(_prompt(3, 3, vocab), n=7, join_at=2, via_load=True),
        _Seq(_prompt(7, 4, vocab), n=6, join_at=5),  # takes the row the first one left
        _Seq(_prompt(1, 5, vocab), n=3, join_at=6),
    ]


@pytest.mark.parametrize("base", [TINY_SL, TINY], ids=["superlinear", "causal"])
def test_batched_decode_equals_each_alone(base: dict[str, object]) -> None:
    model = _model(base, 21)
    seqs = _schedule(model.config.vocab_size)
    run_batched(model, seqs, rows=4, max_len=8)  # the pool grows (8 -> 16 -> 32) while rows are live
    rows_used = {s.row for s in seqs}
    assert seqs[3].row == seqs[0].row and rows_used <= {0, 1, 2, 3}
    for s in seqs:
        toks, seen = solo(model, s.prompt, s.n)
        assert s.toks == toks
        for got, want in zip(s.seen, seen, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_batched_step_is_one_attention_call_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows at different positions share one attention call per layer (positions [n, 1]), not one per row."""
    import secure_run.kernels as kernels

    model = _model(TINY_SL, 25)
    pool = SlotPool(model.config, 4, 32)
    dec = BatchDecoder(model, pool)
    rows = [pool.acquire() for _ in range(3)]
    for r, n in zip(rows, (2, 9, 5), strict=True):
        view = pool.row(r)
        model(torch.tensor([_prompt(n, r, model.config.vocab_size)]), view)
        pool.sync(r, view)
    seen: list[tuple[int, ...]] = []
    real = kernels.superlinear_attention

    def counting(*args: object, **kw: object) -> torch.Tensor:
        pos = args[4]
        assert isinstance(pos, torch.Tensor)
        seen.append(tuple(pos.shape))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "superlinear_attention", counting)
    dec.step({r: 1 for r in rows})  # bucket 4
    n_layers = len(model.config.layers_of("attention"))
    assert n_layers >= 1 and seen == [(4, 1)] * n_layers


def test_batched_decode_equals_each_alone_triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with the batched steps' attention on the Triton span kernels (CPU interpreter):
    per-row positions [n, 1] in one launch set; prefill and the solo runs stay on the reference."""
    import os

    import secure_run.kernels as kernels

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU interpreter test (the GPU runs the graph tests below)")
    real = kernels.superlinear_attention
    calls = []

    def rows_on_triton(*args: object, **kw: object) -> torch.Tensor:
        pos = args[4]
        assert isinstance(pos, torch.Tensor)
        if pos.dim() == 2:
            calls.append(pos.shape[0])
            kw["backend"] = "triton"
        return real(*args, **kw)  # type: ignore[arg-type]

    model = _model(TINY_SL, 26)
    seqs = _schedule(model.config.vocab_size)[:3]
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "superlinear_attention", rows_on_triton)
        run_batched(model, seqs, rows=4, max_len=16)
    assert calls and max(calls) == 4
    for s in seqs:
        toks, seen = solo(model, s.prompt, s.n)
        assert s.toks == toks
        for got, want in zip(s.seen, seen, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rows_not_stepped_keep_their_state_below_the_bucket() -> None:
    """A row that is active but left out of a step is not touched when it lies outside the bucket."""
    model = _model(TINY_SL, 22)
    pool = SlotPool(model.config, 4, 32)
    dec = BatchDecoder(model, pool)
    a, b = pool.acquire(), pool.acquire()
    for r, p in ((a, [1, 2, 3]), (b, [4, 5])):
        view = pool.row(r)
        model(torch.tensor([p]), view)
        pool.sync(r, view)
    before = pool.row(b)
    snap = before.snapshot()
    dec.step({a: 7})  # bucket 1: row 1 is outside it
    after = pool.row(b)
    for i, s in snap.mamba.items():
        torch.testing.assert_close(after.mamba(i).ssm, s.ssm, rtol=0, atol=0)
    assert pool.lengths == [4, 2, 0, 0]


def test_per_row_kv_write() -> None:
    kv = KVState(k=torch.zeros(3, 2, 6, 4), v=torch.zeros(3, 2, 6, 4))
    new = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 1, 4) + 1
    kv.write(new, -new, torch.tensor([[0], [5], [2]]))
    for r, p in enumerate((0, 5, 2)):
        torch.testing.assert_close(kv.k[r, :, p], new[r, :, 0])
        torch.testing.assert_close(kv.v[r, :, p], -new[r, :, 0])
        assert int((kv.k[r] != 0).sum()) == 2 * 4


def test_pool_rows_and_refusals() -> None:
    cfg = tiny_config(TINY)
    pool = SlotPool(cfg, 2, 4)
    assert (pool.acquire(), pool.acquire()) == (0, 1)
    with pytest.raises(UsageError) as err:
        pool.acquire()
    assert err.value.rule == "cache.pool_full"
    pool.release(0)
    assert pool.acquire() == 0
    dec = BatchDecoder(HybridLM(cfg), pool)
    pool.release(1)
    with pytest.raises(UsageError) as err2:
        dec.step({1: 3})
    assert err2.value.rule == "model.batch"
    assert decode_buckets(1) == (1,) and decode_buckets(16) == (1, 2, 4, 8, 16) and dec.bucket_for(2) == 2


def test_rows_view_and_copy_to_share_and_copy() -> None:
    cfg = tiny_config(TINY)
    big = HybridCache(cfg, 3, 8)
    view = big.rows(1, 2, filled=0)
    view.kv(1).k.fill_(2.0)
    assert float(big.kv(1).k[1].sum()) == 2.0 * big.kv(1).k[1].numel() and float(big.kv(1).k[0].sum()) == 0.0
    view.filled = 5
    small = HybridCache(cfg, 1, 6)
    view.copy_to(small, start=2)
    assert small.filled == 5 and float(small.kv(1).k[0, :, :2].abs().sum()) == 0.0
    assert float(small.kv(1).k[0, :, 2:5].min()) == 2.0
    with pytest.raises(UsageError):
        big.rows(2, 4)


def test_sample_rows_equals_sample_next() -> None:
    logits = torch.randn(5, 40)
    cfgs = [GenerationConfig(temperature=0.0), GenerationConfig(temperature=0.8, top_k=5, seed=3),
            GenerationConfig(temperature=1.2, top_p=0.7, seed=4)]
    rows = [4, 0, 2]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    want = [sample_next(logits[r], c, torch.Generator().manual_seed(c.seed)) for r, c in zip(rows, cfgs, strict=True)]
    assert sample_rows(logits, rows, cfgs, gens) == want


# --- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_batched_decode_equals_eager(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this host")
    model = _model(TINY_SL, 23, "cuda", dtype)
    runs = []
    for graphs in (True, False):
        seqs = _schedule(model.config.vocab_size)
        pool = SlotPool(model.config, 4, 64, device="cuda", dtype=dtype)
        dec = BatchDecoder(model, pool, graphs=graphs)
        live: list[_Seq] = []
        for step in range(14):
            for s in seqs:
                if s.join_at == step:
                    logits = _join(model, pool, s)
                    s.toks.append(int(torch.argmax(logits)))
                    live.append(s)
            for s in [s for s in live if len(s.toks) >= s.n]:
                pool.release(s.row)
                live.remove(s)
            if live:
                out = dec.step({s.row: s.toks[-1] for s in live})
                for s in live:
                    s.seen.append(out[s.row].float().cpu().clone())
                    s.toks.append(int(torch.argmax(out[s.row])))
        runs.append((seqs, dec.captures))
    (g_seqs, captures), (e_seqs, _) = runs
    assert 1 <= captures <= len(decode_buckets(4))  # one capture per bucket used, never per request
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for g, e in zip(g_seqs, e_seqs, strict=True):
        for a, b in zip(g.seen, e.seen, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert [s.toks for s in g_seqs] == [s.toks for s in e_seqs]


@pytest.mark.gpu
def test_cuda_batched_decode_equals_each_alone_fp32() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this host")
    model = _model(TINY_SL, 24, "cuda", torch.float32)
    seqs = _schedule(model.config.vocab_size)
    run_batched(model, seqs, rows=4, max_len=8)
    for s in seqs:
        toks, seen = solo(model, s.prompt, s.n)
        assert s.toks == toks
        for got, want in zip(s.seen, seen, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
