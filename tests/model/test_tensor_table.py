"""The exact tensor table of the released architecture, and a full-size model on the meta device."""

from __future__ import annotations

import pytest
import torch
from model_helpers import TINY, TINY_SL, real_config_text, tiny_config

from secure_run.errors import ModelError
from secure_run.model.checkpoint import (
    AttentionNameMap,
    checkpoint_to_internal,
    expected_tensors,
    name_map_for,
    parameter_count,
)
from secure_run.model.config import parse_config_json
from secure_run.model.model import HybridLM

BASE_TENSORS, BASE_PARAMS = 6243, 31_577_940_288  # spec/model.md 2.7
SEARCH_TENSORS, SEARCH_PARAMS = 6, 66_060_288


def test_real_table_matches_spec_counts() -> None:
    cfg = parse_config_json(real_config_text())
    base = expected_tensors(cfg)  # no search-projection name known: base tensors only
    full = expected_tensors(cfg, AttentionNameMap(search_query="q_search_proj"))
    assert (len(base), parameter_count(base)) == (BASE_TENSORS, BASE_PARAMS)
    assert (len(full) - len(base), parameter_count(full) - parameter_count(base)) == (SEARCH_TENSORS, SEARCH_PARAMS)
    # spot checks against spec/model.md 2.1-2.6 (names, shapes, dtypes)
    assert full["backbone.embeddings.weight"].shape == (131072, 2688)
    assert full["lm_head.weight"].shape == (131072, 2688)
    assert full["backbone.layers.0.mixer.in_proj.weight"].shape == (10304, 2688)
    assert full["backbone.layers.0.mixer.conv1d.weight"].shape == (6144, 1, 4)
    assert full["backbone.layers.0.mixer.norm.weight"].shape == (4096,)
    assert full["backbone.layers.1.mixer.experts.127.down_proj.weight"].shape == (2688, 1856)
    assert full["backbone.layers.1.mixer.shared_experts.up_proj.weight"].shape == (3712, 2688)
    assert full["backbone.layers.1.mixer.gate.e_score_correction_bias"].dtypes == {"F32"}
    assert full["backbone.layers.1.mixer.experts.0.up_proj.weight"].dtypes == {"BF16"}
    assert full["backbone.layers.5.mixer.k_proj.weight"].shape == (256, 2688)
    assert full["backbone.layers.42.mixer.q_search_proj.weight"].shape == (4096, 2688)
    assert full["backbone.layers.42.mixer.o_proj.weight"].shape == (2688, 4096)
    assert "backbone.layers.43.mixer.q_search_proj.weight" not in full


def test_full_size_model_on_meta_device_has_the_exact_table() -> None:
    cfg = parse_config_json(real_config_text(secure_run_search_proj="q_search_proj"))
    with torch.device("meta"):
        model = HybridLM(cfg, dtype=torch.bfloat16)
    names = name_map_for(cfg)
    table = expected_tensors(cfg, names)
    state = model.state_dict()
    assert len(state) == len(table) == BASE_TENSORS + SEARCH_TENSORS
    internal = {checkpoint_to_internal(cfg, names, n): spec for n, spec in table.items()}
    assert set(state) == set(internal)
    for name, t in state.items():
        assert tuple(t.shape) == internal[name].shape, name
    assert sum(t.numel() for t in state.values()) == BASE_PARAMS + SEARCH_PARAMS
    assert state["backbone.layers.1.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert state["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    assert state["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16


def test_nemotron_h_table_has_no_search_projection() -> None:
    cfg = tiny_config(TINY)
    table = expected_tensors(cfg, AttentionNameMap(search_query="q_search_proj"))
    assert not any("q_search_proj" in n for n in table)
    assert "backbone.layers.4.mixer.up_proj.weight" in table  # the '-' (dense MLP) layer


def test_name_map_translates_attention_names_only() -> None:
    cfg = tiny_config(TINY_SL)
    names = AttentionNameMap(search_query="q2_proj", query="q_proj")
    assert checkpoint_to_internal(cfg, names, "backbone.layers.1.mixer.q2_proj.weight") == (
        "backbone.layers.1.mixer.q_search_proj.weight")
    assert checkpoint_to_internal(cfg, names, "backbone.layers.0.mixer.in_proj.weight") == (
        "backbone.layers.0.mixer.in_proj.weight")
    with pytest.raises(ModelError) as info:
        checkpoint_to_internal(cfg, names, "backbone.layers.1.mixer.unknown.weight")
    assert info.value.rule == "loader.unmapped"


@pytest.mark.parametrize("bad", [("q_proj", "q_proj"), ("x.y", "q_proj"), ("", "q_proj")])
def test_name_map_must_be_distinct_identifiers(bad: tuple[str, str]) -> None:
    with pytest.raises(ModelError) as info:
        AttentionNameMap(search_query=bad[0], query=bad[1])
    assert info.value.rule == "loader.name-map"


def test_config_records_search_projection_name() -> None:
    assert name_map_for(tiny_config(TINY_SL)).search_query == "q_search_proj"
    assert name_map_for(tiny_config(TINY_SL, secure_run_search_proj=None)).search_query is None
    assert name_map_for(tiny_config(TINY)).search_query is None
