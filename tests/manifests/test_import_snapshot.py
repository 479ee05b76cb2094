"""`import`: clean copy of an upstream-like snapshot (real upstream file names), then sign + verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mf_helpers import CONFIG_JSON, snapshot, st_bytes, write_model

from secure_run.errors import UsageError
from secure_run.manifests import (
    FindingsError,
    KeyTrust,
    import_snapshot,
    inspect_model,
    sign_model,
    take_inventory,
    verify_model,
)

UPSTREAM_CONFIG = CONFIG_JSON.replace(
    '  "architectures": [',
    '  "auto_map": {\n    "AutoConfig": "configuration_superlinear_exp.SuperlinearExpConfig",\n'
    '    "AutoModelForCausalLM": "modeling_superlinear_exp.SuperlinearExpForCausalLM"\n  },\n  "architectures": [',
)
UPSTREAM_TOKENIZER_CONFIG = '{\n  "auto_map": {"AutoTokenizer": ["tokenization_x.T", null]},\n  "tokenizer_class": "PreTrainedTokenizerFast"\n}\n'


def upstream_snapshot(root: Path) -> Path:
    """Like the Hugging Face repo of Superlinear-Exp-v0.1 (tiny shards, real file names)."""
    write_model(root)
    (root / "config.json").write_text(UPSTREAM_CONFIG)
    (root / "tokenizer_config.json").write_text(UPSTREAM_TOKENIZER_CONFIG)
    (root / "modeling_superlinear_exp.py").write_text("import torch\n")
    (root / "configuration_superlinear_exp.py").write_text("class C: pass\n")
    (root / "moe.py").write_text("")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "modeling_superlinear_exp.cpython-312.pyc").write_bytes(b"\xcb\x0d\x0d\x0a" + bytes(12))
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (root / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("abc\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (root / "assets").mkdir()
    (root / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n")
    return root


def test_import_upstream_snapshot_then_sign_and_verify(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    src = upstream_snapshot(tmp_path / "snapshot")
    before = snapshot(src)
    dest = tmp_path / "clean"
    report = import_snapshot(src, dest)
    assert snapshot(src) == before  # the source is only read

    kept = {k.name for k in report.kept}
    assert kept == {
        "LICENSE", "NOTICE", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    }  # fmt: skip
    dropped = {(d.name, d.rule) for d in report.dropped}
    assert dropped == {
        (".cache/", "IMP-CACHE"),
        (".git/", "INV-GIT"),
        (".gitattributes", "INV-GIT"),
        ("__pycache__/", "INV-PYCACHE"),
        ("assets/logo.png", "INV-KIND"),
        ("configuration_superlinear_exp.py", "INV-CODE"),
        ("modeling_superlinear_exp.py", "INV-CODE"),
        ("moe.py", "INV-CODE"),
        ("pytorch_model.bin", "INV-PICKLE"),
    }
    # config.json: exactly the auto_map member removed; Infinity and every other byte kept
    assert (dest / "config.json").read_text() == CONFIG_JSON
    stripped = {(s.file, s.pointer, s.byte_preserving) for s in report.stripped}
    assert stripped == {("config.json", "/auto_map", True), ("tokenizer_config.json", "/auto_map", True)}
    assert (dest / "tokenizer_config.json").read_text() == '{\n  "tokenizer_class": "PreTrainedTokenizerFast"\n}\n'
    # shards are byte-identical copies with normal modes
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "LICENSE"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
        assert (dest / name).stat().st_mode & 0o777 == 0o644
    # the report is in DEST, is what was returned, and names no absolute path
    doc = json.loads((dest / "import-report.json").read_text())
    assert doc == json.loads(json.dumps(report.to_json()))
    assert doc["schema"] == "secure-run/import-report/v1" and doc["source"] == "snapshot"
    assert str(tmp_path) not in (dest / "import-report.json").read_text()
    config_entry = next(k for k in doc["kept"] if k["name"] == "config.json")
    assert config_entry["modified"] and config_entry["source_sha256"] != config_entry["sha256"]

    assert take_inventory(dest).ok
    sign_model(dest, keys[0])
    result = verify_model(dest, KeyTrust.from_file(keys[1]))
    assert "import-report.json" in [f.name for f in result.files]  # the report is signed too


def test_dest_must_be_new_or_empty(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine\n")
    with pytest.raises(UsageError) as err:
        import_snapshot(src, dest)
    assert err.value.rule == "IMP-DEST" and err.value.exit_code == 2
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    (dest / "keep.txt").unlink()
    import_snapshot(src, dest)  # an existing empty folder is fine
    with pytest.raises(UsageError) as err:
        import_snapshot(src, src / "inside")
    assert err.value.rule == "IMP-DEST"


def test_symlinks_refused_unless_dereferenced(tmp_path: Path) -> None:
    # a Hugging Face cache snapshot: links point into the repository's blobs/ folder
    src = write_model(tmp_path / "models--org--m" / "snapshots" / "rev1")
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir()
    (src / "LICENSE").rename(blobs / "abc123")
    os.symlink(blobs / "abc123", src / "LICENSE")
    os.symlink("/etc/passwd", src / "passwd.py")  # a link to a refused kind is just dropped
    with pytest.raises(FindingsError) as err:
        import_snapshot(src, tmp_path / "d1")
    assert err.value.rule == "INV-SYMLINK" and "--dereference" in err.value.findings[0].hint
    assert not (tmp_path / "d1").exists()  # nothing left behind
    report = import_snapshot(src, tmp_path / "d2", dereference=True)
    assert (tmp_path / "d2" / "LICENSE").read_text() == "Demo licence text.\n"
    assert not (tmp_path / "d2" / "LICENSE").is_symlink()
    assert any("LICENSE" in n and "--dereference" in n for n in report.notes)
    assert ("passwd.py", "INV-CODE") in {(d.name, d.rule) for d in report.dropped}


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("model-00001-of-00002.safetensors", b"\x80\x04\x95" + bytes(40), "ST-H2"),
        ("model-00002-of-00002.safetensors", st_bytes({"layers.1.w": ("BF16", [4, 8])}) + b"x", "ST-H13"),
        ("config.json", b'{"a": NaN}', "JSON-NAN"),
        ("README.md", b"\x7fELF\x02", "INV-MAGIC"),
        ("LICENSE", b"caf\xe9\n", "INV-TEXT"),
    ],
)
def test_content_failures_refuse_the_whole_import(tmp_path: Path, name: str, content: bytes, rule: str) -> None:
    src = write_model(tmp_path / "src")
    (src / name).write_bytes(content)
    with pytest.raises(FindingsError) as err:
        import_snapshot(src, tmp_path / "dest")
    assert (err.value.findings[0].path, err.value.rule) == (name, rule)
    assert not (tmp_path / "dest").exists()


def test_index_mismatch_refuses(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 1
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FindingsError) as err:
        import_snapshot(src, tmp_path / "dest")
    assert err.value.rule == "IDX-TOTAL-SIZE"
    assert not (tmp_path / "dest").exists()


def test_nested_remote_code_is_reserialized(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src")
    (src / "config.json").write_text('{"model_type": "x", "text_config": {"auto_map": {"A": "m.M"}, "v": Infinity}}')
    report = import_snapshot(src, tmp_path / "dest")
    assert [(s.pointer, s.byte_preserving) for s in report.stripped] == [("/text_config/auto_map", False)]
    assert (tmp_path / "dest" / "config.json").read_text() == '{\n  "model_type": "x",\n  "text_config": {\n    "v": Infinity\n  }\n}\n'


def test_exec_bits_are_normalized(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src")
    os.chmod(src / "README.md", 0o755)
    report = import_snapshot(src, tmp_path / "dest")
    readme = next(k for k in report.kept if k.name == "README.md")
    assert readme.mode_normalized and (tmp_path / "dest" / "README.md").stat().st_mode & 0o777 == 0o644
    assert take_inventory(tmp_path / "dest").ok


def test_inspect_upstream_snapshot_and_clean_copy(tmp_path: Path) -> None:
    src = upstream_snapshot(tmp_path / "snapshot")
    report = inspect_model(src)
    rules = {f.rule for f in report.findings}
    assert {"INV-CODE", "INV-PYCACHE", "INV-GIT", "INV-PICKLE", "JSON-REMOTE-CODE", "INV-KIND"} <= rules
    assert report.config is not None and report.config["model_type"] == "superlinear-exp"
    assert [p["pointer"] for p in report.config["remote_code"]] == ["/auto_map"]
    assert report.config["_attn_implementation"] == "block-span-gqa"
    assert report.tokenizer is not None and report.tokenizer["remote_code"][0]["pointer"] == "/auto_map"
    doc = report.to_json()
    assert doc["tensors"]["by_dtype"] == {"BF16": {"count": 2, "elements": 64, "bytes": 128}, "F32": {"count": 2, "elements": 16, "bytes": 64}}
    assert doc["tensors"]["by_shard"]["model-00001-of-00002.safetensors"] == {"tensors": 2, "bytes": 96}
    assert next(f for f in doc["files"] if f["name"] == "moe.py")["refused"] is True
    assert doc["licence_files"] == ["LICENSE", "NOTICE"]
    assert doc["signature"] is None
    import_snapshot(src, tmp_path / "clean")
    clean = inspect_model(tmp_path / "clean")
    assert clean.findings == () and clean.config is not None and clean.config["remote_code"] == []


def test_inspect_reports_unverified_signature(signed: Path) -> None:
    sig = inspect_model(signed).signature
    assert sig is not None and sig["verified"] is False and sig["method"] == "key" and sig["resources"] == 12
    (signed / "model.sig").write_text("{}")
    sig = inspect_model(signed).signature
    assert sig is not None and "mediaType" in sig["error"]
