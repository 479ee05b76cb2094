"""The warm session on a GPU (markers ``gpu`` and ``namespace``; the GPU host has no Docker engine
of its own): one persistent sandbox with ``--gpu``, the demo loaded once on CUDA, two chat turns of
one conversation (the second prefills only the new message; the decode runs as the worker's batched
CUDA-graph step over its slot pool), and greedy fp32 tokens equal to the same turn on the CPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from secure_run.runner.pipeline import Final, GenerateOptions, Text
from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

pytestmark = [pytest.mark.gpu, pytest.mark.namespace, pytest.mark.slow]

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=24)
TURN1 = ({"role": "user", "content": "Why verify model files before loading them?"},)


def _turn(warm: WarmSession, rid: str, messages: tuple[dict[str, str], ...]) -> tuple[str, dict[str, object]]:
    out = list(warm.complete(CompletionRequest(request_id=rid, messages=messages, prompt=None, sampling=GREEDY,
                                               client="gpu-test", session_id="s1"), threading.Event()))
    final = out[-1]
    assert isinstance(final, Final)
    return "".join(e.text for e in out if isinstance(e, Text)), final.stats


def test_warm_chat_on_the_gpu_loads_once_reuses_the_cache_and_matches_the_cpu(state_env: Path) -> None:
    gpu = GenerateOptions(sandbox="namespace", gpu=True, dtype="float32")
    with WarmSession.open(gpu) as warm:
        text1, first = _turn(warm, "g1", TURN1)
        turn2 = (*TURN1, {"role": "assistant", "content": text1}, {"role": "user", "content": "And then?"})
        _, second = _turn(warm, "g2", turn2)
        metrics = warm.metrics()
    assert metrics["worker_loads_total"] == 1.0
    assert first["completion_tokens"] and second["completion_tokens"]
    assert first["reused_tokens"] == 0
    assert isinstance(second["prefilled_tokens"], int) and isinstance(second["prompt_tokens"], int)
    assert 0 < second["prefilled_tokens"] < second["prompt_tokens"] // 2

    with WarmSession.open(GenerateOptions(sandbox="namespace", dtype="float32")) as cpu:
        cpu_text1, _ = _turn(cpu, "c1", TURN1)
    assert text1 == cpu_text1  # greedy fp32: the same tokens on CUDA (graph decode) and on the CPU
