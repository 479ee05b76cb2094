"""The decode sweep of bench/kernels.py names only real tunables and designs: a misspelt field or
mode would only show on the GPU, as an error row in place of a measurement."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from secure_run.kernels._triton_decode import DECODE_MODES
from secure_run.kernels.span_triton import TritonConfig, config_for

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def _bench(path: Path = BENCH) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("contexts", ["SWEEP_CONTEXTS", "MERGE_CONTEXTS"])
def test_every_sweep_variant_is_a_valid_table_change(contexts: str) -> None:
    fields = {f.name for f in dataclasses.fields(TritonConfig)}
    base = config_for(torch.device("cuda"), 128, torch.float16, 1 << 20)
    for lkv, variants in getattr(_bench(), contexts).items():
        assert variants, f"no variants at {lkv}"
        for var in variants:
            assert set(var) <= fields, f"unknown tunable in {var}"
            cfg = dataclasses.replace(base, **var)
            assert cfg != base, f"{var} changes nothing"
            assert cfg.decode_mode in DECODE_MODES


def test_every_trace_variant_is_a_valid_table_change() -> None:
    fields = {f.name for f in dataclasses.fields(TritonConfig)}
    variants = _bench().TRACE_VARIANTS
    assert variants[0] == {"committed": True}
    for var in variants[1:]:
        assert set(var) <= fields, f"unknown tunable in {var}"
        cfg = dataclasses.replace(config_for(torch.device("cuda"), 128, torch.float16, 1 << 20), **var)
        assert cfg.decode_mode == "shared", "only the shared streaming kernel is traced"


def test_trace_stats_summarise_programs_and_sms() -> None:
    # 4 programs on 2 SMs (ns): SM 0 runs [0, 10] and [10, 30] us, SM 1 runs [5, 8] and [6, 7] us;
    # rows with start <= 0 are unused buffer rows
    us = 1000
    tr = torch.tensor([[0, 1, 10 * us], [0, 10 * us, 30 * us], [1, 5 * us, 8 * us], [1, 6 * us, 7 * us],
                       [-1, -1, -1], [-1, -1, -1]], dtype=torch.int64)
    st = _bench()._trace_stats(tr)
    assert st["programs"] == 4 and st["sms"] == 2
    assert st["working_over_2us"] == 3  # the 1 us program is not
    assert st["end_q0_50_90_100"][0] == 7.0 and st["end_q0_50_90_100"][3] == 30.0
    assert st["dur_q0_50_90_100"][3] == 20.0
    assert st["sm_end_q0_50_90_100"] == [8.0, 19.0, 27.8, 30.0]  # SM 1 ends at 8 us, SM 0 at 30 us
    assert st["sm_busy_q0_50_90_100"][0] == 4.0 and st["sm_busy_q0_50_90_100"][3] == 30.0



def test_pattern_read_covers_every_block_once() -> None:
    """The read-pattern floor (``--only pattern``) reads each K / V block exactly once, contiguous
    or interleaved, also where the programs do not divide the blocks. Under the CPU interpreter the
    plain-load path; on a GPU also the tl.dot path (its sum is scaled by the 16 x 128 ones of q)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not interp and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1")
    dev = "cpu" if interp else "cuda"
    bench = _bench()
    bn, d = 64, 128
    for n_blocks, n_prog in ((10, 3), (7, 4), (8, 8)):
        gen = torch.Generator().manual_seed(n_blocks)
        k = (torch.rand(n_blocks * bn, d, generator=gen) / 64).half().to(dev)
        v = (torch.rand(n_blocks * bn, d, generator=gen) / 64).half().to(dev)
        per = -(-n_blocks // n_prog)
        for inter in (False, True):
            for dot in ((False,) if interp else (False, True)):
                out = torch.empty(n_prog, device=dev)
                bench._stream_read_kernel[(n_prog,)](k, v, out, n_blocks, per, n_prog, BN=bn, D=d, INTERLEAVE=inter,
                                                     DOT=dot, STAGES=3 if dot else 1, num_warps=4)
                kd, vd = k.double().cpu(), v.double().cpu()
                # tl.dot path: sum over rows and dims of (1 x K^T) V = 16 * sum_j (sum_d K[j, d]) (sum_d V[j, d])
                want = float(16 * (kd.sum(1) * vd.sum(1)).sum()) if dot else float(kd.sum() + vd.sum())
                got = float(out.double().sum())
                assert abs(got - want) <= 2e-3 * abs(want), (n_blocks, n_prog, inter, dot, got, want)


def test_layers_graph_runs_each_layer_on_its_own_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--only layers`` divides a graph of the model's attention layers by their count: each call
    must pair layer i's queries with layer i's cache (a repeated cache would be read from L2), and
    the count must be the model's number of ``*`` layers."""
    mod = _bench()
    released = _bench(BENCH.with_name("model.py")).FULL  # Superlinear-Exp-v0.1's config
    assert mod.MODEL_ATTN_LAYERS == released["hybrid_override_pattern"].count("*")
    seen: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(mod, "superlinear_attention",
                        lambda a, b, k, v, pos, p: seen.append((id(a), id(b), id(k), id(v))))
    qset = [(torch.zeros(1), torch.zeros(1)) for _ in range(3)]
    caches = [(torch.zeros(1), torch.zeros(1)) for _ in range(3)]
    mod._decode_layers(qset, caches, torch.zeros(1))
    assert seen == [(id(a), id(b), id(k), id(v)) for (a, b), (k, v) in zip(qset, caches, strict=True)]
    with pytest.raises(ValueError):
        mod._decode_layers(qset[:2], caches, torch.zeros(1))
