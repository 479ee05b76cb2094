"""The embedded tiny demo model (built deterministically, signed with a demo key).

The built folder ships inside the package as ``superlinear-demo/``; rebuild it with
``python -m secure_run.model.demo.build OUT_DIR`` (byte-for-byte identical).

    >>> from secure_run.model.demo import demo_model_dir
    >>> (demo_model_dir() / "config.json").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DIR_NAME", "demo_model_dir"]

DEMO_DIR_NAME = "superlinear-demo"


def demo_model_dir() -> Path:
    """Path of the committed demo model folder inside the installed package."""
    return Path(__file__).resolve().parent / DEMO_DIR_NAME
