"""Inventory: every refusal rule with the file it names, sniffing of every file, all findings at once."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from mf_helpers import snapshot, st_bytes, write_model

from secure_run.errors import UsageError
from secure_run.manifests import FileKind, FindingsError, InventoryRules, take_inventory


def rules_of(root: Path) -> list[tuple[str, str]]:
    return [(f.path, f.rule) for f in take_inventory(root).findings]


def test_clean_model_has_no_findings_and_kinds(model: Path) -> None:
    inv = take_inventory(model)
    assert inv.findings == ()
    kinds = {f.name: f.kind for f in inv.files}
    assert kinds["config.json"] is FileKind.JSON
    assert kinds["model.safetensors.index.json"] is FileKind.SHARD_INDEX
    assert kinds["model-00001-of-00002.safetensors"] is FileKind.SAFETENSORS
    assert kinds["chat_template.jinja"] is FileKind.TEMPLATE
    assert kinds["LICENSE"] is FileKind.TEXT and kinds["NOTICE"] is FileKind.TEXT
    assert set(inv.headers) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    # identities are the files' real stat values
    st = os.stat(model / "config.json")
    entry = inv.file("config.json")
    assert entry is not None and (entry.identity.ino, entry.identity.size) == (st.st_ino, st.st_size)


PICKLE = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("modeling_superlinear.py", b"import os\n", "INV-CODE"),
        ("run.sh", b"echo hi\n", "INV-CODE"),
        ("notebook.ipynb", b"{}", "INV-CODE"),
        ("evil.pyc", b"\xa7\x0d\x0d\x0a" + bytes(12), "INV-PYC"),
        ("libkernel.so", b"\x7fELF", "INV-NATIVE"),
        ("libkernel.so.1", b"\x7fELF", "INV-NATIVE"),
        ("kernel.dll", b"MZ", "INV-NATIVE"),
        ("pytorch_model.bin", PICKLE, "INV-PICKLE"),
        ("model.pt", PICKLE, "INV-PICKLE"),
        ("model.pth", PICKLE, "INV-PICKLE"),
        ("model.ckpt", PICKLE, "INV-PICKLE"),
        ("data.pkl", PICKLE, "INV-PICKLE"),
        ("data.pickle", PICKLE, "INV-PICKLE"),
        ("data.joblib", PICKLE, "INV-PICKLE"),
        ("arr.npy", b"\x93NUMPY", "INV-PICKLE"),
        ("arr.npz", b"PK\x03\x04", "INV-PICKLE"),
        ("weights.h5", b"\x89HDF\r\n\x1a\n", "INV-PICKLE"),
        ("model.keras", b"PK\x03\x04", "INV-PICKLE"),
        ("flax_model.msgpack", b"\x81", "INV-PICKLE"),
        ("model.onnx", b"\x08\x07", "INV-FORMAT"),
        ("model.gguf", b"GGUF", "INV-FORMAT"),
        ("weights.zip", b"PK\x03\x04", "INV-FORMAT"),
        ("params.yaml", b"a: 1\n", "INV-KIND"),
        ("weights.dat", b"\x00\x01", "INV-KIND"),
        ("image.png", b"\x89PNG", "INV-KIND"),
    ],
)
def test_refused_by_name(model: Path, name: str, content: bytes, rule: str) -> None:
    (model / name).write_bytes(content)
    assert (name, rule) in rules_of(model)
    with pytest.raises(FindingsError) as err:
        take_inventory(model).raise_for_findings()
    assert err.value.rule == rule and name in err.value.details[0]
    assert err.value.exit_code == 1


def test_pycache_folder_reported_once(model: Path) -> None:
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "modeling.cpython-312.pyc").write_bytes(b"\xcb\x0d\x0d\x0a" + bytes(12))
    assert rules_of(model) == [("__pycache__", "INV-PYCACHE")]


@pytest.mark.parametrize("where", [".git", "sub/.git", ".github"])
def test_version_control_folders_refused(model: Path, where: str) -> None:
    (model / where).mkdir(parents=True)
    (model / where / "HEAD").write_text("ref: refs/heads/main\n")
    assert (where, "INV-GIT") in rules_of(model)


def test_git_attribute_files_accepted_and_ignorable(model: Path) -> None:
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    inv = take_inventory(model)
    assert inv.ok
    entry = inv.file(".gitattributes")
    assert entry is not None and entry.kind is FileKind.GIT_METADATA and entry.ignorable


def test_symlink_inside_and_escaping(model: Path) -> None:
    os.symlink("config.json", model / "alias.json")
    os.symlink("../../etc/passwd", model / "escape.txt")
    os.symlink("/etc/hostname", model / "abs.txt")
    (model / "sub").mkdir()
    os.symlink("..", model / "sub" / "up")
    found = {f.path: f for f in take_inventory(model).findings}
    assert found["alias.json"].rule == "INV-SYMLINK" and "inside the folder" in found["alias.json"].message
    assert found["escape.txt"].rule == "INV-SYMLINK" and "outside the folder" in found["escape.txt"].message
    assert found["abs.txt"].rule == "INV-SYMLINK" and "outside the folder" in found["abs.txt"].message
    assert found["sub/up"].rule == "INV-SYMLINK"


def test_symlinked_directory_is_not_followed(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text("import os")
    os.symlink(outside, model / "linked")
    assert rules_of(model) == [("linked", "INV-SYMLINK")]  # evil.py behind the link is never seen


def test_root_symlink_refused_and_missing_root_is_usage(tmp_path: Path, model: Path) -> None:
    os.symlink(model, tmp_path / "link")
    with pytest.raises(FindingsError) as err:
        take_inventory(tmp_path / "link")
    assert err.value.rule == "INV-ROOT"
    with pytest.raises(UsageError) as usage:
        take_inventory(tmp_path / "nope")
    assert usage.value.exit_code == 2 and usage.value.rule == "INV-ROOT"


def test_fifo_is_special(model: Path) -> None:
    os.mkfifo(model / "pipe.json")
    assert rules_of(model) == [("pipe.json", "INV-SPECIAL")]


@pytest.mark.parametrize("mode", [0o755, 0o744, 0o4644, 0o2644, 0o1644])
def test_exec_and_special_mode_bits(model: Path, mode: int) -> None:
    os.chmod(model / "config.json", mode)
    assert rules_of(model) == [("config.json", "INV-EXEC")]


@pytest.mark.parametrize(
    "raw_name",
    [b"back\\slash.json", b"ctl\x01.json", b"bad-\xff-utf8.json", "rtl\u202egnp.json".encode(), b"trailing.json ", b" leading.json", b"zero\xe2\x80\x8bwidth.json"],
)
def test_odd_names(model: Path, raw_name: bytes) -> None:
    with open(os.path.join(os.fsencode(model), raw_name), "wb") as f:
        f.write(b"{}")
    found = take_inventory(model).findings
    assert [f.rule for f in found] == ["INV-NAME"]


MAGICS: list[tuple[str, bytes, str]] = [
    ("pickle", PICKLE, "pickle (protocol 4)"),
    ("pickle0", b"cos\nsystem\n(S'ls'\ntR.", "pickle (protocol 0/1"),
    ("zip", b"PK\x03\x04" + bytes(26), "ZIP archive"),
    ("elf", b"\x7fELF\x02\x01\x01", "ELF"),
    ("pe", b"MZ\x90\x00", "PE"),
    ("macho", b"\xcf\xfa\xed\xfe", "Mach-O"),
    ("pyc", b"\xa7\x0d\x0d\x0a" + bytes(12), "compiled Python"),
    ("shebang", b"#!/bin/sh\nrm -rf /\n", "shebang"),
    ("hdf5", b"\x89HDF\r\n\x1a\n", "HDF5"),
    ("numpy", b"\x93NUMPY\x01\x00", "NumPy"),
    ("gguf", b"GGUF\x03\x00", "GGUF"),
    ("gzip", b"\x1f\x8b\x08", "gzip"),
]


@pytest.mark.parametrize(("label", "content", "expected"), MAGICS, ids=[m[0] for m in MAGICS])
def test_magic_bytes_sniffed_in_allowlisted_names(model: Path, label: str, content: bytes, expected: str) -> None:
    (model / "tokenizer.model").write_bytes(content)  # binary kind: only the sniffer can catch it
    found = take_inventory(model).findings
    assert [(f.path, f.rule) for f in found] == [("tokenizer.model", "INV-MAGIC")]
    assert expected in found[0].message


@pytest.mark.parametrize("name", ["config.json", "README.md", "chat_template.jinja", ".gitattributes", "model.sig"])
def test_renamed_binaries_in_text_and_ignored_files(model: Path, name: str) -> None:
    (model / name).write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    found = take_inventory(model).findings
    assert (name, "INV-MAGIC") in [(f.path, f.rule) for f in found]


def test_pickle_renamed_to_safetensors(model: Path) -> None:
    (model / "model-00001-of-00002.safetensors").write_bytes(PICKLE)
    found = take_inventory(model).findings
    assert found[0].path == "model-00001-of-00002.safetensors" and found[0].rule == "ST-H2"
    assert "pickle (protocol 4)" in found[0].message


def test_zip_renamed_to_safetensors(model: Path) -> None:
    (model / "model-00001-of-00002.safetensors").write_bytes(b"PK\x03\x04" + bytes(200))
    found = take_inventory(model).findings
    assert found[0].rule == "ST-H2" and "ZIP archive" in found[0].message


@pytest.mark.parametrize(
    ("doc", "pointer", "fragment"),
    [
        ('{"auto_map": {"AutoModel": "modeling.M"}}', "/auto_map", "import code"),
        ('{"trust_remote_code": true}', "/trust_remote_code", "import code"),
        ('{"custom_pipelines": {"x": {}}}', "/custom_pipelines", "import code"),
        ('{"_attn_implementation_internal": "x"}', "/_attn_implementation_internal", "import code"),
        ('{"attn_implementation": "kernels-community/flash"}', "/attn_implementation", "CVE-2026-4372"),
        ('{"_attn_implementation": "org/repo:fn"}', "/_attn_implementation", "Hub kernel"),
        ('{"tokenizer_class": "tokenization_x.XTokenizer"}', "/tokenizer_class", "module path"),
        ('{"processor_class": "org/repo--proc.P"}', "/processor_class", "module path"),
        ('{"architectures": ["modeling.M"]}', "/architectures", "bare class names"),
        ('{"text_config": {"auto_map": {"AutoConfig": "c.C"}}}', "/text_config/auto_map", "import code"),
        ('{"list": [{"trust_remote_code": false}]}', "/list/0/trust_remote_code", "import code"),
    ],
)
def test_remote_code_pointers(model: Path, doc: str, pointer: str, fragment: str) -> None:
    (model / "config.json").write_text(doc)
    found = take_inventory(model).findings
    assert [(f.path, f.rule) for f in found] == [(f"config.json#{pointer}", "JSON-REMOTE-CODE")]
    assert fragment in found[0].message


def test_remote_code_in_tokenizer_config_and_modules_json(model: Path) -> None:
    (model / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["t.T", null]}}')
    (model / "modules.json").write_text('[{"idx": 0, "type": "custom_module.Layer"}]')
    assert rules_of(model) == [
        ("modules.json#/0/type", "JSON-REMOTE-CODE"),
        ("tokenizer_config.json#/auto_map", "JSON-REMOTE-CODE"),
    ]


def test_benign_config_values_accepted(model: Path) -> None:
    # the fixture config has Infinity and _attn_implementation "block-span-gqa"; tokenizer.json has
    # a vocabulary entry spelled "auto_map" (token tables are not scanned)
    assert take_inventory(model).ok


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (b'{"a": NaN}', "JSON-NAN"),
        (b'{"a": 1, "a": 2}', "JSON-DUPKEY"),
        (b'{"a": 1,}', "JSON-PARSE"),
        (b"\xef\xbb\xbf{}", "JSON-PARSE"),
        (b'{"a": "\xff"}', "JSON-PARSE"),
        (b"", "JSON-PARSE"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON-PARSE"),
    ],
)
def test_bad_json(model: Path, content: bytes, rule: str) -> None:
    (model / "generation_config.json").write_bytes(content)
    assert rules_of(model) == [("generation_config.json", rule)]


@pytest.mark.parametrize("content", [b"caf\xe9 latin-1\n", b"nul\x00byte\n", b"esc\x1b[31m\n"])
def test_bad_text(model: Path, content: bytes) -> None:
    (model / "README.md").write_bytes(content)
    assert rules_of(model) == [("README.md", "INV-TEXT")]


def test_all_findings_collected_in_one_error(model: Path) -> None:
    (model / "a.py").write_text("x")
    (model / "b.pkl").write_bytes(PICKLE)
    os.chmod(model / "LICENSE", 0o755)
    os.symlink("LICENSE", model / "LICENSE.txt")
    with pytest.raises(FindingsError) as err:
        take_inventory(model).raise_for_findings()
    rules = [f.rule for f in err.value.findings]
    assert sorted(rules) == ["INV-CODE", "INV-EXEC", "INV-PICKLE", "INV-SYMLINK"]
    assert len(err.value.details) == 4 and "fix every finding" in (err.value.hint or "")
    doc = err.value.to_json()
    assert {f["rule"] for f in doc["findings"]} == set(rules)  # type: ignore[union-attr]


def test_limits(model: Path) -> None:
    found = take_inventory(model, InventoryRules(max_files=3)).findings
    assert [f.rule for f in found] == ["INV-LIMIT"]
    found = take_inventory(model, InventoryRules(max_json_bytes=10)).findings
    assert {f.rule for f in found} == {"INV-LIMIT"} and any(f.path == "config.json" for f in found)


def test_extra_data_names_never_override_refusals(model: Path) -> None:
    (model / "blob").write_bytes(b"\x00\x01")
    (model / "x.py").write_text("")
    rules = InventoryRules(extra_data_names=frozenset({"blob", "x.py"}))
    assert [(f.path, f.rule) for f in take_inventory(model, rules).findings] == [("x.py", "INV-CODE")]


def test_inventory_modifies_nothing(model: Path) -> None:
    (model / "evil.py").write_text("import os")
    before = snapshot(model)
    take_inventory(model)
    assert snapshot(model) == before


def test_shard_header_failure_not_double_reported(model: Path) -> None:
    # a truncated shard: its own header rule (H13) is reported, the index does not call it missing
    path = model / "model-00002-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    assert rules_of(model) == [("model-00002-of-00002.safetensors", "ST-H13")]


def test_unreferenced_shard_and_index_total(model: Path) -> None:
    (model / "model-extra.safetensors").write_bytes(st_bytes({"x": ("F32", [1])}))
    assert ("model-extra.safetensors", "IDX-SHARD-UNREFERENCED") in rules_of(model)


def test_safetensors_without_index(tmp_path: Path) -> None:
    root = tmp_path / "single"
    root.mkdir()
    (root / "model.safetensors").write_bytes(st_bytes({"w": ("F32", [2, 2])}))
    inv = take_inventory(root)
    assert inv.ok and inv.headers["model.safetensors"].tensors["w"].shape == (2, 2)
    assert struct.unpack("<Q", (root / "model.safetensors").read_bytes()[:8])[0] == inv.headers["model.safetensors"].header_len


def test_write_model_helper_is_what_tests_assume(tmp_path: Path) -> None:
    root = write_model(tmp_path / "m", shards=3)
    inv = take_inventory(root)
    assert inv.ok and len(inv.headers) == 3


def test_every_rule_is_documented() -> None:
    from secure_run.manifests import RULES

    readme = (Path(__file__).parents[2] / "manifests" / "README.md").read_text()
    missing = [rule for rule in RULES if f"`{rule}`" not in readme]
    assert missing == []
