"""The embedded demo model: deterministic build, committed bytes reproduced, complete folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from secure_run.model.config import load_config
from secure_run.model.demo import demo_model_dir
from secure_run.model.demo.build import SHARDS, build, main

EXPECTED_FILES = {
    "LICENSE", "NOTICE", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
}
#: files the lead may add to the committed folder after building it (signing)
ADDED_LATER = {"model.sig"}
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"  # apache.org LICENSE-2.0.txt


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "superlinear-demo"
    assert {p.name for p in build(out)} == EXPECTED_FILES
    return out


def test_rebuild_reproduces_the_committed_folder(built: Path) -> None:
    committed = _digests(demo_model_dir())
    assert set(committed) - ADDED_LATER == EXPECTED_FILES
    assert {k: v for k, v in committed.items() if k not in ADDED_LATER} == _digests(built)


def test_build_is_deterministic_across_processes(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "secure_run.model.demo.build", str(out)],
                          capture_output=True, text=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert _digests(out) == _digests(built)
    build(out)  # rebuilding over an existing folder changes nothing
    assert _digests(out) == _digests(built)


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2 and main(["-h"]) == 2
    assert "usage" in capsys.readouterr().err


def test_folder_contents(built: Path) -> None:
    assert not any(p.suffix in (".py", ".pyc") for p in built.rglob("*"))
    total = sum(p.stat().st_size for p in built.iterdir())
    assert 1_000_000 < total < 8_000_000  # "a few MB"
    assert hashlib.sha256((built / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    readme = (built / "README.md").read_text()
    assert readme.startswith("---\nlicense: apache-2.0\n") and "random" in readme.lower()
    assert "gibberish" in readme
    assert "Apache License, Version 2.0" in (built / "NOTICE").read_text()
    assert "Infinity" in (built / "config.json").read_text()  # exercises the upstream literal


def test_config_has_every_block_kind_and_a_small_window(built: Path) -> None:
    cfg = load_config(built)
    assert cfg.model_type == "superlinear-exp" and cfg.secure_run_search_proj == "q_search_proj"
    assert {"mamba", "moe", "attention"} <= set(cfg.layer_types)
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA
    assert cfg.head_dim >= 16 and cfg.head_dim & (cfg.head_dim - 1) == 0
    p = cfg.span_params()
    assert p.num_spans in (2, 3) and p.window_len == 6  # anchors exist from the 8th token on


def test_safetensors_files_are_canonical(built: Path) -> None:
    index = json.loads((built / "model.safetensors.index.json").read_text())
    total = 0
    for shard in SHARDS:
        raw = (built / shard).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        assert header.pop("__metadata__") == {"format": "pt"}
        assert list(header) == sorted(header)
        with safe_open(str(built / shard), framework="pt") as f:
            assert set(f.keys()) == set(header)
            assert all(index["weight_map"][k] == shard for k in f.keys())
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert index["metadata"]["total_size"] == total
