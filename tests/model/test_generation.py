"""Generation: greedy and seeded sampling, top-k/top-p, stop ids, limits, the worker API on the demo."""

from __future__ import annotations

import collections

import pytest
import torch

from secure_run.errors import UsageError
from secure_run.model.demo import demo_model_dir
from secure_run.model.generate import GenerationConfig, generate, sample_next
from secure_run.model.inference import InferenceModel, load_for_inference


@pytest.fixture(scope="module")
def demo() -> InferenceModel:
    return load_for_inference(demo_model_dir(), device="cpu", dtype="float32")


def _prompt(demo: InferenceModel) -> list[int]:
    return demo.tokenizer.encode(demo.render_chat([{"role": "user", "content": "Who keeps the light?"}]))


def test_greedy_equals_recomputing_from_scratch(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=frozenset())
    got = list(generate(demo.model, prompt, cfg))
    seq = list(prompt)
    for _ in range(12):  # no cache: full forward over the whole sequence every step
        seq.append(int(demo.model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    chunked = list(generate(demo.model, prompt, GenerationConfig(max_new_tokens=12, stop_ids=frozenset(),
                                                                   prefill_chunk=5)))
    assert chunked == got


def test_seeded_sampling_is_deterministic(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=7, stop_ids=frozenset())
    a = list(demo.generate(prompt, cfg))
    b = list(demo.generate(prompt, cfg))
    c = list(demo.generate(prompt, GenerationConfig(max_new_tokens=16, temperature=1.0, seed=8,
                                                    stop_ids=frozenset())))
    assert a == b and len(a) == 16
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    greedy = list(demo.generate(prompt, GenerationConfig(max_new_tokens=8, stop_ids=frozenset())))
    for cfg in (GenerationConfig(max_new_tokens=8, temperature=2.0, top_k=1, seed=3, stop_ids=frozenset()),
                GenerationConfig(max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=3, stop_ids=frozenset())):
        assert list(demo.generate(prompt, cfg)) == greedy


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    gen = torch.Generator().manual_seed(0)
    draws = collections.Counter(sample_next(logits, GenerationConfig(temperature=1.0, top_k=2), gen)
                                for _ in range(2000))
    assert set(draws) == {1, 3}
    assert abs(draws[1] / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the kept tokens
    draws = collections.Counter(sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.7), gen)
                                for _ in range(2000))
    assert set(draws) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = collections.Counter(sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen)
                                for _ in range(200))
    assert set(draws) == {1}
    draws = collections.Counter(sample_next(logits, GenerationConfig(temperature=1.0), gen) for _ in range(4000))
    assert set(draws) == {0, 1, 2, 3} and abs(draws[0] / 4000 - 0.05) < 0.02


def test_stop_ids_end_generation(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    free = list(demo.generate(prompt, GenerationConfig(max_new_tokens=10, stop_ids=frozenset())))
    stop = free[3]
    first = free.index(stop)
    out = list(demo.generate(prompt, GenerationConfig(max_new_tokens=10, stop_ids=frozenset({stop}))))
    assert out == free[:first + 1]  # the stop id is yielded, then nothing
    # the folder's stop ids (generation_config eos [2, 5]) apply by default
    assert demo.tokenizer.stop_ids == frozenset({2, 5})
    out = list(generate(demo.model, prompt, GenerationConfig(max_new_tokens=10), stop_ids=frozenset({free[0]})))
    assert out == [free[0]]


def test_max_new_tokens(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    for n in (1, 5):
        assert len(list(demo.generate(prompt, GenerationConfig(max_new_tokens=n, stop_ids=frozenset())))) == n


@pytest.mark.parametrize(
    "kw",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1},
     {"top_p": 0.0}, {"top_p": 1.5}, {"prefill_chunk": 0}],
)
def test_generation_config_validated(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError) as info:
        GenerationConfig(**kw)  # type: ignore[arg-type]
    assert info.value.rule == "generate.config"


def test_bad_prompt_and_cache(demo: InferenceModel) -> None:
    with pytest.raises(UsageError) as info:
        list(demo.generate([]))
    assert info.value.rule == "generate.prompt"
    cache = demo.model.new_cache(1, 32)
    demo.model(torch.tensor([[1, 2]]), cache)
    with pytest.raises(UsageError) as info:
        list(generate(demo.model, [1, 2], GenerationConfig(), cache=cache))
    assert info.value.rule == "generate.cache"


def test_worker_api_streams_text(demo: InferenceModel) -> None:
    prompt = _prompt(demo)
    ids = list(demo.generate(prompt, GenerationConfig(max_new_tokens=20, temperature=0.9, seed=1,
                                                      stop_ids=frozenset())))
    pieces = list(demo.decode_stream(ids))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == demo.tokenizer.decode(ids, skip_special_tokens=True)


def test_load_for_inference_dtype_names() -> None:
    with pytest.raises(UsageError) as info:
        load_for_inference(demo_model_dir(), dtype="float8")
    assert info.value.rule == "model.dtype"
    m = load_for_inference(demo_model_dir(), dtype="bf16")
    assert m.model.dtype == torch.bfloat16
    out = list(m.generate(_prompt(m), GenerationConfig(max_new_tokens=3, stop_ids=frozenset())))
    assert len(out) == 3 and all(0 <= t < 512 for t in out)
