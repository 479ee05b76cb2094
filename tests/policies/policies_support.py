"""Helpers for the policies tests: small model folders and policy documents built per test."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secure_run.policies import Policy

APACHE = (Path(__file__).resolve().parents[2] / "policies/data/licenses/texts/Apache-2.0.txt").read_text()
BLOCKLIST = "# test rails\npipe bomb\nregex:\\bsarin\\b\nregex:AKIA[0-9A-Z]{16}\n"

CHATML = (
    "{%- for message in messages -%}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor -%}\n{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}\n"
)

OML_ATTRIBUTION = "Licensed by NVIDIA Corporation under the NVIDIA Open Model License"
PATENT = "Patent applications have been filed related to aspects of the methods described in this work."


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def write_files(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return folder


GUARD_FILES = ("chat_template.jinja", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def demo_like_files() -> dict[str, str | bytes]:
    """An Apache-2.0 model folder shaped like model/demo/superlinear-demo (no real weights needed)."""
    return {
        "LICENSE": APACHE,
        "NOTICE": "tiny-model\nCopyright 2026 The secure-run authors\n\nLicensed under the Apache License, Version 2.0.\n",
        "README.md": "---\nlicense: apache-2.0\ntags:\n- demo\n---\n\n# tiny-model\n\nA test model.\n",
        "chat_template.jinja": CHATML,
        "generation_config.json": json.dumps({"eos_token_id": 2, "max_new_tokens": 64, "temperature": 0.7}),
        "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}),
        "special_tokens_map.json": json.dumps({"eos_token": "<|im_end|>"}),
        "config.json": json.dumps({"model_type": "superlinear-exp", "hidden_size": 128}),
        "model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}              ",
    }


def base_policy(model_dir: Path, state: Path) -> dict[str, Any]:
    """A complete enforce-mode policy for a demo-like folder, pins computed from the folder."""

    def pin(name: str) -> str:
        return sha((model_dir / name).read_bytes())

    return {
        "apiVersion": "secure-run/v1alpha1",
        "kind": "RunPolicy",
        "metadata": {"name": "tiny-model"},
        "spec": {
            "mode": "enforce",
            "artifact": {
                "name": "tiny-model",
                "files": {
                    "allow": ["*.safetensors", "*.json", "*.jinja", "LICENSE", "NOTICE", "README.md", "model.sig"],
                    "deny": ["*.py", "*.pyc", "__pycache__/**", "*.gguf"],
                    "pinned": {"LICENSE": pin("LICENSE"), "NOTICE": pin("NOTICE")},
                },
                "card": {"license": "apache-2.0"},
            },
            "licenses": {"weights_expression": "Apache-2.0", "allowed": ["Apache-2.0", "MIT"], "denied": ["CC-BY-NC-4.0"]},
            "notices": {
                "required_files": ["LICENSE", "NOTICE"],
                "required_strings": [{"file": "NOTICE", "text": "Licensed under the Apache License, Version 2.0."}],
                "display": {"when": "session_start", "banner": "tiny-model, Apache-2.0."},
            },
            "acceptance": {"required": False, "store": str(state / "licenses.jsonl")},
            "guardrails": {
                "pinned_integrity": {name: pin(name) for name in GUARD_FILES},
                "input_filter": {"engine": "keyword", "blocklist": "rails.txt", "blocklist_sha256": sha(BLOCKLIST)},
                "output_filter": {"engine": "keyword", "blocklist": "rails.txt", "blocklist_sha256": sha(BLOCKLIST)},
                "limits": {"max_new_tokens": 256, "max_input_tokens": 1024, "max_prompt_chars": 4000, "timeout_s": 60},
                "declared_use": {"required": True, "allowed": ["research", "evaluation", "demo", "production"]},
                "audit_log": str(state / "audit.jsonl"),
            },
            "sandbox": {"network": "none"},
            "signatures": {"required": True},
        },
    }


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``patch`` into a copy of ``base``; a value of ``DELETE`` removes the key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


DELETE = object()


def oml_license_text(*, variant: str = "") -> str:
    """A LICENSE with the *structure* of the OML 2025-10-24 (spec/policy.md section 2): its title,
    the version line, the guardrail / Trustworthy-AI / Special-Purpose clauses and the section 3.1
    attribution. Not NVIDIA's wording (that is not available offline)."""
    return (
        "NVIDIA Open Model License Agreement\n\n"
        "Last Modified: October 24, 2025\n\n"
        "This structural test stand-in follows the published agreement's outline.\n\n"
        "1. Definitions.\n1.1 \"Derivative Model\" means modifications of, works based on, or derivatives of the Model.\n"
        "1.5 \"Special-Purpose Model\" means a model that is only competent in a narrow set of tasks.\n\n"
        "2. Conditions for Use, License Grant, AI Ethics and IP Ownership.\n"
        "2.1 Conditions for Use. If You bypass, disable, reduce the efficacy of, or circumvent any technical "
        "limitation, safety guardrail or associated safety guardrail hyperparameter (each a \"Guardrail\") contained "
        f"in the Model without a substantially similar Guardrail appropriate for your use case, your rights terminate.{variant}\n"
        "2.3 AI Ethics. Use of the Models must be consistent with NVIDIA's Trustworthy AI terms.\n\n"
        "3. Redistribution. You must include a \"Notice\" text file with the following attribution: "
        f"\"{OML_ATTRIBUTION}\".\n\n"
        "Version Release Date: October 24, 2025\n"
    )


def upstream_superlinear_files() -> dict[str, str | bytes]:
    """An upstream-like Superlinear-Exp-v0.1 snapshot (tiny contents, real file names and layout)."""
    return {
        "LICENSE": oml_license_text(),
        "NOTICE": (
            "Superlinear-Exp-v0.1\n\n"
            f"{OML_ATTRIBUTION}.\n\n"
            "This model is a derivative of NVIDIA Nemotron-3-Nano-30B-A3B. Modifications by Concavity AI: the "
            "attention layers were replaced by Superlinear span attention, and the model was fine-tuned on "
            "long-context retrieval.\n"
        ),
        "README.md": (
            "---\nlicense: other\nlicense_name: nvidia-open-model-license\nlicense_link: LICENSE\n"
            "library_name: transformers\npipeline_tag: text-generation\n"
            "tags:\n- long-context\n- superlinear-attention\n- subquadratic\n- causal-lm\n"
            "base_model: nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16\n---\n\n"
            "# Superlinear-Exp-v0.1\n\nIntended for research and experimentation, not production use.\n\n"
            f"## Patent Notice\n\n{PATENT}\n"
        ),
        "config.json": '{"architectures": ["SuperlinearExpForCausalLM"], "auto_map": {"AutoConfig": '
        '"configuration_superlinear_exp.SuperlinearExpConfig"}, "time_step_limit": [0.0, Infinity]}',
        "generation_config.json": json.dumps({"eos_token_id": [2, 11], "temperature": 0.6}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
        "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"}),
        "special_tokens_map.json": json.dumps({"eos_token": "<|im_end|>"}),
        "chat_template.jinja": CHATML,
        "model.safetensors.index.json": json.dumps({"metadata": {"total_size": 16}, "weight_map": {}}),
        "model-00001-of-00016.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
        "configuration_superlinear_exp.py": "class SuperlinearExpConfig: ...\n",
        "modeling_superlinear_exp.py": "import superlinear\n",
        "moe.py": "pass\n",
        "__pycache__/modeling_superlinear_exp.cpython-311.pyc": b"\xa7\r\r\n" + b"\x00" * 12,
    }



PolicyFactory = Callable[..., Policy]


def good_facts(model_dir: Path, **changes: Any) -> Any:
    """Facts of a run where everything the runner establishes is in order."""
    from secure_run.policies import GuardrailFacts, RunFacts, SandboxFacts, SignatureFacts

    base: dict[str, Any] = {
        "model_dir": model_dir,
        "signature": SignatureFacts(verified=True, signer="demo-key", digests_matched=True, root_digest="ab" * 32,
                                    lock_matched=True),
        "code_files": (),
        "sandbox": SandboxFacts(enabled=True, backend="docker", network_enabled=False, read_only_model=True),
        "guardrails": GuardrailFacts(),
        "declared_use": "research",
        "operator": "alice",
        "prompt": "Summarise the Apache licence.",
        "prompt_tokens": 12,
        "max_new_tokens": 64,
    }
    base.update(changes)
    return RunFacts(**base)


def results(decision: Any, check: str) -> list[tuple[str, str]]:
    """(result, message) of every finding of one check."""
    return [(f.result, f.message) for f in decision.findings if f.check == check]


def result(decision: Any, check: str) -> str:
    found = results(decision, check)
    assert len(found) == 1, found
    return found[0][0]
