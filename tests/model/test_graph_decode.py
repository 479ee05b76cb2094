"""Decode without host syncs: device-side MoE routing, ids checked once on the host, static positions,
CUDA-graph replay equal to eager; the prefill chunk chosen from free memory.

CPU: the device paths (PyTorch references, and the Triton kernels under the interpreter) equal the
eager code in fp32. GPU (marker ``gpu``): graph replay equals the eager step, and greedy tokens of the
demo are equal between graph and eager and between CUDA and CPU in fp32.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from model_helpers import TINY, TINY_SL, tiny_config

from secure_run.errors import UsageError
from secure_run.model.generate import (
    MAX_PREFILL_CHUNK,
    MIN_PREFILL_CHUNK,
    GenerationConfig,
    activation_bytes_per_token,
    choose_prefill_chunk,
    generate,
)
from secure_run.model.model import DecodeGraph, HybridLM
from secure_run.model.moe import MoE

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations O(1) and make routing decisive (no ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "norm_f.weight")):
                t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("A_log"):
                t = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith("dt_bias"):
                t = torch.randn(p.shape, generator=g) - 2.0
            elif name.endswith(("e_score_correction_bias", "D", "bias")):
                t = 0.5 * torch.randn(p.shape, generator=g)
            elif p.dim() >= 2:
                t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            else:
                t = torch.randn(p.shape, generator=g)
            p.copy_(t.to(p.dtype))


def tiny_moe(seed: int = 0) -> MoE:
    moe = MoE(tiny_config(TINY))
    randomize(moe, seed)
    return moe


# --- CPU: device-side routing equals the old path ------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 2, 23])
def test_device_routing_reference_equals_loop(tokens: int) -> None:
    moe = tiny_moe(1)
    x = torch.randn(1, tokens, 64)
    with torch.no_grad():
        loop = moe(x, sync_free=False)
        dev = moe(x, sync_free=True)  # CPU: gather reference, no host sync
    torch.testing.assert_close(dev, loop, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not INTERP, reason="needs the Triton CPU interpreter")
@pytest.mark.parametrize("tokens", [1, 30])  # GEMV path and grouped-GEMM path
def test_device_routing_triton_interpreter_equals_loop(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_RUN_KERNEL_BACKEND", "triton")
    moe = tiny_moe(2)
    x = torch.randn(1, tokens, 64)
    with torch.no_grad():
        dev = moe(x, sync_free=True)
        loop = moe(x, sync_free=False)
    torch.testing.assert_close(dev, loop, rtol=1e-4, atol=1e-5)


def test_device_routing_never_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path must not read tensors back to the host (``tolist``/``item``/``int``)."""
    moe = tiny_moe(3)
    moe.stacked_experts()
    x = torch.randn(1, 4, 64)

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("host sync in the device path")

    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "__int__", boom)
    with torch.no_grad():
        moe(x, sync_free=True)
    with pytest.raises(AssertionError, match="host sync"):
        moe(x, sync_free=False)  # the old loop does sync: the probe works


def test_stacked_experts_alias_and_survive_reload() -> None:
    moe = tiny_moe(4)
    up, down = moe.stacked_experts()
    assert up.shape == (8, 32, 64) and down.shape == (8, 64, 32)
    for e, ex in enumerate(moe.experts):
        assert ex.up_proj.weight.data_ptr() == up[e].data_ptr()  # a view: no second copy
        assert torch.equal(ex.down_proj.weight, down[e])
    names = set(moe.state_dict())
    assert "experts.3.up_proj.weight" in names and not any("stacked" in n for n in names)
    fresh = {k: torch.randn_like(v) / math.sqrt(v.shape[-1]) for k, v in moe.state_dict().items()}
    moe.load_state_dict(fresh, assign=True)  # the loader's way: parameters replaced
    up2, _ = moe.stacked_experts()
    assert torch.equal(up2[5], fresh["experts.5.up_proj.weight"])
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, sync_free=True), moe(x, sync_free=False), rtol=1e-4, atol=1e-5)


def test_ids_checked_once_on_the_host() -> None:
    model = HybridLM(tiny_config(TINY))
    with pytest.raises(UsageError, match="token ids"):
        list(generate(model, [1, 2, 96], GenerationConfig(max_new_tokens=2)))
    with pytest.raises(UsageError, match="token ids"):
        model(torch.tensor([[1, -1]]))
    cache = model.new_cache(1, 4)
    model(torch.tensor([[1, 2]]), cache, check_ids=False)  # already checked: no check here
    assert cache.filled == 2


# --- prefill chunk from free memory ---------------------------------------------------------------


def test_prefill_chunk_from_free_memory() -> None:
    model = HybridLM(tiny_config(TINY))
    per = activation_bytes_per_token(model.config, torch.float32)
    assert per > 0
    small = choose_prefill_chunk(model, 1 << 30, free_bytes=per * 1000)
    big = choose_prefill_chunk(model, 1 << 30, free_bytes=per * 10_000_000)
    assert small == 256 or small <= 1000  # floor at MIN_PREFILL_CHUNK, else what fits
    assert big == MAX_PREFILL_CHUNK
    mid = choose_prefill_chunk(model, 1 << 30, free_bytes=per * 40_000)
    assert MIN_PREFILL_CHUNK <= mid <= 40_000 and mid & (mid - 1) == 0 and mid != 2048
    assert choose_prefill_chunk(model, 100, free_bytes=per * 10_000_000) == 100  # never past the prompt


def test_released_config_chunk_at_1m_context() -> None:
    """Full-size config on an H200 after the weights (63.3 GB) and a 1M-token KV cache (6.4 GB)."""
    from model_helpers import real_config_text

    from secure_run.model.config import parse_config_json

    cfg = parse_config_json(real_config_text())
    per = activation_bytes_per_token(cfg, torch.bfloat16)
    free = 141_000_000_000 - 63_300_000_000 - 6_400_000_000
    model = HybridLM.__new__(HybridLM)
    torch.nn.Module.__init__(model)
    model.config = cfg
    model.backbone = torch.nn.Module()
    model.backbone.embeddings = torch.nn.Embedding(1, 1, dtype=torch.bfloat16, device="meta")
    chunk = choose_prefill_chunk(model, 1 << 20, free_bytes=free)
    assert chunk >= 16384, (chunk, per)


def test_generate_chunk_choice_matches_fixed_chunks() -> None:
    model = HybridLM(tiny_config(TINY))
    randomize(model, 5)
    prompt = list(range(3, 40))
    auto = list(generate(model, prompt, GenerationConfig(max_new_tokens=5, stop_ids=frozenset())))
    fixed = list(generate(model, prompt, GenerationConfig(max_new_tokens=5, stop_ids=frozenset(), prefill_chunk=7)))
    assert auto == fixed


def test_graph_decode_is_cuda_only_and_superlinear_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_run.model.generate import use_graph

    model = HybridLM(tiny_config(TINY_SL))
    dense = HybridLM(tiny_config(TINY))
    with pytest.raises(UsageError, match="CUDA graphs"):
        DecodeGraph(model, model.new_cache(1, 8))
    assert not use_graph(model, GenerationConfig())  # CPU: eager
    monkeypatch.setattr(HybridLM, "device", property(lambda self: torch.device("cuda")))
    assert use_graph(model, GenerationConfig())
    assert not use_graph(model, GenerationConfig(cuda_graph=False))
    assert not use_graph(dense, GenerationConfig())  # dense NemotronH attention reads a host position


def test_full_cache_refused_before_any_device_work() -> None:
    model = HybridLM(tiny_config(TINY))
    cache = model.new_cache(1, 3)
    model(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(UsageError, match="cache holds 3 positions"):
        cache.check_room(1)
    with pytest.raises(UsageError, match="cache holds 3 positions"):
        model(torch.tensor([[4]]), cache)


# --- GPU: graph replay equals eager ---------------------------------------------------------------


def _gpu_model(cfg_base: dict[str, object], dtype: torch.dtype, seed: int) -> HybridLM:
    model = HybridLM(tiny_config(cfg_base))
    randomize(model, seed)
    return model.to(device="cuda", dtype=dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager(dtype: torch.dtype) -> None:
    model = _gpu_model(TINY_SL, dtype, 11)
    prompt = torch.randint(0, 96, (1, 37), device="cuda")
    c_eager, c_graph = model.new_cache(1, 64), model.new_cache(1, 64)
    model(prompt, c_eager)
    model(prompt, c_graph)
    graph = DecodeGraph(model, c_graph)
    tok = 5
    for step in range(6):
        ref = model(torch.tensor([[tok]], device="cuda"), c_eager, check_ids=False)
        got = graph(tok)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        if step >= 1:
            assert graph.graph is not None  # replayed, not re-run eagerly
        tok = int(ref[0, -1].argmax())
    assert c_graph.filled == c_eager.filled == 43
    for i in model.config.layers_of("mamba"):
        torch.testing.assert_close(c_graph.mamba(i).ssm, c_eager.mamba(i).ssm, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_fused_step_equals_cpu_eager_fp32() -> None:
    cpu = HybridLM(tiny_config(TINY_SL))
    randomize(cpu, 12)
    gpu = _gpu_model(TINY_SL, torch.float32, 12)
    ids = torch.randint(0, 96, (2, 21))
    lc = cpu(ids, cpu.new_cache(2, 30))
    lg = gpu(ids.cuda(), gpu.new_cache(2, 30))
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_decode_gemv_step_equals_cpu_eager_fp32(batch: int) -> None:
    """Decode steps (1 or 2 rows: the Triton GEMV projections and lm_head) equal the CPU's F.linear path."""
    cpu = HybridLM(tiny_config(TINY_SL))
    randomize(cpu, 13)
    gpu = _gpu_model(TINY_SL, torch.float32, 13)
    ids = torch.randint(0, 96, (batch, 19))
    c_cpu, c_gpu = cpu.new_cache(batch, 30), gpu.new_cache(batch, 30)
    cpu(ids, c_cpu)
    gpu(ids.cuda(), c_gpu)
    for step in range(3):
        tok = torch.full((batch, 1), 7 + step)
        lc = cpu(tok, c_cpu)
        lg = gpu(tok.cuda(), c_gpu)
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_demo_greedy_graph_eager_cpu_equal() -> None:
    from secure_run.model.demo import demo_model_dir
    from secure_run.model.inference import load_for_inference

    demo_cpu = load_for_inference(demo_model_dir(), device="cpu", dtype="float32")
    demo_gpu = load_for_inference(demo_model_dir(), device="cuda", dtype="float32")
    prompt = demo_cpu.tokenizer.encode(demo_cpu.render_chat([{"role": "user", "content": "Who keeps the light?"}]))
    cfg = GenerationConfig(max_new_tokens=24, stop_ids=frozenset())
    graph = list(generate(demo_gpu.model, prompt, cfg))
    eager = list(generate(demo_gpu.model, prompt, GenerationConfig(max_new_tokens=24, stop_ids=frozenset(),
                                                                   cuda_graph=False)))
    cpu = list(generate(demo_cpu.model, prompt, cfg))
    assert graph == eager == cpu
