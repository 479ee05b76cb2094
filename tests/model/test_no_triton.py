"""The CPU path runs where triton is not installed at all (the Docker worker image has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError, as in the worker image
    import torch
    from secure_run.model.demo import demo_model_dir
    from secure_run.model.generate import GenerationConfig, generate
    from secure_run.model.loader import load_model

    model = load_model(demo_model_dir(), device="cpu")
    with torch.inference_mode():
        out = list(generate(model, [1, 2, 3, 4, 5], GenerationConfig(max_new_tokens=6)))
    assert len(out) == 6, out
    assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules if sys.modules[name] is not None)
    print("ok", out)
""")


def test_cpu_decode_needs_no_triton() -> None:
    # regression: the decode projections' dispatch imported the Triton GEMV module (and so triton)
    # before it checked the device, and every Docker worker failed with "No module named 'triton'"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ")
