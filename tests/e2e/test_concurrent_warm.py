"""Concurrent completions on one warm session through a real sandbox (namespace backend, CPU demo).

Four completions run from four threads at once on one persistent worker (the worker batches their
decode); each gets the text it gets alone, one audit record each, the weights loaded once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from secure_run.runner.pipeline import Final, GenerateOptions, Text
from secure_run.runner.warm import CompletionRequest, SamplingParams, WarmSession

pytestmark = [pytest.mark.namespace, pytest.mark.slow]

PROMPTS = ("Why verify model files?", "Tell me a story.", "What is a sandbox?", "Count to five.")


def _complete(warm: WarmSession, rid: str, prompt: str, n: int) -> tuple[str, dict[str, object]]:
    sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0, max_tokens=n)
    out = list(warm.complete(CompletionRequest(request_id=rid, messages=({"role": "user", "content": prompt},),
                                               prompt=None, sampling=sampling, client="test"), threading.Event()))
    final = out[-1]
    assert isinstance(final, Final)
    return "".join(e.text for e in out if isinstance(e, Text)), final.stats


def test_concurrent_completions_equal_serial_ones(state_env: Path) -> None:
    with WarmSession.open(GenerateOptions(sandbox="namespace", dtype="float32")) as warm:
        serial = {f"s{i}": _complete(warm, f"s{i}", p, 12 + 4 * i) for i, p in enumerate(PROMPTS)}
        together: dict[str, tuple[str, dict[str, object]]] = {}
        threads = [threading.Thread(target=lambda i=i, p=p: together.__setitem__(
            f"c{i}", _complete(warm, f"c{i}", p, 12 + 4 * i))) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = warm.metrics()
    for i in range(len(PROMPTS)):
        text, stats = together[f"c{i}"]
        assert text == serial[f"s{i}"][0] and stats["completion_tokens"] == serial[f"s{i}"][1]["completion_tokens"]
    assert metrics["worker_loads_total"] == 1.0 and metrics["requests_total"] == 8.0
    records = [json.loads(line) for line in (state_env / "secure-run" / "audit.jsonl").read_text().splitlines()]
    finished = [r["run_id"] for r in records if r["event"] == "finished"]
    assert sorted(finished) == sorted([f"s{i}" for i in range(4)] + [f"c{i}" for i in range(4)])
