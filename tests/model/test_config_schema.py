"""config.json schema: one test per rule (spec/model.md section 1)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import DELETE, REAL_CONFIG, TINY, TINY_SL, real_config_text

from secure_run.errors import ModelError
from secure_run.model.config import (
    INERT_KEYS,
    REMOTE_CODE_KEYS,
    load_config,
    parse_config_json,
    remote_code_pointers,
)


def _refused(text: str) -> ModelError:
    with pytest.raises(ModelError) as info:
        parse_config_json(text)
    return info.value


def test_real_config_parses_with_infinity_literal() -> None:
    text = real_config_text()
    assert "Infinity" in text  # the non-JSON literal upstream ships
    cfg = parse_config_json(text)
    assert cfg.time_step_limit == (0.0, math.inf)
    assert cfg.model_type == "superlinear-exp"
    assert cfg.attention_layers == (5, 12, 19, 26, 33, 42)
    assert cfg.layers_of("mamba") == (0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 25, 28, 30, 32, 35, 37, 39, 41, 44,
                                      46, 48, 50)
    assert len(cfg.layers_of("moe")) == 23 and cfg.layers_of("mlp") == ()
    assert (cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_in_proj_dim) == (4096, 6144, 10304)
    p = cfg.span_params()
    assert (p.sw_index, p.num_spans, p.backward_factor, p.forward_factor) == (65, 3, 3.0, 1.0)
    assert p.search_power == 0.55 and p.inv_search_power_int is None and p.window_len == 2032


def test_transformers_infinity_marker_accepted() -> None:
    cfg = parse_config_json(real_config_text(time_step_limit=[0.0, {"__float__": "Infinity"}]))
    assert cfg.time_step_limit == (0.0, math.inf)


def test_nan_refused() -> None:
    err = _refused(real_config_text().replace('"rope_theta": 10000', '"rope_theta": NaN'))
    assert err.rule == "config.nan" and "NaN" in err.message


def test_duplicate_key_refused() -> None:
    text = real_config_text().replace('"n_groups": 8,', '"n_groups": 1, "n_groups": 8,')
    err = _refused(text)
    assert err.rule == "config.duplicate-key" and "'n_groups'" in err.message


def test_invalid_json_refused() -> None:
    assert _refused("{not json").rule == "config.json"
    assert _refused("[1, 2]").rule == "config.json"


def test_unknown_field_refused() -> None:
    err = _refused(real_config_text(attention_temperature=2.0, zz_extra=1))
    assert err.rule == "config.unknown-field"
    assert "attention_temperature" in err.message and "zz_extra" in err.message
    assert err.path == "config.json" and err.hint


def test_inert_and_remote_keys_are_accepted_and_kept_aside() -> None:
    cfg = parse_config_json(real_config_text())
    assert set(cfg.inert) <= INERT_KEYS and "transformers_version" in cfg.inert
    assert set(cfg.remote_code) == {"auto_map", "_attn_implementation", "decode_kernel"}
    assert "auto_map" not in cfg.model_dump()


def test_remote_code_pointers_reported_never_used() -> None:
    raw = json.loads(real_config_text())
    ptrs = remote_code_pointers(raw)
    assert [p.key for p in ptrs] == ["_attn_implementation", "auto_map", "decode_kernel"]
    assert ptrs[0].value == '"block-span-gqa"'
    assert "modeling_superlinear_exp.SuperlinearExpForCausalLM" in ptrs[1].value
    assert "never runs" in ptrs[1].describe()
    assert [p.key for p in remote_code_pointers(parse_config_json(real_config_text()))] == [p.key for p in ptrs]
    assert remote_code_pointers(TINY) == []
    assert REMOTE_CODE_KEYS >= {"auto_map", "custom_pipelines", "trust_remote_code"}


def test_config_module_does_not_import_torch() -> None:
    code = ("import sys, secure_run.model.config, secure_run.model.checkpoint, secure_run.model; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pattern_num_hidden_layers_mismatch_refused() -> None:
    err = _refused(real_config_text(num_hidden_layers=51))
    assert err.rule == "config.pattern-length"
    assert any("52 layers but num_hidden_layers is 51" in d for d in err.details)


def test_pattern_characters_checked() -> None:
    err = _refused(real_config_text(hybrid_override_pattern="M" * 51 + "X"))
    assert any("hybrid_override_pattern" in d and "'X'" in d for d in err.details)


def test_model_type_allowlist() -> None:
    err = _refused(real_config_text(model_type="llama"))
    assert err.rule == "config.model-type" and "'llama'" in err.message


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("hidden_size", 0, "greater than or equal to 1"),
        ("vocab_size", -5, "greater than or equal to 1"),
        ("num_experts_per_tok", 0, "greater than or equal to 1"),
        ("layer_norm_epsilon", 0.0, "greater than 0"),
        ("routed_scaling_factor", -1.0, "greater than 0"),
        ("span_attention_search_power", 1.5, "less than 1"),
        ("span_attention_span_power", 0.0, "greater than 0"),
        ("span_attention_inv_search_power_int", 7, "less than or equal to 6"),
        ("span_attention_num_spans", 0, "greater than or equal to 1"),
        ("conv_kernel", 1000, "less than or equal to 64"),
    ],
)
def test_range_checks(field: str, value: object, needle: str) -> None:
    err = _refused(real_config_text(**{field: value}))
    assert err.rule in ("config.range", "config.invalid")
    assert any(d.startswith(field) and needle in d for d in err.details), err.details


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 2688.0),  # float for an int
        ("hidden_size", "2688"),  # string for an int
        ("use_conv_bias", 1),  # int for a bool
        ("norm_topk_prob", "true"),
        ("routed_scaling_factor", "2.5"),  # string for a float
        ("hidden_size", True),  # bool for an int
    ],
)
def test_types_are_strict(field: str, value: object) -> None:
    err = _refused(real_config_text(**{field: value}))
    assert any(d.startswith(field) for d in err.details), err.details


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_bias", True),
        ("tie_word_embeddings", True),
        ("n_group", 8),
        ("topk_group", 4),
        ("mlp_hidden_act", "silu"),
        ("mamba_hidden_act", "gelu"),
        ("residual_in_fp32", True),
        ("use_bias", True),
        ("sliding_window", 4096),
        ("n_shared_experts", 2),
        ("mamba_ssm_cache_dtype", "bfloat16"),
        ("moe_latent_size", 1024),
    ],
)
def test_unimplemented_variants_refused(field: str, value: object) -> None:
    err = _refused(real_config_text(**{field: value}))
    assert any(d.startswith(field) for d in err.details), err.details


def test_time_step_limit_range() -> None:
    assert _refused(real_config_text(time_step_limit=[0.5, 0.1])).details
    assert _refused(real_config_text(time_step_limit=[-1.0, 1.0])).details
    assert _refused(real_config_text(time_step_limit=[0.0])).details


def test_gqa_divisibility() -> None:
    err = _refused(real_config_text(num_key_value_heads=3))
    assert err.rule == "config.gqa"


def test_mamba_groups_divisibility() -> None:
    assert _refused(real_config_text(n_groups=7)).rule == "config.mamba-groups"


def test_topk_not_above_experts() -> None:
    assert _refused(real_config_text(num_experts_per_tok=129)).rule == "config.moe-topk"


def test_token_ids_inside_vocabulary() -> None:
    assert _refused(real_config_text(eos_token_id=[2, 131072])).rule == "config.token-id"
    assert _refused(real_config_text(bos_token_id=200000)).rule == "config.token-id"


def test_dtype_required_and_consistent() -> None:
    assert _refused(real_config_text(torch_dtype=DELETE)).rule == "config.dtype"
    assert _refused(real_config_text(dtype="float16")).rule == "config.dtype"
    assert parse_config_json(real_config_text(torch_dtype=DELETE, dtype="bfloat16")).checkpoint_dtype == "bfloat16"
    assert _refused(real_config_text(torch_dtype="int8")).details


def test_norm_eps_alias_must_agree() -> None:
    assert _refused(real_config_text(norm_eps=1e-6)).rule == "config.eps"


def test_superlinear_needs_span_keys() -> None:
    err = _refused(real_config_text(span_attention_sw_index=DELETE))
    assert err.rule == "config.span-missing" and "span_attention_sw_index" in err.details[0]


def test_exactly_one_search_power_mode() -> None:
    both = _refused(real_config_text(span_attention_inv_search_power_int=2))
    assert both.rule == "config.span-power"
    neither = _refused(real_config_text(span_attention_search_power=DELETE))
    assert neither.rule == "config.span-power"
    cfg = parse_config_json(real_config_text(span_attention_search_power=DELETE, span_attention_inv_search_power_int=2))
    assert cfg.span_params().integer_mode


def test_nemotron_h_refuses_span_keys() -> None:
    err = _refused(json.dumps(TINY | {"span_attention_sw_index": 3}))
    assert err.rule == "config.span-unexpected"
    err = _refused(json.dumps(TINY | {"secure_run_search_proj": "q_search_proj"}))
    assert err.rule == "config.span-unexpected"


def test_nemotron_h_has_no_span_params() -> None:
    cfg = parse_config_json(json.dumps(TINY))
    assert not cfg.superlinear
    with pytest.raises(ModelError) as info:
        cfg.span_params()
    assert info.value.rule == "config.model-type"


def test_search_proj_name_must_be_identifier() -> None:
    err = _refused(json.dumps(TINY_SL | {"secure_run_search_proj": "../etc"}))
    assert any("secure_run_search_proj" in d for d in err.details)


def test_head_dim_limit_for_superlinear() -> None:
    assert _refused(real_config_text(head_dim=512)).rule == "config.head-dim"


def test_config_is_frozen() -> None:
    cfg = parse_config_json(real_config_text())
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        cfg.hidden_size = 1  # type: ignore[misc]


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        load_config(tmp_path)
    assert info.value.rule == "config.missing"


def test_summary_is_json_able() -> None:
    s = parse_config_json(real_config_text()).summary()
    assert json.loads(json.dumps(s))["layer_counts"] == {"mamba": 23, "moe": 23, "attention": 6, "mlp": 0}
    assert s["remote_code_pointers"] == ["_attn_implementation", "auto_map", "decode_kernel"]


def test_every_spec_field_is_known() -> None:
    # every key of the released config is either a schema field, inert metadata or a remote pointer
    from secure_run.model.config import ModelConfig

    known = set(ModelConfig.model_fields) | INERT_KEYS | REMOTE_CODE_KEYS
    assert set(REAL_CONFIG) <= known


# --- configs as transformers 5.x writes them (issue 11 item 8) -----------------------------------

_LAYER_NAMES = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_REAL_LAYERS = [_LAYER_NAMES[c] for c in str(REAL_CONFIG["hybrid_override_pattern"])]


def test_config_saved_by_transformers_save_pretrained_is_accepted(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    keys = ("vocab_size", "hidden_size", "hybrid_override_pattern", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
            "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "routed_scaling_factor", "layer_norm_epsilon")
    hf = transformers.NemotronHConfig(**{k: TINY[k] for k in keys}, dtype="float32")
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # what transformers 5.x really writes: the layout as layers_block_type, plus the MTP / overlap keys
    assert {"layers_block_type", "mtp_layers_block_type", "num_nextn_predict_layers", "moe_shared_expert_overlap"} <= set(raw)
    assert "hybrid_override_pattern" not in raw and raw["num_nextn_predict_layers"] == 0
    cfg = load_config(tmp_path)
    want = parse_config_json(json.dumps(TINY))
    assert cfg.hybrid_override_pattern == want.hybrid_override_pattern == TINY["hybrid_override_pattern"]
    assert cfg.num_hidden_layers == want.num_hidden_layers and cfg.layer_types == want.layer_types
    for k in keys:
        assert getattr(cfg, k) == getattr(want, k), k
    assert cfg.time_step_limit == (0.0, math.inf) and cfg.checkpoint_dtype == "float32"


def test_layers_block_type_must_spell_the_pattern() -> None:
    cfg = parse_config_json(real_config_text(layers_block_type=_REAL_LAYERS))
    assert cfg.attention_layers == (5, 12, 19, 26, 33, 42)
    legacy = ["mamba" if t == "linear_attention" else "attention" if t == "full_attention" else t for t in _REAL_LAYERS]
    assert parse_config_json(real_config_text(layers_block_type=legacy)).layer_types == cfg.layer_types
    swapped = _REAL_LAYERS[:]
    swapped[5], swapped[6] = swapped[6], swapped[5]
    err = _refused(real_config_text(layers_block_type=swapped))
    assert err.rule == "config.layers-block-type" and any("hybrid_override_pattern" in d for d in err.details)
    err = _refused(real_config_text(layers_block_type=_REAL_LAYERS[:-1]))
    assert err.rule == "config.layers-block-type"


def test_layers_block_type_alone_gives_the_pattern_and_layer_count() -> None:
    cfg = parse_config_json(real_config_text(hybrid_override_pattern=DELETE, num_hidden_layers=DELETE,
                                             layers_block_type=_REAL_LAYERS))
    assert cfg.hybrid_override_pattern == REAL_CONFIG["hybrid_override_pattern"] and cfg.num_hidden_layers == 52
    err = _refused(real_config_text(hybrid_override_pattern=DELETE, num_hidden_layers=51,
                                    layers_block_type=_REAL_LAYERS))
    assert err.rule == "config.pattern-length"


def test_unknown_layer_types_refused() -> None:
    err = _refused(real_config_text(layers_block_type=_REAL_LAYERS[:-1] + ["sparse_attention"]))
    assert any(d.startswith("layers_block_type") and "sparse_attention" in d for d in err.details), err.details
    err = _refused(real_config_text(hybrid_override_pattern=DELETE, layers_block_type=["mamba", 3]))
    assert any(d.startswith("layers_block_type") for d in err.details), err.details
    err = _refused(real_config_text(mtp_layers_block_type=["full_attention", "dense"]))
    assert any(d.startswith("mtp_layers_block_type") and "dense" in d for d in err.details), err.details


def test_mtp_layers_must_be_absent() -> None:
    cfg = parse_config_json(real_config_text(num_nextn_predict_layers=0, mtp_layers_block_type=["full_attention", "moe"]))
    assert cfg.num_nextn_predict_layers == 0
    err = _refused(real_config_text(num_nextn_predict_layers=1, mtp_layers_block_type=["full_attention", "moe"]))
    assert err.rule == "config.mtp" and "multi-token-prediction" in err.details[0]
    assert _refused(real_config_text(num_nextn_predict_layers=-1)).details


def test_moe_shared_expert_overlap_is_a_bool() -> None:
    for value in (True, False):
        assert parse_config_json(real_config_text(moe_shared_expert_overlap=value)).moe_shared_expert_overlap is value
    err = _refused(real_config_text(moe_shared_expert_overlap="yes"))
    assert any(d.startswith("moe_shared_expert_overlap") for d in err.details)


def test_unreviewed_transformers_keys_still_refused() -> None:
    err = _refused(real_config_text(mtp_hybrid_override_pattern="*E", layer_types=_REAL_LAYERS))
    assert err.rule == "config.unknown-field"
    assert "mtp_hybrid_override_pattern" in err.message and "layer_types" in err.message


# --- position mode of the Superlinear kernels (issue 11 item 6) ----------------------------------


def test_position_mode_defaults_to_upstream_fp32() -> None:
    cfg = parse_config_json(real_config_text())
    assert cfg.position_mode == "upstream-fp32" and cfg.span_params().position_mode == "upstream-fp32"
    exact = parse_config_json(real_config_text(secure_run_position_mode="exact"))
    assert exact.span_params().position_mode == "exact"
    assert exact.span_params().with_mode("upstream-fp32") == cfg.span_params()
    err = _refused(real_config_text(secure_run_position_mode="fp16"))
    assert any(d.startswith("secure_run_position_mode") for d in err.details)
    err = _refused(json.dumps(TINY | {"secure_run_position_mode": "exact"}))
    assert err.rule == "config.span-unexpected"
