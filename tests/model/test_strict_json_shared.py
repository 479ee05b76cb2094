"""One strict JSON loader (manifests._jsoncheck.loads_strict) for every JSON secure-run reads (issue 10 item 7).

Where the copies disagreed, the looser one was a bug: each case below was accepted by one reader
and refused by another before they shared the loader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from secure_run.errors import ModelError
from secure_run.model.config import parse_config_json
from secure_run.model.demo import demo_model_dir
from secure_run.model.tokenizer import ModelTokenizer
from secure_run.sandbox.protocol import EventReader, ProtocolError, parse_request


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    shutil.copytree(demo_model_dir(), d)
    return d


def test_nan_in_generation_config_is_refused(tok_dir: Path) -> None:
    """json.loads accepted ``NaN`` in the token configs (the manifests' loader never did)."""
    (tok_dir / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": NaN}')
    with pytest.raises(ModelError) as info:
        ModelTokenizer.from_dir(tok_dir)
    assert info.value.rule == "tokenizer.json" and "NaN" in info.value.message
    assert info.value.path == "generation_config.json"


def test_a_byte_order_mark_is_refused_everywhere(tok_dir: Path) -> None:
    """The model's config reader accepted a BOM that the inventory refuses."""
    text = (demo_model_dir() / "config.json").read_bytes()
    with pytest.raises(ModelError) as info:
        parse_config_json(b"\xef\xbb\xbf" + text)
    assert info.value.rule == "config.json" and "byte-order mark" in info.value.message
    (tok_dir / "tokenizer_config.json").write_bytes(b"\xef\xbb\xbf{}")
    with pytest.raises(ModelError):
        ModelTokenizer.from_dir(tok_dir)


def test_config_keeps_its_rules_for_nan_duplicates_and_infinity() -> None:
    with pytest.raises(ModelError) as info:
        parse_config_json('{"a": NaN}')
    assert info.value.rule == "config.nan"
    with pytest.raises(ModelError) as info:
        parse_config_json('{"a": 1, "a": 2}')
    assert info.value.rule == "config.duplicate-key"


@pytest.mark.parametrize("data", [b'{"type": "token", "type": "text"}', b'{"x": Infinity}', b"\xef\xbb\xbf{}",
                                  b"[" * 100_000])
def test_protocol_uses_the_same_loader(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(data)
    assert info.value.rule == "sandbox.protocol.bad_request"
    with pytest.raises(ProtocolError):
        EventReader().parse_line(data)


# --- one REMOTE_CODE_KEYS ---------------------------------------------------------------------------


def test_one_definition_of_the_remote_code_keys() -> None:
    from secure_run.manifests import _jsoncheck
    from secure_run.model import config

    assert config.REMOTE_CODE_KEYS is _jsoncheck.CODE_POINTER_KEYS
    assert _jsoncheck.REMOTE_CODE_KEYS | _jsoncheck.ATTN_KEYS == config.REMOTE_CODE_KEYS


def test_decode_kernel_naming_a_hub_repository_is_refused_by_verify(tmp_path: Path) -> None:
    """The model treated ``decode_kernel`` as a code pointer, the verifier did not scan it at all."""
    from secure_run.manifests import take_inventory

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"decode_kernel": "kernels-community/superlinear:decode"}')
    findings = take_inventory(model).findings
    assert [(f.path, f.rule) for f in findings] == [("config.json#/decode_kernel", "JSON-REMOTE-CODE")]
    (model / "config.json").write_text('{"decode_kernel": "staged-gqa"}')  # upstream's value: a bare name
    assert not take_inventory(model).findings
