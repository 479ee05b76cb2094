"""The small API the in-sandbox worker uses: load a verified folder, render a chat, stream tokens.

    >>> from secure_run.model.demo import demo_model_dir
    >>> m = load_for_inference(demo_model_dir(), device="cpu")
    >>> ids = m.tokenizer.encode(m.render_chat([{"role": "user", "content": "Hello"}]))
    >>> out = list(m.generate(ids, GenerationConfig(max_new_tokens=4)))
    >>> len(out) <= 4
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secure_run.model.checkpoint import AttentionNameMap
from secure_run.model.generate import GenerationConfig, generate
from secure_run.model.loader import FileIdentity, load_model
from secure_run.model.model import HybridLM
from secure_run.model.tokenizer import IncrementalDecoder, ModelTokenizer

__all__ = ["InferenceModel", "load_for_inference"]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class InferenceModel:
    """A loaded model with its tokenizer."""

    model: HybridLM
    tokenizer: ModelTokenizer

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = True) -> str:
        """The prompt text for ``messages`` (sandboxed chat template)."""
        text: str = self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                               enable_thinking=enable_thinking)
        return text

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig | None = None) -> Iterator[int]:
        """Stream generated token ids; stops at the folder's stop ids unless ``config.stop_ids`` is set."""
        stream: Iterator[int] = generate(self.model, prompt_ids, config or GenerationConfig(),
                                         stop_ids=self.tokenizer.stop_ids)
        return stream

    def decode_stream(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> Iterator[str]:
        """Text pieces of a token stream, never splitting a multi-byte character."""
        pieces: Iterator[str] = IncrementalDecoder(self.tokenizer, skip_special_tokens=skip_special_tokens).feed_all(ids)
        return pieces


def load_for_inference(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    file_identities: Mapping[str, FileIdentity | os.stat_result | object] | None = None,
    name_map: AttentionNameMap | None = None,
) -> InferenceModel:
    """Load a (verified) model folder and its tokenizer.

    Args:
        model_dir: the model folder.
        device: "cpu", "cuda", "cuda:1", ...
        dtype: torch dtype or its name ("bfloat16", "float16", "float32"); default: the checkpoint's.
        file_identities: shard name -> verified identity (see :func:`~secure_run.model.loader.load_model`).
        name_map: checkpoint names of the attention projections (default: from config.json).
    """
    if isinstance(dtype, str):
        from secure_run.errors import UsageError

        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", rule="model.dtype", hint=f"use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    model = load_model(model_dir, device=device, dtype=dtype, name_map=name_map, file_identities=file_identities)
    return InferenceModel(model=model, tokenizer=ModelTokenizer.from_dir(model_dir))
