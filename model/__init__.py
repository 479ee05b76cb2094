"""The vendored hybrid model (Mamba-2 + Superlinear attention + MoE) in plain PyTorch.

The public surface is small; it is imported lazily so that ``secure_run.model.config`` (used by
``secure-run inspect``) never pulls in torch:

    >>> from secure_run.model import GenerationConfig, load_for_inference
    >>> from secure_run.model.demo import demo_model_dir
    >>> m = load_for_inference(demo_model_dir(), device="cpu", dtype="float32")
    >>> prompt = m.tokenizer.encode(m.render_chat([{"role": "user", "content": "Hi!"}]))
    >>> ids = list(m.generate(prompt, GenerationConfig(max_new_tokens=8, temperature=0.7, seed=1)))
    >>> text = "".join(m.decode_stream(ids))   # random demo weights: gibberish, by design

Modules: ``config`` (schema, no torch), ``checkpoint`` (expected tensor table and attention
name map, no torch), ``loader`` (strict safetensors loading), ``model`` / ``mamba2`` / ``moe`` /
``attention`` / ``norms`` / ``cache`` (the network), ``tokenizer`` (tokenizer + sandboxed chat
template), ``generate`` (sampling loop), ``inference`` (the worker API), ``demo`` (tiny demo model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_run.model.checkpoint import AttentionNameMap
    from secure_run.model.config import ModelConfig, load_config
    from secure_run.model.generate import GenerationConfig
    from secure_run.model.inference import InferenceModel, load_for_inference
    from secure_run.model.loader import FileIdentity, load_model

__all__ = [
    "AttentionNameMap",
    "FileIdentity",
    "GenerationConfig",
    "InferenceModel",
    "ModelConfig",
    "load_config",
    "load_for_inference",
    "load_model",
]

_WHERE = {
    "AttentionNameMap": "checkpoint",
    "ModelConfig": "config",
    "load_config": "config",
    "GenerationConfig": "generate",
    "InferenceModel": "inference",
    "load_for_inference": "inference",
    "FileIdentity": "loader",
    "load_model": "loader",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"secure_run.model.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'secure_run.model' has no attribute {name!r}")
