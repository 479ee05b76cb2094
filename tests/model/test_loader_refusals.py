"""Strict loader: exact tensor table, refusals that list names, file identity and TOCTOU checks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_helpers import TINY, TINY_SL, random_state, tiny_config
from safetensors.torch import load_file, save_file

from secure_run.errors import ModelError
from secure_run.model import loader as loader_mod
from secure_run.model.checkpoint import AttentionNameMap, checkpoint_to_internal, name_map_for
from secure_run.model.loader import FileIdentity, load_model

Factory = Callable[..., Path]


def _refused(path: Path, **kw: object) -> ModelError:
    with pytest.raises(ModelError) as info:
        load_model(path, **kw)  # type: ignore[arg-type]
    return info.value


def _state(cfg: dict[str, object] = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(tiny_config(cfg), seed)


@pytest.mark.parametrize("shards", [1, 3])
def test_loads_every_tensor_exactly(folder_factory: Factory, shards: int) -> None:
    state = _state(TINY_SL)
    model = load_model(folder_factory(TINY_SL, state, shards=shards))
    cfg = model.config
    names = name_map_for(cfg)
    loaded = model.state_dict()
    assert len(loaded) == len(state)
    for name, t in state.items():
        torch.testing.assert_close(loaded[checkpoint_to_internal(cfg, names, name)], t, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_missing_tensor(folder_factory: Factory) -> None:
    state = _state()
    del state["backbone.layers.3.mixer.experts.5.up_proj.weight"]
    err = _refused(folder_factory(TINY, state))
    assert err.rule == "loader.missing"
    assert "backbone.layers.3.mixer.experts.5.up_proj.weight" in err.details


def test_extra_tensor(folder_factory: Factory) -> None:
    state = _state()
    state["backbone.layers.0.mixer.backdoor"] = torch.zeros(3)
    state["lm_head.bias"] = torch.zeros(TINY["vocab_size"])  # type: ignore[arg-type]
    err = _refused(folder_factory(TINY, state))
    assert err.rule == "loader.extra"
    assert {"backbone.layers.0.mixer.backdoor", "lm_head.bias"} <= set(err.details)


def test_unmapped_attention_tensor_without_a_name_map(folder_factory: Factory) -> None:
    # a superlinear checkpoint whose config does not say what the search projection is called
    cfg = TINY_SL | {"secure_run_search_proj": None}
    path = folder_factory(cfg, _state(TINY_SL))
    err = _refused(path)
    assert err.rule == "loader.unmapped"
    assert err.details[1:] == ("backbone.layers.1.mixer.q_search_proj.weight",
                               "backbone.layers.6.mixer.q_search_proj.weight")
    assert "secure_run_search_proj" in (err.hint or "") and "spec/" not in (err.hint or "")
    model = load_model(path, name_map=AttentionNameMap(search_query="q_search_proj"))  # explicit map: loads
    assert model.config.superlinear


def test_unknown_search_projection_name_is_mapped_explicitly(folder_factory: Factory) -> None:
    state = {k.replace("q_search_proj", "q1_proj"): v for k, v in _state(TINY_SL).items()}
    path = folder_factory(TINY_SL, state)
    err = _refused(path)
    assert err.rule == "loader.unmapped" and "backbone.layers.6.mixer.q1_proj.weight" in err.details
    model = load_model(path, name_map=AttentionNameMap(search_query="q1_proj"))
    torch.testing.assert_close(model.backbone.layers[6].mixer.q_search_proj.weight,
                               state["backbone.layers.6.mixer.q1_proj.weight"])


def test_missing_search_projection(folder_factory: Factory) -> None:
    state = {k: v for k, v in _state(TINY_SL).items() if "q_search_proj" not in k}
    err = _refused(folder_factory(TINY_SL, state))
    assert err.rule == "loader.missing"
    assert "backbone.layers.1.mixer.q_search_proj.weight" in err.details


def test_wrong_shape(folder_factory: Factory) -> None:
    state = _state()
    state["backbone.layers.0.mixer.conv1d.weight"] = torch.zeros(128, 1, 3)
    err = _refused(folder_factory(TINY, state))
    assert err.rule == "loader.shape"
    assert err.details == ("backbone.layers.0.mixer.conv1d.weight: got [128, 1, 3], expected [128, 1, 4]",)


def test_wrong_dtype(folder_factory: Factory) -> None:
    state = _state()
    state["backbone.layers.2.mixer.in_proj.weight"] = state["backbone.layers.2.mixer.in_proj.weight"].bfloat16()
    state["backbone.layers.3.mixer.gate.e_score_correction_bias"] = torch.zeros(8, dtype=torch.float16)
    err = _refused(folder_factory(TINY, state))
    assert err.rule == "loader.dtype"
    assert "backbone.layers.2.mixer.in_proj.weight: got BF16, expected F32" in err.details
    assert "backbone.layers.3.mixer.gate.e_score_correction_bias: got F16, expected F32" in err.details


def test_bf16_checkpoint_may_keep_small_vectors_in_fp32(folder_factory: Factory) -> None:
    cfg = TINY | {"torch_dtype": "bfloat16"}
    state = random_state(tiny_config(cfg), 0, dtype=torch.bfloat16)
    state["backbone.layers.0.mixer.A_log"] = state["backbone.layers.0.mixer.A_log"].float()
    state["backbone.layers.3.mixer.gate.weight"] = state["backbone.layers.3.mixer.gate.weight"].float()
    model = load_model(folder_factory(cfg, state))
    assert model.dtype == torch.bfloat16
    state["backbone.layers.0.mixer.in_proj.weight"] = state["backbone.layers.0.mixer.in_proj.weight"].float()
    assert _refused(folder_factory(cfg, state)).rule == "loader.dtype"


def test_config_and_weights_disagree(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state())
    (path / "config.json").write_text(json.dumps(TINY | {"vocab_size": 100}))
    err = _refused(path)
    assert err.rule == "loader.shape" and "config.json and the weights disagree" in (err.hint or "")
    assert set(err.details) == {"backbone.embeddings.weight: got [96, 64], expected [100, 64]",
                                "lm_head.weight: got [96, 64], expected [100, 64]"}
    (path / "config.json").write_text(json.dumps(TINY | {"hybrid_override_pattern": "M*ME-M*M"}))
    err = _refused(path)  # layer 7 is MoE in the weights, Mamba in the config
    assert err.rule == "loader.unmapped" or err.rule == "loader.missing"
    assert any("backbone.layers.7.mixer" in d for d in err.details)


def test_index_must_match_headers(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(idx["weight_map"])[0]
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    idx["weight_map"][first] = other[idx["weight_map"][first]]
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    err = _refused(path)
    assert err.rule == "loader.index" and any(first in d for d in err.details)


@pytest.mark.parametrize("shard", ["../escape.safetensors", "sub/x.safetensors", "x.bin", ".hidden.safetensors"])
def test_index_names_plain_safetensors_files_only(folder_factory: Factory, shard: str) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"][sorted(idx["weight_map"])[0]] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert _refused(path).rule == "loader.index"


def test_index_with_repeated_keys_refused(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    text = (path / "model.safetensors.index.json").read_text()
    (path / "model.safetensors.index.json").write_text(text.replace('"weight_map": {', '"weight_map": {"a": "b.safetensors", "a": "c.safetensors", ', 1))
    assert _refused(path).rule == "loader.index"


def test_missing_shard(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    err = _refused(path)
    assert err.rule == "loader.shard-missing" and err.path == "model-00002-of-00002.safetensors"


def test_tensor_in_two_shards(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    a = load_file(str(path / "model-00001-of-00002.safetensors"))
    b = load_file(str(path / "model-00002-of-00002.safetensors"))
    name = sorted(a)[0]
    save_file(b | {name: a[name]}, str(path / "model-00002-of-00002.safetensors"))
    err = _refused(path)
    assert err.rule == "loader.duplicate" and name in err.details[0]


def test_symlinked_shard_refused(folder_factory: Factory, tmp_path: Path) -> None:
    path = folder_factory(TINY, _state())
    real = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(real)
    (path / "model.safetensors").symlink_to(real)
    assert _refused(path).rule == "loader.shard-open"


def test_no_weights_and_corrupt_header(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state())
    (path / "model.safetensors").unlink()
    assert _refused(path).rule == "loader.no-weights"
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    err = _refused(path)
    assert err.rule == "loader.header" and any("[ST-H2]" in d for d in err.details), err.details


def _raw_shard(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


@pytest.mark.parametrize(
    ("header", "data", "rule"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "ST-H10"),  # overlap
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8) + b"PK\x05\x06", "ST-H13"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "ST-H11"),
    ],
)
def test_malformed_headers_use_the_strict_manifests_check(folder_factory: Factory, header: dict[str, object],
                                                          data: bytes, rule: str) -> None:
    path = folder_factory(TINY, _state())
    (path / "model.safetensors").write_bytes(_raw_shard(header, data))
    err = _refused(path)
    assert err.rule == "loader.header" and any(f"[{rule}]" in d for d in err.details), err.details


def test_truncated_while_reading(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_factory(TINY, _state())
    real_fill = loader_mod._fill

    def truncate_then_fill(*args: object, **kw: object) -> None:
        os.truncate(path / "model.safetensors", 4096)
        real_fill(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(loader_mod, "_fill", truncate_then_fill)
    assert _refused(path).rule == "loader.changed"


def test_file_identities(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state(), shards=2)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    ids = {s: os.stat(path / s) for s in shards}
    load_model(path, file_identities=ids)  # stat results are accepted and match
    good = {s: FileIdentity.from_stat(st) for s, st in ids.items()}
    load_model(path, file_identities=good)
    wrong = dict(good)
    g = good[shards[1]]
    wrong[shards[1]] = FileIdentity(g.dev, g.ino, g.size + 1, g.mtime_ns, g.ctime_ns)
    err = _refused(path, file_identities=wrong)
    assert err.rule == "loader.identity" and err.path == shards[1]
    err = _refused(path, file_identities={shards[0]: good[shards[0]]})
    assert err.rule == "loader.identity" and shards[1] in err.details


def test_manifests_identities_and_ctime(folder_factory: Factory) -> None:
    from secure_run.manifests import FileIdentity as VerifiedIdentity

    path = folder_factory(TINY, _state())
    shard = path / "model.safetensors"
    verified = {"model.safetensors": VerifiedIdentity.from_stat(os.stat(shard))}
    load_model(path, file_identities=verified)  # the manifests' identity type is accepted
    # edit the file in place and restore its mtime: dev, ino, size and mtime match, ctime does not
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(st.st_size - 4)
        f.write(b"\x00\x00\x80\x7f")  # the last float becomes +inf
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(shard)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    err = _refused(path, file_identities=verified)
    assert err.rule == "loader.identity"
    # one identity type: ctime is always part of it (no four-field identity is accepted)
    err = _refused(path, file_identities={"model.safetensors": (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)})
    assert err.rule == "loader.identity"
    assert FileIdentity is VerifiedIdentity


def test_shard_replaced_after_verification(folder_factory: Factory) -> None:
    path = folder_factory(TINY, _state())
    ident = {"model.safetensors": os.stat(path / "model.safetensors")}
    other = path.parent / "other.safetensors"
    save_file({k: v + 1 for k, v in _state().items()}, str(other))
    os.replace(other, path / "model.safetensors")  # same name, different file
    assert _refused(path, file_identities=ident).rule == "loader.identity"


def test_file_changed_while_reading(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_factory(TINY, _state())
    real_fill = loader_mod._fill

    def fill_then_touch(*args: object, **kw: object) -> None:
        real_fill(*args, **kw)  # type: ignore[arg-type]
        st = os.stat(path / "model.safetensors")
        os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    monkeypatch.setattr(loader_mod, "_fill", fill_then_touch)
    assert _refused(path).rule == "loader.changed"


def test_swapping_the_name_mid_load_is_refused(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # replace the directory entry after the headers were checked: the loader reads through the
    # descriptor it opened (never the new file) and the unlink of the verified file changes its
    # ctime, so the load is refused instead of mixing two files
    state = _state()
    path = folder_factory(TINY, state)
    real_fill = loader_mod._fill
    seen: list[torch.Tensor] = []

    def swap_then_fill(model: torch.nn.Module, *args: object, **kw: object) -> None:
        other = path.parent / "evil.safetensors"
        save_file({k: torch.full_like(v, 7.0) for k, v in state.items()}, str(other))
        os.replace(other, path / "model.safetensors")
        real_fill(model, *args, **kw)  # type: ignore[arg-type]
        seen.append(model.lm_head.weight.detach().clone())  # type: ignore[union-attr]

    monkeypatch.setattr(loader_mod, "_fill", swap_then_fill)
    assert _refused(path).rule == "loader.changed"
    torch.testing.assert_close(seen[0], state["lm_head.weight"], rtol=0, atol=0)  # the bytes read were the verified ones


def test_verified_tables_must_match(folder_factory: Factory) -> None:
    state = _state()
    path = folder_factory(TINY, state)
    table = {"model.safetensors": {n: ("F32", tuple(t.shape)) for n, t in state.items()}}
    load_model(path, verified_tables=table)
    table["model.safetensors"]["lm_head.weight"] = ("F32", (1, 1))
    assert _refused(path, verified_tables=table).rule == "loader.verified-table"


def test_verified_headers_from_manifests(folder_factory: Factory) -> None:
    from secure_run.manifests import read_safetensors_header

    state = _state()
    path = folder_factory(TINY, state, shards=2)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    verified = {s: read_safetensors_header(path / s, s) for s in shards}
    load_model(path, verified_tables=verified)
    # same names, dtypes, shapes and data, but other header metadata (and so other offsets)
    a = load_file(str(path / shards[0]))
    save_file(a, str(path / shards[0]), metadata={"format": "pt", "note": "rewritten"})
    err = _refused(path, verified_tables=verified)
    assert err.rule == "loader.verified-table" and shards[0] in err.details


def test_never_unpickles(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("pickle / torch.load must never be used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    load_model(folder_factory(TINY_SL, _state(TINY_SL)))


# --- reading through the verified folder ----------------------------------------------------------


def _pinned(path: Path) -> list[object]:
    import hashlib

    from secure_run.manifests.folder import PinnedFile

    return [PinnedFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), FileIdentity.from_stat(os.lstat(p)))
            for p in sorted(path.iterdir())]


def test_index_symlink_is_not_followed(folder_factory: Factory, tmp_path: Path) -> None:
    """Issue 10 item 2: ``_read_index`` followed a symbolic link to an index outside the folder."""
    path = folder_factory(TINY, _state(), shards=2)
    outside = tmp_path / "elsewhere.json"
    os.replace(path / loader_mod.INDEX_FILE, outside)
    os.symlink(outside, path / loader_mod.INDEX_FILE)
    err = _refused(path)
    assert err.rule == "loader.index" and "symbolic links" in err.message


def test_verified_folder_loads_and_refuses_unpinned_and_changed(folder_factory: Factory) -> None:
    from secure_run.errors import VerificationError
    from secure_run.manifests.folder import VerifiedFolder

    path = folder_factory(TINY, _state(), shards=2)
    pins = _pinned(path)
    with VerifiedFolder.open(path, pins) as folder:  # type: ignore[arg-type]
        assert load_model(folder).config.model_type
    # a shard without a pin is never opened
    shard = "model-00002-of-00002.safetensors"
    with VerifiedFolder.open(path, [p for p in pins if p.name != shard]) as folder:  # type: ignore[attr-defined]
        with pytest.raises(VerificationError) as info:
            load_model(folder)
        assert info.value.rule == "folder.unpinned" and info.value.path == shard
    # config.json edited after verification, same size, mtime restored: ctime and sha256 catch it
    cfg = path / "config.json"
    st = os.stat(cfg)
    data = cfg.read_bytes()
    cfg.write_bytes(data.replace(b'"', b'"', 1))
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    with VerifiedFolder.open(path, pins) as folder:  # type: ignore[arg-type]
        with pytest.raises(VerificationError) as info:
            load_model(folder)
        assert info.value.rule == "folder.changed" and info.value.path == "config.json"


# --- staged loading (the CUDA path: two reusable page-locked buffers, read and copy overlapped) ----


def _staged(monkeypatch: pytest.MonkeyPatch, stage_bytes: int) -> list[loader_mod._Staging]:
    """Make a CPU load go through the staging buffers (as a CUDA load does), ``stage_bytes`` each."""
    made: list[loader_mod._Staging] = []

    def staging_for(device: torch.device) -> loader_mod._Staging:
        made.append(loader_mod._Staging(device, stage_bytes))
        return made[-1]

    monkeypatch.setattr(loader_mod, "_staging_for", staging_for)
    return made


def test_staged_load_equals_direct_load(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000-byte buffers: every tensor larger than that crosses buffers mid-element (fp32 = 4 bytes)
    path = folder_factory(TINY_SL, _state(TINY_SL), shards=3)
    direct = load_model(path).state_dict()
    made = _staged(monkeypatch, 1000)
    staged = load_model(path).state_dict()
    assert len(made) == 1 and made[0].bufs[0].numel() == 1000
    assert direct.keys() == staged.keys()
    for name, tensor in direct.items():
        assert staged[name].dtype == tensor.dtype and torch.equal(staged[name], tensor), name


def test_staged_load_refuses_a_shard_truncated_while_reading(folder_factory: Factory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_factory(TINY, _state())
    _staged(monkeypatch, 1000)
    real_read_into = loader_mod._OpenShard.read_into
    calls = []

    def truncate_midway(self: loader_mod._OpenShard, info: object, offset: int, view: memoryview) -> None:
        calls.append(offset)
        if len(calls) == 3:
            os.truncate(path / "model.safetensors", 4096)
        real_read_into(self, info, offset, view)  # type: ignore[arg-type]

    monkeypatch.setattr(loader_mod._OpenShard, "read_into", truncate_midway)
    err = _refused(path)
    assert err.rule == "loader.changed" and "ended inside tensor" in err.message


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_load_through_pinned_staging_is_bit_exact(folder_factory: Factory, monkeypatch: pytest.MonkeyPatch,
                                                        dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this host")
    path = folder_factory(TINY_SL, _state(TINY_SL), shards=3)
    want = load_model(path, dtype=dtype).state_dict()
    made = _staged(monkeypatch, 4096)  # many pieces per tensor: buffer reuse is exercised
    got = load_model(path, device="cuda", dtype=dtype).state_dict()
    assert made[0].cuda and made[0].bufs[0].is_pinned()
    for name, tensor in want.items():
        assert got[name].is_cuda and torch.equal(got[name].cpu(), tensor), name
