"""Issue 10 item 4: hostile chat templates end in a refusal with a rule id within 2 s, never a crash or hang.

Each case crashed (ZeroDivisionError, MemoryError, RecursionError) or hung the host when rendered
in-process with Jinja's sandbox; rendering now happens in a bounded child (model/template.py).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from secure_run.errors import ModelError
from secure_run.model.template import TemplateLimits, check_chat_template, render_chat_template
from secure_run.model.tokenizer import ChatTemplate

MSGS = [{"role": "user", "content": "hi"}]
DEADLINE_S = 2.0

HOSTILE = [
    pytest.param("{{ 1/0 }}", ("chat-template.render",), id="zero-division"),
    pytest.param("{{ 'a'*10**12 }}", ("chat-template.limit",), id="huge-string"),
    pytest.param("{{ 'a'|center(10**12) }}", ("chat-template.limit", "chat-template.render"), id="center"),
    pytest.param("{{ 'a'|indent(10**12) }}", ("chat-template.limit", "chat-template.render"), id="indent"),
    pytest.param("{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}", ("chat-template.limit",), id="nested-parens"),
    pytest.param("{{ 10 ** (10 ** 9) }}", ("chat-template.limit",), id="constant-folding"),
    pytest.param("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                 ("chat-template.limit",), id="nested-range"),
]


@pytest.mark.parametrize(("source", "rules"), HOSTILE)
def test_hostile_template_is_refused_quickly(source: str, rules: tuple[str, ...]) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        render_chat_template(source, MSGS)
    elapsed = time.monotonic() - t0
    assert info.value.rule in rules, info.value.diagnostics()
    assert info.value.path == "chat_template.jinja"
    assert elapsed < DEADLINE_S, f"refusal took {elapsed:.2f} s"


@pytest.mark.parametrize(("source", "rules"), HOSTILE)
def test_hostile_template_through_chat_template_class(source: str, rules: tuple[str, ...]) -> None:
    # the tokenizer's ChatTemplate (what the pipeline and worker call) goes through the bounded child,
    # including construction, which used to compile (and constant-fold) on the host
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        ChatTemplate(source).render(messages=MSGS)
    assert info.value.rule in rules, info.value.diagnostics()
    assert time.monotonic() - t0 < 2 * DEADLINE_S  # construction check + render, each bounded


def test_good_template_renders_messages_and_variables() -> None:
    src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}!{% endif %}"
    assert render_chat_template(src, MSGS, add_generation_prompt=True) == "<user>hi!"


def test_syntax_error_is_refused_at_check() -> None:
    with pytest.raises(ModelError) as info:
        check_chat_template("{% for %}")
    assert info.value.rule == "chat-template.syntax"


def test_wall_clock_kills_a_sleeping_child() -> None:
    # a CPU limit alone would not stop a child that waits; the parent's wall clock does
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                             MSGS, limits=TemplateLimits(wall_s=0.5, cpu_s=30))
    assert info.value.rule == "chat-template.limit" and "did not finish" in info.value.message
    assert time.monotonic() - t0 < 1.5


def test_output_cap() -> None:
    with pytest.raises(ModelError) as info:
        render_chat_template("{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", MSGS,
                             limits=TemplateLimits(max_output_chars=10_000))
    assert info.value.rule == "chat-template.size"


def test_child_cannot_import_torch() -> None:
    from secure_run.model import template

    boot = template._CHILD_BOOT.split("import json", 1)[0]  # the limits and the import block
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot + "import torch\n", "5", "1024"], capture_output=True)
    assert proc.returncode != 0
    assert b"import of torch halted" in proc.stderr
